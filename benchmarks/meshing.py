"""Mesh extraction: multiresolution sparse marching cubes against the dense grid, side by side.

For each field, the same grid is meshed densely (every point evaluated) and sparsely (taichi_dr's
extract_mesh: coarse grid, refine near the surface); the table gives points evaluated, seconds, vertex
counts and the Chamfer distance between the two meshes (% of the dense mesh's bounding-box diagonal).

Fields: analytic SDFs (a sphere, a torus with a thin tube, a thin plate), an occupancy field, IDR's default
8 x 256 geometry network at its geometric initialisation (a sphere of radius 0.6), and, with --checkpoint,
a trained IDR network (`tdr reconstruct` run folder or checkpoint.pt).

    python benchmarks/meshing.py                                   # 256^3 (dense of the network: minutes)
    python benchmarks/meshing.py --resolution 512 --no-dense-network
    python benchmarks/meshing.py --checkpoint runs/spotrec --resolution 256
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see taichi_dr/__init__.py

import torch  # noqa: E402

from taichi_dr.core import runtime  # noqa: E402
from taichi_dr.core.metrics import bbox_diagonal, chamfer_distance  # noqa: E402
from taichi_dr.implicit.analytic import box_sdf, sphere_sdf, torus_sdf  # noqa: E402
from taichi_dr.implicit.meshing import extract_mesh  # noqa: E402


def fields(checkpoint: str | None):
    yield "sphere SDF", lambda x: sphere_sdf(x, 0.5, (0.1, 0.0, 0.0)), {}
    yield "torus SDF (tube 0.02)", lambda x: torus_sdf(x, 0.5, 0.02), {}
    yield "plate SDF (0.024 thick)", lambda x: box_sdf(x, (0.6, 0.012, 0.5)), {}
    yield "sphere occupancy", lambda x: torch.sigmoid(-50 * sphere_sdf(x, 0.5)), dict(level=0.5, inside="above")
    from taichi_dr.pipelines.idr import IDRConfig, IDRModel, load_model

    torch.manual_seed(0)
    yield "IDR 8x256, initial", IDRModel(IDRConfig()).to(runtime.device()).eval().sdf, {"network": True}
    if checkpoint:
        model, config = load_model(checkpoint)
        yield (f"IDR {config.geometry_depth}x{config.geometry_width}, trained", model.eval().sdf,
               {"network": True, "bound": config.tracer.bounding_radius})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--checkpoint", help="a trained IDR run folder or checkpoint.pt")
    parser.add_argument("--no-dense-network", action="store_true", help="skip the dense grid of the networks")
    parser.add_argument("--arch", default="cpu")
    args = parser.parse_args()
    runtime.init(args.arch)
    print(f"arch={runtime.arch()} threads={torch.get_num_threads()} resolution={args.resolution}^3")
    print("| field | dense points | dense s | sparse points | sparse s | speed-up | vertices dense / sparse "
          "| Chamfer (% diag) | identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, field, options in fields(args.checkpoint):
        network = options.pop("network", False)
        sparse, stats = extract_mesh(field, args.resolution, return_stats=True, **options)
        if network and args.no_dense_network:
            print(f"| {name} | {args.resolution ** 3} | - | {stats['points_evaluated']} | {stats['seconds']:.1f} | - "
                  f"| - / {len(sparse.verts)} | - | - |", flush=True)
            continue
        t0 = time.perf_counter()
        dense = extract_mesh(field, args.resolution, dense=True, **options)
        dense_s = time.perf_counter() - t0
        identical = dense.verts.shape == sparse.verts.shape and bool(torch.equal(dense.verts, sparse.verts)) \
            and bool(torch.equal(dense.faces, sparse.faces))
        chamfer = 0.0 if identical else 100 * chamfer_distance(dense, sparse, 100_000) / bbox_diagonal(dense)
        print(f"| {name} | {args.resolution ** 3} | {dense_s:.1f} | {stats['points_evaluated']} | "
              f"{stats['seconds']:.1f} | {dense_s / stats['seconds']:.1f}x | {len(dense.verts)} / {len(sparse.verts)} "
              f"| {chamfer:.4f} | {'yes' if identical else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
