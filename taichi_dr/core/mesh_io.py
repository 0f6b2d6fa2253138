"""Mesh files: :func:`load_mesh` and :func:`save_mesh` through trimesh (OBJ with MTL and texture, PLY with vertex
or face colours, GLB, OFF), and the bundled assets (:func:`asset_path`). :mod:`taichi_dr.core.mesh` re-exports
all three.

Loading goes through :func:`load_mesh` only. trimesh stores one UV per vertex, so a textured OBJ is split
into extra vertices along UV seams (Spot: 2930 positions in the file, 3225 vertices after loading). Faces
keep the file's order (trimesh groups the faces of a multi-material OBJ by material) and vertices keep the
file's relative order. OBJ normals are not used and do not split vertices (a flat-shaded OBJ still loads
as a connected mesh).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from taichi_dr.core.mesh import Mesh, _plural, import_trimesh, interrupts_kept

__all__ = ["asset_path", "load_mesh", "save_mesh"]

_ASSET_DIR = Path(__file__).resolve().parents[2] / "assets"
_FORMATS = (".obj", ".ply", ".glb", ".off")


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
