"""Mesh fitting on the training engine: the library entry point (`fit_mesh`), interrupt and resume (bitwise,
in the library and through `tdr fit-mesh`), refused checkpoints, the non-finite policy and plain progress lines.

Problems are tiny (6 views of 24x24 of a two-coloured ellipsoid rendered by the engine's renderer, a
162-vertex template, a few iterations): what is checked does not depend on size. Fit quality at full size is
tests/pipelines/test_mesh_fit_thin.py and benchmarks/fit_thin.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from app_helpers import assert_clean_error, interrupt_fit_after, signal_at
from typer.testing import CliRunner

import taichi_dr as tdr
from apps.main import app
from taichi_dr.core.mesh import icosphere, save_mesh
from taichi_dr.pipelines import CheckpointError, Interrupted, TrainConfig, Trainer
from taichi_dr.pipelines.mesh_fit import FitSettings, MeshFitMethod, ResumeMismatch, fit_mesh

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bitwise import assert_bitwise
from engine_subprocess_toy import NoisyLinearRegression  # noqa: E402

SETTINGS = FitSettings(iters=8, views_per_step=3)  # 3 of 6 views per step: the view sampler's state matters


def _two_tone_ellipsoid():
    m = icosphere(level=2)
    v = m.verts * torch.tensor([1.0, 0.6, 0.7])
    top = (v[:, 1] > 0).float()[:, None]
    colors = top * torch.tensor([0.9, 0.1, 0.1]) + (1 - top) * torch.tensor([0.1, 0.1, 0.9])
    return replace(m.with_verts(v), vert_colors=colors)


@pytest.fixture(scope="module")
def problem():
    """(silhouettes (6, 24, 24), rgb (6, 24, 24, 3), cameras) of the ellipsoid, and the files tdr reads."""
    tdr.init("cpu")
    azimuth = torch.arange(6, dtype=torch.float64) * 60.0
    cams = tdr.Cameras.from_spherical(torch.full((6,), 3.0, dtype=torch.float64),
                                      torch.tensor([30.0, -15.0] * 3, dtype=torch.float64), azimuth, 30.0,
                                      (24, 24)).to(dtype=torch.float32)
    out = tdr.render_mesh(_two_tone_ellipsoid(), cams, None, tdr.RasterSettings(sigma=1e-5, far=100.0))
    return out.alpha.detach().cpu(), out.rgb.detach().cpu(), cams


def _fit(problem, out_dir, **kwargs):
    sil, rgb, cams = problem
    kwargs.setdefault("settings", SETTINGS)
    return fit_mesh(sil, cams, icosphere(level=2), rgb=rgb, learn_colors=True, seed=3, out_dir=out_dir,
                    progress="none", **kwargs)


def _rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


# ----------------------------------------------------------------------------------------------------------
# The library


def test_fit_mesh_library_writes_the_run_and_improves(problem, tmp_path):
    """fit_mesh: the engine's files, the fitted mesh, better IoU and colours than the template's, a
    render of the live state from a camera of another size, and the same result from the same seed."""
    result = _fit(problem, tmp_path / "a", settings=replace(SETTINGS, iters=25))
    out = tmp_path / "a"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "mesh.obj", "metrics.jsonl"]
    assert result.iterations == 25 and result.final["iou_hard"] > result.initial["iou_hard"] + 0.05, result
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == list(range(1, 26))
    assert {"loss", "neg_iou", "laplacian", "flatten", "rgb", "iou", "lr", "skipped"} <= rows[0].keys()
    assert rows[-1]["rgb"] < 0.8 * rows[0]["rgb"]
    # loss = neg_iou + w_lap * laplacian + w_flat * flatten + w_rgb * rgb, as logged
    s = SETTINGS
    for r in (rows[0], rows[-1]):
        assert r["loss"] == pytest.approx(r["neg_iou"] + s.laplacian_weight * r["laplacian"]
                                          + s.flatten_weight * r["flatten"] + s.rgb_weight * r["rgb"], rel=1e-5)
        assert r["iou"] == pytest.approx(1 - r["neg_iou"], abs=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "mesh-fit" and config["train"]["iterations"] == 25
    assert config["train"]["optimizer"]["lr"] == s.lr and config["train"]["optimizer"]["betas"] == list(s.betas)
    assert config["method_config"]["settings"]["views_per_step"] == 3
    assert config["method_config"]["identity"]["rgb"] is True

    cams = problem[2][:2]
    wide = tdr.Cameras(K=cams.K * torch.tensor([2.0, 2.0, 1.0])[:, None], R=cams.R, t=cams.t, image_size=(48, 48))
    images = result.method.render(wide)
    assert images["rgb"].shape == (2, 48, 48, 3) and images["alpha"].shape == (2, 48, 48)
    assert float(images["alpha"].min()) >= 0 and float(images["alpha"].max()) <= 1
    assert 0.1 < float((images["alpha"] > 0.5).float().mean()) < 0.9

    again = _fit(problem, None, settings=replace(SETTINGS, iters=25))
    assert torch.equal(again.mesh.verts, result.mesh.verts)
    assert torch.equal(again.mesh.vert_colors, result.mesh.vert_colors)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_and_resumed_fit_is_bitwise_the_uninterrupted_one(problem, tmp_path, signum):
    straight = _fit(problem, tmp_path / "straight")
    with pytest.raises(Interrupted) as info:
        _fit(problem, tmp_path / "cut", callbacks=[signal_at(3, signum)])
    assert info.value.signum == signum and info.value.iteration == 3
    assert not (tmp_path / "cut" / "mesh.obj").exists()
    resumed = _fit(problem, tmp_path / "cut", resume=True)

    assert resumed.iterations == 8
    assert torch.equal(resumed.mesh.verts, straight.mesh.verts)
    assert torch.equal(resumed.mesh.vert_colors, straight.mesh.vert_colors)
    assert resumed.initial == straight.initial and resumed.final == straight.final
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for key in ("iteration", "method_state", "optimizer", "rng"):
        assert_bitwise(a[key], b[key], key)
    assert len(a["optimizer"]["param_groups"]) == 2  # geometry and colours
    assert _without_time(_rows(tmp_path / "cut")) == _without_time(_rows(tmp_path / "straight"))


def test_resume_refuses_other_inputs_and_other_methods(problem, tmp_path):
    sil, rgb, cams = problem
    _fit(problem, tmp_path / "run", settings=replace(SETTINGS, iters=2))
    with pytest.raises(ResumeMismatch) as info:
        _fit(problem, tmp_path / "run", resume=True, template_scale=1.5)
    assert [key for key, _ in info.value.differences] == ["placement"]
    assert "\n" not in str(info.value)
    flipped = sil.flip(2)
    with pytest.raises(ResumeMismatch) as info:
        fit_mesh(flipped, cams, icosphere(level=2), SETTINGS, rgb=rgb, learn_colors=True, seed=3,
                 out_dir=tmp_path / "run", resume=True, progress="none")
    assert info.value.differences == [("targets", "content")]  # (the moved placement is not listed twice)
    with pytest.raises(ResumeMismatch, match=r"rgb \(True -> False\)"):
        fit_mesh(sil, cams, icosphere(level=2), SETTINGS, seed=3, out_dir=tmp_path / "run", resume=True,
                 progress="none")
    # Settings may change: more iterations and another lr continue the run.
    assert _fit(problem, tmp_path / "run", resume=True, settings=replace(SETTINGS, iters=3, lr=0.02)).iterations == 3

    # A checkpoint of another method (the engine tests' toy regression) in the folder: one line, naming both.
    toy_dir = tmp_path / "toy"
    Trainer(NoisyLinearRegression(), TrainConfig(iterations=2, progress="none"), out_dir=toy_dir).fit()
    with pytest.raises(CheckpointError) as info:
        _fit(problem, toy_dir, resume=True)
    message = str(info.value)
    assert "\n" not in message and "'toy-regression'" in message and "'mesh-fit'" in message
    assert "checkpoint.pt" in message


def test_nonfinite_loss_is_skipped_counted_then_stops_keeping_the_checkpoint(problem, tmp_path, monkeypatch):
    step = MeshFitMethod.step

    def nan_from_iteration_4(self, views, iteration):
        loss, stats = step(self, views, iteration)
        return (loss * float("nan"), stats) if iteration >= 4 else (loss, stats)

    monkeypatch.setattr(MeshFitMethod, "step", nan_from_iteration_4)
    with pytest.raises(FloatingPointError) as info:
        _fit(problem, tmp_path / "nan", settings=replace(SETTINGS, iters=40), checkpoint_every=2, max_nonfinite=5)
    assert "iterations 5-9" in str(info.value) and "\n" not in str(info.value)
    saved = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert saved["iteration"] == 4  # the last good one, untouched by the skipped steps
    rows = _rows(tmp_path / "nan")
    assert [r["skipped"] for r in rows] == [0] * 4 + [1] * 5
    assert all(r["loss"] is None for r in rows[4:]) and all(r["loss"] is not None for r in rows[:4])
    assert not (tmp_path / "nan" / "mesh.obj").exists()


# ----------------------------------------------------------------------------------------------------------
# Through `tdr fit-mesh`

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The ellipsoid's views as `tdr render` writes them (RGBA PNGs + cameras.json) and the template."""
    root = tmp_path_factory.mktemp("fit_files")
    save_mesh(_two_tone_ellipsoid(), root / "ellipsoid.ply")
    save_mesh(icosphere(level=2), root / "template.obj")
    res = invoke("render", root / "ellipsoid.ply", "--views", 6, "--size", 24, "--out", root / "targets")
    assert res.exit_code == 0, res.output
    return root


