"""``tdr make-dataset``: render a mesh with this engine into an IDR dataset with known geometry.

* ``make-dataset MESH --out DIR``: ``image/``, ``mask/``, ``cameras.npz`` (IDR layout) and ``gt_mesh.ply`` (the
  mesh in its own units), from views spread over a sphere around the object.
* ``--background R,G,B`` puts a colour behind the object; ``--floor`` stands the object on a textured ground
  plane (a checkerboard over a colour gradient, so that it has features to match), like DTU's table: partly
  inside the unit bounding sphere and partly outside, seen only from above (``--min-elevation``). Masks and
  ``gt_mesh.ply`` stay the object alone, so these scenes test reconstruction without masks against known
  geometry.

The command is a plain function registered on ``app`` here; ``apps.main`` registers it on ``tdr``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import typer

from apps.command import current_run, tdr_command
from apps.common import CLIError, available_memory_bytes, init_runtime, prepare_out_dir

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False)

# The object fills a sphere of this radius in the normalised frame (inside IDR's unit bounding sphere).
OBJECT_RADIUS = 0.8
# Floor checker cells are this many object radii wide, whatever the floor's size.
FLOOR_CELL = 0.5
MAX_FLOOR_SIZE = 20.0  # in object radii: 80 x 80 cells, 12800 faces
FLOOR_MIN_ELEVATION = 10.0  # degrees: the default --min-elevation with --floor
DARK_TILE = 0.6  # the darker checker tiles are the gradient times this


def parse_color(text: str, option: str) -> tuple[float, float, float]:
    """``"R,G,B"`` or one grey value, each in [0, 1] -> ``(r, g, b)``; CLIError naming ``option`` otherwise."""
    expected = f"{option}: expected one grey value or R,G,B, each a number in [0, 1], got {text!r}"
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, 3):
        raise CLIError(expected)
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise CLIError(expected) from None
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise CLIError(expected)
    return (values[0],) * 3 if len(values) == 1 else tuple(values)


def floor_albedo(x: torch.Tensor, z: torch.Tensor, half_size: float, cells: int) -> torch.Tensor:
    """Albedo of the floor ``|x|, |z| <= half_size`` (the plane's own coordinates) at points ``x, z (...)`` ->
    ``(..., 3)``: constant over each of the ``cells x cells`` checker cells (the value at the cell's centre),
    a warm-to-cool gradient across x and a brightness ramp along z, the dark tiles ``DARK_TILE`` times it."""
    width = 2.0 * half_size / cells
    i = ((x + half_size) / width).floor().clamp(0, cells - 1)
    k = ((z + half_size) / width).floor().clamp(0, cells - 1)
    u = (i + 0.5) / cells  # cell centre, in [0, 1] across the floor
    w = (k + 0.5) / cells
    gradient = torch.stack([0.45 + 0.45 * u, 0.40 + 0.35 * w, 0.85 - 0.45 * u], dim=-1)
    dark = torch.remainder(i + k, 2) == 1
    return gradient * torch.where(dark, DARK_TILE, 1.0)[..., None]


def floor_mesh(height: float, half_size: float, cells: int, device=None):
    """The floor: the square ``|x|, |z| <= half_size`` in the plane ``y = height``, ``cells x cells``
    checker cells of two triangles each, face colours from :func:`floor_albedo`, normals +y (up)."""
    from taichi_dr.core.mesh import Mesh

    ticks = torch.linspace(-half_size, half_size, cells + 1, dtype=torch.float64)
    gx, gz = torch.meshgrid(ticks, ticks, indexing="ij")  # vertex (a, b) at (ticks[a], ticks[b])
    verts = torch.stack([gx, torch.full_like(gx, height), gz], dim=-1).reshape(-1, 3)
    a, b = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
    v00, v01 = a * (cells + 1) + b, a * (cells + 1) + b + 1  # (x0, z0), (x0, z1)
    v10, v11 = v00 + cells + 1, v01 + cells + 1  # (x1, z0), (x1, z1)
    # (x0,z0) -> (x0,z1) -> (x1,z0): (dz e_z) x (dx e_x) = dx dz e_y, i.e. counter-clockwise seen from above.
    faces = torch.cat([torch.stack([v00, v01, v10], -1).reshape(-1, 3),
                       torch.stack([v10, v01, v11], -1).reshape(-1, 3)])
    centres = verts[faces].mean(1)
    colors = floor_albedo(centres[:, 0], centres[:, 2], half_size, cells)
    return Mesh(verts=verts.float(), faces=faces.long(), face_colors=colors.float(), name="floor").validate().to(
        device=device)


def view_angles(views: int, min_elevation: float) -> tuple[np.ndarray, np.ndarray]:
    """Fibonacci spiral of ``views`` directions, evenly spread over the part of the sphere with elevation
    >= ``min_elevation`` (degrees; -90: the whole sphere) -> ``(elevation, azimuth)`` in degrees, ``(views,)``."""
    i = np.arange(views) + 0.5
    lowest = math.sin(math.radians(min_elevation))
    y = 1 - (1 - lowest) * i / views  # uniform in height = uniform in area on the sphere (Archimedes)
    phi = i * math.pi * (3 - math.sqrt(5))
    return np.degrees(np.arcsin(y)), np.degrees(phi) % 360


@app.command("make-dataset")
@tdr_command("make-dataset", summary_table=True)
def make_dataset_command(
    mesh: Path = typer.Argument(..., help="Mesh to render (.obj with texture, .ply, .glb, .off)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (IDR layout)."),
    views: int = typer.Option(32, "--views", "-n", help="Number of views (spread over a sphere)."),
    size: int = typer.Option(200, "--size", "-s", help="Image size in pixels (square)."),
    fov: float = typer.Option(30.0, help="Full horizontal field of view in degrees."),
    sigma: float = typer.Option(1e-6, help="Soft rasterizer sharpness (small = crisp edges)."),
    background: str = typer.Option("0", help="Colour behind the object: R,G,B or one grey value, in [0, 1]."),
    floor: bool = typer.Option(False, "--floor/--no-floor",
                               help="Stand the object on a textured ground plane (+y up; in the images, not the "
                                    "masks)."),
    floor_size: float = typer.Option(3.0, help="Half-width of the square floor, in object radii (<= 20)."),
    min_elevation: float = typer.Option(
        None, help=f"Lowest camera elevation in degrees (default: -90, the whole sphere; {FLOOR_MIN_ELEVATION:g} "
                   "with --floor, which needs > 0)."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out folder."),
    arch: str = typer.Option(None, help="Taichi backend: auto, cpu, cuda or vulkan."),
) -> None:
    """Render MESH into an IDR dataset (image/, mask/, cameras.npz) plus gt_mesh.ply, in the mesh's units.

    Example: tdr make-dataset spot.obj --views 32 --size 200 --floor --out runs/spot_data
    """
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
    background_rgb = parse_color(background, "--background")
    if not (math.isfinite(floor_size) and 0 < floor_size <= MAX_FLOOR_SIZE):
        raise CLIError(f"--floor-size: expected object radii in (0, {MAX_FLOOR_SIZE:g}], got {floor_size}")
    if min_elevation is None:
        min_elevation = FLOOR_MIN_ELEVATION if floor else -90.0
    if not (math.isfinite(min_elevation) and -90 <= min_elevation < 90):
        raise CLIError(f"--min-elevation: expected degrees in [-90, 90), got {min_elevation}")
    if floor and not min_elevation > 0:
        # A camera at or below the floor's plane would see it from below (or edge on), in front of the object.
        raise CLIError(f"--min-elevation: with --floor the cameras must look down on the floor, expected degrees "
                       f"in (0, 90), got {min_elevation}")
    # All views are held in memory (RGB float and mask) until they are written.
    need, free = views * size * size * 13, available_memory_bytes(torch.device("cpu"))
    if free is not None and need > free // 2:
        raise CLIError(f"--views {views} at --size {size}: the images need about {need / 2**30:.1f} GiB but "
                       f"{free / 2**30:.1f} GiB is free; use fewer or smaller views")
    loaded = load_mesh(mesh)
    prepare_out_dir(out, overwrite=overwrite,
                    stale=("image/*.png", "mask/*.png", "cameras.npz", "gt_mesh.ply", "config.toml"))
    init_runtime(arch)
    # Normalised frame: the object fills a sphere of radius OBJECT_RADIUS, centred at the origin.
    normalised, centre, scale = loaded.normalized()
    radius = OBJECT_RADIUS
    normalised = normalised.with_verts(normalised.verts * radius)
    s = np.eye(4)
    s[:3, :3] *= 1.0 / (scale * radius)
    s[:3, 3] = centre.double().cpu().numpy()
    # Fibonacci sphere (or cap) of view directions; distance so the object spans ~80% of the image.
    elevation, azimuth = view_angles(views, min_elevation)
    distance = radius / math.sin(math.atan(0.8 * math.tan(math.radians(fov) / 2)))
    cams = Cameras.from_spherical(torch.full((views,), distance, dtype=torch.float64),
                                  torch.from_numpy(elevation), torch.from_numpy(azimuth), fov=fov,
                                  image_size=(size, size), convention="opencv").to(dtype=torch.float32)
    from taichi_dr.core import runtime

    dev = runtime.device()
    settings = RasterSettings(sigma=sigma, far=1000.0)
    lights = Lights.default(device=dev)
    floor_height = float(normalised.verts[:, 1].min())  # touching the object's lowest point
    floor_cells = max(2, round(2 * floor_size / FLOOR_CELL))
    ground = floor_mesh(floor_height, floor_size * radius, floor_cells, dev) if floor else None
    # Hard coverage for the floor: soft coverage leaks the background through its inner edges (a pixel centre on
    # an edge shared by two faces gets alpha 0.5-0.75), which shows as bright dots along the checker lines.
    floor_settings = RasterSettings(mode="hard", far=1000.0)
    behind = torch.tensor(background_rgb, dtype=torch.float32)
    images, masks = [], []
    for start in range(0, views, 8):
        batch = cams[start:start + 8].to(device=dev)
        r = render_mesh(normalised.to(device=dev), batch, lights, settings, outputs=("rgb",))
        rgb = r.rgb if r.rgb is not None else r.alpha[..., None].expand(-1, -1, -1, 3)
        if ground is not None:
            # Layers: object over floor over background. This is what one joint render would show: every
            # camera and every object point lie above the floor's plane, so the segment between them does too
            # and the floor never hides the object. Separate layers also need no shared colour kind (the
            # object may be textured) and have no z-fighting where a flat base lies on the floor.
            g = render_mesh(ground, batch, lights, floor_settings, outputs=("rgb",))
            behind_object = g.rgb.cpu() * g.alpha.cpu()[..., None] + (1 - g.alpha.cpu()[..., None]) * behind
        else:
            behind_object = behind
        alpha = r.alpha.cpu()[..., None]
        images.append((rgb.cpu() * alpha + (1 - alpha) * behind_object).clamp(0, 1))
        masks.append((r.alpha > 0.5).cpu())
    masks = torch.cat(masks)
    if not bool(masks.flatten(1).any(1).all()):
        raise CLIError(f"MESH {str(mesh)!r}: some views see nothing (degenerate mesh?)")
    write_idr(out, torch.cat(images), masks, cams, s, overwrite=True)
    gt = replace(loaded, vert_colors=None, face_colors=None, uvs=None, face_uvs_idx=None, texture=None)
    save_mesh(gt, out / "gt_mesh.ply")
    where = ""
    if floor:
        world_height = float(s[1, 1] * floor_height + s[1, 3])
        where = f" (floor at y = {world_height:.6g} in the mesh's units)"
        current_run().metrics["floor_height"] = world_height
    report = current_run()
    report.metrics.update(views=views, image_size=[size, size])
    report.wrote(out / "image", out / "mask", out / "cameras.npz", out / "gt_mesh.ply")
    report.info(f"Wrote {views} views ({size}x{size}), cameras.npz and gt_mesh.ply to {out}{where}")
