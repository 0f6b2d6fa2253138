"""Tile binning: which faces may touch which screen tiles, listed per tile in ascending face order.

The forward and backward kernels walk tile s of view b's list
``tile_faces[tile_offsets[b * T + s] : tile_offsets[b * T + s + 1]]`` and sum over it in that order, so the
order is part of the result: it must be ascending in face index, the same on every backend and every run.

Work is split over (view, chunk of consecutive faces) threads, so one view with 100k faces is not one GPU
thread (nor one CPU core):

1. count: each (view, chunk) thread walks its faces in order and counts, with plain loads and stores, how
   many of them reach each tile, into its own row ``counts[b, k, :]``;
2. scan (torch): a tile's list is its chunks' runs one after another, chunk 0 first, so the start of chunk
   k's run in tile s is ``offsets[b * T + s] + sum_{j < k} counts[b, j, s]``;
3. fill: each thread walks its faces again and writes them from those starts on.

Faces ascend within a chunk's run and chunks ascend along the list, so every list is in ascending face order
without any sort, and no thread shares a counter with another: no integer atomics, which Vulkan/lavapipe
gets wrong (measured: integer atomics inside a loop with a run-time bound drop all but the first two
iterations). The pair count is summed in int64 before anything is allocated: a total the int32 offsets and
Taichi's int32 indices cannot address is refused with a message, never wrapped into out-of-bounds writes.
"""

import math
import os

import taichi as ti
import torch

from taichi_dr.core import runtime
from taichi_dr.raster.kernels import NEAR, RADIUS, _corners, _face_ok, _pixel_range
from taichi_dr.raster.settings import RasterSettings

nd = ti.types.ndarray()
_FP = {torch.float32: ti.f32, torch.float64: ti.f64}

# The most (tile, face) pairs one call may list: offsets and the kernels' indices into tile_faces are int32.
MAX_PAIRS = 2**31 - 1
# At most this many per-chunk tile counters (int32, two arrays of it): bounds the chunking's extra memory.
MAX_CHUNK_COUNTERS = 2**23
MIN_CHUNK_FACES = 64  # fewer faces per thread would cost more in counters than the parallelism gains
CPU_TASKS_PER_THREAD = 16  # (view, chunk) tasks per CPU thread, to balance uneven chunks
GPU_THREADS = 8192  # (view, chunk) threads wanted on a GPU


@ti.func
def _tile_range(face_verts: ti.template(), params: ti.template(), b, f, width, height, tile,
                cull: ti.template(), fp: ti.template()):
    """Tiles (tx0..tx1, ty0..ty1) reached by face f's window; an empty range when it takes no part."""
    p0, p1, p2, z = _corners(face_verts, b, f, fp)
    tx0, tx1, ty0, ty1 = 0, -1, 0, -1
    if _face_ok(p0, p1, p2, z, params[NEAR], cull):
        lo, hi = ti.min(p0, p1, p2), ti.max(p0, p1, p2)
        x0, x1 = _pixel_range(lo[0], hi[0], params[RADIUS], width)
        y0, y1 = _pixel_range(lo[1], hi[1], params[RADIUS], height)
        if x0 <= x1 and y0 <= y1:
            tx0, tx1, ty0, ty1 = x0 // tile, x1 // tile, y0 // tile, y1 // tile
    return tx0, tx1, ty0, ty1


