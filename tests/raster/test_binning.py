"""Tile binning (taichi_dr/raster/binning.py): the lists against a plain NumPy binning, independence of the
chunking, the same lists on Vulkan, and the guards on the pair count (never an int32 wrap, never an
out-of-bounds write)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from vulkan_subprocess import run_on_vulkan

from taichi_dr.raster import RasterSettings, binning, soft_rasterize
from taichi_dr.raster.binning import bin_faces

ROOT = Path(__file__).resolve().parents[2]


def scene(B, F, H, W, dtype=torch.float64, seed=0, spread=14.0):
    """Random well-shaped triangles (B, F, 3, 3) of either winding over an H x W image (some reaching past its
    borders), up to `spread` px across, depths in [2, 6]; every 17th crosses the near plane 1.0 (skipped)."""
    g = torch.Generator().manual_seed(seed)
    centre = (torch.rand(B, F, 1, 2, generator=g, dtype=dtype) * 1.2 - 0.1) * torch.tensor([W, H], dtype=dtype)
    # Corners at angles about 120 degrees apart (jittered), so no face is a sliver.
    winding = torch.where(torch.rand(B, F, 1, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    angle = (2 * math.pi * torch.rand(B, F, 1, generator=g, dtype=dtype)
             + winding * (torch.arange(3, dtype=dtype) * 2 * math.pi / 3
                          + 0.4 * (torch.rand(B, F, 3, generator=g, dtype=dtype) - 0.5)))
    radius = (0.1 + 0.9 * torch.rand(B, F, 3, generator=g, dtype=dtype)) * spread / 2
    uv = centre + radius[..., None] * torch.stack([angle.cos(), angle.sin()], -1) + 0.0137
    z = 2 + 4 * torch.rand(B, F, 3, 1, generator=g, dtype=dtype)
    z[:, ::17, 0] = 0.5
    return torch.cat([uv, z], -1).contiguous()


def reference_bins(fv, image_size, settings, tile):
    """The lists by hand: face f is in tile s of view b iff it is in front of the near plane (and front-facing
    when culling) and the pixel window of its bounding box grown by the cut-off radius meets the tile."""
    H, W = image_size
    radius = 0.0 if settings.mode == "hard" else math.sqrt(settings.cutoff_d2_px(image_size))
    tiles_x, tiles_y = -(-W // tile), -(-H // tile)
    lists = [[[] for _ in range(tiles_x * tiles_y)] for _ in range(fv.shape[0])]
    for b, views in enumerate(fv.numpy()):
        for f, face in enumerate(views):
            p, z = face[:, :2], face[:, 2]
            e1, e2 = p[1] - p[0], p[2] - p[0]
            area2 = e1[0] * e2[1] - e1[1] * e2[0]
            if z.min() < settings.near or (settings.cull_backfaces and area2 >= 0):
                continue
            lo, hi = p.min(0), p.max(0)
            x0, y0 = np.maximum(np.ceil(lo - radius - 0.5), 0).astype(int)
            x1 = min(int(np.floor(hi[0] + radius - 0.5)), W - 1)
            y1 = min(int(np.floor(hi[1] + radius - 0.5)), H - 1)
            if x0 > x1 or y0 > y1:
                continue
            for ty in range(y0 // tile, y1 // tile + 1):
                for tx in range(x0 // tile, x1 // tile + 1):
                    lists[b][ty * tiles_x + tx].append(f)
    return lists


def as_lists(offsets, tile_faces, n_views, n_tiles):
    o = offsets.tolist()
    return [[tile_faces[o[b * n_tiles + s]:o[b * n_tiles + s + 1]].tolist() for s in range(n_tiles)]
            for b in range(n_views)]


CASES = [  # (B, F, H, W, settings): many views (one chunk per view), one view (many chunks), odd tiles
    (6, 40, 20, 24, RasterSettings(sigma=1e-2, near=1.0, tile_size=4)),
    (1, 700, 37, 29, RasterSettings(sigma=3e-3, near=1.0, tile_size=5)),
    (2, 300, 16, 40, RasterSettings(sigma=2e-3, near=1.0, cull_backfaces=True, tile_size=8)),
    (1, 500, 33, 33, RasterSettings(mode="hard", near=1.0, tile_size=2)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_bins_match_a_plain_binning(case, monkeypatch):
    B, F, H, W, settings = CASES[case]
    monkeypatch.setattr(binning, "MIN_CHUNK_FACES", 16)  # several chunks even for these few faces
    fv = scene(B, F, H, W, seed=case)
    offsets, tile_faces, tiles_x, n_tiles, tile = bin_faces(fv, (H, W), settings)
    assert (tiles_x, n_tiles, tile) == (-(-W // tile), -(-W // tile) * -(-H // tile), settings.tile_size)
    assert offsets.dtype == tile_faces.dtype == torch.int32 and offsets.shape == (B * n_tiles + 1,)
    assert offsets[0] == 0 and (offsets[1:] >= offsets[:-1]).all()
    assert int(offsets[-1]) <= tile_faces.numel()
    expected = reference_bins(fv, (H, W), settings, tile)
    assert as_lists(offsets, tile_faces, B, n_tiles) == expected
    assert sum(len(s) for v in expected for s in v) > 2 * B * n_tiles  # the scenes really fill the tiles


def test_lists_do_not_depend_on_the_chunking(monkeypatch):
    """Bitwise the same lists from one chunk per view (the old one-thread-per-view scheme) down to 7-face
    chunks, in float32 as the renderer bins them."""
    fv = scene(3, 500, 48, 40, dtype=torch.float32, spread=30.0)
    settings = RasterSettings(sigma=1e-2, near=1.0, tile_size=8)
    results = []
    for chunk in (10**9, 200, 64, 7):
        monkeypatch.setattr(binning, "face_chunk", lambda B, F, T, arch, c=chunk: min(c, F))
        results.append(bin_faces(fv, (48, 40), settings)[:2])
    for offsets, tile_faces in results[1:]:
        assert torch.equal(offsets, results[0][0])
        assert torch.equal(tile_faces, results[0][1])


def test_face_chunk_parallelises_one_view_and_bounds_counters():
    one_view = binning.face_chunk(1, 100_000, 64, "cuda")
    assert 100_000 / one_view >= 1000  # a 100k-face view is over a thousand GPU threads, not one
    assert binning.face_chunk(1, 100_000, 64, "cpu") < 100_000
    assert binning.face_chunk(120, 2700, 4, "cpu") == 2700  # many views: one chunk each, as before
    assert binning.face_chunk(1, 50, 4, "cuda") == 50  # never chunks below MIN_CHUNK_FACES
    chunk = binning.face_chunk(1, 10**6, 2**20, "cuda")
    assert -(-10**6 // chunk) * 2**20 <= binning.MAX_CHUNK_COUNTERS


def test_too_many_pairs_is_refused_before_allocating():
    """A huge sigma on a large mesh: 4 views x 256^2 tiles x 8200 faces, every face reaching every tile, is
    2.15e9 > 2^31 - 1 (tile, face) pairs. Counted in int64, it is refused by name (the old int32 offsets
    wrapped and the fill wrote out of bounds); nothing of that size is allocated."""
    B, F = 4, 8200
    fv = scene(B, F, 400, 400, torch.float32, spread=60.0)
    fv[..., :2] += 40.0  # corners within [-30, 510] px: every window (549 px around) covers the whole image
    fv[..., 2] = 2.0  # all in front
    settings = RasterSettings(sigma=0.5, near=1.0, tile_size=2)
    with pytest.raises(ValueError) as err:
        soft_rasterize(fv, (512, 512), None, settings)
    msg = str(err.value)
    assert "\n" not in msg
    for part in (f"{B * 256 * 256 * F} (tile, face) pairs", "sigma=0.5", "512x512", "8200 faces", "4 views",
                 "smaller sigma", "fewer views per call"):
        assert part in msg, (part, msg)


def test_pair_limit_is_exact(monkeypatch):
    fv = scene(2, 60, 20, 24)
    settings = RasterSettings(sigma=1e-2, near=1.0, tile_size=4)
    offsets, tile_faces, *_ = bin_faces(fv, (20, 24), settings)
    total = int(offsets[-1])
    monkeypatch.setattr(binning, "MAX_PAIRS", total)
    assert torch.equal(bin_faces(fv, (20, 24), settings)[1], tile_faces)
    monkeypatch.setattr(binning, "MAX_PAIRS", total - 1)
    with pytest.raises(ValueError, match=f"{total} \\(tile, face\\) pairs exceed the {total - 1}"):
        bin_faces(fv, (20, 24), settings)


def test_failed_allocation_names_the_sizes(monkeypatch):
    fv = scene(2, 60, 20, 24)
    settings = RasterSettings(sigma=1e-2, near=1.0, tile_size=4)
    total = int(bin_faces(fv, (20, 24), settings)[0][-1])
    real_zeros = torch.zeros

    def zeros(*size, **kwargs):  # the tile list's allocation fails, as it would for a huge total
        if size == ((total,),):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory\n"
                               "more detail")
        return real_zeros(*size, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros)
    with pytest.raises(MemoryError) as err:
        bin_faces(fv, (20, 24), settings)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for part in (f"cannot allocate {total} (tile, face) pairs", "DefaultCPUAllocator: not enough memory", "sigma=0.01",
                 "20x24", "60 faces", "2 views", "smaller sigma"):
        assert part in msg, (part, msg)


VULKAN_SCRIPT = r"""
from test_binning import scene, RasterSettings
from taichi_dr.raster import binning
binning.MIN_CHUNK_FACES = 16
out = {}
for name, (B, F, H, W, s) in {"views": (5, 200, 30, 26, RasterSettings(sigma=1e-2, near=1.0, tile_size=4)),
                              "one": (1, 900, 40, 44, RasterSettings(sigma=3e-3, near=1.0))}.items():
    offsets, faces, tiles_x, n_tiles, ts = binning.bin_faces(scene(B, F, H, W, torch.float32, seed=B), (H, W), s)
    out[name] = [offsets.tolist(), faces[:int(offsets[-1])].tolist(), ts,
                 binning.face_chunk(B, F, n_tiles, "vulkan")]
"""


@pytest.mark.vulkan
def test_vulkan_bins_equal_cpu(tmp_path, monkeypatch):
    vk = run_on_vulkan(tmp_path, VULKAN_SCRIPT)
    monkeypatch.setattr(binning, "MIN_CHUNK_FACES", 16)
    for name, (B, F, H, W, s) in {"views": (5, 200, 30, 26, RasterSettings(sigma=1e-2, near=1.0, tile_size=4)),
                                  "one": (1, 900, 40, 44, RasterSettings(sigma=3e-3, near=1.0))}.items():
        offsets_vk, faces_vk, ts, chunk = vk[name]
        assert chunk < F  # Vulkan ran the chunked path (several threads per view)
        # The CPU picks its own tile side by default; bin with Vulkan's for the comparison.
        s = RasterSettings(sigma=s.sigma, near=s.near, tile_size=ts)
        offsets, faces, *_ = bin_faces(scene(B, F, H, W, torch.float32, seed=B), (H, W), s)
        assert offsets.tolist() == offsets_vk, name
        assert faces[:int(offsets[-1])].tolist() == faces_vk, name
