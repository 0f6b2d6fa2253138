"""Tests for taichi_dr.core.mesh: loading the bundled assets, save/load round trips, malformed files, validation,
the icosphere, normals and areas against analytic values, subdivision."""

from __future__ import annotations

import dataclasses
import math
import re

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from taichi_dr.core.mesh import (
    Mesh,
    asset_path,
    face_areas,
    face_normals,
    icosphere,
    load_mesh,
    save_mesh,
    vertex_normals,
)

# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _parse_obj(path):
    """Minimal independent OBJ reader: positions, texture coords and 0-based (v, vt) triangles."""
    v, vt, f = [], [], []
    for line in open(path):
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            v.append([float(x) for x in parts[1:4]])
        elif parts[0] == "vt":
            vt.append([float(x) for x in parts[1:3]])
        elif parts[0] == "f":
            f.append([[int(i) - 1 if i else -1 for i in (c.split("/") + [""])[:2]] for c in parts[1:]])
    return np.array(v), np.array(vt), np.array(f)


def _sample_nearest(texture: torch.Tensor, uv) -> torch.Tensor:
    """Nearest texel under the design.md convention: x = u W - 0.5, y = (1 - v) H - 0.5, clamped."""
    h, w = texture.shape[:2]
    uv = [float(c) for c in uv]
    x = min(max(round(uv[0] * w - 0.5), 0), w - 1)
    y = min(max(round((1.0 - uv[1]) * h - 0.5), 0), h - 1)
    return texture[y, x]


def _quad(textured=False, seam=False, vert_colors=False, face_colors=False) -> Mesh:
    """Unit square in z = 0 (two CCW triangles, normal +z) with uv = xy; optional appearance."""
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    fields = {}
    if textured:
        # Each texel has a distinct colour k / 255 so 8-bit storage is exact.
        tex = torch.arange(4 * 6 * 3, dtype=torch.float32).reshape(4, 6, 3) * 2 / 255.0
        if seam:
            # Second face uses its own copies of the shared uvs (a UV seam along the diagonal).
            uvs = torch.tensor([[0.0, 0], [1, 0], [1, 1], [0, 1], [0, 0], [1, 1]])
            fuv = torch.tensor([[0, 1, 2], [4, 5, 3]])
        else:
            uvs, fuv = verts[:, :2].clone(), faces.clone()
        fields.update(uvs=uvs, face_uvs_idx=fuv, texture=tex)
    if vert_colors:
        fields["vert_colors"] = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1],
                                              [10 / 255, 20 / 255, 30 / 255]])
    if face_colors:
        fields["face_colors"] = torch.tensor([[1.0, 0, 0], [0, 50 / 255, 1]])
    return Mesh(verts=verts, faces=faces, name="quad", **fields).validate()


def _heron(tri: np.ndarray) -> np.ndarray:
    a = np.linalg.norm(tri[:, 1] - tri[:, 0], axis=1)
    b = np.linalg.norm(tri[:, 2] - tri[:, 1], axis=1)
    c = np.linalg.norm(tri[:, 0] - tri[:, 2], axis=1)
    s = 0.5 * (a + b + c)
    return np.sqrt(np.maximum(s * (s - a) * (s - b) * (s - c), 0.0))


# ---------------------------------------------------------------------------------------------------------
# bundled assets
# ---------------------------------------------------------------------------------------------------------


def test_load_spot_textured():
    path = asset_path("spot/spot_triangulated.obj")
    mesh = load_mesh(path)
    assert mesh.num_faces == 5856
    # 2930 positions in the file, split into 3225 vertices along UV seams (one UV per vertex in trimesh).
    assert mesh.num_verts == 3225
    assert mesh.verts.dtype == torch.float32 and mesh.faces.dtype == torch.int64
    assert mesh.texture is not None and mesh.texture.shape == (1024, 1024, 3)
    assert mesh.uvs.shape == (3225, 2) and mesh.face_uvs_idx.shape == (5856, 3)
    assert str(path) in mesh.name

    # Texture row 0 is the top of the PNG (read independently with imageio).
    png = iio.imread(asset_path("spot/spot_texture.png"))[..., :3].astype(np.float32) / 255.0
    np.testing.assert_allclose(mesh.texture.numpy(), png, atol=1e-6)

    # Faces keep the file's order; corner positions and uvs match the file (independent parse).
    v, vt, f = _parse_obj(path)
    assert len(f) == mesh.num_faces
    for k in (0, 1, 2500, 5855):
        np.testing.assert_allclose(mesh.verts[mesh.faces[k]].numpy(), v[f[k, :, 0]], atol=1e-6)
        np.testing.assert_allclose(mesh.corner_uvs()[k].numpy(), vt[f[k, :, 1]], atol=1e-6)
    # Every corner, all at once.
    np.testing.assert_allclose(mesh.verts[mesh.faces].numpy(), v[f[..., 0]], atol=1e-6)
    np.testing.assert_allclose(mesh.corner_uvs().numpy(), vt[f[..., 1]], atol=1e-6)


