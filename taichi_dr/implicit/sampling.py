"""Samples along rays for volume rendering, packed per ray (:class:`taichi_dr.implicit.samples.RaySamples`).

* :func:`stratified_samples` / :func:`segment_samples`: ``n`` samples on a segment ``[t_lo, t_hi]`` of each
  ray, at the linspace points, or (with a generator) one uniform sample per stratum as NeRF's "perturb"
  does (strata bounded by the midpoints between the linspace points, the outer ones by the segment's ends).
* :func:`unisurf_samples`: UNISURF's (Oechsle et al. 2021) sampling around the surface. Rays on which the
  surface search (:func:`taichi_dr.implicit.occupancy.find_surface`) found a surface at ``t_s`` sample
  ``n_interval`` points stratified in ``[t_s - Δk, t_s + Δk]``, ``Δk = max(start · exp(-decay · k), end)``
  shrinking with the iteration ``k``; from iteration ``free_after`` on they add ``n_free`` samples in the
  free space ``[t_near, t_s - Δk]`` in front of it. Rays without a surface sample their whole segment.
  Differences from UNISURF's code: the interval is clipped to the ray's ``[t_near, t_far]`` (UNISURF does
  not clip it); free-space samples are decided per ray (a ray gets them when ``t_s - Δk > t_near``), where
  UNISURF adds them to every ray only when all hit rays of the batch have room in front, so our sample
  count varies per ray (packed samples make that free).
* :func:`importance_samples`: NeRF's (Mildenhall et al. 2020) hierarchical sampling: the coarse samples'
  compositing weights define a piecewise-constant pdf over bins centred on the samples, between the midpoints
  of consecutive samples as NeRF's (each weight padded by 1e-5 as NeRF does, so a ray with all-zero weights
  samples uniformly); the fine samples are drawn by inverse CDF. Unlike NeRF, which drops the two end
  samples' weights, the first bin starts at the first sample and the last ends halfway to ``t_far``. Without a generator
  the CDF is inverted at the midpoints ``u = (i + 1/2) / n`` of ``n`` equal strata of ``[0, 1]``.
* :func:`merge_samples`: the per-ray sorted union of two sample sets (NeRF renders the fine network on coarse
  and fine samples together).

Generation, inverse CDF and merging are Taichi kernels, one thread per ray, writing at per-ray offsets
computed by a torch cumsum; forward only (sample positions carry no gradient). Random numbers come only from
the ``torch.Generator`` passed in (drawn on its device, then moved to the kernel device), and how many are
drawn depends only on the number of samples produced, so the same seed gives the same samples. Float32 or
float64 (float32 only on Vulkan).
"""

import math
import operator
from dataclasses import dataclass

import taichi as ti
import torch

from taichi_dr.core import runtime
from taichi_dr.core.bridge import check_finite, check_tensor, to_kernel
from taichi_dr.implicit.samples import RaySamples, offsets_from_counts

__all__ = ["IntervalSettings", "importance_samples", "interval_width", "merge_samples", "segment_samples",
           "stratified_samples", "unisurf_samples"]

_FLOATS = (torch.float32, torch.float64)
_INT32_MAX = 2 ** 31 - 1
# NeRF's padding of the coarse weights (sample_pdf: weights + 1e-5).
WEIGHT_PADDING = 1e-5
_PADDING_INVERSE = round(1 / WEIGHT_PADDING)    # kernels divide by it: 1e-5 in the arrays' own precision


# ---------------------------------------------------------------------------------------------------------
# Kernels: one thread per ray; every output array (t, delta, ray_index) is written in full, since the
# per-ray counts sum to its length (on Vulkan, elements a kernel leaves alone would come back as stale
# device memory).


