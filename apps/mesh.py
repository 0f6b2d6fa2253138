"""``tdr mesh``: extract a mesh from a saved neural field again, without training.

``tdr mesh RUN --out mesh.ply --resolution 512`` reads the field from a run folder (or its ``checkpoint.pt``)
and runs marching cubes on it (:func:`taichi_dr.implicit.meshing.extract_mesh`: sparse, multiresolution
unless ``--dense``). The fields are those of ``tdr reconstruct``: IDR's SDF (level 0), UNISURF's occupancy
(0.5) and NeRF's density (its ``--density-level``), each meshed on the side its method calls inside;
checkpoints of the methods that hold no field (``tdr fit-mesh``, ``tdr pose``) are refused.

Coordinates: a checkpoint holds the field in the normalised frame (the object inside the unit sphere), not
the dataset's ``scale_mat`` that maps it back to world units. That comes from ``--data DATASET`` or, failing
that, from the dataset the run folder's ``metrics.json`` names (IDR layout only: a NeRF-synthetic scene's
scale is ``--scene-radius``, which the run does not record). Without either, the mesh stays in the
normalised frame. The output says which was used.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
import typer

from apps.command import current_run, tdr_command
from apps.common import CLIError, available_memory_bytes, init_runtime, option_errors

# Checkpoints of fields this command can mesh: method name -> the command that writes them.
FIELD_METHODS = {"idr": "tdr reconstruct", "unisurf": "tdr reconstruct --method unisurf",
                 "nerf": "tdr reconstruct --method nerf"}
# Checkpoints of the other methods, named in the refusal: method name -> (command, what it holds).
NOT_FIELDS = {"mesh-fit": ("tdr fit-mesh", "a mesh (its run folder has mesh.obj)"),
              "pose": ("tdr pose", "a pose")}
MESH_FORMATS = (".ply", ".obj", ".glb", ".off")
# Marching cubes holds the float32 grid of values and its own copies: about 16 bytes per grid point.
GRID_BYTES_PER_POINT = 16


def checkpoint_file(path: Path) -> Path:
    """The checkpoint file of ``path`` (a run folder or the file itself); CLIError when there is none."""
    from taichi_dr.pipelines.checkpoint import CHECKPOINT_NAME

    path = Path(path)
    if not path.exists():
        raise CLIError(f"CHECKPOINT {str(path)!r} does not exist; expected a run folder or its {CHECKPOINT_NAME}")
    if path.is_dir():
        if not (path / CHECKPOINT_NAME).is_file():
            raise CLIError(f"CHECKPOINT {str(path)!r}: no {CHECKPOINT_NAME} in this folder; expected the run "
                           f"folder of a neural field ({_expected()})")
        return path / CHECKPOINT_NAME
    return path


def _expected() -> str:
    return ", ".join(f"'{name}' from {command}" for name, command in FIELD_METHODS.items())


def field_method(path: Path) -> dict:
    """The engine checkpoint at ``path`` (its payload), which must be of a method that holds a field
    (CLIError naming the file and what is expected otherwise: not a checkpoint, unreadable, another method)."""
    from taichi_dr.pipelines.checkpoint import CheckpointError, load_checkpoint

    try:
        payload = load_checkpoint(path)
    except CheckpointError as e:
        raise CLIError(f"CHECKPOINT: {e}; expected the checkpoint of a neural field ({_expected()})") from None
    method = payload.get("method")
    if method in FIELD_METHODS:
        return payload
    if method in NOT_FIELDS:
        command, holds = NOT_FIELDS[method]
        what = f"a checkpoint of {command} ('{method}'), which holds {holds}, not a field"
    else:
        what = f"a checkpoint of method {method!r}, which this version cannot mesh"
    raise CLIError(f"CHECKPOINT {str(path)}: {what}; expected the checkpoint of a neural field ({_expected()})")


def dataset_scale_mat(root: Path, scene_radius: float) -> np.ndarray:
    """The ``scale_mat`` (4, 4) float64, normalised -> world, of the dataset folder ``root``, as
    :func:`taichi_dr.data.datasets.load_dataset` gives it, without reading the images: IDR layout, the
    ``scale_mat_i`` of ``cameras.npz`` (all equal; identity when absent); NeRF-synthetic, ``scene_radius``
    times the identity. Raises ValueError / FileNotFoundError naming the file."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    npz = root / "cameras.npz"
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as data:
            keys = sorted((k for k in data.files if re.fullmatch(r"scale_mat_\d+", k)),
                          key=lambda k: int(k.rsplit("_", 1)[1]))
            scales = [np.asarray(data[k], dtype=np.float64) for k in keys]
        if not scales:
            return np.eye(4)
        for key, s in zip(keys, scales, strict=True):
            if s.shape != (4, 4) or not np.isfinite(s).all():
                raise ValueError(f"{npz}: {key!r} must be a finite 4x4 matrix, got shape {s.shape}")
            if np.abs(s - scales[0]).max() > 1e-6 * np.abs(scales[0]).max():
                raise ValueError(f"{npz}: {key} differs from {keys[0]}; one normalisation must serve all views")
        return scales[0]
    if (root / "transforms_train.json").is_file():
        if not (math.isfinite(scene_radius) and scene_radius > 0):
            raise ValueError(f"--scene-radius must be a number > 0, got {scene_radius}")
        return np.diag([scene_radius, scene_radius, scene_radius, 1.0])
    raise ValueError(f"{root}: not a dataset folder: expected cameras.npz (IDR layout) or transforms_train.json "
                     "(NeRF-synthetic layout)")


