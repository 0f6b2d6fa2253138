"""Viewing a finished run: its mesh (soft rasterizer) or its checkpoint (free-viewpoint neural rendering).

:func:`load_view_source` turns a run folder or a mesh file into what a :class:`ViewerSession` draws;
:func:`view_loop` runs the window until it is closed, or writes a turntable of frames off screen.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from taichi_dr.viewer.orbit import OrbitCamera
from taichi_dr.viewer.session import ViewerSession

__all__ = ["MESH_SUFFIXES", "ViewSource", "load_view_source", "mesh_render_fn", "view_loop"]

MESH_SUFFIXES = (".obj", ".ply", ".glb", ".off")
# Mesh files a run folder may hold, in the order they are looked for (tdr fit-mesh, tdr reconstruct).
RUN_MESHES = ("mesh.obj", "mesh.ply")


@dataclass
class ViewSource:
    """What a finished run shows: ``render_fn(cameras) -> dict``, its training views (or None), the mesh for
    wireframes and snapshots (or a function making one), a starting camera, and a description."""

    render_fn: Callable
    views: object | None
    mesh_fn: Callable | None
    snapshot_fn: Callable | None
    orbit: OrbitCamera | None
    description: str


def mesh_render_fn(mesh, lights=None) -> Callable:
    """Render ``mesh`` (hard rasterization: the surface itself) with rgb, alpha, depth and normals; lit by
    ``Lights.default`` unless it has colours."""
    from taichi_dr.raster import RasterSettings
    from taichi_dr.raster.renderer import render_mesh
    from taichi_dr.raster.shading import Lights

    has_colours = any(getattr(mesh, k) is not None for k in ("vert_colors", "face_colors", "texture"))
    lights = lights if lights is not None else (None if has_colours else Lights.default())
    settings = RasterSettings(mode="hard", far=1e4)

    def render(cameras):
        out = render_mesh(mesh, cameras.to(dtype=torch.float32), lights, settings,
                          outputs=("rgb", "depth", "normals"))
        return {"rgb": out.rgb.clamp(0, 1), "alpha": out.alpha.clamp(0, 1), "depth": out.depth,
                "normals": out.normals}

    return render


def _mesh_orbit(mesh) -> OrbitCamera:
    verts = mesh.verts.detach().double()
    lo, hi = verts.min(0).values, verts.max(0).values
    centre = (lo + hi) / 2
    radius = max(float((hi - lo).norm()) / 2, 1e-6)
    return OrbitCamera(target=tuple(float(c) for c in centre), distance=3.0 * radius, azimuth=30.0, elevation=20.0)


def _mesh_source(mesh, path: Path) -> ViewSource:
    return ViewSource(mesh_render_fn(mesh), None, lambda: mesh, lambda resolution: mesh, _mesh_orbit(mesh),
                      f"mesh {path}")


def _run_dataset(run: Path) -> Path | None:
    """The dataset a reconstruction run was trained on, from its metrics.json or config.toml (None if gone)."""
    candidates = []
    metrics = run / "metrics.json"
    if metrics.is_file():
        try:
            candidates.append(json.loads(metrics.read_text()).get("data"))
        except (OSError, ValueError):
            pass
    config = run / "config.toml"
    if config.is_file():
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            candidates.append(tomllib.loads(config.read_text()).get("data"))
        except (OSError, ValueError):
            pass
    for data in candidates:
        if isinstance(data, str) and Path(data).is_dir():
            return Path(data)
    return None


def load_view_source(path, device=None) -> ViewSource:
    """A run folder of ``tdr reconstruct`` (its checkpoint: the field rendered by its own method), a folder
    holding ``mesh.obj``/``mesh.ply`` (``tdr fit-mesh``), or a mesh file. ValueError (one line) otherwise."""
    from taichi_dr.core.mesh import load_mesh

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"RUN {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() not in MESH_SUFFIXES:
            raise ValueError(f"RUN {str(path)!r}: expected a run folder or a mesh file ({', '.join(MESH_SUFFIXES)})")
        return _mesh_source(load_mesh(path), path)
    checkpoint = path / "checkpoint.pt"
    if checkpoint.is_file():
        from taichi_dr.pipelines.checkpoint import load_checkpoint
        from taichi_dr.pipelines.reconstruction import FIELD_METHODS

        if load_checkpoint(checkpoint).get("method") in FIELD_METHODS:
            return _field_source(path, device)
    for name in RUN_MESHES:
        if (path / name).is_file():
            return _mesh_source(load_mesh(path / name), path / name)
    raise ValueError(f"RUN {str(path)!r}: no reconstruction checkpoint.pt and no {' or '.join(RUN_MESHES)} in it")


def _field_source(run: Path, device=None) -> ViewSource:
    from taichi_dr.pipelines.reconstruction import dataset_training_views, field_snapshot, load_trained

    trained = load_trained(run, device)
    views = None
    data = _run_dataset(run)
    if data is not None:
        from taichi_dr.data.datasets import load_dataset

        dataset = load_dataset(data)
        views = dataset_training_views(dataset, None if dataset.masks is None else dataset.masks.float())

    def snapshot(resolution: int):
        return field_snapshot(trained.mesh_field(), resolution, trained.scale_mat)

    orbit = None if views is not None else OrbitCamera(distance=3.0, azimuth=30.0, elevation=20.0)
    return ViewSource(trained.render, views, None, snapshot, orbit, f"{trained.method} field {run}")


def view_loop(session: ViewerSession, frames: int = 0, lines=()) -> list[Path]:
    """Run a finished run's viewer: with a visible window, draw until it is closed (snapshots on request);
    headless, write ``frames`` turntable frames (the camera a full turn around its target) and return their
    paths."""
    written: list[Path] = []
    if not session.window.show_window:
        home = session.controls.camera.copy()
        for k in range(max(1, frames)):
            session.controls.camera = home.copy()
            session.controls.camera.orbit(360.0 * k / max(1, frames), 0.0)
            session.frame(lines, iteration=k, force_render=True, save_frame=True, refine=True)
        return list(session.frames_written)
    while session.window.running:
        result = session.frame(lines)
        if result.snapshot:
            written += session.snapshot()
        if not result.rendered:
            time.sleep(1 / 60)
    return written
