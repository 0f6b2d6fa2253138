"""Where the time of one training iteration goes: UNISURF (before and after its free-space samples start) and NeRF,
stage by stage, side by side in one run on the real DTU data.

Each stage runs the same library calls, in the same order and with the same random draws, as
``taichi_dr.pipelines.unisurf.training_step`` / ``taichi_dr.pipelines.nerf.NeRFMethod.training_step`` followed by
what the engine does (backward, gradient norm, Adam step), timed one by one with ``time.perf_counter`` (no profiler), so
the stages add up to a whole step. A whole step as the engine runs it (``Method.step`` + ``loss.backward()`` +
``clip_gradients`` + ``optimizer.step()``) is timed too, alternating with the staged one, and the table reports
how the sum of the stages compares. Before timing, one staged step is checked against the library's step on
the same rays and seeds: same loss and same gradients (so the staging measures the real code path).

Both methods run without an occupancy grid (``occupancy_grid.enabled=False``; NeRF's default, not UNISURF's):
the stages are UNISURF's and NeRF's own algorithms (search and samples over the whole segment), and ``step``
then makes no grid update, so the staged step's random draws are the library step's.

Splits that need more than calling the library's functions one after the other:

* surface search: ``find_surface`` (what ``search_surface`` runs without a grid) is called with a wrapper around
  ``model.occupancy`` that times the network calls (256 uniform steps, then 8 secant steps); the rest of
  ``find_surface`` is its Taichi kernels and glue;
* network forward at the samples: ``UnisurfModel.radiance`` unrolled into its parts (geometry forward, the
  normals' ``autograd.grad`` with ``create_graph``, the appearance network), the same operations it runs;
* backward: ``torch.autograd.grad`` of the loss to the compositing op's inputs first (the loss head and the
  compositing kernels' backward), then from there into each network's parameters (UNISURF: appearance network,
  then the geometry network through the normals' graph; NeRF: fine, then coarse), then the smoothness term.
  The gradients are accumulated into ``.grad`` as ``loss.backward()`` would.

    python benchmarks/volume_step.py                       # DTU scan 24, sizes of the CPU runs, 5 repeats
    python benchmarks/volume_step.py --checkpoint ../runs/dtu_unisurf   # UNISURF weights of a run (real hits)
    python benchmarks/volume_step.py --quick               # tiny networks and batches: checks it runs end to end

Torch threads are left as ``tdr`` leaves them (OMP_WAIT_POLICY=PASSIVE, torch's default thread count) unless
``--threads`` is given. Times are medians over ``--repeats`` after ``--warmup`` steps.
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as apps/__init__.py does

import torch  # noqa: E402

from taichi_dr.core import runtime  # noqa: E402
from taichi_dr.core.rays import ray_segments  # noqa: E402
from taichi_dr.data.datasets import load_dataset, sample_rays, split_holdout  # noqa: E402
from taichi_dr.implicit.compositing import composite, composite_background  # noqa: E402
from taichi_dr.implicit.occupancy import SurfaceSearchSettings, find_surface  # noqa: E402
from taichi_dr.implicit.occupancy_grid import OccupancyGridSettings  # noqa: E402
from taichi_dr.implicit.sampling import (  # noqa: E402
    IntervalSettings,
    importance_samples,
    merge_samples,
    stratified_samples,
    unisurf_samples,
)
from taichi_dr.losses.implicit import rgb_loss, smoothness_loss  # noqa: E402
from taichi_dr.pipelines.engine import clip_gradients  # noqa: E402
from taichi_dr.pipelines.nerf import NeRFConfig, NeRFMethod  # noqa: E402
from taichi_dr.pipelines.reconstruction import TrainingRays  # noqa: E402
from taichi_dr.pipelines.unisurf import UnisurfConfig, UnisurfMethod, load_model  # noqa: E402

WHOLE = "whole step (Method.step + backward + grad norm + Adam)"


class Stages:
    """Wall time per named stage of one step; ``with stages("name"):`` adds to it. Synchronises a CUDA device
    around each stage so that its kernels are charged to the stage that launched them."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times = defaultdict(float)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.times[name] += time.perf_counter() - start


class TimedField:
    """``fn`` with its calls' wall time added up (to split a search's network evaluations from its kernels)."""

    def __init__(self, fn, stages: Stages):
        self.fn, self.stages, self.seconds, self.points = fn, stages, 0.0, 0

    def __call__(self, x):
        self.stages.sync()
        start = time.perf_counter()
        out = self.fn(x)
        self.stages.sync()
        self.seconds += time.perf_counter() - start
        self.points += x.shape[0]
        return out


