"""``tdr make-dataset`` scenes with a background colour and a floor (for reconstruction without masks): what
the images show outside the mask, where the floor is, and input errors."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from app_helpers import assert_clean_error
from typer.testing import CliRunner

from apps.main import app
from apps.make_dataset import floor_albedo, parse_color, view_angles

runner = CliRunner()
VIEWS, SIZE = 4, 48
BACKGROUND = (0.2, 0.4, 0.6)
# Lights.default: ambient 0.5 plus 0.5 from the direction (0, 1, -1); the floor's normal is +y.
FLOOR_SHADE = 0.5 + 0.5 / math.sqrt(2.0)


def invoke(*args):
    env = {k: v for k, v in os.environ.items() if k != "TDR_DEBUG"}
    return runner.invoke(app, [str(a) for a in args], env=env)


def dilated(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool masks grown by one pixel (8-neighbourhood)."""
    return torch.nn.functional.max_pool2d(masks.float()[:, None], 3, 1, 1)[:, 0] > 0


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """The same ball (radius 2 at (5, 5, 5)) from the same views above 10 degrees of elevation: on a coloured
    background without floor, and on the default floor in front of white."""
    from taichi_dr.core.mesh import icosphere, save_mesh
    from taichi_dr.data.datasets import load_idr

    root = tmp_path_factory.mktemp("make_dataset")
    ball = icosphere(2, 2.0)
    ball.verts += 5.0
    save_mesh(ball, root / "ball.ply")
    common = [root / "ball.ply", "--views", VIEWS, "--size", SIZE]
    res = invoke("make-dataset", *common, "--background", ",".join(map(str, BACKGROUND)), "--min-elevation", 10,
                 "--out", root / "plain")
    assert res.exit_code == 0, res.output
    res = invoke("make-dataset", *common, "--floor", "--background", "1", "--out", root / "floor")
    assert res.exit_code == 0, res.output
    return root, load_idr(root / "plain"), load_idr(root / "floor")


def test_background_colour_outside_the_mask(scenes):
    _, plain, _ = scenes
    outside = ~dilated(plain.masks)                                    # the silhouette's edge blends colours
    assert 0.3 < float(outside.float().mean()) < 0.9                   # both kinds of pixel are there
    colours = plain.images[outside]                                    # (P, 3)
    assert torch.allclose(colours, torch.tensor(BACKGROUND).expand_as(colours), atol=0.5 / 255 + 1e-6)
    inside = plain.images[plain.masks]
    assert float((inside - torch.tensor(BACKGROUND)).abs().amax(-1).median()) > 0.2  # the object is not background


def test_floor_masks_and_cameras_as_without_floor(scenes):
    _, plain, floor = scenes
    assert torch.equal(plain.masks, floor.masks)
    assert torch.equal(plain.cameras.K, floor.cameras.K) and torch.equal(plain.cameras.R, floor.cameras.R)
    assert torch.equal(plain.scale_mat, floor.scale_mat)
    elevation = torch.rad2deg(torch.asin(floor.cameras.camera_centers()[:, 1] / floor.cameras.camera_centers().norm(
        dim=-1)))
    assert bool((elevation >= 10 - 1e-4).all())


