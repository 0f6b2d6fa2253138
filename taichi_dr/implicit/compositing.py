"""Volume compositing of packed ray samples (UNISURF occupancy as alpha, NeRF density), Taichi kernels with a
hand-written backward.

Each ray ``r`` owns the samples ``offsets[r] : offsets[r + 1]`` of a :class:`~taichi_dr.implicit.samples.RaySamples`
(front to back). Every sample has an alpha ``a_i`` in [0, 1] and a colour ``c_i`` (C channels):

* ``mode="alpha"`` (UNISURF, Oechsle et al. 2021): the network's occupancy is the alpha, ``a_i = o_i``
  (clamped to [0, 1]; no gradient where the clamp is active);
* ``mode="density"`` (NeRF, Mildenhall et al. 2020): ``a_i = 1 - exp(-sigma_i delta_i)`` with
  ``sigma_i`` clamped at 0 (no gradient for ``sigma_i < 0``) and ``delta_i`` the sample's length of ray.

With the transmittance ``T_i = prod_{j<i} (1 - a_j)`` and the weights ``w_i = a_i T_i``:

    colour  = sum_i w_i c_i          (UNISURF: C = sum_i o_i prod_{j<i} (1 - o_j) c_i)
    opacity = sum_i w_i              (= 1 - prod_i (1 - a_i); clamped at 1 against rounding)
    depth   = sum_i w_i t_i          (expected depth; not divided by the opacity)

Backward (one thread per ray, one reverse pass over its samples, no division by ``1 - a_i``, so ``a_i = 1``
is fine): with the upstream gradients ``gC, gO, gD`` (per ray) and ``gW`` (per sample),
``g_i = gC . c_i + gO + gD t_i + gW_i`` is the gradient of the loss with respect to ``w_i``, and

    dL/da_i = T_i (g_i - R_i),   R_i = sum_{j>i} a_j prod_{i<k<j} (1 - a_k) g_j,
    R_{i-1} = a_i g_i + (1 - a_i) R_i   (a reverse scan, R_last = 0),
    dL/dc_i = w_i gC.

The forward keeps ``T_i`` (S,) and, in density mode, ``exp(-sigma_i delta_i)`` (S,) for it, so the backward
evaluates no exp or log. The forward kernel also scans the values and colours for NaN/Inf (reported as a
ValueError naming the argument).

Numerics: ``1 - exp(-x)`` is computed without cancellation for small ``x`` (its Taylor series below 0.25), so a
float32 alpha of a thin sample keeps its relative precision; ``sigma * delta`` overflowing to infinity gives
alpha 1 and a zero alpha gradient, never NaN. ``delta`` is clamped at 0 (a sampler never produces a negative
one). Offsets must be monotone (the samplers' job, not scanned for); ``offsets[0] = 0`` and
``offsets[-1] = S`` are checked, and a kernel never reads outside the arrays whatever the offsets.
"""

# No `from __future__ import annotations`: Taichi reads the kernels' annotations as objects.
from dataclasses import dataclass

import taichi as ti
import torch

from taichi_dr.core import runtime
from taichi_dr.core.bridge import FLOAT_DTYPES, KernelOp, apply, check_tensor, to_kernel
from taichi_dr.implicit.samples import RaySamples

__all__ = ["Composite", "composite", "composite_background"]

MODES = ("alpha", "density")
_FP = {torch.float32: ti.f32, torch.float64: ti.f64}


@dataclass
class Composite:
    """Per-ray compositing results of ``R`` rays with ``S`` samples in all (differentiable).

    colour: (R, C) ``sum_i w_i c_i`` (no background; see :func:`composite_background`).
    opacity: (R,) ``sum_i w_i``, i.e. 1 - the ray's final transmittance, in [0, 1].
    depth: (R,) ``sum_i w_i t_i``, the expected depth NOT divided by the opacity (divide by it, guarded, for
        the depth of the visible surface).
    weights: (S,) ``w_i = a_i prod_{j<i} (1 - a_j)``, packed like the samples.
    """

    colour: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    weights: torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# Kernels: one thread per ray, a serial loop over the ray's packed samples. Arrays are torch tensors passed as
