"""Cone tracing over pixel tiles: rays start no later than the first surface (closed forms), the tracer then
finds what it finds without cones, tiles of background are reported empty, and the saving is real."""

import pytest
import torch
from vulkan_subprocess import run_on_vulkan

from taichi_dr.core.camera import Cameras
from taichi_dr.core.rays import ray_segments
from taichi_dr.implicit.analytic import box_sdf, sphere_sdf, torus_sdf
from taichi_dr.implicit.cone_tracing import ConeSettings, cone_segments, sphere_trace_images
from taichi_dr.implicit.sphere_tracing import TracerSettings, sdf_gradient, sphere_trace
from taichi_dr.nets.fields import GeometryNetwork

F64 = torch.float64
SHAPES = {
    "sphere": lambda x: sphere_sdf(x, 0.45, (0.1, -0.05, 0.0)),
    "box": lambda x: box_sdf(x, (0.4, 0.3, 0.25)),
    "torus": lambda x: torus_sdf(x, 0.5, 0.15),
}


def _image_rays(views=2, size=(37, 45), dtype=F64, distance=2.5):
    """Rays of ``views`` cameras around the origin, whole images row by row: ((N, 3), (N, 3), (B, H, W))."""
    az = torch.linspace(0, 360, views + 1)[:-1] + 20
    el = torch.tensor([25.0, -35.0] * views)[:views]
    cams = Cameras.from_spherical(torch.full((views,), distance), el, az, fov=40.0, image_size=size)
    o, d = cams.image_rays()
    return o.reshape(-1, 3).to(dtype).contiguous(), d.reshape(-1, 3).to(dtype).contiguous(), (views, *size)


def _first_surface_t(sdf_fn, o, d, t_near, t_far, n=4000):
    """Dense reference: the first sample along [t_near, t_far] with f < 0 (inf where none)."""
    s = torch.linspace(0, 1, n, dtype=o.dtype)
    ts = t_near[:, None] + s[None] * (t_far - t_near)[:, None]
    f = sdf_fn((o[:, None] + ts[..., None] * d[:, None]).reshape(-1, 3)).reshape(-1, n)
    inside = f < 0
    first = torch.where(inside.any(1), ts.gather(1, inside.int().argmax(1, keepdim=True))[:, 0],
                        torch.full_like(t_near, torch.inf))
    return first


@pytest.mark.parametrize("shape", list(SHAPES))
def test_rays_start_before_the_first_surface_and_trace_the_same(shape):
    sdf = SHAPES[shape]
    o, d, image = _image_rays()
    seg, cone_evals = cone_segments(sdf, o, d, image)
    start, t_far, inside = seg
    t_near, t_far_sphere, crosses = ray_segments(o, d, 1.0)
    assert torch.equal(t_far, t_far_sphere) and not (inside & ~crosses).any()
    assert (start >= t_near).all()
    first = _first_surface_t(sdf, o, d, t_near, t_far_sphere)
    has_surface = crosses & torch.isfinite(first)
    assert has_surface.sum() > 500 and (crosses & ~has_surface).sum() > 500
    # No ray skips its first surface, and every ray with a surface stays inside.
    assert (start[has_surface] <= first[has_surface]).all()
    assert inside[has_surface].all()
    # The cones moved rays forward: on average, most of the way to the surface.
    gained = (start - t_near)[has_surface] / (first - t_near)[has_surface]
    assert gained.mean() > 0.5

    settings = TracerSettings(max_steps=100)
    plain = sphere_trace(sdf, o, d, settings, miss_min_sdf=False)
    coned = sphere_trace(sdf, o, d, settings, miss_min_sdf=False, segments=seg)
    # Rays clear of the silhouette must agree (one grazing the silhouette may converge on either side).
    _, g = sdf_gradient(sdf, plain.points)
    cos = ((g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)) * d).sum(-1).abs()
    clear = ~plain.hit | (cos > 0.1)
    assert clear.float().mean() > 0.95
    assert torch.equal(coned.hit[clear], plain.hit[clear])
    both = clear & plain.hit
    assert torch.allclose(coned.t[both], plain.t[both], atol=1e-4)
    # The saving is real: cones plus the shortened march cost fewer evaluations than the march alone.
    assert cone_evals + coned.sdf_evals < 0.85 * plain.sdf_evals


