"""The ``tdr`` command line (render, fit-mesh, demo), target loading and the Chamfer metric.

Everything runs at tiny sizes (32-48 px, a few dozen iterations) through typer's CliRunner, in-process.
"""

from __future__ import annotations

import json
import math
import os
import signal

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from apps.main import app
from taichi_dr.targets import load_targets

runner = CliRunner()


def invoke(*args: str):
    env = {k: v for k, v in os.environ.items() if k != "TDR_DEBUG"}
    return runner.invoke(app, [str(a) for a in args], env=env)


def assert_clean_error(result, *needles: str):
    """Non-zero exit, exactly one ``Error: ...`` line on stderr naming the problem, no traceback."""
    assert result.exit_code != 0, result.output
    assert result.exit_code != 130
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), (needle, errors[0])


# ----------------------------------------------------------------------------------------------------------
# Targets


def _disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    v, u = np.mgrid[0:h, 0:w] + 0.5
    return ((u - cx) ** 2 + (v - cy) ** 2 <= r * r).astype(np.float32)


def test_targets_png_folder_with_alpha(tmp_path):
    rgba = np.zeros((2, 12, 10, 4), np.uint8)
    rgba[0, 2:5, 3:7] = (255, 0, 0, 255)  # a red block at rows 2-4 (row 0 = top)
    rgba[1, 8:, :] = (0, 0, 255, 128)
    for i in (1, 0):  # written out of order: loading sorts by name
        iio.imwrite(tmp_path / f"v{i}.png", rgba[i])
    t = load_targets(tmp_path)
    assert t.names == ("v0.png", "v1.png")
    assert t.silhouettes.shape == (2, 12, 10) and t.image_size == (12, 10)
    assert torch.equal(t.silhouettes[0], torch.from_numpy(rgba[0, ..., 3] / 255.0).float())
    assert t.silhouettes[1, 8, 0].item() == pytest.approx(128 / 255)
    assert t.rgb.shape == (2, 12, 10, 3)
    assert t.rgb[0, 3, 4].tolist() == [1.0, 0.0, 0.0]
    assert t.rgb[0, 0, 0].tolist() == [0.0, 0.0, 0.0]


def test_targets_greyscale_masks(tmp_path):
    masks = [(_disc(16, 20, 10, 8, 5) * 255).astype(np.uint8), np.zeros((16, 20), np.uint8)]
    for i, m in enumerate(masks):
        iio.imwrite(tmp_path / f"{i:03d}.png", m)
    t = load_targets(tmp_path)
    assert t.rgb is None
    assert torch.equal(t.silhouettes, torch.from_numpy(np.stack(masks) / 255.0).float())


def test_targets_npy_uint8_and_float_rgba(tmp_path):
    sil = (np.random.default_rng(0).random((3, 8, 9)) > 0.5).astype(np.uint8) * 255
    np.save(tmp_path / "a.npy", sil)
    t = load_targets(tmp_path / "a.npy")
    assert t.rgb is None and t.silhouettes.dtype == torch.float32
    assert torch.equal(t.silhouettes, torch.from_numpy(sil / 255.0).float())

    x = np.random.default_rng(1).random((2, 4, 8, 9)).astype(np.float32)  # (N, C, H, W)
    np.save(tmp_path / "b.npy", x)
    t = load_targets(tmp_path / "b.npy")
    assert torch.equal(t.silhouettes, torch.from_numpy(x[:, 3]))
    assert torch.equal(t.rgb, torch.from_numpy(np.moveaxis(x[:, :3], 1, -1)))


@pytest.mark.parametrize("array, needle", [
    (np.zeros((2, 3, 8, 8), np.float32), "silhouette"),       # RGB without alpha
    (np.full((2, 8, 8), 2.0, np.float32), "[0, 1]"),          # floats out of range
    (np.zeros((8, 8), np.uint8), "shape"),                    # a single 2-D image
    (np.zeros((2, 8, 8), np.int64), "dtype"),
])
def test_targets_npy_errors(tmp_path, array, needle):
    np.save(tmp_path / "t.npy", array)
    with pytest.raises(ValueError, match="t.npy") as e:
        load_targets(tmp_path / "t.npy")
    assert needle in str(e.value)


def test_targets_png_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_targets(tmp_path / "nope")
    with pytest.raises(ValueError, match="no .png"):
        load_targets(tmp_path)
    iio.imwrite(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    iio.imwrite(tmp_path / "b.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match="b.png.*same size"):
        load_targets(tmp_path)
    (tmp_path / "b.png").unlink()
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    iio.imwrite(tmp_path / "b.png", rgb)
    with pytest.raises(ValueError, match="b.png.*alpha"):
        load_targets(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Metrics


def test_chamfer_concentric_spheres():
    from taichi_dr.mesh import icosphere
    from taichi_dr.metrics import bbox_diagonal, chamfer_distance

    a, b = icosphere(level=4, radius=1.0), icosphere(level=4, radius=1.1)
    d = chamfer_distance(a, b, n=20000)
    # Exactly 0.1 between the true spheres; the level-4 facets (sagitta ~2e-3) and the sampling add a few
    # thousandths.
    assert 0.099 < d < 0.106, d
    # A surface against itself: only the sampling bias, the mean nearest-neighbour distance of a Poisson
    # sample of density n / area, 0.5 / sqrt(n / area) ~ 0.0125.
    spacing = 0.5 / math.sqrt(20000 / (4 * math.pi))
    assert 0.7 * spacing < chamfer_distance(a, a, n=20000) < 1.3 * spacing
    assert chamfer_distance(b, a, n=20000) == pytest.approx(d, rel=0.03)
    assert bbox_diagonal(a) == pytest.approx(2 * math.sqrt(3), rel=1e-3)


def test_hard_iou():
    from taichi_dr.metrics import hard_iou

    p = torch.zeros(2, 4, 4)
    t = torch.zeros(2, 4, 4)
    p[0, :2] = 0.9  # 8 pixels
    t[0, :1] = 1.0  # 4 pixels, inside
    assert hard_iou(p, t).tolist() == [0.5, 1.0]  # the empty pair agrees
