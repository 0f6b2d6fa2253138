"""``tdr mesh``: a mesh extracted again from a saved field, without training, and its input errors."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import torch
from app_helpers import assert_clean_error, ball_dataset
from typer.testing import CliRunner

from apps.main import app
from taichi_dr.core.mesh import load_mesh

runner = CliRunner()
# The tiny run of test_reconstruct_app (a 2 x 32 network, 4 iterations), no held-out views (not needed here).
TINY = ["--iterations", "4", "--rays", "64", "--depth", "2", "--width", "32", "--frequencies", "2",
        "--feature-dim", "4", "--render-depth", "1", "--render-width", "16", "--holdout-every", "0"]
RESOLUTION = 32


def invoke(*args):
    env = {k: v for k, v in os.environ.items() if k != "TDR_DEBUG"}
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny IDR dataset of a ball of radius 2 at (5, 5, 5) (so the scale_mat matters) and a tiny
    ``tdr reconstruct`` run on it whose mesh.ply is at --resolution 32."""
    root = tmp_path_factory.mktemp("mesh_app")
    ball_dataset(root, views=8, size=24)
    r = invoke("reconstruct", root / "data", "--out", root / "rec", *TINY, "--resolution", RESOLUTION)
    assert r.exit_code == 0, r.output
    return root


def summary(result) -> dict:
    """The numbers of the final line: faces, vertices, points evaluated, grid points, and the coordinates."""
    assert result.exit_code == 0, result.output
    line = result.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"Wrote (.+) \((.+)\): (\d+) faces, (\d+) vertices; (\d+) of the (\d+) grid points evaluated "
                     r"\(([\d.]+)%\) in ([\d.]+) s", line)
    assert m, line
    return dict(out=m.group(1), coordinates=m.group(2), faces=int(m.group(3)), verts=int(m.group(4)),
                evaluated=int(m.group(5)), grid=int(m.group(6)))


def sorted_verts(mesh) -> np.ndarray:
    v = mesh.verts.double().numpy()
    return v[np.lexsort(v.T[::-1])]


def test_mesh_is_the_mesh_reconstruct_wrote(run, tmp_path):
    """Same checkpoint, same resolution, same bound and scale_mat: the same mesh as the run's mesh.ply."""
    out = tmp_path / "again.ply"
    r = invoke("mesh", run / "rec", "--out", out, "--resolution", RESOLUTION)
    stats = summary(r)
    expected, got = load_mesh(run / "rec" / "mesh.ply"), load_mesh(out)
    assert (got.num_verts, got.num_faces) == (expected.num_verts, expected.num_faces)
    assert (stats["verts"], stats["faces"]) == (got.num_verts, got.num_faces)
    assert stats["grid"] == RESOLUTION ** 3 and 0 < stats["evaluated"] <= stats["grid"]
    np.testing.assert_allclose(got.verts.numpy(), expected.verts.numpy(), rtol=0, atol=1e-5)
    assert torch.equal(got.faces, expected.faces)
    # in the dataset's world coordinates (the ball of radius 2 at (5, 5, 5)): the checkpoint holds its scale_mat
    assert stats["coordinates"] == "world coordinates of the training data"
    assert got.verts.mean(0).sub(5.0).abs().max() < 1.0 and got.verts.min() > 1.0
    # progress on stderr: what is meshed, where, then one line per level
    assert f"Meshing {run / 'rec' / 'checkpoint.pt'} at 32^3" in r.stderr and "meshing level 1/" in r.stderr
    # the checkpoint file itself is accepted as well as its folder
    r = invoke("mesh", run / "rec" / "checkpoint.pt", "--out", tmp_path / "file.ply", "--resolution", RESOLUTION)
    assert summary(r)["faces"] == expected.num_faces


