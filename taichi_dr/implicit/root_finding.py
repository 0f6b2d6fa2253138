"""Root finding along rays, shared by the sphere tracer (SDFs) and the occupancy surface search (UNISURF).

Both look for the first place where a scalar field along a ray changes sign from positive ("outside") to
non-positive ("inside"): an SDF ``f``, or ``level - o(x)`` for an occupancy ``o`` (inside = high occupancy).

* :func:`first_crossing` (Taichi kernel ``_sample_scan``, one thread per ray): given the field sampled at
  increasing ``ts`` per ray, the first ``+ -> -`` change brackets the root in ``(t_lo, t_hi)``.
* :func:`secant_refine` (kernels ``_secant_propose`` / ``_secant_update``): shrinks the brackets by the
  secant rule with the Illinois modification (when one end is kept twice in a row its value is halved, which
  turns regula falsi's one-sided, linear convergence on convex fields into superlinear convergence). UNISURF
  uses plain regula falsi; the Illinois rule never moves the estimate out of the bracket either.

Both run without autograd (the root is found, not differentiated; :mod:`taichi_dr.implicit.sphere_tracing`
and the UNISURF pipeline make the surface point differentiable afterwards). Float32 or float64 (the kernels
compile per dtype; float32 only on Vulkan). Every kernel writes each of its output arrays in full (on
Vulkan, Taichi does not copy a tensor that a kernel only writes to the device, yet copies the whole device
buffer back).
"""

from collections.abc import Callable

import taichi as ti
import torch

from taichi_dr.core import runtime
from taichi_dr.core.bridge import check_finite, check_tensor, to_kernel

__all__ = ["first_crossing", "secant_refine"]

FieldFn = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# Kernels. Arrays are torch tensors passed as ndarrays; their dtype (f32 or f64) picks the instantiation.


@runtime.locked
@ti.kernel
def _sample_scan(sdf: ti.types.ndarray(), ts: ti.types.ndarray(), found: ti.types.ndarray(),
                 t_lo: ti.types.ndarray(), f_lo: ti.types.ndarray(), t_hi: ti.types.ndarray(),
                 f_hi: ti.types.ndarray()):
    """Per ray k (rows of ``sdf``/``ts (R, N)``, N >= 1): the first sign change (+ to -) brackets the root in
    ``(t_lo, t_hi)`` (``found = 1``); else ``found = 0`` and ``t_hi`` is the minimum-value sample, ``t_lo``
    the sample before it (the first sample when that is the minimum)."""
    for k in range(sdf.shape[0]):
        n = sdf.shape[1]
        hit = 0
        best = 0
        for s in range(1, n):
            if hit == 0:
                if sdf[k, s - 1] > 0 and sdf[k, s] <= 0:
                    hit = 1
                    best = s
                elif sdf[k, s] < sdf[k, best]:
                    best = s
        found[k] = hit
        lo = ti.max(best - 1, 0)
        t_lo[k] = ts[k, lo]
        f_lo[k] = sdf[k, lo]
        t_hi[k] = ts[k, best]
        f_hi[k] = sdf[k, best]


@runtime.locked
@ti.kernel
def _secant_propose(t_lo: ti.types.ndarray(), f_lo: ti.types.ndarray(), t_hi: ti.types.ndarray(),
                    f_hi: ti.types.ndarray(), t_mid: ti.types.ndarray()):
    for k in range(t_lo.shape[0]):
        denom = f_hi[k] - f_lo[k]
        w = denom * 0.0 + 0.5   # (typed like the arrays: f32 or f64)
        if ti.abs(denom) > 1e-12:
            w = ti.min(ti.max(-f_lo[k] / denom, 0.0), 1.0)
        t_mid[k] = t_lo[k] + w * (t_hi[k] - t_lo[k])


@runtime.locked
@ti.kernel
def _secant_update(t_mid: ti.types.ndarray(), f_mid: ti.types.ndarray(), t_lo: ti.types.ndarray(),
                   f_lo: ti.types.ndarray(), t_hi: ti.types.ndarray(), f_hi: ti.types.ndarray(),
                   side: ti.types.ndarray()):
    """Shrink the brackets (Illinois rule: when one end is kept twice in a row its value is halved, so
    plain regula falsi's one-sided, linear convergence on convex fields becomes superlinear)."""
    for k in range(t_mid.shape[0]):
        lo_t, lo_f, hi_t, hi_f, last = t_lo[k], f_lo[k], t_hi[k], f_hi[k], side[k]
        if f_mid[k] > 0:
            lo_t, lo_f = t_mid[k], f_mid[k]
            if last == 1:
                hi_f *= 0.5
            last = 1
        else:
            hi_t, hi_f = t_mid[k], f_mid[k]
            if last == -1:
                lo_f *= 0.5
            last = -1
        t_lo[k], f_lo[k], t_hi[k], f_hi[k], side[k] = lo_t, lo_f, hi_t, hi_f, last


# ---------------------------------------------------------------------------------------------------------