def accumulate(params, grads):
    """Add ``grads`` into ``p.grad`` as ``loss.backward()`` accumulates them."""
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.add_(g)


# --------------------------------------------------------------------------------------------------- UNISURF


def unisurf_staged(method: UnisurfMethod, batch: TrainingRays, iteration: int, optimizer, stages: Stages,
                   step: bool = True) -> torch.Tensor:
    """One UNISURF iteration as ``training_step`` + the engine run it, stage by stage. Returns the loss."""
    model, config, rays = method.model, method.settings, batch.rays
    assert method.grid is None, "the stages follow UNISURF without an occupancy grid"
    generator = torch.Generator().manual_seed(batch.sampler_seed)   # as RayMethod.step seeds its own
    geometry, rendering = model.field.geometry, model.rendering
    geometry_params, rendering_params = list(geometry.parameters()), list(rendering.parameters())
    with stages("zero_grad"):
        optimizer.zero_grad(set_to_none=True)

    # surface search
    with stages("search: segment to the bounding sphere"):
        origins, dirs = rays.origins.detach(), rays.dirs.detach()
        n = origins.shape[0]
        t_near, t_far, _ = ray_segments(origins, dirs, config.bound_radius)
    field = TimedField(model.occupancy, stages)
    with stages("search: find_surface"):
        hits = find_surface(field, origins, dirs, t_near, t_far, config.search, generator)
    stages.times["search: occupancy network (no grad)"] += field.seconds
    stages.times["search: kernels + glue"] += stages.times.pop("search: find_surface") - field.seconds

    # samples
    with stages("sampling: unisurf_samples"):
        samples = unisurf_samples(t_near, t_far, hits.t, hits.hit, iteration, config.interval, generator)
    with stages("sampling: points + directions"):
        points = samples.points(origins, dirs)
        view_dirs = samples.directions(dirs)

    # network forward at the samples: UnisurfModel.radiance -> OccupancyNetwork.with_normals
    # -> GeometryNetwork.gradient, unrolled
    with stages("network: geometry forward (occupancy, features)"), torch.enable_grad():
        x = points.detach().requires_grad_(True)
        out = geometry(x)
    with stages("network: normals (autograd.grad, create_graph)"):
        (g,) = torch.autograd.grad(out[:, 0], x, torch.ones_like(out[:, 0]), create_graph=True)
        normals = g / g.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        occ, features = torch.sigmoid(-model.field.sharpness * out[:, 0]), out[:, 1:]
    with stages("network: appearance forward (colour)"):
        colour = rendering(points, normals, view_dirs, features)

    with stages("compositing: forward"):
        comp = composite(occ, colour, samples, mode="alpha")
    with stages("losses: background + L1 RGB"):
        rgb = composite_background(comp, config.background)
        loss_rgb = rgb_loss(rgb, rays.rgb, n)
        zero = loss_rgb * 0.0

    loss_smooth = zero
    with stages("smoothness: forward (points, with_normals, loss)"):
        smooth = config.smooth_weight > 0 and bool(hits.hit.any())
        if smooth:
            surface = origins[hits.hit] + hits.t[hits.hit, None] * dirs[hits.hit]
            jitter = (torch.rand(surface.shape, generator=generator, dtype=surface.dtype) - 0.5) * 2
            neighbours = surface + jitter.to(surface.device) * config.smooth_epsilon
            _, _, smooth_normals = model.field.with_normals(torch.cat([surface, neighbours]), create_graph=True)
            m = surface.shape[0]
            loss_smooth = smoothness_loss(smooth_normals[:m], smooth_normals[m:])
    if config.use_masks:
        raise SystemExit("volume_step: the UNISURF stages follow the no-mask setting (use_masks=False)")
    with stages("losses: total + stats"):
        loss = config.rgb_weight * loss_rgb + config.smooth_weight * loss_smooth
        mse = ((rgb.detach() - rays.rgb) ** 2).mean()
        _ = (-10.0 * torch.log10(mse.clamp_min(1e-10)), hits.hit.float().mean())

    # backward, in pieces
    with stages("backward: loss head + compositing backward"):
        heads = [occ, colour] + ([loss_smooth] if smooth else [])
        g_heads = torch.autograd.grad(loss, heads, retain_graph=True)
        g_occ, g_colour = g_heads[:2]
    with stages("backward: appearance network"):
        grads = torch.autograd.grad(colour, [normals, features] + rendering_params, g_colour)
        g_normals, g_features = grads[:2]
        accumulate(rendering_params, grads[2:])
    with stages("backward: geometry network (through the normals' graph)"):
        grads = torch.autograd.grad([occ, features, normals], geometry_params, [g_occ, g_features, g_normals],
                                    allow_unused=True)
        accumulate(geometry_params, grads)
    with stages("smoothness: backward"):
        if smooth:
            grads = torch.autograd.grad(loss_smooth, geometry_params, g_heads[2], allow_unused=True)
            accumulate(geometry_params, grads)
    if step:
        with stages("optimizer: grad norm + Adam step"):
            norm = clip_gradients(list(model.parameters()), config.grad_clip)
            _ = float(norm)                 # the engine reads it on the host with the stats
            optimizer.step()
    return loss.detach()


