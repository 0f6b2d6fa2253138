"""6-DoF pose refinement (taichi_dr.pipelines.pose): poses and their files, the learnable parameterisation, gradients
of the pose loss against finite differences, recovery of a known perturbation, pixel-gradient and
displacement fields, and bad inputs. Small images (24-64 px) and few iterations throughout."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from app_helpers import signal_at

from taichi_dr.core.camera import Cameras, intrinsics_from_fov
from taichi_dr.core.mesh import Mesh, asset_path, icosphere, load_mesh
from taichi_dr.core.transforms import axis_angle_to_matrix
from taichi_dr.pipelines.engine import NonFiniteError
from taichi_dr.pipelines.pose import (
    DisplacementField,
    PixelGradientField,
    Pose,
    PoseParameters,
    PoseSettings,
    PoseTarget,
    Stage,
    composite,
    distance_transform_loss,
    draw_overlay,
    load_pose,
    matched_mask,
    refine_pose,
    reprojection_flow,
    rgb_loss,
    rotation_error_deg,
    save_pose,
    signed_distance,
    silhouette_iou_loss,
    silhouette_mse_loss,
    surface_points,
    translation_error,
)
from taichi_dr.raster.renderer import render_mesh
from taichi_dr.raster.settings import RasterSettings


def _blob(dtype=torch.float32, level: int = 2) -> Mesh:
    """An asymmetric closed blob (a squashed, bumped icosphere with per-vertex colours): no rotational
    symmetry, so every pose parameter changes its image."""
    m = icosphere(level, dtype=dtype)
    v = m.verts
    v = v * torch.tensor([1.0, 0.7, 0.5], dtype=dtype) + 0.25 * v[:, :1].clamp_min(0) ** 2 \
        + torch.tensor([0.1, -0.05, 0.0], dtype=dtype)
    colors = 0.5 + 0.5 * torch.sin(3.0 * m.verts + torch.tensor([0.0, 1.0, 2.0], dtype=dtype))
    return Mesh(v.contiguous(), m.faces, vert_colors=colors.to(dtype).clamp(0, 1), name="blob").validate()


def _camera(size: int, dtype=torch.float32) -> Cameras:
    """Identity extrinsics: poses are object -> camera."""
    K = intrinsics_from_fov(30.0, (size, size), dtype)
    return Cameras(K, torch.eye(3, dtype=dtype), torch.zeros(3, dtype=dtype), (size, size))


def _pose(aa=(0.3, -0.5, 0.2), t=(0.05, -0.02, 4.0), dtype=torch.float32) -> Pose:
    return Pose(axis_angle_to_matrix(torch.tensor(aa, dtype=dtype)), torch.tensor(t, dtype=dtype))


def _render(mesh, camera, pose, sigma=1e-4, mode="soft", outputs=()):
    cam = Cameras(camera.K, pose.R[None], pose.t[None], camera.image_size)
    with torch.no_grad():
        return render_mesh(mesh, cam, None, RasterSettings(sigma=sigma, mode=mode), outputs=outputs)


def _perturbed(true: Pose, pivot, aa, dt) -> Pose:
    """Rotate by ``aa`` about the object's centre ``pivot`` and translate by ``dt``, camera axes."""
    D = axis_angle_to_matrix(torch.tensor(aa, dtype=true.R.dtype))
    c = true.R @ pivot
    return Pose(D @ true.R, true.t + c - D @ c + torch.tensor(dt, dtype=true.t.dtype))


def _pivot(mesh):
    return 0.5 * (mesh.verts.amin(0) + mesh.verts.amax(0))


# ----------------------------------------------------------------------------------------------------------
# Poses and files


def test_pose_conversions_and_errors():
    p = _pose(dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    inv = p.camera_to_object()
    assert torch.allclose(inv.apply(p.apply(x)), x, atol=1e-12)
    assert torch.allclose(Pose.from_camera_to_object(inv.R, inv.t).matrix(), p.matrix(), atol=1e-12)
    assert torch.allclose(Pose.from_matrix(p.matrix()).t, p.t)
    assert torch.allclose(Pose.from_matrix(p.matrix()[:3]).R, p.R)
    q = _pose((0.0, 0.2, 0.0), (1.0, 0.0, 0.0), torch.float64)
    assert torch.allclose(p.compose(q).apply(x), p.apply(q.apply(x)), atol=1e-12)
    # A rotation of 7 degrees about any axis, and a translation of known length.
    r = Pose(axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.radians(7.0)], dtype=torch.float64)) @ p.R, p.t)
    assert rotation_error_deg(r, p) == pytest.approx(7.0, abs=1e-9)
    assert rotation_error_deg(p, p) == pytest.approx(0.0, abs=1e-6)
    assert translation_error(Pose(p.R, p.t + torch.tensor([0.3, 0.4, 0.0], dtype=torch.float64)), p,
                             relative_to=2.0) == pytest.approx(0.25)


