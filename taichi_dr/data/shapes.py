"""Procedural test objects for mesh fitting: thin structures the bundled Spot cow does not have.

Every shape is a union of closed (watertight) parts, built deterministically from boxes and ellipsoids, in
ShapeNet-like units: centred at the origin, about 1 unit across, world y up, like the objects of SoftRas's
data (seen from distance 2.732 with a 30 degree field of view). Parts may overlap; the union is not one
manifold, which does not matter for silhouettes or surface sampling.

* :func:`airplane`: fuselage, thin swept wings, horizontal tail and a vertical fin (wings ~1 px thick at
  64 x 64 from SoftRas's camera distance);
* :func:`chair`: seat, backrest and four thin legs;
* :func:`spot`: the bundled Spot cow (a blob), normalised the same way.
"""

from __future__ import annotations

import torch

from taichi_dr.core.mesh import Mesh, icosphere

__all__ = ["SHAPES", "airplane", "box", "chair", "ellipsoid", "make_shape", "spot"]

# Box corners (x, y, z) in {-1, 1}^3 indexed by the bits (x: 1, y: 2, z: 4); faces wound outward.
_BOX_CORNERS = torch.tensor([[(i & 1) * 2 - 1, (i >> 1 & 1) * 2 - 1, (i >> 2 & 1) * 2 - 1] for i in range(8)],
                            dtype=torch.float32)
_BOX_FACES = torch.tensor([
    [0, 2, 3], [0, 3, 1],  # z = -1
    [4, 5, 7], [4, 7, 6],  # z = +1
    [0, 1, 5], [0, 5, 4],  # y = -1
    [2, 6, 7], [2, 7, 3],  # y = +1
    [0, 4, 6], [0, 6, 2],  # x = -1
    [1, 3, 7], [1, 7, 5],  # x = +1
])


def box(centre, size, shear_z_per_x: float = 0.0, tip_z_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed box ``(verts (8, 3), faces (12, 3))`` with ``centre`` and full edge lengths ``size`` (x, y, z).

    For wings: ``tip_z_scale`` scales the z extent of the two x ends (a tapered wing, 1 = a box), and
    ``shear_z_per_x`` moves each corner along z by that much per unit of x from the centre (sweep).
    """
    half = torch.tensor(size, dtype=torch.float32) / 2
    v = _BOX_CORNERS * half
    v[:, 2] *= tip_z_scale
    v[:, 2] += shear_z_per_x * v[:, 0].abs()
    return v + torch.tensor(centre, dtype=torch.float32), _BOX_FACES.clone()


def ellipsoid(centre, radii, level: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed ellipsoid ``(verts, faces)``: an icosphere of ``level`` scaled by ``radii`` (x, y, z)."""
    sphere = icosphere(level=level)
    v = sphere.verts.float() * torch.tensor(radii, dtype=torch.float32) + torch.tensor(centre,
                                                                                     dtype=torch.float32)
    return v, sphere.faces.long().clone()


def _union(parts: list[tuple[torch.Tensor, torch.Tensor]], name: str) -> Mesh:
    verts, faces, offset = [], [], 0
    for v, f in parts:
        verts.append(v)
        faces.append(f + offset)
        offset += v.shape[0]
    return Mesh(verts=torch.cat(verts), faces=torch.cat(faces), name=name)


def airplane() -> Mesh:
    """A small airliner, nose towards -z, wings along x, fin up (y); span 1.0, length 0.9.

    Wings and tail are flat tapered boxes 0.012-0.016 thick (under a pixel at 64 x 64 from distance 2.732
    with a 30 degree field of view, where a pixel is 0.023 units at the origin), swept back; the wing chord
    narrows from 0.2 at the root to 0.07 at the tips (3 px).
    """
    parts = [
        ellipsoid((0.0, 0.0, 0.0), (0.055, 0.055, 0.45)),                                   # fuselage
        box((0.0, -0.01, 0.0), (1.0, 0.016, 0.2), shear_z_per_x=0.35, tip_z_scale=0.35),  # main wings
        box((0.0, 0.01, 0.37), (0.36, 0.012, 0.1), shear_z_per_x=0.35, tip_z_scale=0.5),  # horizontal tail
        box((0.0, 0.12, 0.37), (0.012, 0.2, 0.1)),                                          # vertical fin
    ]
    # Sweep the fin backwards with height: shear z by y (the box helper shears by |x|, so do it here).
    fin_v, fin_f = parts[3]
    fin_v = fin_v.clone()
    fin_v[:, 2] += 0.3 * (fin_v[:, 1] - 0.12)
    parts[3] = (fin_v, fin_f)
    return _union(parts, "airplane")


def chair() -> Mesh:
    """A chair 0.5 wide, 0.9 tall: seat, backrest and four legs 0.04 x 0.04 (under 2 px at 64 x 64)."""
    leg_h, seat_t = 0.42, 0.05
    y0 = -0.45  # floor
    seat_y = y0 + leg_h + seat_t / 2
    parts = [box((0.0, seat_y, 0.0), (0.5, seat_t, 0.46))]
    for sx in (-1, 1):
        for sz in (-1, 1):
            parts.append(box((sx * 0.22, y0 + leg_h / 2, sz * 0.2), (0.04, leg_h, 0.04)))
    back_h = 0.9 - leg_h - seat_t
    parts.append(box((0.0, seat_y + seat_t / 2 + back_h / 2, 0.21), (0.5, back_h, 0.04)))
    return _union(parts, "chair")


def spot() -> Mesh:
    """The bundled Spot cow, centred with its bounding sphere of radius 0.5 (about 1 unit across)."""
    from taichi_dr.core.mesh import asset_path, load_mesh

    mesh, _, _ = load_mesh(asset_path("spot/spot_triangulated.obj")).normalized()
    return Mesh(verts=mesh.verts.float() * 0.5, faces=mesh.faces, name="spot")


SHAPES = {"airplane": airplane, "chair": chair, "spot": spot}


def make_shape(name: str) -> Mesh:
    """One of :data:`SHAPES` by name."""
    if name not in SHAPES:
        raise ValueError(f"make_shape: unknown shape {name!r}; expected one of {sorted(SHAPES)}")
    return SHAPES[name]()