def unisurf_whole(method: UnisurfMethod, batch: TrainingRays, iteration: int, optimizer, stages: Stages,
                  step: bool = True) -> torch.Tensor:
    with stages(WHOLE):
        optimizer.zero_grad(set_to_none=True)
        loss, stats = method.step(batch, iteration)
        loss.backward()
        if step:
            norm = clip_gradients(list(method.model.parameters()), method.settings.grad_clip)
            _ = float(norm)
            optimizer.step()
    return loss.detach()


# ------------------------------------------------------------------------------------------------------ NeRF


def nerf_staged(method: NeRFMethod, batch: TrainingRays, iteration: int, optimizer, stages: Stages,
                step: bool = True) -> torch.Tensor:
    """One NeRF iteration as ``NeRFMethod.training_step`` (``render_batch``) + the engine run it, stage by stage."""
    model, config, rays = method.model, method.settings, batch.rays
    assert method.grid is None, "the stages follow NeRF without an occupancy grid"
    generator = torch.Generator().manual_seed(batch.sampler_seed)   # as RayMethod.step seeds its own
    coarse_params, fine_params = list(model.coarse.parameters()), list(model.fine.parameters())
    with stages("zero_grad"):
        optimizer.zero_grad(set_to_none=True)
    with stages("coarse sampling (segment, stratified, points)"):
        origins, dirs = rays.origins.detach(), rays.dirs.detach()
        t_near, t_far, _ = ray_segments(origins, dirs, config.bound_radius)
        counts = torch.full_like(t_near, config.n_coarse, dtype=torch.int32)
        coarse_samples = stratified_samples(t_near, t_far, counts, generator)
        points, view_dirs = coarse_samples.points(origins, dirs), coarse_samples.directions(dirs)
    with stages("coarse network forward"):
        density_c, colour_c = model.coarse(points, view_dirs)
    with stages("coarse compositing forward"):
        coarse = composite(density_c, colour_c, coarse_samples, mode="density")
    with stages("importance sampling + merge"):
        samples = coarse_samples
        if config.n_fine > 0:
            extra = importance_samples(coarse_samples, coarse.weights.detach(), config.n_fine, t_far, generator)
            samples = merge_samples(coarse_samples, extra, t_far)
        points, view_dirs = samples.points(origins, dirs), samples.directions(dirs)
    with stages("fine network forward"):
        density_f, colour_f = model.fine(points, view_dirs)
    with stages("fine compositing forward"):
        fine = composite(density_f, colour_f, samples, mode="density")
    with stages("losses: background + MSE + stats"):
        rgb_coarse = composite_background(coarse, config.background)
        rgb = composite_background(fine, config.background)
        mse_fine = ((rgb - rays.rgb) ** 2).mean()
        loss = ((rgb_coarse - rays.rgb) ** 2).mean() + mse_fine
        _ = -10.0 * torch.log10(mse_fine.detach().clamp_min(1e-10))
    if config.use_masks:
        raise SystemExit("volume_step: the NeRF stages follow the no-mask setting (use_masks=False)")
    with stages("backward: loss head + compositing backward (both)"):
        g_dc, g_cc, g_df, g_cf = torch.autograd.grad(loss, [density_c, colour_c, density_f, colour_f])
    with stages("backward: fine network"):
        accumulate(fine_params, torch.autograd.grad([density_f, colour_f], fine_params, [g_df, g_cf]))
    with stages("backward: coarse network"):
        accumulate(coarse_params, torch.autograd.grad([density_c, colour_c], coarse_params, [g_dc, g_cc]))
    if step:
        with stages("optimizer: grad norm + Adam step"):
            norm = clip_gradients(list(model.parameters()), config.grad_clip)
            _ = float(norm)
            optimizer.step()
    return loss.detach()


