"""Sphere tracing in Taichi against closed-form ray intersections, and the differentiable intersection
against finite differences (float64)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from vulkan_subprocess import run_on_vulkan

from taichi_dr.core import runtime
from taichi_dr.core.camera import Cameras
from taichi_dr.core.transforms import axis_angle_to_matrix
from taichi_dr.implicit.analytic import box_sdf, sphere_sdf, torus_sdf
from taichi_dr.implicit.sphere_tracing import (
    TracerSettings,
    differentiable_intersection,
    intersect_sphere,
    sdf_gradient,
    sphere_trace,
)
from taichi_dr.nets.fields import GeometryNetwork

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]


def _rays(n, dtype=F64, seed=0, eye=(0.3, 0.4, -3.0), spread=1.6):
    """Rays from one eye through random targets on the z = 0 plane."""
    g = torch.Generator().manual_seed(seed)
    o = torch.tensor(eye, dtype=dtype).expand(n, 3).contiguous()
    tgt = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * spread
    tgt[:, 2] = 0
    d = tgt - o
    return o, (d / d.norm(dim=-1, keepdim=True)).contiguous()


def _sphere_t(o, d, r, c):
    """Closed-form first intersection with a sphere; (t, hit)."""
    oc = o - torch.as_tensor(c, dtype=o.dtype)
    b = (oc * d).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - r * r)
    hit = disc > 0
    return -b - torch.sqrt(disc.clamp(min=0)), hit


def _box_t(o, d, half):
    """Slab method for an axis-aligned box centred at the origin."""
    half = torch.as_tensor(half, dtype=o.dtype)
    inv = 1.0 / d
    t1, t2 = (-half - o) * inv, (half - o) * inv
    tn = torch.minimum(t1, t2).max(dim=-1).values
    tf = torch.maximum(t1, t2).min(dim=-1).values
    return tn, tn < tf


def _torus_t(o, d, big, small):
    """Smallest positive real root of the torus quartic (|p|^2 + R^2 - r^2)^2 = 4 R^2 (x^2 + z^2)."""
    ts, hits = [], []
    for oi, di in zip(o.numpy(), d.numpy(), strict=True):
        # |p|^2 = t^2 + 2 (o.d) t + |o|^2 (|d| = 1); x^2 + z^2 likewise with the xz parts.
        a1, a0 = 2 * oi @ di, oi @ oi + big ** 2 - small ** 2
        q2, q1, q0 = di[0] ** 2 + di[2] ** 2, 2 * (oi[0] * di[0] + oi[2] * di[2]), oi[0] ** 2 + oi[2] ** 2
        poly = np.polymul([1.0, a1, a0], [1.0, a1, a0]) - 4 * big ** 2 * np.array([0, 0, q2, q1, q0])
        roots = np.roots(poly)
        real = roots[(np.abs(roots.imag) < 1e-9) & (roots.real > 0)].real
        hits.append(len(real) > 0)
        ts.append(real.min() if len(real) else 0.0)
    return torch.tensor(ts, dtype=o.dtype), torch.tensor(hits)


def _clear_of_silhouette(sdf_fn, o, d, t_ref, hit_ref, margin=0.02, cos_min=0.15):
    """Rays whose hit/miss is robust: hits not grazing (|n.d| > cos_min), misses that stay > margin away."""
    ok = torch.zeros_like(hit_ref)
    if bool(hit_ref.any()):
        _, g = sdf_gradient(sdf_fn, o[hit_ref] + t_ref[hit_ref, None] * d[hit_ref])
        cos = ((g / g.norm(dim=-1, keepdim=True)) * d[hit_ref]).sum(-1).abs()
        ok[hit_ref] = cos > cos_min
    miss = ~hit_ref
    s = torch.linspace(0, 6, 600, dtype=o.dtype)
    pts = o[miss, None, :] + s[None, :, None] * d[miss, None, :]
    ok[miss] = sdf_fn(pts.reshape(-1, 3)).reshape(-1, 600).min(dim=1).values > margin
    return ok


@pytest.mark.parametrize("shape", ["sphere", "box", "torus"])
@pytest.mark.parametrize("serial", [True, False])
def test_trace_matches_closed_form(shape, serial, monkeypatch):
    """Against the closed form, with the marching kernel on one thread (as the CPU runs it) and in parallel."""
    monkeypatch.setattr(runtime, "serial_launch", lambda n, below=0: serial and runtime.arch() == "cpu")
    o, d = _rays(400)
    if shape == "sphere":
        def f(x):
            return sphere_sdf(x, 0.5, (0.1, -0.05, 0.0))
        t_ref, hit_ref = _sphere_t(o, d, 0.5, (0.1, -0.05, 0.0))
    elif shape == "box":
        def f(x):
            return box_sdf(x, (0.4, 0.3, 0.25))
        t_ref, hit_ref = _box_t(o, d, (0.4, 0.3, 0.25))
    else:
        def f(x):
            return torus_sdf(x, 0.5, 0.2)
        t_ref, hit_ref = _torus_t(o, d, 0.5, 0.2)
    settings = TracerSettings(threshold=1e-9, max_steps=200)
    res = sphere_trace(f, o, d, settings)
    ok = _clear_of_silhouette(f, o, d, t_ref, hit_ref)
    assert ok.sum() > 300 and hit_ref[ok].sum() > 50 and (~hit_ref[ok]).sum() > 50
    assert torch.equal(res.hit[ok], hit_ref[ok])
    h = ok & hit_ref
    assert torch.allclose(res.t[h], t_ref[h], atol=1e-7)
    assert torch.allclose(res.points[h], o[h] + t_ref[h, None] * d[h], atol=1e-7)


def test_float32_rays_and_threshold_bound():
    o, d = _rays(300, dtype=torch.float32)
    t_ref, hit_ref = _sphere_t(o.double(), d.double(), 0.5, (0, 0, 0))
    res = sphere_trace(lambda x: sphere_sdf(x, 0.5), o, d, TracerSettings(threshold=1e-4))
    assert res.t.dtype == torch.float32
    n = (o.double() + t_ref[:, None] * d.double()) / 0.5
    cos = (n * d.double()).sum(-1).abs()
    h = hit_ref & (cos > 0.2)
    # a converged point has |f| < threshold, so along the ray it is within threshold / cos of the surface
    assert ((res.t.double()[h] - t_ref[h]).abs() <= 1e-4 / cos[h] + 1e-5).all()


def test_only_active_rays_are_evaluated():
    o, d = _rays(500)
    sizes = []

    def f(x):
        sizes.append(x.shape[0])
        return sphere_sdf(x, 0.5)

    res = sphere_trace(f, o, d, TracerSettings(max_steps=40), miss_min_sdf=False)
    marching = sizes[:res.steps]
    assert marching[0] == int(res.in_sphere.sum())
    assert all(a >= b for a, b in zip(marching, marching[1:], strict=False))
    assert marching[-1] < marching[0] // 4          # most rays finished long before the last step
    assert sum(sizes) == res.sdf_evals < res.steps * 500 // 3


def test_overshoot_is_bracketed_and_refined():
    """An SDF that overestimates the distance (2 (|x| - r)) makes marching overshoot into the surface."""
    o, d = _rays(300)
    t_ref, hit_ref = _sphere_t(o, d, 0.5, (0, 0, 0))
    res = sphere_trace(lambda x: 2.0 * sphere_sdf(x, 0.5), o, d, TracerSettings(threshold=1e-10, n_secant=30))
    n = (o + t_ref[:, None] * d) / 0.5
    h = hit_ref & ((n * d).sum(-1).abs() > 0.15)
    assert h.sum() > 50
    assert res.hit[h].all()
    assert torch.allclose(res.t[h], t_ref[h], atol=1e-7)


def test_sampler_and_secant_for_rays_that_do_not_converge():
    """A slow SDF (0.05 (|x| - r)) cannot converge in 5 steps: the sampler and secant steps find the hit."""
    o, d = _rays(300)
    t_ref, hit_ref = _sphere_t(o, d, 0.5, (0, 0, 0))
    settings = TracerSettings(max_steps=5, n_samples=64, n_secant=30, threshold=1e-12)
    res = sphere_trace(lambda x: 0.05 * sphere_sdf(x, 0.5), o, d, settings)
    n = (o + t_ref[:, None] * d) / 0.5
    h = hit_ref & ((n * d).sum(-1).abs() > 0.15)
    assert res.hit[h].all()
    assert torch.allclose(res.t[h], t_ref[h], atol=1e-7)


def test_misses_report_minimum_sdf_point():
    o, d = _rays(400)
    settings = TracerSettings(n_samples=101)
    res = sphere_trace(lambda x: sphere_sdf(x, 0.3), o, d, settings, miss_min_sdf=True)
    _, hit_ref = _sphere_t(o, d, 0.3, (0, 0, 0))
    miss = ~res.hit & res.in_sphere
    assert miss.sum() > 50 and not (miss & hit_ref).any()
    t_closest = -(o * d).sum(-1)          # the sphere SDF is smallest where the ray is closest to its centre
    t_near, t_far, _ = intersect_sphere(o, d, 1.0)
    spacing = (t_far - t_near) / (settings.n_samples - 1)
    assert ((res.t[miss] - t_closest[miss]).abs() <= spacing[miss] / 2 + 1e-9).all()
    # rendering mode leaves misses at the exit point, without sampling
    res2 = sphere_trace(lambda x: sphere_sdf(x, 0.3), o, d, settings, miss_min_sdf=False)
    assert res2.sdf_evals < res.sdf_evals and torch.equal(res2.hit, res.hit)


def test_rays_outside_bounding_sphere_and_starting_inside_surface():
    o = torch.tensor([[0.0, 2.0, -3.0], [0.0, 0.0, -3.0]], dtype=F64)
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=F64)
    res = sphere_trace(lambda x: sphere_sdf(x, 1.5), o, d)     # surface larger than the bounding sphere
    assert res.in_sphere.tolist() == [False, True]
    assert res.hit.tolist() == [False, True]
    assert res.t[1].item() == pytest.approx(2.0)                # enters the unit sphere inside the surface
    assert res.t[0].item() == pytest.approx(3.0)                # closest approach to the centre


def test_empty_and_bad_input():
    res = sphere_trace(lambda x: sphere_sdf(x, 0.5), torch.zeros(0, 3), torch.zeros(0, 3))
    assert res.hit.shape == (0,)
    o, d = _rays(4)
    with pytest.raises(ValueError, match="unit length"):
        sphere_trace(lambda x: sphere_sdf(x, 0.5), o, 2 * d)
    with pytest.raises(ValueError, match="dirs"):
        sphere_trace(lambda x: sphere_sdf(x, 0.5), o, d[:3])
    with pytest.raises(TypeError, match="dirs"):
        sphere_trace(lambda x: sphere_sdf(x, 0.5), o, d.float())
    with pytest.raises(ValueError, match="sdf_fn"):
        sphere_trace(lambda x: x.sum(), o, d)
    bad = o.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="origins: contains NaN"):
        sphere_trace(lambda x: sphere_sdf(x, 0.5), bad, d)
    bad = d.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="dirs: contains NaN"):
        sphere_trace(lambda x: sphere_sdf(x, 0.5), o, bad)
    with pytest.raises(ValueError, match="max_steps"):
        TracerSettings(max_steps=0)


def test_check_finite_names_the_first_bad_tensor():
    from taichi_dr.core.bridge import check_finite

    ok = torch.ones(3)
    check_finite({"a": ok, "b": None, "c": torch.arange(3)})   # None and integer tensors are skipped
    with pytest.raises(ValueError, match="^b: contains NaN"):
        check_finite({"a": ok, "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("inf")])})
    with pytest.raises(ValueError, match="^c: contains NaN or Inf"):
        check_finite({"a": ok, "c": torch.tensor([float("-inf")], dtype=torch.float64)})


def test_deterministic():
    o, d = _rays(2000, dtype=torch.float32)
    net = GeometryNetwork(feature_dim=0, depth=2, width=32, skip_in=(), n_frequencies=2)
    with torch.no_grad():
        a = sphere_trace(net.sdf, o, d)
        b = sphere_trace(net.sdf, o, d)
    assert torch.equal(a.t, b.t) and torch.equal(a.hit, b.hit) and a.hit.any()


# ---------------------------------------------------------------------------------------------------------
# differentiable intersection


def test_intersection_gradient_radius_and_centre():
    o, d = _rays(40, seed=3, spread=0.8)
    r0, c0 = 0.5, torch.tensor([0.05, -0.02, 0.03], dtype=F64)
    t0, hit = _sphere_t(o, d, r0, c0)
    o, d, t0 = o[hit], d[hit], t0[hit]
    params = torch.cat([torch.tensor([r0], dtype=F64), c0])

    def points(p):
        return differentiable_intersection(lambda x: sphere_sdf(x, p[0], p[1:]), o, d, t0)

    assert torch.allclose(points(params), o + t0[:, None] * d)        # the value is the traced point
    jac = torch.autograd.functional.jacobian(points, params)          # (M, 3, 4)
    eps = 1e-6
    fd = torch.zeros_like(jac)
    for j in range(4):
        e = torch.zeros(4, dtype=F64)
        e[j] = eps
        tp, _ = _sphere_t(o, d, (params + e)[0].item(), (params + e)[1:])
        tm, _ = _sphere_t(o, d, (params - e)[0].item(), (params - e)[1:])
        fd[:, :, j] = (tp - tm)[:, None] * d / (2 * eps)
    assert fd.abs().max() > 0.5
    assert torch.allclose(jac, fd, atol=1e-6)


def test_intersection_gradient_camera_parameters():
    """d(surface point)/d(camera rotation, translation, focal) matches finite differences of the exact hit."""
    r0 = 0.6
    base = Cameras.look_at(torch.tensor([0.4, 0.5, -2.5], dtype=F64), fov=40, image_size=(32, 32))
    pixels = torch.tensor([[14.5, 17.5], [10.0, 12.0], [20.5, 21.0]], dtype=F64)

    def cameras(theta):
        rot, trans, logf = theta[:3], theta[3:6], theta[6]
        K = base.K[0] * torch.stack([torch.exp(logf), torch.exp(logf), torch.ones((), dtype=F64)])[:, None]
        return Cameras(K, axis_angle_to_matrix(rot) @ base.R[0], base.t[0] + trans, base.image_size)

    def exact_points(theta):
        o, d = cameras(theta).pixel_rays(pixels)
        t, hit = _sphere_t(o[0], d[0], r0, (0, 0, 0))
        assert hit.all()
        return o[0] + t[:, None] * d[0]

    theta = torch.tensor([0.01, -0.02, 0.015, 0.02, -0.01, 0.03, 0.05], dtype=F64, requires_grad=True)
    o, d = cameras(theta).pixel_rays(pixels)
    with torch.no_grad():
        t0, _ = _sphere_t(o[0], d[0], r0, (0, 0, 0))
    x = differentiable_intersection(lambda p: sphere_sdf(p, r0), o[0], d[0], t0)
    jac = torch.stack([torch.autograd.grad(x.reshape(-1)[k], theta, retain_graph=True)[0]
                       for k in range(x.numel())])
    eps = 1e-6
    fd = torch.zeros_like(jac)
    for j in range(theta.numel()):
        e = torch.zeros_like(theta.detach())
        e[j] = eps
        th = theta.detach()
        fd[:, j] = (exact_points(th + e) - exact_points(th - e)).reshape(-1) / (2 * eps)
    assert fd.abs().max() > 0.1
    assert torch.allclose(jac, fd, atol=1e-6)


def test_intersection_gradient_network_weights():
    """Through a geometry network: a directional derivative in weight space against re-traced
    intersections of perturbed weights (float64)."""
    torch.manual_seed(0)
    net = GeometryNetwork(feature_dim=0, depth=2, width=16, skip_in=(), n_frequencies=1, init_radius=0.5)
    net = net.double()
    o, d = _rays(6, seed=5, spread=0.5)
    settings = TracerSettings(threshold=1e-12, max_steps=300, n_secant=40)
    res = sphere_trace(net.sdf, o, d, settings)
    assert res.hit.all()
    params = list(net.parameters())
    direction = [torch.randn_like(p) for p in params]
    weights = torch.randn(6, 3, dtype=F64)                     # a random linear function of the points
    x = differentiable_intersection(net.sdf, o, d, res.t)
    grads = torch.autograd.grad((x * weights).sum(), params)
    analytic = sum((g * v).sum() for g, v in zip(grads, direction, strict=True))
    eps = 1e-6

    def traced(sign):
        with torch.no_grad():
            for p, v in zip(params, direction, strict=True):
                p += sign * eps * v
            out = (sphere_trace(net.sdf, o, d, settings).points * weights).sum()
            for p, v in zip(params, direction, strict=True):
                p -= sign * eps * v
        return out

    fd = (traced(1) - traced(-1)) / (2 * eps)
    assert abs(fd.item()) > 1e-2
    assert analytic.item() == pytest.approx(fd.item(), rel=1e-5)


def test_grazing_ray_has_finite_gradient():
    r = torch.tensor(0.5, dtype=F64, requires_grad=True)
    o = torch.tensor([[0.5, 0.0, -2.0]], dtype=F64)          # tangent to the sphere at (0.5, 0, 0)
    d = torch.tensor([[0.0, 0.0, 1.0]], dtype=F64)
    x = differentiable_intersection(lambda p: sphere_sdf(p, r), o, d, torch.tensor([2.0], dtype=F64))
    (g,) = torch.autograd.grad(x.sum(), r)
    assert math.isfinite(g.item())


# ---------------------------------------------------------------------------------------------------------
# Vulkan (float32 only; Mesa lavapipe in CI)


def vulkan_scenes():
    """float32 rays and the SDFs that drive each path of the tracer: marching to convergence (exact sphere),
    overshoot + secant (an SDF overestimating the distance by 1.6), and the jittered sampler + secant for
    rays that cannot converge in 4 steps (a slow SDF), with minimum-SDF points for misses."""
    o, d = _rays(500, dtype=torch.float32, seed=5)
    return [
        ("exact", o, d, lambda x: sphere_sdf(x, 0.5, (0.1, -0.05, 0.0)), TracerSettings(threshold=1e-5)),
        ("overshoot", o, d, lambda x: 1.6 * sphere_sdf(x, 0.45), TracerSettings(threshold=1e-6, n_secant=12)),
        ("sampler", o, d, lambda x: 0.1 * sphere_sdf(x, 0.45, (0.05, 0.0, 0.0)),
         TracerSettings(max_steps=4, n_samples=128, n_secant=12, threshold=1e-7)),
    ]


def trace_vulkan_scenes() -> dict:
    out = {}
    for name, o, d, f, settings in vulkan_scenes():
        res = sphere_trace(f, o, d, settings, generator=torch.Generator().manual_seed(1))
        out[name] = dict(t=res.t.tolist(), hit=res.hit.tolist(), in_sphere=res.in_sphere.tolist(),
                         steps=res.steps)
    return out


VULKAN_SCRIPT = r"""
from test_sphere_tracing import trace_vulkan_scenes, _rays
from taichi_dr.implicit.analytic import sphere_sdf
from taichi_dr.implicit.sphere_tracing import sphere_trace
out = {"scenes": trace_vulkan_scenes()}
o, d = _rays(8)   # float64
try:
    sphere_trace(lambda x: sphere_sdf(x, 0.5), o, d)
    out["float64"] = "accepted"
