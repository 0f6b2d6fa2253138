"""`soft_rasterize`: the soft rasterizer primitive (SoftRas, Liu et al. 2019) on screen-space triangles.

Forward and backward live here together; the kernels are in `kernels.py`, the formulas in docs/design.md.
Cost follows covered pixels: each face is binned into the screen tiles its cut-off window touches, and a
pixel only visits its tile's faces. Memory is O(faces + pixels).
"""

from __future__ import annotations

import math

import taichi as ti
import torch

from .. import bridge, runtime
from . import kernels as K
from .settings import RasterSettings

_FP = {torch.float32: ti.f32, torch.float64: ti.f64}


def _dummy(like: torch.Tensor) -> torch.Tensor:
    """A tiny stand-in for an absent optional input (kernels are compiled without reading it)."""
    return torch.zeros((1, 1, 1, 1), dtype=like.dtype, device=like.device)


def _params(settings: RasterSettings, image_size, like: torch.Tensor) -> torch.Tensor:
    cutoff = settings.cutoff_d2_px(image_size)
    hard = settings.mode == "hard"
    values = [settings.sigma_px(image_size), -1.0 if hard else cutoff, settings.gamma, settings.eps,
              settings.near, settings.far, 0.0 if hard else math.sqrt(cutoff), 0.0]
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def bin_faces(face_verts: torch.Tensor, image_size: tuple[int, int], settings: RasterSettings,
              params: torch.Tensor | None = None):
    """Lists, per screen tile, the faces whose cut-off window reaches it.

    face_verts (B, F, 3, 3) -> (tile_offsets (B * T + 1,) int32, tile_faces (N,) int32, tiles_x, n_tiles,
    tile side):
    tile s of view b holds ``tile_faces[tile_offsets[b * T + s] : tile_offsets[b * T + s + 1]]``, in
    ascending face order.
    """
    H, W = image_size
    B = face_verts.shape[0]
    ts = settings.tile_for(B, image_size, runtime.ensure_init())
    tiles_x, tiles_y = -(-W // ts), -(-H // ts)
    n_tiles = tiles_x * tiles_y
    params = _params(settings, image_size, face_verts) if params is None else params
    fp = _FP[face_verts.dtype]
    dev = face_verts.device
    counts = torch.zeros((B, n_tiles), dtype=torch.int32, device=dev)
    K.count_tiles(face_verts, params, counts, W, H, ts, tiles_x, settings.cull_backfaces, fp)
    offsets = torch.zeros(B * n_tiles + 1, dtype=torch.int32, device=dev)
    torch.cumsum(counts.view(-1), 0, out=offsets[1:])
    total = int(offsets[-1])
    tile_faces = torch.empty(max(total, 1), dtype=torch.int32, device=dev)
    cursor = torch.zeros((B, n_tiles), dtype=torch.int32, device=dev)
    K.fill_tiles(face_verts, params, offsets, cursor, tile_faces, W, H, ts, tiles_x,
                 settings.cull_backfaces, fp)
    return offsets, tile_faces, tiles_x, n_tiles, ts


class SoftRasterizeOp(bridge.KernelOp):
    """Inputs: face_verts, face_attrs, texture, face_uvs, face_shading (absent ones as None).
    Outputs: alpha (B, H, W), image (B, H, W, NA + NT), pix_to_face (B, H, W) int32."""

    differentiable_outputs = (0, 1)

    def __init__(self, image_size: tuple[int, int], settings: RasterSettings, n_attrs: int, n_tex: int,
                 shaded: bool):
        self.image_size = image_size
        self.settings = settings
        self.n_attrs, self.n_tex, self.shaded = n_attrs, n_tex, shaded

    def _static_args(self, fv):
        s = self.settings
        block = 1 if runtime.ensure_init() == "cpu" else 128
        return (self.n_attrs, self.n_tex, self.shaded, s.mode == "hard", s.cull_backfaces, _FP[fv.dtype], block)

    def forward(self, face_verts, face_attrs, texture, face_uvs, face_shading):
        H, W = self.image_size
        B = face_verts.shape[0]
        nc = self.n_attrs + self.n_tex
        params = _params(self.settings, self.image_size, face_verts)
        offsets, tile_faces, tiles_x, n_tiles, ts = bin_faces(face_verts, self.image_size, self.settings, params)
        opts = dict(dtype=face_verts.dtype, device=face_verts.device)
        alpha = torch.empty((B, H, W), **opts)
        image = torch.empty((B, H, W, max(nc, 1)), **opts)
        pix_to_face = torch.empty((B, H, W), dtype=torch.int32, device=face_verts.device)
        stats = torch.empty((B, H, W, 3), **opts)
        background = torch.tensor(self.settings.background_values(max(nc, 1)), **opts)
        inputs = [x if x is not None else _dummy(face_verts)
                  for x in (face_attrs, texture, face_uvs, face_shading)]
        setup = torch.empty((B, face_verts.shape[1], K.SETUP), **opts)
        K.face_setup(face_verts, params, setup, _FP[face_verts.dtype])
        K.rasterize_forward(face_verts, *inputs, setup, params, background, offsets, tile_faces,
                            alpha, image, pix_to_face, stats, ts, tiles_x, n_tiles,
                            *self._static_args(face_verts))
        # alpha and image become autograd outputs (non-leaf) once returned; keep detached aliases so the
        # backward kernel never touches an autograd tensor.
        saved = (face_verts, inputs, setup, params, offsets, tile_faces, ts, tiles_x, n_tiles, alpha.detach(),
                 image.detach(), pix_to_face, stats,
                 (face_attrs is not None, texture is not None, face_shading is not None))
        return (alpha, image[..., :nc], pix_to_face), saved

    def backward(self, saved, g_alpha, g_image, _g_pix_to_face):
        (face_verts, inputs, setup, params, offsets, tile_faces, ts, tiles_x, n_tiles, alpha, image, pix_to_face,
         stats, present) = saved
        face_attrs, texture, face_uvs, face_shading = inputs
        if g_image.shape[-1] == 0:
            g_image = torch.zeros_like(image)
        g_verts = torch.zeros_like(face_verts)
        g_attrs = torch.zeros_like(face_attrs)
        g_texture = torch.zeros_like(texture)
        g_shading = torch.zeros_like(face_shading)
        K.rasterize_backward(face_verts, face_attrs, texture, face_uvs, face_shading, setup, params, offsets,
                             tile_faces, alpha, image, pix_to_face, stats, g_alpha, g_image,
                             g_verts, g_attrs, g_texture, g_shading, ts, tiles_x, n_tiles,
                             *self._static_args(face_verts))
        has_attrs, has_tex, has_shading = present
        return (g_verts, g_attrs if has_attrs else None, g_texture if has_tex else None, None,
                g_shading if has_shading else None)


def soft_rasterize(face_verts: torch.Tensor, image_size: tuple[int, int], face_attrs: torch.Tensor | None = None,
                   settings: RasterSettings | None = None, texture: torch.Tensor | None = None,
                   face_uvs: torch.Tensor | None = None, face_shading: torch.Tensor | None = None,
                   check_finite: bool = True):
    """Soft-rasterize screen-space triangles, differentiably.

    Args:
        face_verts: (B, F, 3, 3) per face corner (u, v, z): pixel coordinates (origin at the image's top-left
            corner, pixel centres at +0.5) and camera-space depth. Faces with a corner nearer than
            ``settings.near`` are skipped: clip them first (the renderer does).
        image_size: (H, W).
        face_attrs: (B, F, 3, C) per-corner attributes to interpolate and aggregate (colours, depth, ...).
        settings: RasterSettings (sigma, gamma, ...); defaults to SoftRas's.
        texture: (1 or B, Ht, Wt, Ct) image sampled bilinearly at the interpolated ``face_uvs``
            (1 or B, F, 3, 2), optionally multiplied by interpolated ``face_shading`` (B, F, 3, Ct).
        check_finite: scan the inputs for NaN/Inf (a caller that validated its own inputs may skip it).

    Returns:
        alpha (B, H, W): soft silhouette 1 - prod(1 - D_j);
        image (B, H, W, C + Ct): aggregated face values (SoftRas softmax over depth with a background term);
        pix_to_face (B, H, W) int32: nearest face whose interior covers the pixel, -1 where none.
    Gradients reach face_verts, face_attrs, texture and face_shading.
    """
    settings = settings or RasterSettings()
    if not (isinstance(image_size, (tuple, list)) and len(image_size) == 2
            and all(isinstance(n, int) and n > 0 for n in image_size)):
        raise ValueError(f"image_size: expected (H, W) positive ints, got {image_size!r}")
    image_size = (int(image_size[0]), int(image_size[1]))
    bridge.check_tensor("face_verts", face_verts, (None, None, 3, 3), dtype=bridge.FLOAT_DTYPES, finite=check_finite)
    if face_verts.dtype == torch.float64 and runtime.ensure_init() == "vulkan":
        raise TypeError("face_verts: float64 is not supported on the vulkan backend (SPIR-V has no 64-bit "
                        "exp); use float32, or the cpu/cuda backend for float64")
    B, F = face_verts.shape[:2]
    if F == 0:
        raise ValueError("face_verts: no faces to rasterize (F = 0)")
    dt = face_verts.dtype
    n_attrs = n_tex = 0
    if face_attrs is not None:
        bridge.check_tensor("face_attrs", face_attrs, (B, F, 3, None), dtype=dt, finite=check_finite)
        n_attrs = face_attrs.shape[-1]
    shaded = False
    if texture is not None:
        bridge.check_tensor("texture", texture, (None, None, None, None), dtype=dt, finite=check_finite)
        if texture.shape[0] not in (1, B) or min(texture.shape[1:]) < 1:
            raise ValueError(f"texture: expected (1 or {B}, Ht, Wt, C), got {tuple(texture.shape)}")
        if face_uvs is None:
            raise ValueError("face_uvs: required when a texture is given, shape (1 or B, F, 3, 2)")
        bridge.check_tensor("face_uvs", face_uvs, (None, F, 3, 2), dtype=dt, finite=check_finite)
        if face_uvs.shape[0] not in (1, B):
            raise ValueError(f"face_uvs: expected batch 1 or {B}, got {face_uvs.shape[0]}")
        n_tex = texture.shape[-1]
        if face_shading is not None:
            bridge.check_tensor("face_shading", face_shading, (B, F, 3, n_tex), dtype=dt, finite=check_finite)
            shaded = True
    elif face_uvs is not None or face_shading is not None:
        raise ValueError("face_uvs / face_shading: given without a texture")
    names = ("face_verts", "face_attrs", "texture", "face_uvs", "face_shading")
    tensors = (face_verts, face_attrs, texture, face_uvs, face_shading)
    for name, x in zip(names, tensors, strict=True):
        if x is not None:
            bridge.to_kernel(name, x)  # device check with a clear message
    op = SoftRasterizeOp(image_size, settings, n_attrs, n_tex, shaded)
    return bridge.apply(op, *tensors)