@pytest.mark.parametrize("name, nv, nf, tol", [("sphere_642", 642, 1280, 1e-5),
                                               ("sphere_1352", 1352, 2700, 1e-2)])
def test_load_sphere_templates(name, nv, nf, tol):
    # sphere_642.obj is flat-shaded (per-face normal indices); it must still load as a connected mesh.
    mesh = load_mesh(asset_path(f"templates/{name}.obj"))
    assert (mesh.num_verts, mesh.num_faces) == (nv, nf)
    np.testing.assert_allclose(mesh.verts.norm(dim=1).numpy(), 1.0, atol=tol)
    centroids = mesh.verts[mesh.faces].mean(dim=1)
    assert bool(((face_normals(mesh.verts, mesh.faces) * centroids).sum(-1) > 0).all())  # outward
    v, _, f = _parse_obj(asset_path(f"templates/{name}.obj"))
    np.testing.assert_allclose(mesh.verts.numpy(), v, atol=1e-6)  # vertex order of the file
    np.testing.assert_array_equal(mesh.faces.numpy(), f[..., 0])


def test_asset_path_unknown():
    with pytest.raises(ValueError, match="nope.obj"):
        asset_path("nope.obj")


# ---------------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------------


def _assert_same_geometry(a: Mesh, b: Mesh):
    assert a.num_faces == b.num_faces
    np.testing.assert_allclose(a.verts[a.faces].numpy(), b.verts[b.faces].numpy(), atol=1e-6)


@pytest.mark.parametrize("ext", [".obj", ".glb"])
@pytest.mark.parametrize("seam", [False, True])
def test_roundtrip_textured(tmp_path, ext, seam):
    mesh = _quad(textured=True, seam=seam)
    path = tmp_path / f"quad{ext}"
    save_mesh(mesh, path)
    if ext == ".obj":
        assert (tmp_path / "quad.mtl").is_file() and (tmp_path / "quad.png").is_file()
    back = load_mesh(path)
    _assert_same_geometry(mesh, back)
    np.testing.assert_allclose(back.corner_uvs().numpy(), mesh.corner_uvs().numpy(), atol=1e-6)
    np.testing.assert_allclose(back.texture.numpy(), mesh.texture.numpy(), atol=1e-6)
    assert back.num_verts == (6 if seam else 4)  # the seam splits the two diagonal vertices
    # UV (0, 1) (vertex 3, top-left of the square) samples the top-left texel, (1, 0) the bottom-right.
    top_left = back.corner_uvs()[1, 2]
    np.testing.assert_allclose(top_left.numpy(), [0.0, 1.0])
    texel = _sample_nearest(back.texture, top_left)
    np.testing.assert_allclose(texel.numpy(), mesh.texture[0, 0].numpy())
    texel = _sample_nearest(back.texture, (1.0, 0.0))
    np.testing.assert_allclose(texel.numpy(), mesh.texture[-1, -1].numpy())


@pytest.mark.parametrize("ext", [".obj", ".ply", ".glb"])
def test_roundtrip_vertex_colors(tmp_path, ext):
    mesh = _quad(vert_colors=True)
    save_mesh(mesh, tmp_path / f"q{ext}")
    back = load_mesh(tmp_path / f"q{ext}")
    _assert_same_geometry(mesh, back)
    np.testing.assert_array_equal(back.faces.numpy(), mesh.faces.numpy())
    np.testing.assert_allclose(back.vert_colors.numpy(), mesh.vert_colors.numpy(), atol=1e-6)


