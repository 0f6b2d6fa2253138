"""``tdr render``: shaded views of a mesh from cameras around it, a turntable GIF and the cameras.

The mesh is normalised (bounding-box centre at the origin, bounding sphere of radius 1) and seen by SoftRas
spherical cameras at one elevation, azimuths evenly spaced from 0. Each view is an RGBA PNG whose alpha is
the silhouette, and ``cameras.json`` holds the cameras, so the folder is directly usable as
``tdr fit-mesh --targets DIR --cameras DIR/cameras.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import typer

from apps.command import current_run, tdr_command
from apps.common import (
    CLIError,
    gif_frame,
    gif_layout,
    init_runtime,
    option_errors,
    prepare_out_dir,
    save_png,
    write_gif,
)

VIEW_PATTERN = "view_{:03d}.png"
# Outputs of an earlier run that --overwrite removes first (fewer views would leave stale PNGs, which
# fit-mesh would then read as targets).
STALE = ("view_*.png", "turntable.gif", "cameras.json", "render.json", "config.toml")


def auto_distance(fov: float, radius: float = 1.0, fill: float = 0.7) -> float:
    """Camera distance at which a sphere of ``radius`` spans ``fill`` of the image width.

    The sphere's silhouette is a disc of angular radius ``asin(radius / d)``; it spans ``fill`` of the
    width when ``tan(asin(radius / d)) = fill * tan(fov / 2)``.
    """
    if not 0 < fov < 180:
        raise ValueError(f"--fov: expected a field of view in (0, 180) degrees, got {fov}")
    half = math.atan(fill * math.tan(math.radians(fov) / 2))
    return radius / math.sin(half)


def parse_distance(distance: str, fov: float) -> float:
    """``--distance``: ``auto`` or a positive number (in units of the normalised mesh, radius 1)."""
    if distance.strip().lower() == "auto":
        return auto_distance(fov)
    try:
        d = float(distance)
    except ValueError:
        raise CLIError(f"--distance: expected 'auto' or a number, got {distance!r}") from None
    if not (math.isfinite(d) and d > 1.0):
        raise CLIError(f"--distance: must be > 1 (the normalised mesh has radius 1, so the cameras would be "
                       f"inside it), got {d}")
    return d


def turntable_cameras(num_views: int, image_size: tuple[int, int], *, distance: float, elevation,
                      fov: float, convention: str = "softras"):
    """Spherical cameras (``Cameras.from_spherical`` with ``convention``: "softras" renders what SoftRas
    renders from the same angles), azimuth ``360 * i / num_views`` degrees; elevation a float or (N,)."""
    from taichi_dr.core.camera import Cameras

    azimuth = torch.arange(num_views, dtype=torch.float64) * (360.0 / num_views)
    elev = torch.as_tensor(elevation, dtype=torch.float64).expand(num_views)
    return Cameras.from_spherical(torch.full((num_views,), float(distance), dtype=torch.float64), elev,
                                  azimuth, fov=fov, image_size=image_size,
                                  convention=convention).to(dtype=torch.float32)


@torch.no_grad()
def render_views(mesh, cameras, *, sigma: float = 1e-5, gamma: float = 1e-4, lit: bool = True,
                 batch: int = 8) -> torch.Tensor:
    """Shaded RGBA views of ``mesh``: (N, H, W, 4) float in [0, 1], alpha = silhouette.

    Lambert shading under the default lights (``lit``) of the mesh's texture / colours (white without
    them). Renders ``batch`` views at a time to bound memory.
    """
    from taichi_dr.raster import RasterSettings
    from taichi_dr.raster.renderer import render_mesh
    from taichi_dr.raster.shading import Lights

    dev = _device()
    mesh = mesh.to(device=dev)
    cameras = cameras.to(device=dev)
    settings = RasterSettings(sigma=sigma, gamma=gamma, far=1000.0)
    lights = Lights.default(device=dev) if lit else None
    out = []
    for start in range(0, len(cameras), batch):
        cams = cameras[start:start + batch]
        r = render_mesh(mesh, cams, lights, settings, outputs=("rgb",))
        rgb = r.rgb if r.rgb is not None else r.alpha[..., None].expand(-1, -1, -1, 3)
        out.append(torch.cat([rgb, r.alpha[..., None]], dim=-1).clamp(0.0, 1.0).cpu())
    return torch.cat(out)


def _device() -> torch.device:
    from taichi_dr.core import runtime

    return runtime.device()


def save_views(out: Path, rgba: torch.Tensor, start: int, layout: tuple[int, int, int]) -> list[np.ndarray]:
    """Write ``view_XXX.png`` (RGBA) for views ``start ..`` of ``rgba`` (N, H, W, 4); return the GIF frames
    (composited over white) of the views that ``layout`` (:func:`apps.common.gif_layout`) keeps."""
    stride, up, down = layout
    frames = []
    for k, img in enumerate(rgba):
        save_png(out / VIEW_PATTERN.format(start + k), img)
        if (start + k) % stride == 0:
            frames.append(gif_frame(img, up, down))
    return frames


def write_views(out: Path, rgba: torch.Tensor, fps: float = 12.0) -> None:
    """Write ``view_XXX.png`` (RGBA) for each view and ``turntable.gif`` (composited over white, frames and
    size bounded by :func:`apps.common.gif_layout`)."""
    layout = gif_layout(len(rgba), tuple(rgba.shape[1:3]))
    write_gif(out / "turntable.gif", save_views(out, rgba, 0, layout), fps=fps)


@tdr_command("render", summary_table=True)
def render_command(
    mesh: Path = typer.Argument(..., help="Mesh file (.obj with texture/MTL, .ply, .glb, .off)."),
    views: int = typer.Option(8, "--views", "-n", help="Number of views, azimuths evenly spaced."),
    size: int = typer.Option(128, "--size", "-s", help="Image size in pixels (square)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (must be empty or new)."),
    elevation: float = typer.Option(30.0, help="Camera elevation in degrees (SoftRas convention)."),
    distance: str = typer.Option("auto", help="Camera distance in units of the normalised mesh "
                                 "(radius 1), or 'auto' to fill ~70% of the view."),
    fov: float = typer.Option(30.0, help="Full horizontal field of view in degrees (SoftRas "
                              "viewing_angle=15 is 30)."),
    sigma: float = typer.Option(1e-5, help="Soft rasterizer sharpness (NDC units; small = crisp)."),
    camera_convention: str = typer.Option("softras", help="'softras': the images SoftRas renders from these "
                                          "angles (its look_at camera is mirrored left-right); 'opencv': what "
                                          "a real camera at the same place sees."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out folder."),
    arch: str = typer.Option(None, help="Taichi backend: auto, cpu, cuda or vulkan (default: "
                             "TAICHI_DR_ARCH or auto)."),
) -> None:
    """Render a mesh from N views around it: RGBA PNGs (alpha = silhouette), turntable.gif, cameras.json.

    Example: tdr render spot.obj --views 24 --size 128 --out runs/spot_views
    """
    from taichi_dr.core.camera import save_cameras_json
    from taichi_dr.core.mesh import load_mesh

    if views < 1:
        raise CLIError(f"--views: expected at least 1 view, got {views}")
    if not 8 <= size <= 4096:
        raise CLIError(f"--size: expected an image size in [8, 4096] pixels, got {size}")
    if not 0 < fov < 180:
        raise CLIError(f"--fov: expected a field of view in (0, 180) degrees, got {fov}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise CLIError(f"--sigma: must be a number > 0, got {sigma}")
    if not math.isfinite(elevation):
        raise CLIError(f"--elevation: expected an angle in degrees, got {elevation}")
    from taichi_dr.core.camera import SPHERICAL_CONVENTIONS

    if camera_convention not in SPHERICAL_CONVENTIONS:
        raise CLIError(f"--camera-convention: expected one of {', '.join(SPHERICAL_CONVENTIONS)}, got "
                       f"{camera_convention!r}")
    dist = parse_distance(distance, fov)
    if not Path(mesh).is_file():
        raise CLIError(f"MESH {str(mesh)!r} does not exist or is not a file")
    with option_errors("MESH"):
        loaded = load_mesh(mesh)
    prepare_out_dir(out, overwrite=overwrite, stale=STALE)
    init_runtime(arch)

    normalised, centre, scale = loaded.normalized()
    cameras = turntable_cameras(views, (size, size), distance=dist, elevation=elevation, fov=fov,
                                convention=camera_convention)
    # Render and write a chunk of views at a time, so memory does not grow with --views.
    layout = gif_layout(views, (size, size))
    chunk = max(1, min(views, (64 * 2**20) // (16 * size * size)))
    frames, visible = [], False
    for start in range(0, views, chunk):
        rgba = render_views(normalised, cameras[start:start + chunk], sigma=sigma)
        visible = visible or bool((rgba[..., 3] > 0.5).any())
        frames += save_views(out, rgba, start, layout)
    if not visible:
        raise CLIError(f"MESH {str(mesh)!r}: nothing visible in any view (is the mesh degenerate?)")
    write_gif(out / "turntable.gif", frames)
    save_cameras_json(cameras, out / "cameras.json")
    info = {
        "mesh": str(mesh),
        "normalisation": {"centre": [float(c) for c in centre], "scale": float(scale),
                          "note": "views show (verts - centre) * scale"},
        "views": views, "image_size": [size, size], "fov": fov, "distance": dist, "elevation": elevation,
        "azimuths": [360.0 * i / views for i in range(views)], "camera_convention": camera_convention,
        "sigma": sigma,
    }
    (out / "render.json").write_text(json.dumps(info, indent=1) + "\n")
    gif_note = f" (one frame per {layout[0]} views)" if layout[0] > 1 else ""
    report = current_run()
    report.metrics.update(views=views, image_size=[size, size], distance=dist)
    report.wrote(out / VIEW_PATTERN.format(0), out / "turntable.gif", out / "cameras.json", out / "render.json")
    report.info(f"Wrote {views} views ({size}x{size}), turntable.gif{gif_note} and cameras.json to {out}")
