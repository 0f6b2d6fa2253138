"""``tdr fit-mesh``: deform a template mesh to match target silhouettes (and colours) seen by known cameras.

The optimisation itself is :mod:`taichi_dr.pipelines.mesh_fit`; this module runs it as a job with files:
``mesh.obj``, ``loss_log.csv`` (one row per iteration), ``progress_XXXX.png`` (target | current render for a
few views), ``progress.gif`` and ``checkpoint.pt`` (every ``--checkpoint-every`` iterations, at the end and
on Ctrl-C), from which ``--resume`` continues. :func:`run_fit` is shared with ``tdr demo``.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import shlex
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import typer

from apps.common import (
    EXIT_INTERRUPTED,
    GIF_MAX_FRAMES,
    CLIError,
    command_options,
    handle_errors,
    hstack,
    init_runtime,
    option_errors,
    prepare_out_dir,
    progress_bar,
    save_png,
    settings_error,
    stderr_console,
    to_rgb,
    upscale,
    upscale_factor,
    vstack,
    write_gif,
)

CHECKPOINT = "checkpoint.pt"
LOG = "loss_log.csv"
STALE = ("progress_*.png", "progress.gif", LOG, CHECKPOINT, "mesh.obj", "mesh.mtl", "mesh.png")
CHECKPOINT_VERSION = 1
# FitSettings' default, repeated here so that --help needs no taichi_dr import (tests check they agree).
LAPLACIAN_WEIGHT = 2e-4

# What a resumed run must share with the checkpoint: the problem (targets, cameras) and the parameters'
# meaning (template, its placement, whether colours are learned). Settings such as lr, weights or iters
# may change between runs.
IDENTITY_OPTIONS = {
    "targets": "--targets",
    "cameras": "--cameras",
    "template": "--template",
    "template_scale": "--template-scale",
    "rgb": "--rgb/--no-rgb",
    "parameterization": "--parameterization",
}


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(np.ascontiguousarray(t.detach().cpu().float().numpy()).tobytes())
    return h.hexdigest()[:16]


@dataclass
class FitResult:
    """What :func:`run_fit` returns: the fitted and initial meshes (world coordinates) and metrics."""

    mesh: object
    initial_mesh: object
    initial: dict
    final: dict
    iterations: int
    interrupted: bool = False
    fitter: object = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------------------
# Ctrl-C: finish the current step, then save and stop


class _StopFlag:
    """While active, the first SIGINT only sets ``requested`` (the loop stops after the current step, so
    the checkpoint is consistent); a second one raises KeyboardInterrupt as usual."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals only reach the main thread; KeyboardInterrupt is still handled below
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------------------
# Files


def _read_log(path: Path, upto: int) -> tuple[list[str], list[dict]]:
    """Rows of an existing loss log with ``iter <= upto`` (rows after the checkpoint are dropped)."""
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r.get("iter", "").isdigit() and int(r["iter"]) <= upto]
        return list(reader.fieldnames or []), rows


class _LossLog:
    def __init__(self, path: Path, fields: list[str], rows: list[dict]):
        self.path = path
        self.fields = fields
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
        self.writer.writeheader()
        for r in rows:
            self.writer.writerow(r)
        self.file.flush()

    def write(self, row: dict) -> None:
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def close(self) -> None:
        self.file.close()


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves half a checkpoint


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise CLIError(f"--resume: no checkpoint at {str(path)!r} (start without --resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CLIError(f"--resume: {str(path)!r} is not a readable checkpoint "
                       f"({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CLIError(f"--resume: {str(path)!r} is not a tdr fit-mesh checkpoint of version "
                       f"{CHECKPOINT_VERSION}")
    return state