# ndarrays; `fp` (ti.f32 / ti.f64) types the local accumulators (a bare literal would make them f32). Every
# array a kernel writes is written in full (on Vulkan the whole buffer is copied back, see sphere_tracing.py):
# each sample belongs to exactly one ray, whose thread writes it.
# `n_channels` is C when the channel loops are unrolled (C <= MAX_UNROLLED_CHANNELS: the colour sums live in
# registers) and 0 for a run-time loop over colours.shape[1] (sums accumulated in the output rows).
# The forward keeps each sample's transmittance T_i and, in density mode, exp(-sigma_i delta_i) for the backward,
# which then needs one reverse pass and no exp/log (scalar libm calls dominate a per-ray loop's cost).

MAX_UNROLLED_CHANNELS = 8
# Terms of the series of 1 - exp(-x) used below x = 0.25: the truncation error x^n / (n + 1)! relative to x is
# below half an ulp (1.5e-9 for float32 with 7 terms, 1e-17 for float64 with 12).
_SERIES_TERMS = {torch.float32: 7, torch.float64: 12}
_SERIES_BELOW = 0.25


@ti.func
def _one_minus_exp_neg(x, e, n_terms: ti.template(), fp: ti.template()):
    """1 - exp(-x) for x >= 0 given e = exp(-x): 1 - e where that subtraction loses nothing (e <= 0.78), else
    the Taylor series (1 - e would cancel: float32 has no relative precision left at x = 1e-8)."""
    a = 1.0 - e
    if x < _SERIES_BELOW:
        p = x * 0.0 + 1.0
        for k in ti.static(range(n_terms, 1, -1)):   # Horner: x (1 - x/2 (1 - x/3 (1 - ...)))
            p = 1.0 - x * p * fp(1.0 / k)            # fp(...): a bare 1.0 / k would be an f32 constant
        a = x * p
    return a


# A float is NaN or Inf when its exponent bits are all ones: (uint type, mantissa bits, exponent mask) per dtype.
# Tested on the bits because Taichi compiles with fast math, under which `x != x` may be folded away.
_FLOAT_BITS = {torch.float32: (ti.u32, 23, 0xFF), torch.float64: (ti.u64, 52, 0x7FF)}
BAD_VALUE, BAD_COLOUR = 1, 2   # bits of the forward kernel's per-ray status


@ti.func
def _not_finite(x, bits: ti.template()):
    exponent = ti.cast(ti.bit_cast(x, bits[0]) >> bits[1], ti.i32) & bits[2]
    return exponent == bits[2]


@ti.func
def _ray_range(offsets: ti.template(), r, n_samples):
    """Ray r's samples, clamped to [0, n_samples): malformed offsets (reported after the forward kernel) can
    never make a thread read or write outside the arrays."""
    start = ti.min(ti.max(offsets[r], 0), n_samples)
    end = ti.min(ti.max(offsets[r + 1], start), n_samples)
    return start, end


@ti.func
def _clamp_alpha(value):
    """UNISURF: alpha = occupancy clamped to [0, 1], and d alpha / d value (1 on [0, 1] as torch.clamp, else 0)."""
    a = ti.min(ti.max(value, 0.0), 1.0)
    da = a * 0.0
    if value >= 0.0 and value <= 1.0:
        da = 1.0
    return a, da


@ti.func
def _optical_depth(value, delta):
    """NeRF: x = max(sigma, 0) max(delta, 0) (may overflow to +inf: exp(-inf) = 0, alpha 1), and the clamped
    delta, which is d x / d sigma for sigma >= 0."""
    step = ti.max(delta, 0.0)
    return ti.max(value, 0.0) * step, step


