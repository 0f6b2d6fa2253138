"""Clipping of triangles in camera space, in torch (so it is differentiable): against the near plane, and the
pieces of the faces it cuts against a guard band around the image.

Each plane is one pass over the faces: a triangle with one corner outside becomes a quad (two triangles); with
two outside, a smaller triangle; with three, it is dropped. Per-corner data (camera-space position first, then
any attributes) is interpolated linearly along the clipped edges, which is exact for attributes that vary
linearly over the triangle in 3D (colours, normals, uvs, depth).

Why a guard band: a triangle crossing the camera plane, clipped at z = near, gets corners that project
thousands of image widths away (x / near). The rasterizer's float32 edge functions then cancel
catastrophically (1 ulp at 1e7 px is a whole pixel), giving wrong coverage and NaN. The guard planes pass
through the camera centre, so clipping against them keeps the interpolation exact, and they lie farther from
the image than the coverage cut-off reaches (see renderer.guard_margin); the projected corners stay within a
few image sizes. Like the near plane's quads, the pieces share internal edges, along which a soft rasterizer
draws a seam (SoftRas's aggregation sees two faces there): so only pieces of faces the near plane cut, which
have such seams already, are clipped to the band. The cut points are computed in float64 (a float32 lerp
between corners ~1e6 apart to a point ~0.1 from the camera keeps only ~0.06 of absolute precision), and a
cut on the near plane gets z = near exactly, so the rasterizer never mistakes it for a corner behind it.
"""

from __future__ import annotations

import torch

DROPPED_Z = -1.0  # depth given to every corner of a dropped face: behind any near plane, so never rasterized


def clip_near(corners: torch.Tensor, near: float, guard: torch.Tensor | None = None):
    """Clip triangles at z = near and, if `guard` is given, the pieces of the faces it cut against the guard
    band's planes.

    corners: (B, F, 3, D) per-corner data whose first three entries are camera-space xyz.
    guard: (B, P, 3) plane normals n through the camera centre (`guard_planes`): a point is kept where
        n . xyz >= 0.
    Returns (clipped (B, F', 3, D), face_index (B, F') int64 or None): the first F faces keep their slots
    (clipped in place; dropped ones get z = -1 so the rasterizer skips them), the extra faces are the second
    halves of quads, padded with dropped faces; face_index maps every slot to its original face (None when
    nothing needed clipping, the common case, which costs one comparison).
    """
    z = corners[..., 2]
    n_behind = (z < near).sum(-1)
    cut = (n_behind > 0) & (n_behind < 3)  # (B, F): faces the near plane cuts
    if not bool(cut.any()):
        return _clip_plane(corners, z - near, near)  # nothing to cut: only faces wholly behind are dropped

    work = corners.double()  # see the module docstring: the cut points' precision
    work, face_index = _clip_plane(work, work[..., 2] - near, near)
    if guard is not None:
        cut = torch.gather(cut, 1, face_index)  # per output slot: a piece of a cut face
        guard = guard.to(work)
        for k in range(guard.shape[1]):
            # Only pieces of cut faces, which have corners on the near plane, are clipped to the band: faces
            # wholly in front keep their shape (clipping adds internal edges, and a soft rasterizer draws a
            # seam along them), and dropped faces stay dropped (distance 1: inside).
            live = cut & (work[..., 2] >= near).all(-1)
            dist = (work[..., :3] * guard[:, None, None, k]).sum(-1)
            work, index = _clip_plane(work, torch.where(live[..., None], dist, torch.ones_like(dist)), None)
            if index is not None:
                face_index = torch.gather(face_index, 1, index)
                cut = torch.gather(cut, 1, index)
    return work.to(corners.dtype), face_index


