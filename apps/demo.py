"""``tdr demo``: render the bundled Spot cow, then recover its shape from the silhouettes alone.

1. Spot (Keenan Crane, CC0) is normalised and rendered by this engine from ``--views`` cameras around it
   (elevations alternating 30 and -15 degrees so the underside is seen too): shaded RGBA PNGs whose alpha
   is the silhouette, plus ``cameras.json``, in ``OUT/targets`` (exactly what ``tdr render`` writes).
2. An icosphere is fitted to those silhouettes by the same code as ``tdr fit-mesh`` (reading the files back),
   in ``OUT/fit``: ``mesh.obj``, ``metrics.jsonl``, ``config.json``, ``checkpoint.pt``, progress images and
   ``progress.gif``.
3. ``OUT/comparison.png`` shows target | initial | fitted for a few views, ``OUT/turntable.gif`` target |
   fitted all around, and the silhouette IoU and the symmetric Chamfer distance to the true mesh are
   printed (and saved in ``OUT/summary.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import typer

from apps.command import current_run, tdr_command
from apps.common import (
    CLIError,
    available_memory_bytes,
    command_options,
    hstack,
    init_runtime,
    prepare_out_dir,
    resume_command,
    save_png,
    settings_error,
    stderr_console,
    to_rgb,
    upscale,
    upscale_factor,
    vstack,
    write_gif,
)
from apps.fit_mesh import (
    fit_mesh_command,
    load_problem,
    load_template,
    print_metrics,
    run_fit,
)
from apps.render import auto_distance, render_views, turntable_cameras, write_views

SPOT = "spot/spot_triangulated.obj"
STALE = ("targets/*", "fit/*", "comparison.png", "turntable.gif", "summary.json", "config.toml")


def _label(img: np.ndarray, text: str) -> np.ndarray:
    """Put a caption strip above an (H, W, 3) uint8 image."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (img.shape[1], 16), (255, 255, 255))
    ImageDraw.Draw(strip).text((4, 2), text, fill=(0, 0, 0))
    return np.concatenate([np.asarray(strip), img], axis=0)


def comparison_grid(columns: dict[str, torch.Tensor], views: list[int]) -> np.ndarray:
    """Grid with one row per view and one labelled column per entry of ``columns`` ((N, H, W, 4) RGBA)."""
    first = next(iter(columns.values()))
    factor = upscale_factor(tuple(first.shape[1:3]), 160)
    cols = []
    for name, rgba in columns.items():
        col = vstack([upscale(to_rgb(rgba[i]), factor) for i in views], gap=4, fill=200)
        cols.append(_label(col, name))
    return hstack(cols, gap=4, fill=200)


