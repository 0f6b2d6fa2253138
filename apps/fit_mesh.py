"""``tdr fit-mesh``: deform a template mesh to match target silhouettes (and colours) seen by known cameras.

The fit is :class:`taichi_dr.pipelines.mesh_fit.MeshFitMethod` run by the training engine
(:func:`taichi_dr.pipelines.mesh_fit.fit_mesh`); this module runs it as a job with files in ``--out``: the
engine's ``checkpoint.pt`` (every ``--checkpoint-every`` iterations, at the end, and on Ctrl-C or SIGTERM),
``metrics.jsonl`` (one row per iteration) and ``config.json``, then ``progress_XXXX.png`` (target | current
render for a few views, every ``--log-every`` iterations, by the :class:`ProgressImages` callback),
``progress.gif`` and ``mesh.obj``. ``--resume`` continues from the checkpoint. :func:`run_fit` is shared
with ``tdr demo``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import typer

from apps.command import current_run, tdr_command
from apps.common import (
    GIF_MAX_FRAMES,
    CLIError,
    command_options,
    hstack,
    init_runtime,
    option_errors,
    prepare_out_dir,
    resume_command,
    run_training,
    save_png,
    settings_error,
    to_rgb,
    upscale,
    upscale_factor,
    vstack,
    write_gif,
)

if TYPE_CHECKING:
    from taichi_dr.pipelines.mesh_fit import FitResult

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# loss_log.csv: what runs before the training engine wrote; --overwrite removes it too.
STALE = ("progress_*.png", "progress.gif", METRICS, "config.json", CHECKPOINT, "loss_log.csv", "mesh.obj",
         "mesh.mtl", "mesh.png", "config.toml")
# FitSettings' default, repeated here so that --help needs no taichi_dr import (tests check they agree).
LAPLACIAN_WEIGHT = 2e-4

# The option that sets each part of what a resumed run must share with its checkpoint
# (taichi_dr.pipelines.mesh_fit.IDENTITY_KEYS).
IDENTITY_OPTIONS = {
    "targets": "--targets",
    "cameras": "--cameras",
    "template": "--template",
    "placement": "--template-scale",
    "rgb": "--rgb/--no-rgb",
    "parameterization": "--parameterization",
}


# ----------------------------------------------------------------------------------------------------------
# Progress images: a callback of the training engine


def _progress_views(n: int, k: int = 3) -> list[int]:
    return sorted({int(round(i * n / k)) % n for i in range(min(k, n))})


@torch.no_grad()
def progress_image(method, views: list[int], target_rgb: torch.Tensor | None, sigma: float | None = None
                   ) -> np.ndarray:
    """Rows of ``target | current render`` for ``views``: (H', W', 3) uint8, upscaled for viewing.

    The target shows its colours over white (or the silhouette in grey); the render is the method's current
    mesh over white (:meth:`MeshFitMethod.render`: learned colours as they are, they already hold the
    targets' shading; without them white and Lambert-shaded, so the shape shows), soft at ``sigma``.
    """
    images = method.render(method.cameras[torch.as_tensor(views).to(method.device)], sigma=sigma)
    factor = upscale_factor(method.cameras.image_size, 128)
    rows = []
    for k, i in enumerate(views):
        sil = method.silhouettes[i].cpu()
        if target_rgb is not None:
            tgt = torch.cat([target_rgb[i].cpu(), sil[..., None]], -1)
        else:
            tgt = torch.stack([0.35 * torch.ones_like(sil)] * 3 + [sil], -1)
        ren = torch.cat([images["rgb"][k].cpu(), images["alpha"][k].cpu()[..., None]], -1)
        rows.append(hstack([upscale(to_rgb(tgt), factor), upscale(to_rgb(ren), factor)], gap=4, fill=200))
    return vstack(rows, gap=4, fill=200)


class ProgressImages:
    """A training-engine callback: ``out/progress_XXXX.png`` at the start of a new run and every ``every``
    iterations (and the last), from the live method; at the end of a completed run, ``out/progress.gif`` of
    all of them.

    target_rgb: (N, H, W, 3) colours to show the targets in (None: grey silhouettes).
    It has all the hooks of ``taichi_dr.pipelines.Callback`` without subclassing it: importing the engine at
    module level would make ``tdr --help`` load Taichi.
    """

    def __init__(self, out: Path, every: int, target_rgb: torch.Tensor | None = None):
        self.out = Path(out)
        self.every = every
        self.target_rgb = target_rgb.cpu() if target_rgb is not None else None
        self.views: list[int] | None = None

    def _snapshot(self, state) -> None:
        method = state.method
        if self.views is None:
            self.views = _progress_views(method.num_views)
        # The sharpness the next step would use, as the previous job loop's images did.
        sigma = method.settings.sigma_at(state.iteration)
        save_png(self.out / f"progress_{state.iteration:04d}.png",
                 progress_image(method, self.views, self.target_rgb, sigma))

    def on_start(self, state) -> None:
        if state.iteration == 0:
            self._snapshot(state)

    def on_step(self, state) -> None:
        if state.iteration % self.every == 0 or state.iteration == state.total:
            self._snapshot(state)

    def on_checkpoint(self, state, path) -> None:
        pass

    def on_end(self, state, reason: str) -> None:
        if reason != "done":
            return
        pngs = sorted(self.out.glob("progress_*.png"))
        if len(pngs) > GIF_MAX_FRAMES:  # read only the frames the GIF keeps
            pngs = [pngs[i] for i in np.linspace(0, len(pngs) - 1, GIF_MAX_FRAMES).round().astype(int)]
        write_gif(self.out / "progress.gif", [np.asarray(_imread(p)) for p in pngs], fps=8)


def _imread(path: Path):
    import imageio.v3 as iio

    return iio.imread(path)


# ----------------------------------------------------------------------------------------------------------
# The job


def run_fit(out: Path, *, silhouettes: torch.Tensor, cameras, template, settings, sources: dict[str, str],
            rgb: torch.Tensor | None = None, learn_rgb: bool = False, template_scale: float = 1.0,
            seed: int = 0, log_every: int = 25, checkpoint_every: int = 100, resume: bool = False,
            resume_hint: str | None = None, console=None, callbacks: list | tuple = ()):
    """Fit ``template`` to ``silhouettes (N, H, W)`` seen by ``cameras`` (N) with the training engine; write
    the job files in ``out``. Returns the library's FitResult.

    rgb: (N, H, W, 3) target colours, learned as per-vertex colours when ``learn_rgb``.
    sources: the inputs' paths ("targets", "cameras", "template"), named when a resume is refused.
    callbacks: more engine callbacks (the viewer's), after the progress images.
    On Ctrl-C/SIGTERM the checkpoint is saved, ``resume_hint`` printed and the command exits 130/143; a run
    of non-finite steps ends with one ``Error:`` line (exit 1), the last good checkpoint kept.
    """
    from taichi_dr.pipelines import CheckpointError
    from taichi_dr.pipelines.mesh_fit import ResumeMismatch, fit_mesh

    try:
        return fit_mesh(silhouettes, cameras, template, settings, rgb=rgb, learn_colors=learn_rgb,
                        template_scale=template_scale, seed=seed, out_dir=out, resume=resume,
                        checkpoint_every=checkpoint_every, sources=sources,
                        progress=current_run().progress_mode,
                        callbacks=[ProgressImages(out, log_every, rgb), *callbacks],
                        run=functools.partial(run_training, resume_hint=resume_hint, console=console))
    except CheckpointError as e:
        raise CLIError(f"--resume: {e}") from None
    except ResumeMismatch as e:
        listed = ", ".join(f"{IDENTITY_OPTIONS.get(key, key)} ({what})" for key, what in e.differences)
        raise CLIError(f"--resume: {str(out / CHECKPOINT)!r} was made with different {listed}; resume with the "
                       "original options, or start a new run in another folder (or with --overwrite)") from None
    except ValueError as e:
        if not str(e).startswith("resume: "):
            raise
        # The engine's other refusals (a checkpoint past --iterations, another optimiser), in the command's words.
        raise CLIError("--resume: " + str(e)[len("resume: "):].replace("TrainConfig.iterations", "--iterations")
                       .replace("iters must", "--iterations must")) from None


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


def print_metrics(result: FitResult) -> None:
    """Print the silhouette IoU before and after (an info line), and record it in the run's report."""
    i, f = result.initial, result.final
    current_run().metrics.update(iterations=result.iterations, iou_initial=dict(i), iou_final=dict(f))
    current_run().info(f"Silhouette IoU (mean over views): hard {i['iou_hard']:.4f} -> {f['iou_hard']:.4f}, "
               f"soft {i['iou_soft']:.4f} -> {f['iou_soft']:.4f} after {result.iterations} iterations")


@tdr_command("fit-mesh", summary_table=True)
def fit_mesh_command(
    targets: Path = typer.Option(..., help="Folder of PNGs (alpha = silhouette, else greyscale masks; sorted "
                                 "by name) or .npy (N,H,W) / (N,C,H,W) with C = 1 or 4 (RGB + alpha)."),
    cameras: Path = typer.Option(..., help="Cameras: .json ({K,R,t} list, as tdr render writes), IDR "
                                 "cameras.npz, or .npy/.csv rows (distance, elevation, azimuth) with --fov."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (must be empty or new)."),
    template: Path = typer.Option(None, help="Template mesh (default: icosphere level 3, 642 vertices)."),
    template_scale: float = typer.Option(1.0, help="Multiplier of the template radius estimated from the "
                                         "silhouettes."),
    iterations: int = typer.Option(600, "--iterations", "--iters", help="Total number of iterations (with "
                                   "--resume: up to this many)."),
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
    grad_clip: float = typer.Option(0.0, help="Clip the global gradient norm to this; 0 = no clipping (as "
                                    "SoftRas)."),
    arch: str = typer.Option(None, help="Taichi backend: auto, cpu, cuda or vulkan."),
    viewer: bool = typer.Option(False, "--viewer", help="Watch the fit in a live window (GGUI)."),
    viewer_frames: Path = typer.Option(None, "--viewer-frames", help="Write the viewer's frames as PNGs in "
                                       "this folder (headless; no window needed)."),
) -> None:
    """Deform a template mesh to match target silhouettes seen by known cameras (SoftRas style).

    Example: tdr fit-mesh --targets runs/spot_views --cameras runs/spot_views/cameras.json --out runs/spot_fit
    """
    from apps.viewing import viewer_callbacks
    from taichi_dr.pipelines.mesh_fit import FitSettings

    if resume and overwrite:
        raise CLIError("--resume and --overwrite contradict each other; pass one")
    if iterations < 0:
        raise CLIError(f"--iterations: expected >= 0, got {iterations}")
    for name, v in (("--log-every", log_every), ("--checkpoint-every", checkpoint_every)):
        if v < 1:
            raise CLIError(f"{name}: expected >= 1, got {v}")
    if not (math.isfinite(template_scale) and template_scale > 0):
        raise CLIError(f"--template-scale: expected a number > 0, got {template_scale}")
    if not (math.isfinite(sigma_final) and sigma_final >= 0):
        raise CLIError(f"--sigma-final: expected a number > 0, or 0 to keep --sigma, got {sigma_final}")
    try:
        settings = FitSettings(iters=iterations, lr=lr, color_lr=color_lr, sigma=sigma, gamma=gamma,
                               sigma_final=sigma_final or None,
                               laplacian_weight=laplacian_weight, flatten_weight=flatten_weight,
                               rgb_weight=rgb_weight,
                               views_per_step=views_per_step or None, parameterization=parameterization,
                               grad_clip=grad_clip or None)
    except ValueError as e:
        raise settings_error(e, "FitSettings", {**command_options(fit_mesh_command), "iters": "--iterations"}) \
            from None

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

    # Every option that shapes the run, so the printed command continues it bit for bit.
    hint = resume_command(["tdr", "fit-mesh", "--targets", targets, "--cameras", cameras, "--out", out],
                          fit_mesh_command, dict(
                              template=template, template_scale=template_scale, iterations=iterations, lr=lr,
                              color_lr=color_lr, fov=fov, camera_convention=camera_convention, sigma=sigma,
                              sigma_final=sigma_final, gamma=gamma, rgb=rgb, rgb_weight=rgb_weight,
                              laplacian_weight=laplacian_weight, flatten_weight=flatten_weight,
                              views_per_step=views_per_step, parameterization=parameterization, seed=seed,
                              log_every=log_every, checkpoint_every=checkpoint_every, grad_clip=grad_clip,
                              arch=arch))
    sources = {"targets": str(targets), "cameras": str(cameras), "template": template_label}
    result = run_fit(out, silhouettes=tgt.silhouettes, cameras=cams, template=template_mesh,
                     settings=settings, sources=sources, rgb=tgt.rgb, learn_rgb=rgb,
                     template_scale=template_scale, seed=seed, log_every=log_every,
                     checkpoint_every=checkpoint_every, resume=resume, resume_hint=hint,
                     callbacks=viewer_callbacks(viewer, viewer_frames, title="tdr fit-mesh"))
    print_metrics(result)
    # (--iterations 0 only places the template: no training, so only mesh.obj)
    written = [str(p) for p in (out / "mesh.obj", out / METRICS, out / "progress.gif", out / CHECKPOINT) if p.is_file()]
    current_run().wrote(*written, viewer_frames)
    current_run().info(f"Wrote {', '.join(written[:-1])} and {written[-1]}" if len(written) > 1
                       else f"Wrote {written[0]}")
