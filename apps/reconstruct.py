"""``tdr reconstruct``, ``tdr evaluate``: multi-view surface reconstruction (IDR, UNISURF, NeRF).

* ``reconstruct DATA --out DIR [--method idr|unisurf|nerf]``: trains a neural field on a dataset folder (IDR/NeuS
  layout or NeRF-synthetic): IDR (neural SDF by sphere tracing; needs masks), UNISURF (occupancy as alpha) or
  NeRF (volume rendering), the latter two from RGB alone (``--masks`` adds an opacity loss). Then it writes
  ``mesh.ply`` (marching cubes of the method's surface, in the dataset's world coordinates), renders of the
  held-out views (colour, normals, depth) and ``metrics.json``. Training runs on the shared engine
  (:mod:`taichi_dr.pipelines.engine`): ``checkpoint.pt`` every ``--checkpoint-every`` iterations,
  ``metrics.jsonl`` (one row per iteration) and ``config.json`` in the run folder; Ctrl-C or SIGTERM saves at
  the current iteration and prints the ``--resume`` command (exit 130/143), and ``--resume`` continues
  bitwise; progress is a bar on a terminal and plain lines otherwise. Options that only some methods have
  default to None here, so each method's own default applies, and are refused for the other methods.
* ``evaluate MESH --gt GT``: Chamfer distance, normal consistency and F-score between two meshes; with
  ``--data`` (and ``--checkpoint`` of any of the three methods), PSNR and mask IoU on the held-out views.

(``tdr make-dataset``, which renders datasets with known geometry, lives in :mod:`apps.make_dataset`.)

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

from apps.command import current_run, tdr_command
from apps.common import (
    CLIError,
    available_memory_bytes,
    choice,
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
         "validation/*.png", "config.toml")


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


def _depth_image(depth: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Ray distances (H, W) where ``mask`` -> grey uint8, near white to far dark over the view's own range,
    black where there is no surface."""
    img = torch.zeros_like(depth)
    if bool(mask.any()):
        near, far = float(depth[mask].min()), float(depth[mask].max())
        img = torch.where(mask, 1.0 - 0.8 * (depth - near) / max(far - near, 1e-8), img)
    return to_uint8(img[..., None].expand(*img.shape, 3))