def nerf_whole(method: NeRFMethod, batch: TrainingRays, iteration: int, optimizer, stages: Stages,
               step: bool = True) -> torch.Tensor:
    with stages(WHOLE):
        optimizer.zero_grad(set_to_none=True)
        loss, stats = method.step(batch, iteration)
        loss.backward()
        if step:
            norm = clip_gradients(list(method.model.parameters()), method.settings.grad_clip)
            _ = float(norm)
            optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------------------------------------------- driver


def make_batch(method, rays_per_batch: int, seed: int) -> TrainingRays:
    """The engine's draws for one iteration (rays, then the samplers' seed, as ``RayMethod.sample``) from a
    generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    rays = sample_rays(method.data, rays_per_batch, generator)
    return TrainingRays(rays=rays, sampler_seed=int(torch.randint(0, 2**62, (), generator=generator)))


def check_same(name, method, batch, iteration, staged, whole, optimizer, device):
    """The staged step gives the library step's loss and gradients (same rays, seeds and weights)."""
    params = list(method.model.parameters())
    loss_staged = staged(method, batch, iteration, optimizer, Stages(device), step=False)
    grads_staged = [None if p.grad is None else p.grad.clone() for p in params]
    loss_whole = whole(method, batch, iteration, optimizer, Stages(device), step=False)
    worst = 0.0
    for p, g in zip(params, grads_staged, strict=True):
        if (g is None) != (p.grad is None):
            raise SystemExit(f"{name}: the staged step leaves a different set of gradients than the library's")
        if g is not None:
            scale = float(p.grad.abs().max()) + 1e-12
            worst = max(worst, float((g - p.grad).abs().max()) / scale)
    if not torch.allclose(loss_staged, loss_whole, rtol=1e-5, atol=1e-7) or worst > 1e-3:
        raise SystemExit(f"{name}: staged step differs from the library's: loss {float(loss_staged)} vs "
                         f"{float(loss_whole)}, largest relative gradient difference {worst:.2e}")
    print(f"{name}: staged step == library step (loss {float(loss_whole):.6f}, largest relative gradient "
          f"difference {worst:.1e})")


def measure(name, method, iteration, staged, whole, args, device):
    optimizer = torch.optim.Adam(method.model.parameters(), lr=method.settings.lr)
    first = make_batch(method, args.rays, args.seed)
    check_same(name, method, first, iteration, staged, whole, optimizer, device)
    runs_staged, runs_whole = [], []
    for k in range(args.warmup + args.repeats):
        batch = make_batch(method, args.rays, args.seed + 1 + k)
        # alternate which goes first, so a load change on a shared machine hits both
        order = [(staged, runs_staged), (whole, runs_whole)]
        for fn, runs in order if k % 2 == 0 else order[::-1]:
            stages = Stages(device)
            fn(method, batch, iteration, optimizer, stages)
            if k >= args.warmup:
                runs.append(dict(stages.times))
    names = list(runs_staged[0])
    medians = {s: statistics.median(r.get(s, 0.0) for r in runs_staged) * 1e3 for s in names}
    staged_total = statistics.median(sum(r.values()) for r in runs_staged) * 1e3
    whole_total = statistics.median(r[WHOLE] for r in runs_whole) * 1e3
    return medians, staged_total, whole_total


def print_table(title, medians, staged_total, whole_total, extra=""):
    print(f"\n### {title}\n")
    if extra:
        print(extra + "\n")
    print("| stage | ms | share |")
    print("|---|---:|---:|")
    for stage, ms in medians.items():
        print(f"| {stage} | {ms:.1f} | {100 * ms / staged_total:.1f}% |")
    print(f"| **sum of the stages** (median of per-repeat sums) | **{staged_total:.1f}** | 100% |")
    print(f"| {WHOLE} | {whole_total:.1f} | {100 * whole_total / staged_total:.1f}% of the sum |")


