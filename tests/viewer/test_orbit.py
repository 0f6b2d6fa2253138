"""OrbitCamera: its cameras against independent formulas (from_spherical's eye, look_at's rotation), motion,
and placing it from training cameras (framing, matching), degenerate inputs included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from taichi_dr.core.camera import Cameras, intrinsics_from_fov
from taichi_dr.viewer.orbit import OrbitCamera

F64 = torch.float64


def spherical_eye(target, d, azimuth, elevation):
    """SoftRas/from_spherical's eye for world y up, written out independently."""
    a, e = math.radians(azimuth), math.radians(elevation)
    return np.asarray(target) + d * np.array([math.cos(e) * math.sin(a), math.sin(e), -math.cos(e) * math.cos(a)])


def centre_of(cams: Cameras) -> np.ndarray:
    return cams.camera_centers()[0].double().numpy()


def projected(cams: Cameras, point) -> np.ndarray:
    return cams.project(torch.as_tensor(np.asarray(point, np.float64)[None], dtype=cams.dtype))[0, 0].numpy()


def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def ring_cameras(centre, normal, radius, height=0.0, n=12, fov=50.0, image_size=(60, 80), phase=0.3):
    """n look_at cameras on a circle around `centre` in the plane orthogonal to `normal` (raised by `height`
    along it), all looking at `centre` with `normal` up."""
    normal = unit(normal)
    a1 = unit(np.cross(normal, [0.3, 0.1, 0.9]))
    a2 = np.cross(normal, a1)
    th = phase + 2 * np.pi * np.arange(n) / n
    eyes = centre + radius * (np.cos(th)[:, None] * a1 + np.sin(th)[:, None] * a2) + height * normal
    return Cameras.look_at(torch.from_numpy(eyes), torch.from_numpy(np.asarray(centre, np.float64)),
                           torch.from_numpy(normal), fov=fov, image_size=image_size)


@pytest.mark.parametrize("target,d,az,el", [((0, 0, 0), 3.0, 0.0, 20.0), ((0.5, -1.0, 2.0), 1.7, 135.0, -40.0),
                                            ((2, 3, -1), 10.0, -70.0, 89.0)])
def test_cameras_look_at_target_from_the_stated_angles(target, d, az, el):
    orbit = OrbitCamera(target=target, distance=d, azimuth=az, elevation=el, fov=40.0)
    cams = orbit.cameras((30, 50), dtype=F64)
    want_eye = spherical_eye(target, d, az, el)
    np.testing.assert_allclose(orbit.eye().numpy(), want_eye, atol=1e-12)
    np.testing.assert_allclose(centre_of(cams), want_eye, atol=1e-12)
    np.testing.assert_allclose(projected(cams, target)[:2], [25.0, 15.0], atol=1e-9)
    assert projected(cams, target)[2] == pytest.approx(d)
    # The same camera as look_at / from_spherical's OpenCV camera at that eye: rotation, intrinsics, no mirror.
    ref = Cameras.look_at(torch.from_numpy(want_eye), torch.tensor(target, dtype=F64), fov=40.0, image_size=(30, 50))
    torch.testing.assert_close(cams.R, ref.R, atol=1e-9, rtol=0)
    torch.testing.assert_close(cams.K, intrinsics_from_fov(40.0, (30, 50), F64)[None], atol=1e-12, rtol=0)
    assert not bool(cams.mirrored[0])
    if target == (0, 0, 0):
        sph = Cameras.from_spherical(torch.tensor([d], dtype=F64), torch.tensor([el], dtype=F64),
                                     torch.tensor([az], dtype=F64), 40.0, (30, 50), convention="opencv")
        torch.testing.assert_close(cams.R, sph.R, atol=1e-9, rtol=0)
        torch.testing.assert_close(cams.t, sph.t, atol=1e-9, rtol=0)


