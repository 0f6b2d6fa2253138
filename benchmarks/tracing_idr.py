"""Ray-tracing throughput: IDR's own ray tracer (PyTorch) against taichi_dr's sphere tracer, side by side.

Compared, in one run on the same rays (a ring of cameras around the object, every ray entering the unit
bounding sphere) and the same network:

* the baseline, ``benchmarks/idr_tracer.py``: a statement-by-statement PyTorch re-implementation of IDR's
  ``RayTracing`` (sphere tracing from both ends of each ray, 10 iterations, threshold 5e-5, one line-search
  step of 0.5, 100-sample sampler + 8 secant steps for unconverged rays) with IDR's defaults;
* ``taichi_dr.implicit.sphere_tracing.sphere_trace`` with IDR's threshold (5e-5), bounding radius (1),
  sampler size (100) and secant steps (8), a marching budget of ``--taichi-steps`` and an over-relaxation
  of ``--relaxation`` (1 = plain sphere tracing; one row per pair).

The baseline runs twice: with the SDF callable IDR's renderer gives its tracer, ``lambda x:
implicit_network(x)[:, 0]`` (the whole network, feature vector included: "vs IDR", what a user of IDR's code
runs), and with ``GeometryNetwork.sdf``, which computes the SDF row of the output layer only, the callable
taichi_dr's tracer gets ("same sdf": the two tracers' algorithms alone, same callable).

Both count a ray as a hit by their own rule at the same threshold (IDR: ``network_object_mask``; taichi_dr:
converged or bracketed); the table reports how often the two agree and the |t| difference on rays both hit.
Modes: ``render`` is IDR's eval path (``self.training`` False) against ``sphere_trace(miss_min_sdf=False)``;
``train`` is IDR's training path, which also finds the minimum-SDF point of missed rays for the mask loss
(with the ground-truth mask taken equal to the network's hits), against ``sphere_trace(miss_min_sdf=True)``.
Times are the median of ``--repeats`` runs after one warm-up, the two tracers alternating.
torch runs on all cores (``--torch-threads``, default torch's own count) with OpenMP's workers waiting passively, as
under ``tdr`` and as a user of IDR's code would run it; ``--torch-threads 1`` gives the one-thread figures of
earlier sessions, which slowed IDR's all-torch tracer more than ours.

Networks (``taichi_dr.nets.fields.GeometryNetwork``, geometric initialisation, so (1) and (2) are
sphere-like blobs): (1) ``idr``: IDR's 8 x 256, frequency encoding with 6 frequencies, skip into layer 4;
(2) ``small``: 4 x 128, skip into layer 2, 64 features; (3) ``trained``: the 4 x 128 network fitted for
``--fit-steps`` Adam steps to a torus's SDF (L1 on SDF values + eikonal; nothing cached).

Command lines (the numbers in docs come from these):

    python benchmarks/tracing_idr.py --networks idr --taichi-steps 64
    python benchmarks/tracing_idr.py --networks small,trained --taichi-steps 64 [--occupancy-grid]
    python benchmarks/tracing_idr.py --networks small --mode train --taichi-steps 64
    python benchmarks/tracing_idr.py --networks idr,small,trained --taichi-steps 64 --relaxation 1.9 --cones
    python benchmarks/tracing_idr.py --views 1 --size 256 --networks small,trained --taichi-steps 64 \
        --relaxation 1.9 --cones                                   # one whole view, as a render traces it
    ... --scan 20001        # then check every ray the tracers disagree on against a dense scan of its segment
    python benchmarks/tracing_idr.py --quick                      # a few-second sanity run

Hooks for other engineers' modules (each exits with status 2 and says so if its module does not import):

    --encoding hashgrid   GeometryNetwork(encoding=HashGridEncoding(), depth=2, width=64, skip_in=())
                          (taichi_dr/nets/hash_grid.py) replaces networks (1) and (2); with
                          --hash-preset app, what `tdr reconstruct --encoding hashgrid` builds (a 2^16 table,
                          finest resolution 512, 32 features)
    --occupancy-grid      an OccupancyGrid (taichi_dr/implicit/occupancy_grid.py) built from the SDF with its
                          sdf_value_fn helper; both tracers march the tightened [t_start, t_end] of
                          OccupancyGrid.ray_intervals (sphere_trace(segments=...), idr_ray_trace(segments=...));
                          the intervals' cost is inside both timings, the grid's build is printed apart.

``--cones`` adds, beside each taichi_dr row, the same tracer started where cones over pixel tiles stopped
(``taichi_dr.implicit.cone_tracing.sphere_trace_images``, default ``ConeSettings``, as ``idr.render_views`` uses
it; with ``--occupancy-grid``, cones over the grid's segments): the cones' evaluations and time are inside the
row's. IDR's renderer has no such pass; the rays are whole
images here, as when IDR renders a view.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

# As `tdr` runs: OpenMP's workers wait passively (read when torch loads OpenMP, so before `import torch`), and torch
# keeps its own thread count (all cores) instead of the one thread taichi_dr gives it when they would spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from taichi_dr.core import runtime  # noqa: E402
from taichi_dr.core.camera import Cameras  # noqa: E402
from taichi_dr.core.rays import ray_segments  # noqa: E402
from taichi_dr.implicit.analytic import torus_sdf  # noqa: E402
from taichi_dr.implicit.cone_tracing import ConeSettings, cone_segments, sphere_trace_images  # noqa: E402
from taichi_dr.implicit.sphere_tracing import TracerSettings, sphere_trace  # noqa: E402
from taichi_dr.nets.fields import GeometryNetwork  # noqa: E402


def load_idr_tracer():
    """benchmarks/ is not a package: load the baseline by path (registered, so its dataclass resolves)."""
    if "idr_tracer" in sys.modules:
        return sys.modules["idr_tracer"]
    spec = importlib.util.spec_from_file_location("idr_tracer", Path(__file__).with_name("idr_tracer.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["idr_tracer"] = module
    spec.loader.exec_module(module)
    return module


def ring_rays(views: int, size: int, distance: float, fov: float):
    """Rays of ``views`` cameras evenly spaced in azimuth, elevations alternating 30 and -20 degrees."""
    az = torch.linspace(0, 360, views + 1)[:-1]
    el = torch.tensor([30.0, -20.0] * views)[:views]
    cams = Cameras.from_spherical(torch.full((views,), distance), el, az, fov=fov, image_size=(size, size))
    o, d = cams.to(runtime.device()).image_rays()
    return o.reshape(-1, 3).contiguous(), d.reshape(-1, 3).contiguous()


def fit_to_torus(net: GeometryNetwork, steps: int, seed: int) -> float:
    """Fit ``net`` to a torus's SDF (major 0.5, minor 0.2, ring in the xz plane); returns the last L1 error."""
    gen = torch.Generator().manual_seed(seed)
    dev = next(net.parameters()).device
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    err = float("nan")
    for _ in range(steps):
        uniform = torch.rand(1024, 3, generator=gen) * 2 - 1
        # points near the surface, where the tracers need the SDF right
        a, b = torch.rand(2, 1024, generator=gen) * 2 * torch.pi
        ring = torch.stack([(0.5 + 0.2 * b.cos()) * a.cos(), 0.2 * b.sin(), (0.5 + 0.2 * b.cos()) * a.sin()], -1)
        near = ring + 0.05 * torch.randn(1024, 3, generator=gen)
        x = torch.cat([uniform, near]).to(dev)
        out, g = net.gradient(x, create_graph=True)
        l1 = (out[:, 0] - torus_sdf(x)).abs().mean()
        loss = l1 + 0.1 * ((g.norm(dim=-1) - 1) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        err = float(l1.detach())
    net.eval()
    return err


def build_networks(args, dev):
    """name -> (description, network). Seeds fixed so runs compare."""
    nets = {}
    names = [n for n in args.networks.split(",") if n]
    if args.encoding == "hashgrid":
        try:
            from taichi_dr.nets.hash_grid import HashGridEncoding
        except ImportError as e:
            print(f"--encoding hashgrid: unavailable (taichi_dr.nets.hash_grid does not import: {e})")
            sys.exit(2)

        if args.hash_preset == "app":
            from apps.reconstruct import HASHGRID_DEFAULTS as app  # what `tdr reconstruct --encoding hashgrid` builds

            desc = (f"hash grid 16 x 2, 2^{app['hash_table_size']} entries, 16..{app['hash_finest']} + "
                    f"{app['depth']} x {app['width']}, {app['feature_dim']} features (tdr reconstruct's)")

            def make_small():
                enc = HashGridEncoding(log2_table_size=app["hash_table_size"], finest_resolution=app["hash_finest"])
                return GeometryNetwork(encoding=enc, depth=app["depth"], width=app["width"], skip_in=(),
                                       feature_dim=app["feature_dim"])
        else:
            desc = "hash grid (HashGridEncoding defaults: instant-ngp's) + 2 x 64, 256 features"

            def make_small():
                return GeometryNetwork(encoding=HashGridEncoding(), depth=2, width=64, skip_in=())

        torch.manual_seed(args.seed)
        nets["hashgrid"] = (desc, make_small().to(dev).eval())
    else:
        def make_small():
            return GeometryNetwork(feature_dim=64, depth=4, width=128, skip_in=(2,))

        if "idr" in names:
            torch.manual_seed(args.seed)
            nets["idr"] = ("IDR 8 x 256, PE 6, skip 4, 256 features", GeometryNetwork().to(dev).eval())
        if "small" in names:
            torch.manual_seed(args.seed)
            nets["small"] = ("4 x 128, PE 6, skip 2, 64 features", make_small().to(dev).eval())
    if "trained" in names:
        torch.manual_seed(args.seed)
        net = make_small().to(dev)
        t0 = time.perf_counter()
        err = fit_to_torus(net, args.fit_steps, args.seed)
        nets["trained"] = (f"same, fitted to a torus ({args.fit_steps} Adam steps, {time.perf_counter() - t0:.0f} s, "
                           f"L1 {err:.4f})", net)
    return nets


def occupancy_segments(sdf_fn, o, d, radius: float, resolution: int):
    """(grid, segments_fn): an OccupancyGrid over the bounding sphere's cube, built from the SDF, and a
    function giving each ray's tightened ``(t_start, t_end, inside)``."""
    try:
        from taichi_dr.implicit.occupancy_grid import OccupancyGrid, sdf_value_fn
    except ImportError as e:
        print(f"--occupancy-grid: unavailable (taichi_dr.implicit.occupancy_grid does not import: {e})")
        sys.exit(2)
    grid = OccupancyGrid(-radius, radius, resolution)
    grid.update(0, sdf_value_fn(sdf_fn, grid))      # iteration 0 is in the warm-up: every cell is evaluated

    def segments():
        t_near, t_far, crosses = ray_segments(o, d, radius)
        t_start, t_end, hit_any = grid.ray_intervals(o, d, t_near, t_far)
        return t_start, t_end, hit_any & crosses

    return grid, segments


def time_side_by_side(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median wall time per function, after one warm-up each; the functions alternate within each repeat."""
    out = {k: fn() for k, fn in fns.items()}   # warm-up: Taichi kernel compilation, allocator
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            runtime.sync()
            t0 = time.perf_counter()
            out[k] = fn()
            runtime.sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, out


def run_network(name, desc, net, o, d, image_shape, args, idr):
    n = o.shape[0]
    sdf = net.sdf
    training = args.mode == "train"
    idr_settings = idr.IdrTracerSettings(training=training)
    segments_fn = None
    grid_note = ""
    if args.occupancy_grid:
        t0 = time.perf_counter()
        grid, segments_fn = occupancy_segments(sdf, o, d, idr_settings.object_bounding_sphere, args.grid_resolution)
        grid_note = (f", occupancy grid {args.grid_resolution}^3 ({100 * grid.occupancy_fraction:.1f}% occupied, "
                     f"built in {time.perf_counter() - t0:.1f} s, not timed)")

    def idr_sdf(x):
        """What IDR's renderer hands its tracer: ``sdf=lambda x: self.implicit_network(x)[:, 0]``, the whole
        network (SDF and feature vector), of which the tracer keeps the first column."""
        return net(x)[:, 0]

    def run_idr(sdf_fn=idr_sdf):
        segs = segments_fn() if segments_fn is not None else None
        generator = torch.Generator().manual_seed(0)
        chunk = args.idr_chunk or n
        outs = [idr.idr_ray_trace(sdf_fn, o[s:s + chunk], d[s:s + chunk], idr_settings, generator=generator,
                                  segments=None if segs is None else tuple(x[s:s + chunk] for x in segs))
                for s in range(0, n, chunk)]
        return torch.cat([r[0] for r in outs]), torch.cat([r[1] for r in outs]), sum(r[2] for r in outs)

    fns = {"idr": run_idr, "idr_head": lambda: run_idr(sdf)}
    labels = {"idr": "IDR RayTracing, net(x)[:, 0] (as IDR)", "idr_head": "IDR RayTracing, net.sdf"}
    for steps in args.taichi_steps:
        for relaxation in args.relaxation:
            ts = TracerSettings(bounding_radius=idr_settings.object_bounding_sphere, max_steps=steps,
                                threshold=idr_settings.sdf_threshold, n_samples=idr_settings.n_steps,
                                n_secant=idr_settings.n_secant_steps, max_relaxation=relaxation)
            for cones in ([False, True] if args.cones else [False]):
                def run_tdr(ts=ts, cones=cones):
                    segs = segments_fn() if segments_fn is not None else None
                    if cones and segs is None:
                        r = sphere_trace_images(sdf, o, d, image_shape, ts, ConeSettings())
                    elif cones:
                        segs, cone_evals = cone_segments(sdf, o, d, image_shape, ConeSettings(),
                                                         bounding_radius=ts.bounding_radius, segments=segs)
                        r = sphere_trace(sdf, o, d, ts, miss_min_sdf=training, segments=segs)
                        return r.t, r.hit, r.sdf_evals + cone_evals
                    else:
                        r = sphere_trace(sdf, o, d, ts, miss_min_sdf=training, segments=segs)
                    return r.t, r.hit, r.sdf_evals

                key = f"tdr{steps}_{relaxation:g}{'_cones' if cones else ''}"
                fns[key] = run_tdr
                labels[key] = f"sphere_trace, steps {steps}, relax {relaxation:g}{' + cones' if cones else ''}"
    times, out = time_side_by_side(fns, args.repeats)

    t_idr, hit_idr, _ = out["idr"]
    print(f"\n[{name}] {desc}{grid_note}")
    print("vs IDR: against IDR's tracer as IDR runs it; same sdf: against IDR's tracer given net.sdf, the SDF "
          "alone (the tracers' algorithms only)")
    print(f"{'tracer':<40}{'time (s)':>9}{'rays/s':>10}{'vs IDR':>8}{'same sdf':>9}{'SDF evals':>11}{'/ray':>7}"
          f"{'hits':>7}{'hit agree':>11}{'max |dt|':>10}{'med |dt|':>10}{'max |f| hit':>12}")
    for k in fns:
        t, hit, evals = out[k]
        label = labels[k]
        both = hit & hit_idr
        dt = (t[both] - t_idr[both]).abs()
        agree = float((hit == hit_idr).float().mean())
        max_dt = float(dt.max()) if dt.numel() else 0.0
        med_dt = float(dt.median()) if dt.numel() else 0.0
        # how far from the zero level set each tracer's hits are (not timed): who is off where t differs
        with torch.no_grad():
            f_hit = sdf(o[hit] + t[hit, None] * d[hit]).abs()
        max_f = float(f_hit.max()) if f_hit.numel() else 0.0
        print(f"{label:<40}{times[k]:>9.3f}{n / times[k]:>10.0f}{times['idr'] / times[k]:>7.2f}x"
              f"{times['idr_head'] / times[k]:>8.2f}x{evals:>11}"
              f"{evals / n:>7.1f}{int(hit.sum()):>7}{100 * agree:>10.2f}%{max_dt:>10.2e}{med_dt:>10.2e}"
              f"{max_f:>12.2e}")
    if args.scan:
        for k in fns:
            if k.startswith("tdr"):
                scan_disagreements(labels[k], sdf, o, d, out[k], out["idr"], args.scan,
                                   idr_settings.object_bounding_sphere)


def scan_disagreements(label, sdf, o, d, ours, theirs, samples: int, radius: float) -> None:
    """Against a dense scan (``samples`` points over the bounding-sphere segment; the first with f < 0), every ray
    whose hit or miss differs between the two tracers, or whose hits differ by more than 1e-2 in t: who has the
    first crossing, and how close to zero the SDF comes on the rays without one (a hit there is a graze within
    the threshold, which both tracers' rules accept)."""
    (t, hit, _), (t_idr, hit_idr, _) = ours, theirs
    both = hit & hit_idr
    rays = torch.nonzero((hit != hit_idr) | (both & ((t - t_idr).abs() > 1e-2))).flatten()
    t_near, t_far, _ = ray_segments(o, d, radius)
    s = torch.linspace(0, 1, samples, dtype=o.dtype)
    counts = {"ours first crossing": 0, "IDR's first crossing": 0, "neither": 0, "no crossing, ours grazes": 0,
              "no crossing, IDR grazes": 0}
    min_f_no_crossing = []
    for k in rays.tolist():
        ts = t_near[k] + s * (t_far[k] - t_near[k])
        with torch.no_grad():
            f = sdf(o[k] + ts[:, None] * d[k])
        neg = torch.nonzero(f < 0).flatten()
        tol = 2 * float(t_far[k] - t_near[k]) / (samples - 1)
        if neg.numel() == 0:
            min_f_no_crossing.append(float(f.min()))
            counts["no crossing, ours grazes" if hit[k] else "no crossing, IDR grazes"] += 1
            continue
        first = float(ts[neg[0]])
        mine = bool(hit[k]) and abs(float(t[k]) - first) <= max(tol, 1e-4)
        idrs = bool(hit_idr[k]) and abs(float(t_idr[k]) - first) <= max(tol, 1e-4)
        verdict = {(True, False): "ours first crossing", (False, True): "IDR's first crossing",
                   (False, False): "neither", (True, True): "both"}[(mine, idrs)]
        counts[verdict] = counts.get(verdict, 0) + 1
    graze = f", min f on rays without a crossing {max(min_f_no_crossing):.1e}" if min_f_no_crossing else ""
    print(f"  {label}: {rays.numel()} rays disagree with IDR's tracer (hit/miss, or |dt| > 1e-2); dense scan of "
          f"{samples}: {counts}{graze}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", type=int, default=4, help="cameras on the ring")
    p.add_argument("--size", type=int, default=64, help="image side: views * size^2 rays")
    p.add_argument("--distance", type=float, default=2.5, help="camera distance from the origin")
    p.add_argument("--fov", type=float, default=40.0)
    p.add_argument("--networks", default="idr,small,trained", help="comma-separated: idr, small, trained")
    p.add_argument("--mode", choices=("render", "train"), default="render")
    p.add_argument("--taichi-steps", default="10,64", help="sphere_trace max_steps values, one row each")
    p.add_argument("--relaxation", default="1,1.9",
                   help="sphere_trace max_relaxation values (1 = plain sphere tracing), one row each")
    p.add_argument("--fit-steps", type=int, default=300, help="Adam steps fitting the 'trained' network")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoding", choices=("frequency", "hashgrid"), default="frequency",
                   help="HOOK: hashgrid needs taichi_dr/nets/hash_grid.py (exits 2 without it)")
    p.add_argument("--hash-preset", choices=("ngp", "app"), default="ngp",
                   help="with --encoding hashgrid: instant-ngp's table (2^19, finest 2048) and IDR's 256 features, "
                        "or what tdr reconstruct --encoding hashgrid builds (2^16, finest 512, 32 features)")
    p.add_argument("--occupancy-grid", action="store_true",
                   help="HOOK: trace the occupancy grid's tightened segments (taichi_dr/implicit/occupancy_grid.py)")
    p.add_argument("--cones", action="store_true",
                   help="also trace each taichi row after cone tracing over 8 x 8 -> 4 x 4 pixel tiles "
                        "(taichi_dr/implicit/cone_tracing.py; the views are whole images); render mode only")
    p.add_argument("--grid-resolution", type=int, default=64)
    p.add_argument("--scan", type=int, default=0,
                   help="dense samples per ray to check, after the timings, every ray the tracers disagree on "
                        "(0: no check)")
    p.add_argument("--idr-chunk", type=int, default=0,
                   help="rays per call of IDR's tracer (IDR's renderer splits a view into 10000 pixels, "
                        "utils.general.split_input); 0: all rays in one call")
    p.add_argument("--quick", action="store_true", help="a few-second sanity run: 1 view of 32x32, small net")
    p.add_argument("--arch", default=None)
    p.add_argument("--torch-threads", type=int, default=torch.get_num_threads(),
                   help="torch's CPU threads for both tracers (default: torch's own, all cores, as a user of either "
                        "runs it)")
    args = p.parse_args(argv)
    if args.quick:
        args.views, args.size, args.repeats, args.fit_steps = 1, 32, 1, 30
        args.networks = "small" if args.encoding == "frequency" else "hashgrid"
        args.grid_resolution = min(args.grid_resolution, 32)
    if args.cones and args.mode == "train":
        p.error("--cones: render mode only (training traces random pixels, not whole images)")
    args.taichi_steps = [int(s) for s in args.taichi_steps.split(",") if s]
    args.relaxation = [float(s) for s in args.relaxation.split(",") if s]

    arch = runtime.init(args.arch, torch_threads=args.torch_threads)
    dev = runtime.device()
    idr = load_idr_tracer()
    o, d = ring_rays(args.views, args.size, args.distance, args.fov)
    nets = build_networks(args, dev)
    print(f"arch={arch} torch threads={torch.get_num_threads()} rays={o.shape[0]} ({args.views} views x "
          f"{args.size}x{args.size}, distance {args.distance}, fov {args.fov}) mode={args.mode} "
          f"repeats={args.repeats} (median after a warm-up); IDR settings: "
          f"{idr.IdrTracerSettings(training=args.mode == 'train')}")
    for name, (desc, net) in nets.items():
        run_network(name, desc, net, o, d, (args.views, args.size, args.size), args, idr)


if __name__ == "__main__":
    main()