@ti.kernel
def count_chunk_tiles(face_verts: nd, params: nd, counts: nd, face_rects: nd, face_tiles: nd, chunk: ti.i32,
                      width: ti.i32, height: ti.i32, tile: ti.i32, tiles_x: ti.i32, cull: ti.template(),
                      fp: ti.template(), with_rects: ti.template()):
    """counts (B, K, T) int32, zeroed: counts[b, k, s] = faces of chunk k (faces k*chunk ...) reaching tile s.
    with_rects: also face_rects (B, F, 3) int32 [tx0, ty0, tiles across] and face_tiles (B, F) int32, the tile
    count, of each face's rectangle of tiles (the deterministic backward's rows, see soft.py), here
    where the ranges are computed anyway."""
    for b, k in ti.ndrange(counts.shape[0], counts.shape[1]):
        for f in range(k * chunk, ti.min((k + 1) * chunk, face_verts.shape[1])):
            tx0, tx1, ty0, ty1 = _tile_range(face_verts, params, b, f, width, height, tile, cull, fp)
            if ti.static(with_rects):
                face_rects[b, f, 0], face_rects[b, f, 1], face_rects[b, f, 2] = tx0, ty0, tx1 - tx0 + 1
                face_tiles[b, f] = (tx1 - tx0 + 1) * (ty1 - ty0 + 1)  # 0 for the empty range (tx1 = tx0 - 1)
            for ty in range(ty0, ty1 + 1):
                for tx in range(tx0, tx1 + 1):
                    s = ty * tiles_x + tx
                    counts[b, k, s] = counts[b, k, s] + 1  # this thread's own counter: no atomic needed


@ti.kernel
def fill_chunk_tiles(face_verts: nd, params: nd, cursor: nd, tile_faces: nd, chunk: ti.i32, width: ti.i32,
                     height: ti.i32, tile: ti.i32, tiles_x: ti.i32, cull: ti.template(), fp: ti.template()):
    """cursor (B, K, T) int32: where chunk k's run in tile s starts (advanced as faces are written)."""
    for b, k in ti.ndrange(cursor.shape[0], cursor.shape[1]):
        for f in range(k * chunk, ti.min((k + 1) * chunk, face_verts.shape[1])):
            tx0, tx1, ty0, ty1 = _tile_range(face_verts, params, b, f, width, height, tile, cull, fp)
            for ty in range(ty0, ty1 + 1):
                for tx in range(tx0, tx1 + 1):
                    s = ty * tiles_x + tx
                    c = cursor[b, k, s]
                    # The count pass computed the same ranges with the same function; should a compiler ever
                    # round them differently, this still never writes past the allocation.
                    if c < tile_faces.shape[0]:
                        tile_faces[c] = f
                    cursor[b, k, s] = c + 1