def test_pose_json_round_trip(tmp_path):
    p = _pose(dtype=torch.float64)
    save_pose(p, tmp_path / "p.json", note="x")
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["note"] == "x" and doc["convention"] == "object_to_camera"
    back = load_pose(tmp_path / "p.json")
    assert torch.allclose(back.matrix(), p.matrix(), atol=1e-12)
    # The camera-to-object convention and the 4x4 matrix form read the same pose.
    inv = p.inverse()
    (tmp_path / "c2o.json").write_text(json.dumps({"convention": "camera_to_object", "R": inv.R.tolist(),
                                                   "t": inv.t.tolist()}))
    assert torch.allclose(load_pose(tmp_path / "c2o.json").matrix(), p.matrix(), atol=1e-12)
    (tmp_path / "m.json").write_text(json.dumps({"matrix": p.matrix().tolist()}))
    assert torch.allclose(load_pose(tmp_path / "m.json").matrix(), p.matrix(), atol=1e-12)


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not a valid JSON"),
    ('{"R": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}', "expected keys"),
    ('{"R": [[2, 0, 0], [0, 1, 0], [0, 0, 1]], "t": [0, 0, 1]}', "not a rotation"),
    ('{"R": [[-1, 0, 0], [0, 1, 0], [0, 0, 1]], "t": [0, 0, 1]}', "not a rotation"),
    ('{"R": [[1, 0], [0, 1]], "t": [0, 0, 1]}', "shape"),
    ('{"R": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "t": ["a", 0, 1]}', "array of numbers"),
    ('{"matrix": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 3], [1, 0, 0, 1]]}', "last row"),
    ('{"R": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "t": [0, 0, 1], "convention": "world"}', "convention"),
])
def test_load_pose_errors_name_the_file(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        load_pose(path)
    assert needle in str(e.value) and "bad.json" in str(e.value)


def test_load_pose_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_pose(tmp_path / "nope.json")


# ----------------------------------------------------------------------------------------------------------
# The learnable parameterisation


@pytest.mark.parametrize("parameterization", ["object_to_camera", "camera_to_object"])
@pytest.mark.parametrize("rotation", ["axis_angle", "quaternion"])
def test_pose_parameters_start_at_base_and_move_as_documented(parameterization, rotation):
    dt = torch.float64
    p = _pose(dtype=dt)
    K = intrinsics_from_fov(40.0, (30, 40), dt)
    pivot = torch.tensor([0.2, -0.1, 0.3], dtype=dt)
    params = PoseParameters(p.R, p.t, K, (30, 40), pivot, rotation, parameterization,
                            refine_focal=True, refine_principal_point=True).double()
    cam = params.cameras()
    assert torch.allclose(cam.R[0], p.R) and torch.allclose(cam.t[0], p.t) and torch.allclose(cam.K[0], K)
    # At half the size, rows 0 and 1 of K halve (pixel coordinates start at the image corner).
    assert torch.allclose(params.intrinsics((15, 20)), K * torch.tensor([[0.5], [0.5], [1.0]], dtype=dt))
    with torch.no_grad():
        params.rot[:] = torch.tensor([0.1, -0.2, 0.05], dtype=dt)
    R, t = params.object_to_camera()
    assert rotation_error_deg(R, p.R) > 5
    if parameterization == "object_to_camera":  # rotation about the object's centre: it stays put
        assert torch.allclose(R @ pivot + t, p.R @ pivot + p.t, atol=1e-12)
    else:  # rotation about the camera centre: it stays put
        assert torch.allclose(-(R.T @ t), -(p.R.T @ p.t), atol=1e-12)
    with torch.no_grad():
        params.reset()
        params.log_focal_scale[0] = math.log(2.0)  # focal x2 about the principal point
        params.principal_point[:] = torch.tensor([0.1, -0.05], dtype=dt)  # principal point, in half-widths
    K2 = params.intrinsics().detach()
    want = K.clone()
    want[0, 0], want[1, 1], want[0, 2], want[1, 2] = 2 * K[0, 0], 2 * K[1, 1], K[0, 2] + 2.0, K[1, 2] - 1.0
    assert torch.allclose(K2, want, atol=1e-12)
    # bake() folds the update into the base without changing the camera.
    before = params.cameras()
    params.bake()
    after = params.cameras()
    assert float(params.coordinates().detach().abs().max()) == 0
    for a, b in ((before.R, after.R), (before.t, after.t), (before.K, after.K)):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("parameterization", ["object_to_camera", "camera_to_object"])
def test_a_batch_of_pose_parameters_moves_each_camera_as_a_single_pose(parameterization):
    """One parameterisation for poses and cameras: camera b of a batch (with a pivot per camera) moves as a
    single PoseParameters of camera b given the same coordinates; CameraParameters (IDR's learn_cameras) is
    the batch with the pivot at the world origin (``R = D R0, t = t0 + dt``), and state dicts saved before the
    whitening matrix existed still load."""
    from taichi_dr.core.transforms import CameraParameters, PoseParameters

    dt = torch.float64
    g = torch.Generator().manual_seed(3)
    B = 3
    R0 = axis_angle_to_matrix(torch.randn(B, 3, generator=g, dtype=dt))
    t0 = torch.randn(B, 3, generator=g, dtype=dt) + torch.tensor([0.0, 0.0, 4.0], dtype=dt)
    K0 = intrinsics_from_fov(35.0, (20, 30), dt).expand(B, 3, 3).clone()
    pivot = torch.randn(B, 3, generator=g, dtype=dt)
    rot, dtr = 0.3 * torch.randn(B, 3, generator=g, dtype=dt), torch.randn(B, 3, generator=g, dtype=dt)
    focal, pp = 0.2 * torch.randn(B, generator=g, dtype=dt), 0.1 * torch.randn(B, 2, generator=g, dtype=dt)
    batch = PoseParameters(R0, t0, K0, (20, 30), pivot, "quaternion", parameterization, True, True,
                           shared_focal=False)
    with torch.no_grad():
        batch.rot.copy_(rot), batch.dt.copy_(dtr), batch.log_focal_scale.copy_(focal)
        batch.principal_point.copy_(pp)
    cams = batch.cameras((10, 15))
    for b in range(B):
        one = PoseParameters(R0[b], t0[b], K0[b], (20, 30), pivot[b], "quaternion", parameterization, True, True)
        with torch.no_grad():
            one.rot.copy_(rot[b]), one.dt.copy_(dtr[b]), one.log_focal_scale.fill_(float(focal[b]))
            one.principal_point.copy_(pp[b])
        ref = one.cameras((10, 15))
        for x, y in ((cams.R[b], ref.R[0]), (cams.t[b], ref.t[0]), (cams.K[b], ref.K[0])):
            torch.testing.assert_close(x, y, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="single pose"):
        batch.whiten(torch.zeros(10, 3, dtype=dt))

    base = Cameras(K0, R0, t0, (20, 30))
    params = CameraParameters(base, learn_focal=True)
    assert isinstance(params, PoseParameters)
    with torch.no_grad():
        params.rot.copy_(rot), params.dt.copy_(dtr)
    out = params()
    torch.testing.assert_close(out.R, axis_angle_to_matrix(rot) @ R0, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.t, t0 + dtr, atol=1e-12, rtol=0)
    old_state = {k: v for k, v in params.state_dict().items() if k != "mix"}
    loaded = CameraParameters(base, learn_focal=True)
    loaded.load_state_dict(old_state)
    for x, y in ((loaded().R, out.R), (loaded().t, out.t), (loaded().K, out.K)):
        assert torch.equal(x, y)


def test_whitening_makes_unit_steps_move_points_one_pixel_independently():
    dt = torch.float64
    p = _pose(dtype=dt)
    K = intrinsics_from_fov(30.0, (64, 64), dt)
    pts = _blob(dt).verts
    params = PoseParameters(p.R, p.t, K, (64, 64), _pivot(_blob(dt))).double()
    params.whiten(pts, (64, 64))

    def proj(phi):
        R, t, Kc = params._transform(params.mix @ phi, (64, 64))
        return Cameras(Kc, R, t, (64, 64), validate=False).project(pts)[0, :, :2].reshape(-1)

    h = 1e-6
    J = torch.stack([(proj(h * e) - proj(-h * e)) / (2 * h) for e in torch.eye(6, dtype=dt)], 1)
    M = J.T @ J / pts.shape[0]
    assert torch.allclose(M, torch.eye(6, dtype=dt), atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Gradients against finite differences (float64)


@pytest.mark.parametrize("loss", ["mse", "rgb", "dt"])
def test_pose_loss_gradient_matches_finite_differences(loss):
    dt = torch.float64
    # Few faces: the colours use clipped barycentrics, whose kinks (a pixel crossing the line of an edge of a
    # face it lies outside) finite differences must not straddle; with many faces in reach of every pixel
    # some always would.
    mesh = _blob(dt, level=1)
    size = 24
    camera = _camera(size, dt)
    true = _pose(dtype=dt)
    tgt_render = _render(mesh, camera, true, sigma=1e-4, mode="hard", outputs=("rgb",))
    target = PoseTarget(mask=tgt_render.alpha[0], rgb=tgt_render.rgb[0])
    start = _perturbed(true, _pivot(mesh), (0.05, -0.04, 0.03), (0.04, -0.03, 0.1))
    params = PoseParameters(start.R, start.t, camera.K[0], (size, size), _pivot(mesh),
                            refine_focal=True, refine_principal_point=True).double()
    params.whiten(mesh.verts)
    fn = {"mse": lambda o, t: silhouette_mse_loss(o, t, match_edges=False),
          "rgb": lambda o, t: rgb_loss(o, t, match_edges=False),
          "dt": distance_transform_loss}[loss]
    settings = RasterSettings(sigma=1e-2, gamma=1e-2)  # smooth at this size

    def f(phi):
        R, t, K = params._transform(params.mix @ phi)
        out = render_mesh(mesh, Cameras(K, R, t, (size, size), validate=False), None, settings,
                          outputs=("rgb",) if loss == "rgb" else ())
        return fn(out, target)

    phi = torch.zeros(params.num_params, dtype=dt, requires_grad=True)
    # nondet_tol: the rasterizer accumulates gradients with parallel atomic adds (order varies).
    assert torch.autograd.gradcheck(f, (phi,), eps=1e-6, atol=1e-7, rtol=1e-3, nondet_tol=1e-10)
    g = torch.autograd.grad(f(phi), phi)[0]
    assert float(g.abs().max()) > 1e-4  # not trivially zero


# ----------------------------------------------------------------------------------------------------------
# Silhouette edge matching, distance transform


def test_signed_distance():
    m = np.zeros((7, 9), bool)
    m[2:5, 3:6] = True
    s = signed_distance(m)
    assert s[3, 4] == -1.5 and s[2, 3] == -0.5 and s[1, 4] == 0.5 and s[3, 8] == 2.5
    assert np.isinf(signed_distance(np.zeros((3, 3), bool))).all()


def test_matched_mask_removes_the_soft_silhouette_bias():
    """Against the hard target, the soft silhouette (inflated by ~sqrt(sigma)) prefers the object further
    away; against the matched target the loss is smallest at the true depth."""
    mesh = _blob()
    size = 48
    camera = _camera(size)
    true = _pose(t=(0.0, 0.0, 4.0))
    target = PoseTarget(mask=_render(mesh, camera, true, mode="hard").alpha[0], rgb=None)
    dzs = [-0.12, -0.06, 0.0, 0.06, 0.12]
    raw, matched = [], []
    for dz in dzs:
        out = _render(mesh, camera, Pose(true.R, true.t + torch.tensor([0.0, 0.0, dz])), sigma=1e-3)
        raw.append(float(silhouette_iou_loss(out, target, match_edges=False)))
        matched.append(float(silhouette_iou_loss(out, target)))
    assert int(np.argmin(matched)) == 2
    assert int(np.argmin(raw)) > 2  # the bias the matching removes
    m = matched_mask(out, target)
    assert m.shape == (1, size, size) and 0 <= float(m.min()) and float(m.max()) <= 1


def test_distance_transform_loss_attracts_from_far_away():
    """The render does not overlap the target at all: IoU has no gradient, the DT loss pulls it over."""
    mesh = _blob()
    size = 48
    camera = _camera(size)
    true = _pose(t=(-1.25, 0.0, 10.0))
    target = PoseTarget(mask=_render(mesh, camera, true, mode="hard").alpha[0], rgb=None)
    start = Pose(true.R, true.t + torch.tensor([2.5, 0.0, 0.0]))
    params = PoseParameters(start.R, start.t, camera.K[0], (size, size), _pivot(mesh))
    out = render_mesh(mesh, params.cameras(), None, RasterSettings(sigma=1e-4), outputs=())
    assert float((out.alpha.detach() * target.mask).sum()) == 0  # no overlap
    distance_transform_loss(out, target).backward()
    assert float(params.dt.grad[0]) > 0  # descent decreases t_x: towards the target
    params.zero_grad(set_to_none=True)
    out = render_mesh(mesh, params.cameras(), None, RasterSettings(sigma=1e-4), outputs=())
    silhouette_iou_loss(out, target, match_edges=False).backward()
    assert float(torch.cat([params.rot.grad, params.dt.grad]).abs().max()) < 1e-6


@pytest.mark.parametrize("shape", [(17, 23), (40, 31), (1, 9)])
def test_squared_distance_transform_matches_scipy(shape):
    """Both paths (SciPy for CPU tensors, torch for GPU tensors, run here on the CPU) against SciPy's exact
    Euclidean distance transform, bit for bit in squared distances (integers); a mask without False pixels is
    inf everywhere. (Compared squared: SciPy 1.17's distances are not always correctly rounded square roots,
    sqrt(2) comes out 1 ulp off, so comparing square roots would test SciPy's rounding.)"""
    from scipy.ndimage import distance_transform_edt

    from taichi_dr.pipelines.pose.targets import _squared_edt_torch, squared_distance_transform

    g = torch.Generator().manual_seed(shape[0])
    for density in (0.05, 0.5, 0.95):
        m = torch.rand(shape, generator=g) < density
        m[0, 0] = False
        ref = np.round(np.square(distance_transform_edt(m.numpy())))
        for fn in (squared_distance_transform, _squared_edt_torch):
            got = fn(m)
            assert got.dtype == torch.float64 and np.array_equal(got.numpy(), ref), (fn.__name__, density)
    for fn in (squared_distance_transform, _squared_edt_torch):
        assert torch.isinf(fn(torch.ones(shape, dtype=torch.bool))).all()
        assert (fn(torch.zeros(shape, dtype=torch.bool)) == 0).all()


def _matched_mask_reference(rendered, target) -> np.ndarray:
    """matched_mask as first written (NumPy/SciPy on the host every step): the mean alpha at each signed
    distance to the render's hard silhouette, interpolated at the target's signed distances. (That version
    rounded the distances to 3 decimals, which moved its interpolation by up to 2e-4; 9 keeps them exact.)"""
    cov = (rendered.pix_to_face[0] >= 0).numpy()
    s_r = np.round(signed_distance(cov), 9)
    alpha = rendered.alpha[0].double().numpy()
    levels, inverse = np.unique(s_r, return_inverse=True)
    profile = np.bincount(inverse.ravel(), weights=alpha.ravel()) / np.bincount(inverse.ravel())
    return np.interp(signed_distance(target.mask.numpy() >= 0.5), levels, profile)


@pytest.mark.parametrize("device_path", [False, True])
def test_matched_mask_matches_the_host_reference(device_path, monkeypatch):
    """The device implementation (fixed-size tensor operations; with ``device_path`` the GPU's torch distance
    transform, run here on the CPU) gives the host reference's values, at several offsets and sigmas; an
    empty render falls back to the raw mask."""
    import taichi_dr.pipelines.pose.targets as targets_module

    if device_path:
        monkeypatch.setattr(targets_module, "squared_distance_transform", targets_module._squared_edt_torch)
    mesh = _blob()
    camera = Cameras(intrinsics_from_fov(30.0, (36, 44)), torch.eye(3), torch.zeros(3), (36, 44))
    true = _pose(t=(0.0, 0.0, 4.0))
    target = PoseTarget(mask=_render(mesh, camera, true, mode="hard").alpha[0], rgb=None)
    for dt, sigma in (((0.0, 0.0, 0.0), 1e-3), ((0.15, -0.1, 0.3), 1e-4), ((-0.3, 0.2, -0.5), 3e-3)):
        out = _render(mesh, camera, Pose(true.R, true.t + torch.tensor(dt)), sigma=sigma)
        got = matched_mask(out, target)
        assert got.shape == (1, 36, 44) and got.dtype == torch.float32
        ref = _matched_mask_reference(out, target)
        assert np.abs(got[0].double().numpy() - ref).max() < 1e-6, dt
        assert 0.05 < float(got.mean()) < 0.95
    empty = _render(mesh, camera, Pose(true.R, true.t + torch.tensor([50.0, 0.0, 0.0])))
    assert not (empty.pix_to_face >= 0).any()
    assert torch.equal(matched_mask(empty, target), target.mask[None])


def test_distance_transform_loss_values_and_scipy_once_per_target(monkeypatch):
    """The DT loss equals ``mean(alpha D_out + (1 - alpha) D_in)`` with SciPy's distance maps (in units of the
    longer side), and a refinement computes the maps once per target resolution, not once per step."""
    import scipy.ndimage

    mesh = _blob()
    size = 40
    camera = _camera(size)
    true = _pose(t=(0.0, 0.0, 4.0))
    mask = _render(mesh, camera, true, mode="hard").alpha[0]
    out = _render(mesh, camera, _pose(aa=(0.4, -0.45, 0.1), t=(0.2, 0.1, 4.3)), sigma=1e-3)
    binary = mask.numpy() >= 0.5
    d_out = scipy.ndimage.distance_transform_edt(~binary) / size
    d_in = scipy.ndimage.distance_transform_edt(binary) / size
    a = out.alpha[0].double().numpy()
    expected = float(np.mean(a * d_out + (1 - a) * d_in))
    assert float(distance_transform_loss(out, PoseTarget(mask=mask, rgb=None))) == pytest.approx(expected,
                                                                                               rel=1e-6)

    calls = []
    edt = scipy.ndimage.distance_transform_edt

    def counted(*args, **kwargs):
        calls.append(1)
        return edt(*args, **kwargs)

    monkeypatch.setattr(scipy.ndimage, "distance_transform_edt", counted)
    init = _perturbed(true, _pivot(mesh), (0.05, -0.04, 0.03), (0.05, 0.03, 0.1))
    stages = (Stage(20, 3e-3, 3), Stage(None, 1e-3, 3), Stage(None, 1e-4, 3))   # two resolutions
    res = refine_pose(mesh, mask, camera, init, loss="distance_transform", settings=PoseSettings(stages=stages))
    assert len(res.history) == 9
    assert len(calls) == 2 * 2   # (outside and inside maps) x (20 px, 40 px): not per step


def test_non_finite_steps_are_skipped_on_the_device_and_a_non_finite_loss_raises():
    """A finite loss with an infinite gradient: every step is skipped (the pose does not move) without
    reading the gradient on the host. A NaN loss follows the engine's policy: skipped and counted, and
    ``max_nonfinite`` in a row stop the refinement with NonFiniteError (a FloatingPointError) naming them."""
    mesh = _blob()
    camera = _camera(24)
    init = _pose(t=(0.0, 0.0, 4.0))

    def infinite_gradient(rendered, target, cam):
        u = (rendered.alpha - rendered.alpha.detach()).sum()   # 0, with a gradient
        return torch.sqrt(u.abs())                               # d sqrt / du = inf at 0

    target = _render(mesh, camera, init, mode="hard").alpha[0]
    settings = PoseSettings(stages=(Stage(None, 1e-3, 3),))
    res = refine_pose(mesh, target, camera, init, loss=infinite_gradient, settings=settings)
    assert res.extra["skipped_steps"] == 3 and res.history == [0.0, 0.0, 0.0]
    assert torch.allclose(res.pose.R, init.R, atol=1e-6) and torch.allclose(res.pose.t, init.t, atol=1e-6)

    def nan_loss(rendered, target, cam):
        return rendered.alpha.mean() * float("nan")

    res = refine_pose(mesh, target, camera, init, loss=nan_loss, settings=settings)
    assert res.extra["skipped_steps"] == 3 and all(math.isnan(v) for v in res.history)
    assert torch.allclose(res.pose.R, init.R, atol=1e-6) and torch.allclose(res.pose.t, init.t, atol=1e-6)
    with pytest.raises(NonFiniteError, match=r"2 consecutive .* \(iterations 1-2\)") as error:
        refine_pose(mesh, target, camera, init, loss=nan_loss,
                    settings=PoseSettings(stages=settings.stages, max_nonfinite=2))
    assert isinstance(error.value, FloatingPointError)


# ----------------------------------------------------------------------------------------------------------
# Refinement


@pytest.mark.parametrize("perturbation", [((0.02, -0.025, 0.015), (0.03, -0.02, 0.08)),
                                          ((-0.03, 0.01, 0.02), (-0.04, 0.03, -0.06))])
def test_refine_recovers_a_small_perturbation_to_a_tenth_of_a_degree(perturbation):
    """About 2 degrees and 2% of the distance, recovered to 0.1 degree and 0.1% with the RGB loss. The target
    is the renderer's own image at the true pose (so the optimum is exactly the truth; recovering from
    binary masks, with their edge-profile correction, is what the benchmark measures)."""
    mesh = load_mesh(asset_path("spot/spot_triangulated.obj"))
    size = 64
    camera = _camera(size)
    true = Pose.from_cameras(Cameras.look_at((2.0, 1.2, -2.4), (0.0, 0.1, 0.2), fov=30.0,
                                             image_size=(size, size)))
    target = PoseTarget(mask=None, rgb=composite(_render(mesh, camera, true, sigma=1e-4, outputs=("rgb",)))[0])
    init = _perturbed(true, _pivot(mesh), *perturbation)
    assert rotation_error_deg(init, true) > 2.0
    settings = PoseSettings(stages=(Stage(None, 1e-4, 25, 0.5), Stage(None, 1e-4, 25, 0.1),
                                    Stage(None, 1e-4, 20, 0.03)))
    res = refine_pose(mesh, target, camera, init, loss="rgb", settings=settings)
    assert rotation_error_deg(res.pose, true) < 0.1
    assert translation_error(res.pose, true, relative_to=float(true.t.norm())) < 0.001
    assert len(res.history) == 70 and res.history[-1] < 0.01 * res.history[0]
    assert res.overlay.shape == (size, size, 3) and res.overlay_init.shape == (size, size, 3)


def test_refine_with_camera_extrinsics_returns_the_pose_in_the_world_frame():
    """With a camera that has extrinsics, the pose maps object -> world; moving the object or moving the
    camera, with either rotation update, reaches the same world pose. (An exact correspondence field as the
    objective, so this checks frames, not the accuracy of an image loss.)"""
    mesh = _blob()
    size = 48
    world_cam = Cameras.look_at((0.5, 1.0, -4.0), (0.0, 0.0, 0.0), fov=30.0, image_size=(size, size))
    true = Pose(axis_angle_to_matrix(torch.tensor([0.1, 0.4, -0.2])), torch.tensor([0.1, 0.0, 0.2]))
    true_o2c = Pose.from_cameras(world_cam).compose(true)

    def oracle(rendered, target, cam):
        truth = Cameras(cam.K, true_o2c.R[None], true_o2c.t[None], cam.image_size, validate=False)
        return reprojection_flow(surface_points(mesh, cam, rendered.pix_to_face), cam, truth)

    init = _perturbed(true, _pivot(mesh), (0.04, 0.0, -0.04), (0.04, 0.02, -0.08))  # 3 degrees
    target = torch.zeros(size, size)
    for parameterization in ("object_to_camera", "camera_to_object"):
        for rotation in ("axis_angle", "quaternion"):
            s = PoseSettings(stages=(Stage(None, 1e-3, 30),), parameterization=parameterization,
                             rotation=rotation)
            res = refine_pose(mesh, target, world_cam, init, settings=s,
                              loss=DisplacementField(oracle, conversion="reprojection"))
            assert rotation_error_deg(res.pose, true) < 0.2, (parameterization, rotation)
            assert translation_error(res.pose, true) < 1e-3, (parameterization, rotation)


def test_multi_start_keeps_the_best_start():
    mesh = _blob()
    size = 32
    camera = _camera(size)
    true = _pose()
    target = _render(mesh, camera, true, mode="hard").alpha[0]
    settings = PoseSettings(stages=(Stage(None, 1e-3, 4),), multi_start=3, multi_start_angle=60.0)
    res = refine_pose(mesh, target, camera, true, settings=settings)
    assert len(res.start_losses) == 3
    assert res.start == int(np.argmin(res.start_losses)) == 0  # the 60-degree starts are worse
    assert len(res.history) == 4


# ----------------------------------------------------------------------------------------------------------
# Fields


def _one_step(mesh, camera, pose, field, size, iters=1, lr=1.0):
    settings = PoseSettings(stages=(Stage(None, 1e-3, iters, 1.0),), lr=lr)
    target = PoseTarget(mask=torch.zeros(size, size), rgb=torch.zeros(size, size, 3))
    return refine_pose(mesh, target, camera, pose, loss=field, settings=settings).pose


def test_pixel_gradient_field_moves_the_pose_where_it_asks():
    """dL/dalpha < 0 right of the object and > 0 left of it: more coverage wanted on the right."""
    mesh = _blob()
    size = 40
    camera = _camera(size)
    pose = _pose(t=(0.0, 0.0, 5.0))
    u_obj = float(camera.project((pose.R @ _pivot(mesh) + pose.t)[None])[0, 0, 0])

    def right(rendered, target, cam):
        u = torch.arange(size, dtype=torch.float32) + 0.5
        return torch.where(u > u_obj, -1.0, 1.0).expand(1, size, size).clone()

    moved = _one_step(mesh, camera, pose, PixelGradientField(right), size, iters=6)
    c0 = camera.project((pose.R @ _pivot(mesh) + pose.t)[None])[0, 0, :2]
    c1 = camera.project((moved.R @ _pivot(mesh) + moved.t)[None])[0, 0, :2]
    assert float(c1[0] - c0[0]) > 0.5  # right, by pixels
    assert abs(float(c1[1] - c0[1])) < 0.5 * float(c1[0] - c0[0])
    # The same, asked on the rgb composite: brighter wanted on the right (the blob is lighter than black).
    moved = _one_step(mesh, camera, pose, PixelGradientField(
        lambda r, t, c: {"rgb": right(r, t, c)[..., None].expand(-1, -1, -1, 3).clone()}, channels=("rgb",)),
        size, iters=6)
    assert float(moved.t[0] - pose.t[0]) > 0


@pytest.mark.parametrize("conversion", ["image", "reprojection"])
@pytest.mark.parametrize("direction", [(1.0, 0.0), (0.0, -1.0)])
def test_displacement_field_moves_the_object_along_it(conversion, direction):
    """The field asks for the motion of a 2-pixel translation of the object (recomputed each step, as a
    correspondence network would): the object's centre follows it, without turning."""
    mesh = _blob()
    size = 40
    camera = _camera(size)
    pose = _pose(t=(0.0, 0.0, 5.0))
    d = torch.tensor(direction)
    f = float(camera.K[0, 0, 0])
    goal = Pose(pose.R, pose.t + torch.tensor([d[0], d[1], 0.0]) * 2.0 * 5.0 / f)  # 2 px at the centre

    def flow(rendered, target, cam):
        other = Cameras(cam.K, goal.R[None], goal.t[None], cam.image_size, validate=False)
        return reprojection_flow(surface_points(mesh, cam, rendered.pix_to_face), cam, other)

    moved = _one_step(mesh, camera, pose, DisplacementField(flow, ("alpha", "rgb"), conversion), size,
                      iters=4)
    c0 = camera.project((pose.R @ _pivot(mesh) + pose.t)[None])[0, 0, :2]
    c1 = camera.project((moved.R @ _pivot(mesh) + moved.t)[None])[0, 0, :2]
    step = c1 - c0
    along = float(step @ d)
    assert 1.0 < along < 3.0, along  # about the 2 pixels asked for
    assert abs(float(step @ torch.tensor([-d[1], d[0]]))) < 0.25 * along
    # The image conversion sees the motion only at edges and texture, through a first-order model: it
    # turns the object a little on the way.
    assert rotation_error_deg(moved, pose) < (0.5 if conversion == "reprojection" else 3.0)


def test_reprojection_flow_is_zero_at_the_truth_and_recovers_it():
    mesh = _blob()
    size = 40
    camera = _camera(size)
    true = _pose()
    true_cam = Cameras(camera.K, true.R[None], true.t[None], (size, size))
    out = _render(mesh, camera, true, sigma=1e-4)
    pts = surface_points(mesh, true_cam, out.pix_to_face)
    flow = reprojection_flow(pts, true_cam, true_cam)
    ok = torch.isfinite(flow).all(-1)
    assert bool(ok.any()) and bool((ok == (out.pix_to_face >= 0)).all())
    assert float(flow[ok].abs().max()) < 1e-3
    # The surface points lie on the mesh: re-projected with the same camera they land on their pixel centre.
    centres = torch.stack(torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="xy"), -1)
    proj = true_cam.project(pts[ok][None])[0, :, :2]
    assert torch.allclose(proj, centres[None].expand(1, -1, -1, -1)[ok], atol=1e-3)

    def oracle(rendered, target, cam):
        truth = Cameras(cam.K, true.R[None], true.t[None], cam.image_size, validate=False)
        return reprojection_flow(surface_points(mesh, cam, rendered.pix_to_face), cam, truth)

    init = _perturbed(true, _pivot(mesh), (0.2, -0.15, 0.1), (0.1, 0.05, 0.3))  # ~15 degrees
    res = refine_pose(mesh, out.alpha[0], camera, init, settings=PoseSettings(stages=(Stage(None, 1e-3, 25),)),
                      loss=DisplacementField(oracle, conversion="reprojection"))
    assert rotation_error_deg(res.pose, true) < 0.05


# ----------------------------------------------------------------------------------------------------------
# Overlay and bad inputs


def test_draw_overlay_outlines_the_mask():
    img = torch.zeros(8, 8)
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1
    out = draw_overlay(img, mask, color=(1.0, 0.0, 0.0))
    red = out[..., 0] == 1
    assert bool(red[2, 2:6].all()) and bool(red[5, 2:6].all()) and not bool(red[3:5, 3:5].any())
    assert not bool(red[0].any()) and out.shape == (8, 8, 3)


def test_bad_inputs_give_clear_errors():
    mesh = _blob()
    camera = _camera(32)
    mask = torch.zeros(32, 32)
    mask[10:20, 10:20] = 1
    pose = _pose()
    with pytest.raises(ValueError, match=r"image size \(30, 32\).*\(32, 32\)"):
        refine_pose(mesh, torch.zeros(30, 32), camera, pose)
    with pytest.raises(ValueError, match="not a rotation"):
        Pose(2 * torch.eye(3), torch.zeros(3))
    with pytest.raises(ValueError, match="not a rotation"):
        refine_pose(mesh, mask, camera, torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0])))
    with pytest.raises(ValueError, match="unknown loss 'iuo'"):
        refine_pose(mesh, mask, camera, pose, loss="iuo")
    with pytest.raises(ValueError, match="needs a target with colour"):
        refine_pose(mesh, mask, camera, pose, loss="rgb")
    with pytest.raises(ValueError, match="needs a target mask"):
        refine_pose(mesh, torch.zeros(32, 32, 3), camera, pose, loss="silhouette_iou")
    with pytest.raises(ValueError, match="one camera"):
        refine_pose(mesh, mask, Cameras(camera.K, camera.R.expand(2, 3, 3), camera.t.expand(2, 3), (32, 32)),
                    pose)
    with pytest.raises(TypeError, match="loss"):
        refine_pose(mesh, mask, camera, pose, loss=3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        refine_pose(mesh, 2 * mask, camera, pose)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        refine_pose(mesh, torch.zeros(32, 32, 2), camera, pose)
    with pytest.raises(ValueError, match=r"must return a \(1, 32, 32, 2\)"):
        refine_pose(mesh, mask, camera, pose, loss=DisplacementField(lambda r, t, c: torch.zeros(32, 32, 2)),
                    settings=PoseSettings(stages=(Stage(None, 1e-3, 1),)))
    with pytest.raises(ValueError, match="must have shape"):
        refine_pose(mesh, mask, camera, pose, loss=PixelGradientField(lambda r, t, c: torch.zeros(1, 8, 8)),
                    settings=PoseSettings(stages=(Stage(None, 1e-3, 1),)))
    with pytest.raises(ValueError, match="channels"):
        DisplacementField(lambda r, t, c: None, channels=("depth",))
    with pytest.raises(ValueError, match="PoseSettings.rotation"):
        PoseSettings(rotation="euler")
    with pytest.raises(ValueError, match="Stage.sigma"):
        Stage(64, 0.0, 10)


# ----------------------------------------------------------------------------------------------------------
# The app (tdr pose), in-process at 32 px with a short schedule


def _app_problem(tmp_path, size=32):
    import imageio.v3 as iio

    from taichi_dr.core.camera import save_cameras_json

    mesh_path = asset_path("spot/spot_triangulated.obj")
    mesh = load_mesh(mesh_path)
    camera = Cameras.look_at((2.0, 1.2, -2.4), (0.0, 0.1, 0.2), fov=30.0, image_size=(size, size))
    true = Pose.from_cameras(camera)
    ident = _camera(size)
    out = _render(mesh, ident, true, sigma=1e-5, outputs=("rgb",))
    hard = _render(mesh, ident, true, mode="hard")
    rgba = torch.cat([out.rgb[0], hard.alpha[0][..., None]], -1)
    iio.imwrite(tmp_path / "photo.png", (rgba.numpy() * 255 + 0.5).astype(np.uint8))
    save_cameras_json(ident, tmp_path / "camera.json")
    init = _perturbed(true, _pivot(mesh), (0.05, -0.03, 0.02), (0.05, 0.02, 0.1))
    save_pose(init, tmp_path / "init.json")
    return mesh_path, true, init


def _invoke(*args):
    from typer.testing import CliRunner

    from apps.pose import app

    return CliRunner().invoke(app, ["pose", *[str(a) for a in args]])


def _clean_error(result, needle):
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert needle.lower() in errors[0].lower(), errors[0]


def test_app_writes_overlays_pose_and_loss_curve(tmp_path):
    mesh_path, true, init = _app_problem(tmp_path)
    out = tmp_path / "out"
    r = _invoke(mesh_path, tmp_path / "photo.png", "--camera", tmp_path / "camera.json", "--init",
                tmp_path / "init.json", "--out", out, "--stages", "0:1e-3:12,0:3e-4:8:0.5")
    assert r.exit_code == 0, r.output
    for name in ("before.png", "after.png", "pose.json", "loss.csv", "loss.svg"):
        assert (out / name).is_file(), name
    refined = load_pose(out / "pose.json")
    assert rotation_error_deg(refined, true) < rotation_error_deg(init, true)
    doc = json.loads((out / "pose.json").read_text())
    assert doc["loss"] == "silhouette_iou" and len(doc["K"]) == 3
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,stage,loss" and len(rows) == 21
    assert (out / "loss.svg").read_text().startswith("<svg")
    # The output folder is not silently overwritten.
    r = _invoke(mesh_path, tmp_path / "photo.png", "--camera", tmp_path / "camera.json", "--out", out)
    _clean_error(r, "not empty")


def test_app_bad_inputs_give_one_line_errors(tmp_path):
    import imageio.v3 as iio

    mesh_path, _, _ = _app_problem(tmp_path)
    photo, cam, init = tmp_path / "photo.png", tmp_path / "camera.json", tmp_path / "init.json"
    iio.imwrite(tmp_path / "small.png", np.zeros((24, 32, 4), np.uint8))
    (tmp_path / "garbled.json").write_text('{"R": [[1, 0, 0], [0, 1, 0]], ')
    (tmp_path / "scaled.json").write_text(json.dumps({"R": (2 * np.eye(3)).tolist(), "t": [0, 0, 3]}))
    (tmp_path / "notes.txt").write_text("hello")
    cases = [
        ((mesh_path, tmp_path / "small.png", "--camera", cam), "IMAGE is 32x24"),  # the camera is 32x32
        ((mesh_path, photo, "--camera", cam, "--init", tmp_path / "garbled.json"), "--init"),
        ((mesh_path, photo, "--camera", cam, "--init", tmp_path / "scaled.json"), "not a rotation"),
        ((mesh_path, photo, "--camera", cam, "--init", tmp_path / "missing.json"), "not found"),
        ((tmp_path / "nope.obj", photo, "--camera", cam), "nope.obj"),
        ((mesh_path, tmp_path / "notes.txt", "--camera", cam), "notes.txt"),
        ((mesh_path, photo), "exactly one of --camera"),
        ((mesh_path, photo, "--camera", cam, "--loss", "l2"), "--loss"),
        ((mesh_path, photo, "--camera", cam, "--stages", "64:x:10"), "--stages"),
        ((mesh_path, photo, "--camera", cam, "--camera-index", "3"), "--camera-index"),
    ]
    for k, (args, needle) in enumerate(cases):
        _clean_error(_invoke(*args, "--out", tmp_path / f"out{k}"), needle)
    assert init.is_file()


def test_lights_are_attached_to_the_camera():
    from taichi_dr.pipelines.pose.method import _lights_in_object
    from taichi_dr.raster.shading import Lights

    R = axis_angle_to_matrix(torch.tensor([0.3, -0.2, 0.5]))
    lights = Lights.default()
    lights = Lights(lights.ambient, torch.tensor([[0.0, -1.0, -1.0]]), lights.colors, lights.specular)
    obj = _lights_in_object(lights, R)
    # Back in camera coordinates the direction is what was given, whatever the pose.
    assert torch.allclose(obj.directions @ R.T, lights.directions, atol=1e-6)


def test_feature_loss_compares_in_feature_space_and_refines():
    import torch.nn.functional as F

    from taichi_dr.pipelines.pose import feature_loss

    mesh = _blob()
    size = 32
    camera = _camera(size)
    true = _pose(t=(0.0, 0.0, 3.5))
    target = PoseTarget(mask=None, rgb=composite(_render(mesh, camera, true, sigma=1e-4, outputs=("rgb",)))[0])
    calls = []

    def extractor(x):  # (1, 3, H, W) -> a coarser, 2-channel "feature map"
        calls.append(tuple(x.shape))
        return torch.cat([F.avg_pool2d(x, 4), F.max_pool2d(x[:, :1], 4)], 1)

    loss = feature_loss(extractor)
    at_truth = loss(_render(mesh, camera, true, sigma=1e-4, outputs=("rgb",)), target)
    assert float(at_truth) < 1e-10
    init = _perturbed(true, _pivot(mesh), (0.05, 0.0, 0.05), (0.05, -0.03, 0.1))
    res = refine_pose(mesh, target, camera, init, loss=loss,
                      settings=PoseSettings(stages=(Stage(None, 1e-3, 15, 0.5),)))
    assert res.history[-1] < 0.5 * res.history[0]
    assert rotation_error_deg(res.pose, true) < rotation_error_deg(init, true)
    assert calls[0] == (1, 3, size, size)


@pytest.mark.parametrize("optimizer", ["steepest", "adam"])
def test_loss_optimizers_reduce_the_loss(optimizer):
    """(gauss_newton is for displacement fields, tested with them.)"""
    mesh = _blob()
    size = 32
    camera = _camera(size)
    true = _pose(t=(0.0, 0.0, 3.5))
    target = _render(mesh, camera, true, mode="hard").alpha[0]
    init = _perturbed(true, _pivot(mesh), (0.1, -0.05, 0.08), (0.1, 0.05, 0.2))
    res = refine_pose(mesh, target, camera, init, loss="silhouette_mse",
                      settings=PoseSettings(stages=(Stage(None, 1e-3, 12),), optimizer=optimizer))
    assert res.history[-1] < 0.7 * res.history[0], res.history
    assert res.extra["skipped_steps"] == 0


# ----------------------------------------------------------------------------------------------------------
# On the training engine: interrupt and resume bitwise


def _resume_problem(optimizer="steepest"):
    mesh = _blob()
    camera = _camera(24)
    true = _pose(t=(0.0, 0.0, 4.0))
    out = _render(mesh, camera, true, sigma=1e-5, outputs=("rgb",))
    target = torch.cat([out.rgb[0], _render(mesh, camera, true, mode="hard").alpha[0][..., None]], -1)
    init = _perturbed(true, _pivot(mesh), (0.06, -0.04, 0.03), (0.05, 0.02, 0.1))
    # Two starts of 3 steps (iterations 0-5), then the best start's second stage (iterations 6-8).
    settings = PoseSettings(stages=(Stage(16, 3e-3, 3), Stage(None, 1e-3, 3, 0.5)), multi_start=2,
                            multi_start_angle=20.0, optimizer=optimizer, refine_focal=optimizer == "adam")
    return mesh, target, camera, init, settings


def _assert_same_result(a, b):
    for x, y in ((a.pose.R, b.pose.R), (a.pose.t, b.pose.t), (a.K, b.K), (a.silhouette, b.silhouette)):
        assert torch.equal(x, y)
    assert a.history == b.history and a.history_stage == b.history_stage
    assert a.start == b.start and a.start_losses == b.start_losses
    assert a.extra["skipped_steps"] == b.extra["skipped_steps"]


@pytest.mark.parametrize("optimizer, stop_at", [("steepest", 2), ("steepest", 3), ("steepest", 6), ("steepest", 7),
                                                ("adam", 5)])
def test_pose_method_resumes_bitwise_after_an_interrupt(tmp_path, optimizer, stop_at):
    """SIGINT after iteration ``stop_at`` (inside a start's first stage, at the boundary between the two
    starts, at the switch to the best start's remaining stages, inside those; Adam's moments with a learnt
    focal length): the engine saves, stops with Interrupted, and a resumed run ends with the same pose,
    intrinsics, history and chosen start, bit for bit, as an uninterrupted refine_pose."""

    from taichi_dr.pipelines import Interrupted, TrainConfig, Trainer
    from taichi_dr.pipelines.pose import PoseMethod

    mesh, target, camera, init, settings = _resume_problem(optimizer)
    straight = refine_pose(mesh, target, camera, init, loss="rgb", settings=settings)
    assert len(straight.start_losses) == 2 and len(straight.history) == 6

    method = PoseMethod(mesh, target, camera, init, loss="rgb", settings=settings)
    config = TrainConfig(iterations=method.iterations, checkpoint_every=0, progress="none")
    assert method.iterations == 9
    with pytest.raises(Interrupted) as stopped:
        Trainer(method, config, out_dir=tmp_path, callbacks=[signal_at(stop_at)]).fit()
    assert stopped.value.iteration == stop_at and stopped.value.checkpoint == tmp_path / "checkpoint.pt"
    resumed = PoseMethod(mesh, target, camera, init, loss="rgb", settings=settings)
    trainer = Trainer(resumed, config, out_dir=tmp_path, resume=True)
    assert trainer.state.iteration == stop_at
    trainer.fit()
    resumed.finish()
    _assert_same_result(resumed.result(), straight)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 10))
    assert [r["loss"] for r in rows[6:]] == straight.history[3:]   # the best start's second stage
    # A checkpoint of other settings is refused in one line naming the setting.
    other = PoseMethod(mesh, target, camera, init, loss="rgb",
                       settings=PoseSettings(stages=settings.stages, multi_start=3, optimizer=optimizer))
    with pytest.raises(ValueError, match="settings.multi_start: the checkpoint has 2, this run 3"):
        Trainer(other, TrainConfig(iterations=other.iterations), out_dir=tmp_path, resume=True)


