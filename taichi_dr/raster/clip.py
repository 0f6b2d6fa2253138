"""Clipping of triangles against the near plane, in camera space and in torch (so it is differentiable).

A triangle with one corner behind the plane becomes a quad (two triangles); with two behind, a smaller
triangle; with three, it is dropped. Per-corner data (camera-space position first, then any attributes) is
interpolated linearly along the clipped edges, which is exact for attributes that vary linearly over the
triangle in 3D (colours, normals, uvs, depth).
"""

from __future__ import annotations

import torch


def clip_near(corners: torch.Tensor, near: float):
    """Clip triangles at z = near.

    corners: (B, F, 3, D) per-corner data whose first three entries are camera-space xyz.
    Returns (clipped (B, F + E, 3, D), face_index (B, F + E) int64 or None): the first F faces keep their
    slots (clipped in place; dropped ones get z = -1 so the rasterizer skips them), the E extra faces are the
    second halves of quads, padded with dropped faces; face_index maps every slot to its original face
    (None when nothing needed clipping, the common case, which costs one comparison).
    """
    z = corners[..., 2]
    behind = z < near
    n_behind = behind.sum(-1)  # (B, F)
    if not bool(((n_behind > 0) & (n_behind < 3)).any()):
        if bool((n_behind == 3).any()):
            corners = corners.clone()
            corners[..., 2] = torch.where((n_behind == 3)[..., None], torch.full_like(z, -1.0), z)
        return corners, None

    B, F = n_behind.shape
    # Rotate each face's corners so the odd one out comes first: the single corner behind (one behind) or
    # the single corner in front (two behind). Rotation keeps the winding.
    odd = torch.where(n_behind == 1, behind.float().argmax(-1), (~behind).float().argmax(-1))
    order = (odd[..., None] + torch.arange(3, device=z.device)) % 3  # (B, F, 3)
    c = torch.gather(corners, 2, order[..., None].expand(-1, -1, -1, corners.shape[-1]))
    c0, c1, c2 = c.unbind(2)

    def cut(a, b):  # point on segment ab at z = near; z differs across the plane, so no zero division
        t = (near - a[..., 2]) / (b[..., 2] - a[..., 2])
        return a + t[..., None] * (b - a)

    partial = (n_behind == 1) | (n_behind == 2)
    safe1 = torch.where(partial[..., None], c1, c0 + 1)  # keep unused lanes finite (no 0/0 in backward)
    safe2 = torch.where(partial[..., None], c2, c0 + 1)
    a, b = cut(c0, safe1), cut(c0, safe2)  # on edges c0-c1 and c0-c2
    one = (n_behind == 1)[..., None, None]
    two = (n_behind == 2)[..., None, None]
    first = torch.where(one, torch.stack([a, c1, c2], 2), torch.where(two, torch.stack([c0, a, b], 2), corners))
    drop = (n_behind == 3)[..., None]
    first_z = torch.where(drop, torch.full_like(first[..., 2], -1.0), first[..., 2])
    first = torch.cat([first[..., :2], first_z[..., None], first[..., 3:]], -1)

    # Second halves of quads: (a, c2, b), gathered per view and padded to the largest count.
    counts = (n_behind == 1).sum(-1)
    E = int(counts.max())
    face_index = torch.arange(F, device=z.device).expand(B, F)
    if E == 0:
        return first, face_index
    second = torch.stack([a, c2, b], 2)  # (B, F, 3, D)
    rank = torch.cumsum((n_behind == 1).long(), -1) - 1  # slot among the extra faces
    slot = torch.where(n_behind == 1, rank, torch.full_like(rank, E))  # E = a discard slot
    extra = torch.zeros((B, E + 1, 3, corners.shape[-1]), dtype=corners.dtype, device=corners.device)
    extra[..., 2] = -1.0  # padding faces are dropped
    extra = extra.scatter(1, slot[..., None, None].expand(-1, -1, 3, corners.shape[-1]), second)
    extra_index = torch.zeros((B, E + 1), dtype=torch.long, device=z.device)
    extra_index = extra_index.scatter(1, slot, face_index)
    return torch.cat([first, extra[:, :E]], 1), torch.cat([face_index, extra_index[:, :E]], 1)