def test_sparse_equals_dense(run, tmp_path):
    """A coarse first grid (8 cells, so 3 levels to 32) evaluates fewer points and gives the dense mesh."""
    r = invoke("mesh", run / "rec", "--out", tmp_path / "dense.ply", "--resolution", RESOLUTION, "--dense")
    dense = summary(r)
    assert dense["evaluated"] == dense["grid"] == RESOLUTION ** 3
    r = invoke("mesh", run / "rec", "--out", tmp_path / "sparse.ply", "--resolution", RESOLUTION, "--coarse", 8)
    sparse = summary(r)
    levels = re.findall(r"^meshing level (\d+)/(\d+)", r.stderr, re.M)
    assert len(levels) >= 2 and levels == [(str(i), levels[0][1]) for i in range(1, len(levels) + 1)], r.stderr
    assert sparse["evaluated"] < 0.8 * dense["evaluated"]
    a, b = load_mesh(tmp_path / "dense.ply"), load_mesh(tmp_path / "sparse.ply")
    assert (a.num_verts, a.num_faces) == (b.num_verts, b.num_faces) == (dense["verts"], dense["faces"])
    np.testing.assert_allclose(sorted_verts(b), sorted_verts(a), rtol=0, atol=1e-5)


def test_coordinates_without_the_run_folder(run, tmp_path):
    """A checkpoint away from its run folder still gives world coordinates (it holds the dataset's
    scale_mat); one without it (older runs) and without a run folder gives the normalised frame and says so;
    --data brings the dataset's world coordinates back (its scale_mat as the dataset loader reads it)."""
    from apps.mesh import dataset_scale_mat
    from taichi_dr.data.datasets import load_dataset
    from taichi_dr.pipelines.checkpoint import load_checkpoint, save_checkpoint

    world = load_mesh(run / "rec" / "mesh.ply").verts.double()
    scale_mat = load_dataset(run / "data").scale_mat
    assert np.array_equal(dataset_scale_mat(run / "data", 1.5), scale_mat.numpy())
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(run / "rec" / "checkpoint.pt", moved / "checkpoint.pt")
    r = invoke("mesh", moved, "--out", tmp_path / "moved.ply", "--resolution", RESOLUTION)
    assert summary(r)["coordinates"] == "world coordinates of the training data"
    np.testing.assert_allclose(load_mesh(tmp_path / "moved.ply").verts.double().numpy(), world.numpy(), rtol=0,
                               atol=1e-5)
    alone = tmp_path / "alone"
    alone.mkdir()
    payload = load_checkpoint(run / "rec" / "checkpoint.pt")
    del payload["method_state"]["scale_mat"]
    save_checkpoint(alone / "checkpoint.pt", payload)
    r = invoke("mesh", alone, "--out", tmp_path / "normalised.ply", "--resolution", RESOLUTION)
    assert summary(r)["coordinates"] == "normalised coordinates"
    assert "does not name its dataset; give --data DATASET" in r.stderr
    normalised = load_mesh(tmp_path / "normalised.ply").verts.double()
    s = scale_mat.double()
    np.testing.assert_allclose((normalised @ s[:3, :3].T + s[:3, 3]).numpy(), world.numpy(), rtol=0, atol=1e-5)
    assert normalised.norm(dim=1).max() < 1.0            # inside the unit sphere, where IDR keeps the object
    r = invoke("mesh", alone, "--out", tmp_path / "world.ply", "--resolution", RESOLUTION, "--data", run / "data")
    assert summary(r)["coordinates"] == f"world coordinates of {run / 'data'}"
    np.testing.assert_allclose(load_mesh(tmp_path / "world.ply").verts.double().numpy(), world.numpy(), rtol=0,
                               atol=1e-5)


def test_nerf_synthetic_scale(run, tmp_path):
    """A NeRF-synthetic scene's scale is --scene-radius (as its loader has it); --data wins over metrics.json."""
    from apps.mesh import dataset_scale_mat
    from taichi_dr.data.datasets import load_dataset

    nerf = tmp_path / "nerf"
    nerf.mkdir()
    (nerf / "transforms_train.json").write_text("{}")   # only the layout is read, not the frames
    assert np.array_equal(dataset_scale_mat(nerf, 2.5), np.diag([2.5, 2.5, 2.5, 1.0]))
    r = invoke("mesh", run / "rec", "--out", tmp_path / "m.ply", "--resolution", RESOLUTION, "--data", nerf,
               "--scene-radius", 2.5)
    assert summary(r)["coordinates"] == f"world coordinates of {nerf} at scene radius 2.5"
    s = load_dataset(run / "data").scale_mat.double()
    normalised = (load_mesh(run / "rec" / "mesh.ply").verts.double() - s[:3, 3]) @ torch.linalg.inv(s[:3, :3]).T
    np.testing.assert_allclose(load_mesh(tmp_path / "m.ply").verts.double().numpy(), 2.5 * normalised.numpy(),
                               rtol=0, atol=1e-5)


