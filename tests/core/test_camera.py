"""Tests for taichi_dr.core.camera (projection, constructors, file formats) and the rotations and learnable camera
parameters of taichi_dr.core.transforms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation as SciRot

from taichi_dr.core.camera import (
    Cameras,
    intrinsics_from_fov,
    is_rotation,
    load_cameras,
    save_cameras_json,
)
from taichi_dr.core.transforms import (
    CameraParameters,
    axis_angle_to_matrix,
    matrix_to_axis_angle,
    matrix_to_quaternion,
    matrix_to_rotation_6d,
    quaternion_to_matrix,
    rotation_6d_to_matrix,
)

DTU = Path("/work/shared/data/dtu_scan24/cameras.npz")
f64 = torch.float64


def random_rotations(n, seed=0, dtype=f64):
    return torch.from_numpy(SciRot.random(n, random_state=seed).as_matrix()).to(dtype)


def random_cameras(n=3, seed=0, dtype=f64, image_size=(24, 32), mirrored=False):
    """Random cameras; ``mirrored``: every other one has fx < 0 (a left-right mirrored image)."""
    g = torch.Generator().manual_seed(seed)
    K = torch.zeros(n, 3, 3, dtype=dtype)
    K[:, 0, 0] = 30 + 20 * torch.rand(n, generator=g, dtype=dtype)
    if mirrored:
        K[::2, 0, 0] *= -1
    K[:, 1, 1] = 30 + 20 * torch.rand(n, generator=g, dtype=dtype)
    K[:, 0, 1] = torch.rand(n, generator=g, dtype=dtype) - 0.5  # skew
    K[:, 0, 2] = 16 + torch.rand(n, generator=g, dtype=dtype)
    K[:, 1, 2] = 12 + torch.rand(n, generator=g, dtype=dtype)
    K[:, 2, 2] = 1
    t = torch.randn(n, 3, generator=g, dtype=dtype)
    return Cameras(K, random_rotations(n, seed, dtype), t, image_size)


# ---------------------------------------------------------------------------------------------------------
# projection
# ---------------------------------------------------------------------------------------------------------

def test_project_known_points():
    K = torch.tensor([[100.0, 0, 32], [0, 120, 24], [0, 0, 1]])
    R0 = torch.eye(3)
    Rz = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])  # 90 degrees about z
    cams = Cameras(K, torch.stack([R0, Rz]), torch.tensor([[0.0, 0, 2], [0, 0, 1]]), (48, 64))
    pts = torch.tensor([[1.0, -0.5, 2.0], [1.0, 0.0, 3.0]])
    out = cams.project(pts)
    assert out.shape == (2, 2, 3)
    # camera 0: x_c = (1, -0.5, 4) -> u = 100 * 0.25 + 32, v = 120 * -0.125 + 24; (1, 0, 5) -> (52, 24)
    torch.testing.assert_close(out[0], torch.tensor([[57.0, 9.0, 4.0], [52.0, 24.0, 5.0]]))
    # camera 1: x_c = (0.5, 1, 3) -> (100 / 6 + 32, 40 + 24); (0, 1, 4) -> (32, 54)
    torch.testing.assert_close(out[1], torch.tensor([[100 / 6 + 32, 64.0, 3.0], [32.0, 54.0, 4.0]]))
    # batched points give the same as shared ones
    torch.testing.assert_close(cams.project(pts.expand(2, -1, -1)), out)
    torch.testing.assert_close(cams.world_to_camera(pts)[1], torch.tensor([[0.5, 1.0, 3.0], [0.0, 1.0, 4.0]]))


def test_project_at_camera_centre_is_finite():
    cams = random_cameras(2)
    pts = cams.camera_centers()[:, None, :].clone().requires_grad_(True)  # z == 0 exactly
    out = cams.project(pts)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(pts.grad).all()
    torch.testing.assert_close(out[..., 2], torch.zeros(2, 1, dtype=f64), atol=1e-12, rtol=0)


def test_camera_centers():
    cams = random_cameras(4)
    C = cams.camera_centers()
    torch.testing.assert_close(cams.world_to_camera(C[:, None])[:, 0], torch.zeros(4, 3, dtype=f64))


@pytest.mark.parametrize("mirrored", [False, True])
def test_pixel_rays_pass_through_points(mirrored):
    cams = random_cameras(3, mirrored=mirrored)
    assert cams.mirrored.tolist() == ([True, False, True] if mirrored else [False] * 3)
    g = torch.Generator().manual_seed(1)
    pts = cams.camera_centers()[:, None] + torch.randn(3, 5, 3, generator=g, dtype=f64)
    uvz = cams.project(pts)
    o, d = cams.pixel_rays(uvz[..., :2])
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(3, 5, dtype=f64))
    # the point is on the line o + s d, on the side of the camera where its depth is positive
    s = ((pts - o) * d).sum(-1)
    torch.testing.assert_close(o + s[..., None] * d, pts)
    assert ((s > 0) == (uvz[..., 2] > 0)).all()


@pytest.mark.parametrize("mirrored", [False, True])
def test_image_rays_reproject_onto_their_pixel(mirrored):
    cams = random_cameras(2, image_size=(5, 7), mirrored=mirrored)
    o, d = cams.image_rays()
    assert o.shape == d.shape == (2, 5, 7, 3)
    pts = (o + 2.5 * d).reshape(2, -1, 3)
    uv = cams.project(pts)[..., :2].reshape(2, 5, 7, 2)
    i, j = 3, 6
    torch.testing.assert_close(uv[:, i, j], torch.tensor([[j + 0.5, i + 0.5]] * 2, dtype=f64))
    jj, ii = torch.meshgrid(torch.arange(7, dtype=f64) + 0.5, torch.arange(5, dtype=f64) + 0.5, indexing="xy")
    torch.testing.assert_close(uv, torch.stack([jj, ii], -1).expand(2, -1, -1, -1))


# ---------------------------------------------------------------------------------------------------------
# constructors
# ---------------------------------------------------------------------------------------------------------

def test_intrinsics_from_fov():
    K = intrinsics_from_fov(90.0, (30, 40))
    torch.testing.assert_close(K, torch.tensor([[20.0, 0, 20], [0, 20, 15], [0, 0, 1]]))
    with pytest.raises(ValueError, match="fov"):
        intrinsics_from_fov(180.0, (30, 40))


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_from_projection_round_trip(dtype):
    cams = random_cameras(5, seed=3, dtype=f64)
    P = cams.K @ torch.cat([cams.R, cams.t[..., None]], -1)
    scale = torch.tensor([1.0, -2.0, 0.01, -300.0, 7.0], dtype=f64)  # any scale, negative included
    got = Cameras.from_projection((P * scale[:, None, None]).to(dtype), cams.image_size)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-9)
    assert got.dtype == dtype
    torch.testing.assert_close(got.K, cams.K.to(dtype), **tol)
    torch.testing.assert_close(got.R, cams.R.to(dtype), **tol)
    torch.testing.assert_close(got.t, cams.t.to(dtype), **tol)
    assert (got.K[:, 2, 2] == 1).all() and (torch.linalg.det(got.R) > 0).all()
    # unbatched input
    one = Cameras.from_projection(P[1].numpy(), cams.image_size)
    torch.testing.assert_close(one.R[0], cams.R[1])
    with pytest.raises(ValueError, match="singular"):
        Cameras.from_projection(torch.zeros(3, 4), (4, 4))


def test_from_projection_is_differentiable():
    cams = random_cameras(1, seed=5)
    P = (cams.K @ torch.cat([cams.R, cams.t[..., None]], -1)).requires_grad_(True)
    fn = lambda P: tuple(getattr(Cameras.from_projection(P, (24, 32)), k) for k in "KRt")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (P,))


def test_look_at():
    eyes = torch.tensor([[0.0, 0, 5], [3, 2, -1], [-1, 4, 0.5], [2, -3, 1]], dtype=f64)
    at = torch.tensor([0.2, 0.1, -0.3], dtype=f64)
    cams = Cameras.look_at(eyes, at=at, fov=40, image_size=(30, 50))
    assert is_rotation(cams.R, atol=1e-10)
    torch.testing.assert_close(cams.camera_centers(), eyes)
    p = cams.project(torch.stack([at, at + torch.tensor([0, 0.1, 0], dtype=f64)]))
    torch.testing.assert_close(p[:, 0, :2], torch.tensor([[25.0, 15.0]] * 4, dtype=f64))
    assert (p[:, 1, 1] < p[:, 0, 1]).all()  # world up is up in the image
    # a camera at +z looking at the origin sees world +x on the right (a proper rotation, not a mirror)
    c = Cameras.look_at((0.0, 0.0, 5.0))
    assert c.project(torch.tensor([[1.0, 0, 0]]))[0, 0, 0] > 128
    with pytest.raises(ValueError, match="parallel"):
        Cameras.look_at((0.0, 3.0, 0.0))
    with pytest.raises(ValueError, match="coincide"):
        Cameras.look_at((0.0, 0.0, 0.0))


@pytest.mark.parametrize("convention", ["softras", "opencv"])
def test_from_spherical_conventions(convention):
    """Both conventions: SoftRas's eye, world up up in the image, the origin at the image centre. "opencv" is
    the proper look_at camera; "softras" (the default) the same camera with its image mirrored left-right
    (fx < 0), which is what SoftRas renders (pixel-level agreement: tests/raster/test_softras_camera.py)."""
    dist = torch.tensor([2.732, 3.0, 2.0, 4.0], dtype=f64)
    elev = torch.tensor([30.0, -15.0, 0.0, 89.0], dtype=f64)
    azim = torch.tensor([0.0, 45.0, 200.0, -90.0], dtype=f64)
    cams = Cameras.from_spherical(dist, elev, azim, fov=30, image_size=(32, 48), convention=convention)
    e, a = torch.deg2rad(elev), torch.deg2rad(azim)
    eye = dist[:, None] * torch.stack([e.cos() * a.sin(), e.sin(), -e.cos() * a.cos()], -1)
    torch.testing.assert_close(cams.camera_centers(), eye)
    p = cams.project(torch.tensor([[0.0, 0, 0], [0, 0.05, 0]], dtype=f64))
    centre = torch.stack([torch.full_like(dist, 24), torch.full_like(dist, 16), dist], -1)
    torch.testing.assert_close(p[:, 0], centre)
    assert (p[:, 1, 1] < p[:, 0, 1]).all()
    assert is_rotation(cams.R, atol=1e-10)
    assert cams.mirrored.tolist() == [convention == "softras"] * 4
    # the rotation is look_at's with world y up; only K's fx sign differs between the conventions
    ref = Cameras.look_at(eye, fov=30, image_size=(32, 48))
    torch.testing.assert_close(cams.R, ref.R)
    torch.testing.assert_close(cams.t, ref.t)
    K = ref.K.clone()
    if convention == "softras":
        K[:, 0, 0] *= -1
    torch.testing.assert_close(cams.K, K)
    # so any point lands on the column mirrored about W/2, same row and depth
    g = torch.Generator().manual_seed(0)
    pts = 0.5 * torch.randn(6, 3, generator=g, dtype=f64)
    mine, proper = cams.project(pts), ref.project(pts)
    if convention == "softras":
        proper = proper * torch.tensor([-1.0, 1, 1], dtype=f64) + torch.tensor([48.0, 0, 0], dtype=f64)
    torch.testing.assert_close(mine, proper)
    # scalars broadcast; straight above is still a valid camera
    top = Cameras.from_spherical(2.0, 90.0, [0.0, 90.0], 30, (8, 8), convention=convention)
    assert len(top) == 2 and is_rotation(top.R)
    torch.testing.assert_close(top.camera_centers(), torch.tensor([[0.0, 2, 0]] * 2), atol=1e-6, rtol=0)


def test_from_spherical_default_and_bad_convention():
    default = Cameras.from_spherical(3.0, 20.0, 40.0)
    softras = Cameras.from_spherical(3.0, 20.0, 40.0, convention="softras")
    assert torch.equal(default.K, softras.K) and bool(default.mirrored.all())
    with pytest.raises(ValueError, match=r"convention must be one of \('softras', 'opencv'\), got 'OpenGL'"):
        Cameras.from_spherical(3.0, 20.0, 40.0, convention="OpenGL")


def test_from_spherical_gradients():
    d = torch.tensor([3.0], dtype=f64, requires_grad=True)
    e = torch.tensor([20.0], dtype=f64, requires_grad=True)
    a = torch.tensor([30.0], dtype=f64, requires_grad=True)
    fn = lambda d, e, a: Cameras.from_spherical(d, e, a, 30, (16, 16)).project(  # noqa: E731
        torch.tensor([[0.3, 0.2, -0.1]], dtype=f64))
    assert torch.autograd.gradcheck(fn, (d, e, a))


def test_from_opengl_c2w():
    # OpenGL camera at (0, 0, 5) with identity rotation looks down -z at the origin, y up.
    c2w = torch.eye(4)
    c2w[2, 3] = 5
    cams = Cameras.from_opengl_c2w(c2w, (20, 30), fov=60)
    torch.testing.assert_close(cams.R[0], torch.diag(torch.tensor([1.0, -1, -1])))
    torch.testing.assert_close(cams.t[0], torch.tensor([0.0, 0, 5]))
    p = cams.project(torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]))[0]
    torch.testing.assert_close(p[0], torch.tensor([15.0, 10.0, 5.0]))
    assert p[1, 0] > 15 and p[2, 1] < 10
    # general poses: an OpenCV camera written as an OpenGL c2w comes back unchanged (3x4 and 4x4)
    ref = random_cameras(3)
    gl = torch.cat([ref.R.transpose(1, 2) * torch.tensor([1.0, -1, -1], dtype=f64),
                    ref.camera_centers()[..., None]], -1)
    for m in (gl, torch.cat([gl, torch.tensor([[[0.0, 0, 0, 1]]], dtype=f64).expand(3, -1, -1)], 1)):
        got = Cameras.from_opengl_c2w(m, ref.image_size, K=ref.K)
        torch.testing.assert_close(got.R, ref.R)
        torch.testing.assert_close(got.t, ref.t)
    with pytest.raises(ValueError, match="exactly one"):
        Cameras.from_opengl_c2w(c2w, (20, 30))
    with pytest.raises(ValueError, match="not a rotation"):
        Cameras.from_opengl_c2w(torch.diag(torch.tensor([1.0, 1, -1, 1])), (20, 30), fov=60)


# ---------------------------------------------------------------------------------------------------------
# Cameras container and validation
# ---------------------------------------------------------------------------------------------------------

def test_indexing_and_to():
    cams = random_cameras(4)
    assert len(cams) == 4
    for idx, want in ((2, [2]), (-1, [3]), (slice(1, 3), [1, 2]), ([3, 0], [3, 0]),
                      (torch.tensor([0, 2]), [0, 2]), (torch.tensor([True, False, False, True]), [0, 3])):
        sub = cams[idx]
        torch.testing.assert_close(sub.R, cams.R[want])
        torch.testing.assert_close(sub.t, cams.t[want])
    with pytest.raises(IndexError):
        cams[4]
    c32 = cams.to(dtype=torch.float32)
    assert c32.dtype == torch.float32 and c32.image_size == cams.image_size and c32.device.type == "cpu"


def test_unbatched_and_broadcast_inputs():
    K = intrinsics_from_fov(60, (8, 8))
    cams = Cameras(K, torch.eye(3), torch.zeros(3), (8, 8))
    assert len(cams) == 1 and cams.K.shape == (1, 3, 3)
    shared_K = Cameras(K, random_rotations(3, dtype=torch.float32), torch.zeros(3, 3), [8, 8])
    assert len(shared_K) == 3 and shared_K.image_size == (8, 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(K=torch.eye(3)[None].expand(2, 3, 3) * 2), r"K\[0\].*K\[2, 2\] == 1"),
    (dict(R=torch.diag(torch.tensor([1.0, 1, -1]))), r"R\[0\] is not a rotation"),
    (dict(R=torch.eye(3) * 1.1), "not a rotation"),
    (dict(t=torch.tensor([0.0, float("nan"), 0])), "NaN"),
    (dict(t=torch.zeros(4)), r"t: expected shape \(3\)"),
    (dict(R=torch.eye(3).expand(2, 3, 3), t=torch.zeros(3, 3)), "batch sizes"),
    (dict(K=torch.tensor([[10.0, 0, 4], [0, -10, 4], [0, 0, 1]])), "fy > 0"),  # mirrors are spelled fx < 0
    (dict(K=torch.tensor([[-10.0, 0, 4], [0, -10, 4], [0, 0, 1]])), "fy > 0"),
    (dict(K=torch.tensor([[0.0, 0, 4], [0, 10, 4], [0, 0, 1]])), "fx != 0"),
    (dict(image_size=(8, 0)), "image_size"),
])
def test_validation_errors(kwargs, match):
    args = dict(K=torch.tensor([[10.0, 0, 4], [0, 10, 4], [0, 0, 1]]), R=torch.eye(3), t=torch.zeros(3),
                image_size=(8, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Cameras(**args)


def test_dtype_and_device_errors():
    with pytest.raises(TypeError, match="one dtype"):
        Cameras(torch.eye(3), torch.eye(3, dtype=f64), torch.zeros(3), (8, 8))
    cams = random_cameras(2)
    with pytest.raises(TypeError, match="dtype"):
        cams.project(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"points: expected shape"):
        cams.project(torch.zeros(3, 4, 3, dtype=f64))


# ---------------------------------------------------------------------------------------------------------
# rotations
# ---------------------------------------------------------------------------------------------------------

def test_axis_angle_matches_scipy_and_round_trips():
    g = torch.Generator().manual_seed(0)
    axes = torch.nn.functional.normalize(torch.randn(50, 3, generator=g, dtype=f64), dim=-1)
    angles = torch.cat([torch.rand(46, generator=g, dtype=f64) * 3.1, torch.tensor([0.0, 1e-4, 5e-3, 3.14159],
                                                                                    dtype=f64)])
    v = axes * angles[:, None]
    R = axis_angle_to_matrix(v)
    torch.testing.assert_close(R, torch.from_numpy(SciRot.from_rotvec(v.numpy()).as_matrix()))
    torch.testing.assert_close(matrix_to_axis_angle(R), v)
    # float32 too
    torch.testing.assert_close(matrix_to_axis_angle(axis_angle_to_matrix(v.float())), v.float(),
                               atol=1e-5, rtol=1e-4)


def test_axis_angle_at_180_degrees():
    for axis in torch.eye(3, dtype=f64).unbind(0):
        R = axis_angle_to_matrix(math.pi * axis)
        v = matrix_to_axis_angle(R)
        torch.testing.assert_close(v.norm(), torch.tensor(math.pi, dtype=f64))
        torch.testing.assert_close(axis_angle_to_matrix(v), R)
    R = axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi], dtype=f64)).requires_grad_(True)
    matrix_to_axis_angle(R).sum().backward()
    assert torch.isfinite(R.grad).all()


def test_axis_angle_gradcheck():
    v = torch.tensor([0.3, -1.2, 0.7], dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(axis_angle_to_matrix, (v,))
    # just inside the Taylor branch (|v|^2 < 1e-4) and both directions of the round trip
    small = torch.tensor([4e-3, -5e-3, 6e-3], dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(axis_angle_to_matrix, (small,))
    assert torch.autograd.gradcheck(lambda v: matrix_to_axis_angle(axis_angle_to_matrix(v)), (v,))
    assert torch.autograd.gradcheck(lambda v: matrix_to_axis_angle(axis_angle_to_matrix(v)), (small,))


def _rodrigues_closed_form(v):
    th = v.norm()
    k = torch.stack([torch.zeros((), dtype=v.dtype), -v[2], v[1], v[2], 0 * th, -v[0], -v[1], v[0], 0 * th])
    k = k.reshape(3, 3) / th
    return torch.eye(3, dtype=v.dtype) + torch.sin(th) * k + (1 - torch.cos(th)) * (k @ k)


def test_axis_angle_taylor_branch_matches_closed_form():
    # |v|^2 = 0.9e-4, inside the Taylor branch, where the closed form is still accurate in float64
    v = torch.tensor([0.6, -0.48, 0.64], dtype=f64) * 0.9e-2  # unit axis
    assert 0.5e-4 < float((v * v).sum()) < 1e-4
    torch.testing.assert_close(axis_angle_to_matrix(v), _rodrigues_closed_form(v), atol=1e-13, rtol=0)
    jac = torch.autograd.functional.jacobian(axis_angle_to_matrix, v)
    ref = torch.autograd.functional.jacobian(_rodrigues_closed_form, v)
    torch.testing.assert_close(jac, ref, atol=1e-10, rtol=0)


def test_axis_angle_gradient_at_zero():
    zero = torch.zeros(3, dtype=f64)
    jac = torch.autograd.functional.jacobian(axis_angle_to_matrix, zero)  # (3, 3, 3): dR_ab / dv_i
    # dR/dv_i at 0 is the cross-product matrix of e_i.
    e = torch.eye(3, dtype=f64)
    skew = torch.stack([torch.linalg.cross(e[i].expand(3, 3), e, dim=-1).T for i in range(3)], -1)
    torch.testing.assert_close(jac, skew)
    assert torch.equal(axis_angle_to_matrix(zero), e)
    # the inverse is the identity map near 0: Jacobian of log(exp(v)) at v = 0 is I
    jac2 = torch.autograd.functional.jacobian(lambda v: matrix_to_axis_angle(axis_angle_to_matrix(v)), zero)
    torch.testing.assert_close(jac2, e)


def test_quaternions_round_trip():
    R = random_rotations(64, seed=2)
    q = matrix_to_quaternion(R)
    assert (q[:, 0] >= 0).all()
    xyzw = SciRot.from_matrix(R.numpy()).as_quat()
    ref = torch.from_numpy(np.concatenate([xyzw[:, 3:], xyzw[:, :3]], 1))
    ref = ref * torch.where(ref[:, :1] < 0, -1.0, 1.0).to(f64)
    torch.testing.assert_close(q, ref)
    torch.testing.assert_close(quaternion_to_matrix(q), R)
    torch.testing.assert_close(quaternion_to_matrix(3 * q), R)  # unnormalised input
    assert torch.autograd.gradcheck(matrix_to_quaternion, (R[:4].clone().requires_grad_(True),))


def test_6d_round_trip_and_gradcheck():
    R = random_rotations(16, seed=4)
    torch.testing.assert_close(rotation_6d_to_matrix(matrix_to_rotation_6d(R)), R)
    x = torch.randn(5, 6, dtype=f64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert is_rotation(rotation_6d_to_matrix(x), atol=1e-10)
    assert torch.autograd.gradcheck(rotation_6d_to_matrix, (x,))


def test_is_rotation():
    assert is_rotation(random_rotations(3))
    assert not is_rotation(torch.diag(torch.tensor([1.0, 1, -1])))
    assert not is_rotation(torch.eye(3) * 1.01)
    assert not is_rotation(torch.full((3, 3), float("nan")))


# ---------------------------------------------------------------------------------------------------------
# CameraParameters
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rotation", ["axis_angle", "6d"])
@pytest.mark.parametrize("shared_focal", [True, False])
def test_camera_parameters(rotation, shared_focal):
    cams = random_cameras(3, mirrored=shared_focal)  # mirrored cameras learn the same way
    params = CameraParameters(cams, rotation=rotation, learn_focal=True, shared_focal=shared_focal)
    init = params()
    for k in "KRt":
        assert torch.equal(getattr(init, k), getattr(cams, k))
    assert params.log_focal_scale.shape == ((1,) if shared_focal else (3,))
    g = torch.Generator().manual_seed(0)
    pts = cams.camera_centers().mean(0) + torch.randn(10, 3, generator=g, dtype=f64)
    target = cams.project(pts) + 0.5
    loss = ((params().project(pts) - target) ** 2).sum()
    loss.backward()
    names = {n for n, _ in params.named_parameters()}
    assert names == {"rot", "dt", "log_focal_scale"}
    for n, p in params.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_camera_parameters_updates():
    cams = random_cameras(2)
    params = CameraParameters(cams)
    assert params.log_focal_scale is None and {n for n, _ in params.named_parameters()} == {"rot", "dt"}
    params = CameraParameters(cams, learn_focal=True)
    with torch.no_grad():
        params.log_focal_scale.fill_(math.log(2.0))
        params.rot[0] = torch.tensor([0.0, 0.0, 0.5])
        params.dt[1] = torch.tensor([1.0, 2.0, 3.0])
    out = params()
    torch.testing.assert_close(out.K[:, :2, :2], 2 * cams.K[:, :2, :2])
    torch.testing.assert_close(out.K[:, :, 2], cams.K[:, :, 2])  # principal point unchanged
    R_delta = axis_angle_to_matrix(torch.tensor([0, 0, 0.5], dtype=f64))
    torch.testing.assert_close(out.R[0], R_delta @ cams.R[0])
    torch.testing.assert_close(out.t[1], cams.t[1] + torch.tensor([1.0, 2.0, 3.0], dtype=f64))
    with pytest.raises(ValueError, match="rotation"):
        CameraParameters(cams, rotation="euler")


# ---------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------

def test_load_spherical_npy_and_csv(tmp_path):
    rows = np.array([[2.732, 30.0, 0.0], [2.732, 30.0, 15.0], [3.0, -10.0, 270.0]])
    np.save(tmp_path / "views.npy", rows)
    (tmp_path / "views.csv").write_text("distance,elevation,azimuth\n"
                                        + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    for name in ("views.npy", "views.csv"):
        for convention in (None, "softras", "opencv"):  # SoftRas's (mirrored) cameras unless told otherwise
            ref = Cameras.from_spherical(rows[:, 0], rows[:, 1], rows[:, 2], 30, (16, 16),
                                         convention=convention or "softras")
            kw = {} if convention is None else dict(convention=convention)
            cams = load_cameras(tmp_path / name, image_size=(16, 16), fov=30, **kw)
            assert cams.dtype == torch.float32 and len(cams) == 3
            assert cams.mirrored.tolist() == [convention != "opencv"] * 3
            for k in "KRt":
                torch.testing.assert_close(getattr(cams, k), getattr(ref, k).float())
        with pytest.raises(ValueError, match=rf"{name}.*fov"):
            load_cameras(tmp_path / name, image_size=(16, 16))
        with pytest.raises(ValueError, match=r"convention must be one of .*got 'left'"):
            load_cameras(tmp_path / name, image_size=(16, 16), fov=30, convention="left")
    np.save(tmp_path / "bad.npy", np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"bad\.npy.*\(3, 4\)"):
        load_cameras(tmp_path / "bad.npy", image_size=(16, 16), fov=30)
    (tmp_path / "bad.csv").write_text("d,e,a\n2,30,0\n2,30\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 3: expected 3 columns"):
        load_cameras(tmp_path / "bad.csv", image_size=(16, 16), fov=30)
    (tmp_path / "bad2.csv").write_text("2,30,0\n2,x,0\n")
    with pytest.raises(ValueError, match=r"bad2\.csv: line 2"):
        load_cameras(tmp_path / "bad2.csv", image_size=(16, 16), fov=30)


def _write_idr(path, cams, scale_mats=None, skip=()):
    arrays = {}
    for i in range(len(cams)):
        P = np.eye(4)
        P[:3] = (cams.K[i] @ torch.cat([cams.R[i], cams.t[i, :, None]], -1)).numpy() * (i + 1.5)
        if scale_mats is not None:
            arrays[f"scale_mat_{i}"] = scale_mats[i]
            P = P @ np.linalg.inv(scale_mats[i])  # so that world_mat @ scale_mat is the normalised P
        arrays[f"world_mat_{i}"] = P
    for k in skip:
        arrays.pop(k)
    np.savez(path, **arrays)


def test_load_idr_npz(tmp_path):
    cams = random_cameras(3, seed=7)
    S = [np.diag([s, s, s, 1.0]) for s in (2.0, 3.0, 0.5)]
    for s, c in zip(S, ([1, 2, 3], [0, 0, 1], [-1, 0, 0]), strict=True):
        s[:3, 3] = c
    _write_idr(tmp_path / "cameras.npz", cams, S)
    got = load_cameras(tmp_path / "cameras.npz", image_size=cams.image_size, dtype=f64)
    for k in "KRt":
        torch.testing.assert_close(getattr(got, k), getattr(cams, k))
    _write_idr(tmp_path / "plain.npz", cams)  # no scale_mat: world_mat is the projection
    torch.testing.assert_close(load_cameras(tmp_path / "plain.npz", (24, 32), dtype=f64).R, cams.R)
    _write_idr(tmp_path / "gap.npz", cams, S, skip=["world_mat_1"])
    with pytest.raises(ValueError, match=r"gap\.npz: missing key 'world_mat_1'"):
        load_cameras(tmp_path / "gap.npz", image_size=(24, 32))
    _write_idr(tmp_path / "noscale.npz", cams, S, skip=["scale_mat_2"])
    with pytest.raises(ValueError, match=r"noscale\.npz: missing key 'scale_mat_2'"):
        load_cameras(tmp_path / "noscale.npz", image_size=(24, 32))
    np.savez(tmp_path / "other.npz", K=np.eye(3))
    with pytest.raises(ValueError, match=r"other\.npz: no 'world_mat_<i>'"):
        load_cameras(tmp_path / "other.npz", image_size=(24, 32))
    with pytest.raises(ValueError, match=r"cameras\.npz.*image_size"):
        load_cameras(tmp_path / "cameras.npz")


def test_json_round_trip_and_errors(tmp_path):
    cams = random_cameras(3, seed=9, mirrored=True)  # mirrored cameras (fx < 0) round-trip too
    save_cameras_json(cams, tmp_path / "cams.json")
    got = load_cameras(tmp_path / "cams.json", dtype=f64)
    assert got.image_size == cams.image_size
    for k in "KRt":
        assert torch.equal(getattr(got, k), getattr(cams, k))  # float64 text round-trips exactly
    # a bare list needs image_size from the caller
    doc = json.loads((tmp_path / "cams.json").read_text())
    (tmp_path / "list.json").write_text(json.dumps(doc["cameras"]))
    assert len(load_cameras(tmp_path / "list.json", image_size=(24, 32))) == 3
    with pytest.raises(ValueError, match=r"list\.json.*image_size"):
        load_cameras(tmp_path / "list.json")
    doc["cameras"][1]["R"] = [[1, 0, 0], [0, 1, 0], [0, 0, -1]]
    (tmp_path / "reflect.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"reflect\.json: .*R\[1\] is not a rotation"):
        load_cameras(tmp_path / "reflect.json")
    del doc["cameras"][2]["t"]
    (tmp_path / "missing.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"missing\.json: camera 2: missing key 't'"):
        load_cameras(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: invalid JSON"):
        load_cameras(tmp_path / "broken.json")
    with pytest.raises(ValueError, match=r"cams\.json: image_size argument"):
        load_cameras(tmp_path / "cams.json", image_size=(10, 10))


def test_load_errors_for_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_cameras(tmp_path / "nope.json")
    (tmp_path / "cams.txt").write_text("1 2 3\n")
    with pytest.raises(ValueError, match=r"cams\.txt: unknown camera file extension"):
        load_cameras(tmp_path / "cams.txt")


@pytest.mark.skipif(not DTU.is_file(), reason="DTU scan24 cameras not available")
def test_dtu_idr_cameras():
    cams = load_cameras(DTU, image_size=(300, 400), dtype=f64)
    assert len(cams) == 49 and cams.image_size == (300, 400)
    # the decomposition reproduces the normalised projections up to scale
    data = np.load(DTU)
    P = data["world_mat_5"] @ data["scale_mat_5"]
    P_ours = (cams.K[5] @ torch.cat([cams.R[5], cams.t[5, :, None]], -1)).numpy()
    np.testing.assert_allclose(P_ours / P_ours[2, 3], P[:3] / P[2, 3], rtol=1e-9, atol=1e-9)
    # every camera is outside the unit sphere and sees all of it in front, near the image centre
    C = cams.camera_centers()
    assert (C.norm(dim=-1) > 1.5).all()
    centre = cams.project(torch.zeros(1, 3, dtype=f64))[:, 0]
    assert (centre[:, 2] > 1.5).all()  # the whole unit sphere has positive depth
    assert ((centre[:, 0] > 50) & (centre[:, 0] < 350) & (centre[:, 1] > 50) & (centre[:, 1] < 250)).all()
    cos = (cams.R[:, 2] * -C).sum(-1) / C.norm(dim=-1)
    assert (cos > math.cos(math.radians(20))).all()