@runtime.locked
@ti.kernel
def _composite_forward(values: ti.types.ndarray(), colours: ti.types.ndarray(), t: ti.types.ndarray(),
                       delta: ti.types.ndarray(), offsets: ti.types.ndarray(), colour: ti.types.ndarray(),
                       opacity: ti.types.ndarray(), depth: ti.types.ndarray(), weights: ti.types.ndarray(),
                       transmittance: ti.types.ndarray(), transparency: ti.types.ndarray(),
                       status: ti.types.ndarray(), density: ti.template(), n_channels: ti.template(),
                       n_terms: ti.template(), fp: ti.template(), bits: ti.template()):
    """Also the input scan for NaN/Inf, fused here (a separate torch scan cost ~25% of forward + backward):
    status (R,) gets BAD_VALUE / BAD_COLOUR bits for rays with a non-finite value / colour."""
    for r in range(offsets.shape[0] - 1):
        start, end = _ray_range(offsets, r, values.shape[0])
        bad = 0
        trans = ti.cast(1.0, fp)
        acc_opacity = ti.cast(0.0, fp)
        acc_depth = ti.cast(0.0, fp)
        acc_colour = ti.Vector.zero(fp, ti.static(max(n_channels, 1)))
        if ti.static(n_channels == 0):
            for c in range(colours.shape[1]):
                colour[r, c] = 0.0
        for i in range(start, end):
            if _not_finite(values[i], bits):
                bad |= BAD_VALUE
            a = ti.cast(0.0, fp)
            e = ti.cast(1.0, fp)   # 1 - a
            if ti.static(density):
                x, _ = _optical_depth(values[i], delta[i])
                e = ti.exp(-x)
                a = _one_minus_exp_neg(x, e, n_terms, fp)
                transparency[i] = e
            else:
                a, _ = _clamp_alpha(values[i])
                e = 1.0 - a
            w = a * trans
            weights[i] = w
            transmittance[i] = trans
            acc_opacity += w
            acc_depth += w * t[i]
            if ti.static(n_channels > 0):
                for c in ti.static(range(n_channels)):
                    acc_colour[c] += w * colours[i, c]
                    if _not_finite(colours[i, c], bits):
                        bad |= BAD_COLOUR
            else:
                for c in range(colours.shape[1]):
                    colour[r, c] = colour[r, c] + w * colours[i, c]   # this thread's own row
                    if _not_finite(colours[i, c], bits):
                        bad |= BAD_COLOUR
            trans *= e
        opacity[r] = ti.min(acc_opacity, 1.0)
        depth[r] = acc_depth
        status[r] = bad
        if ti.static(n_channels > 0):
            for c in ti.static(range(n_channels)):
                colour[r, c] = acc_colour[c]


@runtime.locked
@ti.kernel
def _composite_backward(values: ti.types.ndarray(), colours: ti.types.ndarray(), t: ti.types.ndarray(),
                        delta: ti.types.ndarray(), offsets: ti.types.ndarray(), transmittance: ti.types.ndarray(),
                        transparency: ti.types.ndarray(), g_colour: ti.types.ndarray(),
                        g_opacity: ti.types.ndarray(), g_depth: ti.types.ndarray(), g_weights: ti.types.ndarray(),
                        g_values: ti.types.ndarray(), g_colours: ti.types.ndarray(), density: ti.template(),
                        n_channels: ti.template(), n_terms: ti.template(), fp: ti.template()):
    for r in range(offsets.shape[0] - 1):
        start, end = _ray_range(offsets, r, values.shape[0])
        g_o, g_d = g_opacity[r], g_depth[r]
        g_c = ti.Vector.zero(fp, ti.static(max(n_channels, 1)))
        if ti.static(n_channels > 0):
            for c in ti.static(range(n_channels)):
                g_c[c] = g_colour[r, c]
        # Back to front: dL/da_i = T_i (g_i - R_i), and the reverse scan R_{i-1} = a_i g_i + (1 - a_i) R_i.
        after = ti.cast(0.0, fp)
        for k in range(end - start):
            i = end - 1 - k
            a = ti.cast(0.0, fp)
            e = ti.cast(1.0, fp)
            da = ti.cast(0.0, fp)
            if ti.static(density):
                x, step = _optical_depth(values[i], delta[i])
                e = transparency[i]
                a = _one_minus_exp_neg(x, e, n_terms, fp)
                if values[i] >= 0.0:
                    da = step * e             # d(1 - exp(-sigma delta)) / d sigma; 0 where x overflowed
            else:
                a, da = _clamp_alpha(values[i])
                e = 1.0 - a
            trans = transmittance[i]
            w = a * trans
            g = g_o + g_d * t[i] + g_weights[i]
            if ti.static(n_channels > 0):
                for c in ti.static(range(n_channels)):
                    g += g_c[c] * colours[i, c]
                    g_colours[i, c] = w * g_c[c]
            else:
                for c in range(colours.shape[1]):
                    g += g_colour[r, c] * colours[i, c]
                    g_colours[i, c] = w * g_colour[r, c]
            g_values[i] = trans * (g - after) * da
            after = a * g + e * after


# ---------------------------------------------------------------------------------------------------------