def check_identity(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume when the checkpoint was made for a different problem or parameterisation."""
    diffs = []
    for key, option in IDENTITY_OPTIONS.items():
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            # {"path", "digest"}: the content decides (the same file may be named another way).
            if a.get("digest") != b.get("digest"):
                what = "content" if a.get("path") == b.get("path") else f"{a.get('path')} -> {b.get('path')}"
                diffs.append(f"{option} ({what})")
        elif a != b:
            diffs.append(f"{option} ({a} -> {b})")
    if diffs:
        raise CLIError(f"--resume: {str(path)!r} was made with different {', '.join(diffs)}; resume with "
                       "the original options, or start a new run in another folder (or with --overwrite)")


@torch.no_grad()
def progress_image(fitter, views: list[int], target_rgb: torch.Tensor | None) -> np.ndarray:
    """Rows of ``target | current render`` for ``views``: (H', W', 3) uint8, upscaled for viewing.

    The target shows its colours over white (or the silhouette in grey); the render is the current mesh
    over white: with learned colours as they are (they already hold the targets' shading), without them
    white and Lambert-shaded under the default lights, so the shape shows.
    """
    from taichi_dr.raster.renderer import render_mesh
    from taichi_dr.raster.shading import Lights

    mesh = fitter.current_mesh()
    views_t = torch.as_tensor(views)
    lights = None if mesh.vert_colors is not None else Lights.default(device=fitter.device)
    out = render_mesh(mesh, fitter.cameras[views_t.to(fitter.device)], lights, fitter.raster,
                      outputs=("rgb",))
    factor = upscale_factor(fitter.cameras.image_size, 128)
    rows = []
    for k, i in enumerate(views):
        sil = fitter.silhouettes[i].cpu()
        if target_rgb is not None:
            tgt = torch.cat([target_rgb[i].cpu(), sil[..., None]], -1)
        else:
            tgt = torch.stack([0.35 * torch.ones_like(sil)] * 3 + [sil], -1)
        rgb = out.rgb[k].cpu() if out.rgb is not None else torch.ones(*sil.shape, 3)
        ren = torch.cat([rgb, out.alpha[k].cpu()[..., None]], -1)
        rows.append(hstack([upscale(to_rgb(tgt), factor), upscale(to_rgb(ren), factor)], gap=4, fill=200))
    return vstack(rows, gap=4, fill=200)


def _progress_views(n: int, k: int = 3) -> list[int]:
    return sorted({int(round(i * n / k)) % n for i in range(min(k, n))})


# ----------------------------------------------------------------------------------------------------------
# The job


def run_fit(out: Path, *, silhouettes: torch.Tensor, cameras, template, settings, identity: dict,
            rgb: torch.Tensor | None = None, learn_rgb: bool = False, template_scale: float = 1.0,
            seed: int = 0, log_every: int = 25, checkpoint_every: int = 100, resume: bool = False,
            resume_hint: str | None = None, console=None) -> FitResult:
    """Fit ``template`` to ``silhouettes (N, H, W)`` seen by ``cameras`` (N); write the job files in ``out``.

    rgb: (N, H, W, 3) target colours, learned as per-vertex colours when ``learn_rgb``.
    identity: what a resumed run must share with the checkpoint (see ``IDENTITY_OPTIONS``).
    On Ctrl-C the checkpoint is saved, ``resume_hint`` printed and ``typer.Exit(130)`` raised.
    """
    from taichi_dr.core.mesh import save_mesh
    from taichi_dr.pipelines.mesh_fit import MeshDeformer, MeshFitter, estimate_bounding_sphere

    console = console or stderr_console()
    ckpt_path = out / CHECKPOINT
    saved = None
    if resume:
        saved = load_checkpoint(ckpt_path)
        check_identity(saved["identity"], identity, ckpt_path)

    torch.manual_seed(seed)
    centre, radius = estimate_bounding_sphere(silhouettes, cameras)
    model = MeshDeformer(template, centre, radius * template_scale, learn_colors=learn_rgb,
                         parameterization=settings.parameterization)
    fitter = MeshFitter(model, silhouettes, cameras, rgb=rgb if learn_rgb else None, settings=settings,
                        seed=seed)
    initial_mesh = fitter.current_mesh()
    if saved is not None:
        fitter.load_state_dict(saved["fitter"])
        initial = saved["initial_metrics"]
    else:
        initial = fitter.evaluate()

    views = _progress_views(fitter.num_views)
    show_rgb = rgb.cpu() if rgb is not None else None
    fields = ["iter", "loss", "neg_iou", "laplacian", "flatten"] + (["rgb"] if learn_rgb else []) \
        + ["iou", "time_s"]
    _, old_rows = _read_log(out / LOG, fitter.iteration)
    log = _LossLog(out / LOG, fields, old_rows)
    elapsed0 = float(old_rows[-1]["time_s"]) if old_rows and old_rows[-1].get("time_s") else 0.0

    def checkpoint_state() -> dict:
        return {"version": CHECKPOINT_VERSION, "identity": identity, "fitter": fitter.state_dict(),
                "initial_metrics": initial, "elapsed_s": elapsed0 + (time.perf_counter() - t0)}

    def snapshot(tag: int) -> None:
        save_png(out / f"progress_{tag:04d}.png", progress_image(fitter, views, show_rgb))

    if fitter.iteration == 0:
        snapshot(0)
    start = fitter.iteration
    total = settings.iters
    stop = _StopFlag()
    t0 = time.perf_counter()
    interrupted = False
    try:
        with stop.installed(), progress_bar(console) as bar:
            task = bar.add_task("fit-mesh", total=max(total, start), completed=start, loss=float("nan"),
                                iou=initial["iou_soft"])
            while fitter.iteration < total:
                terms = fitter.step()
                it = fitter.iteration
                if not all(math.isfinite(v) for v in terms.values()):
                    raise CLIError(f"the loss became non-finite at iteration {it} ({terms}); "
                                   "try a smaller --lr")
                log.write({"iter": it, **terms, "time_s": elapsed0 + time.perf_counter() - t0})
                bar.update(task, completed=it, loss=terms["loss"], iou=terms["iou"])
                if it % log_every == 0 or it == total:
                    log.file.flush()
                    snapshot(it)
                if it % checkpoint_every == 0 and it < total:
                    _save_checkpoint(ckpt_path, checkpoint_state())
                if stop.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
    finally:
        log.close()
    _save_checkpoint(ckpt_path, checkpoint_state())
    if interrupted:
        console.print(f"Interrupted at iteration {fitter.iteration}/{total}; saved {ckpt_path}.",
                      highlight=False)
        if resume_hint:
            console.print(f"Resume with: {resume_hint}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED)

    mesh = fitter.current_mesh()
    save_mesh(mesh, out / "mesh.obj")
    final = fitter.evaluate()
    pngs = sorted(out.glob("progress_*.png"))
    if len(pngs) > GIF_MAX_FRAMES:  # read only the frames the GIF keeps
        pngs = [pngs[i] for i in np.linspace(0, len(pngs) - 1, GIF_MAX_FRAMES).round().astype(int)]
    frames = [np.asarray(_imread(p)) for p in pngs]
    write_gif(out / "progress.gif", frames, fps=8)
    return FitResult(mesh=mesh, initial_mesh=initial_mesh, initial=initial, final=final,
                     iterations=fitter.iteration, fitter=fitter)


def _imread(path: Path):
    import imageio.v3 as iio

    return iio.imread(path)


# ----------------------------------------------------------------------------------------------------------
# The command


def load_problem(targets_path: Path, cameras_path: Path, fov: float, camera_convention: str = "softras"):
    """Targets and cameras, checked against each other (count and image size). ``camera_convention`` says how
    .npy/.csv (distance, elevation, azimuth) rows become cameras (``load_cameras``'s ``convention``)."""
    from taichi_dr.core.camera import load_cameras
    from taichi_dr.data.targets import load_targets

    with option_errors("--targets"):
        targets = load_targets(targets_path)
    with option_errors("--cameras"):
        cameras = load_cameras(cameras_path, image_size=targets.image_size, fov=fov, convention=camera_convention)
    if len(cameras) != targets.num_views:
        raise CLIError(f"--cameras {str(cameras_path)!r} has {len(cameras)} cameras but --targets "
                       f"{str(targets_path)!r} has {targets.num_views} views; they must pair up one to one")
    if tuple(cameras.image_size) != targets.image_size:
        raise CLIError(f"--cameras {str(cameras_path)!r} are for {cameras.image_size[1]}x"
                       f"{cameras.image_size[0]} (WxH) images but the targets are {targets.image_size[1]}x"
                       f"{targets.image_size[0]}")
    return targets, cameras


def load_template(template: Path | None):
    """``(mesh, label)``: the mesh at ``template`` or ``icosphere(level=3)`` (642 vertices, like SoftRas)."""
    from taichi_dr.core.mesh import icosphere, load_mesh

    if template is None:
        return icosphere(level=3), "icosphere(level=3)"
    if not Path(template).is_file():
        raise CLIError(f"--template {str(template)!r} does not exist or is not a file")
    with option_errors("--template"):
        mesh = load_mesh(template)
    if len(mesh.degenerate_faces()) == mesh.num_faces:
        raise CLIError(f"--template {str(template)!r}: every face is degenerate (zero area)")
    # Colours and textures of the template play no part in the fit.
    return type(mesh)(verts=mesh.verts, faces=mesh.faces, name=mesh.name), str(template)


def fit_identity(targets_path, cameras_path, targets, cameras, template_label: str, template_mesh,
                 template_scale: float, rgb: bool, parameterization: str = "tanh") -> dict:
    """What a resumed run must match (``IDENTITY_OPTIONS``): digests of the loaded data, not just paths."""
    identity = {
        "targets": {"path": str(targets_path), "digest": tensor_digest(targets.silhouettes)},
        "cameras": {"path": str(cameras_path), "digest": tensor_digest(cameras.K, cameras.R, cameras.t)},
        "template": {"path": template_label,
                     "digest": tensor_digest(template_mesh.verts, template_mesh.faces.float())},
        "template_scale": float(template_scale),
        "rgb": bool(rgb),
    }
    if parameterization != "tanh":  # absent = tanh, so checkpoints from before the option still resume
        identity["parameterization"] = parameterization
    return identity


def resume_command_line(targets, cameras, out, *, template=None, template_scale=1.0, rgb=False, fov=30.0,
                        iters=300, views_per_step=0, camera_convention="softras",
                        parameterization="tanh") -> str:
    """The ``tdr fit-mesh ... --resume`` command line that continues a run."""
    hint = ["tdr", "fit-mesh", "--targets", str(targets), "--cameras", str(cameras), "--out", str(out)]
    if template is not None:
        hint += ["--template", str(template)]
    if template_scale != 1.0:
        hint += ["--template-scale", str(template_scale)]
    if rgb:
        hint += ["--rgb"]
    if fov != 30.0:
        hint += ["--fov", str(fov)]
    if camera_convention != "softras":
        hint += ["--camera-convention", camera_convention]
    if views_per_step:
        hint += ["--views-per-step", str(views_per_step)]
    if parameterization != "tanh":
        hint += ["--parameterization", parameterization]
    return shlex.join(hint + ["--iters", str(iters), "--resume"])


def print_metrics(result: FitResult) -> None:
    i, f = result.initial, result.final
    typer.echo(f"Silhouette IoU (mean over views): hard {i['iou_hard']:.4f} -> {f['iou_hard']:.4f}, "
               f"soft {i['iou_soft']:.4f} -> {f['iou_soft']:.4f} after {result.iterations} iterations")


@handle_errors
def fit_mesh_command(
    targets: Path = typer.Option(..., help="Folder of PNGs (alpha = silhouette, else greyscale masks; sorted "
                                 "by name) or .npy (N,H,W) / (N,C,H,W) with C = 1 or 4 (RGB + alpha)."),
    cameras: Path = typer.Option(..., help="Cameras: .json ({K,R,t} list, as tdr render writes), IDR "
                                 "cameras.npz, or .npy/.csv rows (distance, elevation, azimuth) with --fov."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (must be empty or new)."),
    template: Path = typer.Option(None, help="Template mesh (default: icosphere level 3, 642 vertices)."),
    template_scale: float = typer.Option(1.0, help="Multiplier of the template radius estimated from the "
                                         "silhouettes."),
    iters: int = typer.Option(600, help="Total number of iterations (with --resume: up to this many)."),
    lr: float = typer.Option(0.01, help="Adam learning rate of the geometry."),
    color_lr: float = typer.Option(0.05, help="Adam learning rate of the colours (with --rgb)."),
    fov: float = typer.Option(30.0, help="Full horizontal field of view in degrees, for .npy/.csv cameras."),
    camera_convention: str = typer.Option("softras", help="How .npy/.csv (distance, elevation, azimuth) rows "
                                          "become cameras: 'softras' (the images SoftRas renders from them; "
                                          "its look_at is mirrored) or 'opencv' (the un-mirrored camera at "
                                          "the same eye). .json/.npz cameras hold K, R, t and ignore it."),
    sigma: float = typer.Option(1e-4, help="Soft rasterizer sharpness at the start of the fit."),
    sigma_final: float = typer.Option(1e-5, help="Sharpness at the last iteration: sigma shrinks geometrically "
                                      "from --sigma to it, so thin parts end up covering pixel centres, not "
                                      "just blurring into them; 0 = keep --sigma."),
    gamma: float = typer.Option(1e-4, help="Soft rasterizer depth temperature."),
    rgb: bool = typer.Option(False, "--rgb/--no-rgb", help="Also learn per-vertex colours (RGBA targets)."),
    rgb_weight: float = typer.Option(1.0, help="Weight of the L1 colour loss with --rgb."),
    laplacian_weight: float = typer.Option(LAPLACIAN_WEIGHT, help="Weight of the scale-free Laplacian "
                                           "(bending) energy; independent of the template's resolution and "
                                           "the object's size."),
    flatten_weight: float = typer.Option(0.0, help="Weight of the mean flatten (fold) loss (SoftRas's 0.0003 "
                                         "on its 642-vertex sphere is 0.58 here; it holds finer templates "
                                         "back)."),
    views_per_step: int = typer.Option(40, help="Views rendered per iteration (random subset); 0 = all."),
    parameterization: str = typer.Option("tanh", help="Vertex displacement map: 'tanh' or 'sigmoid' "
                                         "(SoftRas's demo)."),
    resume: bool = typer.Option(False, help=f"Continue from OUT/{CHECKPOINT}."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out folder (replacing a run)."),
    seed: int = typer.Option(0, help="Random seed (view sampling)."),
    log_every: int = typer.Option(25, help="Write a progress image every N iterations."),
    checkpoint_every: int = typer.Option(100, help="Save a checkpoint every N iterations."),
    arch: str = typer.Option(None, help="Taichi backend: auto, cpu, cuda or vulkan."),
) -> None:
    """Deform a template mesh to match target silhouettes seen by known cameras (SoftRas style)."""
    from taichi_dr.pipelines.mesh_fit import FitSettings

    if resume and overwrite:
        raise CLIError("--resume and --overwrite contradict each other; pass one")
    if iters < 0:
        raise CLIError(f"--iters: expected >= 0, got {iters}")
    for name, v in (("--log-every", log_every), ("--checkpoint-every", checkpoint_every)):
        if v < 1:
            raise CLIError(f"{name}: expected >= 1, got {v}")
    if not (math.isfinite(template_scale) and template_scale > 0):
        raise CLIError(f"--template-scale: expected a number > 0, got {template_scale}")
    if not (math.isfinite(sigma_final) and sigma_final >= 0):
        raise CLIError(f"--sigma-final: expected a number > 0, or 0 to keep --sigma, got {sigma_final}")
    try:
        settings = FitSettings(iters=iters, lr=lr, color_lr=color_lr, sigma=sigma, gamma=gamma,
                               sigma_final=sigma_final or None,
                               laplacian_weight=laplacian_weight, flatten_weight=flatten_weight,
                               rgb_weight=rgb_weight,
                               views_per_step=views_per_step or None, parameterization=parameterization)
    except ValueError as e:
        raise settings_error(e, "FitSettings", command_options(fit_mesh_command)) from None

    from taichi_dr.core.camera import SPHERICAL_CONVENTIONS

    if camera_convention not in SPHERICAL_CONVENTIONS:
        raise CLIError(f"--camera-convention: expected one of {', '.join(SPHERICAL_CONVENTIONS)}, got "
                       f"{camera_convention!r}")
    tgt, cams = load_problem(targets, cameras, fov, camera_convention)
    if rgb and tgt.rgb is None:
        raise CLIError(f"--rgb: the targets {str(targets)!r} have no colours (masks only); use RGBA PNGs or "
                       "(N, 4, H, W) arrays, or drop --rgb")
    template_mesh, template_label = load_template(template)
    prepare_out_dir(out, overwrite=overwrite, resume=resume, stale=STALE)
    init_runtime(arch)

    identity = fit_identity(targets, cameras, tgt, cams, template_label, template_mesh, template_scale, rgb,
                            parameterization)
    hint = resume_command_line(targets, cameras, out, template=template, template_scale=template_scale,
                               rgb=rgb, fov=fov, iters=iters, views_per_step=views_per_step,
                               camera_convention=camera_convention, parameterization=parameterization)
    result = run_fit(out, silhouettes=tgt.silhouettes, cameras=cams, template=template_mesh,
                     settings=settings, identity=identity, rgb=tgt.rgb, learn_rgb=rgb,
                     template_scale=template_scale, seed=seed, log_every=log_every,
                     checkpoint_every=checkpoint_every, resume=resume, resume_hint=hint)
    print_metrics(result)
    typer.echo(f"Wrote {out / 'mesh.obj'}, {out / LOG}, {out / 'progress.gif'} and {out / CHECKPOINT}")