def test_roundtrip_face_colors_ply(tmp_path):
    mesh = _quad(face_colors=True)
    save_mesh(mesh, tmp_path / "q.ply")
    back = load_mesh(tmp_path / "q.ply")
    _assert_same_geometry(mesh, back)
    assert back.vert_colors is None
    np.testing.assert_allclose(back.face_colors.numpy(), mesh.face_colors.numpy(), atol=1e-6)
    np.testing.assert_allclose(back.corner_colors()[1].numpy(), mesh.face_colors[1].expand(3, 3).numpy(),
                               atol=1e-6)


@pytest.mark.parametrize("ext", [".off", ".ply", ".obj", ".glb"])
def test_roundtrip_geometry(tmp_path, ext):
    mesh = icosphere(1)
    save_mesh(mesh, tmp_path / f"s{ext}")
    back = load_mesh(tmp_path / f"s{ext}")
    np.testing.assert_array_equal(back.faces.numpy(), mesh.faces.numpy())
    np.testing.assert_allclose(back.verts.numpy(), mesh.verts.numpy(), atol=1e-6)
    assert back.vert_colors is None and back.face_colors is None and back.texture is None


@pytest.mark.parametrize("ext, kind", [(".off", "vert_colors"), (".off", "textured"), (".ply", "textured"),
                                       (".obj", "face_colors"), (".glb", "face_colors")])
def test_save_refuses_to_drop_appearance(tmp_path, ext, kind):
    mesh = _quad(**{kind: True})
    with pytest.raises(ValueError, match=re.escape(f"q{ext}")):
        save_mesh(mesh, tmp_path / f"q{ext}")
    assert not (tmp_path / f"q{ext}").exists()


def test_save_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="q.stl"):
        save_mesh(_quad(), tmp_path / "q.stl")


def test_load_glb_scene_is_concatenated(tmp_path):
    import trimesh

    a = trimesh.creation.box()
    b = trimesh.creation.box()
    b.apply_translation([3.0, 0.0, 0.0])
    trimesh.Scene([a, b]).export(str(tmp_path / "two.glb"))
    mesh = load_mesh(tmp_path / "two.glb")
    assert mesh.num_faces == 24
    assert float(mesh.verts[:, 0].max()) == pytest.approx(3.5)
    assert float(face_areas(mesh.verts, mesh.faces).sum()) == pytest.approx(12.0)


# ---------------------------------------------------------------------------------------------------------
# polygons and malformed files
# ---------------------------------------------------------------------------------------------------------

_PLY_HEAD = ("ply\nformat ascii 1.0\nelement vertex {nv}\n"
             "property float x\nproperty float y\nproperty float z\n"
             "element face {nf}\nproperty list uchar int vertex_indices\nend_header\n")
_SQUARE_PLUS = "0 0 0\n1 0 0\n1 1 0\n0 1 0\n0.5 2 0\n"  # a unit square and an apex above it


@pytest.mark.parametrize("ext, text", [
    (".ply", _PLY_HEAD.format(nv=5, nf=2) + _SQUARE_PLUS + "4 0 1 2 3\n3 3 2 4\n"),
    (".off", "OFF\n5 2 0\n" + _SQUARE_PLUS + "4 0 1 2 3\n3 3 2 4\n"),
    (".obj", "".join(f"v {r}\n" for r in _SQUARE_PLUS.strip().split("\n")) + "f 1 2 3 4\nf 4 3 5\n"),
    (".obj", "".join(f"v {r}\n" for r in _SQUARE_PLUS.strip().split("\n")) + "f 1 2 3 5 4\n"),  # pentagon
])
def test_polygons_are_fan_triangulated(tmp_path, ext, text):
    """Decision: convex polygons are fan-triangulated (by trimesh); the triangles keep the winding."""
    path = tmp_path / f"poly{ext}"
    path.write_text(text)
    mesh = load_mesh(path)
    assert mesh.num_faces == 3
    assert float(face_areas(mesh.verts, mesh.faces).sum()) == pytest.approx(1.5)  # square 1 + triangle 0.5
    np.testing.assert_allclose(face_normals(mesh.verts, mesh.faces).numpy(), [[0, 0, 1]] * 3, atol=1e-6)