def world_frame(ckpt: Path, data: Path | None, scene_radius: float,
                saved: np.ndarray | None = None) -> tuple[np.ndarray | None, str, str]:
    """Where the mesh of the field saved at ``ckpt`` goes: ``(scale_mat or None, the coordinates in a few
    words, why / what to do, or "")``. From ``data`` when given, else the ``saved`` scale_mat the checkpoint
    holds (runs since it records one), else the IDR dataset its run folder's ``metrics.json`` names, else the
    normalised frame."""
    if data is not None:
        with option_errors("--data"):
            scale_mat = dataset_scale_mat(data, scene_radius)
        nerf = not (Path(data) / "cameras.npz").is_file()
        return scale_mat, f"world coordinates of {data}" + (f" at scene radius {scene_radius:g}" if nerf else ""), ""
    if saved is not None:
        return saved, "world coordinates of the training data", "scale_mat saved in the checkpoint"
    normalised, hint = "normalised coordinates", "give --data DATASET for the dataset's world coordinates"
    metrics = ckpt.parent / "metrics.json"
    try:
        named = json.loads(metrics.read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        named = None
    if not isinstance(named, str) or not named:
        return None, normalised, f"the run folder does not name its dataset; {hint}"
    named_path = Path(named)
    if (named_path / "cameras.npz").is_file():
        try:
            return dataset_scale_mat(named_path, 1.0), f"world coordinates of {named}", f"named in {metrics}"
        except (OSError, ValueError) as e:
            return None, normalised, f"{named}, named in {metrics}, is unreadable ({e}); {hint}"
    if (named_path / "transforms_train.json").is_file():
        return None, normalised, (f"{named}, named in {metrics}, is a NeRF-synthetic scene whose scale the run "
                                  f"does not record; {hint} --scene-radius R")
    return None, normalised, f"the dataset {named}, named in {metrics}, is not there; {hint}"


def _option_words(message: str) -> str:
    """An :func:`extract_mesh` error in this command's words: its settings named as the options that set them."""
    message = message.removeprefix("extract_mesh: ")
    return message.replace("dense=True", "--dense").replace("larger coarse", "larger --coarse")


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that cannot be written, before the extraction (which can take minutes)."""
    out = Path(out)
    if out.suffix.lower() not in MESH_FORMATS:
        raise CLIError(f"--out {str(out)!r}: expected a mesh file ending in one of {', '.join(MESH_FORMATS)}")
    if out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a folder; expected a mesh file")
    if out.exists() and not overwrite:
        raise CLIError(f"--out {str(out)!r} exists; pass --overwrite to replace it, or choose another file")
    if not out.parent.is_dir():
        raise CLIError(f"--out: the folder {str(out.parent)!r} does not exist")


def save_mesh_atomic(mesh, out: Path) -> None:
    """Write ``mesh`` to ``out`` through a temporary file in the same folder, so an interrupted write never
    leaves half a mesh in place of the old file."""
    from taichi_dr.core.mesh import save_mesh

    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")
    try:
        save_mesh(mesh, tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@tdr_command("mesh", summary_table=True)
def mesh_command(
    checkpoint: Path = typer.Argument(..., help="Run folder of a saved neural field (tdr reconstruct), or its "
                                      "checkpoint.pt."),
    out: Path = typer.Option(..., "--out", "-o", help="Mesh file to write (.ply, .obj, .glb or .off)."),
    resolution: int = typer.Option(256, help="Points per axis of the finest marching-cubes grid."),
    bound: float = typer.Option(None, help="Half-size of the meshed cube [-B, B]^3 in the normalised frame "
                                "(default: the run's bounding sphere radius)."),
    level: float = typer.Option(None, help="Level set to mesh (default: the method's: 0 for IDR's SDF, 0.5 for "
                                "UNISURF's occupancy, the run's --density-level for NeRF)."),
    dense: bool = typer.Option(False, help="Evaluate every grid point (the reference; slow at high resolution)."),
    coarse: int = typer.Option(None, help="Cells per axis of the first grid of the sparse extraction (default: "
                               "extract_mesh's); raise it if thin parts go missing."),
    data: Path = typer.Option(None, "--data", help="Dataset folder the field was trained on, for its world "
                              "coordinates (default: the one the run's metrics.json names, if any)."),
    scene_radius: float = typer.Option(1.5, help="NeRF-synthetic --data only: the --scene-radius of the run."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
    arch: str = typer.Option(None, help="Taichi backend: auto, cpu, cuda or vulkan."),
) -> None:
    """Extract a mesh from a saved neural field (a tdr reconstruct run) without training.

    Example: tdr mesh runs/spot_idr --resolution 512 --out runs/spot_idr/mesh_512.ply
    """
    from taichi_dr.implicit.meshing import extract_mesh
    from taichi_dr.pipelines.checkpoint import CheckpointError
    from taichi_dr.pipelines.reconstruction import load_trained

    if resolution < 8:
        raise CLIError(f"--resolution: must be >= 8, got {resolution}")
    if bound is not None and not (math.isfinite(bound) and bound > 0):
        raise CLIError(f"--bound: must be a number > 0, got {bound}")
    if level is not None and not math.isfinite(level):
        raise CLIError(f"--level: must be a finite number, got {level}")
    if coarse is not None and dense:
        raise CLIError("--coarse sets the first grid of the sparse extraction; --dense has none: give one of them")
    if coarse is not None and not 1 <= coarse <= resolution:
        raise CLIError(f"--coarse: must be in [1, --resolution {resolution}], got {coarse}")
    grid_bytes, free = GRID_BYTES_PER_POINT * resolution ** 3, available_memory_bytes(torch.device("cpu"))
    if free is not None and grid_bytes > free:
        raise CLIError(f"--resolution {resolution}: marching cubes needs about {grid_bytes / 2**30:.1f} GiB but "
                       f"{free / 2**30:.1f} GiB is free; use at most about "
                       f"{int((free / GRID_BYTES_PER_POINT) ** (1 / 3))}")
    check_out(out, overwrite)
    ckpt = checkpoint_file(checkpoint)
    payload = field_method(ckpt)
    saved = payload["method_state"].get("scale_mat") if isinstance(payload.get("method_state"), dict) else None
    saved = saved.numpy() if isinstance(saved, torch.Tensor) and tuple(saved.shape) == (4, 4) else None
    scale_mat, coordinates, note = world_frame(ckpt, data, scene_radius, saved)

    init_runtime(arch)
    try:
        target = load_trained(ckpt).mesh_field()
    except CheckpointError as e:            # e.g. weights that do not fit the networks its config describes
        raise CLIError(f"CHECKPOINT: {e}") from None
    bound = target["bound"] if bound is None else bound
    level = target["level"] if level is None else level
    options = {"coarse": coarse} if coarse is not None else {}

    report = current_run()
    progress = report.progress

    progress(f"Meshing {ckpt} at {resolution}^3 over [-{bound:g}, {bound:g}]^3 "
             f"({'dense' if dense else 'sparse'}), in {coordinates}" + (f" ({note})" if note else ""))
    try:
        mesh, stats = extract_mesh(target["field"], resolution, bound, level=level, inside=target["inside"],
                                   dense=dense,
                                   scale_mat=None if scale_mat is None else torch.from_numpy(scale_mat),
                                   progress=progress, return_stats=True, **options)
    except ValueError as e:                  # no crossing of the level in the cube, non-finite values
        raise CLIError(f"CHECKPOINT {str(ckpt)}: {_option_words(str(e))}") from None
    save_mesh_atomic(mesh, Path(out))
    evaluated, every = stats["points_evaluated"], stats["dense_points"]
    report.metrics.update(faces=mesh.num_faces, verts=mesh.num_verts, resolution=resolution,
                          points_evaluated=evaluated, dense_points=every, coordinates=coordinates)
    report.wrote(out)
    report.info(f"Wrote {out} ({coordinates}): {mesh.num_faces} faces, {mesh.num_verts} vertices; {evaluated} of "
               f"the {every} grid points evaluated ({100 * evaluated / every:.1f}%) in {stats['seconds']:.1f} s")

