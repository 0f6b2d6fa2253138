"""Volume-compositing throughput (samples/s, forward + backward): taichi_dr's kernels against the plain PyTorch
cumprod formula, side by side in one run.

The PyTorch reference is the way NeRF's and UNISURF's code composite: dense (R, N) tensors (every ray has N
samples), ``T = cumprod(cat(1, 1 - alpha + 1e-10))``, ``w = alpha * T``, weighted sums over N, autograd for the
backward. taichi_dr composites the same samples packed (RaySamples, offsets per ray), with its input checks
(shapes, NaN/Inf scan) included in the timing. Both compute colour (C = 3), opacity, depth and weights; the loss
uses colour, opacity and depth. Times are the median of ``--repeats`` runs after a warm-up, the two
implementations alternating.

    OMP_NUM_THREADS=2 python benchmarks/compositing.py                    # 4096 rays x 64 and x 192 samples
    python benchmarks/compositing.py --rays 8192 --samples 32 96 --repeats 9 --dtype float64
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see taichi_dr/__init__.py

import torch  # noqa: E402

from taichi_dr.core import runtime  # noqa: E402
from taichi_dr.implicit.compositing import composite  # noqa: E402
from taichi_dr.implicit.samples import RaySamples, offsets_from_counts  # noqa: E402


def torch_composite(values, colours, t, delta, mode):
    """values, t, delta (R, N); colours (R, N, C) -> colour (R, C), opacity, depth (R,), weights (R, N)."""
    if mode == "density":
        alpha = 1.0 - torch.exp(-torch.relu(values) * delta)
    else:
        alpha = values.clamp(0.0, 1.0)
    ones = torch.ones_like(alpha[:, :1])
    trans = torch.cumprod(torch.cat([ones, 1.0 - alpha + 1e-10], -1), -1)[:, :-1]
    weights = alpha * trans
    colour = (weights[..., None] * colours).sum(-2)
    return colour, weights.sum(-1), (weights * t).sum(-1), weights


def make_inputs(n_rays, n_samples, mode, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gaps = 0.005 + 0.02 * torch.rand(n_rays, n_samples + 1, generator=g, dtype=dtype)
    t = 2.0 + torch.cumsum(gaps[:, :-1], -1)
    delta = gaps[:, 1:].contiguous()
    if mode == "density":
        values = 4.0 * torch.rand(n_rays, n_samples, generator=g, dtype=dtype) - 0.5
    else:
        values = torch.rand(n_rays, n_samples, generator=g, dtype=dtype) ** 4
    colours = torch.rand(n_rays, n_samples, 3, generator=g, dtype=dtype)
    return values, colours, t, delta


def _median_times(fns, repeats):
    """Median wall time of each of ``fns``, run alternately (so a load change on a shared machine hits both)."""
    for fn in fns:
        fn()  # warm-up: kernel compilation, allocator
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times, strict=True):
            runtime.sync()
            start = time.perf_counter()
            fn()
            runtime.sync()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def run_case(n_rays, n_samples, mode, dtype, repeats):
    values, colours, t, delta = make_inputs(n_rays, n_samples, mode, dtype)
    dev = runtime.device()
    values, colours, t, delta = (x.to(dev) for x in (values, colours, t, delta))
    counts = torch.full((n_rays,), n_samples, dtype=torch.int32, device=dev)
    samples = RaySamples(t=t.reshape(-1), delta=delta.reshape(-1),
                         ray_index=torch.arange(n_rays, dtype=torch.int32, device=dev).repeat_interleave(n_samples),
                         offsets=offsets_from_counts(counts))
    g_colour = torch.rand(n_rays, 3, generator=torch.Generator().manual_seed(1), dtype=dtype).to(dev)

    def step_torch():
        v, c = values.detach().requires_grad_(), colours.detach().requires_grad_()
        colour, opacity, depth, _ = torch_composite(v, c, t, delta, mode)
        ((colour * g_colour).sum() + opacity.sum() + depth.sum()).backward()
        return v.grad, c.grad

    def step_taichi():
        v = values.reshape(-1).detach().requires_grad_()
        c = colours.reshape(-1, 3).detach().requires_grad_()
        out = composite(v, c, samples, mode=mode)
        ((out.colour * g_colour).sum() + out.opacity.sum() + out.depth.sum()).backward()
        return v.grad, c.grad

    # The two agree before either is timed (the reference's 1e-10 shifts weights by ~N * 1e-10 at most).
    gv_ref, gc_ref = step_torch()
    gv, gc = step_taichi()
    tol = 1e-3 if dtype == torch.float32 else 1e-6
    assert torch.allclose(gv.reshape(n_rays, n_samples), gv_ref, atol=tol, rtol=tol), "values gradients differ"
    assert torch.allclose(gc.reshape(n_rays, n_samples, 3), gc_ref, atol=tol, rtol=tol), "colour gradients differ"
    return _median_times([step_torch, step_taichi], repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rays", type=int, default=4096)
    p.add_argument("--samples", type=int, nargs="+", default=[64, 192], help="samples per ray (one case each)")
    p.add_argument("--modes", nargs="+", default=["alpha", "density"], choices=["alpha", "density"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--arch", default=None)
    args = p.parse_args(argv)

    arch = runtime.init(args.arch)
    dtype = getattr(torch, args.dtype)
    print(f"arch={arch} dtype={args.dtype} torch threads={torch.get_num_threads()} cpu cores={os.cpu_count()} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} repeats={args.repeats} (median)\n")
    print("| mode | rays x samples | PyTorch cumprod (Msamples/s) | taichi_dr (Msamples/s) | taichi_dr / PyTorch |")
    print("|---|---|---:|---:|---:|")
    for mode in args.modes:
        for n_samples in args.samples:
            t_torch, t_taichi = run_case(args.rays, n_samples, mode, dtype, args.repeats)
            total = args.rays * n_samples
            print(f"| {mode} | {args.rays} x {n_samples} | {total / t_torch / 1e6:.1f} | {total / t_taichi / 1e6:.1f} "
                  f"| {t_torch / t_taichi:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
