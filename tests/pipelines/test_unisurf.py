"""UNISURF on the engine: a no-mask reconstruction converges, runs are reproducible and resume bitwise,
checkpoints load back, renders are what they say, and bad settings are one-line errors."""

from __future__ import annotations

import dataclasses
import math
import signal

import pytest
import torch
from app_helpers import signal_at
from bitwise import assert_bitwise, run_state
from sdf_scenes import dataset_from_sdf, ring_cameras

from taichi_dr.core.mesh import icosphere
from taichi_dr.core.metrics import chamfer_distance
from taichi_dr.core.rays import ray_segments
from taichi_dr.implicit.analytic import sphere_sdf
from taichi_dr.implicit.meshing import extract_mesh
from taichi_dr.implicit.occupancy import SurfaceSearchSettings
from taichi_dr.implicit.occupancy_grid import OccupancyGridSettings
from taichi_dr.implicit.sampling import IntervalSettings
from taichi_dr.pipelines import CheckpointError, Interrupted, Trainer
from taichi_dr.pipelines.reconstruction import load_trained
from taichi_dr.pipelines.unisurf import (
    UnisurfConfig,
    UnisurfMethod,
    UnisurfModel,
    load_model,
    mesh_field,
    render_views,
)

CENTER = (0.1, 0.0, -0.05)
RADIUS = 0.6
# A small network and short sampling, so a run of a few hundred steps fits in the test budget; a 32^3 occupancy
# grid (the default 128^3 grid's updates, 2 M field evaluations each during warm-up, would dominate such steps).
TINY = dict(rays_per_batch=128, geometry_depth=3, geometry_width=48, geometry_frequencies=0, geometry_skip_in=(),
            feature_dim=8, rendering_depth=2, rendering_width=32, rendering_frequencies=0, lr=1e-3,
            checkpoint_every=0, bound_radius=2.0, search=SurfaceSearchSettings(n_steps=64),
            interval=IntervalSettings(n_interval=24, n_free=8, free_after=4, start=1.0, end=0.1, decay=0.05),
            occupancy_grid=OccupancyGridSettings(resolution=32))


def _sphere_dataset(masks=False, size=24):
    return dataset_from_sdf(lambda x: sphere_sdf(x, RADIUS, CENTER), ring_cameras(size=size), masks=masks)


def _fit(ds, cfg, out=None, **kwargs):
    torch.manual_seed(cfg.seed)
    method = UnisurfMethod(ds, cfg)
    result = Trainer(method, cfg.train_config(progress="none"), out_dir=out, **kwargs).fit()
    return method, result.history


def test_no_mask_reconstruction_of_a_sphere_converges():
    """From RGB alone (black background, no masks): the occupancy's 0.5 surface approaches the sphere."""
    ds = _sphere_dataset(masks=False, size=32)
    assert ds.masks is None
    cfg = UnisurfConfig(iterations=1000, **TINY)
    true = icosphere(4, RADIUS)
    true.verts += torch.tensor(CENTER)
    torch.manual_seed(0)
    untrained = UnisurfModel(cfg)
    before = chamfer_distance(extract_mesh(**mesh_field(untrained, cfg), resolution=40), true, 4000)
    method, history = _fit(ds, cfg)
    assert sum(h["skipped"] for h in history) == 0
    after = chamfer_distance(extract_mesh(**mesh_field(method.model, cfg), resolution=40), true, 4000)
    assert after < 0.04 < 0.1 < before, (before, after)   # radius 0.6; the mesh grid spacing is 0.05
    assert sum(h["psnr"] for h in history[-20:]) / 20 > 20


def test_same_seed_same_run_and_resume_is_bitwise(tmp_path):
    ds = _sphere_dataset()
    cfg = UnisurfConfig(iterations=6, **TINY)
    _fit(ds, cfg, tmp_path / "a")
    _fit(ds, cfg, tmp_path / "again")
    assert_bitwise(run_state(tmp_path / "again"), run_state(tmp_path / "a"), "a second UNISURF run")
    with pytest.raises(Interrupted):
        _fit(ds, cfg, tmp_path / "b", callbacks=[signal_at(4, signal.SIGINT)])
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["iteration"] == 4
    _fit(ds, cfg, tmp_path / "b", resume=True)
    assert_bitwise(run_state(tmp_path / "b"), run_state(tmp_path / "a"), "resumed UNISURF run")
    # free-space samples start at iteration free_after = 4: both halves of the run saw both regimes
    rows = run_state(tmp_path / "a")["history"]
    assert rows[0]["samples_per_ray"] < rows[-1]["samples_per_ray"]
    # another seed, another run
    _fit(ds, dataclasses.replace(cfg, seed=1), tmp_path / "c")
    assert run_state(tmp_path / "c")["history"][-1]["loss"] != rows[-1]["loss"]


