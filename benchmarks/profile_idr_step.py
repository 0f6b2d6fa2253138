"""Where one hash-grid IDR training step goes on DTU scan 24: ``torch.profiler`` over a few steps.

Builds ``IDRMethod`` from the config ``tdr reconstruct --encoding hashgrid`` would make (its hash-grid defaults,
``--table-size`` overriding the entries per level), runs ``--steps`` steps with the engine's optimiser choice
(:func:`taichi_dr.pipelines.engine.fused_adam_option`) and profiles the last half; prints each step's time and
SDF evaluations, then the profiler's table by total CPU time.

    OMP_NUM_THREADS=2 python benchmarks/profile_idr_step.py --table-size 16
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from apps.reconstruct import build_config
from taichi_dr.core import runtime
from taichi_dr.data.datasets import load_dataset, split_holdout
from taichi_dr.pipelines.engine import fused_adam_option
from taichi_dr.pipelines.idr import IDRMethod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/dtu_scan24")
    p.add_argument("--table-size", type=int, default=None, help="log2 entries per level (default: the app's)")
    p.add_argument("--finest", type=int, default=None, help="finest resolution (default: the app's)")
    p.add_argument("--rays", type=int, default=512)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rows", type=int, default=25, help="rows of the profiler's table")
    args = p.parse_args()
    runtime.ensure_init()
    train, _ = split_holdout(load_dataset(args.data), every=8)
    options = ("hash_levels", "hash_lr", "lr", "depth", "width", "frequencies", "feature_dim",
               "render_depth", "render_width")
    given = dict({k: None for k in options}, encoding="hashgrid", hash_table_size=args.table_size,
                 hash_finest=args.finest,
                 iterations=2000, rays=args.rays, checkpoint_every=0, validate_every=0, seed=0, grad_clip=0,
                 learn_cameras=False)
    config = build_config("idr", given, masks=True, background=0.0)
    torch.manual_seed(0)
    method = IDRMethod(train, config)
    groups = method.param_groups()
    params = [q for g in groups for q in g["params"]]
    optimizer = torch.optim.Adam(groups, lr=config.lr, **fused_adam_option(params))
    generator = torch.Generator().manual_seed(0)
    profiler = None
    for it in range(args.steps):
        if it == args.steps // 2:
            profiler = profile(activities=[ProfilerActivity.CPU])
            profiler.__enter__()
        t0 = time.perf_counter()
        loss, stats = method.step(method.sample(it, generator), it)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {it}: {time.perf_counter() - t0:.3f} s, {int(stats['sdf_evals'])} SDF evaluations")
    profiler.__exit__(None, None, None)
    print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