def unisurf_extra(method, iteration, args):
    """Sample and evaluation counts of one batch at ``iteration`` (to read the table by)."""
    _, stats = method.step(make_batch(method, args.rays, args.seed), iteration)
    return (f"iteration {iteration} (free-space samples from {method.settings.interval.free_after}): "
            f"{args.rays} rays, hit fraction {float(stats['hit_fraction']):.2f}, "
            f"{float(stats['samples_per_ray']):.1f} samples/ray, interval half-width {stats['interval']:.2f}, "
            f"{int(stats['evaluations'])} search evaluations")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/dtu_scan24"))
    parser.add_argument("--checkpoint", default=None,
                        help="UNISURF checkpoint (file or run folder) with the same networks: its weights")
    parser.add_argument("--rays", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as tdr, torch's own)")
    parser.add_argument("--free-after", type=int, default=IntervalSettings().free_after,
                        help="UNISURF's interval.free_after; timed at free_after - 1 and free_after")
    parser.add_argument("--nerf-depth", type=int, default=4)
    parser.add_argument("--nerf-width", type=int, default=128)
    parser.add_argument("--n-coarse", type=int, default=64)
    parser.add_argument("--n-fine", type=int, default=64)
    parser.add_argument("--skip", nargs="*", default=[], choices=["unisurf", "nerf"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny networks and batches (checks it runs)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    arch = runtime.ensure_init()
    device = runtime.device()

    # No occupancy grid: the tables document UNISURF's and NeRF's own algorithms (NeRF's default is already off).
    no_grid = OccupancyGridSettings(enabled=False)
    unisurf = dict(rays_per_batch=args.rays, geometry_depth=4, geometry_width=128, geometry_skip_in=(2,),
                   feature_dim=128, rendering_depth=3, rendering_width=128,
                   interval=IntervalSettings(free_after=args.free_after), occupancy_grid=no_grid)
    nerf = dict(rays_per_batch=args.rays, depth=args.nerf_depth, width=args.nerf_width,
                skip_in=(args.nerf_depth // 2,) if args.nerf_depth >= 2 else (), n_coarse=args.n_coarse,
                n_fine=args.n_fine, occupancy_grid=no_grid)
    if args.quick:
        args.rays, args.repeats, args.warmup = 32, 1, 0
        unisurf.update(rays_per_batch=32, geometry_depth=2, geometry_width=64, geometry_skip_in=(1,), feature_dim=8,
                       rendering_depth=1, rendering_width=16, search=SurfaceSearchSettings(n_steps=16, n_secant=2),
                       interval=IntervalSettings(n_interval=8, n_free=4, free_after=args.free_after))
        nerf.update(rays_per_batch=32, depth=2, width=16, skip_in=(1,), n_coarse=8, n_fine=8, colour_width=8)

    train, _ = split_holdout(load_dataset(args.data), every=8)
    print(f"# volume_step: {args.data}, {len(train.images)} training views, arch {arch}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, {os.cpu_count()} CPUs, "
          f"median of {args.repeats} after {args.warmup} warm-up")

    if "unisurf" not in args.skip:
        config = UnisurfConfig(**unisurf)
        torch.manual_seed(config.seed)
        method = UnisurfMethod(train, config)
        if args.checkpoint:
            # only its weights: the checkpoint's settings (which may enable a grid) are not used
            trained, _ = load_model(args.checkpoint, device=device)
            method.model.load_state_dict(trained.state_dict())
        state = {k: v.clone() for k, v in method.model.state_dict().items()}
        free_after = config.interval.free_after
        for label, iteration in (("before", max(free_after - 1, 0)), ("after", free_after)):
            method.model.load_state_dict(state)            # both from the same weights
            extra = unisurf_extra(method, iteration, args)
            res = measure(f"UNISURF {label}", method, iteration, unisurf_staged, unisurf_whole, args, device)
            print_table(f"UNISURF, {label} free-space samples", *res, extra=extra)
    if "nerf" not in args.skip:
        config = NeRFConfig(**nerf)
        torch.manual_seed(config.seed)
        method = NeRFMethod(train, config)
        extra = (f"{args.rays} rays, {config.n_coarse} coarse + {config.n_fine} fine samples/ray, depth "
                 f"{config.depth} x width {config.width}")
        res = measure("NeRF", method, 0, nerf_staged, nerf_whole, args, device)
        print_table("NeRF", *res, extra=extra)


if __name__ == "__main__":
    main()