@runtime.locked
@ti.kernel
def _segment_kernel(t_lo: ti.types.ndarray(), t_hi: ti.types.ndarray(), counts: ti.types.ndarray(),
                    offsets: ti.types.ndarray(), t_far: ti.types.ndarray(), jitter: ti.types.ndarray(),
                    use_jitter: ti.i32, t: ti.types.ndarray(), delta: ti.types.ndarray(),
                    ray_index: ti.types.ndarray()):
    """Ray r's segments ``[t_lo[r, k], t_hi[r, k]]`` get ``counts[r, k]`` samples each (0 where the segment
    is empty), written from ``offsets[r]`` on; ``jitter`` holds one uniform number per sample."""
    for r in range(t_lo.shape[0]):
        j = offsets[r]
        for k in range(t_lo.shape[1]):
            n = counts[r, k]
            a = t_lo[r, k]
            b = t_hi[r, k]
            width = b - a
            for i in range(n):
                value = a + width * 0.5                     # n == 1 without jitter: the midpoint
                if n > 1:
                    if use_jitter == 1:
                        # stratum i: between the midpoints of linspace points i-1, i and i, i+1
                        lo = a
                        hi = b
                        if i > 0:
                            lo = a + width * (2 * i - 1) / (2 * (n - 1))
                        if i < n - 1:
                            hi = a + width * (2 * i + 1) / (2 * (n - 1))
                        value = lo + jitter[j] * (hi - lo)
                    else:
                        value = a + width * i / (n - 1)
                        if i == n - 1:
                            value = b
                elif use_jitter == 1:
                    value = a + jitter[j] * width
                t[j] = ti.min(ti.max(value, a), b)           # rounding never leaves the segment
                ray_index[j] = r
                j += 1
        end = offsets[r + 1]
        for s in range(offsets[r], end):
            nxt = t_far[r]
            if s + 1 < end:
                nxt = t[s + 1]
            delta[s] = ti.max(nxt - t[s], 0.0)


@runtime.locked
@ti.kernel
def _inverse_cdf_kernel(t_c: ti.types.ndarray(), delta_c: ti.types.ndarray(), weights: ti.types.ndarray(),
                        offsets_c: ti.types.ndarray(), u: ti.types.ndarray(), offsets: ti.types.ndarray(),
                        t_far: ti.types.ndarray(), t: ti.types.ndarray(), delta: ti.types.ndarray(),
                        ray_index: ti.types.ndarray()):
    """Ray r's fine samples ``offsets[r]:offsets[r+1]`` at the sorted ``u`` quantiles of the piecewise-constant
    pdf with mass ``weights_i + 1e-5`` on each coarse bin ``[t_i - delta_{i-1} / 2, t_i + delta_i / 2]`` (the
    first from ``t_0``)."""
    for r in range(t_far.shape[0]):
        c0 = offsets_c[r]
        c1 = offsets_c[r + 1]
        f0 = offsets[r]
        f1 = offsets[r + 1]
        if f1 > f0 and c1 > c0:
            # the padding in the arrays' precision (a float literal in a kernel is f32 even next to f64 values)
            pad = (weights[c0] * 0.0 + 1.0) / _PADDING_INVERSE
            total = weights[c0] * 0.0
            for i in range(c0, c1):
                total += weights[i] + pad
            b = c0
            before = total * 0.0                            # mass of the bins before bin b
            prev = t_c[c0]
            for j in range(f0, f1):
                target = u[j] * total
                # u is sorted per ray, so the bin only moves forward (one pass over the bins per ray)
                while b < c1 - 1 and before + weights[b] + pad < target:
                    before += weights[b] + pad
                    b += 1
                frac = ti.min(ti.max((target - before) / (weights[b] + pad), 0.0), 1.0)
                # NeRF's bins: between the midpoints of consecutive samples (the first from the first sample)
                lo = t_c[b]
                if b > c0:
                    lo = t_c[b] - 0.5 * delta_c[b - 1]
                hi = t_c[b] + 0.5 * delta_c[b]
                value = ti.min(ti.max(lo + frac * (hi - lo), prev), t_far[r])
                t[j] = value
                ray_index[j] = r
                prev = value
            for s in range(f0, f1):
                nxt = t_far[r]
                if s + 1 < f1:
                    nxt = t[s + 1]
                delta[s] = ti.max(nxt - t[s], 0.0)


