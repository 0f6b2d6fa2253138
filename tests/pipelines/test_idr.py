"""IDR on the training engine, end to end on tiny synthetic data: convergence, interrupt and bitwise resume,
checkpoints (weights_only, other methods refused), the non-finite policy, meshing, rendering."""

import math
import signal

import numpy as np
import pytest
import torch
from app_helpers import signal_at
from bitwise import assert_bitwise, run_state
from sdf_scenes import dataset_from_sdf, ring_cameras

from taichi_dr.core.mesh import face_areas, face_normals, icosphere
from taichi_dr.core.metrics import chamfer_distance
from taichi_dr.implicit.analytic import box_sdf, sphere_sdf
from taichi_dr.implicit.meshing import extract_mesh
from taichi_dr.pipelines import Callback, CheckpointError, Interrupted, NonFiniteError, Trainer
from taichi_dr.pipelines.checkpoint import FORMAT, FORMAT_VERSION, save_checkpoint
from taichi_dr.pipelines.config import lr_factor
from taichi_dr.pipelines.idr import (
    IDRConfig,
    IDRMethod,
    IDRModel,
    image_metrics,
    load_model,
    render_rays,
    render_views,
    train_idr,
)

CENTER = (0.1, 0.0, -0.05)
TINY = dict(rays_per_batch=128, geometry_depth=3, geometry_width=48, geometry_frequencies=0,
            geometry_skip_in=(), feature_dim=8, rendering_depth=2, rendering_width=32,
            rendering_frequencies=0,
            lr=5e-3, checkpoint_every=0)


def _sphere_dataset():
    return dataset_from_sdf(lambda x: sphere_sdf(x, 0.4, CENTER), ring_cameras())


def _true_sphere():
    m = icosphere(4, 0.4)
    m.verts += torch.tensor(CENTER)
    return m


def test_reconstruction_of_a_sphere_converges():
    ds = _sphere_dataset()
    model, history = train_idr(ds, IDRConfig(iterations=100, **TINY), progress="none")
    assert len(history) == 100 and [h["iteration"] for h in history] == list(range(1, 101))
    assert sum(h["skipped"] for h in history) == 0
    torch.manual_seed(0)   # the untrained network: a small one is a sphere only on average over seeds
    before = chamfer_distance(extract_mesh(IDRModel(IDRConfig(**TINY)).sdf, 40), _true_sphere(), 4000)
    after = chamfer_distance(extract_mesh(model.sdf, 40), _true_sphere(), 4000)
    assert before > 0.1
    assert after < 0.03, (before, after)
    # A trained network is meshed sparsely as densely (its slope is about 1, within the default bound). Not
    # bit for bit: a network's value at a point can differ in the last bits with the batch it is evaluated in.
    dense = extract_mesh(model.sdf, 65, dense=True)
    sparse, stats = extract_mesh(model.sdf, 65, coarse=8, return_stats=True)
    assert torch.equal(dense.faces, sparse.faces)
    torch.testing.assert_close(sparse.verts, dense.verts, rtol=0, atol=1e-5)   # the grid spacing is 0.031
    assert stats["points_evaluated"] < 0.5 * 65 ** 3
    assert np.mean([h["psnr"] for h in history[-10:]]) > 20
    views = render_views(model, ds.cameras[:3], IDRConfig().tracer)
    assert image_metrics(views, ds.images[:3], ds.masks[:3])["mask_iou"] > 0.9   # (~0.45 at initialisation)


@pytest.mark.parametrize("iterations", [1, 3, 16])
def test_lr_schedule_is_idrs_multistep(iterations):
    """IDRConfig's learning-rate steps through the engine give what torch's MultiStepLR gave the old loop (with
    its milestones at max(1, int(fraction * iterations)), so very short runs too)."""
    cfg = IDRConfig(iterations=iterations, lr=0.01, lr_milestones=(0.5, 0.75), lr_gamma=0.5)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    milestones = sorted({max(1, int(m * iterations)) for m in cfg.lr_milestones})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.5)
    train = cfg.train_config()
    for i in range(cfg.iterations):
        assert cfg.lr * lr_factor(train.optimizer, i, train.iterations) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert (train.iterations, train.seed, train.checkpoint_every) == (iterations, 0, 500)


@pytest.mark.parametrize("learn_cameras", [False, True])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume_is_bitwise_identical(tmp_path, learn_cameras, signum):
    ds = _sphere_dataset()
    cfg = IDRConfig(iterations=6, **{**TINY, "learn_cameras": learn_cameras, "camera_lr": 1e-3})
    straight, _ = train_idr(ds, cfg, tmp_path / "a", progress="none")

    with pytest.raises(Interrupted) as stop:
        train_idr(ds, cfg, tmp_path / "b", progress="none", callbacks=[signal_at(4, signum)])
    assert stop.value.signum == signum and stop.value.iteration == 4
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["iteration"] == 4
    resumed, history = train_idr(ds, cfg, tmp_path / "b", resume=True, progress="none")
    assert [h["iteration"] for h in history] == list(range(1, 7))
    assert_bitwise(run_state(tmp_path / "b"), run_state(tmp_path / "a"), "resumed IDR run")
    if learn_cameras:   # the cameras were refined (and restored): their state is in the compared checkpoint
        rot = run_state(tmp_path / "a")["method_state"]["cameras"]["rot"]
        assert float(rot.abs().max()) > 0
    x = torch.randn(10, 3) * 0.5
    assert torch.equal(resumed.sdf(x), straight.sdf(x))


