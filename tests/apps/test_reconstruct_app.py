"""The reconstruct / evaluate / make-dataset commands end to end on tiny inputs, and their input errors."""

import json
import math
import re

import pytest
from app_helpers import assert_clean_error, ball_dataset
from typer.testing import CliRunner

from apps.main import app as tdr_app
from apps.reconstruct import app, mesh_metrics
from taichi_dr.core.mesh import icosphere

runner = CliRunner()
TINY = ["--iterations", "4", "--rays", "64", "--depth", "2", "--width", "32", "--frequencies", "2",
        "--feature-dim", "4", "--render-depth", "1", "--render-width", "16", "--resolution", "24",
        "--holdout-every", "4", "--render-scale", "1.0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    ball_dataset(root, views=8, size=24)   # away from the origin: scale_mat must undo it
    return root


def test_make_dataset_reconstruct_evaluate(dataset, tmp_path):
    data = dataset / "data"
    assert len(list((data / "image").glob("*.png"))) == 8 and (data / "gt_mesh.ply").is_file()
    out = tmp_path / "rec"
    r = runner.invoke(app, ["reconstruct", str(data), "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 4 and metrics["heldout_views"] == 2
    # not a terminal: plain progress lines on stderr (the first and the last step at least), with loss and PSNR
    lines = [line for line in r.stderr.splitlines() if line.startswith("iter ")]
    assert lines[0].startswith("iter 1/4  loss ") and lines[-1].startswith("iter 4/4  loss ")
    assert all(re.search(r"  psnr \S+  iou \S+  \S+ it/s  ETA \S+$", line) for line in lines), lines
    # the engine's run folder: one metrics row per iteration and the resolved configuration
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4] and rows[-1] == metrics["final"]
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "idr" and config["method_config"]["geometry_width"] == 32
    assert config["train"]["iterations"] == 4 and config["train"]["optimizer"]["schedule"] == "multistep"
    assert 0 <= metrics["heldout"]["mask_iou"] <= 1
    assert (out / "mesh.ply").is_file() and len(list((out / "heldout").glob("*_rgb.png"))) == 2
    # the mesh is in world units: near the ball of radius 2 centred at (5, 5, 5), not the unit sphere
    r = runner.invoke(app, ["evaluate", str(out / "mesh.ply"), "--gt", str(data / "gt_mesh.ply"),
                            "--points", "2000", "--data", str(data), "--holdout-every", "4"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):r.output.rindex("}") + 1])   # (skip kernel warnings)
    assert result["chamfer"] < 1.0 and 0 < result["normal_consistency"] <= 1
    assert 0 <= result["heldout"]["mask_iou"] <= 1
    # with the checkpoint (read weights_only), the held-out views are rendered from the networks: PSNR too
    r = runner.invoke(app, ["evaluate", str(out / "mesh.ply"), "--data", str(data), "--holdout-every", "4",
                            "--checkpoint", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):r.output.rindex("}") + 1])
    assert math.isfinite(result["heldout"]["psnr"]) and result["heldout"]["mask_iou"] == pytest.approx(
        metrics["heldout"]["mask_iou"], abs=0.2)
    # resume continues; a non-empty --out without --resume/--overwrite is refused
    longer = [*TINY[:1], "6", *TINY[2:]]
    r = runner.invoke(app, ["reconstruct", str(data), "--out", str(out), *longer, "--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.json").read_text())["final"]["iteration"] == 6
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6
    r = runner.invoke(app, ["reconstruct", str(data), "--out", str(out), *TINY])
    assert r.exit_code == 1 and "not empty" in r.output
    # other network sizes, or fewer iterations than done, cannot continue: one line naming them
    wider = [*longer[:7], "64", *longer[8:]]
    assert wider[6:8] == ["--width", "64"]
    assert_clean_error(runner.invoke(app, ["reconstruct", str(data), "--out", str(out), *wider, "--resume"]),
                       "--resume", "geometry_width=32", "geometry_width=64", exit_code=1)
    assert_clean_error(runner.invoke(app, ["reconstruct", str(data), "--out", str(out), *TINY, "--resume"]),
                       "--iterations 4", "iteration 6", exit_code=1)


def test_nonfinite_losses_stop_with_one_line(dataset, tmp_path, monkeypatch):
    """Every step non-finite: each is skipped (nothing learnt from it); after 20 in a row the run stops with one
    Error: line naming the iterations and the checkpoint kept (none here, so none is claimed)."""
    import taichi_dr.pipelines.idr as idr

    real_step = idr.training_step

    def nan_step(*args, **kwargs):
        loss, stats = real_step(*args, **kwargs)
        return loss * math.nan, stats

    monkeypatch.setattr(idr, "training_step", nan_step)
    longer = [*TINY[:1], "30", *TINY[2:]]
    r = runner.invoke(app, ["reconstruct", str(dataset / "data"), "--out", str(tmp_path / "nan"), *longer,
                            "--checkpoint-every", "0"])
    assert_clean_error(r, "20 consecutive steps", "non-finite", "iterations 1-20", "no checkpoint written",
                       exit_code=1)
    assert not (tmp_path / "nan" / "mesh.ply").exists()