def test_pose_method_renders_the_live_pose_and_refine_pose_reports_steps():
    """The method renders the current pose from any camera (what a viewer or a validation callback draws):
    at the start, from the refinement's camera, it is the initial pose's render; the callback gets one
    PoseStep per step with the start, stage and step within the start as before the engine."""
    from taichi_dr.pipelines.pose import PoseMethod

    mesh, target, camera, init, settings = _resume_problem()
    method = PoseMethod(mesh, target, camera, init, loss="rgb", settings=settings)
    images = method.render(camera, sigma=1e-4)
    expected = _render(mesh, camera, init, sigma=1e-4)
    assert images["rgb"].shape == (1, 24, 24, 3)
    torch.testing.assert_close(images["alpha"], expected.alpha, atol=1e-5, rtol=0)
    steps = []
    res = refine_pose(mesh, target, camera, init, loss="rgb", settings=settings, callback=steps.append)
    assert [(s.start, s.stage, s.iteration) for s in steps] == \
        [(0, 0, 0), (0, 0, 1), (0, 0, 2), (1, 0, 0), (1, 0, 1), (1, 0, 2)] + \
        [(res.start, 1, 3), (res.start, 1, 4), (res.start, 1, 5)]
    assert all(s.total == 6 for s in steps) and [s.loss for s in steps[-3:]] == res.history[3:]
    # The result is baked once more at the end (re-orthonormalised), so equal to the last step's within rounding.
    torch.testing.assert_close(steps[-1].pose.R, res.pose.R, atol=1e-6, rtol=0)