_MALFORMED = {
    "no_faces.obj": "v 0 0 0\nv 1 0 0\nv 1 1 0\n",
    "empty.obj": "",
    "out_of_range.obj": "v 0 0 0\nv 1 0 0\nv 1 1 0\nf 1 2 4\n",
    "zero_index.obj": "v 0 0 0\nv 1 0 0\nv 1 1 0\nf 0 1 2\n",
    "uv_out_of_range.obj": "v 0 0 0\nv 1 0 0\nv 1 1 0\nvt 0 0\nf 1/1 2/1 3/2\n",
    "nan_vertex.obj": "v 0 0 0\nv 1 nan 0\nv 1 1 0\nf 1 2 3\n",
    "two_corners.obj": "v 0 0 0\nv 1 0 0\nv 1 1 0\nf 1 2 3\nf 1 2\n",
    "bad_token.obj": "v 0 0 0\nv 1 0 0\nv 1 1 0\nf 1 2 x\n",
    "out_of_range.ply": _PLY_HEAD.format(nv=3, nf=1) + "0 0 0\n1 0 0\n1 1 0\n3 0 1 9\n",
    "inf_vertex.ply": _PLY_HEAD.format(nv=3, nf=1) + "0 0 0\n1 inf 0\n1 1 0\n3 0 1 2\n",
    "garbage.ply": "hello world\n",
    "out_of_range.off": "OFF\n3 1 0\n0 0 0\n1 0 0\n1 1 0\n3 0 1 7\n",
    "two_corners.off": "OFF\n3 1 0\n0 0 0\n1 0 0\n1 1 0\n2 0 1\n",
    "garbage.glb": "not a glb",
    "mesh.stl": "solid x\nendsolid x\n",
}


@pytest.mark.parametrize("fname", sorted(_MALFORMED))
def test_malformed_files_name_the_file(tmp_path, fname):
    path = tmp_path / fname
    path.write_text(_MALFORMED[fname])
    with pytest.raises(ValueError, match=re.escape(fname)):
        load_mesh(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="missing.obj"):
        load_mesh(tmp_path / "missing.obj")


def test_obj_errors_give_line_numbers(tmp_path):
    path = tmp_path / "bad.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nf 1 2 3\nf 1 2 4\n")
    with pytest.raises(ValueError, match="line 5"):
        load_mesh(path)


def test_obj_negative_indices_and_normals(tmp_path):
    # Relative (negative) indices and v//vn corners; normals must not split the shared vertices.
    path = tmp_path / "rel.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nvn 0 0 1\nvn 0 0 -1\nf -3//1 -2//1 -1//1\n"
                    "v 0 1 0\nf 1//2 3//2 -1//2\n")
    mesh = load_mesh(path)
    assert mesh.num_verts == 4
    np.testing.assert_array_equal(mesh.faces.numpy(), [[0, 1, 2], [0, 2, 3]])


# ---------------------------------------------------------------------------------------------------------
# Mesh container
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(faces=torch.tensor([[0, 1, 2]], dtype=torch.int32)), "int64"),
    (dict(faces=torch.tensor([[0, 1, 2, 3]])), r"faces must have shape \(N, 3\)"),
    (dict(faces=torch.tensor([[0, 1, 4]])), "index 4"),
    (dict(faces=torch.tensor([[0, -1, 2]])), "index -1"),
    (dict(faces=torch.zeros(0, 3, dtype=torch.int64)), "no faces"),
    (dict(verts=torch.zeros(0, 3)), "no vertices"),
    (dict(verts=torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, float("nan")], [0, 1, 0]])), "vertex 2"),
    (dict(verts=torch.zeros(4, 3, dtype=torch.int64)), "floating"),
    (dict(texture=torch.ones(2, 2, 3)), "no uvs"),
    (dict(uvs=torch.zeros(4, 2)), "together"),
    (dict(vert_colors=torch.ones(4, 3), face_colors=torch.ones(2, 3)), "both"),
    (dict(vert_colors=torch.ones(3, 3)), "3 rows for 4 vertices"),
    (dict(vert_colors=torch.full((4, 3), 2.0)), r"\[0, 1\]"),
    (dict(uvs=torch.zeros(2, 2), face_uvs_idx=torch.tensor([[0, 1, 2], [0, 1, 1]])), "face_uvs_idx holds"),
])
def test_validate_errors(change, message):
    mesh = dataclasses.replace(_quad(), name="my_mesh", **change)
    with pytest.raises(ValueError, match=message) as info:
        mesh.validate()
    assert "my_mesh" in str(info.value)


def test_validate_type_error():
    with pytest.raises(TypeError, match="verts"):
        Mesh(verts=np.zeros((3, 3)), faces=torch.tensor([[0, 1, 2]])).validate()


