"""Sphere-tracing throughput: taichi_dr's tracer against a plain PyTorch sphere tracer, side by side.

Both trace the same rays through the same geometry MLP (IDR's network with its geometric initialisation,
so the surface is a sphere-like blob) with the same convergence threshold and maximum number of steps.
The PyTorch reference is the usual way to write it: every step evaluates the MLP on all rays and masks
out the finished ones (stopping early once none is left). taichi_dr's tracer evaluates only the rays that
are still active (compacted by a Taichi kernel each step) and refines unconverged ones by sampling +
secant steps, so it does at least as much work per unfinished ray.

    python benchmarks/tracing.py                  # defaults: 128x128 rays, 4 x 128 MLP, 64 steps
    python benchmarks/tracing.py --size 200 --depth 8 --width 256 --repeats 2
"""

from __future__ import annotations

import argparse
import time

import torch

from taichi_dr.core import runtime
from taichi_dr.core.camera import Cameras
from taichi_dr.implicit.sphere_tracing import TracerSettings, intersect_sphere, sphere_trace
from taichi_dr.nets.fields import GeometryNetwork


@torch.no_grad()
def torch_sphere_trace(sdf_fn, o, d, settings: TracerSettings):
    """Reference: march all rays every step (finished rays masked out); returns t, hit, sdf_evals."""
    t_near, t_far, inside = intersect_sphere(o, d, settings.bounding_radius)
    t = t_near.clamp(min=0)
    active = inside.clone()
    hit = torch.zeros_like(inside)
    evals = 0
    for _ in range(settings.max_steps):
        if not bool(active.any()):
            break
        s = sdf_fn(o + t[:, None] * d)
        evals += o.shape[0]
        converged = active & (s.abs() < settings.threshold)
        hit |= converged
        t = torch.where(active & ~converged, t + settings.step_scale * s, t)
        active &= ~converged & (t <= t_far)
    return t, hit, evals


def _time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (kernel compilation)
    best, out = float("inf"), None
    for _ in range(repeats):
        runtime.sync()
        t0 = time.perf_counter()
        out = fn()
        runtime.sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="image side: size^2 rays")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--frequencies", type=int, default=6)
    p.add_argument("--steps", type=int, default=64, help="maximum sphere-tracing steps (both tracers)")
    p.add_argument("--threshold", type=float, default=5e-5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arch", default=None)
    args = p.parse_args(argv)

    arch = runtime.init(args.arch)
    dev = runtime.device()
    torch.manual_seed(0)
    skip = (args.depth // 2,) if args.depth >= 2 else ()
    net = GeometryNetwork(feature_dim=0, depth=args.depth, width=args.width, skip_in=skip,
                          n_frequencies=args.frequencies, init_radius=0.5).to(dev).eval()
    cams = Cameras.look_at(torch.tensor([0.6, 0.8, -2.6]), fov=40, image_size=(args.size, args.size)).to(dev)
    o, d = cams.image_rays()
    o, d = o.reshape(-1, 3).contiguous(), d.reshape(-1, 3).contiguous()
    n = o.shape[0]
    settings = TracerSettings(max_steps=args.steps, threshold=args.threshold)

    t_ours, ours = _time(lambda: sphere_trace(net.sdf, o, d, settings, miss_min_sdf=False), args.repeats)
    t_ref, (t_r, hit_r, evals_r) = _time(lambda: torch_sphere_trace(net.sdf, o, d, settings), args.repeats)

    both = ours.hit & hit_r
    agree = float((ours.hit == hit_r).float().mean())
    max_dt = float((ours.t[both] - t_r[both]).abs().max()) if bool(both.any()) else 0.0
    print(f"arch={arch} threads={torch.get_num_threads()} rays={n} ({args.size}x{args.size}) "
          f"MLP {args.depth}x{args.width} (PE {args.frequencies}) max_steps={args.steps} "
          f"threshold={args.threshold}")
    print(f"{'tracer':<34}{'time (s)':>10}{'rays/s':>12}{'SDF evals':>12}{'hits':>8}")
    print(f"{'taichi_dr (compacted, Taichi)':<34}{t_ours:>10.3f}{n / t_ours:>12.0f}{ours.sdf_evals:>12}"
          f"{int(ours.hit.sum()):>8}")
    print(f"{'PyTorch (all rays every step)':<34}{t_ref:>10.3f}{n / t_ref:>12.0f}{evals_r:>12}"
          f"{int(hit_r.sum()):>8}")
    print(f"speed-up: {t_ref / t_ours:.2f}x   hit agreement {100 * agree:.2f}%   "
          f"max |dt| on common hits {max_dt:.2e}")


if __name__ == "__main__":
    main()