def invoke(*args):
    env = {k: v for k, v in os.environ.items() if k != "TDR_DEBUG"}
    return runner.invoke(app, [str(a) for a in args], env=dict(env, COLUMNS="200"))


def fit_cli(files, out, iters: int, *extra):
    return invoke("fit-mesh", "--targets", files / "targets", "--cameras", files / "targets" / "cameras.json",
                  "--template", files / "template.obj", "--out", out, "--iters", iters, "--views-per-step", 3,
                  "--rgb", "--log-every", 4, "--seed", 3, *extra)


PLAIN_LINE = re.compile(r"^iter (\d+)/(\d+)  loss [-+0-9.e]+  iou [0-9.]+  [0-9.e+]+ it/s  ETA \S+$")


def test_cli_interrupt_resume_and_plain_progress(files, tmp_path, monkeypatch):
    """Ctrl-C during `tdr fit-mesh` (exit 130, resume command printed), SIGTERM (exit 143), then --resume: the
    same checkpoint, log and mesh as a run without a break. CliRunner's output is not a terminal, so progress
    is plain lines (iteration, loss, IoU, rate, ETA), the first and the last at least."""
    res = fit_cli(files, tmp_path / "straight", 8)
    assert res.exit_code == 0, res.output
    straight_ious = res.stdout.splitlines()[0]
    lines = [m.groups() for m in map(PLAIN_LINE.match, res.stderr.splitlines()) if m]
    assert lines[0] == ("1", "8") and lines[-1] == ("8", "8"), res.stderr
    assert "\x1b[" not in res.stderr  # no terminal control codes in a log
    straight = tmp_path / "straight"
    assert sorted(p.name for p in straight.glob("progress_*.png")) == [
        "progress_0000.png", "progress_0004.png", "progress_0008.png"]
    assert (straight / "progress.gif").is_file() and not (straight / "loss_log.csv").exists()

    for signum, code, stop in ((signal.SIGINT, 130, 3), (signal.SIGTERM, 143, 5)):
        real_step = interrupt_fit_after(monkeypatch, stop, signum)
        res = fit_cli(files, tmp_path / "cut", 8, *(("--resume",) if signum == signal.SIGTERM else ()))
        monkeypatch.setattr(MeshFitMethod, "step", real_step)
        assert res.exit_code == code, res.output
        assert f"Interrupted at iteration {stop}/8" in res.stderr and "Traceback" not in res.output
        resume_line = [line for line in res.stderr.splitlines() if line.startswith("Resume with: ")]
        assert len(resume_line) == 1 and resume_line[0].endswith(" --resume"), res.stderr
        printed = shlex.split(resume_line[0][len("Resume with: "):])
        assert printed[:2] == ["tdr", "fit-mesh"] and "8" == printed[printed.index("--iterations") + 1], printed
        assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["iteration"] == stop
        assert not (tmp_path / "cut" / "mesh.obj").exists()

    res = invoke(*printed[1:])  # the printed command, as given
    assert res.exit_code == 0, res.output
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for key in ("iteration", "method_state", "optimizer", "rng"):
        assert_bitwise(a[key], b[key], key)
    assert _without_time(_rows(tmp_path / "cut")) == _without_time(_rows(straight))
    assert (tmp_path / "cut" / "mesh.obj").read_text() == (straight / "mesh.obj").read_text()
    assert res.stdout.splitlines()[0] == straight_ious  # "Silhouette IoU ... hard a -> b, soft c -> d ..."
    # Fewer --iters than the checkpoint has done: refused in the command's words.
    assert_clean_error(fit_cli(files, tmp_path / "cut", 6, "--resume"), "--resume", "iteration 8", "--iterations=6",
                       absent=("TrainConfig",))


def test_cli_refuses_another_methods_checkpoint_and_stops_on_nonfinite(files, tmp_path, monkeypatch):
    toy_dir = tmp_path / "toy"
    Trainer(NoisyLinearRegression(), TrainConfig(iterations=2, progress="none"), out_dir=toy_dir).fit()
    assert_clean_error(fit_cli(files, toy_dir, 4, "--resume"), "--resume", "checkpoint.pt", "'toy-regression'",
                       "'mesh-fit'", exit_code=1)

    step = MeshFitMethod.step

    def nan_from_iteration_4(self, views, iteration):
        loss, stats = step(self, views, iteration)
        return (loss * float("nan"), stats) if iteration >= 4 else (loss, stats)

    monkeypatch.setattr(MeshFitMethod, "step", nan_from_iteration_4)
    out = tmp_path / "nan"
    res = fit_cli(files, out, 40, "--checkpoint-every", 2)
    line = assert_clean_error(res, "non-finite", "iterations 5-24", "checkpoint.pt", exit_code=1)
    assert "skipped 20" in res.stderr  # the progress line counts them
    assert "iteration 4" in line
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 4
    assert [r["skipped"] for r in _rows(out)] == [0] * 4 + [1] * 20
    assert not (out / "mesh.obj").exists()
