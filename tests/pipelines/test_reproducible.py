"""Same seed, same result: two runs of `tdr fit-mesh`, IDR `tdr reconstruct` and pose refinement with one seed
give bitwise identical outputs, and a run interrupted and resumed ends exactly where an uninterrupted one does.

All runs are tiny (a few iterations on images of 16-32 pixels); what they check does not depend on size.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from app_helpers import interrupt_fit_after
from typer.testing import CliRunner

from apps.main import app
from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import icosphere, save_mesh

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env=dict(os.environ, COLUMNS="200"))


def assert_same_state(a: dict, b: dict, what: str) -> None:
    """Two state dicts (nested dicts/lists of tensors and numbers) are identical, bit for bit."""
    assert type(a) is type(b), what
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same_state(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        diff = "" if torch.equal(a, b) else f"max difference {float((a.double() - b.double()).abs().max()):.3g}"
        assert not diff, f"{what}: {diff}"
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), what
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


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
    state = torch.load(out / "checkpoint.pt", weights_only=True)["fitter"]
    return {k: state[k] for k in ("model", "optimizer", "generator", "iteration")}


def test_fit_mesh_twice_with_one_seed(fit_inputs, tmp_path):
    for name in ("a", "b"):
        res = fit_mesh(fit_inputs, tmp_path / name, 6)
        assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "mesh.obj").read_text() == (tmp_path / "b" / "mesh.obj").read_text()
    assert_same_state(fit_state(tmp_path / "a"), fit_state(tmp_path / "b"), "fit-mesh checkpoint")


def test_fit_mesh_interrupted_and_resumed(fit_inputs, tmp_path, monkeypatch):
    """Ctrl-C after step 3 of 6 (the run stops after that step and saves), then --resume: the same as 6 steps
    without a break."""
    from taichi_dr.pipelines.mesh_fit import MeshFitter

    res = fit_mesh(fit_inputs, tmp_path / "straight", 6)
    assert res.exit_code == 0, res.output

    step = interrupt_fit_after(monkeypatch, 3)
    res = fit_mesh(fit_inputs, tmp_path / "resumed", 6)
    assert res.exit_code == 130, res.output
    assert fit_state(tmp_path / "resumed")["iteration"] == 3
    monkeypatch.setattr(MeshFitter, "step", step)
    res = fit_mesh(fit_inputs, tmp_path / "resumed", 6, "--resume")
    assert res.exit_code == 0, res.output
    assert_same_state(fit_state(tmp_path / "resumed"), fit_state(tmp_path / "straight"), "resumed fit-mesh")
    assert (tmp_path / "resumed" / "mesh.obj").read_text() == (tmp_path / "straight" / "mesh.obj").read_text()


# ----------------------------------------------------------------------------------------------------------
# tdr reconstruct (IDR)

TINY_IDR = ["--rays", "64", "--depth", "2", "--width", "32", "--frequencies", "2", "--feature-dim", "4",
            "--render-depth", "1", "--render-width", "16", "--resolution", "16", "--holdout-every", "4",
            "--render-scale", "1.0", "--seed", "5"]


@pytest.fixture(scope="module")
def idr_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("idr")
    mesh = icosphere(2, 2.0)
    mesh.verts += 5.0
    save_mesh(mesh, root / "ball.ply")
    res = invoke("make-dataset", root / "ball.ply", "--views", 6, "--size", 16, "--out", root / "data")
    assert res.exit_code == 0, res.output
    return root / "data"


def reconstruct(data, out, iterations: int, *extra):
    return invoke("reconstruct", data, "--out", out, "--iterations", iterations, *TINY_IDR, *extra)


def idr_state(out) -> dict:
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    history = [{k: v for k, v in h.items() if k != "rays_per_s"} for h in state["history"]]  # (a timing)
    return dict(iteration=state["iteration"], model=state["model"], optimizer=state["optimizer"],
                scheduler=state["scheduler"], generator=state["generator"], history=history)


def test_reconstruct_twice_with_one_seed(idr_dataset, tmp_path):
    for name in ("a", "b"):
        res = reconstruct(idr_dataset, tmp_path / name, 4)
        assert res.exit_code == 0, res.output
    a, b = idr_state(tmp_path / "a"), idr_state(tmp_path / "b")
    assert a["history"][-1]["iou"] > 0   # the tracer found the surface: the RGB and surface terms took part
    assert_same_state(a, b, "reconstruct checkpoint")
    assert (tmp_path / "a" / "mesh.ply").read_bytes() == (tmp_path / "b" / "mesh.ply").read_bytes()


def test_reconstruct_interrupted_and_resumed(idr_dataset, tmp_path, monkeypatch):
    """A run of 6 iterations (checkpoint every 3) interrupted inside iteration 4, then --resume: the same as
    6 iterations without a break (the checkpoint holds the model, optimiser, schedule and random state)."""
    import taichi_dr.pipelines.idr as train_module

    res = reconstruct(idr_dataset, tmp_path / "straight", 6, "--checkpoint-every", 3)
    assert res.exit_code == 0, res.output

    step = train_module.training_step
    calls = []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:   # after iteration 4's rays were drawn, before its update
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_step", interrupted_step)
    res = reconstruct(idr_dataset, tmp_path / "resumed", 6, "--checkpoint-every", 3)
    assert res.exit_code != 0 and len(calls) == 4
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["iteration"] == 3
    monkeypatch.setattr(train_module, "training_step", step)
    res = reconstruct(idr_dataset, tmp_path / "resumed", 6, "--checkpoint-every", 3, "--resume")
    assert res.exit_code == 0, res.output
    assert_same_state(idr_state(tmp_path / "resumed"), idr_state(tmp_path / "straight"), "resumed reconstruct")


# ----------------------------------------------------------------------------------------------------------
# pose refinement


@pytest.mark.parametrize("loss", ["silhouette_iou", "distance_transform"])
def test_refine_pose_twice(loss):
    from taichi_dr.pipelines.pose.refine import Pose, PoseSettings, Stage, refine_pose

    mesh = icosphere(level=2)
    mesh = mesh.with_verts(mesh.verts * torch.tensor([1.0, 0.55, 0.7]))
    cam = Cameras.look_at([0.0, 0.0, 0.0], at=[0.0, 0.0, 1.0], up=[0.0, -1.0, 0.0], fov=40.0, image_size=(32, 32))
    truth = Pose(torch.eye(3), torch.tensor([0.0, 0.0, 4.0]))
    from taichi_dr.pipelines.pose.refine import _hard_silhouette

    target = _hard_silhouette(mesh, cam.K[0], truth, (32, 32)).float()
    aa = torch.tensor([0.1, -0.15, 0.05])
    from taichi_dr.core.camera import axis_angle_to_matrix

    init = Pose(axis_angle_to_matrix(aa), torch.tensor([0.1, -0.05, 4.2]))
    settings = PoseSettings(stages=(Stage(size=16, sigma=3e-3, iters=4), Stage(size=None, sigma=1e-3, iters=4)))
    runs = [refine_pose(mesh, target, cam, init, loss=loss, settings=settings) for _ in range(2)]
    a, b = runs
    assert a.history[-1] < a.history[0]
    assert a.history == b.history
    assert torch.equal(a.pose.R, b.pose.R) and torch.equal(a.pose.t, b.pose.t)