def test_overwrite(run, tmp_path):
    out = tmp_path / "mesh.ply"
    out.write_text("an earlier mesh\n")
    assert_clean_error(invoke("mesh", run / "rec", "--out", out, "--resolution", 16), "--out", "mesh.ply", "exists",
                       "--overwrite", exit_code=1)
    assert out.read_text() == "an earlier mesh\n"
    r = invoke("mesh", run / "rec", "--out", out, "--resolution", 16, "--overwrite")
    assert summary(r)["faces"] == load_mesh(out).num_faces > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.ply"]     # no temporary file left


def _engine_checkpoint(path, method: str, version: int = 1):
    """An engine checkpoint of ``method`` as the engine writes it (its state cut short)."""
    from taichi_dr.pipelines.checkpoint import FORMAT, FORMAT_VERSION, save_checkpoint

    save_checkpoint(path, {"format": FORMAT, "format_version": FORMAT_VERSION, "method": method,
                           "method_version": version, "iteration": 3, "method_state": {}, "optimizer": None,
                           "rng": {}, "config": {}, "history": []})
    return path


def test_refusals(run, tmp_path):
    from taichi_dr.pipelines.mesh_fit import MeshFitMethod
    from taichi_dr.pipelines.pose.method import PoseMethod

    out = tmp_path / "out.ply"
    fit = _engine_checkpoint(tmp_path / "fit" / "checkpoint.pt", MeshFitMethod.name, MeshFitMethod.version)
    assert_clean_error(invoke("mesh", fit.parent, "--out", out), str(fit), "tdr fit-mesh", "not a field",
                       "expected", "'idr' from tdr reconstruct", exit_code=1)
    pose = _engine_checkpoint(tmp_path / "pose.pt", PoseMethod.name, PoseMethod.version)
    assert_clean_error(invoke("mesh", pose, "--out", out), "pose.pt", "tdr pose", "not a field", exit_code=1)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(300))
    assert_clean_error(invoke("mesh", garbage, "--out", out), "garbage.pt", "unreadable checkpoint",
                       "expected the checkpoint of a neural field", exit_code=1)
    torch.save({"model": {}}, tmp_path / "other.pt")
    assert_clean_error(invoke("mesh", tmp_path / "other.pt", "--out", out), "other.pt",
                       "not a taichi-dr checkpoint", exit_code=1)
    newer = _engine_checkpoint(tmp_path / "newer.pt", "idr", 99)
    assert_clean_error(invoke("mesh", newer, "--out", out), "newer.pt", "version 99", exit_code=1)
    assert_clean_error(invoke("mesh", tmp_path / "missing", "--out", out), "CHECKPOINT", "missing",
                       "does not exist", exit_code=1)
    assert_clean_error(invoke("mesh", tmp_path / "fit" / "..", "--out", out), "no checkpoint.pt", exit_code=1)
    assert not out.exists()


@pytest.mark.parametrize("args, needles", [
    (["--out", "m.xyz"], ["--out", "m.xyz", ".ply"]),
    (["--resolution", "4"], ["--resolution", ">= 8"]),
    (["--bound", "0"], ["--bound", "> 0"]),
    (["--level", "nan"], ["--level", "finite"]),
    (["--dense", "--coarse", "8"], ["--coarse", "--dense"]),
    (["--coarse", "0"], ["--coarse", "got 0"]),
    (["--data", "nowhere"], ["--data", "nowhere", "not found"]),
    (["--level", "5"], ["checkpoint.pt", "does not cross level 5"]),
    (["--out", "no/such/folder/m.ply"], ["--out", "does not exist"]),
])
def test_option_errors(run, tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    args = args if "--out" in args else [*args, "--out", "m.ply"]
    assert_clean_error(invoke("mesh", run / "rec", "--resolution", 16, *args), *needles, exit_code=1)
    assert not (tmp_path / "m.ply").exists()
