"""Cone tracing on a trained IDR run: render its views with and without cones, side by side.

For the first ``--views`` cameras of the run's dataset, at full resolution, ``idr.render_views`` runs with cone
tracing (the default) and without (``cones=None``), alternating, ``--repeats`` times each; printed: the median
times, how many pixels differ in mask or in depth (> 1e-3), and, for every such pixel, which tracer found the
first surface that a dense scan of the ray finds (``--scan`` samples of the SDF over the ray's segment in the
bounding sphere: the first sample with f < 0; "right" is within two samples of it, and "neither" also says which
was closer), and how many of the pixels that any two of {plain, cones, plain sphere-tracing steps
(``max_relaxation 1``)} dispute each gets wrong (more than 2e-3 from the scan's crossing). ``--png`` writes,
for the first three views, the plain render, the cones' render and the pixels whose mask differs (white).

    tdr make-dataset airplane.ply --views 24 --size 128 --out plane_data       # or any IDR dataset
    tdr reconstruct plane_data --method idr --masks --iterations 800 --out plane_idr
    python benchmarks/cones_trained.py plane_idr plane_data --png plane_cones.png
    python benchmarks/cones_trained.py plane_idr plane_data --scale 4     # the same views at 512 x 512
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # as under `tdr` (read when torch loads OpenMP)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from taichi_dr.core import runtime  # noqa: E402
from taichi_dr.core.rays import ray_segments  # noqa: E402
from taichi_dr.data.datasets import load_dataset  # noqa: E402
from taichi_dr.pipelines.idr import load_model, render_views  # noqa: E402
from taichi_dr.pipelines.views import scale_cameras  # noqa: E402


def first_crossing_scan(sdf, o, d, radius: float, samples: int) -> torch.Tensor:
    """Per ray, the first of ``samples`` uniform samples over its bounding-sphere segment with f < 0 (inf: none)."""
    t0, t1, _ = ray_segments(o, d, radius)
    s = torch.linspace(0, 1, samples, dtype=o.dtype)
    out = []
    for k in range(o.shape[0]):
        ts = t0[k] + s * (t1[k] - t0[k])
        f = sdf(o[k] + ts[:, None] * d[k])
        neg = torch.nonzero(f < 0).flatten()
        out.append(ts[neg[0]] if neg.numel() else torch.tensor(float("inf"), dtype=o.dtype))
    return torch.stack(out) if out else o.new_zeros(0)


def disagree(a: dict, b: dict) -> torch.Tensor:
    """(B, H, W) bool: pixels where two renders differ in mask, or in depth by more than 1e-3."""
    both = a["mask"] & b["mask"]
    return (a["mask"] != b["mask"]) | (both & ((a["depth"] - b["depth"]).abs() > 1e-3))


def scan_pixels(model, cams, pixels: torch.Tensor, radius: float, samples: int):
    """Per view, (flat pixel indices, the dense scan's first crossing) of the ``pixels (B, H, W)`` that are set."""
    for v in range(len(cams)):
        idx = torch.nonzero(pixels[v].flatten()).flatten()
        if idx.numel() == 0:
            continue
        o, d = cams[v].image_rays()
        with torch.no_grad():
            yield v, idx, first_crossing_scan(model.sdf, o.reshape(-1, 3)[idx], d.reshape(-1, 3)[idx], radius, samples)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="output folder (or checkpoint) of `tdr reconstruct --method idr`")
    p.add_argument("data", help="its dataset folder")
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--scan", type=int, default=20001, help="dense samples per disagreeing ray")
    p.add_argument("--scale", type=float, default=1.0,
                   help="render at this multiple of the dataset's resolution (same views, more pixels)")
    p.add_argument("--trace-chunk", type=int, default=2**18,
                   help="render_views(trace_chunk=...): rays traced together (earlier default 16384)")
    p.add_argument("--png", default=None, help="write the first three views side by side here")
    p.add_argument("--arch", default=None)
    args = p.parse_args(argv)
    runtime.init(args.arch)
    model, config = load_model(args.run)
    cams = load_dataset(args.data).cameras[:args.views]
    if args.scale != 1.0:
        cams = scale_cameras(cams, args.scale)
    tracer = config.tracer
    times = {"plain": [], "cones": []}
    renders = {}
    for _ in range(args.repeats):
        for name, kw in (("plain", {"cones": None}), ("cones", {})):
            t0 = time.perf_counter()
            renders[name] = render_views(model, cams, tracer, trace_chunk=args.trace_chunk, **kw)
            times[name].append(time.perf_counter() - t0)
    plain, cones = renders["plain"], renders["cones"]
    t_plain, t_cones = (statistics.median(times[k]) for k in ("plain", "cones"))
    h, w = cams.image_size
    print(f"{len(cams)} views of {w} x {h}, {int(plain['mask'].sum())} hit pixels (plain); trace_chunk "
          f"{args.trace_chunk}; tracer {tracer}")
    print(f"render_views: plain {t_plain:.2f} s, cones {t_cones:.2f} s: {t_plain / t_cones:.2f}x")

    # Pixels where the two disagree, and which one found the first surface a dense scan finds.
    differ = disagree(plain, cones)
    mask_differ = int((plain["mask"] != cones["mask"]).sum())
    print(f"pixels that differ: {int(differ.sum())} of {differ.numel()} (in mask: {mask_differ})")
    verdicts = {"cones right": 0, "plain right": 0, "both right": 0, "neither": 0}
    spacing = 2 * tracer.bounding_radius / (args.scan - 1)
    for v, idx, first in scan_pixels(model, cams, differ, tracer.bounding_radius, args.scan):
        for r in (plain, cones):
            t = torch.where(r["mask"][v].flatten()[idx], r["depth"][v].flatten()[idx], torch.tensor(float("inf")))
            right = (t == first) | ((t - first).abs() <= 2 * spacing)
            r.setdefault("_right", []).append(right)
            r.setdefault("_error", []).append(torch.where(t == first, 0.0, (t - first).abs()))
    if differ.any():
        pr, cr = torch.cat(plain["_right"]), torch.cat(cones["_right"])
        verdicts = {"cones right": int((cr & ~pr).sum()), "plain right": int((pr & ~cr).sum()),
                    "both right": int((pr & cr).sum()), "neither": int((~pr & ~cr).sum())}
        pe, ce = torch.cat(plain["_error"]), torch.cat(cones["_error"])
        neither = ~pr & ~cr
        verdicts["neither, cones closer"] = int((neither & (ce < pe)).sum())
        verdicts["neither, cones' largest |t - first|"] = round(float(ce[neither].max()), 5) if neither.any() else 0.0
    print("against a dense scan of each differing ray's first crossing:", verdicts)

    # Is the over-relaxation the cause? The same count for plain sphere-tracing steps (max_relaxation 1).
    variants = {"plain": plain, "cones": cones,
                "plain, max_relaxation 1": render_views(model, cams, dataclasses.replace(tracer, max_relaxation=1.0),
                                                        cones=None)}
    disputed = torch.zeros_like(differ)
    for a, b in itertools.combinations(variants.values(), 2):
        disputed |= disagree(a, b)
    wrong = dict.fromkeys(variants, 0)
    for v, idx, first in scan_pixels(model, cams, disputed, tracer.bounding_radius, args.scan):
        for name, r in variants.items():
            t = torch.where(r["mask"][v].flatten()[idx], r["depth"][v].flatten()[idx], torch.tensor(float("inf")))
            wrong[name] += int((~((t == first) | ((t - first).abs() <= 2e-3))).sum())
    print(f"pixels any two of these renders dispute: {int(disputed.sum())}; wrong there (more than 2e-3 from the "
          f"dense scan's first crossing): {wrong}")
    if args.png:
        from PIL import Image

        rows = []
        for i in range(min(3, len(cams))):
            diff = (plain["mask"][i] != cones["mask"][i]).float()[..., None].expand(-1, -1, 3)
            rows.append(torch.cat([plain["rgb"][i].clamp(0, 1), cones["rgb"][i].clamp(0, 1), diff], 1))
        Image.fromarray((torch.cat(rows, 0).numpy() * 255).astype(np.uint8)).save(args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
