"""The ``tdr`` command line (render, fit-mesh, demo), target loading and the Chamfer metric.

Everything runs at tiny sizes (32-48 px, a few dozen iterations) through typer's CliRunner, in-process.
"""

from __future__ import annotations

import json
import math
import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from app_helpers import assert_clean_error, interrupt_fit_after
from typer.testing import CliRunner

from apps.main import app
from taichi_dr.data.targets import load_targets

runner = CliRunner()


def invoke(*args: str):
    env = {k: v for k, v in os.environ.items() if k != "TDR_DEBUG"}
    return runner.invoke(app, [str(a) for a in args], env=env)


# ----------------------------------------------------------------------------------------------------------
# Targets


def _disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    v, u = np.mgrid[0:h, 0:w] + 0.5
    return ((u - cx) ** 2 + (v - cy) ** 2 <= r * r).astype(np.float32)


def test_targets_png_folder_with_alpha(tmp_path):
    rgba = np.zeros((2, 12, 10, 4), np.uint8)
    rgba[0, 2:5, 3:7] = (255, 0, 0, 255)  # a red block at rows 2-4 (row 0 = top)
    rgba[1, 8:, :] = (0, 0, 255, 128)
    for i in (1, 0):  # written out of order: loading sorts by name
        iio.imwrite(tmp_path / f"v{i}.png", rgba[i])
    t = load_targets(tmp_path)
    assert t.names == ("v0.png", "v1.png")
    assert t.silhouettes.shape == (2, 12, 10) and t.image_size == (12, 10)
    assert torch.equal(t.silhouettes[0], torch.from_numpy(rgba[0, ..., 3] / 255.0).float())
    assert t.silhouettes[1, 8, 0].item() == pytest.approx(128 / 255)
    assert t.rgb.shape == (2, 12, 10, 3)
    assert t.rgb[0, 3, 4].tolist() == [1.0, 0.0, 0.0]
    assert t.rgb[0, 0, 0].tolist() == [0.0, 0.0, 0.0]


def test_targets_greyscale_masks(tmp_path):
    masks = [(_disc(16, 20, 10, 8, 5) * 255).astype(np.uint8), np.zeros((16, 20), np.uint8)]
    for i, m in enumerate(masks):
        iio.imwrite(tmp_path / f"{i:03d}.png", m)
    t = load_targets(tmp_path)
    assert t.rgb is None
    assert torch.equal(t.silhouettes, torch.from_numpy(np.stack(masks) / 255.0).float())


def test_targets_npy_uint8_and_float_rgba(tmp_path):
    sil = (np.random.default_rng(0).random((3, 8, 9)) > 0.5).astype(np.uint8) * 255
    np.save(tmp_path / "a.npy", sil)
    t = load_targets(tmp_path / "a.npy")
    assert t.rgb is None and t.silhouettes.dtype == torch.float32
    assert torch.equal(t.silhouettes, torch.from_numpy(sil / 255.0).float())

    x = np.random.default_rng(1).random((2, 4, 8, 9)).astype(np.float32)  # (N, C, H, W)
    np.save(tmp_path / "b.npy", x)
    t = load_targets(tmp_path / "b.npy")
    assert torch.equal(t.silhouettes, torch.from_numpy(x[:, 3]))
    assert torch.equal(t.rgb, torch.from_numpy(np.moveaxis(x[:, :3], 1, -1)))


@pytest.mark.parametrize("array, needle", [
    (np.zeros((2, 3, 8, 8), np.float32), "silhouette"),       # RGB without alpha
    (np.full((2, 8, 8), 2.0, np.float32), "[0, 1]"),          # floats out of range
    (np.zeros((8, 8), np.uint8), "shape"),                    # a single 2-D image
    (np.zeros((2, 8, 8), np.int64), "dtype"),
])
def test_targets_npy_errors(tmp_path, array, needle):
    np.save(tmp_path / "t.npy", array)
    with pytest.raises(ValueError, match="t.npy") as e:
        load_targets(tmp_path / "t.npy")
    assert needle in str(e.value)


