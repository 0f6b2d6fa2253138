"""Pose refinement benchmark: random perturbations of the Spot cow, recovered through the renderer.

Reference views of Spot are rendered at ``--size``² (unlit texture colours over black, and the hard
silhouette). Each trial picks a view, perturbs the true object-to-camera pose by a rotation about the
object's centre of uniform random angle up to ``--max-rot`` degrees (uniform random axis) and a translation of
uniform random length up to ``--max-trans`` times the camera distance (uniform random direction), and runs
:func:`taichi_dr.pipelines.pose.refine.refine_pose` from there with three objectives:

* ``silhouette``: soft silhouette IoU against the target mask;
* ``rgb``: mean squared colour difference against the target colours (no mask);
* ``oracle``: no loss at all, a displacement field computed from the true pose (where the surface seen at
  each pixel really is: :func:`taichi_dr.pipelines.pose.refine.reprojection_flow`), turned into a pixel gradient of the
  silhouette and colours and propagated through the rasterizer.

Success: final rotation error < 2 degrees and translation error < 1% of the distance. Prints one table
(success rate, median/90th-percentile errors, median seconds per refinement); every trial's numbers can be
saved with ``--json``. The same perturbations are used for every method.

    python benchmarks/pose.py                              # 100 trials x 3 methods at 256x256
    python benchmarks/pose.py --trials 5 --size 128        # a quick run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from taichi_dr.core import runtime  # noqa: E402
from taichi_dr.core.camera import Cameras  # noqa: E402
from taichi_dr.core.mesh import asset_path, load_mesh  # noqa: E402
from taichi_dr.core.transforms import axis_angle_to_matrix  # noqa: E402
from taichi_dr.pipelines.pose.refine import (  # noqa: E402
    DisplacementField,
    Pose,
    PoseSettings,
    PoseTarget,
    Stage,
    refine_pose,
    reprojection_flow,
    rotation_error_deg,
    surface_points,
    translation_error,
)
from taichi_dr.raster.renderer import render_mesh  # noqa: E402
from taichi_dr.raster.settings import RasterSettings  # noqa: E402

METHODS = ("silhouette", "rgb", "oracle", "oracle_image")
DEFAULT_METHODS = ("silhouette", "rgb", "oracle")
ROT_OK_DEG = 2.0
TRANS_OK_REL = 0.01


def reference_cameras(mesh, size: int, distance: float, fov: float) -> Cameras:
    """8 views around the object's centre: azimuths every 45 degrees, elevations alternating 25 / -10."""
    v = mesh.verts
    centre = 0.5 * (v.amin(0) + v.amax(0))
    eyes = []
    for i in range(8):
        az, el = math.radians(45.0 * i), math.radians(25.0 if i % 2 == 0 else -10.0)
        # SoftRas's spherical convention (docs/design.md), about the object's centre.
        d = torch.tensor([math.cos(el) * math.sin(az), math.sin(el), -math.cos(el) * math.cos(az)])
        eyes.append(centre + distance * d)
    return Cameras.look_at(torch.stack(eyes), centre[None].expand(8, 3), (0.0, 1.0, 0.0), fov, (size, size))


