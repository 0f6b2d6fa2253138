"""UNISURF with an occupancy grid: the grid-restricted search finds the surface the full search finds, on fewer
evaluations; training keeps the grid updated and checkpointed; renders of a loaded field rebuild it; bad
grid settings are one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sdf_scenes import dataset_from_sdf, ring_cameras

from taichi_dr.core.rays import ray_segments
from taichi_dr.implicit.analytic import sphere_sdf
from taichi_dr.implicit.occupancy import SurfaceSearchSettings
from taichi_dr.implicit.occupancy_grid import OccupancyGridSettings
from taichi_dr.implicit.sampling import IntervalSettings
from taichi_dr.pipelines import Trainer
from taichi_dr.pipelines.unisurf import (
    UnisurfConfig,
    UnisurfMethod,
    UnisurfModel,
    fitted_grid,
    load_model,
    render_trained,
    render_views,
    search_surface,
)

TINY = dict(rays_per_batch=128, geometry_depth=3, geometry_width=48, geometry_frequencies=0, geometry_skip_in=(),
            feature_dim=8, rendering_depth=2, rendering_width=32, rendering_frequencies=0, lr=1e-3,
            checkpoint_every=0, bound_radius=2.0, search=SurfaceSearchSettings(n_steps=256),
            interval=IntervalSettings(n_interval=24, n_free=8, free_after=4, start=1.0, end=0.1, decay=0.05))
GRID = OccupancyGridSettings(resolution=32, update_every=4, warmup_steps=8)


def _rays(n_cameras=4, size=24):
    cams = ring_cameras(n_cameras, size=size)
    o, d = cams.image_rays()
    return o.reshape(-1, 3).contiguous(), d.reshape(-1, 3).contiguous()


def test_the_grid_search_finds_the_full_search_surface_on_fewer_evaluations():
    """The untrained field is a ball (geometric initialisation; sharpness 50, as a trained field's occupancy
    is sharper than the initial one) in UNISURF's bounding sphere of radius 4: searched only through the grid's
    occupied cells, every ray finds the same crossing (to the secant's accuracy), on a fraction of the
    evaluations; rays through no occupied cell cost nothing."""
    cfg = UnisurfConfig(occupancy_grid=GRID, sharpness=50.0, **{**TINY, "bound_radius": 4.0})
    torch.manual_seed(0)
    model = UnisurfModel(cfg)
    grid = fitted_grid(model, cfg)
    assert 0.0 < grid.occupancy_fraction < 0.25
    o, d = _rays()
    near, far, _ = ray_segments(o, d, cfg.bound_radius)
    full = search_surface(model, o, d, near, far, cfg)
    skipped = search_surface(model, o, d, near, far, cfg, grid)
    assert bool(full.hit.any()) and not bool(full.hit.all())
    assert torch.equal(skipped.hit, full.hit)
    torch.testing.assert_close(skipped.t[full.hit], full.t[full.hit], atol=1e-4, rtol=0)
    assert skipped.evaluations < full.evaluations / 2, (skipped.evaluations, full.evaluations)
    # an all-empty grid: nothing is searched and nothing is hit
    grid.occupied.zero_()
    empty = search_surface(model, o, d, near, far, cfg, grid)
    assert empty.evaluations == 0 and not bool(empty.hit.any())


def test_training_updates_and_checkpoints_the_grid(tmp_path):
    ds = dataset_from_sdf(lambda x: sphere_sdf(x, 0.6, (0.1, 0.0, -0.05)), ring_cameras(size=24))
    cfg = UnisurfConfig(iterations=12, occupancy_grid=GRID, **TINY)
    torch.manual_seed(cfg.seed)
    method = UnisurfMethod(ds, cfg)
    assert method.grid is not None and method.grid.resolution == (32, 32, 32)
    Trainer(method, cfg.train_config(progress="none"), out_dir=tmp_path / "a").fit()
    assert 0.0 < method.grid.occupancy_fraction < 0.9
    saved = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["method_state"]
    assert torch.equal(saved["grid"]["occupied"], method.grid.occupied)
    # a checkpoint without its grid (or a grid of another size) resumes with the grid rebuilt from the field
    payload = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    del payload["method_state"]["grid"]
    torch.save(payload, tmp_path / "a" / "checkpoint.pt")
    longer = dataclasses.replace(cfg, iterations=14)
    resumed = UnisurfMethod(ds, longer)
    Trainer(resumed, longer.train_config(progress="none"), out_dir=tmp_path / "a", resume=True).fit()
    assert 0.0 < resumed.grid.occupancy_fraction < 0.9
    # without a grid the method has none and checkpoints none
    off = dataclasses.replace(cfg, iterations=2, occupancy_grid=OccupancyGridSettings(enabled=False))
    torch.manual_seed(0)
    plain = UnisurfMethod(ds, off)
    Trainer(plain, off.train_config(progress="none"), out_dir=tmp_path / "b").fit()
    assert plain.grid is None
    assert "grid" not in torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["method_state"]


def test_renders_of_a_loaded_field_match_renders_without_a_grid(tmp_path):
    ds = dataset_from_sdf(lambda x: sphere_sdf(x, 0.6), ring_cameras(size=24))
    cfg = UnisurfConfig(iterations=2, occupancy_grid=GRID, **TINY)
    torch.manual_seed(0)
    method = UnisurfMethod(ds, cfg)
    Trainer(method, cfg.train_config(progress="none"), out_dir=tmp_path / "a").fit()
    model, loaded = load_model(tmp_path / "a")
    cams = ds.cameras[:2]
    with_grid = render_trained(model, cams, loaded)
    without = render_views(model, cams, loaded)
    # the rebuilt grid is fitted once per state of the weights (a viewer renders a loaded field many times)
    grid = fitted_grid(model, loaded)
    assert fitted_grid(model, loaded) is grid
    with torch.no_grad():
        next(model.parameters()).add_(0.0)      # an in-place update: a new grid
    assert fitted_grid(model, loaded) is not grid
    assert torch.equal(fitted_grid(model, loaded).occupied, grid.occupied)
    assert bool(without["mask"].any())
    assert torch.equal(with_grid["mask"], without["mask"])
    torch.testing.assert_close(with_grid["depth"], without["depth"], atol=1e-4, rtol=0)
    torch.testing.assert_close(with_grid["rgb"], without["rgb"], atol=1e-4, rtol=0)


def test_grid_settings_errors():
    with pytest.raises(ValueError, match=r"^OccupancyGridSettings: resolution must be an integer in 1\.\.1024$"):
        OccupancyGridSettings(resolution=0)
    with pytest.raises(ValueError, match=r"^OccupancyGridSettings: decay must be in \[0, 1\]$"):
        OccupancyGridSettings(decay=1.5)
    with pytest.raises(ValueError, match=r"^OccupancyGridSettings: threshold must be in \[0, 1\)$"):
        OccupancyGridSettings(threshold=-0.1)
    with pytest.raises(ValueError, match=r"^OccupancyGridSettings: enabled must be true or false$"):
        OccupancyGridSettings(enabled="yes")
    cfg = UnisurfConfig(occupancy_grid=GRID, **TINY)
    assert UnisurfConfig.from_dict(cfg.to_dict()) == cfg