@tdr_command("demo", summary_table=True)
def demo_command(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Output folder (must be empty or new)."),
    views: int = typer.Option(24, help="Number of target views."),
    size: int = typer.Option(64, help="Image size in pixels (square)."),
    iterations: int = typer.Option(200, "--iterations", "--iters", help="Fitting iterations."),
    views_per_step: int = typer.Option(8, help="Views rendered per iteration (random subset); 0 = all."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out folder."),
    seed: int = typer.Option(0, help="Random seed."),
    arch: str = typer.Option(None, help="Taichi backend: auto, cpu, cuda or vulkan."),
) -> None:
    """Render the Spot cow from many views, fit an icosphere to the silhouettes, report IoU and Chamfer.

    Example: tdr demo --out runs/demo --iterations 200
    """
    from taichi_dr.core.camera import save_cameras_json
    from taichi_dr.core.mesh import asset_path, load_mesh
    from taichi_dr.core.metrics import bbox_diagonal, chamfer_distance
    from taichi_dr.pipelines.mesh_fit import FitSettings

    if not 2 <= views <= 1000:  # every view is held three times over in memory for the pictures
        raise CLIError(f"--views: expected 2 to 1000 views, got {views}")
    if views_per_step < 0:
        raise CLIError(f"--views-per-step: expected >= 0 (0 = all views), got {views_per_step}")
    if not 16 <= size <= 1024:
        raise CLIError(f"--size: expected an image size in [16, 1024] pixels, got {size}")
    if iterations < 0:
        raise CLIError(f"--iterations: expected >= 0, got {iterations}")
    # Target, initial and fitted RGBA views (float32) are all held for the pictures.
    need, free = 3 * views * size * size * 16, available_memory_bytes(torch.device("cpu"))
    if free is not None and need > free // 2:
        raise CLIError(f"--views {views} at --size {size}: the pictures need about {need / 2**30:.1f} GiB but "
                       f"{free / 2**30:.1f} GiB is free; use fewer or smaller views")
    prepare_out_dir(out, overwrite=overwrite, stale=STALE)
    arch_used = init_runtime(arch)
    console = stderr_console()
    report = current_run()
    t_start = time.perf_counter()

    # 1. Targets: the normalised cow seen from all around, half the views from below.
    spot, _, _ = load_mesh(asset_path(SPOT)).normalized()
    fov = 30.0
    elevation = torch.tensor([30.0 if i % 2 == 0 else -15.0 for i in range(views)])
    # Closer than `tdr render`'s default (the bounding sphere spans 90% of the view, not 70%): more pixels
    # on the cow at these small sizes, and it still stays in view from every direction.
    cameras = turntable_cameras(views, (size, size), distance=auto_distance(fov, fill=0.9),
                                elevation=elevation, fov=fov)
    target_rgba = render_views(spot, cameras)
    targets_dir = out / "targets"
    targets_dir.mkdir(exist_ok=True)
    write_views(targets_dir, target_rgba)
    save_cameras_json(cameras, targets_dir / "cameras.json")
    if report.chatty:
        console.print(f"Rendered Spot from {views} views at {size}x{size} on {arch_used} -> {targets_dir}",
                      highlight=False)

    # 2. Fit, exactly as `tdr fit-mesh --targets OUT/targets --cameras OUT/targets/cameras.json` would.
    tgt, cams = load_problem(targets_dir, targets_dir / "cameras.json", fov)
    template, label = load_template(None)
    fit_dir = out / "fit"
    fit_dir.mkdir(exist_ok=True)
    try:
        settings = FitSettings(iters=iterations, views_per_step=views_per_step or None)
    except (ValueError, TypeError) as e:
        raise settings_error(e, "FitSettings", {**command_options(demo_command), "iters": "--iterations"}) from None
    hint = resume_command(["tdr", "fit-mesh", "--targets", targets_dir, "--cameras", targets_dir / "cameras.json",
                           "--out", fit_dir], fit_mesh_command,
                          dict(iterations=iterations, views_per_step=views_per_step, seed=seed,
                               log_every=max(1, iterations // 15)))
    sources = {"targets": str(targets_dir), "cameras": str(targets_dir / "cameras.json"), "template": label}
    # checkpoint_every=0: one checkpoint, at the end (or on Ctrl-C), as the demo is short.
    result = run_fit(fit_dir, silhouettes=tgt.silhouettes, cameras=cams, template=template, settings=settings,
                     sources=sources, rgb=tgt.rgb, seed=seed, log_every=max(1, iterations // 15),
                     checkpoint_every=0, resume_hint=hint, console=console)

    # 3. Pictures and numbers.
    initial_rgba = render_views(result.initial_mesh, cameras, sigma=1e-5)
    fitted_rgba = render_views(result.mesh, cameras, sigma=1e-5)
    shown = sorted({int(round(k * views / 4)) % views for k in range(4)})
    grid = comparison_grid({"target": target_rgba, "initial": initial_rgba, "fitted": fitted_rgba}, shown)
    save_png(out / "comparison.png", grid)
    factor = upscale_factor((size, size), 160)
    frames = [hstack([upscale(to_rgb(target_rgba[i]), factor), upscale(to_rgb(fitted_rgba[i]), factor)],
                     gap=4, fill=200) for i in range(views)]
    write_gif(out / "turntable.gif", frames, fps=8)

    chamfer = chamfer_distance(result.mesh, spot)
    chamfer_initial = chamfer_distance(result.initial_mesh, spot)
    diag = bbox_diagonal(spot)
    print_metrics(result)
    report.info(f"Chamfer distance to the true mesh: {chamfer:.4f} ({100 * chamfer / diag:.2f}% of its "
               f"bounding-box diagonal {diag:.3f}); initial sphere: {chamfer_initial:.4f} "
               f"({100 * chamfer_initial / diag:.2f}%)")
    summary = {
        "views": views, "size": size, "iters": result.iterations, "arch": arch_used,
        "iou_initial": result.initial, "iou_final": result.final,
        "chamfer": chamfer, "chamfer_initial": chamfer_initial, "bbox_diagonal": diag,
        "chamfer_relative": chamfer / diag, "seconds": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    report.metrics.update(chamfer=chamfer, chamfer_initial=chamfer_initial, chamfer_relative=chamfer / diag)
    report.wrote(out / "comparison.png", out / "turntable.gif", out / "summary.json", targets_dir,
                 fit_dir / "mesh.obj", fit_dir / "progress.gif")
    report.info(f"Wrote {out / 'comparison.png'}, {out / 'turntable.gif'}, {fit_dir / 'mesh.obj'} and "
               f"{fit_dir / 'progress.gif'} ({summary['seconds']:.0f} s)")
