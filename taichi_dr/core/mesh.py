"""Triangle meshes: the :class:`Mesh` container, file I/O through trimesh, an icosphere, and normals.

Conventions (docs/design.md):

- Faces are counter-clockwise seen from outside: the outward normal is ``(v1 - v0) x (v2 - v0)``.
- UVs follow OBJ: ``(0, 0)`` is the bottom-left corner of the texture; textures are ``(Ht, Wt, 3)`` floats in
  [0, 1] with row 0 the top of the image.

Loading goes through :func:`load_mesh` only. trimesh stores one UV per vertex, so a textured OBJ is split
into extra vertices along UV seams (Spot: 2930 positions in the file, 3225 vertices after loading). Faces
keep the file's order (trimesh groups the faces of a multi-material OBJ by material) and vertices keep the
file's relative order. OBJ normals are not used and do not split vertices (a flat-shaded OBJ still loads
as a connected mesh).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "Mesh",
    "asset_path",
    "check_render_inputs",
    "face_areas",
    "face_normals",
    "icosphere",
    "load_mesh",
    "save_mesh",
    "vertex_normals",
]

_ASSET_DIR = Path(__file__).resolve().parents[2] / "assets"
_FORMATS = (".obj", ".ply", ".glb", ".off")


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
# Bundled assets
# ---------------------------------------------------------------------------------------------------------


def asset_path(name: str) -> Path:
    """Path of a bundled asset, e.g. ``asset_path("spot/spot_triangulated.obj")`` (repo-root/assets)."""
    path = _ASSET_DIR / name
    if not path.is_file():
        have = sorted(str(p.relative_to(_ASSET_DIR)) for p in _ASSET_DIR.rglob("*") if p.is_file()) \
            if _ASSET_DIR.is_dir() else []
        raise ValueError(f"asset_path: no bundled asset {name!r} under {_ASSET_DIR}; available: {have}")
    return path


# ---------------------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------------------


def load_mesh(path, device=None, dtype: torch.dtype = torch.float32) -> Mesh:
    """Load a triangle mesh from OBJ (+MTL and texture image), PLY (vertex or face colours), GLB or OFF.

    Uses trimesh with ``process=False`` (no merging or reordering); a scene (GLB, multi-object OBJ) is
    flattened into one mesh with its transforms applied. Polygons are fan-triangulated by trimesh (right
    for convex polygons such as quads); OBJ faces with fewer than 3 corners are rejected. A textured mesh
    gets ``uvs``, ``face_uvs_idx`` (one UV per vertex, so vertices are split at UV seams) and a ``texture``
    (RGB; alpha is dropped; the material's colour factors are ignored). Unreferenced vertices are dropped.

    Every problem raises ValueError naming the file: missing or unreadable file, unknown format, no faces
    (a point cloud), faces with fewer than 3 corners, indices out of range, non-finite vertices.
    """
    trimesh = import_trimesh()

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_mesh: {str(path)!r} does not exist or is not a file")
    ext = path.suffix.lower()
    if ext not in _FORMATS:
        raise ValueError(f"load_mesh: {str(path)!r}: unsupported format {ext!r}; expected one of {_FORMATS}")
    try:
        with interrupts_kept():
            if ext == ".obj":
                text = _obj_text_for_trimesh(path.read_bytes().decode("utf-8", errors="replace"), path)
                tm = trimesh.load(io.BytesIO(text.encode("utf-8")), file_type="obj", force="mesh",
                                  process=False, resolver=trimesh.resolvers.FilePathResolver(str(path)))
            else:
                tm = trimesh.load(str(path), force="mesh", process=False)
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"load_mesh: cannot parse {str(path)!r}: {err}") from err
    except Exception as err:  # trimesh raises IndexError, KeyError, ... on malformed files
        raise ValueError(f"load_mesh: cannot parse {str(path)!r}: {type(err).__name__}: {err}") from err

    if not isinstance(tm, trimesh.Trimesh) or len(tm.vertices) == 0 or len(tm.faces) == 0:
        # trimesh drops the vertices no face uses, so say what the file itself holds.
        count = len(tm.vertices) if isinstance(tm, trimesh.Trimesh) else 0
        count = count or _file_vertex_count(trimesh, path)
        if count:
            raise ValueError(f"load_mesh: {str(path)!r} has {_plural(count, 'vertex')} but no faces "
                             "(a point cloud or lines?)")
        raise ValueError(f"load_mesh: {str(path)!r} holds no vertices and no faces")
    return _from_trimesh(tm, name=str(path), device=device, dtype=dtype).validate()


def _plural(count: int, noun: str) -> str:
    """``"1 vertex"``, ``"4 vertices"``, ``"2 texture coordinates"``."""
    if count == 1:
        return f"1 {noun}"
    irregular = {"vertex": "vertices", "index": "indices"}
    return f"{count} {irregular.get(noun, noun + 's')}"


def _file_vertex_count(trimesh, path: Path) -> int:
    """How many vertices the file at ``path`` holds when read as points (0 if it cannot be read so)."""
    try:
        with interrupts_kept():
            loaded = trimesh.load(str(path), process=False)
    except Exception:
        return 0
    geometries = loaded.geometry.values() if isinstance(loaded, trimesh.Scene) else [loaded]
    return sum(len(getattr(g, "vertices", ())) for g in geometries)


def _obj_index(token: str, count: int, what: str, path: Path, lineno: int) -> int:
    """A 1-based (or negative, relative) OBJ index -> absolute 1-based index, checked against ``count``."""
    try:
        i = int(token)
    except ValueError:
        raise ValueError(f"load_mesh: {str(path)!r} line {lineno}: {what} index {token!r} "
                         "is not an integer") from None
    absolute = i if i > 0 else count + 1 + i  # negative indices count back from the last one defined so far
    if i == 0 or not 1 <= absolute <= count:
        raise ValueError(f"load_mesh: {str(path)!r} line {lineno}: {what} index {i} is out of range "
                         f"({_plural(count, what)} defined so far; OBJ indices start at 1)")
    return absolute


def _obj_text_for_trimesh(text: str, path: Path) -> str:
    """Check the OBJ face lines and rewrite them as absolute ``v`` or ``v/vt`` references.

    Why: trimesh splits a vertex wherever its normal index differs, which turns a flat-shaded OBJ (the
    SoftRas sphere templates) into a triangle soup; we do not use OBJ normals, so they are dropped here. It
    also silently drops faces with fewer than 3 corners, reads index 0 as vertex 1 and skips UVs whose index
    is out of range; here each of these is an error with its line number.
    """
    text = text.replace("\r\n", "\n").replace("\\\n", "")
    lines = text.split("\n")
    nv = nvt = 0
    for lineno, line in enumerate(lines, start=1):
        head = line.split(None, 1)
        if not head:
            continue
        key = head[0]
        if key == "v":
            nv += 1
        elif key == "vt":
            nvt += 1
        elif key == "f":
            corners = line.split("#", 1)[0].split()[1:]
            if len(corners) < 3:
                raise ValueError(f"load_mesh: {str(path)!r} line {lineno}: a face needs at least 3 vertices, "
                                 f"got {len(corners)} ({line.strip()!r})")
            out = []
            for corner in corners:
                parts = corner.split("/")
                ref = str(_obj_index(parts[0], nv, "vertex", path, lineno))
                if len(parts) > 1 and parts[1]:
                    ref += "/" + str(_obj_index(parts[1], nvt, "texture coordinate", path, lineno))
                out.append(ref)
            lines[lineno - 1] = "f " + " ".join(out)
    return "\n".join(lines)


def _from_trimesh(tm, name: str, device, dtype: torch.dtype) -> Mesh:
    trimesh = import_trimesh()

    def tensor(a, dt):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)

    verts = tensor(np.asarray(tm.vertices, dtype=np.float64), dtype)
    faces = tensor(np.asarray(tm.faces, dtype=np.int64), torch.int64)
    fields: dict = {}
    visual = tm.visual
    if isinstance(visual, trimesh.visual.TextureVisuals):
        uv = visual.uv
        if uv is not None and len(uv) == len(tm.vertices):
            fields["uvs"] = tensor(np.asarray(uv, dtype=np.float64), dtype)
            fields["face_uvs_idx"] = faces.clone()
            image = _material_image(visual.material)
            if image is not None:
                rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # row 0 = top (PIL)
                fields["texture"] = tensor(rgb, dtype)
    elif isinstance(visual, trimesh.visual.ColorVisuals):
        if visual.kind == "vertex":
            fields["vert_colors"] = tensor(np.asarray(visual.vertex_colors)[:, :3] / 255.0, dtype)
        elif visual.kind == "face":
            fields["face_colors"] = tensor(np.asarray(visual.face_colors)[:, :3] / 255.0, dtype)
    return Mesh(verts=verts, faces=faces, name=name, **fields)


def _material_image(material):
    """The diffuse / base-colour image (PIL) of a trimesh material, or None."""
    if material is None:
        return None
    image = getattr(material, "image", None)  # SimpleMaterial (OBJ)
    if image is None:
        image = getattr(material, "baseColorTexture", None)  # PBRMaterial (GLB)
    return image


def save_mesh(mesh: Mesh, path) -> None:
    """Write ``mesh`` as OBJ, PLY, GLB or OFF (by the suffix of ``path``) via trimesh; creates parent folders.

    What each format holds (anything else raises ValueError instead of being silently dropped):

    - OBJ: vertex colours (``v x y z r g b``) or a texture (``<stem>.mtl`` and ``<stem>.png`` beside it).
    - PLY: vertex colours or face colours.
    - GLB: vertex colours or a texture.
    - OFF: geometry only.

    Colours and textures are stored as 8-bit. A texture needs one UV per vertex in these formats, so
    vertices whose corners use different UVs are written as separate vertices (as loading returns them).
    """
    trimesh = import_trimesh()
    from PIL import Image

    path = Path(path)
    ext = path.suffix.lower()
    if ext not in _FORMATS:
        raise ValueError(f"save_mesh: {str(path)!r}: unsupported format {ext!r}; expected one of {_FORMATS}")
    mesh.validate()
    textured = mesh.texture is not None
    allowed = {".obj": {"vert_colors", "texture"}, ".ply": {"vert_colors", "face_colors"},
               ".glb": {"vert_colors", "texture"}, ".off": set()}[ext]
    present = {k for k in ("vert_colors", "face_colors", "texture") if getattr(mesh, k) is not None}
    if present - allowed:
        raise ValueError(f"save_mesh: {str(path)!r}: {ext} cannot store {sorted(present - allowed)} "
                         f"(it stores {sorted(allowed) or 'geometry only'}); drop them with "
                         "dataclasses.replace(mesh, field=None) or pick another format")
    if textured and mesh.vert_colors is not None:
        raise ValueError(f"save_mesh: {str(path)!r}: a mesh with both a texture and vertex colours cannot be "
                         "saved; drop one")

    verts = mesh.verts.detach().cpu().double()
    faces = mesh.faces.detach().cpu()
    kwargs: dict = {}
    if textured:
        # One UV per vertex: split vertices whose corners use different UVs.
        pairs = torch.stack([faces, mesh.face_uvs_idx.detach().cpu()], dim=-1).reshape(-1, 2)
        unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
        verts, faces = verts[unique[:, 0]], inverse.reshape(-1, 3)
        tex8 = (mesh.texture.detach().cpu().float().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
        material = trimesh.visual.material.SimpleMaterial(
            image=Image.fromarray(tex8), name=path.stem, diffuse=(255, 255, 255, 255))
        kwargs["visual"] = trimesh.visual.TextureVisuals(
            uv=mesh.uvs.detach().cpu().double()[unique[:, 1]].numpy(), material=material)
    elif mesh.vert_colors is not None:
        kwargs["vertex_colors"] = _to_uint8(mesh.vert_colors)
    elif mesh.face_colors is not None:
        kwargs["face_colors"] = _to_uint8(mesh.face_colors)
    tm = trimesh.Trimesh(vertices=verts.numpy(), faces=faces.numpy(), process=False, **kwargs)

    path.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".obj":
        text, files = trimesh.exchange.obj.export_obj(
            tm, include_normals=False, include_texture=textured, return_texture=True,
            mtl_name=f"{path.stem}.mtl" if textured else None)
        path.write_text(text)
        for fname, data in files.items():
            (path.parent / fname).write_bytes(data)
    else:
        tm.export(str(path))


def _to_uint8(colors: Tensor) -> np.ndarray:
    rgb = (colors.detach().cpu().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    alpha = torch.full((rgb.shape[0], 1), 255, dtype=torch.uint8)
    return torch.cat([rgb, alpha], dim=1).numpy()


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