def random_perturbation(rng: np.random.Generator, max_rot_deg: float, max_trans: float):
    """(axis-angle (3,), translation (3,)): uniform axis, angle ~ U(0, max_rot); uniform direction,
    length ~ U(0, max_trans)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(0.0, max_rot_deg))
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    return axis * angle, direction * rng.uniform(0.0, max_trans)


def perturb(true: Pose, pivot: torch.Tensor, aa: np.ndarray, dt: np.ndarray) -> Pose:
    """Rotate the object about its centre (camera axes) and translate it (camera axes)."""
    D = axis_angle_to_matrix(torch.from_numpy(aa).to(true.R))
    c = true.R @ pivot
    return Pose(D @ true.R, true.t + c - D @ c + torch.from_numpy(dt).to(true.t))


def oracle_field(mesh, true: Pose, conversion: str = "reprojection", channels=("alpha",)) -> DisplacementField:
    """Where each rendered surface pixel should go: its position under the true pose."""

    def fn(rendered, target, camera):
        truth = Cameras(camera.K, true.R[None], true.t[None], camera.image_size, validate=False)
        return reprojection_flow(surface_points(mesh, camera, rendered.pix_to_face), camera, truth)

    return DisplacementField(fn, channels=channels, conversion=conversion, name="oracle")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=100, help="perturbations per method (default 100)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated subset of {METHODS} (default: {','.join(DEFAULT_METHODS)})")
    ap.add_argument("--max-rot", type=float, default=30.0, help="largest rotation error, degrees")
    ap.add_argument("--max-trans", type=float, default=0.1, help="largest translation error / distance")
    ap.add_argument("--distance", type=float, default=4.5, help="camera distance to the object's centre")
    ap.add_argument("--fov", type=float, default=30.0, help="horizontal field of view, degrees")
    ap.add_argument("--rgb-target", choices=("rgb", "rgba"), default="rgba",
                    help="what the RGB method is given: the colours only (over black), or with the mask")
    ap.add_argument("--optimizer", default="auto", help="PoseSettings.optimizer (default auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--arch", default="cpu", help="taichi_dr arch (default cpu)")
    ap.add_argument("--json", type=Path, default=None, help="write every trial's results here")
    ap.add_argument("--stages", default=None,
                    help="coarse-to-fine schedule as SIZE:SIGMA:ITERS:LR,... (SIZE 0 = full resolution); "
                         "default: PoseSettings' stages")
    ap.add_argument("--verbose", action="store_true", help="print every trial")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = set(methods) - set(METHODS)
    if bad:
        ap.error(f"--methods: unknown {sorted(bad)}; choose from {METHODS}")
    if args.trials < 1 or args.size < 16:
        ap.error("--trials must be >= 1 and --size >= 16")

    warnings.filterwarnings("ignore", category=SyntaxWarning)
    torch.set_num_threads(args.threads)
    arch = runtime.init(args.arch)
    mesh = load_mesh(asset_path("spot/spot_triangulated.obj"))
    v = mesh.verts
    pivot = 0.5 * (v.amin(0) + v.amax(0))
    cams = reference_cameras(mesh, args.size, args.distance, args.fov)

    with torch.no_grad():
        ref = render_mesh(mesh, cams, None, RasterSettings(sigma=1e-5), outputs=("rgb",))
        hard = render_mesh(mesh, cams, None, RasterSettings(mode="hard"), outputs=())
    targets = {
        "silhouette": [PoseTarget(mask=hard.alpha[i], rgb=None) for i in range(len(cams))],
        "rgb": [PoseTarget(mask=hard.alpha[i] if args.rgb_target == "rgba" else None, rgb=ref.rgb[i])
                for i in range(len(cams))],
    }
    targets["oracle"] = targets["oracle_image"] = [PoseTarget(mask=hard.alpha[i], rgb=ref.rgb[i])
                                                   for i in range(len(cams))]
    rng = np.random.default_rng(args.seed)
    trials = []
    for _ in range(args.trials):
        view = int(rng.integers(len(cams)))
        aa, dt = random_perturbation(rng, args.max_rot, args.max_trans * args.distance)
        trials.append((view, aa, dt))

    stages = PoseSettings().stages
    if args.stages:
        try:
            stages = tuple(Stage(int(sz) or None, float(sg), int(it), float(lr))
                           for sz, sg, it, lr in (part.split(":") for part in args.stages.split(",")))
        except ValueError as e:
            ap.error(f"--stages: expected SIZE:SIGMA:ITERS:LR,... ({e})")
    settings = PoseSettings(stages=stages, optimizer=args.optimizer)
    print(f"# taichi_dr pose benchmark: Spot ({mesh.num_faces} faces), {args.size}x{args.size}, "
          f"{args.trials} trials, rotation <= {args.max_rot} deg, translation <= {args.max_trans:.0%} of "
          f"d = {args.distance}; arch {arch}, {args.threads} torch threads, {os.cpu_count()} CPUs visible, "
          f"{platform.processor() or platform.machine()}")
    print("# stages: " + ", ".join(f"{s.size or 'full'}px sigma={s.sigma:g} x{s.iters}"
                                    for s in settings.stages))
    results = {m: [] for m in methods}
    for k, (view, aa, dt) in enumerate(trials):
        cam = cams[view]
        true = Pose.from_cameras(cam)
        init = perturb(true, pivot, aa, dt)
        camera = Cameras(cam.K, torch.eye(3), torch.zeros(3), cam.image_size)  # the pose is object->camera
        for m in methods:
            loss = {"silhouette": "silhouette_iou", "rgb": "rgb", "oracle": oracle_field(mesh, true),
                    "oracle_image": oracle_field(mesh, true, "image", ("alpha", "rgb"))}[m]
            t0 = time.perf_counter()
            res = refine_pose(mesh, targets[m][view], camera, init, loss=loss, settings=settings)
            seconds = time.perf_counter() - t0
            r_err = rotation_error_deg(res.pose, true)
            t_err = translation_error(res.pose, true, relative_to=args.distance)
            row = dict(trial=k, view=view, init_rot_deg=math.degrees(float(np.linalg.norm(aa))),
                       init_trans_rel=float(np.linalg.norm(dt)) / args.distance, rot_deg=r_err,
                       trans_rel=t_err, seconds=seconds, ok=bool(r_err < ROT_OK_DEG and t_err < TRANS_OK_REL))
            results[m].append(row)
            if args.verbose:
                print(f"trial {k:3d} view {view} {m:10s} init {row['init_rot_deg']:5.1f} deg "
                      f"{row['init_trans_rel']:.3f} -> {r_err:6.2f} deg {t_err:.4f}  {seconds:5.1f} s "
                      f"{'ok' if row['ok'] else 'FAIL'}", flush=True)

    print()
    print("| method | trials | success | median rot err (deg) | p90 rot err | median trans err (% d) | "
          "p90 trans err | median s / refinement |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in methods:
        rows = results[m]
        rot = np.array([r["rot_deg"] for r in rows])
        tr = np.array([r["trans_rel"] for r in rows]) * 100
        sec = [r["seconds"] for r in rows]
        ok = sum(r["ok"] for r in rows)
        print(f"| {m} | {len(rows)} | {ok / len(rows):.0%} ({ok}/{len(rows)}) | {np.median(rot):.3f} | "
              f"{np.percentile(rot, 90):.3f} | {np.median(tr):.3f} | {np.percentile(tr, 90):.3f} | "
              f"{statistics.median(sec):.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