def _write_views(folder: Path, rendered: dict, images: torch.Tensor, names) -> None:
    """Per view: ``<name>_rgb.png`` (render | ground truth), ``<name>_normals.png`` and ``<name>_depth.png``
    (of the surface the method finds: IDR's and UNISURF's surface, NeRF's expected depth where opaque)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        stem = Path(name).stem
        save_png(folder / f"{stem}_rgb.png", hstack([to_uint8(rendered["rgb"][i]), to_uint8(images[i])]))
        save_png(folder / f"{stem}_normals.png", _normals_image(rendered["normals"][i], rendered["mask"][i]))
        save_png(folder / f"{stem}_depth.png", _depth_image(rendered["depth"][i], rendered["mask"][i]))


def _load_data(data: Path, holdout_every: int, scene_radius: float):
    from taichi_dr.data.datasets import load_dataset, split_holdout

    if not Path(data).exists():
        raise CLIError(f"DATA {str(data)!r} does not exist")
    if holdout_every < 0 or holdout_every == 1:
        raise CLIError(f"--holdout-every: expected 0 (no held-out views) or K >= 2 (views 0, K, 2K, ... held "
                       f"out), got {holdout_every}")
    kwargs = {"scene_radius": scene_radius} if (Path(data) / "transforms_train.json").is_file() else {}
    return split_holdout(load_dataset(data, **kwargs), holdout_every)


# Surface samples per mesh for evaluate: ~150 bytes each with the KD-trees, so 10 M is ~3 GB for two meshes.
MAX_POINTS = 10_000_000
# Memory of one training ray, per unit of network size (geometry depth x width + colour depth x width +
# feature size): measured 75 KB per ray at the default sizes on CPU (peak RSS at --rays 256 vs 2048), i.e.
# ~17 bytes per unit; 20 leaves some room.
RAY_BYTES_PER_UNIT = 20


def ray_units(config) -> int:
    """Network size times points per ray that keep a graph for the backward pass, the unit of a ray's memory:
    IDR differentiates about one surface point per ray; UNISURF every sample (with its normal's graph); NeRF
    every coarse and fine sample (no second derivative, counted at a third)."""
    if hasattr(config, "n_coarse"):      # NeRF
        per_sample = 2 * config.depth * config.width + 2 * config.colour_width
        return max(1, (2 * config.n_coarse + config.n_fine) * per_sample // 3)
    units = (config.geometry_depth * config.geometry_width + config.rendering_depth * config.rendering_width
             + config.feature_dim)
    if hasattr(config, "interval"):      # UNISURF
        return units * (config.interval.n_interval + config.interval.n_free)
    return units


def check_rays(rays: int, train, config, device: torch.device) -> None:
    """Refuse a ray batch larger than the training pixels, or than memory holds (it would run for hours, or
    until the machine swaps, before the first step ends)."""
    n, (h, w) = len(train), train.image_size
    pixels = n * h * w
    if rays > pixels:
        raise CLIError(f"--rays {rays}: more than the {pixels} pixels of the {n} training views "
                       f"({w}x{h}); use at most {pixels}")
    units = ray_units(config)
    need = rays * units * RAY_BYTES_PER_UNIT
    free = available_memory_bytes(device)
    if free is not None and need > free:
        most = max(1, free // (units * RAY_BYTES_PER_UNIT))
        raise CLIError(f"--rays {rays}: a batch needs about {need / 2**30:.1f} GiB with these network sizes but "
                       f"{free / 2**30:.1f} GiB is free on {device.type}; use at most about {most}")


def read_field_checkpoint(path: Path, option: str, method: str | None = None) -> dict:
    """The engine checkpoint ``tdr reconstruct`` wrote at ``path`` (a file or its folder), read with
    ``weights_only=True`` and checked to be one of a reconstruction method (``method`` when given: the run
    being resumed must be of the method asked for).

    Anything else (a text file, a corrupt or truncated save, a checkpoint of another method such as
    ``tdr fit-mesh``'s, one of another format version) gives a one-line CLIError naming ``option`` and the file.
    """
    from taichi_dr.pipelines.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
    from taichi_dr.pipelines.reconstruction import FIELD_METHODS

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    try:
        payload = load_checkpoint(path)
    except CheckpointError as e:
        raise CLIError(f"{option}: {e}") from None
    saved = payload.get("method")
    if saved not in FIELD_METHODS:
        raise CLIError(f"{option}: {str(path)!r} is a checkpoint of {saved!r}, not of tdr reconstruct "
                       f"({', '.join(FIELD_METHODS)})")
    if method is not None and saved != method:
        raise CLIError(f"{option}: {str(path)!r} is a checkpoint of --method {saved}, not {method}; give "
                       f"--method {saved} to continue it")
    module = method_module(saved)
    try:
        getattr(module, METHOD_CLASSES[saved][1]).from_dict(payload["config"]["method_config"])
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


# The options of each method, by config field, for error messages (the library's field names -> options).
IDR_OPTIONS = {"iterations": "--iterations", "rays_per_batch": "--rays", "lr": "--lr",
               "geometry_depth": "--depth", "geometry_width": "--width", "geometry_frequencies": "--frequencies",
               "feature_dim": "--feature-dim", "rendering_depth": "--render-depth",
               "rendering_width": "--render-width", "checkpoint_every": "--checkpoint-every",
               "validate_every": "--validate-every", "seed": "--seed", "grad_clip": "--grad-clip"}
UNISURF_OPTIONS = {**IDR_OPTIONS, "bound_radius": "--bound-radius", "background": "--background",
                   "smooth_weight": "--smooth-weight", "n_interval": "--samples", "n_free": "--free-samples",
                   "free_after": "--free-after", "start": "--interval-start", "end": "--interval-end",
                   "decay": "--interval-decay", "n_steps": "--search-steps"}
GRID_OPTIONS = {"enabled": "--occupancy-grid", "resolution": "--grid-resolution"}
NERF_OPTIONS = {**{k: v for k, v in IDR_OPTIONS.items() if not k.startswith(("geometry_", "rendering_", "feature"))},
                "depth": "--depth", "width": "--width", "frequencies": "--frequencies",
                "colour_width": "--render-width", "n_coarse": "--coarse-samples", "n_fine": "--fine-samples",
                "density_level": "--density-level", "bound_radius": "--bound-radius", "background": "--background"}
METHODS = ("idr", "unisurf", "nerf")
# Each method's engine Method and settings classes, in its module (taichi_dr.pipelines.<method>).
METHOD_CLASSES = {"idr": ("IDRMethod", "IDRConfig"), "unisurf": ("UnisurfMethod", "UnisurfConfig"),
                  "nerf": ("NeRFMethod", "NeRFConfig")}
ENCODING_OPTIONS = {"kind": "--encoding", "n_levels": "--hash-levels", "log2_table_size": "--hash-table-size",
                    "finest_resolution": "--hash-finest", "table_lr": "--hash-lr"}
# The defaults with --encoding hashgrid where not given (option parameter -> value): small MLPs on the grid's
# features, as instant-ngp and NeuS2 (one or two hidden layers of 64) use; 2^16 table entries per level, not
# instant-ngp's 2^19, sized for CPUs (on 2 cores 2^19 doubled an IDR step on DTU, 0.40 s against 0.19 s: the
# dense table gradient and optimiser state are 8x larger); a finest resolution of 512 over the bounding cube,
# not instant-ngp's 2048 (made for its 800-pixel views): the images here put 200 (Spot 200x200) to 500 (DTU
# 400x300) pixels across the unit cube, and levels much finer than that fit noise (IDR on Spot, 1500
# iterations: Chamfer 0.90% of the diagonal, held-out PSNR 23.0 dB with 512; see docs/benchmarks.md); and the
# networks' learning rate (HASHGRID_LR).
HASHGRID_DEFAULTS = {"depth": 2, "width": 64, "feature_dim": 32, "render_depth": 2, "render_width": 64,
                     "hash_table_size": 16, "hash_finest": 512}
# Measured on DTU scan 24 with IDR, 500 iterations (first held-out view): 5e-4 (the frequency networks' rate)
# trains the small colour network too slowly (PSNR 14.9 dB, mask IoU 0.95), 1e-2 (instant-ngp's) was unstable
# (14.4 dB, IoU 0.83), 5e-3 reached 16.0 dB and IoU 0.98.
HASHGRID_LR = {"idr": 5e-3, "unisurf": 5e-3, "nerf": 5e-3}
# Options that only some methods have: option parameter -> the methods that take it.
METHOD_ONLY = {"learn_cameras": ("idr",), "feature_dim": ("idr", "unisurf"), "bound_radius": ("unisurf", "nerf"),
               "background": ("unisurf", "nerf"), "samples": ("unisurf",), "free_samples": ("unisurf",),
               "free_after": ("unisurf",), "search_steps": ("unisurf",), "interval_start": ("unisurf",),
               "interval_end": ("unisurf",), "interval_decay": ("unisurf",), "smooth_weight": ("unisurf",),
               "coarse_samples": ("nerf",), "fine_samples": ("nerf",), "density_level": ("nerf",),
               "occupancy_grid": ("unisurf", "nerf"), "grid_resolution": ("unisurf", "nerf")}


def build_config(method: str, given: dict, *, masks: bool, background: float):
    """The method's config from the command's options (``given``: parameter -> value, None where not given, so
    the method's own default applies); CLIError naming the option for a bad value."""
    from taichi_dr.implicit.occupancy import SurfaceSearchSettings
    from taichi_dr.implicit.occupancy_grid import OccupancyGridSettings
    from taichi_dr.implicit.sampling import IntervalSettings
    from taichi_dr.nets.encodings import EncodingSettings
    from taichi_dr.pipelines.idr import IDRConfig
    from taichi_dr.pipelines.nerf import NeRFConfig
    from taichi_dr.pipelines.unisurf import UnisurfConfig

    def pick(**fields):
        return {k: v for k, v in fields.items() if v is not None}

    def grid_settings(g):
        try:
            return OccupancyGridSettings(**pick(enabled=g["occupancy_grid"], resolution=g["grid_resolution"]))
        except (ValueError, TypeError) as e:
            raise settings_error(e, "OccupancyGridSettings", GRID_OPTIONS) from None

    g = dict(given)
    if g["encoding"] == "hashgrid":
        # The grid holds the detail, so the networks can be small (instant-ngp, NeuS2); what is given wins.
        for name, value in {**HASHGRID_DEFAULTS, "lr": HASHGRID_LR[method]}.items():
            if g.get(name) is None:
                g[name] = value
    try:
        encoding = EncodingSettings(kind=g["encoding"], **pick(n_levels=g["hash_levels"],
                                                               log2_table_size=g["hash_table_size"],
                                                               finest_resolution=g["hash_finest"],
                                                               table_lr=g["hash_lr"]))
    except (ValueError, TypeError) as e:
        raise settings_error(e, "EncodingSettings", ENCODING_OPTIONS) from None
    common = pick(iterations=g["iterations"], rays_per_batch=g["rays"], lr=g["lr"],
                  checkpoint_every=g["checkpoint_every"], validate_every=g["validate_every"], seed=g["seed"],
                  grad_clip=g["grad_clip"] or None)
    common["encoding"] = encoding
    depth, width, frequencies = g["depth"], g["width"], g["frequencies"]
    if method == "nerf":
        skip = None if depth is None else ((depth // 2,) if depth >= 2 and encoding.kind == "frequency" else ())
        fields = pick(depth=depth, width=width, frequencies=frequencies, skip_in=skip, colour_width=g["render_width"],
                      n_coarse=g["coarse_samples"], n_fine=g["fine_samples"], density_level=g["density_level"],
                      bound_radius=g["bound_radius"])
        owner, options, cls = "NeRFConfig", NERF_OPTIONS, NeRFConfig
        fields.update(background=background, use_masks=masks, occupancy_grid=grid_settings(g))
    else:
        d = 8 if depth is None else depth
        w = 256 if width is None else width
        f = 6 if frequencies is None else frequencies
        skip = (d // 2,) if d >= 2 and w > 3 * (1 + 2 * f) and encoding.kind == "frequency" else ()
        fields = pick(geometry_depth=depth, geometry_width=width, geometry_frequencies=frequencies,
                      feature_dim=g["feature_dim"], rendering_depth=g["render_depth"],
                      rendering_width=g["render_width"])
        fields["geometry_skip_in"] = skip
        if method == "idr":
            owner, options, cls = "IDRConfig", IDR_OPTIONS, IDRConfig
            fields["learn_cameras"] = bool(g["learn_cameras"])
        else:
            owner, options, cls = "UnisurfConfig", UNISURF_OPTIONS, UnisurfConfig
            try:
                search = SurfaceSearchSettings(**pick(n_steps=g["search_steps"]))
                interval = IntervalSettings(**pick(n_interval=g["samples"], n_free=g["free_samples"],
                                                   free_after=g["free_after"], start=g["interval_start"],
                                                   end=g["interval_end"], decay=g["interval_decay"]))
            except (ValueError, TypeError) as e:
                name = "SurfaceSearchSettings" if "SurfaceSearch" in str(e) else "IntervalSettings"
                raise settings_error(e, name, UNISURF_OPTIONS) from None
            grid = grid_settings(g)
            fields.update(pick(bound_radius=g["bound_radius"], smooth_weight=g["smooth_weight"]), search=search,
                          interval=interval, occupancy_grid=grid, background=background, use_masks=masks)
    try:
        return cls(**common, **fields)
    except (ValueError, TypeError) as e:
        raise settings_error(e, owner, options) from None


def method_module(method: str):
    import importlib

    from taichi_dr.pipelines.reconstruction import FIELD_METHODS

    return importlib.import_module(FIELD_METHODS[method])


@app.command("reconstruct")
@tdr_command("reconstruct", summary_table=True)
def reconstruct_command(
    data: Path = typer.Argument(..., help="Dataset folder: IDR/NeuS layout (image/, mask/ if any, cameras.npz) or "
                                "NeRF-synthetic (transforms_train.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (empty or new, unless --resume)."),
    method: str = typer.Option("idr", help="idr (neural SDF by sphere tracing; needs masks), unisurf (occupancy "
                               "with occupancy as alpha; RGB alone) or nerf (volume rendering; RGB alone)."),
    masks: bool = typer.Option(None, "--masks/--no-masks", help="Train with the object masks (default: only if "
                               "the method needs them: idr). unisurf/nerf use them for an opacity loss."),
    iterations: int = typer.Option(2000, help="Training iterations."),
    rays: int = typer.Option(1024, "--rays", help="Rays per batch (drawn over all training views)."),
    lr: float = typer.Option(None, help="Adam learning rate of the networks (default 5e-4, 5e-3 with --encoding "
                             "hashgrid; idr/unisurf: halved at 50% and 75% of training; nerf: decays to 0.1x)."),
    depth: int = typer.Option(None, help="Geometry (nerf: trunk) MLP hidden layers (default 8; skip connection "
                              "into depth // 2)."),
    width: int = typer.Option(None, help="Geometry (nerf: trunk) MLP width (default 256)."),
    encoding: str = typer.Option("frequency", help="Encoding of positions: frequency (the paper's) or hashgrid "
                                 "(instant-ngp's multiresolution hash grid, with small networks by default: "
                                 "2 x 64 layers, 32 features; minutes instead of hours)."),
    frequencies: int = typer.Option(None, help="Positional-encoding frequencies of positions (default 6; nerf 10; "
                                    "with --encoding frequency)."),
    hash_levels: int = typer.Option(None, help="hashgrid: resolution levels (default 16)."),
    hash_table_size: int = typer.Option(None, help="hashgrid: log2 of the entries per level (default 16, sized "
                                        "for CPUs; instant-ngp's is 19)."),
    hash_finest: int = typer.Option(None, help="hashgrid: finest resolution over the bounding cube (default 512, "
                                    "for images of a few hundred pixels; instant-ngp's is 2048)."),
    hash_lr: float = typer.Option(None, help="hashgrid: learning rate of the hash tables (default 1e-2)."),
    feature_dim: int = typer.Option(None, help="idr/unisurf: geometry feature size passed to the colour network "
                                    "(default 256)."),
    render_depth: int = typer.Option(None, help="idr/unisurf: colour MLP hidden layers (default 4)."),
    render_width: int = typer.Option(None, help="Colour MLP width (default: idr 512, unisurf 256, nerf 128)."),
    learn_cameras: bool = typer.Option(False, help="idr: refine the camera poses too."),
    bound_radius: float = typer.Option(None, help="unisurf/nerf: radius of the sphere rays are rendered in; what "
                                       "lies beyond is --background (default 4.0, UNISURF's)."),
    background: float = typer.Option(None, help="unisurf/nerf: grey level beyond the bounding sphere, 0-1 "
                                     "(default: 1 for NeRF-synthetic data, composited on white; else 0)."),
    samples: int = typer.Option(None, help="unisurf: samples in the interval around the surface (default 64)."),
    free_samples: int = typer.Option(None, help="unisurf: free-space samples in front of it (default 32)."),
    free_after: int = typer.Option(None, help="unisurf: iteration from which free-space samples are added "
                                   "(default 5000)."),
    search_steps: int = typer.Option(None, help="unisurf: uniform steps of the surface search (default 256)."),
    occupancy_grid: bool = typer.Option(None, "--occupancy-grid/--no-occupancy-grid", help="unisurf/nerf: skip "
                                        "empty space with an occupancy grid updated during training (unisurf: "
                                        "the surface search, nerf: the coarse samples, only in occupied cells; "
                                        "default: on for unisurf, off for nerf)."),
    grid_resolution: int = typer.Option(None, help="unisurf/nerf: cells per axis of the occupancy grid over the "
                                        "bounding sphere's cube (default 128)."),
    interval_start: float = typer.Option(None, help="unisurf: interval half-width at the start (default 2.0)."),
    interval_end: float = typer.Option(None, help="unisurf: smallest interval half-width (default 0.1)."),
    interval_decay: float = typer.Option(None, help="unisurf: half-width start*exp(-decay*it) (default 1.5e-5)."),
    smooth_weight: float = typer.Option(None, help="unisurf: weight of the surface smoothness loss (default 0.005)."),
    coarse_samples: int = typer.Option(None, help="nerf: stratified samples per ray (default 64)."),
    fine_samples: int = typer.Option(None, help="nerf: importance samples per ray (default 128)."),
    density_level: float = typer.Option(None, help="nerf: density of the meshed surface (default: measured, the "
                                        "median density where rendered rays reach transmittance 1/2)."),
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
    viewer: bool = typer.Option(False, "--viewer", help="Watch the training in a live window (GGUI)."),
    viewer_frames: Path = typer.Option(None, "--viewer-frames", help="Write the viewer's frames as PNGs in "
                                       "this folder (headless; no window needed)."),
) -> None:
    """Reconstruct a surface from posed images: IDR (masks), UNISURF or NeRF (RGB alone).

    Example: tdr reconstruct runs/spot_data --method idr --iterations 2000 --out runs/spot_idr
    """
    given = dict(locals())
    from apps.viewing import viewer_callbacks
    from taichi_dr.core.mesh import save_mesh
    from taichi_dr.implicit.meshing import extract_mesh
    from taichi_dr.pipelines import Trainer
    from taichi_dr.pipelines.views import image_metrics, resize_views, scale_cameras, validation_callback

    method = choice("--method", method, METHODS)
    for name in METHOD_ONLY:
        if given[name] not in (None, False) and method not in METHOD_ONLY[name]:
            option = "--" + name.replace("_", "-")
            raise CLIError(f"{option}: only for --method {' or '.join(METHOD_ONLY[name])}, not {method}")
    encoding = choice("--encoding", encoding, ("frequency", "hashgrid"))
    hash_options = ("hash_levels", "hash_table_size", "hash_finest", "hash_lr")
    if encoding == "hashgrid" and frequencies is not None:
        raise CLIError("--frequencies: only with --encoding frequency (the hash grid has no frequencies)")
    for name in hash_options:
        if encoding == "frequency" and given[name] is not None:
            raise CLIError(f"--{name.replace('_', '-')}: only with --encoding hashgrid")
    given["encoding"] = encoding
    use_masks = (method == "idr") if masks is None else masks
    if method == "idr" and not use_masks:
        raise CLIError("--no-masks: IDR needs object masks (its mask loss); use --method unisurf or nerf to "
                       "reconstruct from RGB alone")
    for name, value, lo in (("--iterations", iterations, 1), ("--rays", rays, 1), ("--depth", depth, 1),
                            ("--width", width, 1), ("--resolution", resolution, 8),
                            ("--frequencies", frequencies, 0), ("--feature-dim", feature_dim, 1),
                            ("--render-depth", render_depth, 1), ("--render-width", render_width, 1),
                            ("--checkpoint-every", checkpoint_every, 0), ("--validate-every", validate_every, 0)):
        if value is not None and value < lo:
            raise CLIError(f"{name}: must be >= {lo}, got {value}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise CLIError(f"--lr: must be a number > 0, got {lr}")
    if not (math.isfinite(scene_radius) and scene_radius > 0):
        raise CLIError(f"--scene-radius: must be a number > 0, got {scene_radius}")
    if background is not None and not (math.isfinite(background) and 0 <= background <= 1):
        raise CLIError(f"--background: expected a grey level in [0, 1], got {background}")
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
    nerf_synthetic = (Path(data) / "transforms_train.json").is_file()
    background = (1.0 if nerf_synthetic else 0.0) if background is None else background
    config = build_config(method, given, masks=use_masks, background=background)
    saved_config = None   # checked now, before the data is loaded; the Trainer loads the checkpoint itself
    if resume:
        saved = read_field_checkpoint(Path(out) / "checkpoint.pt", "--resume", method)
        if saved["iteration"] > iterations:
            raise CLIError(f"--iterations {iterations}: the checkpoint in {str(out)!r} is already at iteration "
                           f"{saved['iteration']}; give at least that many")
        saved_config = saved["config"]["method_config"]
        del saved
    module = method_module(method)
    if saved_config is not None:
        try:
            module.check_network_settings(saved_config, config)
        except ValueError as e:
            raise CLIError(f"--resume: {e}") from None
    train, test = _load_data(data, holdout_every, scene_radius)
    if use_masks and not train.has_masks:
        raise CLIError(f"DATA {str(data)!r} has no object masks (IDR layout: a mask/ folder; NeRF-synthetic: RGBA "
                       "images)" + ("; IDR needs them" if method == "idr" else "; drop --masks"))
    if test is not None and min(test.image_size) * render_scale < min(8, *test.image_size):
        h, w = test.image_size
        raise CLIError(f"--render-scale {render_scale}: the held-out renders of the {w}x{h} images would be "
                       f"{max(1, round(w * render_scale))}x{max(1, round(h * render_scale))} pixels; use at "
                       f"least {min(8, h, w) / min(h, w):.3g}")
    used = init_runtime(arch)
    from taichi_dr.core import runtime

    check_rays(rays, train, config, runtime.device())
    prepare_out_dir(out, overwrite=overwrite, resume=resume, stale=STALE)

    hint = resume_command_line(data, out, {k: v for k, v in given.items() if k not in ("data", "out", "resume")})
    report = current_run()
    callbacks = viewer_callbacks(viewer, viewer_frames, title=f"tdr reconstruct --method {method}")
    if validate_every and test is not None:
        callbacks.append(validation_callback(test.subset([0]), validate_every, render_scale, out / "validation"))
    torch.manual_seed(config.seed)   # the networks' initial weights (a resumed run then loads its own)
    trained = getattr(module, METHOD_CLASSES[method][0])(train, config)
    trainer = Trainer(trained, config.train_config(progress=report.progress_mode), out_dir=out, callbacks=callbacks,
                      resume=resume)
    result = run_training(trainer, resume_hint=hint)
    train_time = trainer.state.elapsed_s   # training seconds over every run of it (resumed ones too)
    model, history = trained.model.eval(), result.history
    metrics = dict(method=method, data=str(data), arch=used, iterations=iterations, train_seconds=train_time,
                   train_views=len(train), heldout_views=len(test) if test else 0, masks=use_masks,
                   config=config.to_dict(), skipped_steps=result.skipped, final=dict(history[-1]) if history else {})
    t1 = time.perf_counter()
    target = module.mesh_field(model, config)
    try:
        mesh, meshing = extract_mesh(target["field"], resolution, target["bound"], level=target["level"],
                                     inside=target["inside"], scale_mat=train.scale_mat,
                                     progress=report.progress, return_stats=True)
    except ValueError as e:   # no surface in the cube: say so, keep the run's other outputs
        mesh, meshing = None, None
        typer.echo(f"Warning: no mesh written: {e}", err=True)
    if mesh is not None:
        save_mesh(mesh, out / "mesh.ply")
        metrics["mesh"] = dict(verts=mesh.num_verts, faces=mesh.num_faces, resolution=resolution,
                               points_evaluated=meshing["points_evaluated"], dense_points=meshing["dense_points"],
                               seconds=time.perf_counter() - t1)
    if test is not None:
        t2 = time.perf_counter()
        cams = scale_cameras(test.cameras, render_scale)
        rendered = module.render_trained(model, cams, config)
        images, test_masks = resize_views(test, cams.image_size)
        _write_views(out / "heldout", rendered, images, test.names)
        m = image_metrics(rendered, images, test_masks)
        metrics["heldout"] = dict(m, image_size=list(cams.image_size), seconds=time.perf_counter() - t2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float) + "\n")
    # (the last training row is the report's "training" already: not twice)
    report.metrics.update({k: v for k, v in metrics.items() if k not in ("config", "data", "final")})
    report.wrote(out / "mesh.ply", out / "metrics.json", out / "metrics.jsonl", out / "checkpoint.pt",
                 out / "heldout", out / "validation", viewer_frames)
    msg = (f"Wrote {out / 'mesh.ply'} ({mesh.num_faces} faces)" if mesh is not None else "No mesh")
    msg += f" after {iterations} iterations in {train_time:.0f} s"
    if "heldout" in metrics:
        msg += f"; held-out PSNR {metrics['heldout']['psnr']:.2f} dB"
        if "mask_iou" in metrics["heldout"]:
            msg += f", mask IoU {metrics['heldout']['mask_iou']:.3f}"
    report.info(msg)


@app.command("evaluate")
@tdr_command("evaluate")
def evaluate_command(
    mesh: Path = typer.Argument(None, help="Reconstructed mesh (optional with --checkpoint and --data: the views "
                                "are then rendered from the field alone)."),
    gt: Path = typer.Option(None, "--gt", help="Ground-truth mesh (same world units)."),
    data: Path = typer.Option(None, "--data", help="Dataset folder: also score the held-out views."),
    checkpoint: Path = typer.Option(None, help="IDR checkpoint (or its folder) for PSNR on --data; "
                                    "without it the mask IoU comes from rendering MESH."),
    holdout_every: int = typer.Option(8, help="Held-out views of --data: 0, K, 2K, ..."),
    points: int = typer.Option(100_000, help="Surface samples per mesh."),
    threshold: float = typer.Option(None, help="F-score distance (default 1% of the gt bounding-box "
                                    "diagonal)."),
    out: Path = typer.Option(None, "--out", "-o", help="Also write the metrics to this JSON file."),
    arch: str = typer.Option(None, help="Taichi backend: auto, cpu, cuda or vulkan."),
) -> None:
    """Compare a mesh with the ground truth (Chamfer, normal consistency, F-score); with --data, PSNR and
    mask IoU on held-out views. Prints the metrics as JSON (with --json: inside the summary).

    Example: tdr evaluate runs/spot_idr/mesh.ply --gt runs/spot_data/gt_mesh.ply --out runs/spot_idr/eval.json
    """
    from taichi_dr.core.mesh import load_mesh

    if gt is None and data is None:
        raise CLIError("give --gt GT_MESH and/or --data DATASET")
    if not 100 <= points <= MAX_POINTS:
        raise CLIError(f"--points: expected 100 to {MAX_POINTS} surface samples per mesh, got {points}")
    if out is not None and not Path(out).parent.is_dir():
        raise CLIError(f"--out: the folder {str(Path(out).parent)!r} does not exist")
    if out is not None and Path(out).is_dir():
        raise CLIError(f"--out {str(out)!r} is a folder; expected a .json file to write")
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise CLIError(f"--threshold: the F-score distance must be a number > 0, got {threshold}")
    if checkpoint is not None and data is None:
        raise CLIError("--checkpoint scores the held-out views of --data; give --data DATASET too")
    if checkpoint is not None:
        read_field_checkpoint(checkpoint, "--checkpoint")
    if mesh is None and (gt is not None or checkpoint is None):
        raise CLIError("give MESH (the reconstructed mesh) for --gt, or --checkpoint RUN with --data to score the "
                       "held-out views without a mesh")
    pred = load_mesh(mesh) if mesh is not None else None
    result: dict = {"mesh": str(mesh) if mesh is not None else None}
    if gt is not None:
        result.update(mesh_metrics(pred, load_mesh(gt), points, threshold))
    if data is not None:
        init_runtime(arch)
        _, test = _load_data(data, holdout_every, 1.5)
        if test is None:
            raise CLIError("--holdout-every 0 leaves no held-out view to score")
        result["heldout"] = _score_views(pred, test, checkpoint)
    text = json.dumps(result, indent=1, default=float)
    report = current_run()
    report.metrics.update(result)
    if out is not None:
        Path(out).write_text(text + "\n")
        report.wrote(out)
    if not report.json:
        report.info(text)


def _score_views(mesh, test, checkpoint) -> dict:
    from taichi_dr.core import runtime

    if checkpoint is not None:
        from taichi_dr.pipelines.checkpoint import CheckpointError
        from taichi_dr.pipelines.reconstruction import load_trained
        from taichi_dr.pipelines.views import image_metrics

        try:
            trained = load_trained(checkpoint)
        except CheckpointError as e:  # e.g. weights that do not fit the networks its config describes
            raise CLIError(f"--checkpoint: {e}") from None
        rendered = trained.render(test.cameras.to(device=runtime.device()))
        return dict(image_metrics(rendered, test.images, test.masks), method=trained.method)
    if test.masks is None:
        raise CLIError("--data: the held-out views have no masks, and without --checkpoint the mesh can only be "
                       "scored by its mask IoU; give --checkpoint RUN for PSNR")
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