def _evaluate(fn: FieldFn, points: torch.Tensor, chunk: int, name: str = "sdf_fn") -> torch.Tensor:
    """Values (M,) of ``fn`` at points (M, 3) in chunks, without autograd, in the points' dtype.

    ``fn`` may return (M,) or (M, C) (its first column is used); ``name`` names it in the error message.
    """
    out = []
    with torch.no_grad(), runtime.torch_threads_for(points.shape[0]):
        for start in range(0, points.shape[0], chunk):
            f = fn(points[start:start + chunk])
            if f.dim() == 2 and f.shape[1] >= 1:
                f = f[:, 0]
            if f.dim() != 1 or f.shape[0] != min(chunk, points.shape[0] - start):
                raise ValueError(f"{name}: expected values shaped (M,) or (M, C) for points (M, 3), got "
                                 f"{tuple(f.shape)} for M={min(chunk, points.shape[0] - start)}")
            out.append(f.detach().to(points.dtype))
    if not out:
        return points.new_zeros(0)
    return torch.cat(out).contiguous()


def _refuse_float64_on_vulkan(name: str, dtype: torch.dtype) -> None:
    if dtype == torch.float64 and runtime.ensure_init() == "vulkan":
        raise TypeError(f"{name}: float64 is not supported on the vulkan backend (SPIR-V devices such as "
                        "Mesa's lavapipe have no 64-bit floats); use float32, or the cpu/cuda backend for float64")


def first_crossing(values: torch.Tensor, ts: torch.Tensor):
    """The first ``+ -> -`` sign change of a field sampled along each ray.

    values: (R, N) field values (positive outside, <= 0 inside), N >= 1; ts: (R, N) the ray parameters of the
    samples, increasing per row; float32 or float64 (same dtype), on the kernel device.

    Returns ``found (R,) bool`` and ``t_lo, f_lo, t_hi, f_hi (R,)``: for found rays the first pair of
    consecutive samples with ``f_lo > 0 >= f_hi`` (a bracket for :func:`secant_refine`); for the others
    ``t_hi, f_hi`` is the sample with the smallest value (the first one on ties) and ``t_lo, f_lo`` the
    sample before it (itself when it is the first). A ray whose first sample is already inside may still
    report a later ``+ -> -`` change (the caller decides whether such rays count).
    """
    check_tensor("values", values, ("R", "N"), dtype=(torch.float32, torch.float64))
    check_tensor("ts", ts, tuple(values.shape), dtype=values.dtype)
    if values.shape[1] < 1:
        raise ValueError("values: expected at least one sample per ray (N >= 1), got N = 0")
    _refuse_float64_on_vulkan("values", values.dtype)
    check_finite({"values": values, "ts": ts})
    v = to_kernel("values", values)
    t = to_kernel("ts", ts)
    r = v.shape[0]
    found = torch.empty(r, dtype=torch.int32, device=v.device)
    t_lo, f_lo, t_hi, f_hi = (torch.empty(r, dtype=v.dtype, device=v.device) for _ in range(4))
    if r > 0:
        _sample_scan(v, t, found, t_lo, f_lo, t_hi, f_hi)
    return found.bool(), t_lo, f_lo, t_hi, f_hi


@torch.no_grad()
def secant_refine(fn: FieldFn, origins: torch.Tensor, dirs: torch.Tensor, t_lo: torch.Tensor, f_lo: torch.Tensor,
                  t_hi: torch.Tensor, f_hi: torch.Tensor, n_steps: int, chunk: int = 65536):
    """Refine brackets ``f(t_lo) > 0 >= f(t_hi)`` of rays ``origins + t dirs`` by ``n_steps`` secant steps.

    fn: torch callable ``points (M, 3) -> (M,)`` (or ``(M, C)``: the first column), positive outside,
        evaluated without autograd, ``chunk`` points per call.
    origins, dirs: (M, 3); t_lo, f_lo, t_hi, f_hi: (M,) the brackets and the field at their ends, as
        :func:`first_crossing` gives them; all float32 or float64 (one dtype) on the kernel device. The
        inputs are not modified.

    Returns ``t (M,)``, the last secant estimate (``t_hi`` when ``n_steps == 0``), and the number of points
    evaluated (``n_steps * M``).
    """
    check_tensor("origins", origins, ("M", 3), dtype=(torch.float32, torch.float64))
    m = origins.shape[0]
    check_tensor("dirs", dirs, (m, 3), dtype=origins.dtype)
    for name, x in (("t_lo", t_lo), ("f_lo", f_lo), ("t_hi", t_hi), ("f_hi", f_hi)):
        check_tensor(name, x, (m,), dtype=origins.dtype)
    if int(n_steps) != n_steps or n_steps < 0:
        raise ValueError(f"n_steps: expected a non-negative integer, got {n_steps!r}")
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk: expected a positive integer, got {chunk!r}")
    _refuse_float64_on_vulkan("origins", origins.dtype)
    o, d = to_kernel("origins", origins), to_kernel("dirs", dirs)
    # The kernels update the brackets in place: work on copies.
    lo_t, lo_f, hi_t, hi_f = (to_kernel(name, x).clone() for name, x in
                              (("t_lo", t_lo), ("f_lo", f_lo), ("t_hi", t_hi), ("f_hi", f_hi)))
    if m == 0 or n_steps == 0:
        return hi_t, 0
    t_mid = torch.empty_like(lo_t)
    side = torch.zeros(m, dtype=torch.int32, device=lo_t.device)
    evaluations = 0
    for _ in range(int(n_steps)):
        _secant_propose(lo_t, lo_f, hi_t, hi_f, t_mid)
        f_mid = _evaluate(fn, o + t_mid[:, None] * d, int(chunk), "fn")
        evaluations += m
        _secant_update(t_mid, f_mid, lo_t, lo_f, hi_t, hi_f, side)
    return t_mid, evaluations
