"""Triangle meshes: the :class:`Mesh` container, an icosphere, and normals; files are :mod:`taichi_dr.core.mesh_io`'s.

Conventions (docs/design.md):

- Faces are counter-clockwise seen from outside: the outward normal is ``(v1 - v0) x (v2 - v0)``.
- UVs follow OBJ: ``(0, 0)`` is the bottom-left corner of the texture; textures are ``(Ht, Wt, 3)`` floats in
  [0, 1] with row 0 the top of the image.

Mesh files (:func:`load_mesh`, :func:`save_mesh`, :func:`asset_path`) are read and written by
:mod:`taichi_dr.core.mesh_io`; they are re-exported here, where they always were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "Mesh",
    "asset_path",  # noqa: F822 (from mesh_io, see __getattr__)
    "check_render_inputs",
    "face_areas",
    "face_normals",
    "icosphere",
    "load_mesh",  # noqa: F822 (from mesh_io, see __getattr__)
    "save_mesh",  # noqa: F822 (from mesh_io, see __getattr__)
    "vertex_normals",
]


@contextlib.contextmanager
def interrupts_kept():
    """Run a block that calls trimesh without losing a Ctrl-C.

    trimesh catches ``BaseException`` around its optional imports and in some loaders, so a KeyboardInterrupt
    raised inside it can be swallowed and the program carries on. Here SIGINT is noted (and passed on to the
    handler that was in place); if the block then ends normally, KeyboardInterrupt is raised after it. Only
    in the main thread (the only one that receives signals); elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):
        yield
        return
    received = []

    def note_interrupt(signum, frame):
        received.append(signum)
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def import_trimesh():
    """``import trimesh``, without letting it swallow a Ctrl-C that arrives during its (slow) first import."""
    with interrupts_kept():
        import trimesh
    return trimesh


# ---------------------------------------------------------------------------------------------------------
# Container
# ---------------------------------------------------------------------------------------------------------