def test_checkpoint_loads_weights_only_and_refuses_others(tmp_path):
    ds = _sphere_dataset()
    cfg = IDRConfig(iterations=3, **TINY)
    model, _ = train_idr(ds, cfg, tmp_path / "a", progress="none")
    payload = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)   # plain types only
    assert payload["method"] == "idr" and payload["iteration"] == 3
    assert payload["config"]["method_config"] == cfg.to_dict()
    loaded, loaded_cfg = load_model(tmp_path / "a")
    assert loaded_cfg == cfg
    x = torch.randn(10, 3) * 0.5
    assert torch.equal(loaded.sdf(x), model.sdf(x))

    # a checkpoint of another method, or of another IDR state version: one line naming the file
    other = tmp_path / "other" / "checkpoint.pt"
    for method, version, needle in (("mesh-fit", 1, "method 'mesh-fit', not 'idr'"), ("idr", 2, "version 2")):
        save_checkpoint(other, {"format": FORMAT, "format_version": FORMAT_VERSION, "method": method,
                                "method_version": version, "iteration": 1, "method_state": {}, "config": {}})
        for attempt in (lambda: load_model(other),
                        lambda: train_idr(ds, cfg, other.parent, resume=True, progress="none")):
            with pytest.raises(CheckpointError, match=needle) as e:
                attempt()
            assert str(other) in str(e.value) and "\n" not in str(e.value)
    # the loop before the engine saved arbitrary objects with weights_only=False: refused, not unpickled
    torch.save({"config": cfg.to_dict(), "model": model.state_dict(), "iteration": 3}, other)
    with pytest.raises(CheckpointError, match="not a taichi-dr checkpoint"):
        load_model(other)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(tmp_path / "missing")

    # other network sizes cannot continue: one line naming the setting and both values
    with pytest.raises(ValueError, match=r"geometry_width=48, this run has geometry_width=32") as e:
        train_idr(ds, IDRConfig(iterations=8, **{**TINY, "geometry_width": 32}), tmp_path / "a", resume=True,
                  progress="none")
    assert "\n" not in str(e.value)
    # while iterations (and so the schedules) may be raised
    _, history = train_idr(ds, IDRConfig(iterations=5, **TINY), tmp_path / "a", resume=True, progress="none")
    assert len(history) == 5


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    """The engine's policy reaches IDR: a step with a NaN loss changes nothing and is counted; a run of them
    stops with NonFiniteError and leaves the last good checkpoint as it was."""
    import taichi_dr.pipelines.idr as idr

    ds = _sphere_dataset()
    cfg = IDRConfig(iterations=5, **TINY)
    torch.manual_seed(cfg.seed)
    method = IDRMethod(ds, cfg)
    snapshots = []

    class Snapshot(Callback):
        def on_step(self, state):
            snapshots.append({k: v.clone() for k, v in state.method.model.state_dict().items()})

    real_step = idr.training_step

    def nan_at_iteration_2(model, *args, **kwargs):
        loss, stats = real_step(model, *args, **kwargs)
        poisoned = len(snapshots) == 2
        return (loss * math.nan if poisoned else loss), stats

    monkeypatch.setattr(idr, "training_step", nan_at_iteration_2)
    result = Trainer(method, cfg.train_config(progress="none"), callbacks=[Snapshot()]).fit()
    assert [row["skipped"] for row in result.history] == [0, 0, 1, 0, 0] and result.skipped == 1
    assert result.history[2]["loss"] is None       # NaN written as null in the metrics row
    assert_bitwise(snapshots[2], snapshots[1], "parameters after the skipped step")
    assert any(not torch.equal(snapshots[3][k], snapshots[2][k]) for k in snapshots[3])   # then it trains on

    # every step non-finite (a poisoned colour network): stop after max_nonfinite, keep the good checkpoint
    monkeypatch.setattr(idr, "training_step", real_step)
    train_idr(ds, IDRConfig(iterations=2, **TINY), tmp_path / "run", progress="none")
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    torch.manual_seed(0)
    method = IDRMethod(ds, IDRConfig(iterations=20, **TINY))
    trainer = Trainer(method, IDRConfig(iterations=20, **TINY).train_config(progress="none", max_nonfinite=3,
                                                                              checkpoint_every=1),
                      out_dir=tmp_path / "run", resume=True)
    with torch.no_grad():
        for p in method.model.rendering.parameters():
            p.fill_(math.nan)
    with pytest.raises(NonFiniteError, match="3 consecutive") as e:
        trainer.fit()
    assert e.value.iterations == (3, 5) and "\n" not in str(e.value)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_extract_mesh_of_analytic_sdfs():
    mesh = extract_mesh(lambda x: sphere_sdf(x, 0.4, CENTER), resolution=48, chunk=1000)
    radii = (mesh.verts - torch.tensor(CENTER)).norm(dim=-1)
    assert ((radii - 0.4).abs() < 0.004).all() and len(mesh.faces) > 1000
    # and the whole sphere is there (Chamfer from 4000 samples is noise-bound near 0.01 here, so check the area)
    assert float(face_areas(mesh.verts, mesh.faces).sum()) == pytest.approx(4 * math.pi * 0.4**2, rel=0.02)
    # outward faces: normals point away from the centre
    centres = mesh.verts[mesh.faces].mean(1) - torch.tensor(CENTER)
    assert ((face_normals(mesh.verts, mesh.faces) * centres).sum(-1) > 0).float().mean() > 0.99
    # world coordinates through scale_mat
    s = torch.eye(4, dtype=torch.float64) * 10
    s[3, 3] = 1
    s[:3, 3] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    world = extract_mesh(lambda x: box_sdf(x, (0.3, 0.2, 0.1)), resolution=33, scale_mat=s)
    lo, hi = world.verts.min(0).values, world.verts.max(0).values
    assert torch.allclose(lo, torch.tensor([-2.0, 0.0, 2.0]), atol=0.05)
    assert torch.allclose(hi, torch.tensor([4.0, 4.0, 4.0]), atol=0.05)
    with pytest.raises(ValueError, match="does not cross level 0"):
        extract_mesh(lambda x: sphere_sdf(x, 5.0), resolution=8)


