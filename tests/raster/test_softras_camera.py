"""SoftRas-convention cameras render exactly what SoftRas renders.

The reference below is an independent NumPy re-implementation of SoftRas's camera and rasterization, written
from its source (ShichenLiu/SoftRas; the camera functions are Kato's neural renderer's):

* ``soft_renderer/functional/get_points_from_angles.py``: the eye of a (distance, elevation, azimuth) row is
  ``d (cos e sin a, sin e, -cos e cos a)`` (degrees).
* ``soft_renderer/functional/look_at.py``: ``z = normalize(at - eye)``, ``x = normalize(cross(up, z))``,
  ``y = normalize(cross(z, x))`` with ``at = 0``, ``up = (0, 1, 0)``; vertices become ``(v - eye) @ [x y z]^T``.
* ``soft_renderer/functional/perspective.py``: ``x / z / tan(angle)``, ``y / z / tan(angle)`` (``angle`` is
  ``viewing_angle``, half the field of view; SoftRas's data uses 15 degrees).
* ``soft_renderer/cuda/soft_rasterize_cuda_kernel.cu``: pixel ``pn`` of an ``is x is`` image is row
  ``pn / is``, column ``xi = pn % is``, ``yi = is - 1 - row``, and its centre is at NDC
  ``((2 xi + 1 - is) / is, (2 yi + 1 - is) / is)``: NDC x to the right, NDC y up, row 0 at the top. The
  images are returned as computed (``rasterizer.py`` does not flip them). A pixel is covered ("hard" mode)
  when its barycentrics are all in [0, 1]; silhouettes do not cull (``fill_back``/``double_side``).

Nothing here uses taichi_dr's cameras or rasterizer: the hard rasterizer is a plain point-in-triangle test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import taichi_dr as tdr
from taichi_dr.core.camera import Cameras, load_cameras

SIZE = 64
VIEWING_ANGLE = 15.0  # SoftRas's data; our fov (full horizontal angle) is twice it
FOV = 2 * VIEWING_ANGLE


# ---------------------------------------------------------------------------------------------------------
# NumPy SoftRas reference
# ---------------------------------------------------------------------------------------------------------

def softras_eye(distance: float, elevation: float, azimuth: float) -> np.ndarray:
    """get_points_from_angles (degrees)."""
    e, a = math.radians(elevation), math.radians(azimuth)
    return distance * np.array([math.cos(e) * math.sin(a), math.sin(e), -math.cos(e) * math.cos(a)])


def softras_look_at(verts: np.ndarray, eye: np.ndarray) -> np.ndarray:
    """look_at(vertices, eye) with at = origin, up = +y: (V, 3) world -> (V, 3) SoftRas camera space."""
    z = -eye / np.linalg.norm(eye)
    x = np.cross([0.0, 1.0, 0.0], z)
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    y = y / np.linalg.norm(y)
    return (verts - eye) @ np.stack([x, y, z]).T


def softras_perspective(verts: np.ndarray, angle: float) -> np.ndarray:
    """perspective(vertices, angle): (V, 3) camera space -> (V, 3) NDC x, y and depth z."""
    width = math.tan(math.radians(angle))
    z = verts[:, 2]
    return np.stack([verts[:, 0] / z / width, verts[:, 1] / z / width, z], -1)


def softras_hard_silhouette(ndc: np.ndarray, faces: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool, row 0 at the top: pixels whose centre (the kernel's NDC formula) has barycentrics
    all in [0, 1] for some face. Each face is tested against the pixels of its bounding box (plus a margin),
    so the test itself decides coverage."""
    tri = ndc[faces][:, :, :2]  # (F, 3, 2)
    # Candidate (xi, yi) index ranges: a superset of each bounding box.
    lo = np.clip(np.floor((tri.min(1) + 1) * size / 2).astype(np.int64) - 1, 0, size - 1)
    hi = np.clip(np.ceil((tri.max(1) + 1) * size / 2).astype(np.int64) + 1, 0, size - 1)
    nx, ny = hi[:, 0] - lo[:, 0] + 1, hi[:, 1] - lo[:, 1] + 1
    count = nx * ny
    f = np.repeat(np.arange(len(faces)), count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    xi = lo[f, 0] + k % nx[f]
    yi = lo[f, 1] + k // nx[f]
    xp = (2.0 * xi + 1 - size) / size
    yp = (2.0 * yi + 1 - size) / size
    a, b, c = tri[f, 0], tri[f, 1], tri[f, 2]
    det = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    ok = np.abs(det) > 1e-12
    det = np.where(ok, det, 1.0)
    w1 = ((xp - a[:, 0]) * (c[:, 1] - a[:, 1]) - (yp - a[:, 1]) * (c[:, 0] - a[:, 0])) / det
    w2 = ((b[:, 0] - a[:, 0]) * (yp - a[:, 1]) - (b[:, 1] - a[:, 1]) * (xp - a[:, 0])) / det
    inside = ok & (w1 >= 0) & (w2 >= 0) & (1 - w1 - w2 >= 0)
    image = np.zeros((size, size), dtype=bool)
    image[size - 1 - yi[inside], xi[inside]] = True  # row = is - 1 - yi
    return image


def softras_silhouettes(verts: np.ndarray, faces: np.ndarray, rows: np.ndarray, size: int = SIZE,
                        angle: float = VIEWING_ANGLE) -> np.ndarray:
    """(N, size, size) bool silhouettes SoftRas renders for (distance, elevation, azimuth) ``rows``."""
    out = []
    for d, e, a in rows:
        cam = softras_look_at(verts, softras_eye(d, e, a))
        assert (cam[:, 2] > 0.5).all(), "the reference assumes every vertex is in front of the camera"
        out.append(softras_hard_silhouette(softras_perspective(cam, angle), faces, size))
    return np.stack(out)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per view IoU of (N, H, W) bool masks."""
    return (a & b).sum((1, 2)) / np.maximum((a | b).sum((1, 2)), 1)


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spot():
    tdr.init("cpu")
    return tdr.load_mesh(tdr.asset_path("spot/spot_triangulated.obj"))


def random_rows(n: int = 20, seed: int = 0) -> np.ndarray:
    """(n, 3) rows (distance, elevation, azimuth): distances 2.5-3.5, elevations all round the circle
    (negative and past 90 included) but not within ~6 degrees of straight up/down, where SoftRas's look_at
    has no x axis (up parallel to the view), azimuths beyond [0, 360) too."""
    rng = np.random.default_rng(seed)
    rows = []
    while len(rows) < n:
        d, e, a = rng.uniform(2.5, 3.5), rng.uniform(-180, 180), rng.uniform(-180, 540)
        if abs(math.cos(math.radians(e))) > 0.1:
            rows.append((d, e, a))
    return np.asarray(rows)


def render_alpha(mesh, cameras, settings) -> np.ndarray:
    out = tdr.render_mesh(mesh, cameras, None, settings, outputs=())
    return out.alpha.detach().cpu().numpy() > 0.5


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------

def test_spot_from_softras_camera_rows_matches_softras(spot, tmp_path):
    """A SoftRas camera.npy read with the defaults renders SoftRas's silhouettes: 20 random rows, 64x64,
    viewing_angle 15, hard and (SoftRas-sharp) soft. Spot is not left-right symmetric in most views (its
    head points one way), so a mirrored image fails this."""
    rows = random_rows()
    np.save(tmp_path / "camera.npy", rows)
    cams = load_cameras(tmp_path / "camera.npy", image_size=(SIZE, SIZE), fov=FOV)  # SoftRas's by default
    ref = softras_silhouettes(spot.verts.double().numpy(), spot.faces.numpy(), rows)
    assert ref.sum((1, 2)).min() > 100  # the object is in every view

    hard = render_alpha(spot, cams, tdr.RasterSettings(mode="hard"))
    assert iou(hard, ref).min() >= 0.99, iou(hard, ref)
    soft = render_alpha(spot, cams, tdr.RasterSettings(sigma=1e-6))
    assert iou(soft, ref).min() >= 0.99, iou(soft, ref)
    # float64 cameras and mesh agree too
    hard64 = render_alpha(spot.to(dtype=torch.float64), cams.to(dtype=torch.float64),
                          tdr.RasterSettings(mode="hard"))
    assert iou(hard64, ref).min() >= 0.99, iou(hard64, ref)

    # The test can fail: the un-mirrored cameras at the same eyes (the old behaviour) give SoftRas's images
    # flipped left-right, which here disagree badly.
    proper = load_cameras(tmp_path / "camera.npy", image_size=(SIZE, SIZE), fov=FOV, convention="opencv")
    flipped = render_alpha(spot, proper, tdr.RasterSettings(mode="hard"))
    assert iou(flipped, ref).mean() < 0.8
    # ... and they are exactly SoftRas's images mirrored (column j <-> W - 1 - j)
    assert iou(flipped[:, :, ::-1], ref).min() >= 0.99


def centroid_column(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N,) mean column of the covered pixels (pixel centres at j + 0.5)."""
    cols = np.arange(masks.shape[-1]) + 0.5
    return (masks * cols).sum((1, 2)) / masks.sum((1, 2))


def wedge_mesh(dtype=torch.float32) -> tdr.Mesh:
    """A closed tetrahedron well off the y axis, at world +x: left/right mistakes move it across the image."""
    verts = torch.tensor([[0.35, -0.15, -0.1], [0.75, -0.15, -0.1], [0.55, -0.15, 0.25], [0.55, 0.3, 0.0]],
                         dtype=dtype)
    faces = torch.tensor([[0, 2, 1], [0, 1, 3], [1, 2, 3], [2, 0, 3]])
    return tdr.Mesh(verts=verts, faces=faces)


def test_asymmetric_object_is_on_the_same_side_as_in_softras(spot):
    """Handedness, checked three ways. By hand from SoftRas's source: the row (3, 0, 0) puts the eye at
    (0, 0, -3) looking along +z; look_at's x axis is cross(up, z) = +x and the kernel draws NDC x to the
    right, so an object at world +x appears in the RIGHT half of SoftRas's image (a real camera there would
    see it on the left). Then against the NumPy reference at several rows, and the opencv convention on the
    other side."""
    mesh = wedge_mesh()
    rows = np.array([[3.0, 0.0, 0.0], [3.0, 25.0, 30.0], [2.8, -30.0, 150.0], [3.2, 10.0, 200.0],
                     [3.0, 60.0, -40.0]])
    ref = softras_silhouettes(mesh.verts.double().numpy(), mesh.faces.numpy(), rows)
    assert centroid_column(ref[:1])[0] > SIZE / 2 + 5  # the hand-derived fact about SoftRas

    cams = Cameras.from_spherical(torch.from_numpy(rows[:, 0]), torch.from_numpy(rows[:, 1]),
                                  torch.from_numpy(rows[:, 2]), fov=FOV, image_size=(SIZE, SIZE))
    ours = render_alpha(mesh.to(dtype=torch.float64), cams, tdr.RasterSettings(mode="hard"))
    assert centroid_column(ours[:1])[0] > SIZE / 2 + 5
    ref_side, our_side = centroid_column(ref) - SIZE / 2, centroid_column(ours) - SIZE / 2
    assert (np.abs(ref_side) > 2).all()  # every view puts the wedge clearly to one side
    assert (np.sign(our_side) == np.sign(ref_side)).all(), (our_side, ref_side)
    assert iou(ours, ref).min() >= 0.99, iou(ours, ref)

    proper = Cameras.from_spherical(torch.from_numpy(rows[:, 0]), torch.from_numpy(rows[:, 1]),
                                    torch.from_numpy(rows[:, 2]), fov=FOV, image_size=(SIZE, SIZE),
                                    convention="opencv")
    real = render_alpha(mesh.to(dtype=torch.float64), proper, tdr.RasterSettings(mode="hard"))
    assert (np.sign(centroid_column(real) - SIZE / 2) == -np.sign(ref_side)).all()


def test_backface_culling_with_mirrored_cameras(spot):
    """Spot is closed, so the nearest surface is always front-facing: culling back faces must not change the
    depth map, whichever the camera's handedness. (A mirrored image reverses screen-space winding.)"""
    rows = random_rows(4, seed=1)
    for convention in ("softras", "opencv"):
        cams = Cameras.from_spherical(torch.from_numpy(rows[:, 0]).float(), torch.from_numpy(rows[:, 1]).float(),
                                      torch.from_numpy(rows[:, 2]).float(), fov=FOV, image_size=(SIZE, SIZE),
                                      convention=convention)
        depth = {}
        for cull in (False, True):
            out = tdr.render_mesh(spot, cams, None, tdr.RasterSettings(mode="hard", cull_backfaces=cull),
                                  outputs=("depth",))
            depth[cull] = out.depth
        torch.testing.assert_close(depth[True], depth[False], atol=1e-4, rtol=0, msg=convention)


def test_mirrored_camera_pose_gradients_are_finite(spot):
    """Learnable corrections of SoftRas cameras (CameraParameters) get finite, non-zero gradients through
    the renderer, as for proper cameras."""
    rows = random_rows(2, seed=2)
    cams = Cameras.from_spherical(torch.from_numpy(rows[:, 0]).float(), torch.from_numpy(rows[:, 1]).float(),
                                  torch.from_numpy(rows[:, 2]).float(), fov=FOV, image_size=(32, 32))
    params = tdr.CameraParameters(cams, learn_focal=True)
    out = tdr.render_mesh(spot, params(), None, tdr.RasterSettings(sigma=1e-3, gamma=1e-2), outputs=())
    out.alpha.mean().backward()
    assert bool(params().mirrored.all())
    for name, p in params.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_write_idr_refuses_mirrored_cameras(tmp_path):
    """IDR's cameras.npz stores P = K [R | t]; a mirrored camera's P reads back as a different camera, so
    writing one is an error rather than a silently wrong dataset."""
    from taichi_dr.data.datasets import write_idr

    cams = Cameras.from_spherical(3.0, 20.0, torch.tensor([0.0, 90.0]), fov=FOV, image_size=(8, 8))
    images, masks = torch.zeros(2, 8, 8, 3), torch.zeros(2, 8, 8)
    with pytest.raises(ValueError, match=r"camera 0 is mirrored.*convention='opencv'"):
        write_idr(tmp_path / "ds", images, masks, cams)


# ---------------------------------------------------------------------------------------------------------
# command line: SoftRas's data files as a SoftRas user brings them
# ---------------------------------------------------------------------------------------------------------

def _invoke(*args):
    import os

    from typer.testing import CliRunner

    from apps.main import app

    env = {k: v for k, v in os.environ.items() if k != "TDR_DEBUG"}
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def test_fit_mesh_reads_softras_data_files_in_softras_convention(spot, tmp_path):
    """SoftRas's layout (examples/demo_deform.py): source.npy (N, 4, 64, 64) RGBA uint8 and camera.npy rows
    (distance, elevation, azimuth) given to set_eyes_from_angles, viewing_angle 15. fit-mesh's
    loader pairs them with cameras under which the true shape reproduces the silhouettes (by default);
    --camera-convention opencv gives the mirrored cameras, under which it does not."""
    from apps.fit_mesh import load_problem

    rows = random_rows(6, seed=3)
    sil = softras_silhouettes(spot.verts.double().numpy(), spot.faces.numpy(), rows)
    # uint8 like SoftRas's data/source.npy (its demo_deform.py divides by 255); white object, alpha = silhouette
    source = np.repeat(sil[:, None], 4, axis=1).astype(np.uint8) * 255
    np.save(tmp_path / "source.npy", source)
    np.save(tmp_path / "camera.npy", rows)
    agreement = {}
    for convention in ("softras", "opencv"):
        targets, cams = load_problem(tmp_path / "source.npy", tmp_path / "camera.npy", FOV, convention)
        assert torch.equal(targets.silhouettes > 0.5, torch.from_numpy(sil))
        agreement[convention] = iou(render_alpha(spot, cams, tdr.RasterSettings(mode="hard")), sil)
    assert agreement["softras"].min() >= 0.99, agreement
    assert agreement["opencv"].mean() < 0.8, agreement


def test_camera_convention_option_errors(tmp_path):
    np.save(tmp_path / "camera.npy", random_rows(2))
    np.save(tmp_path / "source.npy", np.zeros((2, 4, 16, 16), np.float32))
    for args in (("fit-mesh", "--targets", tmp_path / "source.npy", "--cameras", tmp_path / "camera.npy",
                  "--out", tmp_path / "fit"),
                 ("render", tdr.asset_path("spot/spot_triangulated.obj"), "--out", tmp_path / "r")):
        res = _invoke(*args, "--camera-convention", "opengl")
        assert res.exit_code not in (0, 130) and "Traceback" not in res.output, res.output
        errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and "--camera-convention" in errors[0] and "softras" in errors[0], res.stderr