def test_general_up_angles_and_image_up():
    up = unit([1.0, 2.0, -0.5])
    orbit = OrbitCamera(target=(1.0, 0.0, -2.0), distance=2.5, azimuth=40.0, elevation=30.0, up=tuple(up))
    cams = orbit.cameras((40, 40), dtype=F64)
    offset = centre_of(cams) - np.array(orbit.target)
    assert np.linalg.norm(offset) == pytest.approx(2.5)
    assert math.degrees(math.asin(offset.dot(up) / 2.5)) == pytest.approx(30.0)
    np.testing.assert_allclose(projected(cams, orbit.target)[:2], [20.0, 20.0], atol=1e-9)
    # up points up in the image (smaller v), with no sideways component.
    above = projected(cams, np.array(orbit.target) + 0.1 * up)
    assert above[1] < 20.0 - 0.5 and above[0] == pytest.approx(20.0, abs=1e-9)
    # Azimuth turns about up: the eye's height along up stays, its distance too.
    orbit.orbit(77.0, 0.0)
    offset2 = orbit.eye().numpy() - np.array(orbit.target)
    assert offset2.dot(up) == pytest.approx(offset.dot(up))
    assert np.linalg.norm(offset2 - offset) > 1.0


def test_cameras_dtype_and_device():
    cams = OrbitCamera().cameras((8, 12))
    assert cams.dtype == torch.float32 and cams.image_size == (8, 12) and len(cams) == 1
    assert OrbitCamera().cameras((8, 12), device="cpu", dtype=F64).dtype == F64


def test_orbit_by_360_returns_and_elevation_is_clamped():
    orbit = OrbitCamera(target=(0.3, 0.2, 0.1), distance=2.0, azimuth=25.0, elevation=-10.0)
    start = orbit.eye().numpy()
    for _ in range(8):
        orbit.orbit(45.0, 0.0)
    np.testing.assert_allclose(orbit.eye().numpy(), start, atol=1e-12)
    orbit.orbit(-360.0, 0.0)
    np.testing.assert_allclose(orbit.eye().numpy(), start, atol=1e-12)
    orbit.orbit(90.0, 0.0)  # a quarter turn: from azimuth 25 to 115, checked against the formula
    np.testing.assert_allclose(orbit.eye().numpy(), spherical_eye(orbit.target, 2.0, 115.0, -10.0), atol=1e-12)
    orbit.orbit(0.0, 500.0)
    assert orbit.elevation == 89.0
    orbit.orbit(0.0, -1000.0)
    assert orbit.elevation == -89.0
    assert torch.isfinite(orbit.cameras((10, 10)).R).all()
    with pytest.raises(ValueError, match="orbit"):
        orbit.orbit(float("nan"), 0.0)


@pytest.mark.parametrize("image_size,dx,dy", [((30, 60), 0.25, 0.0), ((30, 60), -0.1, 0.2), ((64, 48), 0.3, -0.35)])
def test_pan_moves_the_old_target_by_the_panned_fraction(image_size, dx, dy):
    h, w = image_size
    orbit = OrbitCamera(target=(0.2, -0.1, 0.4), distance=2.2, azimuth=-30.0, elevation=25.0, fov=55.0)
    old_target = np.array(orbit.target)
    before = orbit.cameras(image_size, dtype=F64)
    orbit.pan(dx, dy, aspect=h / w)
    after = orbit.cameras(image_size, dtype=F64)
    np.testing.assert_allclose(projected(after, old_target)[:2], [w * (0.5 + dx), h * (0.5 + dy)], atol=1e-9)
    np.testing.assert_allclose(projected(after, orbit.target)[:2], [w / 2, h / 2], atol=1e-9)
    # In the view plane: same rotation, same distance, target moved orthogonally to the viewing direction.
    torch.testing.assert_close(after.R, before.R, atol=1e-12, rtol=0)
    assert orbit.distance == 2.2
    assert abs((np.array(orbit.target) - old_target).dot(before.R[0, 2].numpy())) < 1e-12


def test_zoom_scales_distance_within_limits():
    orbit = OrbitCamera(distance=2.0)
    orbit.zoom(1.5)
    assert orbit.distance == pytest.approx(3.0)
    orbit.zoom(1e-9)
    assert orbit.distance == pytest.approx(2e-3)  # 1e-3 times the distance it was made with
    orbit.zoom(1e20)
    assert orbit.distance == pytest.approx(2e6)
    copy = orbit.copy()
    copy.zoom(1e-20)
    assert copy.distance == pytest.approx(2e-3) and orbit.distance == pytest.approx(2e6)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="zoom: factor"):
            orbit.zoom(bad)