class CompositeOp(KernelOp):
    """Inputs: values (S,), colours (S, C), t (S,), delta (S,), offsets (R + 1,) int32.
    Outputs: colour (R, C), opacity (R,), depth (R,), weights (S,). Gradients reach values and colours."""

    def __init__(self, mode: str):
        self.density = mode == "density"

    def _static_args(self, values, colours):
        n_channels = colours.shape[1] if colours.shape[1] <= MAX_UNROLLED_CHANNELS else 0
        return self.density, n_channels, _SERIES_TERMS[values.dtype], _FP[values.dtype]

    def forward(self, values, colours, t, delta, offsets):
        n_rays, n_samples, n_channels = offsets.shape[0] - 1, values.shape[0], colours.shape[1]
        opts = dict(dtype=values.dtype, device=values.device)
        if n_samples == 0 or n_rays == 0:   # no kernel for empty arrays (zero-sized buffers on Vulkan)
            _check_contents(offsets, n_samples, None)
            colour = torch.zeros((n_rays, n_channels), **opts)
            opacity, depth = torch.zeros(n_rays, **opts), torch.zeros(n_rays, **opts)
            return (colour, opacity, depth, torch.zeros(n_samples, **opts)), None
        colour = torch.empty((n_rays, n_channels), **opts)
        opacity, depth = torch.empty(n_rays, **opts), torch.empty(n_rays, **opts)
        weights = torch.empty(n_samples, **opts)
        transmittance = torch.empty(n_samples, **opts)
        # Density mode keeps exp(-sigma delta); alpha mode has 1 - alpha at hand and gets a 1-element stand-in.
        transparency = torch.empty(n_samples if self.density else 1, **opts)
        status = torch.empty(n_rays, dtype=torch.int32, device=values.device)
        _composite_forward(values, colours, t, delta, offsets, colour, opacity, depth, weights, transmittance,
                           transparency, status, *self._static_args(values, colours), _FLOAT_BITS[values.dtype])
        _check_contents(offsets, n_samples, status)
        return (colour, opacity, depth, weights), (values, colours, t, delta, offsets, transmittance, transparency)

    def backward(self, saved, g_colour, g_opacity, g_depth, g_weights):
        if saved is None:   # nothing to composite: shapes from the (empty) gradients
            return (g_weights.new_zeros(g_weights.shape), g_colour.new_zeros((0, g_colour.shape[1])), None, None,
                    None)
        values, colours, t, delta, offsets, transmittance, transparency = saved
        g_values = torch.empty_like(values)
        g_colours = torch.empty_like(colours)
        _composite_backward(values, colours, t, delta, offsets, transmittance, transparency, g_colour, g_opacity,
                            g_depth, g_weights, g_values, g_colours, *self._static_args(values, colours))
        return g_values, g_colours, None, None, None


