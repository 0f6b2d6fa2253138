"""Tile binning benchmark (issue 8): the chunked binning of taichi_dr/raster/binning.py against the previous
one-thread-per-view binning, side by side in one process, on the B1-B3 scenes of benchmarks/raster.py plus one
view of a 93k-face mesh at 512^2 (B3) and a blurry sigma. Both must list the same faces in the same order; the
table gives median milliseconds per call.

    python benchmarks/binning.py             # all cases
    python benchmarks/binning.py --repeats 5
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import taichi as ti
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import taichi_dr  # noqa: E402
from taichi_dr.core import runtime  # noqa: E402
from taichi_dr.core.camera import project_points  # noqa: E402
from taichi_dr.raster import RasterSettings  # noqa: E402
from taichi_dr.raster.binning import _FP, _tile_range, bin_faces  # noqa: E402
from taichi_dr.raster.renderer import _corner_gather  # noqa: E402
from taichi_dr.raster.soft import _params  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from raster import CASES, load_case_mesh, spherical_cameras  # noqa: E402

nd = ti.types.ndarray()


# The previous binning (one thread per view, int32 offsets), kept here as the baseline.
@ti.kernel
def _count_per_view(face_verts: nd, params: nd, counts: nd, width: ti.i32, height: ti.i32, tile: ti.i32,
                    tiles_x: ti.i32, cull: ti.template(), fp: ti.template()):
    for b in range(face_verts.shape[0]):
        for f in range(face_verts.shape[1]):
            tx0, tx1, ty0, ty1 = _tile_range(face_verts, params, b, f, width, height, tile, cull, fp)
            for ty in range(ty0, ty1 + 1):
                for tx in range(tx0, tx1 + 1):
                    counts[b, ty * tiles_x + tx] = counts[b, ty * tiles_x + tx] + 1


@ti.kernel
def _fill_per_view(face_verts: nd, params: nd, offsets: nd, cursor: nd, tile_faces: nd, width: ti.i32,
                   height: ti.i32, tile: ti.i32, tiles_x: ti.i32, cull: ti.template(), fp: ti.template()):
    for b in range(face_verts.shape[0]):
        for f in range(face_verts.shape[1]):
            tx0, tx1, ty0, ty1 = _tile_range(face_verts, params, b, f, width, height, tile, cull, fp)
            for ty in range(ty0, ty1 + 1):
                for tx in range(tx0, tx1 + 1):
                    s = ty * tiles_x + tx
                    c = cursor[b, s]
                    tile_faces[offsets[b * cursor.shape[1] + s] + c] = f
                    cursor[b, s] = c + 1


def bin_faces_per_view(face_verts, image_size, settings):
    H, W = image_size
    B = face_verts.shape[0]
    ts = settings.tile_for(B, image_size, runtime.ensure_init())
    tiles_x, tiles_y = -(-W // ts), -(-H // ts)
    n_tiles = tiles_x * tiles_y
    params = _params(settings, image_size, face_verts)
    fp = _FP[face_verts.dtype]
    counts = torch.zeros((B, n_tiles), dtype=torch.int32)
    _count_per_view(face_verts, params, counts, W, H, ts, tiles_x, settings.cull_backfaces, fp)
    offsets = torch.zeros(B * n_tiles + 1, dtype=torch.int32)
    torch.cumsum(counts.view(-1), 0, out=offsets[1:])
    tile_faces = torch.empty(max(int(offsets[-1]), 1), dtype=torch.int32)
    cursor = torch.zeros((B, n_tiles), dtype=torch.int32)
    _fill_per_view(face_verts, params, offsets, cursor, tile_faces, W, H, ts, tiles_x, settings.cull_backfaces, fp)
    return offsets, tile_faces, tiles_x, n_tiles, ts


def scene(name: str):
    """(face_verts (B, F, 3, 3), image_size, settings) of a benchmarks/raster.py case, as the renderer bins it."""
    mesh_name, views, size, settings, *_ = CASES[name]
    mesh = load_case_mesh(mesh_name)
    cams = spherical_cameras(views, size)
    cam = cams.world_to_camera(mesh.verts[None].expand(views, -1, -1))
    fv = _corner_gather(project_points(cam, cams.K[:, None], settings.near), mesh.faces).contiguous()
    return fv, (size, size), settings


def interleaved_ms(fns, repeats: int) -> list[float]:
    """Median milliseconds of each fn, calls interleaved (a, b, a, b, ...) so load changes on a shared machine
    hit all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            runtime.sync()
            t = time.perf_counter()
            fn()
            runtime.sync()
            ts.append(time.perf_counter() - t)
    return [1000 * statistics.median(ts) for ts in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--arch", default=os.environ.get("TAICHI_DR_ARCH", "cpu"))
    args = parser.parse_args()
    arch = taichi_dr.init(args.arch)
    print(f"arch={arch}, cpu cores={os.cpu_count()}, load average at start {os.getloadavg()[0]:.1f}\n")
    print("| scene | views x size | faces | tile | (tile, face) pairs | per-view ms | chunked ms | ratio | same |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [(name, *scene(name)) for name in ("B1", "B2", "B3")]
    fv, size, _ = scene("B3")
    cases.append(("B3, sigma=1e-2", fv, size, RasterSettings(sigma=1e-2)))
    for label, fv, size, settings in cases:
        old = bin_faces_per_view(fv, size, settings)
        new = bin_faces(fv, size, settings)
        same = torch.equal(old[0], new[0]) and torch.equal(old[1], new[1]) and old[2:] == new[2:]
        a, b = interleaved_ms([lambda f=fv, n=size, s=settings: bin_faces_per_view(f, n, s),
                               lambda f=fv, n=size, s=settings: bin_faces(f, n, s)], args.repeats)
        print(f"| {label} | {fv.shape[0]} x {size[0]}^2 | {fv.shape[1]} | {new[4]} | {int(new[0][-1])} | "
              f"{a:.2f} | {b:.2f} | {a / b:.2f}x | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