def test_targets_png_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_targets(tmp_path / "nope")
    with pytest.raises(ValueError, match="no .png"):
        load_targets(tmp_path)
    iio.imwrite(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    iio.imwrite(tmp_path / "b.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match="b.png.*same size"):
        load_targets(tmp_path)
    (tmp_path / "b.png").unlink()
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    iio.imwrite(tmp_path / "b.png", rgb)
    with pytest.raises(ValueError, match="b.png.*alpha"):
        load_targets(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Metrics


def test_chamfer_concentric_spheres():
    from taichi_dr.core.mesh import icosphere
    from taichi_dr.core.metrics import bbox_diagonal, chamfer_distance

    a, b = icosphere(level=4, radius=1.0), icosphere(level=4, radius=1.1)
    d = chamfer_distance(a, b, n=20000)
    # Exactly 0.1 between the true spheres; the level-4 facets (sagitta ~2e-3) and the sampling add a few
    # thousandths.
    assert 0.099 < d < 0.106, d
    # A surface against itself: only the sampling bias, the mean nearest-neighbour distance of a Poisson
    # sample of density n / area, 0.5 / sqrt(n / area) ~ 0.0125.
    spacing = 0.5 / math.sqrt(20000 / (4 * math.pi))
    assert 0.7 * spacing < chamfer_distance(a, a, n=20000) < 1.3 * spacing
    assert chamfer_distance(b, a, n=20000) == pytest.approx(d, rel=0.03)
    assert bbox_diagonal(a) == pytest.approx(2 * math.sqrt(3), rel=1e-3)


def test_hard_iou():
    from taichi_dr.core.metrics import hard_iou

    p = torch.zeros(2, 4, 4)
    t = torch.zeros(2, 4, 4)
    p[0, :2] = 0.9  # 8 pixels
    t[0, :1] = 1.0  # 4 pixels, inside
    assert hard_iou(p, t).tolist() == [0.5, 1.0]  # the empty pair agrees


# ----------------------------------------------------------------------------------------------------------
# tdr render


def _project_json_cameras(path, points):
    from taichi_dr.core.camera import load_cameras

    cams = load_cameras(path)
    return cams.project(torch.as_tensor(points, dtype=torch.float32))  # (B, N, 3)


def test_render_spot(tmp_path):
    from scipy.ndimage import binary_dilation

    from taichi_dr.core.mesh import asset_path, load_mesh

    out = tmp_path / "r"
    res = invoke("render", asset_path("spot/spot_triangulated.obj"), "--views", 3, "--size", 32, "--out", out)
    assert res.exit_code == 0, res.output
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["view_000.png", "view_001.png", "view_002.png"]
    assert (out / "turntable.gif").is_file() and len(iio.imread(out / "turntable.gif", index=None)) == 3
    info = json.loads((out / "render.json").read_text())

    # Independent check of image against cameras: the normalised cow's face centroids, projected with the
    # saved cameras, land on (or, at 32 px, next to) opaque pixels, and every opaque pixel lies within the
    # projected bounding box. A flipped or shifted image fails (a vertical flip covers 50-97% of them).
    mesh = load_mesh(asset_path("spot/spot_triangulated.obj"))
    verts = (mesh.verts - torch.tensor(info["normalisation"]["centre"])) * info["normalisation"]["scale"]
    centroids = verts[mesh.faces].mean(1)
    uvz_c = _project_json_cameras(out / "cameras.json", centroids)
    uvz_v = _project_json_cameras(out / "cameras.json", verts)
    for i, p in enumerate(pngs):
        img = iio.imread(p)
        assert img.shape == (32, 32, 4)
        alpha = img[..., 3] > 127
        assert 0.05 < alpha.mean() < 0.6
        cols = uvz_c[i, :, 0].floor().long().clamp(0, 31)
        rows = uvz_c[i, :, 1].floor().long().clamp(0, 31)
        near_opaque = binary_dilation(alpha)  # thin parts can miss every pixel centre at 32 px
        assert near_opaque[rows.numpy(), cols.numpy()].mean() > 0.995
        ys, xs = np.nonzero(alpha)
        u, v = uvz_v[i, :, 0], uvz_v[i, :, 1]
        assert xs.min() >= float(u.min()) - 1.5 and xs.max() + 1 <= float(u.max()) + 1.5
        assert ys.min() >= float(v.min()) - 1.5 and ys.max() + 1 <= float(v.max()) + 1.5
        # Textured and lit: the colours vary inside the cow.
        assert img[..., :3][alpha].std() > 10


# ----------------------------------------------------------------------------------------------------------
# tdr fit-mesh


@pytest.fixture(scope="module")
def ellipsoid_targets(tmp_path_factory):
    """8 views (32x32) of an elongated ellipsoid rendered by `tdr render`: a folder with PNGs + cameras."""
    from taichi_dr.core.mesh import icosphere, save_mesh

    root = tmp_path_factory.mktemp("ellipsoid")
    m = icosphere(level=2)
    save_mesh(m.with_verts(m.verts * torch.tensor([1.0, 0.45, 0.6])), root / "ellipsoid.obj")
    res = invoke("render", root / "ellipsoid.obj", "--views", 8, "--size", 32, "--out", root / "targets")
    assert res.exit_code == 0, res.output
    return root / "targets"


def _ious(output: str) -> tuple[float, float]:
    import re

    m = re.search(r"hard ([0-9.]+) -> ([0-9.]+)", output)
    assert m, output
    return float(m.group(1)), float(m.group(2))


def _log_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _log_iters(path) -> list[int]:
    return [row["iteration"] for row in _log_rows(path)]


def test_fit_mesh_improves_then_resumes(tmp_path, ellipsoid_targets):
    from taichi_dr.core.mesh import load_mesh

    out = tmp_path / "fit"
    args = ["fit-mesh", "--targets", ellipsoid_targets, "--cameras", ellipsoid_targets / "cameras.json",
            "--out", out, "--log-every", 10]
    res = invoke(*args, "--iters", 30)
    assert res.exit_code == 0, res.output
    before, after = _ious(res.stdout)
    assert after > before + 0.1 and after > 0.8, (before, after)
    mesh = load_mesh(out / "mesh.obj")
    assert mesh.num_verts == 642 and mesh.num_faces == 1280
    assert _log_iters(out / "metrics.jsonl") == list(range(1, 31))
    progress = sorted(p.name for p in out.glob("progress_*.png"))
    assert progress == [f"progress_{i:04d}.png" for i in (0, 10, 20, 30)]
    assert len(iio.imread(out / "progress.gif", index=None)) == 4
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 30

    # Continue to 40: the iteration count advances, the log is extended, the fit does not get worse.
    res = invoke(*args, "--iters", 40, "--resume")
    assert res.exit_code == 0, res.output
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 40
    assert _log_iters(out / "metrics.jsonl") == list(range(1, 41))
    before2, after2 = _ious(res.stdout)
    assert before2 == before  # the initial metrics are kept from the first run
    assert after2 > after - 0.02

    # A non-empty folder is refused without --overwrite / --resume.
    assert_clean_error(invoke(*args, "--iters", 5), "not empty", "--overwrite")
    # Resuming with a different parameterisation is refused.
    assert_clean_error(invoke(*args, "--iters", 50, "--resume", "--template-scale", 1.5), "--template-scale")
    # --overwrite starts again from scratch.
    res = invoke(*args, "--iters", 5, "--overwrite")
    assert res.exit_code == 0, res.output
    assert _log_iters(out / "metrics.jsonl") == list(range(1, 6))
    assert sorted(p.name for p in out.glob("progress_*.png")) == ["progress_0000.png", "progress_0005.png"]


def test_fit_mesh_npy_targets_and_spherical_csv_cameras(tmp_path, ellipsoid_targets):
    """The same problem as an (N, 4, H, W) float array and SoftRas (distance, elevation, azimuth) rows."""
    info = json.loads((ellipsoid_targets / "render.json").read_text())
    rows = [[info["distance"], info["elevation"], a] for a in info["azimuths"]]
    np.savetxt(tmp_path / "cams.csv", rows, delimiter=",", header="distance,elevation,azimuth")
    imgs = np.stack([iio.imread(p) for p in sorted(ellipsoid_targets.glob("view_*.png"))])
    np.save(tmp_path / "targets.npy", np.moveaxis(imgs, -1, 1).astype(np.float32) / 255.0)
    res = invoke("fit-mesh", "--targets", tmp_path / "targets.npy", "--cameras", tmp_path / "cams.csv",
                 "--fov", info["fov"], "--out", tmp_path / "fit", "--iters", 15)
    assert res.exit_code == 0, res.output
    before, after = _ious(res.stdout)
    assert after > before + 0.1, (before, after)


def test_fit_mesh_ctrl_c_saves_checkpoint(tmp_path, ellipsoid_targets, monkeypatch):
    from taichi_dr.pipelines.mesh_fit import MeshFitMethod

    step = interrupt_fit_after(monkeypatch, 4)
    out = tmp_path / "fit"
    res = invoke("fit-mesh", "--targets", ellipsoid_targets, "--cameras", ellipsoid_targets / "cameras.json",
                 "--out", out, "--iters", 20)
    assert res.exit_code == 130, res.output
    assert "Traceback" not in res.output
    assert "--resume" in res.stderr and "Interrupted at iteration 4/20" in res.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 4
    assert not (out / "mesh.obj").exists()

    monkeypatch.setattr(MeshFitMethod, "step", step)
    res = invoke("fit-mesh", "--targets", ellipsoid_targets, "--cameras", ellipsoid_targets / "cameras.json",
                 "--out", out, "--iters", 6, "--resume")
    assert res.exit_code == 0, res.output
    assert _log_iters(out / "metrics.jsonl") == list(range(1, 7))


def test_fit_mesh_learns_colours(tmp_path):
    """--rgb on RGBA targets of a two-coloured ellipsoid (red above y = 0, blue below): the learned vertex
    colours, saved with the mesh, are red on top and blue underneath, and the colour loss falls."""
    from dataclasses import replace

    from taichi_dr.core.mesh import icosphere, load_mesh, save_mesh

    m = icosphere(level=2)
    v = m.verts * torch.tensor([1.0, 0.6, 0.7])
    top = (v[:, 1] > 0).float()[:, None]
    colors = top * torch.tensor([0.9, 0.1, 0.1]) + (1 - top) * torch.tensor([0.1, 0.1, 0.9])
    save_mesh(replace(m.with_verts(v), vert_colors=colors), tmp_path / "two_tone.ply")
    res = invoke("render", tmp_path / "two_tone.ply", "--views", 8, "--size", 32, "--out", tmp_path / "t")
    assert res.exit_code == 0, res.output

    out = tmp_path / "fit"
    res = invoke("fit-mesh", "--targets", tmp_path / "t", "--cameras", tmp_path / "t" / "cameras.json",
                 "--out", out, "--iters", 30, "--rgb", "--log-every", 30)
    assert res.exit_code == 0, res.output
    rgb_loss = [row["rgb"] for row in _log_rows(out / "metrics.jsonl")]
    assert rgb_loss[-1] < 0.7 * rgb_loss[0]
    fitted = load_mesh(out / "mesh.obj")
    assert fitted.vert_colors is not None
    y, c = fitted.verts[:, 1], fitted.vert_colors
    upper, lower = c[y > 0.1].mean(0), c[y < -0.1].mean(0)
    assert upper[0] > upper[2] + 0.1 and lower[2] > lower[0] + 0.1, (upper, lower)


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, no traceback


def _fit(targets, cameras, out, *extra):
    return invoke("fit-mesh", "--targets", targets, "--cameras", cameras, "--out", out, "--iters", 1, *extra)


def test_errors_render(tmp_path):
    assert_clean_error(invoke("render", tmp_path / "missing.obj", "--out", tmp_path / "o"), "missing.obj")
    bad = tmp_path / "bad.obj"
    bad.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 7\n")
    assert_clean_error(invoke("render", bad, "--out", tmp_path / "o"), "bad.obj", "index")
    noface = tmp_path / "noface.obj"
    noface.write_text("v 0 0 0\nv 1 0 0\n")
    assert_clean_error(invoke("render", noface, "--out", tmp_path / "o"), "noface.obj")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("keep me")
    from taichi_dr.core.mesh import asset_path

    spot = asset_path("spot/spot_triangulated.obj")
    assert_clean_error(invoke("render", spot, "--out", full), "not empty", "--overwrite")
    assert (full / "x.txt").read_text() == "keep me"
    assert_clean_error(invoke("render", spot, "--out", tmp_path / "o", "--distance", "near"), "--distance")
    assert_clean_error(invoke("render", spot, "--out", tmp_path / "o", "--views", 0), "--views")


def test_errors_fit_mesh(tmp_path, ellipsoid_targets):
    cams = ellipsoid_targets / "cameras.json"
    out = tmp_path / "o"
    # Missing files.
    assert_clean_error(_fit(tmp_path / "nope", cams, out), "nope")
    assert_clean_error(_fit(ellipsoid_targets, tmp_path / "nocams.json", out), "nocams.json")
    # Wrong target shapes: RGB without silhouette, 5-D.
    np.save(tmp_path / "rgb.npy", np.zeros((8, 3, 32, 32), np.float32))
    assert_clean_error(_fit(tmp_path / "rgb.npy", cams, out), "rgb.npy", "silhouette")
    np.save(tmp_path / "five.npy", np.zeros((1, 8, 1, 32, 32), np.float32))
    assert_clean_error(_fit(tmp_path / "five.npy", cams, out), "five.npy", "shape")
    # Number of targets vs cameras.
    np.save(tmp_path / "seven.npy", np.zeros((7, 32, 32), np.uint8))
    assert_clean_error(_fit(tmp_path / "seven.npy", cams, out), "8 cameras", "7 views")
    # Target size vs the cameras' image size (cameras.json says 32x32).
    np.save(tmp_path / "small.npy", np.zeros((8, 24, 24), np.uint8))
    assert_clean_error(_fit(tmp_path / "small.npy", cams, out), "cameras.json", "image_size")
    # Spherical cameras need matching rows too.
    np.savetxt(tmp_path / "cams.csv", [[3.0, 30.0, 0.0]] * 5, delimiter=",")
    assert_clean_error(_fit(ellipsoid_targets, tmp_path / "cams.csv", out), "5 cameras", "8 views")
    # Malformed template.
    bad = tmp_path / "bad.obj"
    bad.write_text("v 0 0 0\nf 1 2 3\n")
    assert_clean_error(_fit(ellipsoid_targets, cams, out, "--template", bad), "bad.obj")
    # --rgb with mask-only targets.
    np.save(tmp_path / "masks.npy", np.zeros((8, 32, 32), np.uint8))
    assert_clean_error(_fit(tmp_path / "masks.npy", cams, out, "--rgb"), "--rgb")
    # --resume without a checkpoint.
    assert_clean_error(_fit(ellipsoid_targets, cams, tmp_path / "empty", "--resume"), "checkpoint")
    # Settings out of range.
    assert_clean_error(_fit(ellipsoid_targets, cams, out, "--lr", -1), "lr")
    assert not out.exists()  # nothing was created by the failed runs


def test_debug_shows_traceback(tmp_path):
    res = runner.invoke(app, ["fit-mesh", "--targets", str(tmp_path / "nope"), "--cameras",
                              str(tmp_path / "c.json"), "--out", str(tmp_path / "o")], env={"TDR_DEBUG": "1"})
    assert res.exit_code != 0
    assert isinstance(res.exception, FileNotFoundError)


# ----------------------------------------------------------------------------------------------------------
# tdr demo, python -m apps


def test_demo_tiny(tmp_path):
    out = tmp_path / "demo"
    res = invoke("demo", "--out", out, "--views", 6, "--size", 32, "--iters", 20)
    assert res.exit_code == 0, res.output
    assert "Chamfer distance" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iou_final"]["iou_hard"] > summary["iou_initial"]["iou_hard"]
    assert summary["chamfer"] < summary["chamfer_initial"]
    assert len(list((out / "targets").glob("view_*.png"))) == 6
    for name in ("comparison.png", "turntable.gif", "fit/mesh.obj", "fit/progress.gif",
                 "targets/cameras.json"):
        assert (out / name).is_file(), name
    assert_clean_error(invoke("demo", "--out", out, "--views", 6, "--size", 32, "--iters", 1), "not empty")


def test_python_m_apps_help():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-m", "apps", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=root)
    assert res.returncode == 0, res.stderr
    for cmd in ("render", "fit-mesh", "demo", "reconstruct", "evaluate", "make-dataset"):
        assert cmd in res.stdout


# ----------------------------------------------------------------------------------------------------------
# taichi_dr.pipelines.mesh_fit pieces


def test_estimate_bounding_sphere_from_analytic_discs():
    """Cameras looking at a sphere's centre see a disc of radius f tan(asin(r / d)) around the principal
    point; the estimate recovers the centre and, up to that perspective factor, the radius."""
    from taichi_dr.core.camera import Cameras
    from taichi_dr.pipelines.mesh_fit import estimate_bounding_sphere

    centre, r, d, size, fov = torch.tensor([0.3, -0.2, 0.1]), 0.8, 4.0, 96, 40.0
    dirs = torch.tensor([[1.0, 0.3, 0.2], [-0.4, 0.5, 1.0], [0.2, -1.0, 0.4], [-1.0, -0.2, -0.6]])
    eyes = centre + d * dirs / dirs.norm(dim=1, keepdim=True)
    cams = Cameras.look_at(eyes, at=centre, fov=fov, image_size=(size, size))
    f = cams.K[0, 0, 0].item()
    r_px = f * math.tan(math.asin(r / d))
    sil = torch.from_numpy(np.stack([_disc(size, size, size / 2, size / 2, r_px)] * 4))
    c_est, r_est = estimate_bounding_sphere(sil, cams)
    assert torch.allclose(c_est, centre, atol=0.02), c_est
    assert r_est == pytest.approx(d * math.tan(math.asin(r / d)), rel=0.03)


def test_mesh_deformer_starts_at_the_template():
    from taichi_dr.core.mesh import icosphere
    from taichi_dr.pipelines.mesh_fit import MeshDeformer

    centre = torch.tensor([1.0, 2.0, -0.5])
    model = MeshDeformer(icosphere(level=2), centre, radius=0.7)
    mesh, unit = model()
    dist = (mesh.verts - centre).norm(dim=1)
    assert torch.allclose(dist, torch.full_like(dist, 0.7), atol=1e-5)
    assert unit.abs().max() < 1
    # Large displacements stay inside the box of half-size 2 * radius around the centre, gradients finite.
    with torch.no_grad():
        model.displacement.fill_(50.0)
        model.shift.fill_(-50.0)
    mesh, _ = model()
    mesh.verts.sum().backward()
    assert ((mesh.verts - centre).abs() <= 1.4 + 1e-5).all()
    assert torch.isfinite(model.displacement.grad).all() and torch.isfinite(model.shift.grad).all()