except TypeError as e:
    out["float64"] = str(e)
"""


@pytest.mark.vulkan
def test_vulkan_matches_cpu(tmp_path):
    """The tracer's kernels give the same hits and distances on Vulkan as on the cpu backend, and float64
    rays are refused there with a clear message (as the rasterizer does)."""
    vk = run_on_vulkan(tmp_path, VULKAN_SCRIPT)
    assert "float64" in vk["float64"] and "vulkan" in vk["float64"] and "float32" in vk["float64"]
    cpu = trace_vulkan_scenes()
    for name, o, d, f, _ in vulkan_scenes():
        a, b = cpu[name], vk["scenes"][name]
        assert a["in_sphere"] == b["in_sphere"], name
        hit_cpu, hit_vk = torch.tensor(a["hit"]), torch.tensor(b["hit"])
        t_cpu, t_vk = torch.tensor(a["t"]), torch.tensor(b["t"])
        # Rays that graze the surface may flip on an ulp of difference; every other ray must agree.
        t_ref, hit_ref = (_sphere_t(o.double(), d.double(), 0.5, (0.1, -0.05, 0.0)) if name == "exact" else
                          _sphere_t(o.double(), d.double(), 0.45, (0, 0, 0)) if name == "overshoot" else
                          _sphere_t(o.double(), d.double(), 0.45, (0.05, 0.0, 0.0)))
        clear = _clear_of_silhouette(lambda x, f=f: f(x.float()).double(), o.double(), d.double(), t_ref, hit_ref,
                                     margin=0.01)
        assert clear.sum() > 350 and hit_ref[clear].sum() > 100, name
        assert torch.equal(hit_cpu[clear], hit_vk[clear]) and torch.equal(hit_cpu[clear], hit_ref[clear]), name
        h = clear & hit_ref
        assert float((t_cpu[h] - t_vk[h]).abs().max()) < 2e-5, name
        assert float((t_vk[h].double() - t_ref[h]).abs().max()) < 1e-4, name
        # misses: the minimum-SDF point along the ray (the sampler's jitter comes from the same generator)
        m = clear & ~hit_ref & torch.tensor(a["in_sphere"])
        if name == "sampler":
            assert m.sum() > 50
            assert float((t_cpu[m] - t_vk[m]).abs().max()) < 1e-4, name



def test_given_segments_replace_the_bounding_sphere_and_save_evaluations():
    """sphere_trace(segments=...): the bounding sphere's own segments give the default result exactly; tight
    segments around the surface find the same hits with fewer SDF evaluations; rays marked outside are misses
    reported at their t_near, with no evaluation."""
    from taichi_dr.core.rays import ray_segments

    o, d = _rays(400)
    sdf = lambda x: sphere_sdf(x, 0.5)  # noqa: E731
    settings = TracerSettings(threshold=1e-6)
    default = sphere_trace(sdf, o, d, settings)
    t_near, t_far, inside = ray_segments(o, d, settings.bounding_radius)
    same = sphere_trace(sdf, o, d, settings, segments=(t_near, t_far, inside))
    assert torch.equal(same.t, default.t) and torch.equal(same.hit, default.hit)
    assert same.sdf_evals == default.sdf_evals

    t_true, hit_true = _sphere_t(o, d, 0.5, (0.0, 0.0, 0.0))
    tight_near = torch.where(hit_true, t_true - 0.05, t_near)
    tight = sphere_trace(sdf, o, d, settings, segments=(tight_near, t_far, inside))
    assert torch.equal(tight.hit, default.hit)
    assert torch.allclose(tight.t[tight.hit], t_true[tight.hit], atol=1e-5)
    assert tight.sdf_evals < default.sdf_evals

    outside = torch.zeros_like(inside)
    none = sphere_trace(sdf, o, d, settings, segments=(t_near, t_far, outside))
    assert not none.hit.any() and none.sdf_evals == 0 and torch.equal(none.t, t_near)
    with pytest.raises(ValueError, match=r"segments\[1\]"):
        sphere_trace(sdf, o, d, settings, segments=(t_near, t_far[:-1], inside))


def _ground_and_thin_wall():
    """A ground slab (top at y = -0.3) and a 2 mm wall standing on it at x = 0.2; rays from x = -2 skim the
    ground at shallow angles, where over-relaxed steps grow long enough to jump over the wall."""
    boxes = [((0.0, -0.8, 0.0), (0.9, 0.5, 0.9)), ((0.2, -0.2, 0.0), (0.001, 0.1, 0.9))]

    def sdf(x):
        return torch.minimum(*[box_sdf(x, half, centre) for centre, half in boxes])

    n = 400
    g = torch.Generator().manual_seed(3)
    o = torch.stack([torch.full((n,), -2.0, dtype=F64), -0.27 + 0.02 * torch.rand(n, generator=g, dtype=F64),
                     0.6 * (torch.rand(n, generator=g, dtype=F64) - 0.5)], -1)
    slope = 0.005 + 0.03 * torch.rand(n, generator=g, dtype=F64)   # downwards, 0.3 to 2 degrees
    d = torch.stack([torch.ones(n, dtype=F64), -slope, torch.zeros(n, dtype=F64)], -1)
    d = (d / d.norm(dim=-1, keepdim=True)).contiguous()
    t_ref = torch.full((n,), math.inf, dtype=F64)
    for centre, half in boxes:
        t_box, hit_box = _box_t(o - torch.tensor(centre, dtype=F64), d, half)
        t_ref = torch.where(hit_box & (t_box > 0), torch.minimum(t_ref, t_box), t_ref)
    return sdf, o, d, t_ref, torch.isfinite(t_ref)


def test_over_relaxation_skips_no_thin_surface_and_saves_evaluations():
    """Over-relaxed steps (``max_relaxation``) find the same first surface as plain sphere tracing, a 2 mm
    wall behind a long grazing run included (a relaxed step that would jump it fails the spheres' overlap test
    and is retaken plainly), with fewer SDF evaluations."""
    sdf, o, d, t_ref, hit_ref = _ground_and_thin_wall()
    plain = sphere_trace(sdf, o, d, TracerSettings(bounding_radius=1.5, threshold=1e-10, max_steps=5000,
                                                   max_relaxation=1.0), miss_min_sdf=False)
    relaxed = sphere_trace(sdf, o, d, TracerSettings(bounding_radius=1.5, threshold=1e-10, max_steps=5000,
                                                     max_relaxation=1.9), miss_min_sdf=False)
    on_wall = hit_ref & (((o + t_ref[:, None] * d)[:, 0] - 0.199).abs() < 1e-9)
    assert on_wall.sum() > 100 and (hit_ref & ~on_wall).sum() > 50      # both surfaces are met
    for res in (plain, relaxed):
        assert torch.equal(res.hit, hit_ref)
        # |f| < 1e-10 along a ray that meets the ground at a slope s is within 1e-10 / s of it
        assert torch.allclose(res.t[hit_ref], t_ref[hit_ref], atol=1e-7)
    assert relaxed.sdf_evals < 0.6 * plain.sdf_evals
