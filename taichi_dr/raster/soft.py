"""`soft_rasterize`: the soft rasterizer primitive (SoftRas, Liu et al. 2019) on screen-space triangles.

Forward and backward live here together; the kernels are in `kernels.py`, the formulas in docs/design.md.
Cost follows covered pixels: each face is binned into the screen tiles its cut-off window touches, and a
pixel only visits its tile's faces. Memory is O(faces + pixels).
"""

from __future__ import annotations

import math

import taichi as ti
import torch

from taichi_dr.core import bridge, runtime
from taichi_dr.raster import kernels as K
from taichi_dr.raster.binning import bin_faces, face_chunk
from taichi_dr.raster.settings import RasterSettings

_FP = {torch.float32: ti.f32, torch.float64: ti.f64}


def _dummy(like: torch.Tensor) -> torch.Tensor:
    """A tiny stand-in for an absent optional input (kernels are compiled without reading it)."""
    return torch.zeros((1, 1, 1, 1), dtype=like.dtype, device=like.device)


def _params(settings: RasterSettings, image_size, like: torch.Tensor) -> torch.Tensor:
    cutoff = settings.cutoff_d2_px(image_size)
    hard = settings.mode == "hard"
    values = [settings.sigma_px(image_size), -1.0 if hard else cutoff, settings.gamma, settings.eps,
              settings.near, settings.far, 0.0 if hard else math.sqrt(cutoff), 0.0, 0.0]
    return torch.tensor(values, dtype=like.dtype, device=like.device)


# Texture gradients of the deterministic backward are int64 sums of round(value * scale): integer addition
# does not depend on the order. scale is a power of two (exact) chosen so that no sum can exceed
# 2^FIXED_POINT_BITS in magnitude, leaving 2^3 of headroom below int64's range for the rounding.
FIXED_POINT_BITS = 60


def _fixed_point_scale(g_tex_image: torch.Tensor, face_shading: torch.Tensor | None) -> torch.Tensor:
    """Scale for the fixed-point texture gradient, computed on the device (no host synchronisation).

    Each pixel's texture-channel gradient reaches the texels through softmax weights (summing to <= 1 over
    the pixel's faces), the shading factor and bilinear weights (summing to 1), so the sum of |contributions|
    over every texel is at most G = max|g_image[..., NA:]| * max(|shading|, or 1) * number of pixels, and
    scale = 2^floor(FIXED_POINT_BITS - log2 G) keeps every partial sum in range. Max is exact in any order, so
    the scale is reproducible; the quantum G / 2^60 is ~1e-18 of G (float64 epsilon is 2.2e-16)."""
    bound = g_tex_image.detach().abs().amax().to(torch.float64) * g_tex_image[..., 0].numel()
    if face_shading is not None:
        bound = bound * face_shading.detach().abs().amax().to(torch.float64)
    exponent = torch.floor(FIXED_POINT_BITS - torch.log2(bound)).clamp(-120.0, 120.0)  # log2(0) = -inf: 120
    return torch.exp2(exponent).to(g_tex_image.dtype)


def _face_chunk(n_views: int, n_faces: int) -> int:
    """Faces per thread of the per-face kernels (face_setup, reduce_entry_grads): on the CPU, binning's
    (view, chunk) split, since a task per face cost more in scheduling than in work (measured on B1: 324k
    faces); on a GPU one thread per face, as before."""
    return face_chunk(n_views, n_faces, 1, "cpu") if runtime.ensure_init() == "cpu" else 1


def _face_start(face_tiles: torch.Tensor) -> torch.Tensor:
    """(B * F + 1,) int32 row starts from the per-face tile counts face_tiles (B, F) int32."""
    face_start = torch.zeros(face_tiles.numel() + 1, dtype=torch.int32, device=face_tiles.device)
    torch.cumsum(face_tiles.view(-1), 0, dtype=torch.int32, out=face_start[1:])  # <= the pair count < 2^31
    return face_start


