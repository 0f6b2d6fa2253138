"""Surface search on an occupancy field (UNISURF, Oechsle et al. 2021), forward only.

UNISURF represents a solid by its occupancy ``o(x)`` in [0, 1] (inside = 1) and its surface by the level set
``o = τ`` (τ = 0.5). To place its interval samples (:func:`taichi_dr.implicit.sampling.unisurf_samples`) it
finds, per ray, the first point where the ray passes from outside (``o < τ``) to inside (``o >= τ``):

1. ``n_steps`` (256) uniform samples on the ray's ``[t_near, t_far]`` (UNISURF: from the camera to the far
   intersection with the bounding sphere; here whatever segment the caller gives, usually the bounding
   sphere's ``intersect_sphere``);
2. the first sign change of ``τ - o`` from + to - (:func:`taichi_dr.implicit.root_finding.first_crossing`);
   a ray whose first sample is already inside (``o >= τ``) is excluded, as in UNISURF;
3. ``n_secant`` (8) secant steps on the bracket (:func:`taichi_dr.implicit.root_finding.secant_refine`;
   the Illinois variant of regula falsi, where UNISURF uses plain regula falsi).

Differences from UNISURF's code: UNISURF draws the number of steps at random in training; here, with a
generator, the sample grid is shifted by one random fraction of a step per ray (the first sample then lies
up to one step after ``t_near``), and without one it is the fixed linspace. The result carries no gradient;
UNISURF's pipeline does not differentiate through the surface point either (it only places samples).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from taichi_dr.core import runtime
from taichi_dr.core.bridge import check_finite, check_tensor, to_kernel
from taichi_dr.implicit.root_finding import _evaluate, first_crossing, secant_refine
from taichi_dr.implicit.sphere_tracing import _check_rays

__all__ = ["SurfaceHits", "SurfaceSearchSettings", "find_surface", "find_surface_in_grid"]

OccupancyFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SurfaceSearchSettings:
    """How :func:`find_surface` searches (defaults: UNISURF's code).

    n_steps: uniform occupancy samples per ray (>= 2).
    n_secant: secant steps refining each bracket (0: the first inside sample is reported).
    level: the occupancy τ of the surface, in (0, 1).
    chunk: points per ``occupancy_fn`` call (bounds the network's peak memory).
    """

    n_steps: int = 256
    n_secant: int = 8
    level: float = 0.5
    chunk: int = 65536

    def __post_init__(self):
        for name in ("n_steps", "n_secant", "chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SurfaceSearchSettings: {name} must be an int, got {value!r}")
        if isinstance(self.level, bool) or not isinstance(self.level, (int, float)):
            raise TypeError(f"SurfaceSearchSettings: level must be a number, got {self.level!r}")
        checks = [
            (self.n_steps >= 2, f"n_steps must be >= 2, got {self.n_steps}"),
            (self.n_secant >= 0, f"n_secant must be >= 0, got {self.n_secant}"),
            (0 < self.level < 1, f"level must be in (0, 1) (occupancies lie in [0, 1]), got {self.level}"),
            (self.chunk >= 1, f"chunk must be >= 1, got {self.chunk}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SurfaceSearchSettings: {msg}")


@dataclass
class SurfaceHits:
    """Output of :func:`find_surface` (no gradients).

    t: (R,) surface distance for hits; ``t_far`` for the other rays.
    hit: (R,) bool, an outside -> inside crossing of ``o = level`` was found (and the ray starts outside).
    starts_inside: (R,) bool, ``o(first sample) >= level``: excluded from the hits (UNISURF).
    evaluations: occupancy evaluations (points) spent, a cost measure.
    """

    t: torch.Tensor
    hit: torch.Tensor
    starts_inside: torch.Tensor
    evaluations: int


def _check_search(settings, generator, origins, dirs, t_near, t_far):
    """find_surface's argument checks; returns the rays and segments as kernel tensors."""
    if not isinstance(settings, SurfaceSearchSettings):
        raise TypeError(f"settings: expected SurfaceSearchSettings, got {type(settings).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    arch = runtime.ensure_init()
    _check_rays(origins, dirs)
    n_rays = origins.shape[0]
    check_tensor("t_near", t_near, (n_rays,), dtype=origins.dtype)
    check_tensor("t_far", t_far, (n_rays,), dtype=origins.dtype)
    if origins.dtype == torch.float64 and arch == "vulkan":
        raise TypeError("origins: float64 is not supported on the vulkan backend (SPIR-V devices such as Mesa's "
                        "lavapipe have no 64-bit floats); use float32 rays, or the cpu/cuda backend for float64")
    o, d = to_kernel("origins", origins), to_kernel("dirs", dirs)
    near, far = to_kernel("t_near", t_near), to_kernel("t_far", t_far)
    check_finite({"t_near": near, "t_far": far})
    return o, d, near, far


def _crossings(occupancy_fn, o, d, far, rays, ts, occupancy, settings, evaluations) -> SurfaceHits:
    """The shared end of both searches: ``ts (R', N)`` increasing sample positions of ``rays (R',)`` and
    their ``occupancy (R', N)``; the first outside -> inside change, refined by secant steps."""
    level = float(settings.level)
    t = far.clone()
    hit = torch.zeros(far.shape[0], dtype=torch.bool, device=far.device)
    starts_inside = torch.zeros_like(hit)
    check_finite({"occupancy_fn": occupancy})
    # positive outside (o < level), <= 0 inside: the field the root finder expects
    outside = (level - occupancy).contiguous()
    found, t_lo, f_lo, t_hi, f_hi = first_crossing(outside, ts.contiguous())
    inside_first = outside[:, 0] <= 0
    starts_inside[rays] = inside_first
    bracketed = found & ~inside_first
    hit[rays] = bracketed
    sel = torch.nonzero(bracketed).flatten()
    if sel.numel() > 0:
        br = rays[sel]

        def field(x):
            f = occupancy_fn(x)
            return level - (f[:, 0] if f.dim() == 2 else f)

        t_s, secant_evaluations = secant_refine(field, o[br], d[br], t_lo[sel], f_lo[sel], t_hi[sel], f_hi[sel],
                                                settings.n_secant, settings.chunk)
        evaluations += secant_evaluations
        t[br] = t_s
    return SurfaceHits(t=t, hit=hit, starts_inside=starts_inside, evaluations=evaluations)


def _no_hits(far: torch.Tensor) -> SurfaceHits:
    none = torch.zeros(far.shape[0], dtype=torch.bool, device=far.device)
    return SurfaceHits(t=far.clone(), hit=none, starts_inside=none.clone(), evaluations=0)


@torch.no_grad()
def find_surface(occupancy_fn: OccupancyFn, origins: torch.Tensor, dirs: torch.Tensor, t_near: torch.Tensor,
                 t_far: torch.Tensor, settings: SurfaceSearchSettings = SurfaceSearchSettings(),
                 generator: torch.Generator | None = None) -> SurfaceHits:
    """The first outside -> inside crossing of ``o(x) = level`` along each ray ``origins + t dirs``.

    occupancy_fn: ``points (M, 3) -> (M,)`` (or ``(M, C)``: the first column) occupancy in [0, 1], inside =
        high; called without autograd, ``settings.chunk`` points at a time.
    origins, dirs: (R, 3) float32 or float64 (float32 only on Vulkan) on the kernel device, dirs of unit
        length; t_near, t_far: (R,) the searched segment of each ray (same dtype).
    generator: shifts each ray's sample grid by one random fraction of a step (training); None: the fixed
        ``linspace(t_near, t_far, n_steps)``.

    Rays with ``t_far <= t_near`` get no hit and no evaluation. Returns :class:`SurfaceHits`.
    """
    o, d, near, far = _check_search(settings, generator, origins, dirs, t_near, t_far)
    n_rays, dtype, dev = o.shape[0], o.dtype, o.device
    n = settings.n_steps
    # One random shift per ray (drawn for all R rays, so their number depends on R only).
    shift = (torch.rand(n_rays, generator=generator, dtype=dtype, device=generator.device).to(dev)
             if generator is not None else None)
    rays = torch.nonzero(far > near).flatten()
    if rays.numel() == 0:
        return _no_hits(far)
    steps = torch.arange(n, dtype=dtype, device=dev)
    if shift is None:
        u = (steps / (n - 1)).expand(rays.numel(), n)
    else:
        u = (steps[None, :] + shift[rays, None]) / n            # in [0, 1): n equal steps, one offset per ray
    ts = (near[rays, None] + u * (far[rays] - near[rays])[:, None]).minimum(far[rays, None]).contiguous()
    points = o[rays, None, :] + ts[..., None] * d[rays, None, :]
    occupancy = _evaluate(occupancy_fn, points.reshape(-1, 3), settings.chunk, "occupancy_fn").reshape(-1, n)
    return _crossings(occupancy_fn, o, d, far, rays, ts, occupancy, settings, occupancy.numel())


@torch.no_grad()
def find_surface_in_grid(occupancy_fn: OccupancyFn, origins: torch.Tensor, dirs: torch.Tensor,
                         t_near: torch.Tensor, t_far: torch.Tensor, grid, step_size: float,
                         settings: SurfaceSearchSettings = SurfaceSearchSettings(),
                         generator: torch.Generator | None = None) -> SurfaceHits:
    """:func:`find_surface` that evaluates the occupancy only in an occupancy grid's occupied cells.

    The candidate samples lie every ``step_size`` along ``[t_near, t_far]`` (shifted by one random fraction of
    a step per ray with a ``generator``); :meth:`~taichi_dr.implicit.occupancy_grid.OccupancyGrid.march` keeps
    those in occupied cells, and only they are evaluated. The first outside -> inside change between
    consecutive kept samples is then refined by ``settings.n_secant`` secant steps, as in :func:`find_surface`:
    where kept samples are separated by empty cells, the bracket spans the gap, which the grid holds to be
    outside. A ray whose first kept sample is inside is excluded (UNISURF's rule), and rays that cross no
    occupied cell get no hit and cost nothing. ``settings.n_steps`` is not used (``step_size`` sets the
    spacing: for UNISURF's, its diameter over ``n_steps``). Returns :class:`SurfaceHits`.
    """
    o, d, near, far = _check_search(settings, generator, origins, dirs, t_near, t_far)
    samples = grid.march(o, d, near, far, step_size, generator=generator)
    counts = samples.counts.long()
    rays = torch.nonzero(counts > 0).flatten()
    if rays.numel() == 0:
        return _no_hits(far)
    occupancy = _evaluate(occupancy_fn, samples.points(o, d), settings.chunk, "occupancy_fn")
    # Dense (rays, most samples) rows, each padded by repeating its last sample: equal values add no crossing.
    width = int(counts.max())
    k = torch.arange(width, device=counts.device)
    index = samples.offsets[:-1].long()[rays, None] + torch.minimum(k[None, :], counts[rays, None] - 1)
    return _crossings(occupancy_fn, o, d, far, rays, samples.t[index], occupancy[index], settings,
                      samples.n_samples)