@runtime.locked
@ti.kernel
def _merge_kernel(t_a: ti.types.ndarray(), offsets_a: ti.types.ndarray(), t_b: ti.types.ndarray(),
                  offsets_b: ti.types.ndarray(), offsets: ti.types.ndarray(), t_far: ti.types.ndarray(),
                  t: ti.types.ndarray(), delta: ti.types.ndarray(), ray_index: ti.types.ndarray()):
    """Per ray, merge its two sorted runs of ``t_a`` and ``t_b`` (``a`` first on ties)."""
    for r in range(t_far.shape[0]):
        i = offsets_a[r]
        i_end = offsets_a[r + 1]
        k = offsets_b[r]
        k_end = offsets_b[r + 1]
        f0 = offsets[r]
        f1 = offsets[r + 1]
        for j in range(f0, f1):
            take_a = 0
            if k >= k_end:
                take_a = 1
            elif i < i_end:
                if t_a[i] <= t_b[k]:
                    take_a = 1
            if take_a == 1:
                t[j] = t_a[i]
                i += 1
            else:
                t[j] = t_b[k]
                k += 1
            ray_index[j] = r
        for s in range(f0, f1):
            nxt = t_far[r]
            if s + 1 < f1:
                nxt = t[s + 1]
            delta[s] = ti.max(nxt - t[s], 0.0)


# ---------------------------------------------------------------------------------------------------------
# Argument checks


def _check_float(name: str, x, shape, dtype=None) -> torch.Tensor:
    check_tensor(name, x, shape, dtype=dtype or _FLOATS)
    if x.dtype == torch.float64 and runtime.ensure_init() == "vulkan":
        raise TypeError(f"{name}: float64 is not supported on the vulkan backend (SPIR-V devices such as "
                        "Mesa's lavapipe have no 64-bit floats); use float32, or the cpu/cuda backend for float64")
    return x


def _check_counts(name: str, counts, shape) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of integer sample counts, got {type(counts).__name__}")
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype (int32 or int64), got {counts.dtype}")
    check_tensor(name, counts, shape)
    if counts.numel() and int(counts.min()) < 0:
        raise ValueError(f"{name}: expected non-negative sample counts, got {int(counts.min())}")
    return counts


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")


def _check_count(name: str, n) -> int:
    try:
        value = operator.index(n)
    except TypeError:
        raise TypeError(f"{name}: expected a non-negative integer, got {n!r}") from None
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value}")
    return value


