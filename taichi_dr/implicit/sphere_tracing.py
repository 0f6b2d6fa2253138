"""Sphere tracing of a signed distance function (IDR, Yariv et al. 2020), Taichi kernels + a torch SDF.

The SDF is any torch callable ``sdf_fn(points (M, 3)) -> (M,)`` (a neural network, or an analytic SDF from
:mod:`taichi_dr.implicit.analytic`). Finding the surface is a forward-only search, so it runs without autograd:

1. :func:`taichi_dr.core.rays.intersect_sphere` (the engine's one ray-sphere routine): rays enter the
   bounding sphere at ``t_near`` and leave it at ``t_far``.
2. Marching (Taichi kernel ``_march_step``): ``t += f(o + t d)`` until ``|f| < threshold`` (hit),
   ``t > t_far`` (exited) or ``max_steps``. Only the still-active rays are evaluated: they are kept in a
   compacted index list each step, so the SDF cost follows the rays that are left, not all rays
   times all steps. A step that lands inside the surface (``f < 0``, an overshoot, which happens with an
   SDF that is not an exact distance) keeps the last outside point, and the two bracket the surface.
   Steps are over-relaxed (``t += ω f``, Keinert et al. 2014, "Enhanced Sphere Tracing"): where the SDF
   falls slowly along the ray (rays that skim a surface, where plain steps crawl), ω grows towards
   ``max_relaxation``; a step whose two unbounding spheres do not overlap may have jumped a surface and is
   retaken plainly from its start, so the first surface found is the one plain sphere tracing finds.
3. Sampler (:func:`taichi_dr.implicit.root_finding.first_crossing`): rays that did not converge (and, for
   the mask loss, rays that exited) get ``n_samples`` SDF samples along ``[t_near, t_far]``; the first sign
   change brackets the surface, and a ray without one is a miss whose minimum-SDF sample is kept (IDR's
   mask loss is evaluated there).
4. Secant refinement (:func:`taichi_dr.implicit.root_finding.secant_refine`) of every bracket.

The result (``t`` per ray, hit flags) carries no gradient. :func:`differentiable_intersection` then makes the
surface point a differentiable function of the SDF's parameters and of the rays (hence the cameras) with
IDR's first-order formula ``x = c + v (t0 - (f(x; θ) - f(x0; θ0)) / (∇f(x0) · v0))``, exact in its first
derivatives at the traced point.

Kernels read torch tensors in place (float32 or float64 rays; the kernels compile per dtype; float32 only on
Vulkan). Each launch holds the runtime's kernel lock, so tracing may run in any thread; the SDF evaluations
between launches run outside it.
"""


from collections.abc import Callable
from dataclasses import dataclass

import taichi as ti
import torch

from taichi_dr.core import runtime
from taichi_dr.core.bridge import check_tensor, to_kernel
from taichi_dr.core.rays import intersect_sphere, ray_segments
from taichi_dr.implicit.root_finding import _evaluate, first_crossing, secant_refine

__all__ = ["TraceResult", "TracerSettings", "differentiable_intersection", "intersect_sphere", "sdf_gradient",
           "sphere_trace"]

SdfFn = Callable[[torch.Tensor], torch.Tensor]

# Per-ray status codes written by the kernels.
ACTIVE = 0
HIT = 1          # converged: |f| < threshold (or the ray starts inside the surface)
EXITED = 2       # marched past t_far without converging
BRACKETED = 3    # a sign change between t_lo (f > 0) and t_hi (f < 0), awaiting secant refinement
OUTSIDE = 4      # the ray misses the bounding sphere
RETREATED = 5    # an over-relaxed step may have skipped a surface: back to the last point, plain step


