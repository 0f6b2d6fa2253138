"""NeRF with an occupancy grid: coarse samples only in occupied cells, each standing for one step; a field
trained with the grid renders the same through a grid rebuilt from it as without one, on fewer samples."""

from __future__ import annotations

import dataclasses

import torch
from sdf_scenes import dataset_from_sdf, ring_cameras

from taichi_dr.implicit.analytic import box_sdf
from taichi_dr.implicit.occupancy_grid import OccupancyGridSettings, density_value_fn
from taichi_dr.pipelines import Trainer
from taichi_dr.pipelines.nerf import (
    NeRFConfig,
    NeRFMethod,
    NeRFModel,
    fitted_grid,
    grid_step,
    load_model,
    render_batch,
    render_trained,
    render_views,
)

TINY = dict(rays_per_batch=128, depth=4, width=64, skip_in=(2,), frequencies=6, view_frequencies=0, colour_width=64,
            n_coarse=24, n_fine=24, bound_radius=2.0, lr=3e-3, checkpoint_every=0)
GRID = OccupancyGridSettings(resolution=32, update_every=8, warmup_steps=64)
HALF = (0.6, 0.5, 0.45)


def test_coarse_samples_lie_in_occupied_cells_one_step_each():
    cfg = NeRFConfig(occupancy_grid=GRID, **TINY)
    torch.manual_seed(0)
    model = NeRFModel(cfg)
    grid = cfg.occupancy_grid.make_grid(cfg.bound_radius)
    # only a ball of radius 0.7 is occupied
    grid.occupied.copy_(grid.cell_centers().norm(dim=-1) < 0.7)
    o, d = ring_cameras(2, size=16).image_rays()
    o, d = o.reshape(-1, 3).contiguous(), d.reshape(-1, 3).contiguous()
    out = render_batch(model, o, d, cfg, torch.Generator().manual_seed(0), grid)
    samples = out["samples"]
    step = grid_step(cfg)
    assert float(samples.delta.max()) <= step * (1 + 1e-6)
    cell = ((samples.points(o, d) + cfg.bound_radius) / (2 * cfg.bound_radius) * 32).floor().long().clamp(0, 31)
    coarse = out["coarse"]
    assert coarse.weights.shape[0] < 24 * o.shape[0] / 2            # most of each ray is skipped
    in_ball = grid.occupied[cell[:, 0], cell[:, 1], cell[:, 2]]
    # the fine samples are drawn between coarse ones, so they may fall a little outside; most lie inside
    assert float(in_ball.float().mean()) > 0.9
    assert all(bool(torch.isfinite(v).all()) for v in (out["rgb"], coarse.opacity, out["fine"].opacity))


class Ball(torch.nn.Module):
    """An opaque grey ball of radius 0.5 (density 200 inside, 0 outside), for both of NeRF's networks."""

    def density(self, x):
        return torch.where(x.norm(dim=-1) < 0.5, 200.0, 0.0)

    def forward(self, x, d):
        return self.density(x), torch.full_like(x, 0.5)

    def normals(self, x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-9)


def test_renders_through_a_grid_rebuilt_from_the_field_match_renders_without(tmp_path):
    cfg = NeRFConfig(occupancy_grid=GRID, **{**TINY, "n_coarse": 64})
    torch.manual_seed(0)
    model = NeRFModel(cfg)
    model.coarse, model.fine = Ball(), Ball()
    grid = fitted_grid(model, cfg)
    assert 0.0 < grid.occupancy_fraction < 0.05                    # the ball's cells (and one around them)
    again = cfg.occupancy_grid.make_grid(cfg.bound_radius).fit(density_value_fn(model.density, grid_step(cfg)))
    assert torch.equal(again.occupied, grid.occupied)                   # a function of the field alone
    cams = ring_cameras(2, size=24)
    skipped = render_views(model, cams, cfg, grid)
    full = render_views(model, cams, cfg)
    assert bool(full["mask"].any()) and not bool(full["mask"].all())
    assert float((skipped["mask"] == full["mask"]).float().mean()) > 0.98
    torch.testing.assert_close(skipped["rgb"][full["mask"]], full["rgb"][full["mask"]], atol=0.02, rtol=0)
    # rays missing the ball's cells render the background alone
    assert float(skipped["alpha"][~full["mask"] & ~skipped["mask"]].max()) < 0.05


def test_nerf_grid_is_off_by_default_and_trains_when_on(tmp_path):
    """Off by default (a softplus density stays above the skipping threshold in empty space in short runs:
    measured, it never skipped); on, a run trains and keeps its grid in the checkpoint."""
    assert NeRFConfig().occupancy_grid.enabled is False
    ds = dataset_from_sdf(lambda x: box_sdf(x, HALF), ring_cameras(size=24))
    cfg = NeRFConfig(iterations=20, occupancy_grid=GRID, **TINY)
    torch.manual_seed(0)
    method = NeRFMethod(ds, cfg)
    history = Trainer(method, cfg.train_config(progress="none"), out_dir=tmp_path / "a").fit().history
    assert sum(h["skipped"] for h in history) == 0
    saved = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["method_state"]
    assert torch.equal(saved["grid"]["values"], method.grid.values)
    model, loaded = load_model(tmp_path / "a")
    out = render_trained(model, ds.cameras[:1], loaded)
    assert bool(torch.isfinite(out["rgb"]).all())
    off = dataclasses.replace(cfg, occupancy_grid=OccupancyGridSettings(enabled=False))
    assert NeRFMethod(ds, off).grid is None