def guard_planes(K: torch.Tensor, image_size: tuple[int, int], margin: float) -> torch.Tensor:
    """The four planes of the guard band: the image (H, W) grown by `margin` pixels on every side.

    K: (B, 3, 3) intrinsics (u = fx x / z + s y / z + cx, v = fy y / z + cy). For z > 0, u <= W + margin
    is (W + margin - cx) z - fx x - s y >= 0, and so on: returns normals (B, 4, 3) of planes through the
    camera centre, a point kept where n . xyz >= 0 (whatever the sign of fx or fy).
    """
    H, W = image_size
    fx, s, cx, fy, cy = K[:, 0, 0], K[:, 0, 1], K[:, 0, 2], K[:, 1, 1], K[:, 1, 2]
    zero = torch.zeros_like(fx)
    return torch.stack([torch.stack([-fx, -s, W + margin - cx], -1),
                        torch.stack([fx, s, cx + margin], -1),
                        torch.stack([zero, -fy, H + margin - cy], -1),
                        torch.stack([zero, fy, cy + margin], -1)], 1)


def _drop(dropped: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """z with every corner of the dropped faces (B, F) set to DROPPED_Z."""
    return torch.where(dropped[..., None], torch.full_like(z, DROPPED_Z), z)


def _clip_plane(corners: torch.Tensor, dist: torch.Tensor, near: float | None):
    """One clipping pass: keep where dist (B, F, 3) >= 0. near: the plane is z = near (cut points get that z
    exactly). Returns (clipped, face_index into the input's faces or None when nothing was cut)."""
    outside = dist < 0
    n_out = outside.sum(-1)  # (B, F)
    partial = (n_out == 1) | (n_out == 2)
    if not bool(partial.any()):
        if bool((n_out == 3).any()):
            z = _drop(n_out == 3, corners[..., 2])
            corners = torch.cat([corners[..., :2], z[..., None], corners[..., 3:]], -1)
        return corners, None

    B, F, _, D = corners.shape
    # Rotate each face's corners so the odd one out comes first: the single corner outside (one outside) or
    # the single corner inside (two outside). Rotation keeps the winding.
    odd = torch.where(n_out == 1, outside.float().argmax(-1), (~outside).float().argmax(-1))
    order = (odd[..., None] + torch.arange(3, device=corners.device)) % 3  # (B, F, 3)
    c = torch.gather(corners, 2, order[..., None].expand(-1, -1, -1, D))
    d = torch.gather(dist, 2, order)
    c0, c1, c2 = c.unbind(2)
    d0, d1, d2 = d.unbind(2)

    def cut(a, b, da, db):  # the point of segment ab on the plane; da, db have opposite signs where used
        denom = torch.where(partial, da - db, -torch.ones_like(da))  # unused lanes: no 0 / 0 in backward
        t = torch.where(partial, da / denom, torch.zeros_like(da))
        p = a + t[..., None] * (b - a)
        if near is not None:
            p = torch.cat([p[..., :2], torch.full_like(p[..., 2:3], near), p[..., 3:]], -1)
        return p

    a, b = cut(c0, c1, d0, d1), cut(c0, c2, d0, d2)  # on edges c0-c1 and c0-c2
    one = (n_out == 1)[..., None, None]
    two = (n_out == 2)[..., None, None]
    first = torch.where(one, torch.stack([a, c1, c2], 2), torch.where(two, torch.stack([c0, a, b], 2), corners))
    first = torch.cat([first[..., :2], _drop(n_out == 3, first[..., 2])[..., None], first[..., 3:]], -1)

    # Second halves of quads: (a, c2, b), gathered per view and padded to the largest count.
    counts = (n_out == 1).sum(-1)
    E = int(counts.max())
    face_index = torch.arange(F, device=corners.device).expand(B, F)
    if E == 0:
        return first, face_index
    second = torch.stack([a, c2, b], 2)  # (B, F, 3, D)
    rank = torch.cumsum((n_out == 1).long(), -1) - 1  # slot among the extra faces
    slot = torch.where(n_out == 1, rank, torch.full_like(rank, E))  # E = a discard slot
    extra = torch.zeros((B, E + 1, 3, D), dtype=corners.dtype, device=corners.device)
    extra[..., 2] = DROPPED_Z  # padding faces are dropped
    extra = extra.scatter(1, slot[..., None, None].expand(-1, -1, 3, D), second)
    extra_index = torch.zeros((B, E + 1), dtype=torch.long, device=corners.device)
    extra_index = extra_index.scatter(1, slot, face_index)
    return torch.cat([first, extra[:, :E]], 1), torch.cat([face_index, extra_index[:, :E]], 1)