def test_floor_lies_under_the_object_with_its_colours(scenes):
    """Every pixel outside the (slightly dilated) mask whose ray meets the floor's plane y = lowest point of
    gt_mesh.ply, inside the floor's square, away from checker-cell borders, shows that cell's colour lit from
    above; the pixels whose rays miss the floor show the white background."""
    from taichi_dr.core.mesh import load_mesh

    root, _, floor = scenes
    gt = load_mesh(root / "floor" / "gt_mesh.ply").verts.double()
    s = floor.scale_mat
    normalised = (gt - s[:3, 3]) @ torch.linalg.inv(s[:3, :3]).T      # world -> the dataset's normalised frame
    height = float(normalised[:, 1].min())
    radius = float(normalised.norm(dim=-1).max())                      # the object's bounding sphere
    assert radius == pytest.approx(0.8, rel=0.02) and height == pytest.approx(-radius, rel=0.05)
    half, cells = 3.0 * radius, 12                                     # --floor-size 3 radii; cells 0.5 radii
    cell = 2 * half / cells
    near_object = dilated(floor.masks)
    o, d = floor.cameras.image_rays()
    o, d = o.double(), d.double()
    t = (height - o[..., 1]) / d[..., 1]
    hit = o + t[..., None] * d                                         # (N, H, W, 3)
    x, z = hit[..., 0], hit[..., 2]
    on_floor = (t > 0) & (x.abs() < half) & (z.abs() < half)
    fx, fz = ((x + half) / cell) % 1, ((z + half) / cell) % 1
    clear = (fx - 0.5).abs().lt(0.4) & (fz - 0.5).abs().lt(0.4)         # not within 10% of a cell border
    checked = on_floor & clear & ~near_object
    expected = floor_albedo(x, z, half, cells).float() * FLOOR_SHADE
    assert float(checked.flatten(1).float().mean(1).min()) > 0.1       # every view sees plenty of floor
    err = (floor.images - expected).abs().amax(-1)
    assert float(err[checked].max()) < 1.0 / 255 + 1e-3, float(err[checked].max())
    # Both checker tiles and several gradient steps were compared, not one flat colour.
    assert len(torch.unique((expected[checked] * 255).round(), dim=0)) >= 8
    # The floor covers exactly the pixels whose rays meet its square (but for rays within 1% of its edge), and the
    # white background shows beyond it.
    edge = ((torch.maximum(x.abs(), z.abs()) - half).abs() < 0.01 * half) & (t > 0)
    shown = (floor.images != 1.0).any(-1)
    compared = ~near_object & ~edge
    assert torch.equal(shown[compared], on_floor[compared])
    assert bool((compared & ~on_floor).any())


def test_views_and_colour_parsing():
    # Equal areas on the sphere are equal heights (Archimedes): the views' heights are evenly spaced over the
    # whole sphere, or over the cap above --min-elevation, one in the middle of each of `views` equal bands.
    elevation, azimuth = view_angles(64, -90.0)
    middles = (np.arange(64) + 0.5) / 64
    np.testing.assert_allclose(np.sin(np.radians(elevation)), 1 - 2 * middles, atol=1e-12)
    assert ((0 <= azimuth) & (azimuth < 360)).all() and len(np.unique(np.round(azimuth, 6))) == 64
    elevation, _ = view_angles(64, 10.0)
    lowest = math.sin(math.radians(10))
    np.testing.assert_allclose(np.sin(np.radians(elevation)), 1 - (1 - lowest) * middles, atol=1e-12)
    assert elevation.min() > 10
    assert parse_color("0.5", "--background") == (0.5, 0.5, 0.5)
    assert parse_color(" 1, 0 ,0.25", "--background") == (1.0, 0.0, 0.25)


@pytest.mark.parametrize("args, needle", [
    (["--background", "2,0,0"], "--background"),
    (["--background", "0.1,0.2"], "--background"),
    (["--background", "red"], "--background"),
    (["--background", "nan"], "--background"),
    (["--floor", "--floor-size", "0"], "--floor-size"),
    (["--floor", "--floor-size", "-1"], "--floor-size"),
    (["--floor", "--floor-size", "inf"], "--floor-size"),
    (["--floor", "--min-elevation", "-5"], "--min-elevation"),
    (["--min-elevation", "90"], "--min-elevation"),
])
def test_bad_options(tmp_path, args, needle):
    (tmp_path / "m.ply").write_text("not read: the options are checked first")
    assert_clean_error(invoke("make-dataset", tmp_path / "m.ply", "--out", tmp_path / "o", *args), needle,
                       exit_code=1)
    assert not (tmp_path / "o").exists()