def test_degenerate_faces_are_allowed_and_listed():
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0]])
    faces = torch.tensor([[0, 1, 2], [0, 1, 3], [1, 1, 2]])  # collinear, then repeated vertex
    mesh = Mesh(verts, faces).validate()
    assert mesh.degenerate_faces().tolist() == [1, 2]


def test_to_and_with_verts():
    mesh = _quad(textured=True)
    m64 = mesh.to(dtype=torch.float64)
    assert m64.verts.dtype == torch.float64 and m64.uvs.dtype == torch.float64
    assert m64.texture.dtype == torch.float64 and m64.faces.dtype == torch.int64
    assert m64.face_uvs_idx.dtype == torch.int64 and m64.name == "quad"
    with pytest.raises(ValueError, match="int"):
        mesh.to(dtype=torch.int32)
    v = mesh.verts.clone().requires_grad_(True)
    moved = mesh.with_verts(v * 2)
    assert moved.texture is mesh.texture and moved.faces is mesh.faces
    moved.verts.sum().backward()
    assert torch.equal(v.grad, torch.full_like(v, 2.0))
    with pytest.raises(ValueError, match="with_verts"):
        mesh.with_verts(torch.zeros(5, 3))


def test_corner_colors_and_uvs():
    assert _quad().corner_colors() is None
    vc = _quad(vert_colors=True)
    np.testing.assert_array_equal(vc.corner_colors()[1].numpy(), vc.vert_colors[[0, 2, 3]].numpy())
    with pytest.raises(ValueError, match="no uvs"):
        _quad().corner_uvs()


def test_normalized():
    mesh = Mesh(torch.tensor([[0.0, 0, 0], [4, 0, 0], [0, 2, 0], [0, 0, 2]]),
                torch.tensor([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]]))
    out, centre, scale = mesh.normalized()
    np.testing.assert_allclose(centre.numpy(), [2, 1, 1])
    radius = math.sqrt(4 + 1 + 1)  # the farthest vertices from the bbox centre
    assert scale == pytest.approx(1 / radius)
    assert float(out.verts.norm(dim=1).max()) == pytest.approx(1.0)
    np.testing.assert_allclose(out.verts.numpy(), ((mesh.verts - centre) * scale).numpy())
    with pytest.raises(ValueError, match="coincide"):
        Mesh(torch.ones(3, 3), torch.tensor([[0, 1, 2]])).normalized()


def test_subdivided_matches_trimesh_and_carries_appearance():
    import trimesh

    base = icosphere(1, dtype=torch.float64)
    v = base.verts.clone().requires_grad_(True)
    sub = base.with_verts(v).subdivided(2)
    ref_v, ref_f = trimesh.remesh.subdivide(*trimesh.remesh.subdivide(base.verts.numpy(), base.faces.numpy()))
    np.testing.assert_allclose(sub.verts.detach().numpy(), ref_v, atol=1e-12)
    np.testing.assert_array_equal(sub.faces.numpy(), ref_f)
    assert sub.num_faces == 16 * base.num_faces
    sub.verts.sum().backward()  # every vertex is an affine combination of the originals: gradients sum to
    assert float(v.grad.sum()) == pytest.approx(3 * sub.num_verts)  # one per output coordinate

    # Appearance: with uv = xy on the planar quad, subdivided uvs must still equal xy at every corner.
    quad = _quad(textured=True, seam=True).subdivided(2).validate()
    np.testing.assert_allclose(quad.corner_uvs().numpy(), quad.verts[quad.faces][..., :2].numpy(), atol=1e-7)
    vc = _quad(vert_colors=True).subdivided(1).validate()
    mid = vc.vert_colors[vc.faces[0, 1]]  # the midpoint of corners 0 and 1 of face 0
    np.testing.assert_allclose(mid.numpy(), 0.5 * (vc.vert_colors[0] + vc.vert_colors[1]).numpy())
    fc = _quad(face_colors=True).subdivided(1).validate()
    parent = _quad(face_colors=True).face_colors.numpy()
    np.testing.assert_array_equal(fc.face_colors.numpy(), np.repeat(parent, 4, axis=0))


