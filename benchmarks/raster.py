"""Soft rasterizer benchmarks (issue 2): B1, B2, B3 and a faces x image-size table.

Prints markdown tables: forward and forward+backward medians (seconds), peak extra memory, and the dense
pure-PyTorch reference (taichi_dr.reference) beside each, measured in the same run. The reference is too
slow for the full B1/B3 sizes on a CPU, so it runs on a subset of views / a smaller image and its time is
scaled linearly by the number of pixels (marked "scaled"); memory is not scaled.

    python benchmarks/raster.py            # everything (a few minutes on 2 cores)
    python benchmarks/raster.py --only B1  # one case
    python benchmarks/raster.py --quick    # fewer repeats, no table
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import taichi_dr  # noqa: E402
from taichi_dr import runtime  # noqa: E402
from taichi_dr.camera import Cameras  # noqa: E402
from taichi_dr.mesh import Mesh, asset_path, load_mesh  # noqa: E402
from taichi_dr.raster import RasterSettings  # noqa: E402
from taichi_dr.renderer import render_mesh  # noqa: E402
from taichi_dr.shading import Lights  # noqa: E402


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> float:
    """Reset the process's peak RSS (Linux) and return the current RSS in MB."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _rss_mb("VmRSS")


def peak_extra_mb(base: float) -> float:
    return _rss_mb("VmHWM") - base


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median seconds of fn() over repeats (after one warm-up that also compiles), and peak extra MB."""
    fn()
    runtime.sync()
    base = reset_peak()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runtime.sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), peak_extra_mb(base)


def spherical_cameras(n: int, size: int, distance: float = 2.732, elevation: float = 30.0, fov: float = 30.0):
    az = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    return Cameras.from_spherical(distance, elevation, az, fov=fov, image_size=(size, size))


def case(mesh: Mesh, cameras: Cameras, settings: RasterSettings, rgb: bool, backward: bool):
    """A closure rendering (and optionally back-propagating) one batch."""
    lights = Lights.default() if rgb else None
    outputs = ("rgb",) if rgb else ()

    def run():
        verts = mesh.verts.detach().requires_grad_(backward)
        colors = None
        if mesh.vert_colors is not None:
            colors = mesh.vert_colors.detach().requires_grad_(backward)
        m = Mesh(verts=verts, faces=mesh.faces, vert_colors=colors)
        out = render_mesh(m, cameras, lights, settings, outputs=outputs)
        if backward:
            loss = out.alpha.sum() + (out.rgb.sum() if rgb else 0)
            loss.backward()
    return run


def reference_case(mesh: Mesh, cameras: Cameras, settings: RasterSettings, rgb: bool, backward: bool):
    """The same computation with the dense PyTorch reference rasterizer (same projection and shading)."""
    from taichi_dr import renderer
    from taichi_dr.reference import soft_rasterize_reference

    def run():
        original = renderer.soft_rasterize
        def dense(*args, check_finite=True, **kwargs):
            return soft_rasterize_reference(*args, **kwargs, pixel_chunk=512)

        renderer.soft_rasterize = dense
        try:
            case(mesh, cameras, settings, rgb, backward)()
        finally:
            renderer.soft_rasterize = original
    return run


def colored(mesh: Mesh) -> Mesh:
    lo, hi = mesh.verts.min(0).values, mesh.verts.max(0).values
    return Mesh(verts=mesh.verts, faces=mesh.faces, vert_colors=(mesh.verts - lo) / (hi - lo))


def row(name, mesh, cameras, settings, rgb, repeats, ref_views=None, ref_size=None, target=None):
    fwd, _ = timed(case(mesh, cameras, settings, rgb, False), repeats)
    fb, mem = timed(case(mesh, cameras, settings, rgb, True), repeats)
    print(f"  ({name}: taichi_dr forward {fwd:.3f} s, forward+backward {fb:.3f} s; running the reference...)",
          file=sys.stderr, flush=True)
    ref = "-"
    if ref_views is not None:
        H, W = cameras.image_size
        sub = cameras[:ref_views]
        if ref_size is not None:
            sub = spherical_cameras(ref_views, ref_size)
        scale = (len(cameras) * H * W) / (len(sub) * sub.image_size[0] * sub.image_size[1])
        ref_t, ref_mem = timed(reference_case(mesh, sub, settings, rgb, True), 1)
        scaled = "" if scale == 1 else f" (scaled x{scale:.0f})"
        ref = f"{ref_t * scale:.2f}{scaled}, {ref_mem:.0f} MB | {ref_t * scale / fb:.0f}x"
    verdict = "" if target is None else ("yes" if fb <= target else "NO")
    print(f"| {name} | {mesh.faces.shape[0]} | {len(cameras)} x {cameras.image_size[0]}^2 | {fwd:.3f} | "
          f"{fb:.3f} | {mem:.0f} | {ref} | {'' if target is None else target} | {verdict} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["B1", "B2", "B3", "table"], default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arch", default=os.environ.get("TAICHI_DR_ARCH", "cpu"))
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args()
    arch = taichi_dr.init(args.arch)
    repeats = 3 if args.quick else 7
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"arch={arch}, torch threads={torch.get_num_threads()}, cpu cores={os.cpu_count()}, "
          f"load average at start {load:.1f}\n")
    print("| case | faces | views x size | forward s | fwd+bwd s | peak extra MB | PyTorch reference fwd+bwd s, "
          "peak MB, ratio | target s | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    ref = not args.no_reference
    spot = load_mesh(asset_path("spot/spot_triangulated.obj"))
    spot = Mesh(verts=spot.verts, faces=spot.faces)  # geometry only; B2 adds vertex colours
    spot_n = spot.normalized()[0]
    if args.only in (None, "B1"):
        sphere = load_mesh(asset_path("templates/sphere_1352.obj"))
        row("B1 silhouette", sphere, spherical_cameras(120, 64), RasterSettings(sigma=1e-4), False, repeats,
            ref_views=2 if ref else None, target=0.25)
    if args.only in (None, "B2"):
        row("B2 shaded vertex-colour RGB", colored(spot_n), spherical_cameras(4, 128), RasterSettings(), True,
            repeats, ref_views=1 if ref else None, ref_size=64 if ref else None, target=0.15)
    if args.only in (None, "B3"):
        big = spot_n.subdivided(2)
        row("B3 silhouette", big, spherical_cameras(1, 512), RasterSettings(sigma=1e-4), False, repeats,
            ref_views=None, target=1.0)
    if args.only in (None, "table") and not args.quick:
        print("\nFaces x image size, 4 views, silhouette, sigma=1e-4 (fwd+bwd median seconds):\n")
        meshes = [spot_n, spot_n.subdivided(1), spot_n.subdivided(2)]
        sizes = [64, 128, 256, 512]
        print("| faces | " + " | ".join(f"{s}^2" for s in sizes) + " |")
        print("|---|" + "---|" * len(sizes))
        for m in meshes:
            cells = []
            for s in sizes:
                t, _ = timed(case(m, spherical_cameras(4, s), RasterSettings(sigma=1e-4), False, True), 3)
                cells.append(f"{t:.3f}")
            print(f"| {m.faces.shape[0]} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
