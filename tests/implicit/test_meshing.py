"""Multiresolution sparse marching cubes (taichi_dr.implicit.meshing): the same mesh as the dense grid on
analytic fields, thin parts included, far fewer points evaluated; orientation, world coordinates, errors."""

from __future__ import annotations

import math

import pytest
import torch

from taichi_dr.core.mesh import face_normals
from taichi_dr.implicit.analytic import box_sdf, sphere_sdf, torus_sdf
from taichi_dr.implicit.meshing import extract_mesh

CENTER = (0.1, -0.05, 0.02)


def sphere(x):
    return sphere_sdf(x, 0.5, CENTER)


def thin_torus(x):  # tube radius 0.02: under a third of a coarse cell (2 / 32 = 0.0625)
    return torus_sdf(x, 0.55, 0.02)


def thin_plate(x):  # 0.024 thick
    return box_sdf(x, (0.6, 0.012, 0.5))


def occupancy(x):  # inside above 0.5
    return torch.sigmoid(-40.0 * sphere(x))


def assert_same_mesh(a, b):
    assert a.verts.shape == b.verts.shape and a.faces.shape == b.faces.shape
    assert torch.equal(a.verts, b.verts) and torch.equal(a.faces, b.faces)


def density(x):  # a NeRF-like density, 0 outside radius 0.5 and rising inwards; its 5.0 set has radius 0.25
    return 20.0 * torch.relu(-sphere(x))


@pytest.mark.parametrize("field, options", [
    (sphere, {}), (thin_torus, {}), (thin_plate, {}), (occupancy, dict(level=0.5, inside="above")),
    (density, dict(level=5.0, inside="above")),
])
def test_sparse_equals_dense_with_far_fewer_points(field, options):
    dense, d = extract_mesh(field, 121, dense=True, return_stats=True, **options)
    sparse, s = extract_mesh(field, 121, return_stats=True, **options)
    assert_same_mesh(dense, sparse)
    assert d["points_evaluated"] == 121 ** 3 == s["dense_points"]
    assert s["points_evaluated"] < 0.35 * d["points_evaluated"]
    assert len(sparse.faces) > 500


def test_thin_parts_seen_from_a_coarse_grid_much_coarser_than_them():
    """The slope bound, not luck: the tube (radius 0.01) is far thinner than the first grid's cells (0.25)."""
    tube = lambda x: torus_sdf(x, 0.55, 0.01)  # noqa: E731
    dense = extract_mesh(tube, 161, dense=True)
    sparse, stats = extract_mesh(tube, 161, coarse=8, return_stats=True)
    assert stats["levels"] == 5
    assert_same_mesh(dense, sparse)


def test_occupancy_without_a_slope_bound_may_miss_what_no_coarse_corner_sees():
    """What the fallback is for: a thin occupancy plate between the corners of a very coarse grid is not
    found, and the error says what to do; ``dense=True`` and a finer coarse grid find it."""
    plate = lambda x: torch.sigmoid(-400.0 * box_sdf(x - torch.tensor([0.0, 0.07, 0.0]), (0.6, 0.01, 0.5)))  # noqa: E731
    with pytest.raises(ValueError, match="does not cross level 0.5.*coarse or dense=True"):
        extract_mesh(plate, 129, level=0.5, inside="above", coarse=4)
    dense = extract_mesh(plate, 129, level=0.5, inside="above", dense=True)
    assert_same_mesh(dense, extract_mesh(plate, 129, level=0.5, inside="above"))


def test_closed_outward_and_in_world_coordinates():
    trimesh = pytest.importorskip("trimesh")
    for field, options, radius in ((sphere, {}, 0.5), (occupancy, dict(level=0.5, inside="above"), 0.5),
                                   (density, dict(level=5.0, inside="above"), 0.25)):
        mesh = extract_mesh(field, 96, **options)
        assert trimesh.Trimesh(mesh.verts.numpy(), mesh.faces.numpy(), process=True).is_watertight
        centres = mesh.verts[mesh.faces].mean(1) - torch.tensor(CENTER)
        assert ((face_normals(mesh.verts, mesh.faces) * centres).sum(-1) > 0).float().mean() > 0.99
        radii = (mesh.verts - torch.tensor(CENTER)).norm(dim=-1)
        assert float((radii - radius).abs().max()) < 0.01
    s = torch.eye(4, dtype=torch.float64) * 10
    s[3, 3] = 1
    s[:3, 3] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    world = extract_mesh(lambda x: box_sdf(x, (0.3, 0.2, 0.1)), resolution=33, scale_mat=s)
    assert torch.allclose(world.verts.min(0).values, torch.tensor([-2.0, 0.0, 2.0]), atol=0.05)
    assert torch.allclose(world.verts.max(0).values, torch.tensor([4.0, 4.0, 4.0]), atol=0.05)


def test_resolution_keeps_its_meaning_and_progress_has_a_line_per_level():
    lines = []
    mesh, stats = extract_mesh(sphere, 100, progress=lines.append, return_stats=True)
    assert len(lines) == stats["levels"] == 3   # 99 cells / 32 -> first stride 4: 4, 2, 1
    assert lines[0].startswith("meshing level 1/3") and lines[-1].startswith("meshing level 3/3")
    # vertices lie on the edges of the 100-point grid over [-1, 1]
    on_grid = (mesh.verts + 1) / (2 / 99)
    near = (on_grid - on_grid.round()).abs()
    assert float(near.min(-1).values.max()) < 1e-3   # two of three coordinates on grid lines (one is exact)
    assert stats["dense_points"] == 100 ** 3 and stats["points_evaluated"] < 100 ** 3 / 4


def test_bad_inputs_fail_in_one_line():
    for kwargs, needle in ((dict(resolution=1), "resolution"), (dict(bound=0.0), "bound"),
                           (dict(level=math.nan), "level"), (dict(inside="outside"), "inside"),
                           (dict(coarse=0), "coarse"), (dict(band=-1.0), "band"), (dict(chunk=0), "chunk")):
        with pytest.raises(ValueError, match=f"extract_mesh: {needle} must be"):
            extract_mesh(sphere, **{"resolution": 16, **kwargs})
    with pytest.raises(ValueError, match="non-finite values"):
        extract_mesh(lambda x: sphere(x) / (x[:, 0] > 0).float() * 0, 16)
    with pytest.raises(ValueError, match=r"must map \(M, 3\) points to \(M,\) values"):
        extract_mesh(lambda x: x, 16)
    with pytest.raises(ValueError, match="does not cross level 0"):
        extract_mesh(lambda x: sphere_sdf(x, 5.0), 16)