# ---------------------------------------------------------------------------------------------------------
# icosphere, normals, areas
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_icosphere(level):
    mesh = icosphere(level, radius=2.5)
    assert mesh.num_faces == 20 * 4**level and mesh.num_verts == 10 * 4**level + 2
    np.testing.assert_allclose(mesh.verts.norm(dim=1).numpy(), 2.5, rtol=1e-6)
    centroids = mesh.verts[mesh.faces].mean(dim=1)
    cos = (face_normals(mesh.verts, mesh.faces) * centroids).sum(-1) / centroids.norm(dim=1)
    assert bool((cos > 0.9).all())  # outward (and nearly radial)
    # Euler characteristic of a sphere
    edges = torch.cat([mesh.faces[:, [0, 1]], mesh.faces[:, [1, 2]], mesh.faces[:, [2, 0]]]).sort(1).values
    assert mesh.num_verts - torch.unique(edges, dim=0).shape[0] + mesh.num_faces == 2


@pytest.mark.parametrize("level, radius", [(-1, 1.0), (7, 1.0), (2, 0.0)])
def test_icosphere_bad_args(level, radius):
    with pytest.raises(ValueError, match="icosphere"):
        icosphere(level, radius)


def test_normals_match_sphere():
    mesh = icosphere(3, dtype=torch.float64)
    v, f = mesh.verts, mesh.faces
    # The plane through three points on a sphere about the origin is {x : n.x = 1} with n = M^-1 (1, 1, 1)
    # (M: the corners as rows); n points away from the origin, i.e. outward.
    tri = v[f].numpy()
    n_ref = np.linalg.solve(tri, np.ones((len(tri), 3, 1)))[..., 0]
    n_ref /= np.linalg.norm(n_ref, axis=1, keepdims=True)
    fn = face_normals(v, f)
    np.testing.assert_allclose(fn.numpy(), n_ref, atol=1e-12)
    assert float((fn * v[f].mean(1) / v[f].mean(1).norm(dim=1, keepdim=True)).sum(-1).min()) > 0.995
    vn = vertex_normals(v, f)
    np.testing.assert_allclose(vn.norm(dim=1).numpy(), 1.0, atol=1e-12)
    assert float((vn * v).sum(-1).min()) > 0.9995  # analytic normal of the unit sphere is v itself
    raw = face_normals(v, f, normalize=False)
    np.testing.assert_allclose(raw.norm(dim=1).numpy(), 2 * _heron(tri), rtol=1e-9)


def test_normals_and_areas_batched_and_heron():
    torch.manual_seed(0)
    verts = torch.randn(2, 7, 3, dtype=torch.float64)
    faces = torch.randint(0, 7, (9, 3))
    for fn in (face_normals, vertex_normals, face_areas):
        batched = fn(verts, faces)
        for b in range(2):
            torch.testing.assert_close(batched[b], fn(verts[b], faces))
    areas = face_areas(verts[0], faces).numpy()
    np.testing.assert_allclose(areas, _heron(verts[0][faces].numpy()), atol=1e-9)


def test_normals_gradcheck():
    torch.manual_seed(1)
    verts = (icosphere(0, dtype=torch.float64).verts + 0.1 * torch.randn(12, 3, dtype=torch.float64))
    verts.requires_grad_(True)
    faces = icosphere(0).faces
    assert torch.autograd.gradcheck(lambda x: face_normals(x, faces), (verts,))
    assert torch.autograd.gradcheck(lambda x: vertex_normals(x, faces), (verts,))
    assert torch.autograd.gradcheck(lambda x: face_areas(x, faces), (verts,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normals_zero_area_face_no_nan(dtype):
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0], [0.5, 0.5, 1]], dtype=dtype,
                         requires_grad=True)
    faces = torch.tensor([[0, 1, 2], [0, 1, 3], [1, 1, 4], [0, 1, 4]])  # faces 1 and 2 have zero area
    fn = face_normals(verts, faces)
    assert torch.equal(fn[1], torch.zeros(3, dtype=dtype)) and torch.equal(fn[2], torch.zeros(3, dtype=dtype))
    np.testing.assert_allclose(fn[0].detach().numpy(), [0, 0, 1])
    loss = fn.sum() + vertex_normals(verts, faces).sum() + face_areas(verts, faces).sum()
    loss.backward()
    assert bool(torch.isfinite(verts.grad).all())
    # An isolated vertex gets a zero normal.
    assert torch.equal(vertex_normals(verts.detach(), faces[:1])[4], torch.zeros(3, dtype=dtype))


def test_normals_bad_input():
    with pytest.raises(ValueError, match="face_normals: verts"):
        face_normals(torch.zeros(3, 2), torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="vertex_normals: faces"):
        vertex_normals(torch.zeros(3, 3), torch.tensor([[0, 1, 2, 0]]))
