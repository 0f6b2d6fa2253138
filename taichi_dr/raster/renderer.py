"""Mesh renderer: mesh + cameras + lights -> images, by composing the small pieces.

    world verts --cameras--> camera space --shade (torch)--> per-corner values --clip_near (near plane,
    guard band)--> projected corners --soft_rasterize (Taichi)--> alpha, image channels --split--> rgb / depth /
    normals

Everything before the rasterizer is torch, so gradients reach vertices, colours, textures, cameras and
lights; the rasterizer's own backward is hand-written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from taichi_dr.core import bridge
from taichi_dr.core.camera import Cameras, project_points
from taichi_dr.core.mesh import Mesh, check_render_inputs, face_normals, vertex_normals
from taichi_dr.raster.clip import clip_near, guard_planes
from taichi_dr.raster.settings import RasterSettings
from taichi_dr.raster.shading import Lights, shade
from taichi_dr.raster.soft import soft_rasterize

OUTPUTS = ("rgb", "depth", "normals")
RASTER_FIELDS = ", ".join(f.name for f in dataclasses.fields(RasterSettings))
# Faces are clipped this much (relatively) in front of the near plane. The rasterizer drops a pixel whose
# interpolated depth is below `near`, and along a cut edge that depth is `near` itself in exact arithmetic:
# rounding would drop or keep each pixel there at random (float32 and float64 disagreeing by a whole soft
# edge, alpha 0.5). 1e-5 is far above float32's rounding of the depth (~1e-7) and moves the plane by
# 1e-6 units at near = 0.1.
NEAR_CLIP_SLACK = 1e-5


@dataclass
class RenderOutput:
    """alpha (B, H, W) soft silhouette; rgb (B, H, W, 3); depth (B, H, W) camera-space depth
    (softmax-aggregated, 0 on the background); normals (B, H, W, 3) world-space, aggregated;
    pix_to_face (B, H, W) int32 nearest covering face (-1 for none). Unrequested outputs are None."""

    alpha: torch.Tensor
    pix_to_face: torch.Tensor
    rgb: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    normals: torch.Tensor | None = None


def _per_view(x: torch.Tensor, B: int) -> torch.Tensor:
    return x.expand(B, *x.shape[1:]) if x.shape[0] == 1 else x


def _corner_gather(values: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """values (B, V, C), faces (F, 3) -> (B, F, 3, C)."""
    # index_select rather than values[:, faces]: its backward is index_add, not a sorting index_put.
    return values.index_select(1, faces.reshape(-1)).unflatten(1, tuple(faces.shape))


def render_mesh(mesh: Mesh, cameras: Cameras, lights: Lights | None = None,
                settings: RasterSettings | None = None, *, shading: str = "gouraud",
                outputs=("rgb",)) -> RenderOutput:
    """Render a mesh from every camera of a batch.

    mesh.verts (V, 3) or (B, V, 3) (one set per camera; may require grad); albedo from vertex colours,
    face colours or the UV texture (white if none). lights=None renders unlit albedo. shading: "gouraud"
    (lighting at vertices, interpolated) or "flat" (per face, as SoftRas). outputs: any of "rgb", "depth",
    "normals"; alpha and pix_to_face are always computed. Returns a RenderOutput with (B, H, W, ...) maps.
    """
    if settings is None:
        settings = RasterSettings()
    elif isinstance(settings, dict):
        try:
            settings = RasterSettings(**settings)
        except TypeError as e:
            raise TypeError(f"settings: {e} (RasterSettings takes {RASTER_FIELDS})") from None
    elif not isinstance(settings, RasterSettings):
        raise TypeError(f"settings: expected a taichi_dr.RasterSettings (or a dict of its fields), got "
                        f"{type(settings).__name__}")
    outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)  # "rgb" is one output, not r, g, b
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"outputs: unknown {sorted(unknown)}; choose from {OUTPUTS}")
    if shading not in ("gouraud", "flat"):
        raise ValueError(f"shading: expected 'gouraud' or 'flat', got {shading!r}")
    if not isinstance(cameras, Cameras):
        raise TypeError(f"cameras: expected taichi_dr.Cameras, got {type(cameras).__name__}")
    B = len(cameras)
    verts, faces = mesh.verts, mesh.faces
    if verts.dim() == 3 and verts.shape[0] not in (1, B):
        raise ValueError(f"mesh.verts: batch {verts.shape[0]} does not match {B} cameras")
    if verts.dtype != cameras.dtype:
        raise TypeError(f"mesh.verts is {verts.dtype} but the cameras are {cameras.dtype}")
    bridge.check_tensor("mesh.verts", verts, None)
    finite = {"mesh.verts": verts}
    if lights is not None:
        lights.validate(finite=False)
        finite.update({f"Lights.{k}": getattr(lights, k) for k in ("ambient", "directions", "colors", "specular")})
    bridge.check_finite(finite)  # one host read for all of them
    check_render_inputs(mesh)  # face indices in range, colours finite (cached per tensor: no per-step sync)
    world = _per_view(verts if verts.dim() == 3 else verts[None], B)  # (B, V, 3)
    cam = cameras.world_to_camera(world)  # (B, V, 3)

    # Per-corner channels, laid out [rgb or specular | depth | normals] (+ texture channels).
    chans: list[torch.Tensor] = []
    names: list[tuple[str, int]] = []
    background: list[float] = []
    textured = mesh.texture is not None and mesh.uvs is not None and "rgb" in outputs
    face_shading = None
    need_normals = "normals" in outputs or ("rgb" in outputs and lights is not None)
    if need_normals:
        if shading == "flat":
            n_face = face_normals(world, faces)  # (B, F, 3)
            normals_c = n_face[:, :, None, :].expand(-1, -1, 3, -1)
        else:
            normals_c = _corner_gather(vertex_normals(world, faces), faces)
    if "rgb" in outputs:
        albedo = None if textured else _albedo(mesh, B, world)
        diffuse = specular = None
        if lights is not None:
            points_c = _corner_gather(world, faces)
            eyes = cameras.camera_centers()
            Bf = points_c.shape[:2]
            diffuse, specular = shade(points_c.reshape(B, -1, 3), normals_c.reshape(B, -1, 3), eyes, lights)
            diffuse, specular = diffuse.reshape(*Bf, 3, 3), specular.reshape(*Bf, 3, 3)
        if textured:
            face_shading = diffuse  # multiplies the sampled texture (None: unlit)
            if specular is not None:
                chans.append(specular)
                names.append(("specular", 3))
                background += [0.0] * 3
        else:
            rgb_c = albedo if diffuse is None else albedo * diffuse + specular
            chans.append(rgb_c)
            names.append(("rgb", 3))
            background += settings.background_values(3)
    if "depth" in outputs:
        chans.append(_corner_gather(cam, faces)[..., 2:])
        names.append(("depth", 1))
        background += [0.0]
    if "normals" in outputs:
        chans.append(normals_c)
        names.append(("normals", 3))
        background += [0.0] * 3

    attr_chans = [c.expand(B, *c.shape[1:]) if c.shape[0] != B else c for c in chans]
    n_plain = sum(c.shape[-1] for c in attr_chans)
    if textured:
        attr_chans.append(mesh.corner_uvs()[None].expand(B, -1, -1, -1).to(cam))
        if face_shading is not None:
            attr_chans.append(face_shading)
    if bool((cam[..., 2] < settings.near).any()):
        # Some vertex is nearer than the near plane: clip per face corner (at the near plane, then the cut
        # faces' pieces at the guard band, see raster/clip.py), then project the corners.
        margin = guard_margin(settings, cameras.image_size)
        corners, face_index = clip_near(torch.cat([_corner_gather(cam, faces), *attr_chans], -1),
                                        settings.near * (1 + NEAR_CLIP_SLACK),
                                        guard_planes(cameras.K, cameras.image_size, margin))
        face_verts = project_points(corners[..., :3], cameras.K[:, None, None], settings.near)
        corner_attrs = corners[..., 3:]
    else:
        # The common case: project the V vertices once, then gather them into faces.
        face_verts = _corner_gather(project_points(cam, cameras.K[:, None], settings.near), faces)
        corner_attrs = torch.cat(attr_chans, -1) if attr_chans else None
        face_index = None
    if settings.cull_backfaces:
        # A mirrored camera (fx < 0, e.g. SoftRas's look_at) reverses the screen-space winding; swapping two
        # corners of its faces keeps the rasterizer's "front faces have negative signed area" test right.
        swap = cameras.mirrored[:, None, None, None]
        face_verts = torch.where(swap, face_verts[:, :, [0, 2, 1]], face_verts)
        if corner_attrs is not None:
            corner_attrs = torch.where(swap, corner_attrs[:, :, [0, 2, 1]], corner_attrs)
    face_verts = face_verts.contiguous()
    attrs = corner_attrs[..., :n_plain].contiguous() if n_plain > 0 else None
    texture = face_uvs = shading_c = None
    if textured:
        texture = mesh.texture[None].to(face_verts)
        face_uvs = corner_attrs[..., n_plain:n_plain + 2].contiguous()
        if face_shading is not None:
            shading_c = corner_attrs[..., n_plain + 2:].contiguous()
        background += settings.background_values(3)
    raster_settings = dataclasses.replace(settings, background=tuple(background) if background else 0.0)
    # Inputs were checked above (finite vertices, validated cameras): skip the per-corner NaN scan.
    alpha, image, pix_to_face = soft_rasterize(face_verts, cameras.image_size, attrs, raster_settings,
                                               texture, face_uvs, shading_c, check_finite=False)
    if face_index is not None:
        valid = pix_to_face >= 0
        mapped = torch.gather(face_index, 1, pix_to_face.clamp_min(0).long().flatten(1)).view_as(pix_to_face)
        pix_to_face = torch.where(valid, mapped.to(pix_to_face.dtype), pix_to_face)

    out = RenderOutput(alpha=alpha, pix_to_face=pix_to_face)
    offset = 0
    for name, n in names:
        chunk = image[..., offset:offset + n]
        offset += n
        if name == "rgb":
            out.rgb = chunk
        elif name == "specular":
            out.rgb = chunk  # the texture channels are added below
        elif name == "depth":
            out.depth = chunk[..., 0]
        elif name == "normals":
            out.normals = chunk
    if textured:
        tex_rgb = image[..., offset:offset + 3]
        out.rgb = tex_rgb if out.rgb is None else out.rgb + tex_rgb
    return out


def guard_margin(settings: RasterSettings, image_size: tuple[int, int]) -> float:
    """Pixels the guard band extends beyond each image border (see raster/clip.py).

    Clipped corners stay within a few image sizes of the image (float32 edge functions keep ~1e-3 px there),
    yet the band's edges are farther from every pixel than the coverage cut-off radius, and far enough that a
    pixel deep inside a face, whose nearest edge may become a band edge, has a coverage within exp(-88) of 1
    either way.
    """
    sigma_px = settings.sigma_px(image_size)
    return 4.0 * max(image_size) + max(math.sqrt(settings.cutoff_d2_px(image_size)), math.sqrt(88.0 * sigma_px)) + 2.0


def _albedo(mesh: Mesh, B: int, world: torch.Tensor) -> torch.Tensor:
    """Per-corner albedo (B or 1, F, 3, 3) from vertex colours, face colours, or white."""
    if mesh.vert_colors is not None:
        vc = mesh.vert_colors
        vc = vc if vc.dim() == 3 else vc[None]
        return _corner_gather(vc, mesh.faces).to(world)
    if mesh.face_colors is not None:
        fc = mesh.face_colors
        fc = fc if fc.dim() == 3 else fc[None]
        return fc[:, :, None, :].expand(-1, -1, 3, -1).to(world)
    return torch.ones((1, mesh.faces.shape[0], 3, 3), dtype=world.dtype, device=world.device)


class MeshRenderer:
    """Rasterizer settings and lights held together (PyTorch3D style): ``renderer(mesh, cameras)``."""

    def __init__(self, settings: RasterSettings | None = None, lights: Lights | None = None,
                 shading: str = "gouraud"):
        self.settings = settings or RasterSettings()
        self.lights = lights
        self.shading = shading

    def __call__(self, mesh: Mesh, cameras: Cameras, outputs=("rgb",)) -> RenderOutput:
        return render_mesh(mesh, cameras, self.lights, self.settings, shading=self.shading, outputs=outputs)
