"""Mesh fitting beyond blobs: thin parts survive a short default fit, and the regularisers' weights do not
depend on the template's resolution or the object's scale.

Silhouettes (targets and the scoring of fits) come from the independent NumPy point-in-triangle rasterizer
of ``benchmarks/fit_thin.py``, never from the engine's renderer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import taichi_dr as tdr
from taichi_dr.core.mesh import icosphere
from taichi_dr.data.shapes import SHAPES, make_shape
from taichi_dr.losses.mesh import laplacian_loss, scale_free_laplacian_loss
from taichi_dr.pipelines.mesh_fit import FitSettings, MeshDeformer, MeshFitMethod, fit_mesh

_spec = importlib.util.spec_from_file_location(
    "fit_thin", Path(__file__).resolve().parents[2] / "benchmarks" / "fit_thin.py")
fit_thin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fit_thin)


def _problem(shape: str, views: int, size: int, scale: float = 1.0):
    mesh, _, sil, cams = fit_thin.make_problem(shape, views, size, scale)
    return mesh, torch.from_numpy(sil).float(), cams.to(dtype=torch.float32)


def _fit(sil, cams, template, settings, seed=0):
    result = fit_mesh(sil, cams, template, settings, seed=seed, progress="none")
    return result.initial_mesh, result.mesh


def _np_iou(mesh, cams, sil) -> np.ndarray:
    pred = fit_thin.numpy_silhouettes(mesh.verts, mesh.faces, cams.K, cams.R, cams.t, cams.image_size)
    return fit_thin.hard_iou(pred, sil.numpy() > 0.5), pred


# ----------------------------------------------------------------------------------------------------------
# The test objects and the independent rasterizer


def test_shapes_are_closed_deterministic_and_about_unit_size():
    for name in SHAPES:
        a, b = make_shape(name), make_shape(name)
        assert torch.equal(a.verts, b.verts) and torch.equal(a.faces, b.faces)
        v = a.verts.double()
        f = a.faces.long()
        if name != "spot":  # Spot's OBJ splits vertices along its texture seams
            # Closed: every edge is shared by exactly two faces (each part is watertight).
            edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]).sort(1).values
            _, counts = torch.unique(edges, dim=0, return_counts=True)
            assert bool((counts == 2).all()), name
        # Outward winding: positive enclosed volume.
        volume = (v[f[:, 0]] * torch.linalg.cross(v[f[:, 1]], v[f[:, 2]], dim=-1)).sum() / 6
        assert volume > 0, name
        extent = float((v.max(0).values - v.min(0).values).max())
        assert 0.75 < extent <= 1.0 + 1e-6, (name, extent)
    with pytest.raises(ValueError, match="unknown shape 'plane'"):
        make_shape("plane")


def test_numpy_silhouettes_square_in_front_of_camera():
    # A square of side 1 at depth 2, seen by a 40 px focal camera: it spans 20 px, centred on (16, 16);
    # pixel centres 6.5 .. 25.5 lie inside, so columns/rows 6..25 are set. Both windings give the same.
    s = 0.5
    verts = np.array([[-s, -s, 2.0], [s, -s, 2.0], [s, s, 2.0], [-s, s, 2.0]])
    K = np.array([[[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]]])
    R, t = np.eye(3)[None], np.zeros((1, 3))
    want = np.zeros((32, 32), bool)
    want[6:26, 6:26] = True
    for faces in ([[0, 1, 2], [0, 2, 3]], [[0, 2, 1], [0, 3, 2]]):
        for window in (8, 32):  # small-triangle windows and the whole-image path
            got = fit_thin.numpy_silhouettes(verts, faces, K, R, t, (32, 32), window=window)[0]
            assert np.array_equal(got, want)
    # Mirrored camera (fx < 0): the mirror image, still 20x20.
    Km = K.copy()
    Km[0, 0, 0] = -40.0
    got = fit_thin.numpy_silhouettes(verts, [[0, 1, 2], [0, 2, 3]], Km, R, t, (32, 32))[0]
    assert np.array_equal(got, want[:, ::-1])


# ----------------------------------------------------------------------------------------------------------
# Fits


def test_short_default_fit_of_airplane_keeps_the_wings():
    """40 views at 48²: 150 steps of the default settings (sigma annealed over those steps) lift the mean
    hard IoU from the sphere's 0.27 to 0.92 (> 0.85 asserted) and cover the wing tips (> 85% of their pixels
    in the views below). With the previous defaults' constant sigma 1e-4, all views per step and flatten 0.5,
    the same fit ends at 0.72 and leaves 20% and 45% of those tip pixels uncovered."""
    tdr.init("cpu")
    _, sil, cams = _problem("airplane", 40, 48)
    settings = FitSettings(iters=150)
    initial, fitted = _fit(sil, cams, icosphere(level=3), settings)
    iou0, _ = _np_iou(initial, cams, sil)
    iou1, pred = _np_iou(fitted, cams, sil)
    assert iou0.mean() < 0.45 and iou1.mean() > 0.85, (iou0.mean(), iou1.mean())
    assert iou1.mean() > iou0.mean() + 0.3
    # Wing tips: views 0 and 20 look along the fuselage (azimuth 0 and 180), wings horizontal; the target
    # pixels in the outer 15% of the span on either side must be mostly covered. The two views hold 10 and 20
    # such pixels, so they are pooled: one view's share moves in steps of 5-10%, and a machine with other
    # float rounding (AVX-512) covered 10/10 and 17/20 where another covered at least 18/20.
    covered = []
    for n in (0, 20):
        ys, xs = np.nonzero(sil[n].numpy() > 0.5)
        span = xs.max() - xs.min()
        tips = (xs <= xs.min() + 0.15 * span) | (xs >= xs.max() - 0.15 * span)
        covered.append(pred[n][ys[tips], xs[tips]])
    assert np.concatenate(covered).mean() > 0.85, [c.mean() for c in covered]


def test_regulariser_weights_do_not_depend_on_resolution_or_scale():
    # The energy: exactly scale invariant, and within 1.6x from 642 to 2562 vertices where the mean
    # Laplacian (the previous regulariser) falls ~10x.
    s3, s4 = icosphere(level=3).verts.double(), icosphere(level=4).verts.double()
    f3, f4 = icosphere(level=3).faces, icosphere(level=4).faces
    e3 = float(scale_free_laplacian_loss(s3, f3))
    assert float(scale_free_laplacian_loss(10 * s3, f3)) == pytest.approx(e3, rel=1e-9)
    e4 = float(scale_free_laplacian_loss(s4, f4))
    assert 1.0 < e4 / e3 < 1.6, (e3, e4)
    assert float(laplacian_loss(s3, f3)) / float(laplacian_loss(s4, f4)) > 8

    # The same short default fit with a 642- and a 2562-vertex template, and of the object scaled 10x (seen
    # from 10x as far): comparable results (measured 0.937 and 0.927; with the previous mean flatten loss
    # at weight 0.5 the 2562-vertex fit reached only 0.79 where the 642-vertex one reached 0.89).
    tdr.init("cpu")
    settings = FitSettings(iters=150)
    _, sil, cams = _problem("chair", 16, 48)
    _, fitted3 = _fit(sil, cams, icosphere(level=3), settings)
    _, fitted4 = _fit(sil, cams, icosphere(level=4), settings)
    iou3, iou4 = _np_iou(fitted3, cams, sil)[0].mean(), _np_iou(fitted4, cams, sil)[0].mean()
    assert iou3 > 0.85 and abs(iou3 - iou4) < 0.04, (iou3, iou4)

    _, sil10, cams10 = _problem("chair", 16, 48, scale=10.0)
    assert torch.equal(sil10, sil)
    _, fitted10 = _fit(sil10, cams10, icosphere(level=3), settings)
    iou10 = _np_iou(fitted10, cams10, sil10)[0].mean()
    assert abs(iou10 - iou3) < 0.03, (iou3, iou10)
    ratio = fitted10.verts.abs().max() / fitted3.verts.abs().max()
    assert 9.5 < float(ratio) < 10.5


def test_fit_mesh_cli_defaults_are_fit_settings_defaults():
    import inspect

    from apps.fit_mesh import fit_mesh_command

    cli = {name: p.default.default for name, p in inspect.signature(fit_mesh_command).parameters.items()}
    d = FitSettings()
    assert cli["iterations"] == d.iters and cli["lr"] == d.lr and cli["color_lr"] == d.color_lr
    assert cli["sigma"] == d.sigma and cli["gamma"] == d.gamma and cli["sigma_final"] == d.sigma_final
    assert cli["laplacian_weight"] == d.laplacian_weight and cli["flatten_weight"] == d.flatten_weight
    assert cli["views_per_step"] == d.views_per_step and cli["parameterization"] == d.parameterization
    assert cli["rgb_weight"] == d.rgb_weight


def test_sigma_schedule_and_settings_errors():
    s = FitSettings(iters=11, sigma=1e-4, sigma_final=1e-6)
    assert s.sigma_at(0) == pytest.approx(1e-4) and s.sigma_at(10) == pytest.approx(1e-6)
    assert s.sigma_at(5) == pytest.approx(1e-5)  # geometric: halfway in log
    assert s.sigma_at(50) == pytest.approx(1e-6)  # past the end (a resumed run with fewer iters): clamped
    assert FitSettings(sigma_final=None).sigma_at(7) == FitSettings().sigma
    with pytest.raises(ValueError, match="sigma_final"):
        FitSettings(sigma_final=0.0)
    with pytest.raises(ValueError, match="parameterization"):
        FitSettings(parameterization="softplus")
    model = MeshDeformer(icosphere(level=1), torch.zeros(3), 1.0, parameterization="sigmoid")
    with pytest.raises(ValueError, match="parameterization"):
        MeshFitMethod(model, torch.zeros(1, 8, 8), tdr.Cameras.from_spherical(2.7, 30.0, 0.0, 30.0, (8, 8)))


def test_scale_free_laplacian_values_gradients_and_degenerate_input():
    from taichi_dr.losses.mesh import vertex_edge_length2

    # One triangle with legs 3 and 4 (hypotenuse 5): vertex 0 has edges 3 and 4 -> (9 + 16) / 2.
    tri = torch.tensor([[0.0, 0, 0], [3, 0, 0], [0, 4, 0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    assert vertex_edge_length2(tri, faces).tolist() == pytest.approx([12.5, 17.0, 20.5])
    # Each vertex's Laplacian is the mean of the other two minus itself: check one term by hand.
    lap0 = (tri[1] + tri[2]) / 2 - tri[0]
    total = sum(float((((tri[(k + 1) % 3] + tri[(k + 2) % 3]) / 2 - tri[k]) ** 2).sum()) / ell2
                for k, ell2 in enumerate((12.5, 17.0, 20.5)))
    assert float((lap0 ** 2).sum()) == pytest.approx(6.25)
    assert float(scale_free_laplacian_loss(tri, faces)) == pytest.approx(total)

    sphere = icosphere(level=1)
    gen = torch.Generator().manual_seed(0)
    verts = (sphere.verts.double() + 0.05 * torch.randn(sphere.verts.shape, generator=gen,
                                                       dtype=torch.float64)).requires_grad_(True)
    rest = sphere.verts.double()
    assert torch.autograd.gradcheck(lambda v: scale_free_laplacian_loss(v, sphere.faces, rest), (verts,))
    # Without rest_verts the lengths come from verts themselves (and are differentiated too).
    assert torch.autograd.gradcheck(lambda v: scale_free_laplacian_loss(v, sphere.faces), (verts,))

    # All vertices at one point: zero-length edges give 0, with finite gradients.
    collapsed = torch.zeros_like(rest, requires_grad=True)
    value = scale_free_laplacian_loss(collapsed, sphere.faces)
    value.backward()
    assert float(value.detach()) == 0.0 and bool(torch.isfinite(collapsed.grad).all())
    with pytest.raises(ValueError, match="rest_verts"):
        scale_free_laplacian_loss(rest, sphere.faces, rest[:-1])


def test_fit_mesh_cli_rejects_bad_new_options(tmp_path):
    from typer.testing import CliRunner

    from apps.main import app

    np.save(tmp_path / "t.npy", np.zeros((2, 8, 8), np.float32))
    np.save(tmp_path / "c.npy", fit_thin.softras_rows(2))
    base = ["fit-mesh", "--targets", str(tmp_path / "t.npy"), "--cameras", str(tmp_path / "c.npy"),
            "--out", str(tmp_path / "out")]
    for extra, needle in ((["--sigma-final", "-1"], "--sigma-final"), (["--sigma-final", "nan"], "--sigma-final"),
                          (["--parameterization", "softplus"], "--parameterization")):
        res = CliRunner().invoke(app, base + extra)
        assert res.exit_code != 0, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and needle in errors[0] and "Traceback" not in res.output, res.output
