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


# A marching step's kernel does a few memory reads per ray: on one thread it beats the thread pool's wake-up up
# to about this many rays (2 cores: 15000 rays, 309 us serialised, 445 us in parallel).
MARCH_SERIAL_BELOW = 1 << 16


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
# A kernel that writes some elements of an array also reads it: on Vulkan, Taichi does not copy a torch tensor
# that a kernel only writes to the device, yet copies the whole device buffer back, so elements the kernel
# left alone would come back as stale device memory.


# Columns of the per-ray state array the marching kernel updates (packed: each ndarray argument costs a launch
# about 16 us of Python on the CPU, and a step over a few rays costs little more than its launch).
T, T_PREV, F_PREV, T_FAR = 0, 1, 2, 3


@runtime.locked
@ti.kernel
def _march_step(idx: ti.types.ndarray(), sdf: ti.types.ndarray(), rays: ti.types.ndarray(),
                state: ti.types.ndarray(), status: ti.types.ndarray(), threshold: float, step_scale: float,
                max_relaxation: float, first: ti.i32, marching: ti.types.ndarray(),
                next_points: ti.types.ndarray(), serial: ti.template()):
    """One marching step of the active rays ``idx (m,)`` with their SDF values ``sdf (m,)``.

    ``rays (N, 6)``: origin and direction; ``state (N, 4)``: per ray ``t``, ``t_prev`` and ``f_prev`` (the last
    point outside the surface and its SDF: the outer end of a later bracket; read only after the first step)
    and ``t_far``. Per ray ``i = idx[k]`` it updates ``t``, ``t_prev``, ``f_prev`` and ``status[i]`` (ACTIVE
    while it marches on, else HIT, EXITED or BRACKETED); ``marching[k]`` (u8) says whether the ray marches on
    and ``next_points[k] (3,)`` is where it is evaluated next. One launch does the whole step's bookkeeping:
    over a few hundred rays a step costs what its launches and tensor operations cost, not the rays.
    ``serial``: run on one thread (see :func:`taichi_dr.core.runtime.serial_launch`)."""
    if ti.static(serial):
        ti.loop_config(serialize=True)
    for k in range(idx.shape[0]):
        i = idx[k]
        s = sdf[k]
        new_status = status[i]           # ACTIVE: the rays in idx are the active ones
        t_now = state[i, T]
        t_prev = state[i, T_PREV]
        f_prev = state[i, F_PREV]
        t_far = state[i, T_FAR]
        tn = t_now
        step_taken = t_now - t_prev
        # An over-relaxed step is safe only if the unbounding spheres of its two ends overlap (Keinert et al.
        # 2014): otherwise a surface may lie between them, so the ray goes back and takes the plain step from
        # the last point (which stays the outer end of a bracket).
        if first == 0 and f_prev + ti.abs(s) < step_taken * (1 - 1e-6) - threshold:
            tn = t_prev + step_scale * f_prev
        elif ti.abs(s) < threshold:
            new_status = HIT
        elif s < 0:
            if first == 1:
                new_status = HIT         # the ray enters the bounding sphere inside the surface
            else:
                new_status = BRACKETED   # overshoot: the surface lies in (t_prev, t)
        else:
            omega = 1.0
            if first == 0 and max_relaxation > 1 and step_taken > 0:
                # The SDF's slope along the ray from the last step, and the largest step for which the two
                # spheres still overlap on a surface with that slope: 2 / (1 + slope), with a margin.
                slope = ti.min(ti.max((f_prev - s) / step_taken, 0.0), 1.0)
                omega = ti.min(ti.max(0.9 * 2.0 / (1.0 + slope), 1.0), max_relaxation)
            state[i, T_PREV] = t_now
            state[i, F_PREV] = s
            if t_now + step_scale * s > t_far:
                new_status = EXITED
            else:
                tn = ti.min(t_now + omega * step_scale * s, t_far)
        state[i, T] = tn
        status[i] = new_status
        marching[k] = ti.u8(new_status == ACTIVE)
        for c in ti.static(range(3)):
            next_points[k, c] = rays[i, c] + tn * rays[i, 3 + c]


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
        t = to_kernel("segments[0] (t_near)", t_given)
        t_far = to_kernel("segments[1] (t_far)", t_far_given)
        in_sphere = to_kernel("segments[2] (inside)", inside_given) & (t_far >= t)
    status = torch.where(in_sphere, ACTIVE, OUTSIDE).to(torch.int32)
    t_near = t
    # The kernel's packed arrays; t, t_prev, f_prev and t_far below are views of `state`'s columns.
    rays = torch.cat([o, d], dim=1).contiguous()
    state = torch.stack([t, t, torch.full_like(t, -1.0), t_far], dim=1).contiguous()
    t, t_prev, f_prev, t_far = state.unbind(dim=1)

    # Marching with compaction: `idx` holds the active rays, in increasing order (a boolean selection of
    # the previous list, so results never depend on thread scheduling), `points` where they are evaluated.
    idx = torch.nonzero(in_sphere).flatten().to(torch.int32)
    first_rays = idx.long()
    points = o[first_rays] + t[first_rays, None] * d[first_rays]
    while idx.numel() > 0 and steps < settings.max_steps:
        f = _evaluate(sdf_fn, points, settings.chunk)
        sdf_evals += idx.numel()
        marching = torch.empty(idx.numel(), dtype=torch.uint8, device=dev)
        next_points = torch.empty_like(points)
        _march_step(idx, f, rays, state, status, float(settings.threshold), float(settings.step_scale),
                    float(settings.max_relaxation), int(steps == 0), marching, next_points,
                    runtime.serial_launch(idx.numel(), below=MARCH_SERIAL_BELOW))
        steps += 1
        keep = marching.view(torch.bool)
        idx, points = idx[keep], next_points[keep]

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
    t = t.contiguous()
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