def test_input_errors(tmp_path):
    r = runner.invoke(app, ["reconstruct", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = runner.invoke(app, ["reconstruct", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "not a dataset folder" in r.output
    r = runner.invoke(app, ["reconstruct", str(tmp_path), "--out", str(tmp_path / "o"), "--method", "neus"])
    assert r.exit_code == 1 and "--method" in r.output and "unisurf" in r.output
    r = runner.invoke(app, ["evaluate", str(tmp_path / "m.ply")])
    assert r.exit_code == 1 and "--gt" in r.output
    r = runner.invoke(tdr_app, ["make-dataset", str(tmp_path / "m.ply"), "--out", str(tmp_path / "d")])
    assert r.exit_code == 1 and "m.ply" in r.output


def test_mesh_metrics():
    a, b = icosphere(3, 1.0), icosphere(3, 1.1)
    m = mesh_metrics(a, b, n=20000)
    assert m["chamfer"] == pytest.approx(0.1, abs=0.01)
    assert m["normal_consistency"] > 0.99
    assert m["fscore"] < 0.05                                   # 0.1 apart, threshold 1% of 2.2*sqrt(3)
    assert mesh_metrics(a, a, n=20000)["fscore"] > 0.99


# The same tiny run for the volume renderers (a small bounding sphere and few samples).
TINY_UNISURF = [*TINY, "--method", "unisurf", "--bound-radius", "2", "--samples", "12", "--free-samples", "4",
                "--free-after", "2", "--search-steps", "32"]
TINY_NERF = [*TINY[:10], *TINY[14:], "--method", "nerf", "--bound-radius", "2", "--coarse-samples", "12",
             "--fine-samples", "8"]
assert "--feature-dim" not in TINY_NERF and "--render-depth" not in TINY_NERF and TINY_NERF[:2] == TINY[:2]


def _without_masks(dataset, tmp_path):
    import shutil

    data = tmp_path / "nomask"
    shutil.copytree(dataset / "data", data)
    shutil.rmtree(data / "mask")
    return data


@pytest.mark.parametrize("args, method", [(TINY_UNISURF, "unisurf"), (TINY_NERF, "nerf")])
def test_volume_methods_without_masks_end_to_end(dataset, tmp_path, args, method):
    """unisurf and nerf train from RGB alone (no mask/ folder), write the mesh in world units, held-out renders
    and metrics, resume, and their checkpoints score with evaluate and mesh again with tdr mesh."""
    data = _without_masks(dataset, tmp_path)
    out = tmp_path / method
    r = runner.invoke(app, ["reconstruct", str(data), "--out", str(out), *args])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["masks"] is False
    assert math.isfinite(metrics["heldout"]["psnr"]) and "mask_iou" not in metrics["heldout"]
    assert len(list((out / "heldout").glob("*_normals.png"))) == 2
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method
    # resume with more iterations; resuming with another --method is refused
    longer = [*args[:1], "6", *args[2:]]
    r = runner.invoke(app, ["reconstruct", str(data), "--out", str(out), *longer, "--resume"])
    assert r.exit_code == 0, r.output
    other = TINY_NERF if method == "unisurf" else TINY_UNISURF
    assert_clean_error(runner.invoke(app, ["reconstruct", str(data), "--out", str(out), *other, "--resume"]),
                       "--resume", f"--method {method}", exit_code=1)
    # the checkpoint renders the held-out views of a dataset with masks: PSNR and mask IoU
    # (a tiny NeRF may not become opaque anywhere: then no mesh, which the run says; the views are scored from
    # the field alone)
    assert (out / "mesh.ply").is_file() or (method == "nerf" and "no mesh written" in r.output)
    mesh = [str(out / "mesh.ply")] if (out / "mesh.ply").is_file() else []
    r = runner.invoke(app, ["evaluate", *mesh, "--data", str(dataset / "data"), "--holdout-every", "4",
                            "--checkpoint", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):r.output.rindex("}") + 1])
    assert result["heldout"]["method"] == method and 0 <= result["heldout"]["mask_iou"] <= 1
    level = [] if method == "unisurf" else ["--level", "0.7"]
    r = runner.invoke(tdr_app, ["mesh", str(out), "--out", str(tmp_path / "again.ply"), "--resolution", "24", *level])
    assert r.exit_code == 0 or "does not cross level" in r.output, r.output


def test_method_option_errors(dataset, tmp_path):
    data = dataset / "data"
    o = str(tmp_path / "o")
    for args, needles in (
            (["--no-masks"], ["--no-masks", "IDR needs object masks"]),
            (["--samples", "8"], ["--samples", "only for --method unisurf", "not idr"]),
            (["--method", "nerf", "--learn-cameras"], ["--learn-cameras", "only for --method idr"]),
            (["--method", "unisurf", "--fine-samples", "8"], ["--fine-samples", "nerf"]),
            (["--method", "unisurf", "--bound-radius", "0.5"], ["--bound-radius", "object_radius"]),
            (["--method", "unisurf", "--samples", "0"], ["--samples"]),
            (["--method", "nerf", "--background", "2"], ["--background", "[0, 1]"]),
            (["--method", "nerf", "--coarse-samples", "1"], ["--coarse-samples", ">= 2"])):
        assert_clean_error(runner.invoke(app, ["reconstruct", str(data), "--out", o, *args]), *needles,
                           exit_code=1)
    nomask = _without_masks(dataset, tmp_path)
    assert_clean_error(runner.invoke(app, ["reconstruct", str(nomask), "--out", o, "--method", "unisurf",
                                           "--masks"]), "no object masks", exit_code=1)
    assert_clean_error(runner.invoke(app, ["reconstruct", str(nomask), "--out", o]), "no object masks",
                       "IDR needs them", exit_code=1)
