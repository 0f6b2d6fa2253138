"""Rays (taichi_dr.core.rays) and the one projection (taichi_dr.core.camera.project_points): analytic cases,
agreement with the cameras and the sphere tracer that use them."""

import pytest
import torch

from taichi_dr.core.camera import Cameras, project_points
from taichi_dr.core.rays import intersect_sphere, pixel_centres, pixel_directions
from taichi_dr.implicit.analytic import sphere_sdf
from taichi_dr.implicit.sphere_tracing import sphere_trace

F64 = torch.float64


def test_intersect_sphere_analytic_cases():
    o = torch.tensor([[0.0, 0.0, -3.0],     # through the centre: enters at 2, leaves at 4
                      [0.0, 0.0, 0.0],      # from the centre: t_near = -1 behind, t_far = 1
                      [0.0, 0.0, 3.0],      # the sphere is behind the ray: not a hit
                      [0.0, 2.0, -3.0],     # the line misses: both at the closest approach, 3
                      [0.0, 0.6, -3.0]], dtype=F64)  # off-centre chord: half-length sqrt(1 - 0.36) = 0.8
    d = torch.tensor([[0.0, 0.0, 1.0]], dtype=F64).expand(5, 3)
    t_near, t_far, hit = intersect_sphere(o, d, 1.0)
    assert hit.tolist() == [True, True, False, False, True]
    assert torch.allclose(t_near, torch.tensor([2.0, -1.0, -4.0, 3.0, 2.2], dtype=F64), atol=1e-12)
    assert torch.allclose(t_far, torch.tensor([4.0, 1.0, -2.0, 3.0, 3.8], dtype=F64), atol=1e-12)
    # radius scales; leading dims are kept
    t_near, t_far, hit = intersect_sphere(o[:1, None] * 2, d[:1, None], 2.0)
    assert t_near.shape == (1, 1) and t_near.item() == pytest.approx(4.0) and t_far.item() == pytest.approx(8.0)


def test_intersect_sphere_gradients():
    o = torch.tensor([[0.1, 0.2, -3.0], [0.0, 2.0, -3.0]], dtype=F64, requires_grad=True)
    d = torch.nn.functional.normalize(torch.tensor([[0.05, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=F64), dim=-1)

    def f(o):
        t_near, t_far, _ = intersect_sphere(o, d, 1.0)
        return t_near, t_far

    assert torch.autograd.gradcheck(f, (o,))
    # tangent ray (discriminant exactly 0): finite gradients
    o_t = torch.tensor([[0.0, 1.0, -3.0]], dtype=F64, requires_grad=True)
    t_near, t_far, hit = intersect_sphere(o_t, torch.tensor([[0.0, 0.0, 1.0]], dtype=F64))
    (g,) = torch.autograd.grad((t_near + t_far).sum(), o_t)
    assert not hit.any() and torch.isfinite(g).all()


def test_tracer_starts_and_stops_at_the_bounding_sphere():
    """The tracer's rays run over intersect_sphere's [t_near, t_far]: an SDF that is never zero inside the
    sphere makes every ray step to its exit, and a ray that misses stays at its closest approach."""
    o = torch.tensor([[0.0, 0.0, -3.0], [0.0, 0.5, -3.0], [0.0, 2.0, -3.0]], dtype=F64)
    d = torch.tensor([[0.0, 0.0, 1.0]], dtype=F64).expand(3, 3).contiguous()
    res = sphere_trace(lambda x: sphere_sdf(x, 0.01, (5.0, 5.0, 5.0)), o, d, miss_min_sdf=False)
    t_near, t_far, hit = intersect_sphere(o, d)
    assert res.in_sphere.tolist() == hit.tolist() == [True, True, False] and not res.hit.any()
    assert res.t[2].item() == pytest.approx(3.0)


def test_pixel_centres_and_directions():
    uv = pixel_centres((2, 3), F64)
    assert uv.tolist() == [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5]]
    cams = Cameras.look_at([[0.3, -0.2, 4.0], [2.0, 1.0, -3.0]], fov=50, image_size=(6, 8)).to(dtype=F64)
    d = pixel_directions(cams.K, cams.R, uv)
    assert d.shape == (2, 6, 3) and torch.allclose(d.norm(dim=-1), torch.ones(2, 6, dtype=F64))
    # points along the rays project back onto their pixels
    p = cams.camera_centers()[:, None] + 2.5 * d
    assert torch.allclose(cams.project(p)[..., :2], uv.expand(2, -1, -1), atol=1e-10)


def test_one_projection_for_cameras_and_renderer():
    cams = Cameras.look_at([[0.3, -0.2, 4.0]], fov=50, image_size=(6, 8)).to(dtype=F64)
    K = cams.K.clone()
    K[:, 0, 1] = 0.3  # skew reaches u
    cams = Cameras(K, cams.R, cams.t, cams.image_size)
    xyz = torch.tensor([[[0.2, -0.1, 2.0], [1.0, 0.5, 0.05], [0.4, 0.3, -1.0], [0.1, 0.1, 0.0]]], dtype=F64)
    fx, s, cx, fy, cy = K[0, 0, 0], K[0, 0, 1], K[0, 0, 2], K[0, 1, 1], K[0, 1, 2]

    def pinhole(p, z):
        x, y = p[0] / z, p[1] / z
        return [fx * x + s * y + cx, fy * y + cy]

    # the renderer's form (near plane 0.1): points nearer than it are divided by 1, the rest by their depth
    got = project_points(xyz, K[:, None], 0.1)
    for i, p in enumerate(xyz[0]):
        z = p[2] if p[2] >= 0.1 else 1.0
        assert torch.allclose(got[0, i, :2], torch.stack(pinhole(p, z)), rtol=1e-14, atol=0)
        assert got[0, i, 2] == p[2]
    # the cameras' form: the same formula on camera-space points, each divided by its own depth (behind the
    # camera too), and |z| >= Z_EPS kept finite
    world = (xyz[0] - cams.t) @ torch.linalg.inv(cams.R[0]).T
    xc = cams.world_to_camera(world)[0]
    got = cams.project(world)
    assert torch.equal(got, project_points(xc[None], K[:, None]))
    for i in range(3):
        assert torch.allclose(got[0, i, :2], torch.stack(pinhole(xc[i], xc[i, 2])), rtol=1e-12, atol=0)
    assert torch.isfinite(got).all() and abs(got[0, 3, 0].item()) > 1e3   # at the camera centre: large, finite


def test_ray_segments_start_no_nearer_than_the_origin():
    from taichi_dr.core.rays import ray_segments

    o = torch.tensor([[0.0, 0.0, -3.0], [0.0, 0.0, 0.5], [0.0, 2.0, -3.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    d = torch.tensor([[0.0, 0.0, 1.0]] * 4, dtype=torch.float64)
    t_near, t_far, crosses = ray_segments(o, d, 1.0)
    assert crosses.tolist() == [True, True, False, False]
    assert t_near.tolist() == [2.0, 0.0, 3.0, 0.0]       # outside: the entry; inside: the camera itself
    assert t_far.tolist() == [4.0, 0.5, 3.0, 0.0]        # misses (and spheres behind): empty segments