def test_background_tiles_are_reported_empty():
    o, d, image = _image_rays(views=1, size=(64, 64))

    def sdf(x):
        return sphere_sdf(x, 0.2)

    (start, _, inside), _ = cone_segments(sdf, o, d, image)
    _, _, crosses = ray_segments(o, d, 1.0)
    t_near, t_far, _ = ray_segments(o, d, 1.0)
    emptied = crosses & ~inside
    assert emptied.sum() > 0.5 * crosses.sum()        # a small sphere: most of the bounding sphere is empty
    assert torch.isinf(_first_surface_t(sdf, o[emptied], d[emptied], t_near[emptied], t_far[emptied])).all()


def test_rays_without_a_shared_origin_get_no_cone():
    """An orthographic camera's rays are parallel with distinct origins: no cone bound holds, nothing moves."""
    h = w = 16
    ys, xs = torch.meshgrid(torch.linspace(-0.8, 0.8, h, dtype=F64), torch.linspace(-0.8, 0.8, w, dtype=F64),
                            indexing="ij")
    o = torch.stack([xs, ys, torch.full_like(xs, -3.0)], -1).reshape(-1, 3).contiguous()
    d = torch.tensor([0.0, 0.0, 1.0], dtype=F64).expand(h * w, 3).contiguous()
    (start, t_far, inside), evals = cone_segments(lambda x: sphere_sdf(x, 0.5), o, d, (1, h, w))
    t_near, t_far_ref, crosses = ray_segments(o, d, 1.0)
    assert evals == 0
    assert torch.equal(start, torch.minimum(t_near, t_far_ref)) and torch.equal(inside, crosses)


def test_given_segments_are_only_tightened():
    o, d, image = _image_rays(views=1, size=(32, 32))
    t_near, t_far, crosses = ray_segments(o, d, 1.0)
    given = (t_near + 0.1, t_far - 0.1, crosses & (t_far - t_near > 0.2))
    (start, t_end, inside), _ = cone_segments(SHAPES["torus"], o, d, image, segments=given)
    assert torch.equal(t_end, given[1])
    assert (start[inside] >= given[0][inside]).all() and not (inside & ~given[2]).any()


def test_float32_deterministic_and_any_tile_sizes():
    o, d, image = _image_rays(views=3, size=(21, 30), dtype=torch.float32)
    sdf = SHAPES["box"]
    first = cone_segments(sdf, o, d, image, ConeSettings(tile=16, min_tile=2, max_steps=5))
    second = cone_segments(sdf, o, d, image, ConeSettings(tile=16, min_tile=2, max_steps=5))
    assert first[1] == second[1] and all(torch.equal(a, b) for a, b in zip(first[0], second[0], strict=True))
    start, _, inside = first[0]
    assert start.dtype == torch.float32 and torch.isfinite(start).all()
    # One-pixel tiles are rays marched as cones of radius zero: still no surface skipped.
    (start1, _, inside1), _ = cone_segments(sdf, o.double(), d.double(), image, ConeSettings(tile=1, min_tile=1))
    t_near, t_far, crosses = ray_segments(o.double(), d.double(), 1.0)
    first_t = _first_surface_t(sdf, o.double(), d.double(), t_near, t_far)
    has = crosses & torch.isfinite(first_t)
    assert (start1[has] <= first_t[has]).all() and inside1[has].all()


def test_network_field_traces_the_same_with_cones():
    torch.manual_seed(0)
    net = GeometryNetwork(feature_dim=8, depth=2, width=32, skip_in=()).double().eval()
    o, d, image = _image_rays(views=2, size=(24, 24))
    seg, _ = cone_segments(net.sdf, o, d, image)
    plain = sphere_trace(net.sdf, o, d, TracerSettings(), miss_min_sdf=False)
    coned = sphere_trace(net.sdf, o, d, TracerSettings(), miss_min_sdf=False, segments=seg)
    assert plain.hit.sum() > 100
    assert torch.equal(coned.hit, plain.hit)
    assert torch.allclose(coned.t[plain.hit], plain.t[plain.hit], atol=1e-4)