def test_checkpoint_round_trip_and_refusals(tmp_path):
    ds = _sphere_dataset()
    cfg = UnisurfConfig(iterations=2, **TINY)
    method, _ = _fit(ds, cfg, tmp_path / "a")
    model, loaded_cfg = load_model(tmp_path / "a")
    assert loaded_cfg == cfg
    x = torch.randn(10, 3) * 0.5
    assert torch.equal(model.occupancy(x), method.model.occupancy(x))
    trained = load_trained(tmp_path / "a")
    assert trained.method == "unisurf" and trained.mesh_field()["inside"] == "above"
    with pytest.raises(ValueError, match=r"geometry_width=48, this run has geometry_width=32") as e:
        _fit(ds, UnisurfConfig(iterations=4, **{**TINY, "geometry_width": 32}), tmp_path / "a", resume=True)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="method 'unisurf', not 'idr'"):
        from taichi_dr.pipelines.idr import load_model as load_idr

        load_idr(tmp_path / "a")


def test_render_outputs():
    """Renders: finite colours in [0, 1] (the background where rays miss the bounding sphere), the mask is the
    surface inside the object sphere and its depth is the ray distance to the occupancy's 0.5 level."""
    ds = _sphere_dataset()
    cfg = UnisurfConfig(iterations=1, **{**TINY, "background": 0.25})
    torch.manual_seed(0)
    model = UnisurfModel(cfg)
    cams = ds.cameras[:2]
    out = render_views(model, cams, cfg)
    assert out["rgb"].shape == (2, 24, 24, 3) and out["mask"].dtype == torch.bool
    assert all(bool(torch.isfinite(v.float()).all()) for v in out.values())
    assert float(out["rgb"].min()) >= 0 and float(out["rgb"].max()) <= 1
    assert bool(out["mask"].any()) and not bool(out["mask"].all())
    o, d = cams[0].image_rays()
    m = out["mask"][0]
    x = o[0][m] + out["depth"][0][m][:, None] * d[0][m]
    torch.testing.assert_close(model.occupancy(x.reshape(-1, 3)), torch.full((int(m.sum()),), 0.5), atol=5e-3,
                               rtol=0)
    torch.testing.assert_close(out["normals"][0][m].norm(dim=-1), torch.ones(int(m.sum())))
    # the mask and depth are the first crossing inside the object sphere: as a search there alone finds them
    from taichi_dr.implicit.occupancy import find_surface

    for radius in (1.0, 0.3):     # 0.3: every ray enters the object sphere inside the ball, so none is a hit
        c = dataclasses.replace(cfg, object_radius=radius, init_radius=min(cfg.init_radius, 0.2))
        rendered = render_views(model, cams[:1], c)
        o0, d0 = o[0].reshape(-1, 3), d[0].reshape(-1, 3)
        near, far, _ = ray_segments(o0, d0, radius)
        direct = find_surface(model.occupancy, o0, d0, near, far, c.search)
        assert torch.equal(rendered["mask"][0].reshape(-1), direct.hit)
        assert bool(direct.hit.any()) == (radius == 1.0)
        torch.testing.assert_close(rendered["depth"][0].reshape(-1)[direct.hit], direct.t[direct.hit], atol=1e-4,
                                   rtol=0)
    # a ray pointing away from the bounding sphere has an empty segment and renders the background
    far_o, away = torch.tensor([[0.0, 0.0, 10.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    t_near, t_far, _ = ray_segments(far_o, away, cfg.bound_radius)
    assert float(t_far[0] - t_near[0]) == 0.0
    from taichi_dr.pipelines.unisurf import render_rays

    alone = render_rays(model, far_o, away, cfg, iteration=0)
    assert alone["rgb"].tolist() == [[0.25, 0.25, 0.25]] and not bool(alone["mask"][0])


def test_settings_and_data_errors():
    with pytest.raises(ValueError, match="UnisurfConfig: bound_radius must be >= object_radius"):
        UnisurfConfig(bound_radius=0.5)
    with pytest.raises(ValueError, match="UnisurfConfig: background must be in"):
        UnisurfConfig(background=math.nan)
    with pytest.raises(ValueError, match="needs object masks"):
        UnisurfMethod(_sphere_dataset(masks=False), UnisurfConfig(use_masks=True, **TINY))


def test_masks_add_an_opacity_loss():
    ds = _sphere_dataset(masks=True)
    _, history = _fit(ds, UnisurfConfig(iterations=3, use_masks=True, **TINY))
    assert all(h["mask"] > 0 for h in history)
    _, history = _fit(ds, UnisurfConfig(iterations=3, **TINY))
    assert "mask" not in history[0]