class _AnalyticSphere(IDRModel):
    """The true sphere as 'geometry network'; the colour network left as initialised."""

    def __init__(self):
        super().__init__(IDRConfig(**TINY))
        self.geometry.sdf = lambda x: sphere_sdf(x, 0.4, CENTER)


def test_render_views_and_metrics():
    ds = _sphere_dataset()
    analytic = _AnalyticSphere()
    out = render_views(analytic, ds.cameras[:2])
    assert out["rgb"].shape == (2, 24, 24, 3) and out["depth"].shape == (2, 24, 24)
    assert out["mask"].sum() > 0
    m = image_metrics(out, ds.images[:2], ds.masks[:2])
    assert m["mask_iou"] > 0.97
    # normals are unit vectors facing the camera where hit
    n = out["normals"][out["mask"]]
    assert torch.allclose(n.norm(dim=-1), torch.ones(len(n)), atol=1e-4)
    perfect = dict(out, rgb=ds.images[:2])
    assert image_metrics(perfect, ds.images[:2], ds.masks[:2])["psnr"] == float("inf")
    assert np.isfinite(m["psnr"])

    # the method's render (what validation callbacks and a viewer call): the same images, mask as alpha
    method = IDRMethod(ds, IDRConfig(**TINY))
    method.model = analytic
    images = method.render(ds.cameras[:2])
    assert set(images) == {"rgb", "alpha", "normals", "depth"}
    assert torch.equal(images["alpha"], out["mask"].float()) and torch.equal(images["rgb"], out["rgb"])
    assert image_metrics(images, ds.images[:2], ds.masks[:2]) == m


def test_render_views_with_cones_match_without_and_rows_chunk():
    """Cone tracing (on by default when whole views render) changes where rays start, not what they hit; a
    trace chunk that is not a whole number of rows is rounded down to whole rows, and shading in chunks that
    split the hits changes nothing."""
    ds = _sphere_dataset()
    model = _AnalyticSphere()
    plain = render_views(model, ds.cameras[:2], cones=None)
    whole = render_views(model, ds.cameras[:2])                      # each view traced in one chunk
    coned = render_views(model, ds.cameras[:2], trace_chunk=100, chunk=7)   # 4 rows of 24 pixels; 7 hits a shade
    assert plain["mask"].sum() > 50
    for out in (whole, coned):
        assert torch.equal(out["mask"], plain["mask"])
        assert torch.allclose(out["depth"], plain["depth"], atol=1e-4)
        assert torch.allclose(out["normals"], plain["normals"], atol=1e-3)
        assert torch.allclose(out["rgb"], plain["rgb"], atol=1e-3)
    shaded_whole = render_views(model, ds.cameras[:2], trace_chunk=100)   # the same trace, one shading call
    assert torch.equal(coned["mask"], shaded_whole["mask"]) and torch.equal(coned["depth"], shaded_whole["depth"])
    for k in ("rgb", "normals"):        # the networks' matmuls round differently by batch size
        assert torch.allclose(coned[k], shaded_whole[k], rtol=0, atol=1e-6), k
    o, d = ds.cameras[0].image_rays()
    with pytest.raises(ValueError, match="image_width: expected a positive width that divides the 576 rays, got 25"):
        render_rays(model, o.reshape(-1, 3), d.reshape(-1, 3), IDRConfig().tracer, image_width=25)
    with pytest.raises(ValueError, match="trace_chunk: expected a positive number of rays, got 0"):
        render_rays(model, o.reshape(-1, 3), d.reshape(-1, 3), IDRConfig().tracer, trace_chunk=0)
