"""Same seed, same result: two runs of `tdr fit-mesh`, IDR `tdr reconstruct` and pose refinement with one seed
give bitwise identical outputs, and a run interrupted and resumed ends exactly where an uninterrupted one does.

All runs are tiny (a few iterations on images of 16-32 pixels); what they check does not depend on size.
"""

from __future__ import annotations

import os
import shlex
import signal

import pytest
import torch
from app_helpers import ball_dataset, interrupt_fit_after
from bitwise import assert_bitwise
from typer.testing import CliRunner

from apps.main import app
from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import icosphere, save_mesh

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env=dict(os.environ, COLUMNS="200"))


# ----------------------------------------------------------------------------------------------------------
# tdr fit-mesh


@pytest.fixture(scope="module")
def fit_inputs(tmp_path_factory):
    """4 views (24x24) of an ellipsoid rendered by `tdr render`, and a 162-vertex template."""
    root = tmp_path_factory.mktemp("fit")
    m = icosphere(level=2)
    save_mesh(m.with_verts(m.verts * torch.tensor([1.0, 0.5, 0.7])), root / "ellipsoid.obj")
    save_mesh(icosphere(level=2), root / "template.obj")
    res = invoke("render", root / "ellipsoid.obj", "--views", 4, "--size", 24, "--out", root / "targets")
    assert res.exit_code == 0, res.output
    return root


def fit_mesh(inputs, out, iters: int, *extra):
    # Two of the four views per step, so the view sampler's random state matters too.
    res = invoke("fit-mesh", "--targets", inputs / "targets", "--cameras", inputs / "targets" / "cameras.json",
                 "--template", inputs / "template.obj", "--out", out, "--iters", iters, "--views-per-step", 2,
                 "--log-every", 100, "--seed", 3, *extra)
    return res


def fit_state(out) -> dict:
    """What a fit-mesh checkpoint holds that must not depend on how the run got there (not its timings)."""
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    return {"model": state["method_state"]["model"], "optimizer": state["optimizer"], "rng": state["rng"],
            "iteration": state["iteration"]}


def test_fit_mesh_twice_with_one_seed(fit_inputs, tmp_path):
    for name in ("a", "b"):
        res = fit_mesh(fit_inputs, tmp_path / name, 6)
        assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "mesh.obj").read_text() == (tmp_path / "b" / "mesh.obj").read_text()
    assert_bitwise(fit_state(tmp_path / "a"), fit_state(tmp_path / "b"), "fit-mesh checkpoint")


def test_fit_mesh_interrupted_and_resumed(fit_inputs, tmp_path, monkeypatch):
    """Ctrl-C after step 3 of 6 (the run stops after that step and saves), then --resume: the same as 6 steps
    without a break."""
    from taichi_dr.pipelines.mesh_fit import MeshFitMethod

    res = fit_mesh(fit_inputs, tmp_path / "straight", 6)
    assert res.exit_code == 0, res.output

    step = interrupt_fit_after(monkeypatch, 3)
    res = fit_mesh(fit_inputs, tmp_path / "resumed", 6)
    assert res.exit_code == 130, res.output
    assert fit_state(tmp_path / "resumed")["iteration"] == 3
    monkeypatch.setattr(MeshFitMethod, "step", step)
    res = fit_mesh(fit_inputs, tmp_path / "resumed", 6, "--resume")
    assert res.exit_code == 0, res.output
    assert_bitwise(fit_state(tmp_path / "resumed"), fit_state(tmp_path / "straight"), "resumed fit-mesh")
    assert (tmp_path / "resumed" / "mesh.obj").read_text() == (tmp_path / "straight" / "mesh.obj").read_text()


# ----------------------------------------------------------------------------------------------------------
# tdr reconstruct (IDR)

TINY_IDR = ["--rays", "64", "--depth", "2", "--width", "32", "--frequencies", "2", "--feature-dim", "4",
            "--render-depth", "1", "--render-width", "16", "--resolution", "16", "--holdout-every", "4",
            "--render-scale", "1.0", "--seed", "5"]


@pytest.fixture(scope="module")
def idr_dataset(tmp_path_factory):
    return ball_dataset(tmp_path_factory.mktemp("idr"), views=6, size=16)


def reconstruct(data, out, iterations: int, *extra):
    return invoke("reconstruct", data, "--out", out, "--iterations", iterations, *TINY_IDR, *extra)


