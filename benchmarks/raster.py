"""Soft rasterizer benchmarks (issue 2): B1, B2, B3 and a faces x image-size table.

Prints markdown tables: forward and forward+backward medians (seconds), peak extra memory, and the dense
pure-PyTorch reference (taichi_dr.raster.reference) beside each, measured in the same run. Forward+backward is timed
for both backward modes, alternating in one process: the deterministic one (fixed-order gradient sums, the
CPU default) and the float-atomic one (RasterSettings(deterministic=False), the GPU default), with their
ratio. Each case runs in a fresh
subprocess: kernels are compiled on a tiny batch first, then the peak resident memory of one forward+backward
above that baseline is recorded ("peak extra MB"), then the timings. The reference is too
slow for the full B1/B3 sizes on a CPU, so it runs on a subset of views / a smaller image and its time is
scaled linearly by the number of pixels (marked "scaled"); memory is not scaled.

    python benchmarks/raster.py            # everything (a few minutes on 2 cores)
    python benchmarks/raster.py --only B1  # one case
    python benchmarks/raster.py --quick    # fewer repeats, no table
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import taichi_dr  # noqa: E402
from taichi_dr.core import runtime  # noqa: E402
from taichi_dr.core.camera import Cameras  # noqa: E402
from taichi_dr.core.mesh import Mesh, asset_path, load_mesh  # noqa: E402
from taichi_dr.raster import RasterSettings  # noqa: E402
from taichi_dr.raster.renderer import render_mesh  # noqa: E402
from taichi_dr.raster.shading import Lights  # noqa: E402


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


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median seconds of fn_a() and fn_b(), run alternately (after a warm-up of each), so that load changes
    during the run hit both alike."""
    times_a, times_b = [], []
    for fn in (fn_a, fn_b):
        fn()
    runtime.sync()
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            t = time.perf_counter()
            fn()
            runtime.sync()
            times.append(time.perf_counter() - t)
    return statistics.median(times_a), statistics.median(times_b)


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
    from taichi_dr.raster import renderer
    from taichi_dr.raster.reference import soft_rasterize_reference

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


CASES = {
    # name: (mesh, views, size, settings, rgb, target seconds, reference views, reference size)
    "B1": ("sphere", 120, 64, RasterSettings(sigma=1e-4), False, 0.25, 2, None),
    "B2": ("spot", 4, 128, RasterSettings(), True, 0.15, 1, 64),
    "B3": ("spot_sub2", 1, 512, RasterSettings(sigma=1e-4), False, 1.0, None, None),
}
LABELS = {"B1": "B1 silhouette", "B2": "B2 shaded vertex-colour RGB", "B3": "B3 silhouette"}


def load_case_mesh(name: str) -> Mesh:
    if name == "sphere":
        return load_mesh(asset_path("templates/sphere_1352.obj"))
    spot = load_mesh(asset_path("spot/spot_triangulated.obj"))
    spot = Mesh(verts=spot.verts, faces=spot.faces).normalized()[0]  # geometry only
    spot = colored(spot)
    return spot.subdivided(2) if name == "spot_sub2" else spot


def run_case(name: str, impl: str, repeats: int) -> dict:
    """One case in this (fresh) process: compile on a tiny batch, then peak memory of one forward+backward
    above that baseline, then the timings."""
    mesh_name, views, size, settings, rgb, _, ref_views, ref_size = CASES[name]
    mesh = load_case_mesh(mesh_name)
    make = case if impl == "taichi" else reference_case
    if impl == "reference":
        views, size = ref_views, ref_size or size
    cameras = spherical_cameras(views, size)
    make(mesh, spherical_cameras(1, 16), settings, rgb, True)()  # compiles every kernel variant
    runtime.sync()
    base = reset_peak()
    make(mesh, cameras, settings, rgb, True)()
    runtime.sync()
    mem = peak_extra_mb(base)
    fwd = timed(make(mesh, cameras, settings, rgb, False), repeats)[0] if impl == "taichi" else float("nan")
    if impl == "taichi":
        atomic = dataclasses.replace(settings, deterministic=False)
        make(mesh, spherical_cameras(1, 16), atomic, rgb, True)()  # compiles the atomic variant
        fb, fb_atomic = timed_pair(make(mesh, cameras, dataclasses.replace(settings, deterministic=True), rgb, True),
                                   make(mesh, cameras, atomic, rgb, True), repeats)
    else:
        fb, fb_atomic = timed(make(mesh, cameras, settings, rgb, True), repeats)[0], float("nan")
    return {"fwd": fwd, "fb": fb, "fb_atomic": fb_atomic, "mem": mem, "views": views, "size": size,
            "faces": mesh.faces.shape[0]}


def in_subprocess(name: str, impl: str, repeats: int, arch: str) -> dict:
    cmd = [sys.executable, __file__, "--run-case", name, "--impl", impl, "--repeats", str(repeats), "--arch", arch]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def row(name: str, repeats: int, arch: str, reference: bool):
    r = in_subprocess(name, "taichi", repeats, arch)
    views, size, target = CASES[name][1], CASES[name][2], CASES[name][5]
    print(f"  ({name}: taichi_dr forward {r['fwd']:.3f} s, forward+backward {r['fb']:.3f} s deterministic, "
          f"{r['fb_atomic']:.3f} s atomic)", file=sys.stderr, flush=True)
    ref = "- | -"
    if reference and CASES[name][6] is not None:
        q = in_subprocess(name, "reference", 1, arch)
        scale = (views * size * size) / (q["views"] * q["size"] * q["size"])
        scaled = "" if scale == 1 else f" (measured on {q['views']} x {q['size']}^2, scaled x{scale:.0f})"
        ref = f"{q['fb'] * scale:.2f}{scaled}, {q['mem']:.0f} MB | {q['fb'] * scale / r['fb']:.0f}x"
    verdict = "yes" if r["fb"] <= target else "NO"
    print(f"| {LABELS[name]} | {r['faces']} | {views} x {size}^2 | {r['fwd']:.3f} | {r['fb']:.3f} | "
          f"{r['fb_atomic']:.3f} | {r['fb'] / r['fb_atomic']:.2f} | {r['mem']:.0f} | {ref} | {target} | {verdict} |",
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["B1", "B2", "B3", "table"], default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arch", default=os.environ.get("TAICHI_DR_ARCH", "cpu"))
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--run-case", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["taichi", "reference"], default="taichi", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    arch = taichi_dr.init(args.arch)
    if args.run_case:
        print(json.dumps(run_case(args.run_case, args.impl, args.repeats or 5)))
        return
    repeats = 3 if args.quick else 7
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"arch={arch}, torch threads={torch.get_num_threads()}, cpu cores={os.cpu_count()}, "
          f"load average at start {load:.1f}\n")
    print("| case | faces | views x size | forward s | fwd+bwd s (deterministic) | fwd+bwd s (atomic) | "
          "det / atomic | peak extra MB | PyTorch reference fwd+bwd s, peak MB, ratio | target s | met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ("B1", "B2", "B3"):
        if args.only in (None, name):
            row(name, repeats, arch, not args.no_reference)
    if args.only in (None, "table") and not args.quick:
        print("\nFaces x image size, 4 views, silhouette, sigma=1e-4 (fwd+bwd median seconds):\n")
        spot_n = load_case_mesh("spot")
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
