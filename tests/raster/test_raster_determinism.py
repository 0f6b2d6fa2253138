"""Reproducible gradients: the deterministic backward (the CPU default) gives bitwise identical outputs and
gradients from run to run and whatever the number of Taichi threads, and the same gradients as the float-atomic
backward and the dense reference."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from vulkan_subprocess import run_on_vulkan

from taichi_dr.raster import RasterSettings, bin_faces, soft_rasterize
from taichi_dr.raster.reference import soft_rasterize_reference

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_raster import random_scene  # noqa: E402

MODES = {
    "soft": dict(sigma=1e-2, gamma=0.05, near=1.0, far=10.0),
    "hard": dict(mode="hard", near=1.0, far=10.0),
}


def render_and_grads(mode: str, dtype=torch.float32, deterministic=None, tile_size=4, texture=True, F=80):
    """Outputs and gradients of a random loss on a busy scene: many faces overlapping per tile, so float atomics
    would see many orders."""
    fv, attrs, tex, uvs, shading, size = random_scene(B=2, F=F, H=28, W=36, dtype=dtype, seed=5)
    s = RasterSettings(**MODES[mode], tile_size=tile_size, deterministic=deterministic)
    leaves = [x.clone().requires_grad_() for x in (fv, attrs, tex, shading)]
    if texture:
        alpha, image, p2f = soft_rasterize(leaves[0], size, leaves[1], s, leaves[2], uvs, leaves[3])
    else:
        alpha, image, p2f = soft_rasterize(leaves[0], size, leaves[1], s)
    g = torch.Generator().manual_seed(2)
    w_alpha = torch.randn(alpha.shape, generator=g, dtype=dtype)
    w_image = torch.randn(image.shape, generator=g, dtype=dtype)
    ((alpha * w_alpha).sum() + (image * w_image).sum()).backward()
    return [alpha, image, p2f] + [x.grad for x in (leaves if texture else leaves[:2])]


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repeated_runs_are_bitwise_identical(mode, dtype):
    first = render_and_grads(mode, dtype)
    assert first[0].max() > 0.5 and all(g.abs().max() > 0 for g in first[3:])
    for _ in range(3):
        again = render_and_grads(mode, dtype)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", list(MODES))
def test_deterministic_and_atomic_backward_agree(mode):
    """Both backward modes compute the same sums, only in different orders (float64: to rounding)."""
    det = render_and_grads(mode, torch.float64, deterministic=True)
    atomic = render_and_grads(mode, torch.float64, deterministic=False)
    for a, b in zip(det[:3], atomic[:3], strict=True):
        assert torch.equal(a, b)  # the forward does not depend on the mode
    for a, b in zip(det[3:], atomic[3:], strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * float(b.abs().max()))


def test_deterministic_gradients_match_reference_autograd():
    fv, attrs, tex, uvs, shading, size = random_scene(seed=3)
    s = RasterSettings(**MODES["soft"], deterministic=True)

    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in (fv, attrs, tex, shading)]
        alpha, image, _ = fn(leaves[0], size, leaves[1], s, leaves[2], uvs, leaves[3])
        (alpha.sum() + (image * torch.linspace(-1, 1, image.shape[-1], dtype=image.dtype)).sum()).backward()
        return [x.grad for x in leaves]

    for label, a, b in zip(["face_verts", "face_attrs", "texture", "face_shading"], grads(soft_rasterize),
                           grads(soft_rasterize_reference), strict=True):
        assert b.abs().max() > 0, label
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-6, msg=label)


def test_fixed_point_texture_gradient_scales_exactly_and_survives_extremes():
    """Texture gradients are int64 sums at a power-of-two scale chosen from the incoming gradient: scaling that
    gradient by a power of two scales the texture gradient exactly from 2^-60 to 2^60, and to float32 precision
    at 2^-100 and 2^100 (the scale is clamped to float32's range there); zero stays zero."""
    fv, attrs, tex, uvs, shading, size = random_scene(dtype=torch.float32, seed=4)
    s = RasterSettings(**MODES["soft"], deterministic=True)

    def texture_grad(factor):
        t = tex.clone().requires_grad_()
        _, image, _ = soft_rasterize(fv, size, attrs, s, t, uvs, shading)
        w = torch.randn(image.shape, generator=torch.Generator().manual_seed(1)) * factor
        (image * w).sum().backward()
        return t.grad

    base = texture_grad(1.0)
    assert base.abs().max() > 0
    for k in (-60, -20, 20, 60):
        assert torch.equal(texture_grad(2.0 ** k), base * 2.0 ** k)
    for k in (-100, 100):
        scaled = texture_grad(2.0 ** k)
        assert torch.isfinite(scaled).all()
        torch.testing.assert_close(scaled, base * 2.0 ** k, rtol=0, atol=1e-5 * float(base.abs().max()) * 2.0 ** k)
    assert torch.equal(texture_grad(0.0), torch.zeros_like(base))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_deterministic_rows_are_exactly_the_bin_entries(mode):
    """The deterministic backward gives each face one row per tile binning put it in (rows and bin entries
    must agree one to one, or gradients would land in another face's rows)."""
    from taichi_dr.raster.soft import _face_start

    fv, *_, size = random_scene(F=40, dtype=torch.float32)
    B, F = fv.shape[:2]
    for cull in (False, True):
        s = RasterSettings(**MODES[mode], tile_size=4, cull_backfaces=cull)
        rects, tiles_per_face = torch.empty((B, F, 3), dtype=torch.int32), torch.empty((B, F), dtype=torch.int32)
        offsets, tile_faces, tiles_x, n_tiles, ts = bin_faces(fv, size, s, face_rects=(rects, tiles_per_face))
        start = _face_start(tiles_per_face)
        total = int(offsets[-1])
        assert total > 0 and int(start[-1]) == total
        lengths = (offsets[1:] - offsets[:-1]).long()
        views = (torch.arange(B * n_tiles) // n_tiles).repeat_interleave(lengths)  # per entry
        tiles = (torch.arange(B * n_tiles) % n_tiles).repeat_interleave(lengths)
        per_face = torch.bincount(views * F + tile_faces[:total].long(), minlength=B * F)
        assert torch.equal(per_face, (start[1:] - start[:-1]).long())
        for b in range(B):  # and each face's tiles are its rectangle's, in row-major order
            for f in range(F):
                mine = tiles[(views == b) & (tile_faces[:total] == f)]
                tx0, ty0, across = rects[b, f].tolist()
                n = int(start[b * F + f + 1] - start[b * F + f])
                expected = [(ty0 + j // across) * tiles_x + tx0 + j % across for j in range(n)] if n else []
                assert mine.tolist() == expected


def test_settings_choose_the_mode_per_backend():
    assert RasterSettings().deterministic_on("cpu")
    assert not RasterSettings().deterministic_on("cuda")
    assert not RasterSettings().deterministic_on("vulkan")
    assert RasterSettings(deterministic=True).deterministic_on("cuda")
    assert not RasterSettings(deterministic=False).deterministic_on("cpu")
    with pytest.raises(ValueError, match="deterministic"):
        RasterSettings(deterministic="yes")


THREADS_SCRIPT = r"""
import functools, hashlib, json, sys
import taichi as ti
ti.init = functools.partial(ti.init, cpu_max_num_threads=int(sys.argv[2]))  # taichi_dr.init calls this
sys.path.insert(0, sys.argv[1]); sys.path[:0] = [sys.argv[1] + "/tests/raster", sys.argv[1] + "/tests"]
import taichi_dr
taichi_dr.init("cpu")
from test_raster_determinism import digest, render_and_grads
print(json.dumps({m: digest(render_and_grads(m)) for m in ("soft", "hard")}))
"""


def test_results_do_not_depend_on_the_thread_count(tmp_path):
    """One and three Taichi threads (fresh processes) give the bits this process gets."""
    script = tmp_path / "threads.py"
    script.write_text(THREADS_SCRIPT)
    here = {m: digest(render_and_grads(m)) for m in ("soft", "hard")}
    for threads in (1, 3):
        proc = subprocess.run([sys.executable, str(script), str(ROOT), str(threads)], capture_output=True,
                              text=True, timeout=600, env=dict(os.environ, TAICHI_DR_ARCH="cpu"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == here, f"{threads} threads"


VULKAN_SCRIPT = r"""
from test_raster_determinism import render_and_grads
from taichi_dr.raster import RasterSettings, bin_faces, soft_rasterize
out = {}
for mode in ("soft", "hard"):
    runs = [render_and_grads(mode, deterministic=True, texture=False) for _ in range(2)]
    out[mode] = {"repeat_equal": all(torch.equal(a, b) for a, b in zip(*runs)),
                 "values": [t.tolist() for t in runs[0]]}
fv, attrs, tex, uvs, shading, size = __import__("test_raster").random_scene(dtype=torch.float32)
try:
    soft_rasterize(fv, size, attrs, RasterSettings(deterministic=True), tex, uvs, shading)
    out["texture_refused"] = ""
except ValueError as e:
    out["texture_refused"] = str(e)
"""


@pytest.mark.vulkan
def test_vulkan_deterministic_backward(tmp_path):
    """On Vulkan the deterministic backward (asked for explicitly) repeats bitwise and matches the CPU's;
    with a texture it is refused with a message, since lavapipe's integer atomics in loops are wrong."""
    vk = run_on_vulkan(tmp_path, VULKAN_SCRIPT)
    assert "RasterSettings.deterministic" in vk["texture_refused"]
    labels = ["alpha", "image", "pix_to_face", "g_verts", "g_attrs"]
    for mode in ("soft", "hard"):
        assert vk[mode]["repeat_equal"], mode
        cpu = render_and_grads(mode, deterministic=True, texture=False)
        for label, a, b in zip(labels, cpu, vk[mode]["values"], strict=True):
            a, b = a.detach().numpy(), np.asarray(b)
            scale = max(1.0, float(np.abs(a).max()))
            assert np.allclose(a, b, atol=2e-4 * scale, rtol=1e-3), f"{mode} {label}: {np.abs(a - b).max()}"