@dataclass(eq=False)  # eq=False: comparing tensors elementwise makes no sense for a container
class Mesh:
    """A triangle mesh with optional per-vertex or per-face colours, or a UV texture.

    verts:        (V, 3) float positions.
    faces:        (F, 3) int64 vertex indices, counter-clockwise seen from outside.
    vert_colors:  (V, 3) float in [0, 1], or None.
    face_colors:  (F, 3) float in [0, 1], or None (at most one of the two colour kinds).
    uvs:          (Vt, 2) float texture coordinates, OBJ convention (v = 0 at the bottom), or None.
    face_uvs_idx: (F, 3) int64 indices into ``uvs`` (given together with ``uvs``).
    texture:      (Ht, Wt, 3) float in [0, 1], row 0 = top of the image, or None (needs ``uvs``).
    name:         used in error messages (the file path when loaded).

    Construction does not check anything (``with_verts`` runs every optimisation step); call
    :meth:`validate` on meshes from outside. :func:`load_mesh` and :func:`icosphere` return validated meshes.
    """

    verts: Tensor
    faces: Tensor
    vert_colors: Tensor | None = None
    face_colors: Tensor | None = None
    uvs: Tensor | None = None
    face_uvs_idx: Tensor | None = None
    texture: Tensor | None = None
    name: str = "mesh"

    # -- checks ------------------------------------------------------------------------------------------

    def validate(self) -> Mesh:
        """Check shapes, dtypes, devices, index ranges and finiteness; return self.

        Raises ValueError (or TypeError for a non-tensor) naming ``self.name`` and the problem. Degenerate
        (zero-area) faces are allowed (the renderer skips them); :meth:`degenerate_faces` lists them.
        """
        def fail(msg: str):
            raise ValueError(f"mesh {self.name!r}: {msg}")

        def check_tensor(field: str, value, ndim_last: int, floating: bool):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"mesh {self.name!r}: {field} must be a torch.Tensor, "
                                f"got {type(value).__name__}")
            if value.ndim != 2 or value.shape[1] != ndim_last:
                fail(f"{field} must have shape (N, {ndim_last}), got {tuple(value.shape)}")
            if floating and not value.is_floating_point():
                fail(f"{field} must be a floating-point tensor, got {value.dtype}")
            if not floating and value.dtype != torch.int64:
                fail(f"{field} must be int64, got {value.dtype} (convert with .long())")
            if value.device != self.verts.device:
                fail(f"{field} is on {value.device} but verts is on {self.verts.device}")

        def check_indices(field: str, idx: Tensor, count: int, target: str):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= count):
                bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
                fail(f"{field} holds index {bad}, outside [0, {count}) for the {count} {target}")

        def check_unit_range(field: str, value: Tensor):
            if not bool(torch.isfinite(value).all()) or float(value.min()) < 0.0 or float(value.max()) > 1.0:
                fail(f"{field} must be finite and within [0, 1]")

        check_tensor("verts", self.verts, 3, floating=True)
        check_tensor("faces", self.faces, 3, floating=False)
        if self.verts.shape[0] == 0:
            fail("has no vertices")
        if self.faces.shape[0] == 0:
            fail("has no faces")
        finite = torch.isfinite(self.verts).all(dim=1)
        if not bool(finite.all()):
            first = int(torch.nonzero(~finite)[0, 0])
            fail(f"vertex {first} is not finite (NaN or Inf): {self.verts[first].tolist()}")
        check_indices("faces", self.faces, self.num_verts, "vertices")

        if self.vert_colors is not None and self.face_colors is not None:
            fail("has both vert_colors and face_colors; keep one")
        if self.vert_colors is not None:
            check_tensor("vert_colors", self.vert_colors, 3, floating=True)
            if self.vert_colors.shape[0] != self.num_verts:
                fail(f"vert_colors has {self.vert_colors.shape[0]} rows for {self.num_verts} vertices")
            check_unit_range("vert_colors", self.vert_colors)
        if self.face_colors is not None:
            check_tensor("face_colors", self.face_colors, 3, floating=True)
            if self.face_colors.shape[0] != self.num_faces:
                fail(f"face_colors has {self.face_colors.shape[0]} rows for {self.num_faces} faces")
            check_unit_range("face_colors", self.face_colors)

        if (self.uvs is None) != (self.face_uvs_idx is None):
            fail("uvs and face_uvs_idx must be given together")
        if self.uvs is not None:
            check_tensor("uvs", self.uvs, 2, floating=True)
            check_tensor("face_uvs_idx", self.face_uvs_idx, 3, floating=False)
            if self.face_uvs_idx.shape[0] != self.num_faces:
                fail(f"face_uvs_idx has {self.face_uvs_idx.shape[0]} rows for {self.num_faces} faces")
            if not bool(torch.isfinite(self.uvs).all()):
                fail("uvs are not finite")
            check_indices("face_uvs_idx", self.face_uvs_idx, self.uvs.shape[0], "uvs")
        if self.texture is not None:
            if self.uvs is None:
                fail("has a texture but no uvs/face_uvs_idx")
            tex = self.texture
            if not isinstance(tex, torch.Tensor):
                raise TypeError(f"mesh {self.name!r}: texture must be a torch.Tensor, "
                                f"got {type(tex).__name__}")
            if tex.ndim != 3 or tex.shape[2] != 3 or tex.shape[0] == 0 or tex.shape[1] == 0:
                fail(f"texture must have shape (Ht, Wt, 3) with Ht, Wt > 0, got {tuple(tex.shape)}")
            if not tex.is_floating_point():
                fail(f"texture must be a floating-point tensor in [0, 1], got {tex.dtype}")
            if tex.device != self.verts.device:
                fail(f"texture is on {tex.device} but verts is on {self.verts.device}")
            check_unit_range("texture", tex)
        return self

    def degenerate_faces(self, rel_eps: float = 1e-7) -> Tensor:
        """Indices (K,) int64 of faces whose area is at most ``rel_eps`` times their longest edge squared.

        Such faces are numerically lines or points: the renderer skips them and the normals of this module
        are zero for them. Computed in float64 so that float32 rounding does not decide.
        """
        tri = self.verts.detach().double()[self.faces]  # (F, 3, 3)
        area2 = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1).norm(dim=-1)
        longest = (tri - tri.roll(1, dims=1)).square().sum(-1).amax(dim=1)
        return torch.nonzero(0.5 * area2 <= rel_eps * longest).flatten()

    # -- conversions -------------------------------------------------------------------------------------

    @property
    def num_verts(self) -> int:
        return int(self.verts.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def device(self) -> torch.device:
        return self.verts.device

    def to(self, device=None, dtype: torch.dtype | None = None) -> Mesh:
        """Copy to ``device`` and cast the floating-point fields to ``dtype`` (index fields stay int64)."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"Mesh.to: dtype must be a floating-point dtype, got {dtype}")

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name))
                                            for f in dataclasses.fields(self) if f.name != "name"})

    def corner_uvs(self) -> Tensor:
        """(F, 3, 2) texture coordinates of each face corner."""
        if self.uvs is None or self.face_uvs_idx is None:
            raise ValueError(f"mesh {self.name!r} has no uvs")
        return self.uvs[self.face_uvs_idx]

    def corner_colors(self) -> Tensor | None:
        """(F, 3, 3) colour of each face corner from ``vert_colors`` or ``face_colors``, or None."""
        if self.vert_colors is not None:
            return self.vert_colors[self.faces]
        if self.face_colors is not None:
            return self.face_colors[:, None, :].expand(-1, 3, -1)
        return None

    def with_verts(self, verts: Tensor) -> Mesh:
        """The same topology and appearance with new positions (e.g. deformed, requiring grad): (V, 3), or
        (B, V, 3) for one set per camera (the renderer accepts both)."""
        V = self.verts.shape[-2]
        ok = isinstance(verts, torch.Tensor) and verts.dim() in (2, 3) and tuple(verts.shape[-2:]) == (V, 3)
        if not ok:
            got = tuple(verts.shape) if isinstance(verts, torch.Tensor) else type(verts).__name__
            raise ValueError(f"mesh {self.name!r}: with_verts expects shape ({V}, 3) or (B, {V}, 3), got {got}")
        return dataclasses.replace(self, verts=verts)

    def normalized(self) -> tuple[Mesh, Tensor, float]:
        """Centre at the bounding-box centre; scale so the bounding sphere about that centre has radius 1.

        Returns ``(mesh, centre, scale)`` with ``mesh.verts = (verts - centre) * scale``; ``centre`` is (3,)
        and detached, so gradients still flow to the original vertices through the affine map.
        """
        v = self.verts
        centre = 0.5 * (v.detach().amin(dim=0) + v.detach().amax(dim=0))
        radius = float((v.detach() - centre).norm(dim=1).max())
        if not radius > 0.0:
            raise ValueError(f"mesh {self.name!r}: cannot normalise, all vertices coincide")
        scale = 1.0 / radius
        return self.with_verts((v - centre) * scale), centre, scale

    def subdivided(self, levels: int = 1) -> Mesh:
        """Midpoint subdivision (each face -> 4, no smoothing) ``levels`` times, via trimesh.remesh.subdivide.

        New vertices are edge midpoints computed with torch, so gradients flow to ``verts``; vertex colours
        and UVs are interpolated at the midpoints, face colours copied to the four children, the texture kept.
        Face ``4 k + j`` of the result lies inside face ``k`` of the input.
        """
        if not isinstance(levels, int) or levels < 0:
            raise ValueError(f"Mesh.subdivided: levels must be an int >= 0, got {levels!r}")
        mesh = self
        for _ in range(levels):
            mesh = mesh._subdivided_once()
        return mesh

    def _subdivided_once(self) -> Mesh:
        faces, edge_ends = _midpoint_topology(self.faces)
        verts = torch.cat([self.verts, self.verts[edge_ends].mean(dim=1)])
        vert_colors = face_colors = uvs = face_uvs_idx = None
        if self.vert_colors is not None:
            vert_colors = torch.cat([self.vert_colors, self.vert_colors[edge_ends].mean(dim=1)])
        if self.face_colors is not None:
            face_colors = self.face_colors.repeat_interleave(4, dim=0)
        if self.uvs is not None:
            # UVs have their own index buffer (seams), so they are subdivided as a mesh of their own; the face
            # layout of the result depends only on the face order, so face i matches face i above.
            face_uvs_idx, uv_ends = _midpoint_topology(self.face_uvs_idx, num_verts=self.uvs.shape[0])
            uvs = torch.cat([self.uvs, self.uvs[uv_ends].mean(dim=1)])
        return dataclasses.replace(self, verts=verts, faces=faces, vert_colors=vert_colors,
                                   face_colors=face_colors, uvs=uvs, face_uvs_idx=face_uvs_idx)


# Tensors already checked by check_render_inputs, with the version (in-place edit counter) they were checked
# at and what was found: a render loop reuses the same faces (and often colours) every step, so it pays the
# host synchronisation of a check once, not per step. Keys are weak: a freed tensor leaves the cache.
_CHECKED = WeakIdKeyDictionary()


def _checked(t: Tensor, compute):
    """``compute(t)`` (any host-side summary of ``t``), cached per tensor object and in-place version."""
    cache = _CHECKED
    hit = cache.get(t)
    if hit is not None and hit[0] == t._version:
        return hit[1]
    value = compute(t)
    cache[t] = (t._version, value)
    return value


def check_render_inputs(mesh: Mesh) -> None:
    """What the renderer needs of a mesh beyond finite vertices, with messages naming the field.

    faces (F, 3) integer indices within [0, V) (the kernels would otherwise read out of bounds, or Taichi
    report ``INDICES element is out of DATA bounds``); vert_colors (V, 3) or (B, V, 3) and face_colors (F, 3)
    or (B, F, 3), finite (a NaN colour would render NaN pixels). Unlike :meth:`Mesh.validate` colours may
    leave [0, 1] (an optimiser may push them there). Raises ValueError / TypeError.
    """
    name = getattr(mesh, "name", "mesh")
    verts, faces = mesh.verts, mesh.faces
    V = int(verts.shape[-2]) if isinstance(verts, torch.Tensor) and verts.dim() >= 2 else 0
    if not isinstance(faces, torch.Tensor):
        raise TypeError(f"mesh {name!r}: faces must be a torch.Tensor, got {type(faces).__name__}")
    if faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"mesh {name!r}: faces must have shape (F, 3), got {tuple(faces.shape)}")
    if faces.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"mesh {name!r}: faces must be an integer tensor (int64), got {faces.dtype}")
    lo, hi = _checked(faces, lambda f: (int(f.min()), int(f.max())) if f.numel() else (0, -1))
    if lo < 0 or hi >= V:
        bad = lo if lo < 0 else hi
        raise ValueError(f"mesh {name!r}: faces hold vertex index {bad}, outside [0, {V}) for the "
                         f"{_plural(V, 'vertex')}")
    F = int(faces.shape[0])
    for field, rows, what in (("vert_colors", V, "vertices"), ("face_colors", F, "faces")):
        colors = getattr(mesh, field, None)
        if colors is None:
            continue
        if not isinstance(colors, torch.Tensor) or not colors.is_floating_point():
            got = colors.dtype if isinstance(colors, torch.Tensor) else type(colors).__name__
            raise TypeError(f"mesh {name!r}: {field} must be a floating-point tensor, got {got}")
        if colors.dim() not in (2, 3) or colors.shape[-1] != 3 or colors.shape[-2] != rows:
            raise ValueError(f"mesh {name!r}: {field} must have shape ({rows}, 3) or (B, {rows}, 3) for the "
                             f"{rows} {what}, got {tuple(colors.shape)}")
        if not _checked(colors, lambda c: bool(torch.isfinite(c).all())):
            raise ValueError(f"mesh {name!r}: {field} contain NaN or Inf")


def _midpoint_topology(faces: Tensor, num_verts: int | None = None) -> tuple[Tensor, Tensor]:
    """trimesh's midpoint subdivision of the index buffer ``faces`` (F, 3).

    Returns the new faces (4F, 3) and ``edge_ends`` (M, 2): the two old vertices whose midpoint is new vertex
    ``V + m``. trimesh lays out the children of face k as rows ``4k .. 4k+3`` =
    ``[f0, m01, m20], [m01, f1, m12], [m20, m12, f2], [m01, m12, m20]``; the midpoint ends are read back from
    that layout and checked against trimesh's own midpoints, so a change in trimesh fails loudly.
    """
    trimesh = import_trimesh()

    f = faces.detach().cpu().numpy()
    nv = int(f.max()) + 1 if num_verts is None else num_verts
    # Vertex "positions" that encode the index, so trimesh's midpoints can be checked exactly.
    probe = np.stack([np.arange(nv, dtype=np.float64), np.arange(nv, dtype=np.float64) ** 2,
                      np.zeros(nv)], axis=1)
    new_v, new_f = trimesh.remesh.subdivide(probe, f)
    children = new_f.reshape(-1, 4, 3)
    mids = children[:, 3] - nv  # (F, 3): midpoint ids of edges (f0, f1), (f1, f2), (f2, f0)
    edge_ends = np.zeros((len(new_v) - nv, 2), dtype=np.int64)
    for k in range(3):
        edge_ends[mids[:, k]] = np.stack([f[:, k], f[:, (k + 1) % 3]], axis=1)
    if not (np.allclose(probe[edge_ends].mean(axis=1), new_v[nv:])
            and np.array_equal(children[:, 0, 0], f[:, 0]) and np.array_equal(children[:, 1, 1], f[:, 1])
            and np.array_equal(children[:, 2, 2], f[:, 2])):
        raise RuntimeError("trimesh.remesh.subdivide changed its face layout; update taichi_dr.core.mesh")
    dev = faces.device
    return torch.from_numpy(new_f.astype(np.int64)).to(dev), torch.from_numpy(edge_ends).to(dev)


# ---------------------------------------------------------------------------------------------------------
# Primitives and geometry
# ---------------------------------------------------------------------------------------------------------


def icosphere(level: int = 3, radius: float = 1.0, device=None, dtype: torch.dtype = torch.float32) -> Mesh:
    """Icosphere: an icosahedron midpoint-subdivided ``level`` times (0..6) with vertices on the sphere.

    ``20 * 4**level`` faces and ``10 * 4**level + 2`` vertices, centred at the origin, faces counter-clockwise
    seen from outside (outward normals).
    """
    trimesh = import_trimesh()

    if not isinstance(level, int) or not 0 <= level <= 6:
        raise ValueError(f"icosphere: level must be an int in 0..6, got {level!r}")
    if not radius > 0:
        raise ValueError(f"icosphere: radius must be > 0, got {radius!r}")
    tm = trimesh.creation.icosphere(subdivisions=level, radius=float(radius))
    return Mesh(verts=torch.as_tensor(np.asarray(tm.vertices), dtype=dtype, device=device),
                faces=torch.as_tensor(np.asarray(tm.faces, dtype=np.int64), device=device),
                name=f"icosphere(level={level})").validate()


def _check_verts_faces(verts: Tensor, faces: Tensor, fn: str) -> None:
    if not isinstance(verts, torch.Tensor) or verts.ndim not in (2, 3) or verts.shape[-1] != 3:
        got = tuple(verts.shape) if isinstance(verts, torch.Tensor) else type(verts).__name__
        raise ValueError(f"{fn}: verts must have shape (V, 3) or (B, V, 3), got {got}")
    if not verts.is_floating_point():
        raise ValueError(f"{fn}: verts must be floating point, got {verts.dtype}")
    if not isinstance(faces, torch.Tensor) or faces.ndim != 2 or faces.shape[1] != 3:
        got = tuple(faces.shape) if isinstance(faces, torch.Tensor) else type(faces).__name__
        raise ValueError(f"{fn}: faces must have shape (F, 3), got {got}")
    if faces.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{fn}: faces must be an integer tensor, got {faces.dtype}")


def _safe_normalize(x: Tensor, eps: float | None = None) -> Tensor:
    """``x / |x|`` along the last dim; vectors with ``|x|^2 <= eps`` give 0 with zero gradient (not NaN).

    ``eps`` defaults to the dtype's machine epsilon squared: below that a cross product is numerically zero.
    """
    if eps is None:
        eps = torch.finfo(x.dtype).eps ** 2
    sq = x.square().sum(-1, keepdim=True)
    ok = sq > eps
    # The inner where keeps rsqrt away from 0 so the unused branch has no Inf/NaN gradient either.
    return torch.where(ok, x * torch.rsqrt(torch.where(ok, sq, torch.ones_like(sq))), torch.zeros_like(x))


def _safe_norm(x: Tensor) -> Tensor:
    """``|x|`` along the last dim with a zero (not NaN) gradient at ``x = 0``."""
    sq = x.square().sum(-1)
    ok = sq > 0
    return torch.where(ok, torch.sqrt(torch.where(ok, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def _face_cross(verts: Tensor, faces: Tensor) -> Tensor:
    """(F, 3) | (B, F, 3) unnormalised ``(v1 - v0) x (v2 - v0)`` (length = twice the face area)."""
    # index_select rather than verts[..., faces, :]: its backward is index_add, not a sorting index_put.
    tri = verts.index_select(-2, faces.reshape(-1)).unflatten(-2, tuple(faces.shape))  # (..., F, 3, 3)
    return torch.linalg.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :], dim=-1)


def face_normals(verts: Tensor, faces: Tensor, normalize: bool = True) -> Tensor:
    """Face normals ``(v1 - v0) x (v2 - v0)``: verts (V, 3) | (B, V, 3), faces (F, 3) -> (F, 3) | (B, F, 3).

    normalize=True gives unit normals; zero-area faces get a zero normal with zero gradient (no NaN).
    normalize=False gives the raw cross product, whose length is twice the face area.
    """
    _check_verts_faces(verts, faces, "face_normals")
    n = _face_cross(verts, faces)
    return _safe_normalize(n) if normalize else n


def vertex_normals(verts: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals: (V, 3) | (B, V, 3). Vertices in no (non-degenerate) face get 0."""
    _check_verts_faces(verts, faces, "vertex_normals")
    n = _face_cross(verts, faces)  # area-weighted: |n| = 2 * area
    acc = torch.zeros_like(verts)
    idx = faces.long()
    for k in range(3):
        acc = acc.index_add(-2, idx[:, k], n)
    return _safe_normalize(acc)


def face_areas(verts: Tensor, faces: Tensor) -> Tensor:
    """Face areas: verts (V, 3) | (B, V, 3) -> (F,) | (B, F); zero-area faces have zero (not NaN) grads."""
    _check_verts_faces(verts, faces, "face_areas")
    return 0.5 * _safe_norm(_face_cross(verts, faces))


def _plural(count: int, noun: str) -> str:
    """``"1 vertex"``, ``"4 vertices"``, ``"2 texture coordinates"``."""
    if count == 1:
        return f"1 {noun}"
    irregular = {"vertex": "vertices", "index": "indices"}
    return f"{count} {irregular.get(noun, noun + 's')}"


def __getattr__(name: str):
    """The file functions, from :mod:`taichi_dr.core.mesh_io` on first use (it imports this module for Mesh)."""
    if name in ("asset_path", "load_mesh", "save_mesh"):
        from taichi_dr.core import mesh_io

        return getattr(mesh_io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