def _uniform(n: int, dtype: torch.dtype, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` uniform numbers in [0, 1) from ``generator`` (drawn on its device), moved to ``device``."""
    return torch.rand(n, generator=generator, dtype=dtype, device=generator.device).to(device)


def _total(counts: torch.Tensor) -> int:
    total = int(counts.sum()) if counts.numel() else 0
    if total > _INT32_MAX:
        raise ValueError(f"counts: {total} samples in all exceed the int32 offsets' range ({_INT32_MAX})")
    return total


def _empty_samples(n_rays: int, dtype: torch.dtype, device: torch.device) -> RaySamples:
    return RaySamples(t=torch.zeros(0, dtype=dtype, device=device), delta=torch.zeros(0, dtype=dtype, device=device),
                      ray_index=torch.zeros(0, dtype=torch.int32, device=device),
                      offsets=torch.zeros(n_rays + 1, dtype=torch.int32, device=device))


# ---------------------------------------------------------------------------------------------------------
# Stratified samples on segments


def _segments(t_lo: torch.Tensor, t_hi: torch.Tensor, counts: torch.Tensor, t_far: torch.Tensor,
              generator: torch.Generator | None) -> RaySamples:
    """segment_samples on checked kernel-device tensors (t_lo, t_hi (R, K), counts (R, K), t_far (R,))."""
    dev, dtype = t_lo.device, t_lo.dtype
    n_rays = t_lo.shape[0]
    counts = torch.where(t_hi > t_lo, counts.to(dev, torch.int64), 0)
    per_ray = counts.sum(dim=1)
    total = _total(per_ray)                              # (checked in int64 before the kernel's int32)
    counts = counts.to(torch.int32).contiguous()
    if total == 0:
        return _empty_samples(n_rays, dtype, dev)
    offsets = offsets_from_counts(per_ray)
    jitter = _uniform(total, dtype, generator, dev) if generator is not None else torch.zeros(1, dtype=dtype,
                                                                                             device=dev)
    t = torch.empty(total, dtype=dtype, device=dev)
    delta = torch.empty(total, dtype=dtype, device=dev)
    ray_index = torch.empty(total, dtype=torch.int32, device=dev)
    _segment_kernel(t_lo, t_hi, counts, offsets, t_far, jitter, int(generator is not None), t, delta, ray_index)
    return RaySamples(t=t, delta=delta, ray_index=ray_index, offsets=offsets)


def segment_samples(t_lo: torch.Tensor, t_hi: torch.Tensor, counts: torch.Tensor, t_far: torch.Tensor,
                    generator: torch.Generator | None = None) -> RaySamples:
    """Stratified samples on ``K`` consecutive segments of each ray, packed ray after ray.

    t_lo, t_hi: (R, K) segment bounds, float32 or float64 on the kernel device; segment ``k + 1`` of a ray
        starts where segment ``k`` ends or later (checked among the segments that get samples).
    counts: (R, K) integer samples per segment (non-negative); a segment with ``t_hi <= t_lo`` gets none.
    t_far: (R,) the rays' far bounds (>= every sampled segment's ``t_hi``): the last sample's ``delta``
        reaches it.
    generator: None: samples at ``linspace(t_lo, t_hi, n)`` (the midpoint when n == 1); a torch.Generator:
        one uniform sample per stratum, as :func:`stratified_samples`.

    Returns :class:`RaySamples` with ``S = counts.sum()`` samples (over non-empty segments), increasing per ray,
    each inside its segment.
    """
    _check_float("t_lo", t_lo, ("R", "K"))
    _check_float("t_hi", t_hi, tuple(t_lo.shape), dtype=t_lo.dtype)
    _check_counts("counts", counts, tuple(t_lo.shape))
    _check_float("t_far", t_far, (t_lo.shape[0],), dtype=t_lo.dtype)
    _check_generator(generator)
    check_finite({"t_lo": t_lo, "t_hi": t_hi, "t_far": t_far})
    lo, hi, far = to_kernel("t_lo", t_lo), to_kernel("t_hi", t_hi), to_kernel("t_far", t_far)
    counts = counts.to(lo.device)
    sampled = (counts > 0) & (hi > lo)
    if bool(sampled.any()):
        # the end of the last sampled segment before segment k (-inf if none)
        ends = torch.where(sampled, hi, torch.full_like(hi, -math.inf)).cummax(dim=1).values
        before = torch.cat([torch.full_like(hi[:, :1], -math.inf), ends[:, :-1]], dim=1)
        if bool((sampled & (lo < before)).any()):
            raise ValueError("t_lo: segment k + 1 of a ray must start at or after the end of its segment k "
                             "(among the segments that get samples)")
        if bool((sampled & (hi > far[:, None])).any()):
            raise ValueError("t_far: expected t_far >= t_hi of every segment that gets samples")
    return _segments(lo, hi, counts, far, generator)


def stratified_samples(t_near: torch.Tensor, t_far: torch.Tensor, counts: torch.Tensor,
                       generator: torch.Generator | None = None) -> RaySamples:
    """``counts[r]`` samples on ``[t_near[r], t_far[r]]`` of each ray, packed ray after ray.

    t_near, t_far: (R,) float32 or float64 on the kernel device; counts: (R,) integer, non-negative.
    Without a generator the samples sit at ``linspace(t_near, t_far, n)`` (the midpoint when n == 1); with
    one, sample i is uniform in its stratum, bounded by the midpoints between linspace points i - 1, i and
    i, i + 1 (``t_near`` / ``t_far`` for the outer ones): NeRF's "perturb". Rays with ``t_far <= t_near`` or
    a count of 0 get no samples; no sample ever lies outside ``[t_near, t_far]``.

    Returns :class:`RaySamples` (t, delta (S,); ray_index (S,) int32; offsets (R + 1,) int32), increasing
    per ray, the last sample's ``delta`` reaching ``t_far``.
    """
    _check_float("t_near", t_near, ("R",))
    _check_float("t_far", t_far, (t_near.shape[0],), dtype=t_near.dtype)
    _check_counts("counts", counts, (t_near.shape[0],))
    _check_generator(generator)
    check_finite({"t_near": t_near, "t_far": t_far})
    near, far = to_kernel("t_near", t_near), to_kernel("t_far", t_far)
    return _segments(near[:, None].contiguous(), far[:, None].contiguous(), counts.to(near.device)[:, None], far,
                     generator)


# ---------------------------------------------------------------------------------------------------------
# UNISURF


@dataclass(frozen=True)
class IntervalSettings:
    """UNISURF's sampling around the surface (defaults: UNISURF's code, in its normalised units, where the
    object lies inside the unit sphere; the paper quotes half the interval widths).

    n_interval: samples in ``[t_s - Δk, t_s + Δk]`` for rays with a surface (and, plus the free-space ones,
        over the whole segment for rays without one).
    n_free: free-space samples in ``[t_near, t_s - Δk]`` in front of the interval, from ``free_after`` on.
    free_after: iteration from which free-space samples are added.
    start, end, decay: the interval half-width ``Δk = max(start · exp(-decay · k), end)`` at iteration k.
    """

    n_interval: int = 64
    n_free: int = 32
    free_after: int = 5000
    start: float = 2.0
    end: float = 0.1
    decay: float = 1.5e-5

    def __post_init__(self):
        for name in ("n_interval", "n_free", "free_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"IntervalSettings: {name} must be an int, got {value!r}")
        for name in ("start", "end", "decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"IntervalSettings: {name} must be a finite number, got {value!r}")
        checks = [
            (self.n_interval >= 1, f"n_interval must be >= 1, got {self.n_interval}"),
            (self.n_free >= 0, f"n_free must be >= 0, got {self.n_free}"),
            (self.free_after >= 0, f"free_after must be >= 0, got {self.free_after}"),
            (self.end > 0, f"end must be > 0, got {self.end}"),
            (self.start >= self.end, f"start must be >= end ({self.end}), got {self.start}"),
            (self.decay >= 0, f"decay must be >= 0, got {self.decay}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"IntervalSettings: {msg}")


def interval_width(iteration: int, settings: IntervalSettings = IntervalSettings()) -> float:
    """UNISURF's interval half-width at ``iteration``: ``max(start · exp(-decay · iteration), end)``."""
    k = _check_count("iteration", iteration)
    if not isinstance(settings, IntervalSettings):
        raise TypeError(f"settings: expected IntervalSettings, got {type(settings).__name__}")
    return max(settings.start * math.exp(-settings.decay * k), settings.end)


def unisurf_samples(t_near: torch.Tensor, t_far: torch.Tensor, t_surface: torch.Tensor, hit: torch.Tensor,
                    iteration: int, settings: IntervalSettings = IntervalSettings(),
                    generator: torch.Generator | None = None) -> RaySamples:
    """UNISURF's samples for one training iteration.

    t_near, t_far: (R,) the rays' segment in the bounding sphere; t_surface: (R,) the surface distance where
        ``hit`` (R, bool) is set (ignored elsewhere), e.g. :class:`taichi_dr.implicit.occupancy.SurfaceHits`;
        float32 or float64 on the kernel device.
    iteration: the training iteration k (sets ``Δk = interval_width(k)`` and whether free-space samples are
        added: ``k >= settings.free_after``).

    Hit rays: ``n_interval`` samples on ``[max(t_s - Δk, t_near), min(t_s + Δk, t_far)]``, plus (from
    ``free_after`` on, and only when ``t_s - Δk > t_near``) ``n_free`` samples on ``[t_near, t_s - Δk]``
    (per ray, where UNISURF requires room in front on every hit ray of the batch). Rays without a surface:
    ``n_interval`` (+ ``n_free`` from ``free_after`` on) samples on ``[t_near, t_far]``. Rays with
    ``t_far <= t_near`` get none, and so does an interval that lies outside ``[t_near, t_far]``. Stratified
    (jittered with ``generator``) as :func:`stratified_samples`.
    """
    _check_float("t_near", t_near, ("R",))
    n_rays = t_near.shape[0]
    _check_float("t_far", t_far, (n_rays,), dtype=t_near.dtype)
    _check_float("t_surface", t_surface, (n_rays,), dtype=t_near.dtype)
    check_tensor("hit", hit, (n_rays,), dtype=torch.bool)
    _check_generator(generator)
    if not isinstance(settings, IntervalSettings):
        raise TypeError(f"settings: expected IntervalSettings, got {type(settings).__name__}")
    iteration = _check_count("iteration", iteration)
    dk = interval_width(iteration, settings)
    near, far = to_kernel("t_near", t_near), to_kernel("t_far", t_far)
    hit = to_kernel("hit", hit)
    # t_surface only matters (and must be finite) where hit is set
    surface = torch.where(hit, to_kernel("t_surface", t_surface), near)
    check_finite({"t_near": near, "t_far": far, "t_surface": surface})
    free = settings.n_free if iteration >= settings.free_after else 0

    front = (surface - dk).minimum(far)                  # the interval's front end (kept <= t_far)
    has_front = hit & (front > near) & (free > 0)
    # segment 0: free space in front of the interval (hit rays) or the whole segment (the others)
    lo0 = near
    hi0 = torch.where(hit, torch.where(has_front, front, near), far)
    n0 = torch.where(hit, torch.where(has_front, free, 0), settings.n_interval + free)
    # segment 1: the interval around the surface (hit rays only)
    lo1 = torch.where(hit, front.maximum(near), far)
    hi1 = torch.where(hit, (surface + dk).minimum(far), far)
    n1 = torch.where(hit, settings.n_interval, 0)
    lo = torch.stack([lo0, lo1], dim=1).contiguous()
    hi = torch.stack([hi0, hi1], dim=1).contiguous()
    counts = torch.stack([n0, n1], dim=1).to(torch.int32)
    counts = torch.where((far > near)[:, None], counts, 0)
    return _segments(lo, hi, counts, far, generator)


# ---------------------------------------------------------------------------------------------------------
# NeRF hierarchical sampling


def _check_samples(name: str, s) -> None:
    if not isinstance(s, RaySamples):
        raise TypeError(f"{name}: expected RaySamples, got {type(s).__name__}")
    _check_float(f"{name}.t", s.t, ("S",))
    _check_float(f"{name}.delta", s.delta, (s.t.shape[0],), dtype=s.t.dtype)
    check_tensor(f"{name}.ray_index", s.ray_index, (s.t.shape[0],), dtype=torch.int32)
    check_tensor(f"{name}.offsets", s.offsets, ("R+1",), dtype=torch.int32)
    if s.offsets.shape[0] < 1:
        raise ValueError(f"{name}.offsets: expected shape (R + 1,) with R >= 0, got (0,)")
    if int(s.offsets[-1]) != s.t.shape[0]:
        raise ValueError(f"{name}.offsets: the last offset ({int(s.offsets[-1])}) must equal the number of "
                         f"samples ({s.t.shape[0]})")


def importance_samples(coarse: RaySamples, weights: torch.Tensor, n: int, t_far: torch.Tensor,
                       generator: torch.Generator | None = None) -> RaySamples:
    """NeRF's fine samples: ``n`` per ray by inverse CDF of the coarse compositing weights.

    coarse: :class:`RaySamples` of R rays (S coarse samples); weights: (S,) non-negative, e.g.
    ``Composite.weights`` (detached here); t_far: (R,) the rays' far bounds (>= their last coarse sample).
    Per ray the pdf is piecewise constant over bins centred on the coarse samples, as NeRF's: bin i runs from the
    midpoint with the previous sample (the first bin from the first sample) to the midpoint with the next (the
    last bin to halfway to ``t_far``), ``[t_i - delta_{i-1} / 2, t_i + delta_i / 2]``, with mass
    ``weights_i + 1e-5``. (A sample's compositing weight is earned around it: bins ``[t_i, t_i + delta_i]``
    would put every fine sample behind the coarse sample that first sees a surface, never in front of it.)
    Without a generator the CDF is inverted at ``u = (i + 1/2) / n``; with one at ``n`` sorted uniform numbers
    per ray. Rays without coarse samples get none; the others get ``n``, increasing, inside
    ``[t_first, t_far]``.
    """
    _check_samples("coarse", coarse)
    n = _check_count("n", n)
    dtype = coarse.t.dtype
    check_tensor("weights", weights, (coarse.n_samples,), dtype=dtype)
    _check_float("t_far", t_far, (coarse.n_rays,), dtype=dtype)
    _check_generator(generator)
    t_c, delta_c = to_kernel("coarse.t", coarse.t), to_kernel("coarse.delta", coarse.delta)
    w, far = to_kernel("weights", weights), to_kernel("t_far", t_far)
    offsets_c = to_kernel("coarse.offsets", coarse.offsets)
    check_finite({"weights": w, "t_far": far, "coarse.t": t_c, "coarse.delta": delta_c})
    if w.numel() and float(w.min()) < 0:
        raise ValueError(f"weights: expected non-negative weights, got {float(w.min())}")
    counts_c = offsets_c[1:] - offsets_c[:-1]
    with_samples = counts_c > 0
    if bool(with_samples.any()):
        last = t_c[(offsets_c[1:] - 1).clamp_min(0).long()]
        if bool((with_samples & (far < last)).any()):
            raise ValueError("t_far: expected t_far >= the last coarse sample of every ray")
    dev = t_c.device
    counts = torch.where(with_samples, n, 0).to(torch.int64)
    total = _total(counts)
    if total == 0:
        return _empty_samples(coarse.n_rays, dtype, dev)
    offsets = offsets_from_counts(counts)
    n_with = total // n
    if generator is None:
        u = ((torch.arange(n, dtype=dtype, device=dev) + 0.5) / n).repeat(n_with)
    else:
        u = _uniform(total, dtype, generator, dev).reshape(n_with, n).sort(dim=1).values.reshape(-1)
    u = u.contiguous()
    t = torch.empty(total, dtype=dtype, device=dev)
    delta = torch.empty(total, dtype=dtype, device=dev)
    ray_index = torch.empty(total, dtype=torch.int32, device=dev)
    _inverse_cdf_kernel(t_c, delta_c, w, offsets_c, u, offsets, far, t, delta, ray_index)
    return RaySamples(t=t, delta=delta, ray_index=ray_index, offsets=offsets)


def merge_samples(a: RaySamples, b: RaySamples, t_far: torch.Tensor) -> RaySamples:
    """The per-ray sorted union of ``a`` and ``b`` (both of the same R rays, each increasing per ray).

    t_far: (R,) the rays' far bounds: the ``delta`` of each ray's last sample reaches it (the others: the gap
    to the next sample). Counts add up: ray r gets ``a.counts[r] + b.counts[r]`` samples (on ties, ``a``'s
    first).
    """
    _check_samples("a", a)
    _check_samples("b", b)
    if b.n_rays != a.n_rays:
        raise ValueError(f"b: expected samples of the same {a.n_rays} rays as a, got {b.n_rays} rays")
    dtype = a.t.dtype
    if b.t.dtype != dtype:
        raise TypeError(f"b.t: expected dtype {dtype} like a.t, got {b.t.dtype}")
    _check_float("t_far", t_far, (a.n_rays,), dtype=dtype)
    t_a, t_b, far = to_kernel("a.t", a.t), to_kernel("b.t", b.t), to_kernel("t_far", t_far)
    offsets_a, offsets_b = to_kernel("a.offsets", a.offsets), to_kernel("b.offsets", b.offsets)
    check_finite({"a.t": t_a, "b.t": t_b, "t_far": far})
    dev = t_a.device
    counts = (offsets_a[1:] - offsets_a[:-1]).to(torch.int64) + (offsets_b[1:] - offsets_b[:-1]).to(torch.int64)
    total = _total(counts)
    if total == 0:
        return _empty_samples(a.n_rays, dtype, dev)
    offsets = offsets_from_counts(counts)
    # a kernel cannot take an empty array: stand in a one-element one (never read: its ray ranges are empty)
    if t_a.numel() == 0:
        t_a = torch.zeros(1, dtype=dtype, device=dev)
    if t_b.numel() == 0:
        t_b = torch.zeros(1, dtype=dtype, device=dev)
    t = torch.empty(total, dtype=dtype, device=dev)
    delta = torch.empty(total, dtype=dtype, device=dev)
    ray_index = torch.empty(total, dtype=torch.int32, device=dev)
    _merge_kernel(t_a, offsets_a, t_b, offsets_b, offsets, far, t, delta, ray_index)
    return RaySamples(t=t, delta=delta, ray_index=ray_index, offsets=offsets)
