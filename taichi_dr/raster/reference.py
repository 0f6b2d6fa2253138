"""A dense, pure-PyTorch soft rasterizer: the reference for the Taichi primitive.

:func:`soft_rasterize_reference` evaluates exactly the formulas of docs/design.md ("The soft rasterizer
primitive") for every (pixel, face) pair with plain tensor operations, so torch autograd differentiates it.
It serves two purposes:

* the test suite's forward and gradient reference for ``taichi_dr.raster.soft_rasterize`` (small sizes,
  float64, ``torch.autograd.gradcheck``);
* the "pure PyTorch" baseline printed beside the Taichi timings in the benchmarks.

It is written the way one would write it in PyTorch: vectorised over pixels x faces, chunked over pixels so
the ``(B, P, F)`` temporaries stay bounded. When gradients are needed and there is more than one chunk, each
chunk runs under ``torch.utils.checkpoint``, so backward recomputes a chunk instead of keeping every chunk's
temporaries alive (memory O(chunk x F) instead of O(H x W x F), at the price of a second forward).

Skipped (pixel, face) pairs -- degenerate, culled or behind-the-near-plane faces, pixels past the coverage
cut-off, depths outside [near, far] -- are removed with ``torch.where`` on *safe* values: the masked-out
branch never divides by zero or overflows, so its (discarded) gradient is 0, never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from taichi_dr.core.bridge import check_tensor

# Only the settings container (and its background parser) is shared with the implementation under test, not
# any of its formulas.
from taichi_dr.raster.settings import RasterSettings, background_values

__all__ = ["soft_rasterize_reference"]

_DEGENERATE_AREA2 = 1e-8  # |signed pixel area x 2| below this: the face is skipped (design.md, step 1)
_SLIVER = 1e-4  # ... and below this x its longest edge squared: a sliver, height < 1e-4 x longest edge


@dataclass(frozen=True)
class _Params:
    """Plain floats derived from the settings and the image size."""

    sigma_px: float  # sigma in pixels^2
    cutoff_d2: float  # outside pixels with d2 above this have D < dist_eps and are skipped
    gamma: float
    eps: float
    near: float
    far: float
    hard: bool
    cull: bool


def soft_rasterize_reference(face_verts, image_size, face_attrs=None, settings=None, texture=None,
                             face_uvs=None, face_shading=None, pixel_chunk: int = 4096):
    """Soft-rasterize faces densely in PyTorch (same inputs, outputs and formulas as ``soft_rasterize``).

    Args:
        face_verts: ``(B, F, 3, 3)`` per face corner ``(u, v, z)``: pixel coordinates (pixel (i, j) has
            its centre at ``(j + 0.5, i + 0.5)``) and camera-space depth.
        image_size: ``(H, W)``.
        face_attrs: optional ``(B, F, 3, C)`` per-corner attributes, interpolated perspective-correctly.
        settings: a ``RasterSettings`` (or any object with its fields); None for the defaults.
        texture: optional ``(B or 1, Ht, Wt, Ct)`` texture, row 0 = top, sampled bilinearly, clamped to
            the edge; needs ``face_uvs``.
        face_uvs: ``(B or 1, F, 3, 2)`` per-corner UVs, (0, 0) = bottom-left of the texture.
        face_shading: optional ``(B, F, 3, Ct)`` per-corner factors multiplying the texture value.
        pixel_chunk: pixels per chunk; the ``(B, chunk, F)`` temporaries bound the memory.

    Returns:
        ``alpha (B, H, W)``, ``image (B, H, W, C + Ct)`` (attribute channels first, then texture
        channels) and ``pix_to_face (B, H, W)`` int32: the nearest face whose interior covers the pixel
        centre, -1 where none does (not differentiable). All floats have ``face_verts``'s dtype.

    Differentiable by torch autograd w.r.t. ``face_verts``, ``face_attrs``, ``texture``, ``face_uvs`` and
    ``face_shading``.
    """
    settings = settings if settings is not None else RasterSettings()
    height, width = _check_image_size(image_size)
    if isinstance(pixel_chunk, bool) or not isinstance(pixel_chunk, int) or pixel_chunk < 1:
        raise ValueError(f"pixel_chunk: expected a positive int, got {pixel_chunk!r}")
    params = _read_settings(settings, height, width)

    check_tensor("face_verts", face_verts, (None, None, 3, 3), dtype=(torch.float32, torch.float64))
    batch, n_faces = face_verts.shape[:2]
    dtype, device = face_verts.dtype, face_verts.device
    _check_optional("face_attrs", face_attrs, (batch, n_faces, 3, None), dtype, device)
    if texture is None:
        for name, x in (("face_uvs", face_uvs), ("face_shading", face_shading)):
            if x is not None:
                raise ValueError(f"{name} was given without a texture; pass texture=(B or 1, Ht, Wt, Ct)")
    else:
        _check_optional("texture", texture, (None, None, None, None), dtype, device)
        if texture.shape[0] not in (1, batch) or texture.shape[1] < 1 or texture.shape[2] < 1:
            raise ValueError(f"texture: expected shape ({batch} or 1, Ht>=1, Wt>=1, Ct), "
                             f"got {tuple(texture.shape)}")
        if face_uvs is None:
            raise ValueError("face_uvs: required with a texture, shape (B or 1, F, 3, 2)")
        _check_optional("face_uvs", face_uvs, (None, n_faces, 3, 2), dtype, device)
        if face_uvs.shape[0] not in (1, batch):
            raise ValueError(f"face_uvs: expected batch {batch} or 1, got shape {tuple(face_uvs.shape)}")
        _check_optional("face_shading", face_shading, (batch, n_faces, 3, texture.shape[3]), dtype, device)

    n_attr = 0 if face_attrs is None else face_attrs.shape[3]
    n_tex = 0 if texture is None else texture.shape[3]
    background = torch.tensor(background_values(settings.background, n_attr + n_tex), dtype=dtype,
                              device=device)

    if n_faces == 0:  # nothing to draw (the reductions over faces below need at least one)
        return (face_verts.new_zeros(batch, height, width),
                background.expand(batch, height, width, -1).clone(),
                torch.full((batch, height, width), -1, dtype=torch.int32, device=device))

    faces = _setup_faces(face_verts, params)
    if face_uvs is not None and face_uvs.shape[0] != batch:
        face_uvs = face_uvs.expand(batch, -1, -1, -1)

    # Pixel centres in row-major order (index i * W + j).
    rows, cols = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                                torch.arange(width, device=device, dtype=dtype), indexing="ij")
    centres = torch.stack([cols.reshape(-1) + 0.5, rows.reshape(-1) + 0.5], dim=-1)  # (H*W, 2)

    def run_chunk(chunk_centres):
        return _rasterize_chunk(chunk_centres, faces, params, face_attrs, texture, face_uvs, face_shading,
                                background)

    chunks = centres.split(pixel_chunk)
    inputs = (face_verts, face_attrs, texture, face_uvs, face_shading)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    outputs = []
    for chunk in chunks:
        if needs_grad and len(chunks) > 1:
            outputs.append(checkpoint(run_chunk, chunk, use_reentrant=False))
        else:
            outputs.append(run_chunk(chunk))
    alpha = torch.cat([o[0] for o in outputs], dim=1).reshape(batch, height, width)
    image = torch.cat([o[1] for o in outputs], dim=1).reshape(batch, height, width, n_attr + n_tex)
    pix_to_face = torch.cat([o[2] for o in outputs], dim=1).reshape(batch, height, width)
    return alpha, image, pix_to_face


# ----------------------------------------------------------------------------------------------------------
# argument checks


def _check_image_size(image_size) -> tuple[int, int]:
    try:
        height, width = image_size
    except (TypeError, ValueError):
        raise ValueError(f"image_size: expected (H, W), got {image_size!r}") from None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (height, width)):
        raise ValueError(f"image_size: expected two positive ints (H, W), got {image_size!r}")
    return height, width


def _check_optional(name, x, shape, dtype, device):
    if x is None:
        return
    check_tensor(name, x, shape, dtype=dtype)
    if x.device != device:
        raise ValueError(f"{name}: tensor is on {x.device} but face_verts is on {device}")


def _read_settings(settings, height: int, width: int) -> _Params:
    try:
        sigma, gamma, eps = float(settings.sigma), float(settings.gamma), float(settings.eps)
        dist_eps, near, far = float(settings.dist_eps), float(settings.near), float(settings.far)
        mode, cull = settings.mode, bool(settings.cull_backfaces)
        settings.background  # noqa: B018 - read it here so a missing field fails with this message
    except AttributeError as err:
        raise TypeError(f"settings: expected a RasterSettings-like object, {err}") from None
    if not all(math.isfinite(v) for v in (sigma, gamma, eps, near, far)):
        raise ValueError(f"settings: sigma, gamma, eps, near, far must be finite, got {settings}")
    if sigma <= 0 or gamma <= 0:
        raise ValueError(f"settings: sigma and gamma must be > 0, got {settings}")
    if not 0 < dist_eps < 0.5:
        raise ValueError(f"settings.dist_eps must be in (0, 0.5), got {dist_eps}")
    if not 0 < near < far:
        raise ValueError(f"settings: need 0 < near < far, got near={near}, far={far}")
    if mode not in ("soft", "hard"):
        raise ValueError(f"settings.mode must be 'soft' or 'hard', got {mode!r}")
    half = max(height, width) / 2.0
    sigma_px = sigma * half * half  # sigma is in NDC units where the longer side spans 2
    return _Params(sigma_px=sigma_px, cutoff_d2=sigma_px * math.log(1.0 / dist_eps - 1.0), gamma=gamma,
                   eps=eps, near=near, far=far, hard=mode == "hard", cull=cull)


# ----------------------------------------------------------------------------------------------------------
# the formulas


def _setup_faces(face_verts: torch.Tensor, params: _Params) -> dict[str, torch.Tensor]:
    """Per-face quantities, with skipped faces replaced by a harmless unit triangle at depth 1.

    Returns ``valid (B, F)`` bool, corners ``ax, ay, bx, by, cx, cy (B, 1, F)``, ``area2 (B, 1, F)`` and
    ``inv_z (B, 1, F, 3)`` (1 / corner depth), shaped to broadcast against ``(B, P, F)`` pixel-face pairs.
    """
    xy, z = face_verts[..., :2], face_verts[..., 2]  # (B, F, 3, 2), (B, F, 3)
    with torch.no_grad():
        a, b, c = xy[:, :, 0], xy[:, :, 1], xy[:, :, 2]
        area2 = (b - a)[..., 0] * (c - a)[..., 1] - (b - a)[..., 1] * (c - a)[..., 0]
        # The sliver test on edges scaled to ~1 (squares of huge coordinates would overflow).
        e1, e2 = b - a, c - a
        scale = torch.maximum(e1.abs().amax(-1), e2.abs().amax(-1)).clamp_min(1e-30)[..., None]
        u1, u2 = e1 / scale, e2 / scale
        longest2 = torch.stack([u1, u2, u2 - u1], -2).square().sum(-1).amax(-1)
        sliver = (u1[..., 0] * u2[..., 1] - u1[..., 1] * u2[..., 0]).abs() < _SLIVER * longest2
        valid = (area2.abs() >= _DEGENERATE_AREA2) & ~sliver & (z >= params.near).all(dim=-1)
        if params.cull:
            valid &= area2 <= 0  # front faces have negative signed pixel area (y points down)
    # Safe values: a skipped face's pairs are masked out later, and computing them on this triangle keeps
    # their discarded gradients finite (no division by a zero area, edge length or depth).
    dummy_xy = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=xy.dtype, device=xy.device)
    xy = torch.where(valid[..., None, None], xy, dummy_xy)
    z = torch.where(valid[..., None], z, torch.ones_like(z))
    ax, ay, bx, by, cx, cy = (xy[:, None, :, i, k] for i in range(3) for k in range(2))
    area2 = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    return {"valid": valid, "ax": ax, "ay": ay, "bx": bx, "by": by, "cx": cx, "cy": cy, "area2": area2,
            "inv_z": 1.0 / z[:, None]}


def _segment_d2(px, py, ax, ay, bx, by):
    """Squared distance from points p to segments [a, b] (broadcasting)."""
    ex, ey = bx - ax, by - ay
    # Edges of a non-degenerate face have nonzero length; the clamp only guards against underflow.
    len2 = (ex * ex + ey * ey).clamp_min(torch.finfo(ex.dtype).tiny)
    t = (((px - ax) * ex + (py - ay) * ey) / len2).clamp(0.0, 1.0)
    dx, dy = px - ax - t * ex, py - ay - t * ey
    return dx * dx + dy * dy


def _rasterize_chunk(centres, faces, params: _Params, face_attrs, texture, face_uvs, face_shading,
                     background):
    """All (pixel, face) pairs of one chunk of pixel centres ``(P, 2)``.

    Returns ``alpha (B, P)``, ``image (B, P, K)`` and ``pix_to_face (B, P)`` int32.
    """
    px, py = centres[None, :, 0, None], centres[None, :, 1, None]  # (1, P, 1)
    ax, ay, bx, by, cx, cy = (faces[k] for k in ("ax", "ay", "bx", "by", "cx", "cy"))

    # Steps 1-2: screen-space barycentrics; inside iff all >= 0 (either orientation, thanks to area2).
    w0 = ((bx - px) * (cy - py) - (by - py) * (cx - px)) / faces["area2"]
    w1 = ((cx - px) * (ay - py) - (cy - py) * (ax - px)) / faces["area2"]
    w2 = 1.0 - w0 - w1
    inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)  # (B, P, F)

    # Steps 3-5: squared distance to the nearest edge, cut-off, coverage logit x (D = sigmoid(x)).
    d2 = torch.minimum(_segment_d2(px, py, ax, ay, bx, by), _segment_d2(px, py, bx, by, cx, cy))
    d2 = torch.minimum(d2, _segment_d2(px, py, cx, cy, ax, ay))
    passes = faces["valid"][:, None, :] & (inside | (d2 <= params.cutoff_d2))
    x = torch.where(inside, d2, -d2) / params.sigma_px

    # Steps 6-7: clipped barycentrics, perspective correction, depth range. The clipped weights of a
    # non-degenerate face sum to >= 1 (the unclipped ones sum to 1), so the division is safe.
    wc = torch.stack([w0, w1, w2], dim=-1).clamp(0.0, 1.0)  # (B, P, F, 3)
    wc = wc / wc.sum(dim=-1, keepdim=True)
    wz = wc * faces["inv_z"]
    zp = 1.0 / wz.sum(dim=-1)  # 0 < inv_z <= 1 / near and wc sums to 1: finite
    wp = wz * zp[..., None]
    passes = passes & (zp >= params.near) & (zp <= params.far)

    # pix_to_face (both modes): the covering face with the smallest zp; argmin keeps the lowest index on ties.
    covers = passes & inside
    nearest = torch.where(covers, zp.detach(), torch.full_like(zp, math.inf)).argmin(dim=-1)  # (B, P)
    covered = covers.any(dim=-1)
    pix_to_face = torch.where(covered, nearest, torch.full_like(nearest, -1)).to(torch.int32)

    # Step 9: face values f (B, P, F, K).
    values = []
    if face_attrs is not None:
        values.append(torch.einsum("bpfi,bfic->bpfc", wp, face_attrs))
    if texture is not None:
        uv = torch.einsum("bpfi,bfik->bpfk", wp, face_uvs)
        texel = _bilinear(texture, uv)
        if face_shading is not None:
            texel = texel * torch.einsum("bpfi,bfic->bpfc", wp, face_shading)
        values.append(texel)
    if values:
        f = torch.cat(values, dim=-1) if len(values) > 1 else values[0]
    else:
        f = wp.new_zeros(wp.shape[:3] + (0,))

    if params.hard:
        alpha = covered.to(wp.dtype)
        index = nearest[:, :, None, None].expand(-1, -1, 1, f.shape[-1])
        picked = torch.gather(f, 2, index)[:, :, 0]  # (B, P, K)
        image = torch.where(covered[..., None], picked, background)
        return alpha, image, pix_to_face

    # Soft aggregation. alpha = 1 - prod(1 - D_j), with log(1 - sigmoid(x)) = -softplus(x) for stability.
    log_transmittance = -torch.where(passes, torch.nn.functional.softplus(x), torch.zeros_like(x)).sum(dim=-1)
    alpha = -torch.expm1(log_transmittance)

    # Softmax over normalised inverse depth, shifted by m = max(eps, max zn) so exp never overflows. The
    # image does not depend on m (it cancels between numerator and denominator), so m is detached.
    zn = (params.far - zp) / (params.far - params.near)
    zn_masked = torch.where(passes, zn, torch.full_like(zn, -math.inf)).detach()
    eps_column = zn.new_full(zn.shape[:2] + (1,), params.eps)
    m = torch.cat([zn_masked, eps_column], dim=-1).amax(dim=-1, keepdim=True)  # (B, P, 1)
    # zn -> m on skipped pairs so their exp(...) is 1, not an overflow whose zero gradient would be NaN.
    zn_safe = torch.where(passes, zn, m)
    weights = torch.where(passes, torch.sigmoid(x) * torch.exp((zn_safe - m) / params.gamma),
                          torch.zeros_like(x))
    weight_bg = torch.exp((params.eps - m) / params.gamma)  # (B, P, 1)
    numerator = torch.einsum("bpf,bpfk->bpk", weights, f) + weight_bg * background
    # >= 0: the face attaining m has weight D >= ~dist_eps, and exp(0) = 1 when no face passes.
    denominator = (weights.sum(dim=-1, keepdim=True) + weight_bg).clamp_min(torch.finfo(x.dtype).tiny)
    image = numerator / denominator
    return alpha, image, pix_to_face


def _bilinear(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Sample ``texture (Bt, Ht, Wt, Ct)`` at ``uv (B, P, F, 2)`` -> ``(B, P, F, Ct)``.

    Texel coordinates ``x = u * Wt - 0.5``, ``y = (1 - v) * Ht - 0.5`` (texel centres at integers, row 0
    at the top), bilinear, clamped to the edge. Differentiable w.r.t. the texture and ``uv``.
    """
    n_tex, height, width, channels = texture.shape
    # Clamping x to [-1, Wt] changes neither the value nor the gradient (beyond the outer texel centres the
    # clamped lookup is constant) and keeps the integer conversion below in range for any uv.
    x = (uv[..., 0] * width - 0.5).clamp(-1.0, float(width))
    y = ((1.0 - uv[..., 1]) * height - 0.5).clamp(-1.0, float(height))
    x0, y0 = x.detach().floor(), y.detach().floor()
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    ix0, iy0 = x0.long(), y0.long()
    ix = (ix0.clamp(0, width - 1), (ix0 + 1).clamp(0, width - 1))
    iy = (iy0.clamp(0, height - 1), (iy0 + 1).clamp(0, height - 1))
    flat = texture.reshape(n_tex, height * width, channels)
    batch = uv.shape[0]
    b = torch.arange(batch, device=uv.device)[:, None, None] if n_tex > 1 else torch.zeros(
        (1, 1, 1), dtype=torch.long, device=uv.device)

    def tap(r, c):
        return flat[b, r * width + c]  # (B, P, F, Ct)

    return ((1 - fy) * ((1 - fx) * tap(iy[0], ix[0]) + fx * tap(iy[0], ix[1]))
            + fy * ((1 - fx) * tap(iy[1], ix[0]) + fx * tap(iy[1], ix[1])))