@dataclass(frozen=True)
class TracerSettings:
    """How rays find the zero level set.

    bounding_radius: radius of the sphere (centred at the origin) that holds the surface; rays start where
        they enter it. IDR's normalised scenes put the object inside the unit sphere.
    max_steps: sphere-tracing steps before a ray is handed to the sampler.
    threshold: a ray has converged when ``|f| < threshold`` (IDR: 5e-5).
    step_scale: fraction of ``f`` stepped each time (1 = plain sphere tracing; < 1 is more cautious with a
        network whose gradient norm exceeds 1).
    max_relaxation: largest over-relaxation factor ω of a step ``ω f`` (Keinert et al. 2014, "Enhanced
        sphere tracing"); ω comes from the SDF's slope along the ray over the last step, and a step whose two
        unbounding spheres do not overlap is retaken plainly, so no surface a plain step would find is
        skipped. 1 = plain sphere tracing.
    n_samples: uniform samples along ``[t_near, t_far]`` for rays that did not converge.
    n_secant: secant iterations per bracket.
    chunk: points per SDF call (bounds peak memory of the network's activations).
    """

    bounding_radius: float = 1.0
    max_steps: int = 64
    threshold: float = 5e-5
    step_scale: float = 1.0
    max_relaxation: float = 1.9
    n_samples: int = 64
    n_secant: int = 8
    chunk: int = 65536

    def __post_init__(self):
        checks = [
            (self.bounding_radius > 0, "bounding_radius must be > 0"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.threshold > 0, "threshold must be > 0"),
            (0 < self.step_scale <= 1, "step_scale must be in (0, 1]"),
            (1 <= self.max_relaxation <= 2, "max_relaxation must be in [1, 2]"),
            (self.n_samples >= 2, "n_samples must be >= 2"),
            (self.n_secant >= 0, "n_secant must be >= 0"),
            (self.chunk >= 1, "chunk must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TracerSettings: {msg}")


@dataclass
class TraceResult:
    """Output of :func:`sphere_trace` (no gradients).

    t: (N,) ray parameter of the surface point for hits; for misses the minimum-SDF point along the ray
        (when ``miss_min_sdf``) or the point of closest approach to the bounding sphere's centre.
    hit: (N,) bool, the ray found the surface.
    in_sphere: (N,) bool, the ray crosses the bounding sphere.
    points: (N, 3) ``origins + t * dirs``.
    sdf_evals: number of SDF evaluations (points) spent, a cost measure.
    steps: marching steps taken (until no ray was active, at most ``max_steps``).
    """

    t: torch.Tensor
    hit: torch.Tensor
    in_sphere: torch.Tensor
    points: torch.Tensor
    sdf_evals: int
    steps: int


# ---------------------------------------------------------------------------------------------------------
# Kernels. Arrays are torch tensors passed as ndarrays; their dtype (f32 or f64) picks the instantiation.
# Each is `runtime.locked`: tracing may run in any thread (a training worker), and Taichi's launches are not
# thread-safe.
# Every array a kernel writes is written in full (per-ray results in compact arrays, scattered by torch):
# on Vulkan, Taichi does not copy a torch tensor the kernel only writes to the device, yet copies the whole
# device buffer back, so elements a kernel leaves alone would come back as stale device memory.


@runtime.locked
@ti.kernel
def _march_step(idx: ti.types.ndarray(), sdf: ti.types.ndarray(), t: ti.types.ndarray(),
                t_prev: ti.types.ndarray(), f_prev: ti.types.ndarray(), t_far: ti.types.ndarray(),
                threshold: float, step_scale: float, max_relaxation: float, first: ti.i32,
                step_status: ti.types.ndarray(), t_next: ti.types.ndarray()):
    """One marching step of the active rays ``idx (m,)`` with their SDF values ``sdf (m,)``: per ray its new
    status (ACTIVE: stepped on; RETREATED: stepped on from the previous point) and parameter ``t_next (m,)``;
    ``t`` is not written (see the note above). ``t_prev``/``f_prev`` hold each ray's last point outside the
    surface and its SDF (read only after the first step)."""
    for k in range(idx.shape[0]):
        i = idx[k]
        s = sdf[k]
        status = ACTIVE
        tn = t[i]
        step_taken = t[i] - t_prev[i]
        # An over-relaxed step is safe only if the unbounding spheres of its two ends overlap (Keinert et al.
        # 2014): otherwise a surface may lie between them, so the ray goes back and takes the plain step.
        gap = first == 0 and f_prev[i] + ti.abs(s) < step_taken * (1 - 1e-6) - threshold
        if gap:
            status = RETREATED
            tn = t_prev[i] + step_scale * f_prev[i]
        elif ti.abs(s) < threshold:
            status = HIT
        elif s < 0:
            if first == 1:
                status = HIT             # the ray enters the bounding sphere inside the surface
            else:
                status = BRACKETED       # overshoot: the surface lies in (t_prev, t)
        else:
            omega = 1.0
            if first == 0 and max_relaxation > 1 and step_taken > 0:
                # The SDF's slope along the ray from the last step, and the largest step for which the two
                # spheres still overlap on a surface with that slope: 2 / (1 + slope), with a margin.
                slope = ti.min(ti.max((f_prev[i] - s) / step_taken, 0.0), 1.0)
                omega = ti.min(ti.max(0.9 * 2.0 / (1.0 + slope), 1.0), max_relaxation)
            if t[i] + step_scale * s > t_far[i]:
                status = EXITED
            else:
                tn = ti.min(t[i] + omega * step_scale * s, t_far[i])
        step_status[k] = status
        t_next[k] = tn


# ---------------------------------------------------------------------------------------------------------


def _check_rays(origins, dirs):
    check_tensor("origins", origins, (None, 3), dtype=(torch.float32, torch.float64))
    check_tensor("dirs", dirs, (origins.shape[0], 3), dtype=origins.dtype)
    # One scan and one read on the host for all three checks (each bool() would wait for the device).
    o, d = origins.detach(), dirs.detach()
    finite_o, finite_d, unit = torch.stack([torch.isfinite(o).all(), torch.isfinite(d).all(),
                                            ((d.norm(dim=-1) - 1).abs() < 1e-3).all()]).tolist()
    if not finite_o:
        raise ValueError("origins: contains NaN or Inf values")
    if not finite_d:
        raise ValueError("dirs: contains NaN or Inf values")
    if not unit:
        raise ValueError("dirs: ray directions must have unit length")


@torch.no_grad()
def sphere_trace(sdf_fn: SdfFn, origins: torch.Tensor, dirs: torch.Tensor,
                 settings: TracerSettings = TracerSettings(), *, miss_min_sdf: bool = True,
                 generator: torch.Generator | None = None,
                 segments: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> TraceResult:
    """Find the first zero of ``sdf_fn`` along each ray.

    sdf_fn: ``points (M, 3) -> (M,)`` (or ``(M, C)``, whose first column is the SDF); called without autograd
        on the rays that are still active only.
    origins, dirs: (N, 3) float32 or float64 (float32 only on Vulkan) on the kernel device, dirs of unit
        length.
    miss_min_sdf: run the sampler on rays that marched out of the bounding sphere too, so that a surface
        skipped by marching is still found and a miss reports its minimum-SDF point (what IDR's mask loss
        needs); False (rendering) reports such rays as misses at once.
    generator: if given, the sampler's positions are jittered (stratified) with it, as in training.
    segments: ``(t_near, t_far, inside)``, each (N,), to march instead of the bounding sphere's segments: an
        empty-space estimator's tighter ones (:meth:`taichi_dr.implicit.occupancy_grid.OccupancyGrid.ray_intervals`).
        Rays with ``inside`` False are misses, reported at ``t_near``; the others march ``[t_near, t_far]``.
    """
    arch = runtime.ensure_init()
    _check_rays(origins, dirs)
    if origins.dtype == torch.float64 and arch == "vulkan":
        raise TypeError("origins: float64 is not supported on the vulkan backend (SPIR-V devices such as "
                        "Mesa's lavapipe have no 64-bit floats); use float32 rays, or the cpu/cuda backend "
                        "for float64")
    dtype = origins.dtype
    o = to_kernel("origins", origins)
    d = to_kernel("dirs", dirs)
    n = o.shape[0]
    dev = o.device
    f_prev = torch.full((n,), -1.0, dtype=dtype, device=dev)
    sdf_evals = 0
    steps = 0
    if n == 0:
        empty = torch.zeros(0, dtype=torch.bool, device=dev)
        return TraceResult(o.new_zeros(0), empty, empty, o.new_zeros(0, 3), 0, 0)
    # A camera inside the sphere starts at itself; a ray that misses keeps its closest approach to the
    # centre, not behind the camera.
    if segments is None:
        t, t_far, in_sphere = ray_segments(o, d, float(settings.bounding_radius))
    else:
        t_given, t_far_given, inside_given = segments
        check_tensor("segments[0] (t_near)", t_given, (n,), dtype=dtype)
        check_tensor("segments[1] (t_far)", t_far_given, (n,), dtype=dtype)
        check_tensor("segments[2] (inside)", inside_given, (n,), dtype=torch.bool)
        t = to_kernel("segments[0] (t_near)", t_given).clone()
        t_far = to_kernel("segments[1] (t_far)", t_far_given)
        in_sphere = to_kernel("segments[2] (inside)", inside_given) & (t_far >= t)
    t_prev = t.clone()
    status = torch.where(in_sphere, ACTIVE, OUTSIDE).to(torch.int32)
    t_near = t.clone()

    # Marching with compaction: `idx` holds the active rays, in increasing order (a boolean selection of
    # the previous list, so results never depend on thread scheduling).
    idx = torch.nonzero(in_sphere).flatten().to(torch.int32)
    while idx.numel() > 0 and steps < settings.max_steps:
        il = idx.long()
        f = _evaluate(sdf_fn, o[il] + t[il, None] * d[il], settings.chunk)
        sdf_evals += idx.numel()
        step_status = torch.empty(idx.numel(), dtype=torch.int32, device=dev)
        t_next = torch.empty(idx.numel(), dtype=dtype, device=dev)
        _march_step(idx, f, t, t_prev, f_prev, t_far, float(settings.threshold), float(settings.step_scale),
                    float(settings.max_relaxation), int(steps == 0), step_status, t_next)
        steps += 1
        # Rays that were outside the surface keep that point as the outer end of a later bracket (a ray that
        # retreated keeps the point it went back to).
        outside = (step_status == ACTIVE) | (step_status == EXITED)
        t_prev[il[outside]] = t[il[outside]]
        f_prev[il[outside]] = f[outside]
        t[il] = t_next
        marching = (step_status == ACTIVE) | (step_status == RETREATED)
        status[il] = torch.where(marching, ACTIVE, step_status)
        idx = idx[marching]

    # Sampler for rays that did not converge (and for exited ones, when asked).
    todo = status == ACTIVE
    if miss_min_sdf:
        todo |= status == EXITED
    rays = torch.nonzero(todo).flatten()
    if rays.numel() > 0:
        s = settings.n_samples
        u = torch.linspace(0.0, 1.0, s, dtype=dtype, device=dev).expand(rays.numel(), s)
        if generator is not None:
            jitter = torch.rand(rays.numel(), s, generator=generator, dtype=dtype, device=generator.device)
            u = (u + (jitter.to(dev) - 0.5) / (s - 1)).clamp(0.0, 1.0)
        ts = (t_near[rays, None] + u * (t_far[rays] - t_near[rays])[:, None]).contiguous()
        pts = o[rays, None, :] + ts[..., None] * d[rays, None, :]
        f = _evaluate(sdf_fn, pts.reshape(-1, 3), settings.chunk).reshape(-1, s).contiguous()
        sdf_evals += f.numel()
        bracketed, t_lo, f_lo, t_hi, _ = first_crossing(f, ts)
        status[rays] = torch.where(bracketed, BRACKETED, EXITED).to(torch.int32)
        t[rays] = t_hi                      # the inside end of a bracket, or a miss's minimum-SDF sample
        t_prev[rays[bracketed]] = t_lo[bracketed]
        f_prev[rays[bracketed]] = f_lo[bracketed]

    # Secant refinement of brackets: t_prev/f_prev is the outside end, t and its SDF the inside end.
    bl = torch.nonzero(status == BRACKETED).flatten()
    if bl.numel() > 0 and settings.n_secant > 0:
        t_lo, f_lo, t_hi = t_prev[bl].contiguous(), f_prev[bl].contiguous(), t[bl].contiguous()
        f_hi = _evaluate(sdf_fn, o[bl] + t_hi[:, None] * d[bl], settings.chunk)
        sdf_evals += bl.numel()
        t[bl], evaluations = secant_refine(sdf_fn, o[bl], d[bl], t_lo, f_lo, t_hi, f_hi, settings.n_secant,
                                           settings.chunk)
        sdf_evals += evaluations
    hit = (status == HIT) | (status == BRACKETED)
    points = o + t[:, None] * d
    return TraceResult(t=t, hit=hit, in_sphere=in_sphere, points=points, sdf_evals=sdf_evals, steps=steps)


def sdf_gradient(sdf_fn: SdfFn, points: torch.Tensor, *, create_graph: bool = False):
    """SDF values (M,) and their spatial gradient (M, 3) by autograd.

    With ``create_graph`` the gradient stays differentiable (eikonal loss, normals that train the network).
    """
    with torch.enable_grad():
        x = points if points.requires_grad else points.detach().requires_grad_(True)
        f = sdf_fn(x)
        if f.dim() == 2:
            f = f[:, 0]
        (g,) = torch.autograd.grad(f, x, torch.ones_like(f), create_graph=create_graph)
    return f, g


def differentiable_intersection(sdf_fn: SdfFn, origins: torch.Tensor, dirs: torch.Tensor, t0: torch.Tensor,
                                *, min_cos: float = 1e-3) -> torch.Tensor:
    """Surface points (M, 3) that are differentiable in the SDF's parameters and in the rays.

    origins, dirs: (M, 3) rays (may require grad, e.g. built from learnable cameras); t0: (M,) the traced
    distances (detached). Implements IDR's ``x = c + v (t0 - (f(x0; θ) - f(x0; θ0)) / (∇f(x0) · v0))`` with
    ``x0 = c + t0 v``: equal to the traced point in value, and with the first derivatives of the true
    intersection point with respect to θ, c and v. ``|∇f · v|`` is kept above ``min_cos`` so grazing rays
    cannot produce huge or infinite gradients.
    """
    check_tensor("t0", t0, (origins.shape[0],))
    t0 = t0.detach()
    x0 = origins + t0[:, None] * dirs
    f = sdf_fn(x0)
    if f.dim() == 2:
        f = f[:, 0]
    _, g0 = sdf_gradient(sdf_fn, x0.detach())
    dot = (g0 * dirs.detach()).sum(-1)
    sign = torch.where(dot < 0, -torch.ones_like(dot), torch.ones_like(dot))
    dot = torch.where(dot.abs() < min_cos, sign * min_cos, dot)
    t = t0 - (f - f.detach()) / dot
    return origins + t[:, None] * dirs