def test_images_trace_retraces_rays_a_cone_started_inside():
    """A field that overstates the distance (|grad f| = 1.5) breaks the cones' bound: some rays start inside the
    surface. sphere_trace_images traces those again, so its hits equal sphere tracing's alone (whose overshoots
    are bracketed and refined)."""
    def steep(x):
        return 1.5 * sphere_sdf(x, 0.45, (0.05, 0.0, -0.1))

    o, d, image = _image_rays(views=2, size=(32, 32))
    (start, _, inside), _ = cone_segments(steep, o, d, image)
    started_inside = inside & (steep(o + start[:, None] * d) < 0)
    assert started_inside.sum() > 20                   # the case is exercised
    plain = sphere_trace(steep, o, d, TracerSettings(), miss_min_sdf=False)
    images = sphere_trace_images(steep, o, d, image)
    assert torch.equal(images.hit, plain.hit) and plain.hit.sum() > 300
    # The retraced rays are traced exactly as sphere tracing alone traces them; the others converge elsewhere
    # within the threshold (|f| < 5e-5), as close to the surface as sphere tracing's own hits.
    assert torch.equal(images.t[started_inside], plain.t[started_inside])
    assert steep(images.points[images.hit]).abs().max() <= max(steep(plain.points[plain.hit]).abs().max(), 5e-5)
    assert torch.equal(images.in_sphere, plain.in_sphere)
    # With an exact SDF no ray starts inside, and the cones save evaluations (agreement: the first test).
    exact = sphere_trace_images(SHAPES["sphere"], o, d, image)
    alone = sphere_trace(SHAPES["sphere"], o, d, TracerSettings(), miss_min_sdf=False)
    assert exact.sdf_evals < 0.85 * alone.sdf_evals


def test_bad_input():
    o, d, _ = _image_rays(views=1, size=(8, 8))
    with pytest.raises(ValueError, match=r"image_shape: expected \(B, H, W\).*64 rays, got \(1, 8, 9\)"):
        cone_segments(SHAPES["sphere"], o, d, (1, 8, 9))
    with pytest.raises(ValueError, match="image_shape"):
        cone_segments(SHAPES["sphere"], o, d, (64,))
    with pytest.raises(ValueError, match="ConeSettings: tile must be min_tile times a power of two"):
        ConeSettings(tile=12, min_tile=4)
    with pytest.raises(ValueError, match="ConeSettings: stop_ratio"):
        ConeSettings(stop_ratio=0.5)
    with pytest.raises(ValueError, match="ConeSettings: step_scale"):
        ConeSettings(step_scale=0.0)
    with pytest.raises(ValueError, match="dirs: ray directions must have unit length"):
        cone_segments(SHAPES["sphere"], o, 2 * d, (1, 8, 8))
    with pytest.raises(ValueError, match="segments \\(t_far\\)"):
        cone_segments(SHAPES["sphere"], o, d, (1, 8, 8), segments=(o[:, 0], o[:5, 0], o[:, 0] > 0))


VULKAN_SCRIPT = r"""
from test_cone_tracing import SHAPES, _image_rays
from taichi_dr.implicit.cone_tracing import sphere_trace_images
out = {}
for name in ("sphere", "torus"):
    o, d, image = _image_rays(views=2, size=(24, 28), dtype=torch.float32)
    r = sphere_trace_images(SHAPES[name], o, d, image)
    out[name] = dict(t=r.t.tolist(), hit=r.hit.tolist())
"""


def test_vulkan_matches_cpu(tmp_path):
    """The image tracer (cones, then the tracer's kernels) finds the same hits on Vulkan as on the cpu backend
    (float32 there), on the rays clear of the silhouette."""
    vk = run_on_vulkan(tmp_path, VULKAN_SCRIPT)
    for name in ("sphere", "torus"):
        o, d, image = _image_rays(views=2, size=(24, 28), dtype=torch.float32)
        cpu = sphere_trace_images(SHAPES[name], o, d, image)
        hit_vk, t_vk = torch.tensor(vk[name]["hit"]), torch.tensor(vk[name]["t"])
        _, g = sdf_gradient(SHAPES[name], cpu.points.double())
        cos = ((g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)) * d.double()).sum(-1).abs()
        clear = ~cpu.hit | (cos > 0.1)
        assert clear.float().mean() > 0.95 and cpu.hit[clear].sum() > 200, name
        assert torch.equal(hit_vk[clear], cpu.hit[clear]), name
        both = clear & cpu.hit
        assert float((t_vk[both] - cpu.t[both]).abs().max()) < 1e-4, name
