"""``tdr reconstruct``, ``tdr evaluate``, ``tdr make-dataset``: multi-view surface reconstruction (IDR).

* ``reconstruct DATA --out DIR``: trains a neural SDF + colour network by sphere tracing (IDR) on a dataset
  folder (IDR/NeuS layout or NeRF-synthetic), then writes ``mesh.ply`` (marching cubes, in the dataset's
  world coordinates), renders of the held-out views (colour and normals) and ``metrics.json``. Training runs
  on the shared engine (:mod:`taichi_dr.pipelines.engine`): ``checkpoint.pt`` every ``--checkpoint-every``
  iterations, ``metrics.jsonl`` (one row per iteration) and ``config.json`` in the run folder; Ctrl-C or
  SIGTERM saves at the current iteration and prints the ``--resume`` command (exit 130/143), and ``--resume``
  continues bitwise; progress is a bar on a terminal and plain lines otherwise.
* ``evaluate MESH --gt GT``: Chamfer distance, normal consistency and F-score between two meshes; with
  ``--data`` (and ``--checkpoint``), PSNR and mask IoU on the held-out views.
* ``make-dataset MESH --out DIR``: renders a mesh with this engine into the IDR layout, for tests with known
  geometry.

The commands are plain functions registered on ``app`` here; ``apps.main`` registers them on ``tdr``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import typer

from apps.common import (
    CLIError,
    available_memory_bytes,
    handle_errors,
    hstack,
    init_runtime,
    prepare_out_dir,
    run_training,
    save_png,
    settings_error,
    to_uint8,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False)

STALE = ("mesh.ply", "metrics.json", "metrics.jsonl", "config.json", "checkpoint.pt", "heldout/*.png",
         "validation/*.png")


# ---------------------------------------------------------------------------------------------------------
# mesh metrics


def mesh_metrics(mesh, gt, n: int = 100_000, threshold: float | None = None, seed: int = 0) -> dict:
    """Surface metrics between ``mesh`` and ``gt`` (taichi_dr Meshes or trimesh), in their length units.

    ``n`` points sampled by area on each surface, nearest neighbours by KD-tree:

    * chamfer: mean of the two directed mean distances (as :func:`taichi_dr.core.metrics.chamfer_distance`);
    * normal_consistency: mean ``|n_a . n_b|`` of the face normals at nearest-neighbour pairs, both ways;
    * fscore at ``threshold`` (default 1% of the ground truth's bounding-box diagonal): harmonic mean of
      precision (mesh points within the threshold of gt) and recall (gt points within it of mesh).
    """
    from scipy.spatial import cKDTree

    from taichi_dr.core.mesh import import_trimesh
    from taichi_dr.core.metrics import _as_trimesh

    trimesh = import_trimesh()  # keeps a Ctrl-C during its first import (trimesh catches BaseException)

    a, b = _as_trimesh(mesh, "mesh"), _as_trimesh(gt, "gt")
    diag = float(np.linalg.norm(b.vertices.max(0) - b.vertices.min(0)))
    tau = 0.01 * diag if threshold is None else float(threshold)
    pa, fa = trimesh.sample.sample_surface(a, n, seed=seed)
    pb, fb = trimesh.sample.sample_surface(b, n, seed=seed + 1)
    na, nb = a.face_normals[fa], b.face_normals[fb]
    d_ab, i_ab = cKDTree(pb).query(pa)
    d_ba, i_ba = cKDTree(pa).query(pb)
    nc = 0.5 * (np.abs((na * nb[i_ab]).sum(-1)).mean() + np.abs((nb * na[i_ba]).sum(-1)).mean())
    precision, recall = float((d_ab < tau).mean()), float((d_ba < tau).mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return dict(chamfer=float(0.5 * (d_ab.mean() + d_ba.mean())), chamfer_mesh_to_gt=float(d_ab.mean()),
                chamfer_gt_to_mesh=float(d_ba.mean()), normal_consistency=float(nc), fscore=f,
                precision=precision, recall=recall, fscore_threshold=tau, bbox_diagonal_gt=diag,
                chamfer_percent_of_diagonal=float(100 * 0.5 * (d_ab.mean() + d_ba.mean()) / diag))


# ---------------------------------------------------------------------------------------------------------
# helpers


def _normals_image(normals: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """World normals (H, W, 3) -> RGB uint8 (n * 0.5 + 0.5, white background)."""
    img = torch.where(mask[..., None], normals * 0.5 + 0.5, torch.ones_like(normals))
    return to_uint8(img)


def _write_views(folder: Path, rendered: dict, images: torch.Tensor, names) -> None:
    """Per view: ``<name>_rgb.png`` (render | ground truth) and ``<name>_normals.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        stem = Path(name).stem
        save_png(folder / f"{stem}_rgb.png", hstack([to_uint8(rendered["rgb"][i]), to_uint8(images[i])]))
        save_png(folder / f"{stem}_normals.png", _normals_image(rendered["normals"][i], rendered["mask"][i]))


def _load_data(data: Path, holdout_every: int, scene_radius: float):
    from taichi_dr.data.datasets import load_dataset, split_holdout

    if not Path(data).exists():
        raise CLIError(f"DATA {str(data)!r} does not exist")
    if holdout_every < 0 or holdout_every == 1:
        raise CLIError(f"--holdout-every: expected 0 (no held-out views) or K >= 2 (views 0, K, 2K, ... held "
                       f"out), got {holdout_every}")
    kwargs = {"scene_radius": scene_radius} if (Path(data) / "transforms_train.json").is_file() else {}
    return split_holdout(load_dataset(data, **kwargs), holdout_every)


# The IDR options each config field comes from, for error messages.
IDR_OPTIONS = {"iterations": "--iterations", "rays_per_batch": "--rays", "lr": "--lr",
               "geometry_depth": "--depth", "geometry_width": "--width", "geometry_frequencies": "--frequencies",
               "feature_dim": "--feature-dim", "rendering_depth": "--render-depth",
               "rendering_width": "--render-width", "checkpoint_every": "--checkpoint-every",
               "validate_every": "--validate-every", "seed": "--seed", "grad_clip": "--grad-clip"}
# Surface samples per mesh for evaluate: ~150 bytes each with the KD-trees, so 10 M is ~3 GB for two meshes.
MAX_POINTS = 10_000_000
# Memory of one training ray, per unit of network size (geometry depth x width + colour depth x width +
# feature size): measured 75 KB per ray at the default sizes on CPU (peak RSS at --rays 256 vs 2048), i.e.
# ~17 bytes per unit; 20 leaves some room.
RAY_BYTES_PER_UNIT = 20


def check_rays(rays: int, train, config, device: torch.device) -> None:
    """Refuse a ray batch larger than the training pixels, or than memory holds (it would run for hours, or
    until the machine swaps, before the first step ends)."""
    n, (h, w) = len(train), train.image_size
    pixels = n * h * w
    if rays > pixels:
        raise CLIError(f"--rays {rays}: more than the {pixels} pixels of the {n} training views "
                       f"({w}x{h}); use at most {pixels}")
    units = (config.geometry_depth * config.geometry_width + config.rendering_depth * config.rendering_width
             + config.feature_dim)
    need = rays * units * RAY_BYTES_PER_UNIT
    free = available_memory_bytes(device)
    if free is not None and need > free:
        most = max(1, free // (units * RAY_BYTES_PER_UNIT))
        raise CLIError(f"--rays {rays}: a batch needs about {need / 2**30:.1f} GiB with these network sizes but "
                       f"{free / 2**30:.1f} GiB is free on {device.type}; use at most about {most}")


def read_idr_checkpoint(path: Path, option: str) -> dict:
    """The engine checkpoint ``tdr reconstruct`` wrote at ``path`` (a file or its folder), read with
    ``weights_only=True`` and checked to be an IDR one.

    Anything else (a text file, a corrupt or truncated save, a checkpoint of another method such as
    ``tdr fit-mesh``'s, one of another format version) gives a one-line CLIError naming ``option`` and the file.
    """
    from taichi_dr.pipelines.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
    from taichi_dr.pipelines.idr import IDRConfig, IDRMethod

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    try:
        payload = load_checkpoint(path, IDRMethod)
    except CheckpointError as e:
        raise CLIError(f"{option}: {e}") from None
    try:
        IDRConfig.from_dict(payload["config"]["method_config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CLIError(f"{option}: {str(path)!r} holds settings this version cannot read ({e})") from None
    return payload


def resume_command_line(data: Path, out: Path, options: dict[str, object]) -> str:
    """The ``tdr reconstruct ... --resume`` command that continues a run (options that differ from the
    defaults)."""
    from apps.common import resume_command

    return resume_command(["tdr", "reconstruct", data, "--out", out], reconstruct_command, options)


# ---------------------------------------------------------------------------------------------------------
# commands


@app.command("reconstruct")
@handle_errors
def reconstruct_command(
    data: Path = typer.Argument(..., help="Dataset folder: IDR/NeuS layout (image/, mask/, cameras.npz) or "
                                "NeRF-synthetic (transforms_train.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (empty or new, unless --resume)."),
    method: str = typer.Option("idr", help="Reconstruction method (only 'idr')."),
    iterations: int = typer.Option(2000, help="Training iterations."),
    rays: int = typer.Option(1024, "--rays", help="Rays per batch (drawn over all training views)."),
    lr: float = typer.Option(5e-4, help="Adam learning rate (halved at 50% and 75% of training)."),
    depth: int = typer.Option(8, help="Geometry MLP hidden layers (skip connection into depth // 2)."),
    width: int = typer.Option(256, help="Geometry MLP width."),
    frequencies: int = typer.Option(6, help="Positional-encoding frequencies of the geometry MLP."),
    feature_dim: int = typer.Option(256, help="Geometry feature size passed to the colour network."),
    render_depth: int = typer.Option(4, help="Colour MLP hidden layers."),
    render_width: int = typer.Option(512, help="Colour MLP width."),
    learn_cameras: bool = typer.Option(False, help="Refine the camera poses too."),
    holdout_every: int = typer.Option(8, help="Keep views 0, K, 2K, ... out of training (0: none)."),
    resolution: int = typer.Option(256, help="Marching-cubes grid resolution for mesh.ply."),
    render_scale: float = typer.Option(0.5, help="Size of the held-out renders relative to the images."),
    validate_every: int = typer.Option(0, help="Render the first held-out view every N iterations "
                                       "into validation/ (0: never)."),
    checkpoint_every: int = typer.Option(250, help="Write checkpoint.pt every N iterations."),
    grad_clip: float = typer.Option(0.0, help="Clip the global gradient norm to this; 0 = no clipping (as IDR)."),
    scene_radius: float = typer.Option(1.5, help="NeRF-synthetic only: radius holding the object."),
    seed: int = typer.Option(0, help="Random seed."),
    resume: bool = typer.Option(False, help="Continue from DIR/checkpoint.pt."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out folder."),
    arch: str = typer.Option(None, help="Taichi backend: auto, cpu, cuda or vulkan."),
) -> None:
    """Reconstruct a surface from posed images and masks (IDR: neural SDF by sphere tracing)."""
    from taichi_dr.core.mesh import save_mesh
    from taichi_dr.implicit.meshing import extract_mesh
    from taichi_dr.pipelines import Trainer
    from taichi_dr.pipelines.idr import (
        IDRConfig,
        IDRMethod,
        check_network_settings,
        image_metrics,
        render_views,
        resize_views,
        scale_cameras,
        validation_callback,
    )

    if method != "idr":
        raise CLIError(f"--method: only 'idr' is available, got {method!r}")
    for name, value, lo in (("--iterations", iterations, 1), ("--rays", rays, 1), ("--depth", depth, 1),
                            ("--width", width, 1), ("--resolution", resolution, 8),
                            ("--frequencies", frequencies, 0), ("--feature-dim", feature_dim, 1),
                            ("--render-depth", render_depth, 1), ("--render-width", render_width, 1),
                            ("--checkpoint-every", checkpoint_every, 0), ("--validate-every", validate_every, 0)):
        if value < lo:
            raise CLIError(f"{name}: must be >= {lo}, got {value}")
    if not (math.isfinite(lr) and lr > 0):
        raise CLIError(f"--lr: must be a number > 0, got {lr}")
    if not (math.isfinite(scene_radius) and scene_radius > 0):
        raise CLIError(f"--scene-radius: must be a number > 0, got {scene_radius}")
    # Marching cubes holds the float32 grid and its own copies (~4 x res^3 x 4 bytes): refuse it now, not
    # after hours of training.
    grid_bytes, free = 16 * resolution ** 3, available_memory_bytes(torch.device("cpu"))
    if free is not None and grid_bytes > free:
        raise CLIError(f"--resolution {resolution}: marching cubes needs about {grid_bytes / 2**30:.1f} GiB but "
                       f"{free / 2**30:.1f} GiB is free; use at most about {int((free / 16) ** (1 / 3))}")
    if not 0 < render_scale <= 1:
        raise CLIError(f"--render-scale: must be in (0, 1], got {render_scale}")
    if resume and not (Path(out) / "checkpoint.pt").is_file():
        raise CLIError(f"--resume: no checkpoint.pt in {str(out)!r}")
    saved_config = None   # checked now, before the data is loaded; the Trainer loads the checkpoint itself
    if resume:
        saved = read_idr_checkpoint(Path(out) / "checkpoint.pt", "--resume")
        if saved["iteration"] > iterations:
            raise CLIError(f"--iterations {iterations}: the checkpoint in {str(out)!r} is already at iteration "
                           f"{saved['iteration']}; give at least that many")
        saved_config = saved["config"]["method_config"]
        del saved
    train, test = _load_data(data, holdout_every, scene_radius)
    if test is not None and min(test.image_size) * render_scale < min(8, *test.image_size):
        h, w = test.image_size
        raise CLIError(f"--render-scale {render_scale}: the held-out renders of the {w}x{h} images would be "
                       f"{max(1, round(w * render_scale))}x{max(1, round(h * render_scale))} pixels; use at "
                       f"least {min(8, h, w) / min(h, w):.3g}")
    skip = (depth // 2,) if depth >= 2 and width > 3 * (1 + 2 * frequencies) else ()
    try:
        config = IDRConfig(iterations=iterations, rays_per_batch=rays, lr=lr, geometry_depth=depth,
                           geometry_width=width, geometry_frequencies=frequencies, geometry_skip_in=skip,
                           feature_dim=feature_dim, rendering_depth=render_depth, rendering_width=render_width,
                           learn_cameras=learn_cameras, checkpoint_every=checkpoint_every,
                           validate_every=validate_every, seed=seed, grad_clip=grad_clip or None)
    except (ValueError, TypeError) as e:
        raise settings_error(e, "IDRConfig", IDR_OPTIONS) from None
    if saved_config is not None:
        try:
            check_network_settings(saved_config, config)
        except ValueError as e:
            raise CLIError(f"--resume: {e}") from None
    used = init_runtime(arch)
    from taichi_dr.core import runtime

    check_rays(rays, train, config, runtime.device())
    prepare_out_dir(out, overwrite=overwrite, resume=resume, stale=STALE)

    hint = resume_command_line(data, out, dict(
        method=method, iterations=iterations, rays=rays, lr=lr, depth=depth, width=width, frequencies=frequencies,
        feature_dim=feature_dim, render_depth=render_depth, render_width=render_width, learn_cameras=learn_cameras,
        holdout_every=holdout_every, resolution=resolution, render_scale=render_scale,
        validate_every=validate_every, checkpoint_every=checkpoint_every, scene_radius=scene_radius, seed=seed,
        grad_clip=grad_clip, arch=arch))
    callbacks = []
    if validate_every and test is not None:
        callbacks.append(validation_callback(test.subset([0]), validate_every, render_scale, out / "validation"))
    torch.manual_seed(config.seed)   # the networks' initial weights (a resumed run then loads its own)
    idr = IDRMethod(train, config)
    trainer = Trainer(idr, config.train_config(), out_dir=out, callbacks=callbacks, resume=resume)
    result = run_training(trainer, resume_hint=hint)
    train_time = trainer.state.elapsed_s   # training seconds over every run of it (resumed ones too)
    model, history = idr.model.eval(), result.history
    metrics = dict(method="idr", data=str(data), arch=used, iterations=iterations, train_seconds=train_time,
                   train_views=len(train), heldout_views=len(test) if test else 0, config=config.to_dict(),
                   skipped_steps=result.skipped, final=dict(history[-1]) if history else {})
    t1 = time.perf_counter()
    mesh, meshing = extract_mesh(model.sdf, resolution, config.tracer.bounding_radius, scale_mat=train.scale_mat,
                                 progress=lambda line: typer.echo(line, err=True), return_stats=True)
    save_mesh(mesh, out / "mesh.ply")
    metrics["mesh"] = dict(verts=mesh.num_verts, faces=mesh.num_faces, resolution=resolution,
                           points_evaluated=meshing["points_evaluated"], dense_points=meshing["dense_points"],
                           seconds=time.perf_counter() - t1)
    if test is not None:
        t2 = time.perf_counter()
        cams = scale_cameras(test.cameras, render_scale)
        rendered = render_views(model, cams, config.tracer)
        images, masks = resize_views(test, cams.image_size)
        _write_views(out / "heldout", rendered, images, test.names)
        m = image_metrics(rendered, images, masks)
        metrics["heldout"] = dict(m, image_size=list(cams.image_size), seconds=time.perf_counter() - t2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float) + "\n")
    msg = (f"Wrote {out / 'mesh.ply'} ({mesh.num_faces} faces) after {iterations} iterations in "
           f"{train_time:.0f} s")
    if "heldout" in metrics:
        msg += (f"; held-out PSNR {metrics['heldout']['psnr']:.2f} dB, mask IoU "
                f"{metrics['heldout']['mask_iou']:.3f}")
    typer.echo(msg)


@app.command("evaluate")
@handle_errors
def evaluate_command(
    mesh: Path = typer.Argument(..., help="Reconstructed mesh."),
    gt: Path = typer.Option(None, "--gt", help="Ground-truth mesh (same world units)."),
    data: Path = typer.Option(None, "--data", help="Dataset folder: also score the held-out views."),
    checkpoint: Path = typer.Option(None, help="IDR checkpoint (or its folder) for PSNR on --data; "
                                    "without it the mask IoU comes from rendering MESH."),
    holdout_every: int = typer.Option(8, help="Held-out views of --data: 0, K, 2K, ..."),
    points: int = typer.Option(100_000, help="Surface samples per mesh."),
    threshold: float = typer.Option(None, help="F-score distance (default 1% of the gt bounding-box "
                                    "diagonal)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the metrics to this JSON file."),
    arch: str = typer.Option(None, help="Taichi backend: auto, cpu, cuda or vulkan."),
) -> None:
    """Compare a mesh with the ground truth (Chamfer, normal consistency, F-score); with --data, PSNR and
    mask IoU on held-out views."""
    from taichi_dr.core.mesh import load_mesh

    if gt is None and data is None:
        raise CLIError("give --gt GT_MESH and/or --data DATASET")
    if not 100 <= points <= MAX_POINTS:
        raise CLIError(f"--points: expected 100 to {MAX_POINTS} surface samples per mesh, got {points}")
    if json_out is not None and not Path(json_out).parent.is_dir():
        raise CLIError(f"--json: the folder {str(Path(json_out).parent)!r} does not exist")
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise CLIError(f"--threshold: the F-score distance must be a number > 0, got {threshold}")
    if checkpoint is not None and data is None:
        raise CLIError("--checkpoint scores the held-out views of --data; give --data DATASET too")
    if checkpoint is not None:
        read_idr_checkpoint(checkpoint, "--checkpoint")
    pred = load_mesh(mesh)
    result: dict = {"mesh": str(mesh)}
    if gt is not None:
        result.update(mesh_metrics(pred, load_mesh(gt), points, threshold))
    if data is not None:
        init_runtime(arch)
        _, test = _load_data(data, holdout_every, 1.5)
        if test is None:
            raise CLIError("--holdout-every 0 leaves no held-out view to score")
        result["heldout"] = _score_views(pred, test, checkpoint)
    text = json.dumps(result, indent=1, default=float)
    if json_out is not None:
        Path(json_out).write_text(text + "\n")
    typer.echo(text)


def _score_views(mesh, test, checkpoint) -> dict:
    from taichi_dr.core import runtime
    from taichi_dr.pipelines.idr import image_metrics, load_model, render_views

    if checkpoint is not None:
        from taichi_dr.pipelines.checkpoint import CheckpointError

        try:
            model, config = load_model(checkpoint)
        except CheckpointError as e:  # e.g. weights that do not fit the networks its config describes
            raise CLIError(f"--checkpoint: {e}") from None
        rendered = render_views(model, test.cameras.to(device=runtime.device()), config.tracer)
        return image_metrics(rendered, test.images, test.masks)
    # Mask IoU from the mesh itself: bring it into the normalised frame and rasterise it (hard mode).
    from taichi_dr.raster import RasterSettings
    from taichi_dr.raster.renderer import render_mesh

    s = test.scale_mat.to(torch.float64)
    verts = (mesh.verts.double() - s[:3, 3]) @ torch.linalg.inv(s[:3, :3]).T
    normalised = mesh.with_verts(verts.float())
    ious = []
    for i in range(len(test)):
        r = render_mesh(normalised, test.cameras[i], None, RasterSettings(mode="hard", far=1000.0),
                        outputs=())
        p, m = r.alpha[0] > 0.5, test.masks[i]
        ious.append(float((p & m).sum()) / max(1, int((p | m).sum())))
    return dict(mask_iou=float(np.mean(ious)), mask_iou_per_view=ious,
                note="PSNR needs --checkpoint (the mesh has no colours)")


@app.command("make-dataset")
@handle_errors
def make_dataset_command(
    mesh: Path = typer.Argument(..., help="Mesh to render (.obj with texture, .ply, .glb, .off)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (IDR layout)."),
    views: int = typer.Option(32, "--views", "-n", help="Number of views (spread over a sphere)."),
    size: int = typer.Option(200, "--size", "-s", help="Image size in pixels (square)."),
    fov: float = typer.Option(30.0, help="Full horizontal field of view in degrees."),
    sigma: float = typer.Option(1e-6, help="Soft rasterizer sharpness (small = crisp edges)."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out folder."),
    arch: str = typer.Option(None, help="Taichi backend: auto, cpu, cuda or vulkan."),
) -> None:
    """Render MESH into an IDR dataset (image/, mask/, cameras.npz) plus gt_mesh.ply, in the mesh's units."""
    from dataclasses import replace

    from taichi_dr.core.camera import Cameras
    from taichi_dr.core.mesh import load_mesh, save_mesh
    from taichi_dr.data.datasets import write_idr
    from taichi_dr.raster import RasterSettings
    from taichi_dr.raster.renderer import render_mesh
    from taichi_dr.raster.shading import Lights

    if views < 1 or not 16 <= size <= 4096:
        raise CLIError(f"--views must be >= 1 and --size in [16, 4096], got {views} and {size}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise CLIError(f"--sigma: must be a number > 0, got {sigma}")
    if not 0 < fov < 180:
        raise CLIError(f"--fov: expected degrees in (0, 180), got {fov}")
    # All views are held in memory (RGB float and mask) until they are written.
    need, free = views * size * size * 13, available_memory_bytes(torch.device("cpu"))
    if free is not None and need > free // 2:
        raise CLIError(f"--views {views} at --size {size}: the images need about {need / 2**30:.1f} GiB but "
                       f"{free / 2**30:.1f} GiB is free; use fewer or smaller views")
    loaded = load_mesh(mesh)
    prepare_out_dir(out, overwrite=overwrite,
                    stale=("image/*.png", "mask/*.png", "cameras.npz", "gt_mesh.ply"))
    init_runtime(arch)
    # Normalised frame: the object fills a sphere of radius 0.8 (inside IDR's unit bounding sphere).
    normalised, centre, scale = loaded.normalized()
    radius = 0.8
    normalised = normalised.with_verts(normalised.verts * radius)
    s = np.eye(4)
    s[:3, :3] *= 1.0 / (scale * radius)
    s[:3, 3] = centre.double().cpu().numpy()
    # Fibonacci sphere of view directions; distance so the object spans ~80% of the image.
    i = np.arange(views) + 0.5
    y = 1 - 2 * i / views
    phi = i * math.pi * (3 - math.sqrt(5))
    elevation = np.degrees(np.arcsin(y))
    azimuth = np.degrees(phi) % 360
    distance = radius / math.sin(math.atan(0.8 * math.tan(math.radians(fov) / 2)))
    cams = Cameras.from_spherical(torch.full((views,), distance, dtype=torch.float64),
                                  torch.from_numpy(elevation), torch.from_numpy(azimuth), fov=fov,
                                  image_size=(size, size), convention="opencv").to(dtype=torch.float32)
    from taichi_dr.core import runtime

    dev = runtime.device()
    settings = RasterSettings(sigma=sigma, far=1000.0)
    images, masks = [], []
    for start in range(0, views, 8):
        r = render_mesh(normalised.to(device=dev), cams[start:start + 8].to(device=dev),
                        Lights.default(device=dev), settings, outputs=("rgb",))
        rgb = r.rgb if r.rgb is not None else r.alpha[..., None].expand(-1, -1, -1, 3)
        images.append((rgb * r.alpha[..., None]).clamp(0, 1).cpu())
        masks.append((r.alpha > 0.5).cpu())
    masks = torch.cat(masks)
    if not bool(masks.flatten(1).any(1).all()):
        raise CLIError(f"MESH {str(mesh)!r}: some views see nothing (degenerate mesh?)")
    write_idr(out, torch.cat(images), masks, cams, s, overwrite=True)
    gt = replace(loaded, vert_colors=None, face_colors=None, uvs=None, face_uvs_idx=None, texture=None)
    save_mesh(gt, out / "gt_mesh.ply")
    typer.echo(f"Wrote {views} views ({size}x{size}), cameras.npz and gt_mesh.ply to {out}")
