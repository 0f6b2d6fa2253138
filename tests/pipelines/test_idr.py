"""IDR training end to end on tiny synthetic data: convergence, checkpoints and resume, meshing,
rendering."""

import math

import numpy as np
import pytest
import torch

from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import face_areas, face_normals, icosphere
from taichi_dr.core.metrics import chamfer_distance
from taichi_dr.data.datasets import dataset_from_sdf
from taichi_dr.implicit.analytic import box_sdf, sphere_sdf
from taichi_dr.pipelines.idr import (
    IDRConfig,
    IDRModel,
    extract_mesh,
    image_metrics,
    load_model,
    render_views,
    train_idr,
)

CENTER = (0.1, 0.0, -0.05)
TINY = dict(rays_per_batch=128, geometry_depth=3, geometry_width=48, geometry_frequencies=0,
            geometry_skip_in=(), feature_dim=8, rendering_depth=2, rendering_width=32,
            rendering_frequencies=0,
            lr=5e-3, checkpoint_every=0)


def _views(n=8, size=24):
    az = torch.linspace(0, 360, n + 1)[:-1]
    el = torch.tensor([30.0, -20.0] * n)[:n]
    return Cameras.from_spherical(torch.full((n,), 3.0), el, az, fov=40, image_size=(size, size))


def _sphere_dataset():
    return dataset_from_sdf(lambda x: sphere_sdf(x, 0.4, CENTER), _views())


def _true_sphere():
    m = icosphere(4, 0.4)
    m.verts += torch.tensor(CENTER)
    return m


def test_reconstruction_of_a_sphere_converges():
    ds = _sphere_dataset()
    model, history = train_idr(ds, IDRConfig(iterations=100, **TINY))
    assert len(history) == 100
    before = chamfer_distance(extract_mesh(IDRModel(IDRConfig(**TINY)).sdf, 40), _true_sphere(), 4000)
    after = chamfer_distance(extract_mesh(model.sdf, 40), _true_sphere(), 4000)
    assert before > 0.1
    assert after < 0.03, (before, after)
    assert np.mean([h["psnr"] for h in history[-10:]]) > 20
    views = render_views(model, ds.cameras[:3], IDRConfig().tracer)
    assert image_metrics(views, ds.images[:3], ds.masks[:3])["mask_iou"] > 0.9   # (~0.45 at initialisation)


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    ds = _sphere_dataset()
    cfg = IDRConfig(iterations=6, **TINY)
    straight, _ = train_idr(ds, cfg, tmp_path / "a")

    def interrupt(it, total, stats):
        if it == 5:
            raise KeyboardInterrupt

    cfg_b = IDRConfig(iterations=6, **{**TINY, "checkpoint_every": 3})
    with pytest.raises(KeyboardInterrupt):
        train_idr(ds, cfg_b, tmp_path / "b", progress=interrupt)       # killed after the checkpoint at 3
    resumed, history = train_idr(ds, cfg_b, tmp_path / "b", resume=True)
    assert len(history) == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    loaded, loaded_cfg = load_model(tmp_path / "a")
    assert loaded_cfg == cfg
    x = torch.randn(10, 3) * 0.5
    assert torch.equal(loaded.sdf(x), straight.sdf(x))
    with pytest.raises(ValueError, match="geometry_width=48"):
        train_idr(ds, IDRConfig(iterations=8, **{**TINY, "geometry_width": 32}), tmp_path / "b", resume=True)
    with pytest.raises(FileNotFoundError):
        train_idr(ds, cfg, tmp_path / "c", resume=True)


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
    with pytest.raises(ValueError, match="no zero crossing"):
        extract_mesh(lambda x: sphere_sdf(x, 5.0), resolution=8)


def test_render_views_and_metrics():
    class Analytic(IDRModel):
        """The true sphere as 'geometry network'; the colour network left as initialised."""

        def __init__(self):
            super().__init__(IDRConfig(**TINY))
            self.geometry.sdf = lambda x: sphere_sdf(x, 0.4, CENTER)

    ds = _sphere_dataset()
    out = render_views(Analytic(), ds.cameras[:2])
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
