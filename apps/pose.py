"""``tdr pose``: refine the 6-DoF pose of a known mesh so that it lines up with an object in an image.

    tdr pose MESH IMAGE --camera C --init POSE --out DIR

IMAGE: an RGBA PNG (colour + silhouette), a greyscale mask, or an RGB image (then the RGB loss, against a
plain background); ``--mask`` adds a separate mask. CAMERA: a camera file as ``load_cameras`` reads it
(``{"image_size": [H, W], "cameras": [{"K", "R", "t"}]}`` as ``tdr render`` writes, or a JSON list of
``{K, R, t}``; ``--camera-index`` picks one), or ``--fov`` for a camera with only a field of view. POSE: JSON
``{"R": 3x3, "t": 3}`` or ``{"matrix": 4x4}``, optionally ``"convention": "camera_to_object"``; it maps mesh
coordinates into the camera's world frame (object -> camera when the camera has identity extrinsics).

Writes ``DIR/before.png`` and ``DIR/after.png`` (the model's outline over the image at the initial and the
refined pose), ``DIR/pose.json`` (the refined pose, both conventions, with the settings and final loss),
``DIR/loss.csv`` and ``DIR/loss.svg`` (the loss curve), and, as every engine run, ``DIR/metrics.jsonl``,
``DIR/config.json`` and ``DIR/checkpoint.pt``. Ctrl-C (or SIGTERM) saves a checkpoint and prints the command
that continues the refinement (``--resume``), bitwise as if it had not stopped.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import typer

from apps.command import current_run, tdr_command
from apps.common import (
    CLIError,
    choice,
    init_runtime,
    option_errors,
    prepare_out_dir,
    resume_command,
    run_training,
    save_png,
    settings_error,
    upscale,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False)


@app.callback()
def _group() -> None:
    """Pose refinement (``tdr pose``). The main ``tdr`` app registers :func:`pose_command` as ``pose``."""

STALE = ("before.png", "after.png", "pose.json", "loss.csv", "loss.svg", "checkpoint.pt", "metrics.jsonl",
         "config.json", "config.toml")
# PoseSettings fields -> the options that set them, for error messages.
POSE_OPTIONS = {"stages": "--stages", "multi_start": "--multi-start", "multi_start_angle": "--multi-start-angle",
                "parameterization": "--parameterization", "rotation": "--rotation",
                "refine_focal": "--refine-focal", "refine_principal_point": "--refine-principal-point"}
LOSS_NAMES = ("auto", "silhouette_iou", "silhouette_mse", "rgb", "distance_transform")


def read_image(path: Path, mask_path: Path | None):
    """The target (a PoseTarget) from IMAGE and an optional separate mask."""
    from taichi_dr.data.images import read_image as decode
    from taichi_dr.pipelines.pose import PoseTarget

    with option_errors("IMAGE"):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image not found")
        img = decode(path)  # (H, W, C) float in [0, 1], C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA
        if img.shape[-1] == 2:  # grey + alpha
            img = np.concatenate([np.repeat(img[..., :1], 3, -1), img[..., 1:]], -1)
        elif img.shape[-1] == 1:
            img = img[..., 0]
        elif img.shape[-1] == 3 and np.array_equal(img[..., 0], img[..., 1]) \
                and np.array_equal(img[..., 0], img[..., 2]) and mask_path is None \
                and set(np.unique(img[..., 0]).tolist()) <= {0.0, 1.0}:
            img = img[..., 0]  # a black-and-white mask saved as RGB
        target = PoseTarget.from_image(img, name=str(path))
    if mask_path is not None:
        with option_errors("--mask"):
            if not mask_path.is_file():
                raise FileNotFoundError(f"{mask_path}: mask not found")
            m = decode(mask_path)
            m = m[..., -1] if m.shape[-1] in (2, 4) else m[..., 0]  # the alpha channel, else the first
            mask = PoseTarget.from_image(m, name=str(mask_path)).mask
            if tuple(mask.shape) != target.image_size:
                raise ValueError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is "
                                 f"{target.image_size[1]}x{target.image_size[0]}")
            if target.rgb is None:
                raise ValueError(f"{mask_path}: the image {path} is a mask already")
        target = PoseTarget(mask=mask, rgb=target.rgb)
    return target


def read_camera(path: Path | None, fov: float | None, index: int, image_size: tuple[int, int]):
    """One camera for an image of ``image_size`` (H, W), from a file or a field of view."""
    import torch

    from taichi_dr.core.camera import Cameras, intrinsics_from_fov, load_cameras

    if (path is None) == (fov is None):
        raise CLIError("give exactly one of --camera FILE or --fov DEGREES")
    if fov is not None:
        if not 0 < fov < 180:
            raise CLIError(f"--fov: expected a horizontal field of view in degrees in (0, 180), got {fov}")
        with option_errors("--fov"):
            K = intrinsics_from_fov(fov, image_size)
        return Cameras(K, torch.eye(3), torch.zeros(3), image_size)
    with option_errors("--camera"):
        if path.suffix.lower() != ".json":
            raise ValueError(f"{path}: expected a .json camera file ({{'image_size', 'cameras': [{{K, R, t}}]}} "
                             "or a list of {K, R, t})")
        try:
            cams = load_cameras(path)  # the file's own image size, when it has one
        except ValueError as e:
            if "image_size" not in str(e):
                raise
            cams = load_cameras(path, image_size=image_size)
        if tuple(cams.image_size) != tuple(image_size):
            raise ValueError(f"{path}: the camera is for {cams.image_size[1]}x{cams.image_size[0]} (WxH) images "
                             f"but IMAGE is {image_size[1]}x{image_size[0]}")
    if not 0 <= index < len(cams):
        raise CLIError(f"--camera-index {index}: expected an index in [0, {len(cams) - 1}] ({path} has "
                       f"{len(cams)} camera{'s' if len(cams) != 1 else ''})")
    return cams[index]


def check_target(target, image: Path, loss: str) -> None:
    """Refuse a target with nothing to align to: the loss would stay flat and the pose would not move."""
    if target.mask is not None and loss != "rgb":
        if not bool((target.mask > 0.5).any()):
            raise CLIError(f"IMAGE {str(image)!r}: the silhouette is empty (no pixel above 0.5 in the "
                           f"{'alpha channel' if target.rgb is not None else 'mask'}); nothing to align the mesh to")
    elif target.rgb is not None and target.mask is None:
        bg = target.rgb.new_tensor(target.background)
        if not bool(((target.rgb - bg).abs() > 1.0 / 255).any()):
            raise CLIError(f"IMAGE {str(image)!r}: every pixel is the background colour {target.background}; "
                           "nothing to align the mesh to")


def check_initial_view(model, pose, cam, image_size: tuple[int, int], init: Path | None) -> None:
    """Refuse an initial pose at which the camera does not see the mesh (behind it, or projected outside the
    image): the render is empty, the loss has no gradient and the pose would not move."""
    import torch

    what = f"--init {str(init)!r}" if init is not None else "the initial pose (identity; give --init)"
    with torch.no_grad():
        pts = pose.apply(model.verts.to(pose.R.dtype))
        uvz = cam.to(dtype=pts.dtype).project(pts)[0]  # (V, 3): pixel u, v and depth z
    front = uvz[:, 2] > 1e-6
    if not bool(front.any()):
        raise CLIError(f"{what}: the mesh is behind the camera (every vertex has camera-space depth <= 0; "
                       f"the largest is {float(uvz[:, 2].max()):.4g}); the camera looks along +z, so the mesh needs "
                       "a positive depth (check the sign of t and the pose's 'convention')")
    u, v = uvz[front, 0], uvz[front, 1]
    h, w = image_size
    if float(u.max()) < 0 or float(u.min()) > w or float(v.max()) < 0 or float(v.min()) > h:
        raise CLIError(f"{what}: the mesh projects outside the {w}x{h} image (u in [{float(u.min()):.4g}, "
                       f"{float(u.max()):.4g}], v in [{float(v.min()):.4g}, {float(v.max()):.4g}] pixels); "
                       "start from a pose at which the camera sees it")


def parse_stages(text: str | None):
    from taichi_dr.pipelines.pose import DEFAULT_STAGES, Stage

    if not text:
        return DEFAULT_STAGES
    stages = []
    for part in text.split(","):
        fields = part.strip().split(":")
        try:
            if len(fields) not in (3, 4):
                raise ValueError("expected SIZE:SIGMA:ITERS[:LR]")
            size, sigma, iters = int(fields[0]), float(fields[1]), int(fields[2])
            lr = float(fields[3]) if len(fields) == 4 else 1.0
            stages.append(Stage(size or None, sigma, iters, lr))
        except ValueError as e:
            msg = str(e)
            for field in ("size", "sigma", "iters", "lr"):  # Stage.sigma -> SIGMA, as the format names it
                msg = msg.replace(f"Stage.{field}", field.upper())
            raise CLIError(f"--stages: {part.strip()!r}: {msg} (SIZE:SIGMA:ITERS[:LR], SIZE 0 = full "
                           "resolution)") from None
    return tuple(stages)


def loss_svg(history: list[float], stages: list[int], width: int = 480, height: int = 240) -> str:
    """A small SVG line plot of the loss (log scale when it spans over a decade), stage changes dashed."""
    vals = np.asarray(history, dtype=np.float64)
    ok = np.isfinite(vals)
    if not ok.any():
        vals = np.zeros(1)
        ok = np.ones(1, bool)
    positive = bool((vals[ok] > 0).all())
    log = positive and vals[ok].max() > 10 * vals[ok].min()
    y = np.log10(vals) if log else vals
    lo, hi = float(np.nanmin(y[ok])), float(np.nanmax(y[ok]))
    hi = hi if hi > lo else lo + 1.0
    m = 36
    n = max(len(vals) - 1, 1)

    def px(i, v):
        return m + (width - 2 * m) * i / n, height - m - (height - 2 * m) * (v - lo) / (hi - lo)

    pts = " ".join(f"{px(i, v)[0]:.1f},{px(i, v)[1]:.1f}" for i, v in enumerate(y) if np.isfinite(v))
    lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>']
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            x = px(i, lo)[0]
            lines.append(f'<line x1="{x:.1f}" y1="{m}" x2="{x:.1f}" y2="{height - m}" stroke="#999" '
                         'stroke-dasharray="4,3"/>')
    label = (lambda v: f"{10 ** v:.3g}") if log else (lambda v: f"{v:.3g}")
    lines += [f'<text x="4" y="{m + 4}">{label(hi)}</text>',
              f'<text x="4" y="{height - m + 4}">{label(lo)}</text>',
              f'<text x="{width / 2:.0f}" y="{height - 8}" text-anchor="middle">step '
              f'({"log " if log else ""}loss; dashed: next stage)</text>',
              "</svg>"]
    return "\n".join(lines) + "\n"


@app.command("pose")
@tdr_command("pose", summary_table=True)
def pose_command(
    mesh: Path = typer.Argument(..., help="Mesh file (.obj with texture/MTL, .ply, .glb, .off), in its own "
                                "coordinates."),
    image: Path = typer.Argument(..., help="Target image: RGBA PNG (alpha = silhouette), greyscale mask, or RGB."),
    camera: Path = typer.Option(None, help="Camera JSON ({'image_size', 'cameras': [{K, R, t}]} as tdr render "
                                "writes, or a list of {K, R, t}); or use --fov."),
    fov: float = typer.Option(None, help="Horizontal field of view in degrees, for a camera without a file "
                              "(principal point at the centre, identity extrinsics)."),
    camera_index: int = typer.Option(0, help="Which camera of a file with several."),
    init: Path = typer.Option(None, "--init", help="Initial pose JSON ({R, t} or {matrix}, optional "
                              "'convention': object_to_camera | camera_to_object); default: identity."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (must be empty or new)."),
    mask: Path = typer.Option(None, help="Separate mask image for an RGB IMAGE."),
    loss: str = typer.Option("auto", help=f"One of {', '.join(LOSS_NAMES)}; auto: silhouette_iou with a "
                             "mask, rgb without."),
    stages: str = typer.Option(None, help="Coarse-to-fine schedule SIZE:SIGMA:ITERS[:LR],... (SIZE 0 = full "
                               "resolution); default 64:3e-3:30:1,128:3e-4:20:1,0:1e-4:15:0.5."),
    multi_start: int = typer.Option(1, help="Number of starts (the initial pose and rotations of it)."),
    multi_start_angle: float = typer.Option(45.0, help="Rotation of the extra starts, degrees."),
    parameterization: str = typer.Option("object_to_camera", help="What moves: object_to_camera (the object, "
                                         "about its centre) or camera_to_object (the camera)."),
    rotation: str = typer.Option("axis_angle", help="Rotation update: axis_angle or quaternion."),
    refine_focal: bool = typer.Option(False, help="Also refine the focal length."),
    refine_principal_point: bool = typer.Option(False, help="Also refine the principal point."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out folder."),
    resume: bool = typer.Option(False, help="Continue the interrupted refinement in --out (same arguments)."),
    checkpoint_every: int = typer.Option(50, help="Steps between checkpoints in --out (0: only at the end and on "
                                         "Ctrl-C/SIGTERM)."),
    arch: str = typer.Option(None, help="Taichi backend: auto, cpu, cuda or vulkan."),
    viewer: bool = typer.Option(False, "--viewer", help="Watch the refinement in a live window (GGUI)."),
    viewer_frames: Path = typer.Option(None, "--viewer-frames", help="Write the viewer's frames as PNGs in "
                                       "this folder (headless; no window needed)."),
) -> None:
    """Refine the pose of MESH so that its render lines up with IMAGE; write overlays, the pose and the loss
    curve.

    Example: tdr pose spot.obj photo.png --camera cameras.json --init pose0.json --out runs/spot_pose
    """
    import torch

    from apps.viewing import viewer_callbacks
    from taichi_dr.core.mesh import load_mesh
    from taichi_dr.pipelines import CheckpointError, TrainConfig, Trainer
    from taichi_dr.pipelines.pose import (
        CONVENTIONS,
        ROTATIONS,
        Pose,
        PoseMethod,
        PoseSettings,
        load_pose,
        rotation_error_deg,
        save_pose,
    )

    loss = choice("--loss", loss, LOSS_NAMES)
    parameterization = choice("--parameterization", parameterization, CONVENTIONS)
    rotation = choice("--rotation", rotation, ROTATIONS)
    if camera_index < 0:
        raise CLIError(f"--camera-index: expected an index >= 0, got {camera_index}")
    if checkpoint_every < 0:
        raise CLIError(f"--checkpoint-every: expected an integer >= 0, got {checkpoint_every}")
    schedule = parse_stages(stages)
    try:
        settings = PoseSettings(stages=schedule, multi_start=multi_start, multi_start_angle=multi_start_angle,
                                parameterization=parameterization, rotation=rotation,
                                refine_focal=refine_focal, refine_principal_point=refine_principal_point)
    except (ValueError, TypeError) as e:
        raise settings_error(e, "PoseSettings", POSE_OPTIONS) from None

    target = read_image(image, mask)
    cam = read_camera(camera, fov, camera_index, target.image_size)
    if init is not None:
        with option_errors("--init"):
            init_pose = load_pose(init)
    else:
        init_pose = Pose.identity()
    if loss == "auto":
        loss = "silhouette_iou" if target.mask is not None else "rgb"
    if loss == "rgb" and target.rgb is None:
        raise CLIError(f"--loss rgb: needs a colour image, but {image} is a mask (greyscale, or black and white); "
                       "use a silhouette loss")
    if loss != "rgb" and target.mask is None:
        raise CLIError(f"--loss {loss}: needs a silhouette, but {image} has no alpha channel and is not a mask; "
                       "give --mask or use --loss rgb")
    check_target(target, image, loss)
    with option_errors("MESH"):
        model = load_mesh(mesh)
    check_initial_view(model, init_pose, cam, target.image_size, init)
    if resume and not (out / "checkpoint.pt").is_file():
        raise CLIError(f"--resume: {out / 'checkpoint.pt'} not found; nothing to continue (run without --resume)")
    prepare_out_dir(out, overwrite=overwrite, resume=resume, stale=STALE)
    init_runtime(arch)

    method = PoseMethod(model, target, cam, init_pose.to(dtype=torch.float32), loss=loss, settings=settings)
    if method.iterations:
        config = TrainConfig(iterations=method.iterations, checkpoint_every=checkpoint_every,
                             max_nonfinite=settings.max_nonfinite, progress=current_run().progress_mode)
        callbacks = viewer_callbacks(viewer, viewer_frames, title="tdr pose")
        try:
            trainer = Trainer(method, config, out_dir=out, resume=resume, callbacks=callbacks)
        except CheckpointError as e:
            raise CLIError(f"--resume: {e}") from None
        except ValueError as e:  # PoseMethod.check_resume: other arguments than the interrupted run's
            raise CLIError(f"--resume: {out / 'checkpoint.pt'} was made with other arguments ({e})") from None
        hint = resume_command(["tdr", "pose", mesh, image], pose_command, dict(
            camera=camera, fov=fov, camera_index=camera_index, init=init, out=out, mask=mask, loss=loss,
            stages=stages, multi_start=multi_start, multi_start_angle=multi_start_angle,
            parameterization=parameterization, rotation=rotation, refine_focal=refine_focal,
            refine_principal_point=refine_principal_point, checkpoint_every=checkpoint_every, arch=arch))
        run_training(trainer, resume_hint=hint)
        seconds = trainer.state.elapsed_s
    else:
        seconds = 0.0
    method.finish()
    result = method.result(seconds=seconds)

    factor = max(1, 384 // max(target.image_size))
    save_png(out / "before.png", upscale(_u8(result.overlay_init), factor))
    save_png(out / "after.png", upscale(_u8(result.overlay), factor))
    with (out / "loss.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "stage", "loss"])
        for i, (v, s) in enumerate(zip(result.history, result.history_stage, strict=True)):
            w.writerow([i, s, f"{v:.8g}"])
    (out / "loss.svg").write_text(loss_svg(result.history, result.history_stage))
    final = result.history[-1] if result.history else math.nan
    save_pose(result.pose, out / "pose.json", K=result.K.double().tolist(), image_size=list(target.image_size),
              loss=loss, final_loss=final, start=result.start, seconds=round(result.seconds, 3),
              init=init_pose.to_dict(),
              change={"rotation_deg": rotation_error_deg(result.pose, init_pose),
                      "translation": float((result.pose.t.double() - init_pose.t.double()).norm())})
    report = current_run()
    moved_deg = rotation_error_deg(result.pose, init_pose)
    moved = float((result.pose.t.double() - init_pose.t.double()).norm())
    report.metrics.update(loss_function=loss, initial_loss=result.history[0] if result.history else math.nan,
                          final_loss=final, rotation_change_deg=moved_deg, translation_change=moved,
                          start=result.start)
    report.wrote(*(out / name for name in ("pose.json", "before.png", "after.png", "loss.csv", "loss.svg",
                                           "metrics.jsonl", "checkpoint.pt")), viewer_frames)
    report.info(f"loss {result.history[0]:.5f} -> {final:.5f}; the pose moved by {moved_deg:.2f} deg and "
                f"{moved:.4g} in {result.seconds:.1f} s")
    report.info(f"Wrote {out / 'pose.json'}, {out / 'before.png'}, {out / 'after.png'}, {out / 'loss.csv'} and "
               f"{out / 'loss.svg'}")


def _u8(img) -> np.ndarray:
    from apps.common import to_uint8

    return to_uint8(img)


if __name__ == "__main__":
    app()