def idr_state(out) -> dict:
    """An IDR checkpoint's contents that must not depend on how the run got there (not its timings)."""
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    history = [{k: v for k, v in row.items() if k != "time_s"} for row in state["history"]]
    return dict(iteration=state["iteration"], method_state=state["method_state"], optimizer=state["optimizer"],
                rng=state["rng"], nonfinite=state["nonfinite"], history=history)


def test_reconstruct_twice_with_one_seed(idr_dataset, tmp_path):
    for name in ("a", "b"):
        res = reconstruct(idr_dataset, tmp_path / name, 4)
        assert res.exit_code == 0, res.output
    a, b = idr_state(tmp_path / "a"), idr_state(tmp_path / "b")
    assert a["history"][-1]["iou"] > 0   # the tracer found the surface: the RGB and surface terms took part
    assert_bitwise(a, b, "reconstruct checkpoint")
    assert (tmp_path / "a" / "mesh.ply").read_bytes() == (tmp_path / "b" / "mesh.ply").read_bytes()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_reconstruct_interrupted_and_resumed(idr_dataset, tmp_path, monkeypatch, signum):
    """A run of 6 iterations (checkpoint every 5) that gets SIGINT/SIGTERM during iteration 4 saves at 4 and
    prints the resume command; that command ends exactly where 6 iterations without a break do (the
    checkpoint holds the model, optimiser, random states and counters)."""
    from taichi_dr.pipelines.idr import IDRMethod

    res = reconstruct(idr_dataset, tmp_path / "straight", 6, "--checkpoint-every", 5)
    assert res.exit_code == 0, res.output

    step = IDRMethod.step

    def step_then_signal(self, batch, iteration):
        result = step(self, batch, iteration)
        if iteration == 3:   # 0-based: the engine finishes this step, saves at iteration 4 and stops
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(IDRMethod, "step", step_then_signal)
    res = reconstruct(idr_dataset, tmp_path / "resumed", 6, "--checkpoint-every", 5)
    assert res.exit_code == 128 + signum, res.output
    assert "Interrupted at iteration 4/6" in res.stderr and "Traceback" not in res.output
    hint = res.stderr.split("Resume with: ", 1)[1].strip()
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["iteration"] == 4
    monkeypatch.setattr(IDRMethod, "step", step)
    args = shlex.split(hint)
    assert args[:2] == ["tdr", "reconstruct"] and args[-1] == "--resume"
    res = invoke(*args[1:])   # the printed command, as the user would paste it
    assert res.exit_code == 0, res.output
    assert_bitwise(idr_state(tmp_path / "resumed"), idr_state(tmp_path / "straight"), "resumed reconstruct")
    assert (tmp_path / "resumed" / "mesh.ply").read_bytes() == (tmp_path / "straight" / "mesh.ply").read_bytes()


# ----------------------------------------------------------------------------------------------------------
# pose refinement


@pytest.mark.parametrize("loss", ["silhouette_iou", "distance_transform"])
def test_refine_pose_twice(loss):
    from taichi_dr.core.transforms import axis_angle_to_matrix
    from taichi_dr.pipelines.pose import Pose, PoseSettings, Stage, refine_pose
    from taichi_dr.pipelines.pose.overlay import _hard_silhouette

    mesh = icosphere(level=2)
    mesh = mesh.with_verts(mesh.verts * torch.tensor([1.0, 0.55, 0.7]))
    cam = Cameras.look_at([0.0, 0.0, 0.0], at=[0.0, 0.0, 1.0], up=[0.0, -1.0, 0.0], fov=40.0, image_size=(32, 32))
    truth = Pose(torch.eye(3), torch.tensor([0.0, 0.0, 4.0]))
    target = _hard_silhouette(mesh, cam.K[0], truth, (32, 32)).float()
    aa = torch.tensor([0.1, -0.15, 0.05])
    init = Pose(axis_angle_to_matrix(aa), torch.tensor([0.1, -0.05, 4.2]))
    settings = PoseSettings(stages=(Stage(size=16, sigma=3e-3, iters=4), Stage(size=None, sigma=1e-3, iters=4)))
    runs = [refine_pose(mesh, target, cam, init, loss=loss, settings=settings) for _ in range(2)]
    a, b = runs
    assert a.history[-1] < a.history[0]
    assert a.history == b.history
    assert torch.equal(a.pose.R, b.pose.R) and torch.equal(a.pose.t, b.pose.t)