def _check_inputs(values, colours, samples, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected 'alpha' (UNISURF occupancy) or 'density' (NeRF), got {mode!r}")
    if not isinstance(samples, RaySamples):
        raise TypeError(f"samples: expected a RaySamples, got {type(samples).__name__}")
    check_tensor("samples.offsets", samples.offsets, ("R + 1",), dtype=torch.int32)
    if samples.offsets.shape[0] < 1:
        raise ValueError("samples.offsets: expected shape (R + 1,) with at least one entry, got (0,)")
    check_tensor("samples.t", samples.t, ("S",), dtype=FLOAT_DTYPES)
    n = samples.n_samples
    check_tensor("samples.delta", samples.delta, (n,), dtype=FLOAT_DTYPES)
    check_tensor("values", values, ("S",), dtype=FLOAT_DTYPES)
    if values.shape[0] != n:
        raise ValueError(f"values: expected one value per sample, shape ({n},) for samples.n_samples = {n}, "
                         f"got {tuple(values.shape)}")
    check_tensor("colours", colours, ("S", "C"), dtype=values.dtype)
    if colours.shape[0] != n or colours.shape[1] < 1:
        raise ValueError(f"colours: expected shape (S, C) with S = samples.n_samples = {n} and C >= 1, got "
                         f"{tuple(colours.shape)}")
    if values.dtype == torch.float64 and runtime.ensure_init() == "vulkan":
        raise TypeError("values: float64 is not supported on the vulkan backend (SPIR-V devices such as Mesa's "
                        "lavapipe have no 64-bit floats); use float32, or the cpu/cuda backend for float64")


def _check_contents(offsets: torch.Tensor, n_samples: int, status: torch.Tensor | None) -> None:
    """Offsets that do not span the samples, and the forward kernel's NaN/Inf findings (status (R,) or None):
    one read on the host for all (each separate bool() would wait for a GPU)."""
    checks = [offsets[0] == 0, offsets[-1] == n_samples]
    if status is not None:
        checks += [(status & BAD_VALUE).any(), (status & BAD_COLOUR).any()]
    flags = torch.stack(checks).tolist()
    if not (flags[0] and flags[1]):
        raise ValueError(f"samples.offsets: expected offsets[0] = 0 and offsets[-1] = n_samples = {n_samples}, "
                         f"got {int(offsets[0])} and {int(offsets[-1])}")
    if status is not None and flags[2]:
        raise ValueError("values: contains NaN or Inf values")
    if status is not None and flags[3]:
        raise ValueError("colours: contains NaN or Inf values")


def composite(values: torch.Tensor, colours: torch.Tensor, samples: RaySamples, *, mode: str = "alpha") -> Composite:
    """Composite packed samples front to back along their rays, differentiably.

    Args:
        values: (S,) per-sample occupancy in [0, 1] (``mode="alpha"``, UNISURF; clamped) or density
            ``sigma >= 0`` (``mode="density"``, NeRF; clamped at 0, alpha ``1 - exp(-sigma delta)``).
        colours: (S, C) per-sample colours (or any features), C >= 1, same dtype as ``values``.
        samples: the :class:`RaySamples` the values belong to: ``offsets (R + 1,)`` group them per ray, ``t (S,)``
            gives the depths, ``delta (S,)`` the lengths of the density mode. ``t``/``delta`` carry no gradient.
        mode: ``"alpha"`` or ``"density"``.

    Returns:
        :class:`Composite` with colour (R, C), opacity (R,), depth (R,), weights (S,); gradients (from any of
        the four) reach ``values`` and ``colours``. A ray with no samples gets zeros.

    float32 or float64 on the cpu/cuda backends, float32 on Vulkan; all tensors on the kernel device.
    """
    _check_inputs(values, colours, samples, mode)
    dtype = values.dtype
    to_kernel("values", values)      # device checks with clear messages; the bridge detaches the inputs itself
    to_kernel("colours", colours)
    offsets = to_kernel("samples.offsets", samples.offsets)
    t = to_kernel("samples.t", samples.t, dtype)
    delta = to_kernel("samples.delta", samples.delta, dtype)
    colour, opacity, depth, weights = apply(CompositeOp(mode), values, colours, t, delta, offsets)
    return Composite(colour=colour, opacity=opacity, depth=depth, weights=weights)


def composite_background(result: Composite, background) -> torch.Tensor:
    """``result.colour + (1 - result.opacity) * background``, (R, C).

    background: a float, a (C,) tensor (or sequence) of one colour for every ray, or an (R, C) tensor of one
    per ray; a tensor that requires grad (a learnt background) receives gradients.
    """
    if not isinstance(result, Composite):
        raise TypeError(f"result: expected a Composite, got {type(result).__name__}")
    colour = result.colour
    n_rays, n_channels = colour.shape
    if isinstance(background, (int, float)) and not isinstance(background, bool):
        bg = torch.full((n_channels,), float(background), dtype=colour.dtype, device=colour.device)
    else:
        if not isinstance(background, torch.Tensor):
            try:
                background = torch.as_tensor(background, dtype=colour.dtype, device=colour.device)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"background: expected a float, (C,) or (R, C) values, got "
                                f"{type(background).__name__} ({e})".replace("\n", " ")) from None
        if not background.is_floating_point():
            raise TypeError(f"background: expected a floating-point tensor, got {background.dtype}")
        if tuple(background.shape) not in ((n_channels,), (n_rays, n_channels)):
            raise ValueError(f"background: expected a float, shape ({n_channels},) or ({n_rays}, {n_channels}) "
                             f"(C = {n_channels}, R = {n_rays}), got {tuple(background.shape)}")
        if background.device != colour.device:
            raise ValueError(f"background: tensor is on {background.device}, the composite on {colour.device}")
        bg = background.to(colour.dtype)
    return colour + (1.0 - result.opacity)[:, None] * bg