def test_bad_fields_are_named():
    with pytest.raises(ValueError, match="distance"):
        OrbitCamera(distance=-1.0)
    with pytest.raises(ValueError, match="up"):
        OrbitCamera(up=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="target"):
        OrbitCamera(target=(0.0, float("nan"), 0.0))
    with pytest.raises(ValueError, match="fov"):
        OrbitCamera(fov=180.0)
    assert OrbitCamera(elevation=120.0).elevation == 89.0


def test_zero_distance_is_finite():
    orbit = OrbitCamera(target=(1.0, 2.0, 3.0), distance=0.0, azimuth=10.0, elevation=5.0)
    np.testing.assert_allclose(orbit.eye().numpy(), [1.0, 2.0, 3.0])
    cams = orbit.cameras((16, 16))
    assert all(bool(torch.isfinite(x).all()) for x in (cams.K, cams.R, cams.t))
    assert np.isfinite(projected(cams, (1.0, 2.0, 3.0))).all()
    orbit.pan(0.3, 0.3)
    orbit.zoom(0.5)  # 1e-3 of the unit scale used when made at distance 0
    assert orbit.distance == pytest.approx(1e-3)
    assert np.isfinite(orbit.target).all()


def assert_framing(orbit, centre, distance, up, first_camera_centre=None):
    np.testing.assert_allclose(orbit.target, centre, atol=1e-6)
    assert orbit.distance == pytest.approx(distance, rel=1e-6)
    np.testing.assert_allclose(orbit.up, unit(up), atol=1e-6)
    if first_camera_centre is not None:  # all centres equally far: the eye is the first camera's
        np.testing.assert_allclose(orbit.eye().numpy(), first_camera_centre, atol=1e-6)


@pytest.mark.parametrize("normal,height", [((0, 1, 0), 0.0), ((0, 1, 0), 1.2), ((1.0, 2.0, 0.5), 0.0),
                                           ((0.3, -1.0, 0.4), -0.7)])
def test_framing_a_ring_recovers_centre_distance_and_up(normal, height):
    centre = np.array([0.4, -0.3, 1.1])
    cams = ring_cameras(centre, normal, radius=2.5, height=height, fov=50.0)
    orbit = OrbitCamera.framing(cams)
    assert_framing(orbit, centre, math.hypot(2.5, height), normal, centre_of(cams[0]))
    assert orbit.fov == pytest.approx(50.0)
    assert OrbitCamera.framing(cams, fov=30.0).fov == 30.0
    # The framed orbit camera sees the first camera's view (same eye, look-at point and up): same rotation.
    torch.testing.assert_close(orbit.cameras((60, 80), dtype=F64).R, cams[0].R, atol=1e-6, rtol=0)


def test_framing_idr_like_cameras_from_projection_matrices():
    # IDR/DTU-style: P = K [R | t] with an off-centre principal point, world "up" along -y and tilted, P scaled
    # arbitrarily; the cameras come back through from_projection as load_cameras does.
    centre = np.array([0.1, 0.2, -0.3])
    up = unit([0.2, -1.0, 0.3])
    ring = ring_cameras(centre, up, radius=3.0, height=0.0, n=9)
    K = torch.tensor([[900.0, 0.0, 410.0], [0.0, 905.0, 290.0], [0.0, 0.0, 1.0]], dtype=F64)
    P = K @ torch.cat([ring.R, ring.t[..., None]], -1) * 7.5
    cams = Cameras.from_projection(P, (576, 768))
    orbit = OrbitCamera.framing(cams)
    assert_framing(orbit, centre, 3.0, up, centre_of(cams[0]))
    assert orbit.fov == pytest.approx(math.degrees(2 * math.atan(384 / 900.0)))


def test_framing_mirrored_softras_cameras():
    cams = Cameras.from_spherical(torch.full((8,), 2.732, dtype=F64), torch.full((8,), 30.0, dtype=F64),
                                  torch.arange(8, dtype=F64) * 45.0, 30.0, (64, 64), convention="softras")
    assert bool(cams.mirrored.all())
    orbit = OrbitCamera.framing(cams)
    assert_framing(orbit, [0, 0, 0], 2.732, [0, 1, 0], centre_of(cams[0]))
    assert orbit.elevation == pytest.approx(30.0) and orbit.azimuth == pytest.approx(0.0, abs=1e-9)
    assert orbit.fov == pytest.approx(30.0)


