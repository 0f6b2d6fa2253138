"""Points per second of the multiresolution hash-grid encoding: :class:`taichi_dr.nets.hash_grid.HashGridEncoding`
(Taichi kernels, hand-written backward) against a plain PyTorch hash encoding with the same hashing, sizes and
table, side by side in one run.

The PyTorch encoding is written the way a pure-PyTorch user runs it, after nerfstudio's ``HashEncoding``
(``implementation="torch"``): all levels at once per corner (the 8 corners' vertex indices of every level
hashed with one vectorised ``hash_fn``, dense levels by their strides), the features gathered by indexing a
flat ``(L T, F)`` table, trilinear interpolation by broadcasting, autograd for the backward.

Measured: forward + backward (loss = sum of the features times a fixed random tensor, backward to the table
and to the points, as an SDF network's normals need) and forward alone (under ``torch.no_grad``), at
instant-ngp's sizes (16 levels x 2 features, 2^19 entries per level, resolutions 16 to 2048). Before timing,
both encodings are checked to give the same features and gradients. Times are medians over ``--repeats``
after ``--warmup`` calls; torch's thread count is left at its default.

    python benchmarks/encoding.py                  # 2^14 and 2^18 points, 7 repeats
    python benchmarks/encoding.py --sizes 16 20    # 2^16 and 2^20 points
    python benchmarks/encoding.py --quick          # a few seconds: small table and batch, checks it runs
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as apps/__init__.py does

import torch  # noqa: E402
from torch import nn  # noqa: E402

from taichi_dr.core import runtime  # noqa: E402
from taichi_dr.nets.hash_grid import PRIME_Y, PRIME_Z, HashGridEncoding  # noqa: E402


class TorchHashEncoding(nn.Module):
    """instant-ngp's encoding in plain PyTorch (nerfstudio's ``pytorch_fwd`` structure), with the same levels,
    dense-level rule, hash, clamping to the cube and output layout ``[x, features]`` as ``grid``, and a copy of
    its table."""

    def __init__(self, grid: HashGridEncoding):
        super().__init__()
        n_levels, table_size, n_feat = grid.table.shape
        self.table_size = table_size
        self.bound = grid.bound
        self.include_input = grid.includes_input
        self.hash_table = nn.Parameter(grid.table.detach().reshape(n_levels * table_size, n_feat).clone())
        res = torch.tensor(grid.resolutions)
        self.register_buffer("scalings", res.to(grid.table.dtype)[:, None])            # (L, 1)
        self.register_buffer("max_cell", (res - 1)[:, None])                            # (L, 1)
        self.register_buffer("hash_offset", torch.arange(n_levels) * table_size)        # (L,)
        self.register_buffer("dense", torch.tensor(grid.dense_levels))                  # (L,)
        strides = [[1, n + 1, (n + 1) ** 2] if d else [1, PRIME_Y, PRIME_Z]
                   for n, d in zip(grid.resolutions, grid.dense_levels, strict=True)]
        self.register_buffer("strides", torch.tensor(strides))                          # (L, 3) int64

    def hash_fn(self, v: torch.Tensor) -> torch.Tensor:
        """Vertices ``(M, L, 3)`` int64 -> rows of the flat table ``(M, L)``."""
        p = v * self.strides
        h = torch.where(self.dense, p.sum(-1), torch.bitwise_xor(torch.bitwise_xor(p[..., 0], p[..., 1]), p[..., 2]))
        return h % self.table_size + self.hash_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = (x.clamp(-self.bound, self.bound) + self.bound) * (0.5 / self.bound)
        scaled = u[:, None, :] * self.scalings                                        # (M, L, 3)
        cell = torch.minimum(torch.floor(scaled).long(), self.max_cell)      # u = 1: the last cell
        t = scaled - cell                                                               # (M, L, 3)
        f = [self.hash_table[self.hash_fn(cell + torch.tensor([c & 1, (c >> 1) & 1, c >> 2], device=x.device))]
             for c in range(8)]                                                         # 8 x (M, L, F)
        tx, ty, tz = t[..., 0:1], t[..., 1:2], t[..., 2:3]
        # lerp along x, then y, then z (corner c = (c & 1, c >> 1 & 1, c >> 2))
        f00, f10 = torch.lerp(f[0], f[1], tx), torch.lerp(f[2], f[3], tx)
        f01, f11 = torch.lerp(f[4], f[5], tx), torch.lerp(f[6], f[7], tx)
        enc = torch.lerp(torch.lerp(f00, f10, ty), torch.lerp(f01, f11, ty), tz)       # (M, L, F)
        enc = enc.flatten(1)
        return torch.cat([x, enc], dim=1) if self.include_input else enc


def _table(module: nn.Module) -> nn.Parameter:
    return module.table if isinstance(module, HashGridEncoding) else module.hash_table


def _step(module, x, weights, backward: bool):
    if backward:
        _table(module).grad = None
        x.grad = None
        (module(x) * weights).sum().backward()
    else:
        with torch.no_grad():
            module(x)


def _median_time(module, x, weights, backward, warmup, repeats):
    for _ in range(warmup):
        _step(module, x, weights, backward)
    times = []
    for _ in range(repeats):
        runtime.sync()
        start = time.perf_counter()
        _step(module, x, weights, backward)
        runtime.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _check_same(grid, ref, x, weights):
    """Both encodings: the same features and gradients (float32 summation orders differ)."""
    outs = []
    for module in (grid, ref):
        xg = x.detach().clone().requires_grad_(True)
        y = module(xg)
        gx, gt = torch.autograd.grad((y * weights).sum(), (xg, _table(module)))
        outs.append((y.detach(), gx, gt.reshape(-1)))
    for name, a, b in zip(("features", "d x", "d table"), *outs, strict=True):
        scale = float(b.abs().max()) or 1.0
        err = float((a - b).abs().max()) / scale
        if err > 1e-4:
            raise SystemExit(f"the two encodings disagree on {name}: max relative error {err:.2e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[14, 18], help="log2 of the batch sizes")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--arch", default="cpu", help="taichi_dr backend (default cpu)")
    p.add_argument("--quick", action="store_true", help="small table and batch, 2 repeats")
    args = p.parse_args(argv)
    sizes, repeats, warmup, log2_table = args.sizes, args.repeats, args.warmup, 19
    if args.quick:
        sizes, repeats, warmup, log2_table = [12], 2, 1, 14
    runtime.init(args.arch, announce=False)
    device = runtime.device()
    torch.manual_seed(0)
    grid = HashGridEncoding(log2_table_size=log2_table, init_scale=1.0).to(device)
    ref = TorchHashEncoding(grid).to(device)
    print(f"arch {runtime.arch()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} cpus; {grid.n_levels} levels x {grid.features_per_level} features, "
          f"2^{log2_table} entries per level, resolutions {grid.base_resolution}..{grid.finest_resolution} "
          f"({sum(grid.dense_levels)} dense levels); median of {repeats} after {warmup} warm-up")
    print(f"{'points':>8} {'pass':<16} {'taichi Mpts/s':>14} {'torch Mpts/s':>13} {'taichi ms':>10} "
          f"{'torch ms':>9} {'ratio':>6}")
    for log2_m in sizes:
        m = 2 ** log2_m
        g = torch.Generator().manual_seed(log2_m)
        x = ((torch.rand(m, 3, generator=g) * 2 - 1) * 1.05).to(device).requires_grad_(True)  # 5% clamped
        weights = torch.randn(m, grid.out_dim, generator=g).to(device)
        _check_same(grid, ref, x[:4096], weights[:4096])
        for name, backward in (("forward+backward", True), ("forward", False)):
            t_grid = _median_time(grid, x, weights, backward, warmup, repeats)
            t_ref = _median_time(ref, x, weights, backward, warmup, repeats)
            print(f"{'2^' + str(log2_m):>8} {name:<16} {m / t_grid / 1e6:>14.3f} {m / t_ref / 1e6:>13.3f} "
                  f"{t_grid * 1e3:>10.1f} {t_ref * 1e3:>9.1f} {t_ref / t_grid:>6.1f}x")


if __name__ == "__main__":
    main()
