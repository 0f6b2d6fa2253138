"""The IDR ray-tracer baseline (benchmarks/idr_tracer.py) is right: analytic intersections, IDR's own
behaviour on edge cases, and agreement with taichi_dr's sphere tracer on the same SDFs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from taichi_dr.core.camera import Cameras
from taichi_dr.implicit.analytic import box_sdf, sphere_sdf, torus_sdf
from taichi_dr.implicit.sphere_tracing import TracerSettings, sdf_gradient, sphere_trace

BASELINE = Path(__file__).resolve().parents[1] / "benchmarks" / "idr_tracer.py"


def _load():
    # benchmarks/ is not a package; registered in sys.modules so the module's dataclass can resolve itself
    if "idr_tracer" not in sys.modules:
        spec = importlib.util.spec_from_file_location("idr_tracer", BASELINE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["idr_tracer"] = module
        spec.loader.exec_module(module)
    return sys.modules["idr_tracer"]


idr = _load()
EVAL = idr.IdrTracerSettings()
TRAIN = idr.IdrTracerSettings(training=True)


def ring_rays(size=24, views=4):
    az = torch.linspace(0, 360, views + 1)[:-1]
    el = torch.tensor([30.0, -20.0] * views)[:views]
    cams = Cameras.from_spherical(torch.full((views,), 2.5), el, az, fov=40, image_size=(size, size))
    o, d = cams.image_rays()
    return o.reshape(-1, 3).contiguous(), d.reshape(-1, 3).contiguous()


def sphere_hits(o, d, r=0.5):
    """Analytic first intersection with the sphere of radius r at the origin, and the ray's closest approach."""
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - r * r)
    t = -b - disc.clamp_min(0).sqrt()
    closest = (o + (-b)[:, None] * d).norm(dim=-1)
    return t, closest


def box_hits(o, d, half):
    """Slab test: entry t and whether the ray crosses the axis-aligned box of half extents ``half``."""
    h = torch.tensor(half, dtype=o.dtype)
    inv = 1.0 / d
    t1, t2 = (-h - o) * inv, (h - o) * inv
    t_in, axis = torch.minimum(t1, t2).max(-1)
    t_out = torch.maximum(t1, t2).min(-1).values
    return t_in, t_out, d.gather(1, axis[:, None])[:, 0].abs()       # the cosine at the entry face


@pytest.mark.parametrize("settings", [EVAL, TRAIN], ids=["eval", "training"])
def test_sphere_hits_match_the_analytic_intersection(settings):
    o, d = ring_rays()
    t, hit, evals = idr.idr_ray_trace(sphere_sdf, o, d, settings)
    t_true, closest = sphere_hits(o, d)
    clear_hit = closest < 0.5 - 0.01
    clear_miss = closest > 0.5 + 0.01
    assert bool(clear_hit.any()) and bool(clear_miss.any())
    assert bool(hit[clear_hit].all()) and not bool(hit[clear_miss].any())
    assert float((t[clear_hit] - t_true[clear_hit]).abs().max()) < 1e-4
    assert evals > 0


def test_box_hits_match_the_slab_test():
    half = (0.4, 0.3, 0.2)
    o, d = ring_rays()
    t, hit, _ = idr.idr_ray_trace(lambda x: box_sdf(x, half), o, d, EVAL)
    t_in, t_out, cos = box_hits(o, d, half)
    inflated_in, inflated_out, _ = box_hits(o, d, tuple(h + 0.01 for h in half))
    clear_hit = t_out - t_in > 0.02                   # not a ray that only clips an edge or corner
    clear_miss = inflated_out < inflated_in           # misses the box grown by 0.01
    assert bool(clear_hit.any()) and bool(clear_miss.any())
    assert bool(hit[clear_hit].all()) and not bool(hit[clear_miss].any())
    # converged means |f| <= 5e-5, i.e. |dt| <= 5e-5 / cos: 1e-4 holds where the face is met at cos >= 0.5
    steep = clear_hit & (cos >= 0.5)
    assert bool(steep.any())
    assert float((t[steep] - t_in[steep]).abs().max()) < 1e-4
    assert bool(((t[clear_hit] - t_in[clear_hit]).abs() <= 5e-5 / cos[clear_hit] + 1e-6).all())


def test_head_on_ray_costs_what_idr_evaluates():
    # t_near = 1.5, t_far = 3.5 exactly; each front lands exactly on the sphere after one step
    o, d = torch.tensor([[0.0, 0.0, -2.5]]), torch.tensor([[0.0, 0.0, 1.0]])
    t, hit, evals = idr.idr_ray_trace(sphere_sdf, o, d, EVAL)
    assert bool(hit[0]) and float(t[0]) == 2.0
    assert evals == 4          # both fronts at the sphere's ends, then both after their one step


def test_rays_missing_the_bounding_sphere():
    o, d = torch.tensor([[0.0, 1.5, -2.5]]), torch.tensor([[0.0, 0.0, 1.0]])
    t, hit, evals = idr.idr_ray_trace(sphere_sdf, o, d, EVAL)
    assert not bool(hit[0]) and float(t[0]) == 0.0       # eval: IDR leaves acc_start_dis at its zero init
    t, hit, _ = idr.idr_ray_trace(sphere_sdf, o, d, TRAIN)
    assert not bool(hit[0]) and float(t[0]) == pytest.approx(2.5)   # training: closest approach, t = -d.c