def test_framing_degenerate_cameras_are_finite_and_look_ahead():
    # One camera: no common point of axes; the target is ahead of it.
    one = Cameras.look_at(torch.tensor([0.0, 0.0, -3.0], dtype=F64), image_size=(20, 20))
    orbit = OrbitCamera.framing(one)
    ahead = (np.array(orbit.target) - centre_of(one)).dot(one.R[0, 2].numpy())
    assert ahead > 0.5 and orbit.distance > 0.5
    # Parallel axes (a row of cameras all looking along +z): target ahead of their centroid.
    eyes = torch.tensor([[x, 0.0, -3.0] for x in (-1.0, 0.0, 1.0, 2.0)], dtype=F64)
    row = Cameras.look_at(eyes, eyes + torch.tensor([0.0, 0.0, 1.0], dtype=F64), image_size=(20, 20))
    orbit = OrbitCamera.framing(row)
    assert orbit.target[2] > -3.0 + 0.5 and orbit.target[0] == pytest.approx(0.5)
    # All cameras at one point, looking different ways: finite, with a positive distance.
    dirs = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]], dtype=F64)
    same = Cameras.look_at(torch.ones(3, 3, dtype=F64), torch.ones(3, 3, dtype=F64) + dirs, image_size=(20, 20))
    orbit = OrbitCamera.framing(same)
    assert np.isfinite(orbit.target).all() and np.isfinite(orbit.up).all() and orbit.distance > 0
    cams = orbit.cameras((20, 20))
    assert all(bool(torch.isfinite(x).all()) for x in (cams.R, cams.t))
    with pytest.raises(ValueError, match="at least 1 camera"):
        OrbitCamera.framing(row[0:0])


@pytest.mark.parametrize("convention", ["opencv", "softras"])
def test_matching_reproduces_the_camera(convention):
    target = np.array([0.3, -0.2, 0.5])
    up = unit([0.1, 1.0, -0.3])
    eye = np.array([2.0, 1.0, -1.5])
    cam = Cameras.look_at(torch.from_numpy(eye), torch.from_numpy(target), torch.from_numpy(up), fov=45.0,
                          image_size=(48, 64))
    if convention == "softras":  # the mirrored camera at the same pose
        K = cam.K.clone()
        K[:, 0, 0] *= -1
        cam = Cameras(K, cam.R, cam.t, cam.image_size)
    orbit = OrbitCamera.matching(cam, tuple(target))
    np.testing.assert_allclose(orbit.target, target, atol=1e-9)
    np.testing.assert_allclose(orbit.eye().numpy(), eye, atol=1e-9)
    assert orbit.fov == pytest.approx(45.0)
    mine = orbit.cameras((48, 64), dtype=F64)
    np.testing.assert_allclose(projected(mine, target), projected(cam, target), atol=1e-7)
    torch.testing.assert_close(mine.R, cam.R, atol=1e-9, rtol=0)
    # Orbiting from there keeps the distance to the target.
    orbit.orbit(30.0, 10.0)
    assert np.linalg.norm(orbit.eye().numpy() - target) == pytest.approx(np.linalg.norm(eye - target))


def test_matching_a_camera_not_looking_at_the_target_keeps_its_view():
    eye = np.array([0.0, 0.5, -3.0])
    cam = Cameras.look_at(torch.from_numpy(eye), torch.tensor([0.4, 0.0, 0.0], dtype=F64), image_size=(32, 32))
    for target in ((0.0, 0.0, 0.0), (0.0, 0.5, -5.0)):  # off the axis; behind the camera
        orbit = OrbitCamera.matching(cam, target)
        np.testing.assert_allclose(orbit.eye().numpy(), eye, atol=1e-9)
        torch.testing.assert_close(orbit.cameras((32, 32), dtype=F64).R, cam.R, atol=1e-9, rtol=0)
        assert orbit.distance > 0
    with pytest.raises(ValueError, match="1 camera"):
        OrbitCamera.matching(Cameras.look_at(torch.ones(2, 3)), (0.0, 0.0, 0.0))