def test_app_interrupt_saves_and_resume_continues_bitwise(tmp_path, monkeypatch):
    """tdr pose: SIGINT during a step saves a checkpoint, prints the resume command and exits 130; running
    that command finishes with the same pose as an uninterrupted run; the folder has metrics.jsonl (one row
    per step) and config.json."""
    import os
    import shlex
    import signal

    from taichi_dr.pipelines.pose import PoseMethod

    mesh_path, true, init = _app_problem(tmp_path)
    args = [mesh_path, tmp_path / "photo.png", "--camera", tmp_path / "camera.json", "--init", tmp_path / "init.json",
            "--stages", "16:3e-3:4,0:1e-3:3:0.5", "--multi-start", "2", "--multi-start-angle", "20"]
    r = _invoke(*args, "--out", tmp_path / "straight")
    assert r.exit_code == 0, r.output
    step = PoseMethod.step

    def step_then_interrupt(self, batch, index):
        result = step(self, batch, index)
        if index + 1 == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(PoseMethod, "step", step_then_interrupt)
    out = tmp_path / "resumed"
    r = _invoke(*args, "--out", out)
    assert r.exit_code == 130, r.output
    assert "Interrupted at iteration 5/11" in r.stderr and (out / "checkpoint.pt").is_file()
    hint = [line for line in r.stderr.splitlines() if line.startswith("Resume with: ")]
    assert len(hint) == 1
    words = shlex.split(hint[0][len("Resume with: "):])
    assert words[:2] == ["tdr", "pose"] and words[-1] == "--resume"
    monkeypatch.setattr(PoseMethod, "step", step)
    r = _invoke(*words[2:])
    assert r.exit_code == 0, r.output
    a, b = (json.loads((tmp_path / d / "pose.json").read_text()) for d in ("straight", "resumed"))
    assert a["R"] == b["R"] and a["t"] == b["t"] and a["K"] == b["K"] and a["start"] == b["start"]
    assert (out / "loss.csv").read_text() == (tmp_path / "straight" / "loss.csv").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == list(range(1, 12))
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "pose" and config["method_config"]["settings"]["multi_start"] == 2
    # --resume without a checkpoint, or with other settings, is one clean error.
    r = _invoke(*args, "--out", tmp_path / "fresh", "--resume")
    _clean_error(r, "nothing to continue")
    r = _invoke(*args[:-2], "--multi-start-angle", "30", "--out", out, "--resume")
    _clean_error(r, "multi_start_angle")