def test_origin_inside_the_surface_is_a_hit_at_the_origin():
    # The start front's first SDF is negative, so it stops at once (sdf <= threshold); the end front walks
    # back to the exit point; acc_start (0) < acc_end (0.5) makes it a hit at t = 0, as in IDR.
    o, d = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    t, hit, _ = idr.idr_ray_trace(sphere_sdf, o, d, EVAL)
    assert bool(hit[0]) and float(t[0]) == 0.0


def test_camera_inside_the_bounding_sphere_starts_at_itself():
    o, d = torch.tensor([[0.0, 0.0, -0.8]]), torch.tensor([[0.0, 0.0, 1.0]])
    t, hit, _ = idr.idr_ray_trace(sphere_sdf, o, d, EVAL)
    assert bool(hit[0]) and float(t[0]) == pytest.approx(0.3, abs=1e-4)


def test_grazing_rays():
    o = torch.tensor([[0.0, 0.501, -2.5], [0.0, 0.499, -2.5]])
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    t, hit, evals = idr.idr_ray_trace(sphere_sdf, o, d, EVAL)
    # Passing 1e-3 outside: the fronts slow down near the tangent point, do not converge in 10 iterations,
    # and the 100-sample sampler finds no negative sample: a miss reported at its minimum-SDF sample.
    assert not bool(hit[0])
    assert float(t[0]) == pytest.approx(2.5, abs=0.03)
    assert evals > 100
    # Passing 1e-3 inside: a hit whose point is on the surface to the threshold.
    assert bool(hit[1])
    assert float(sphere_sdf(o[1:] + t[1] * d[1:]).abs()) < 5e-5


def test_overshooting_sdf_uses_the_line_search():
    # 1.5 x the distance: every step overshoots by half the distance, the line search steps back
    o, d = ring_rays(size=12, views=2)
    t, hit, _ = idr.idr_ray_trace(lambda x: 1.5 * sphere_sdf(x), o, d, EVAL)
    t_true, closest = sphere_hits(o, d)
    clear_hit = closest < 0.49
    assert bool(hit[clear_hit].all()) and not bool(hit[closest > 0.51].any())
    assert float((t[clear_hit] - t_true[clear_hit]).abs().max()) < 1e-4


def test_training_misses_get_their_minimum_sdf_point():
    o, d = ring_rays(size=16, views=1)
    t, hit, _ = idr.idr_ray_trace(sphere_sdf, o, d, TRAIN, generator=torch.Generator().manual_seed(0))
    _, closest = sphere_hits(o, d)
    miss = ~hit & (closest < 1.0)                        # misses inside the bounding sphere
    assert bool(miss.any())
    f_min = sphere_sdf(o[miss] + t[miss, None] * d[miss])
    # 100 random samples on a segment of length <= 2: the best is near the closest approach
    assert float((f_min - (closest[miss] - 0.5)).max()) < 0.01


@pytest.mark.parametrize("name", ["sphere", "box", "torus"])
def test_sphere_trace_agrees_with_the_baseline(name):
    sdf = {"sphere": sphere_sdf, "box": box_sdf, "torus": torus_sdf}[name]
    o, d = ring_rays()
    t_idr, hit_idr, _ = idr.idr_ray_trace(sdf, o, d, EVAL)
    r = sphere_trace(sdf, o, d, TracerSettings(threshold=EVAL.sdf_threshold, n_samples=EVAL.n_steps,
                                               n_secant=EVAL.n_secant_steps), miss_min_sdf=False)
    assert float((r.hit == hit_idr).float().mean()) >= 0.995
    both = r.hit & hit_idr
    # Each stops where |f| <= 5e-5 (IDR: f <= 5e-5), i.e. within 5e-5 / cos of the surface along the ray
    # (cos = |grad f . d|, |grad f| = 1): the two may differ by twice that, not more.
    _, g = sdf_gradient(sdf, o[both] + t_idr[both, None] * d[both])
    cos = (g * d[both]).sum(-1).abs()
    dt = (r.t[both] - t_idr[both]).abs()
    assert bool((dt <= 2 * EVAL.sdf_threshold / cos + 1e-6).all())
    steep = cos >= 0.5
    assert float(steep.float().mean()) > 0.5 and float(dt[steep].max()) < 2e-4
    for t in (r.t, t_idr):
        assert float(sdf(o[both] + t[both, None] * d[both]).abs().max()) <= EVAL.sdf_threshold * 1.01


def test_segments_replace_the_bounding_sphere():
    """The occupancy-grid hook: given segments equal to the bounding sphere's, nothing changes."""
    o, d = ring_rays(size=12, views=2)
    si, inside = idr.get_sphere_intersection(o, d, 1.0)
    a = idr.idr_ray_trace(torus_sdf, o, d, EVAL)
    b = idr.idr_ray_trace(torus_sdf, o, d, EVAL, segments=(si[:, 0], si[:, 1], inside))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
