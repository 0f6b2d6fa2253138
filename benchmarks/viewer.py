"""What the live viewer costs training, with the window idle: iterations per second without a viewer, with a
visible window (under Xvfb when there is no display) and with frames written off screen, side by side.

Workloads (sizes of the README's CPU runs, cut short):

* ``fit``: ``tdr fit-mesh``'s method, Spot's 64 x 64 silhouettes from 40 views, 8 views per step;
* ``idr``: IDR on a 16-view 128 x 128 dataset of Spot made by ``tdr make-dataset`` (512 rays per step, a 4 x 128
  geometry network), as in docs/benchmarks_idr.md;
* ``unisurf``: UNISURF on the same dataset without masks (512 rays, 4 x 128).

Each (workload, mode) runs in its own process (Taichi and GGUI hold one of each per process), the modes
interleaved ``--repeats`` times; the rate is measured from the engine's own ``time_s`` column over the
iterations after ``--warmup`` (so the first frame, which compiles the renderer, is not counted), and the
table gives medians and the ratio to no viewer.

    xvfb-run -a -s "-screen 0 1920x1080x24" python benchmarks/viewer.py --repeats 2   # docs/benchmarks.md
    python benchmarks/viewer.py --quick                                           # a few iterations: it runs
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as apps/__init__.py does

MODES = ("none", "window", "frames")


def _spot_dataset(root: Path, size: int, views: int) -> Path:
    data = root / f"spot_{size}_{views}"
    if not data.is_dir():
        subprocess.run([sys.executable, "-m", "apps", "make-dataset", str(ROOT / "assets/spot/spot_triangulated.obj"),
                        "--views", str(views), "--size", str(size), "--out", str(data), "--quiet"], check=True,
                       cwd=ROOT, capture_output=True)
    return data


def child(workload: str, mode: str, iterations: int, warmup: int, data: str, frames: str) -> dict:
    import torch

    import taichi_dr as tdr

    tdr.init("cpu")
    from taichi_dr.pipelines import Callback, Trainer
    from taichi_dr.viewer import ViewerCallback, ViewerSettings

    callbacks: list[Callback] = []
    if mode != "none":
        callbacks.append(ViewerCallback(ViewerSettings(show_window=mode == "window",
                                                       frames_dir=Path(frames) if mode == "frames" else None)))
    if workload == "fit":
        from taichi_dr.core.mesh import icosphere
        from taichi_dr.pipelines.mesh_fit import FitSettings, fit_mesh

        spot = tdr.load_mesh(tdr.asset_path("spot/spot_triangulated.obj"))
        cams = tdr.Cameras.from_spherical(torch.full((40,), 2.7), torch.tensor([30.0, -15.0] * 20),
                                          torch.arange(40) * 9.0, 30.0, (64, 64))
        sil = tdr.render_mesh(spot, cams, None, tdr.RasterSettings(sigma=1e-5, far=100.0)).alpha.detach()
        result = fit_mesh(sil, cams, icosphere(level=4), FitSettings(iters=iterations, views_per_step=8),
                          progress="none", callbacks=callbacks)
        history = result.train.history
    else:
        from taichi_dr.data.datasets import load_dataset
        from taichi_dr.pipelines.idr import IDRConfig, IDRMethod
        from taichi_dr.pipelines.unisurf import UnisurfConfig, UnisurfMethod

        train = load_dataset(data)
        sizes = dict(iterations=iterations, rays_per_batch=512, geometry_depth=4, geometry_width=128,
                     feature_dim=64, rendering_depth=2, rendering_width=128, geometry_skip_in=(2,))
        torch.manual_seed(0)
        if workload == "idr":
            config = IDRConfig(**sizes)
            method = IDRMethod(train, config)
        else:
            config = UnisurfConfig(**sizes, use_masks=False)
            method = UnisurfMethod(train, config)
        trainer = Trainer(method, config.train_config(progress="none"), callbacks=callbacks)
        history = trainer.fit().history
    times = [row["time_s"] for row in history]
    rate = (len(times) - warmup) / (times[-1] - times[warmup - 1])
    out = {"rate": rate}
    if callbacks:
        viewer = callbacks[0]
        out.update(frames=viewer.frames, viewer_s=viewer.viewer_seconds, train_s=viewer.train_seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="fit,idr,unisurf")
    parser.add_argument("--iterations", type=int, default=0,
                        help="per run (default: fit 400, idr 200, unisurf 100: long enough for idle frames)")
    parser.add_argument("--warmup", type=int, default=0, help="iterations not timed (default: a tenth)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workload, mode, iterations, warmup, data, frames = args.child
        print(json.dumps(child(workload, mode, int(iterations), int(warmup), data, frames)))
        return
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        sys.exit("no display: run under xvfb-run -a -s '-screen 0 1920x1080x24' python benchmarks/viewer.py")
    workdir = Path(tempfile.mkdtemp(prefix="tdr_viewer_bench_"))
    data = _spot_dataset(workdir, 128, 16)
    rows = []
    for workload in args.workloads.split(","):
        iterations = args.iterations or {"fit": 400, "idr": 200, "unisurf": 100}[workload]
        if args.quick:
            iterations = 12
        warmup = args.warmup or max(2, iterations // 10)
        results = {mode: [] for mode in MODES}
        for _ in range(1 if args.quick else args.repeats):
            for mode in MODES:
                frames = workdir / f"frames_{workload}_{mode}"
                shutil.rmtree(frames, ignore_errors=True)
                proc = subprocess.run([sys.executable, __file__, "--child", workload, mode, str(iterations),
                                       str(warmup), str(data), str(frames)], capture_output=True, text=True,
                                      cwd=ROOT)
                if proc.returncode != 0:
                    sys.exit(f"{workload}/{mode} failed:\n{proc.stderr[-3000:]}")
                results[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        base = statistics.median(r["rate"] for r in results["none"])
        for mode in MODES:
            rate = statistics.median(r["rate"] for r in results[mode])
            frames = statistics.median(r.get("frames", 0) for r in results[mode])
            share = statistics.median(r["viewer_s"] / max(r["viewer_s"] + r["train_s"], 1e-9)
                                      for r in results[mode]) if mode != "none" else 0.0
            rows.append((workload, mode, iterations, rate, rate / base, frames, share))
    print(f"{'workload':9} {'viewer':7} {'iters':>5} {'it/s':>8} {'vs none':>8} {'frames':>7} {'viewer time':>12}")
    for workload, mode, iterations, rate, ratio, frames, share in rows:
        print(f"{workload:9} {mode:7} {iterations:5d} {rate:8.2f} {ratio:8.3f} {frames:7.0f} {100 * share:11.1f}%")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
