"""NeRF on the engine: it learns a scene from RGB alone, the hierarchical sampling feeds the fine network,
runs are reproducible and resume bitwise, checkpoints load back."""

from __future__ import annotations

import math
import signal

import pytest
import torch
from app_helpers import signal_at
from bitwise import assert_bitwise, run_state
from sdf_scenes import dataset_from_sdf, ring_cameras

from taichi_dr.implicit.analytic import box_sdf
from taichi_dr.implicit.meshing import extract_mesh
from taichi_dr.pipelines import Interrupted, Trainer
from taichi_dr.pipelines.nerf import (
    NeRFConfig,
    NeRFMethod,
    NeRFModel,
    load_model,
    mesh_field,
    render_batch,
    render_views,
)
from taichi_dr.pipelines.reconstruction import load_trained
from taichi_dr.pipelines.views import image_metrics

TINY = dict(rays_per_batch=128, depth=4, width=64, skip_in=(2,), frequencies=6, view_frequencies=0, colour_width=64,
            n_coarse=24, n_fine=24, bound_radius=2.0, lr=3e-3, checkpoint_every=0)
HALF = (0.6, 0.5, 0.45)


def _box_dataset(size=24, masks=False):
    return dataset_from_sdf(lambda x: box_sdf(x, HALF), ring_cameras(size=size), masks=masks)


def _fit(ds, cfg, out=None, **kwargs):
    torch.manual_seed(cfg.seed)
    method = NeRFMethod(ds, cfg)
    result = Trainer(method, cfg.train_config(progress="none"), out_dir=out, **kwargs).fit()
    return method, result.history


def test_nerf_learns_a_box_from_rgb_alone():
    """Trained without masks (black background), NeRF's renders approach the images and its opacity the
    silhouettes (the masks are only used to score)."""
    ds = _box_dataset(masks=True)
    cfg = NeRFConfig(iterations=400, **TINY)
    torch.manual_seed(0)
    before = image_metrics(render_views(NeRFModel(cfg), ds.cameras[:4], cfg), ds.images[:4], ds.masks[:4])
    method, history = _fit(ds, cfg)
    assert sum(h["skipped"] for h in history) == 0
    after = image_metrics(render_views(method.model, ds.cameras[:4], cfg), ds.images[:4], ds.masks[:4])
    assert after["psnr_full"] > 18 > before["psnr_full"] + 6, (before, after)
    assert after["mask_iou"] > 0.85, after
    # the mesh at the measured surface density (a loose check: NeRF's geometry is not its strength) lies near
    # the box (within 4 grid cells) and spans it (its extent within 2.5 cells of the box's on every axis)
    target = mesh_field(method.model, cfg)
    assert target["level"] > 1.0
    mesh = extract_mesh(**target, resolution=40)
    half = torch.tensor(HALF)
    outside = (mesh.verts.abs() - half).clamp_min(0).norm(dim=-1)
    inside = (half - mesh.verts.abs()).min(dim=-1).values.clamp_min(0)
    assert float((torch.maximum(outside, inside) < 0.2).float().mean()) > 0.9
    extent = torch.stack([-mesh.verts.min(0).values, mesh.verts.max(0).values])
    assert float((extent - half).abs().max()) < 0.125, extent


def test_fine_samples_follow_the_coarse_weights():
    """With a coarse field that is an opaque ball, the importance samples crowd at its front surface, where the
    coarse weights are, and the fine pass composites them."""

    class Ball(torch.nn.Module):
        def forward(self, x, d):
            density = torch.where(x.norm(dim=-1) < 0.5, 200.0, 0.0)
            return density, torch.full_like(x, 0.5)

    cfg = NeRFConfig(**TINY)
    torch.manual_seed(0)
    model = NeRFModel(cfg)
    model.coarse = Ball()
    o, d = ring_cameras(1, 16).image_rays()
    o, d = o.reshape(-1, 3).contiguous(), d.reshape(-1, 3).contiguous()
    with torch.no_grad():
        out = render_batch(model, o, d, cfg)
    hit = out["coarse"].opacity > 0.99
    assert 0 < int(hit.sum()) < o.shape[0]
    s = out["samples"]
    assert s.counts.tolist() == [cfg.n_coarse + cfg.n_fine] * o.shape[0]
    front = 3.0 - torch.sqrt((0.25 - (3.0 ** 2 - (o * d).sum(-1) ** 2)).clamp_min(0))   # camera at distance 3
    near = (s.t - front[s.ray_index.long()]).abs() < 0.15
    share = near.view(o.shape[0], -1)[hit].float().mean()
    # stratified samples alone would put about 0.3 / 4 of them there; the fine ones (half of all) crowd there
    assert float(share) > 0.4, float(share)


def test_same_seed_same_run_and_resume_is_bitwise(tmp_path):
    ds = _box_dataset()
    cfg = NeRFConfig(iterations=5, **TINY)
    _fit(ds, cfg, tmp_path / "a")
    _fit(ds, cfg, tmp_path / "again")
    assert_bitwise(run_state(tmp_path / "again"), run_state(tmp_path / "a"), "a second NeRF run")
    with pytest.raises(Interrupted):
        _fit(ds, cfg, tmp_path / "b", callbacks=[signal_at(3, signal.SIGTERM)])
    _fit(ds, cfg, tmp_path / "b", resume=True)
    assert_bitwise(run_state(tmp_path / "b"), run_state(tmp_path / "a"), "resumed NeRF run")
    model, loaded = load_model(tmp_path / "a")
    assert loaded == cfg
    x = torch.randn(10, 3) * 0.5
    trained = load_trained(tmp_path / "a")
    assert trained.method == "nerf" and torch.equal(trained.model.density(x), model.density(x))
    with pytest.raises(ValueError, match=r"width=64, this run has width=32"):
        _fit(ds, NeRFConfig(iterations=6, **{**TINY, "width": 32}), tmp_path / "a", resume=True)


def test_render_is_finite_and_shaped():
    cfg = NeRFConfig(iterations=1, **{**TINY, "background": 1.0})
    torch.manual_seed(0)
    out = render_views(NeRFModel(cfg), ring_cameras(2, 16), cfg)
    assert out["rgb"].shape == (2, 16, 16, 3) and out["mask"].dtype == torch.bool
    assert all(bool(torch.isfinite(v.float()).all()) for v in out.values())
    assert float(out["rgb"].min()) >= 0 and float(out["rgb"].max()) <= 1


def test_settings_errors():
    with pytest.raises(ValueError, match="NeRFConfig: n_coarse must be >= 2"):
        NeRFConfig(n_coarse=1)
    with pytest.raises(ValueError, match="NeRFConfig: density_level must be > 0 \\(or None\\)"):
        NeRFConfig(density_level=-1.0)
    with pytest.raises(ValueError, match="NeRFConfig: background must be in"):
        NeRFConfig(background=math.inf)
    with pytest.raises(ValueError, match="needs object masks"):
        NeRFMethod(_box_dataset(masks=False), NeRFConfig(use_masks=True, **TINY))