class SoftRasterizeOp(bridge.KernelOp):
    """Inputs: face_verts, face_attrs, texture, face_uvs, face_shading (absent ones as None).
    Outputs: alpha (B, H, W), image (B, H, W, NA + NT), pix_to_face (B, H, W) int32."""

    differentiable_outputs = (0, 1)

    def __init__(self, image_size: tuple[int, int], settings: RasterSettings, n_attrs: int, n_tex: int,
                 shaded: bool, needs_grad: bool = True):
        self.image_size = image_size
        self.settings = settings
        self.n_attrs, self.n_tex, self.shaded = n_attrs, n_tex, shaded
        self.needs_grad = needs_grad  # a backward may follow: the deterministic one's rows are binned too

    def _static_args(self, fv):
        s = self.settings
        block = 1 if runtime.ensure_init() == "cpu" else 128
        return (self.n_attrs, self.n_tex, self.shaded, s.mode == "hard", s.cull_backfaces, _FP[fv.dtype], block)

    def forward(self, face_verts, face_attrs, texture, face_uvs, face_shading):
        H, W = self.image_size
        B = face_verts.shape[0]
        nc = self.n_attrs + self.n_tex
        params = _params(self.settings, self.image_size, face_verts)
        # The deterministic backward's rows: one per (tile, face) bin entry, laid out face by face from the
        # rectangles of tiles binning's count pass computes anyway (kernels.py, "Deterministic backward").
        rows = None
        if self.needs_grad and self.settings.deterministic_on(runtime.ensure_init()):
            rows = (torch.empty((B, face_verts.shape[1], 3), dtype=torch.int32, device=face_verts.device),
                    torch.empty(face_verts.shape[:2], dtype=torch.int32, device=face_verts.device))
        offsets, tile_faces, tiles_x, n_tiles, ts = bin_faces(face_verts, self.image_size, self.settings, params,
                                                              rows)
        opts = dict(dtype=face_verts.dtype, device=face_verts.device)
        alpha = torch.empty((B, H, W), **opts)
        image = torch.empty((B, H, W, max(nc, 1)), **opts)
        pix_to_face = torch.empty((B, H, W), dtype=torch.int32, device=face_verts.device)
        stats = torch.empty((B, H, W, 4), **opts)
        background = torch.tensor(self.settings.background_values(max(nc, 1)), **opts)
        inputs = [x if x is not None else _dummy(face_verts)
                  for x in (face_attrs, texture, face_uvs, face_shading)]
        setup = torch.empty((B, face_verts.shape[1], K.SETUP), **opts)
        K.face_setup(face_verts, params, setup, _face_chunk(B, face_verts.shape[1]), _FP[face_verts.dtype])
        K.rasterize_forward(face_verts, *inputs, setup, params, background, offsets, tile_faces,
                            alpha, image, pix_to_face, stats, ts, tiles_x, n_tiles,
                            *self._static_args(face_verts))
        # alpha and image become autograd outputs (non-leaf) once returned; keep detached aliases so the
        # backward kernel never touches an autograd tensor.
        saved = (face_verts, inputs, setup, params, offsets, tile_faces, ts, tiles_x, n_tiles, alpha.detach(),
                 image.detach(), pix_to_face, stats,
                 (face_attrs is not None, texture is not None, face_shading is not None), rows)
        return (alpha, image[..., :nc], pix_to_face), saved

    def backward(self, saved, g_alpha, g_image, _g_pix_to_face):
        (face_verts, inputs, setup, params, offsets, tile_faces, ts, tiles_x, n_tiles, alpha, image, pix_to_face,
         stats, present, rows) = saved
        face_attrs, texture, face_uvs, face_shading = inputs
        if g_image.shape[-1] == 0:
            g_image = torch.zeros_like(image)
        g_verts = torch.zeros_like(face_verts)
        g_attrs = torch.zeros_like(face_attrs)
        g_texture = torch.zeros_like(texture)
        g_shading = torch.zeros_like(face_shading)
        has_attrs, has_tex, has_shading = present
        deterministic = self.settings.deterministic_on(runtime.ensure_init())
        entry_grads = tex_fixed = _dummy(face_verts)[0, 0]
        face_rects = face_start = torch.zeros((1, 1, 1), dtype=torch.int32, device=face_verts.device)
        params = params.clone()
        if self.n_attrs + self.n_tex == 0:
            # Silhouette pixels whose alpha gradient factor g_alpha * T is below the dtype's rounding of the
            # largest one are skipped (all pairs there; exactly zero ones always were). On device, no sync.
            factor = (g_alpha.detach().abs() * stats[..., 3]).amax()
            params[K.SKIP_BELOW] = factor * (torch.finfo(factor.dtype).eps / 2)
        if deterministic:
            columns = K.entry_columns(self.n_attrs, self.n_tex, self.shaded)
            # needs_grad was true at the forward (a backward runs only if some input required grad).
            face_rects, face_start = rows[0], _face_start(rows[1])
            # One row per bin entry, each written by its tile's thread before it is read.
            entry_grads = torch.empty((tile_faces.shape[0], columns), dtype=face_verts.dtype,
                                      device=face_verts.device)
            if has_tex:
                tex_fixed = torch.zeros(texture.shape, dtype=torch.int64, device=texture.device)
                params[K.FIXED] = _fixed_point_scale(g_image[..., self.n_attrs:], face_shading if self.shaded
                                                     else None)
        K.rasterize_backward(face_verts, face_attrs, texture, face_uvs, face_shading, setup, params, offsets,
                             tile_faces, alpha, image, pix_to_face, stats, g_alpha, g_image,
                             g_verts, g_attrs, g_texture, g_shading, entry_grads, tex_fixed, face_rects, face_start,
                             ts, tiles_x, n_tiles, *self._static_args(face_verts), deterministic)
        if deterministic:
            K.reduce_entry_grads(face_start, entry_grads, g_verts, g_attrs, g_shading,
                                 _face_chunk(*face_verts.shape[:2]), self.n_attrs, self.n_tex, self.shaded,
                                 self.n_attrs + self.n_tex > 0)
            if has_tex:
                g_texture = (tex_fixed.to(torch.float64) / params[K.FIXED].to(torch.float64)).to(texture.dtype)
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
    if texture is not None and settings.deterministic and runtime.ensure_init() == "vulkan":
        # Fixed-point texture gradients need integer atomics inside loops, which lavapipe gets wrong (measured).
        raise ValueError("RasterSettings.deterministic: not available with a texture on the vulkan backend; "
                         "use deterministic=None/False there, or the cpu/cuda backend")
    names = ("face_verts", "face_attrs", "texture", "face_uvs", "face_shading")
    tensors = (face_verts, face_attrs, texture, face_uvs, face_shading)
    for name, x in zip(names, tensors, strict=True):
        if x is not None:
            bridge.to_kernel(name, x)  # device check with a clear message
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    op = SoftRasterizeOp(image_size, settings, n_attrs, n_tex, shaded, needs_grad)
    return bridge.apply(op, *tensors)