def face_chunk(n_views: int, n_faces: int, n_tiles: int, arch: str) -> int:
    """Faces per (view, chunk) thread: enough threads to fill the machine (on the CPU, 16 tasks per core; on
    a GPU, thousands), chunks of at least MIN_CHUNK_FACES faces, and at most MAX_CHUNK_COUNTERS counters.
    Many views already give the parallelism: then one chunk per view, exactly the old one-thread-per-view
    scheme."""
    wanted = CPU_TASKS_PER_THREAD * (os.cpu_count() or 1) if arch == "cpu" else GPU_THREADS
    chunks = -(-wanted // n_views)
    chunks = min(chunks, -(-n_faces // MIN_CHUNK_FACES), max(1, MAX_CHUNK_COUNTERS // (n_views * n_tiles)))
    chunks = max(chunks, 1)
    return -(-n_faces // chunks)


def _too_many(what: str, settings: RasterSettings, image_size, n_views: int, n_faces: int, tile: int) -> str:
    H, W = image_size
    return (f"bin_faces: {what} (sigma={settings.sigma:g} reaches {math.sqrt(settings.cutoff_d2_px(image_size)):.0f}"
            f" px around each face at {H}x{W}, {n_faces} faces, {n_views} views, {tile}-px tiles); use a smaller "
            f"sigma, fewer views per call, fewer faces or a smaller image")


def _allocate(make, shape, what: str, settings, image_size, n_views: int, n_faces: int, tile: int, device):
    """make(shape) as int32, a failed allocation reported as a one-line MemoryError naming the sizes."""
    try:
        return make(shape, dtype=torch.int32, device=device)
    except (MemoryError, RuntimeError) as e:  # torch reports a failed allocation as a RuntimeError
        gib = 4 * math.prod(shape) / 2**30
        raise MemoryError(_too_many(f"cannot allocate {what} ({gib:.1f} GiB: {str(e).splitlines()[0]})", settings,
                                    image_size, n_views, n_faces, tile)) from None


@runtime.locked
def bin_faces(face_verts: torch.Tensor, image_size: tuple[int, int], settings: RasterSettings,
              params: torch.Tensor | None = None, face_rects: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Lists, per screen tile, the faces whose cut-off window reaches it.

    face_verts (B, F, 3, 3) -> (tile_offsets (B * T + 1,) int32, tile_faces (N,) int32, tiles_x, n_tiles,
    tile side): tile s of view b holds ``tile_faces[tile_offsets[b * T + s] : tile_offsets[b * T + s + 1]]``,
    in ascending face order. params: the rasterizer's parameter vector (built from the settings if None).
    face_rects: optional (rects (B, F, 3), tiles (B, F)) int32 tensors the count pass fills with each face's
    rectangle of tiles (see `count_chunk_tiles`).
    Raises ValueError when the lists would exceed MAX_PAIRS entries, or MemoryError naming the sizes when
    they cannot be allocated.
    """
    H, W = image_size
    B, F = face_verts.shape[:2]
    arch = runtime.ensure_init()
    ts = settings.tile_for(B, image_size, arch)
    tiles_x, tiles_y = -(-W // ts), -(-H // ts)
    n_tiles = tiles_x * tiles_y
    if B * n_tiles >= MAX_PAIRS:
        raise ValueError(_too_many(f"{B * n_tiles} screen tiles exceed the {MAX_PAIRS} one call can index",
                                   settings, image_size, B, F, ts))
    if params is None:
        from taichi_dr.raster.soft import _params  # soft.py imports this module

        params = _params(settings, image_size, face_verts)
    fp = _FP[face_verts.dtype]
    dev = face_verts.device
    chunk = face_chunk(B, F, n_tiles, arch)
    n_chunks = -(-F // chunk)
    counts = _allocate(torch.zeros, (B, n_chunks, n_tiles), "per-chunk tile counters", settings, image_size, B, F,
                       ts, dev)
    rects, rect_tiles = face_rects if face_rects is not None else (counts, counts[0])  # unread without rects
    count_chunk_tiles(face_verts, params, counts, rects, rect_tiles, chunk, W, H, ts, tiles_x,
                      settings.cull_backfaces, fp, face_rects is not None)
    # Each counter is at most `chunk` and each tile's sum at most F, so int32 holds them; the grand total is
    # summed in int64 and checked before any int32 offset is formed.
    per_tile = counts.sum(1, dtype=torch.int32).view(-1)
    total = int(per_tile.sum(dtype=torch.int64))  # the one read-back: it sizes tile_faces
    if total > MAX_PAIRS:
        raise ValueError(_too_many(f"{total} (tile, face) pairs exceed the {MAX_PAIRS} one call can list",
                                   settings, image_size, B, F, ts))
    # Zeroed: a slot left unwritten (none, unless the fill's ranges ever differed from the count's) names face 0,
    # never garbage the rasterizer would index with.
    tile_faces = _allocate(torch.zeros, (max(total, 1),), f"{total} (tile, face) pairs", settings, image_size, B, F,
                           ts, dev)
    offsets = torch.zeros(B * n_tiles + 1, dtype=torch.int32, device=dev)
    torch.cumsum(per_tile, 0, dtype=torch.int32, out=offsets[1:])
    # Chunk k's run in tile s starts after the runs of chunks 0..k-1.
    cursor = offsets[:-1].view(B, 1, n_tiles) + (torch.cumsum(counts, 1, dtype=torch.int32) - counts)
    fill_chunk_tiles(face_verts, params, cursor, tile_faces, chunk, W, H, ts, tiles_x, settings.cull_backfaces,
                     fp)
    return offsets, tile_faces, tiles_x, n_tiles, ts
