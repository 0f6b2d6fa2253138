"""Tests for taichi_dr.losses.mesh: hand-computed values, independent numpy references, gradcheck and degenerate
meshes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from taichi_dr.core.mesh import icosphere
from taichi_dr.losses import (
    MeshTopology,
    edge_length_loss,
    flatten_loss,
    laplacian_loss,
    mesh_laplacian,
    neg_iou_loss,
    normal_consistency_loss,
    silhouette_iou,
)

# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------


def _grid(n: int = 5, dtype=torch.float64):
    """Flat regular n x n vertex grid in z = 0, every square split along the same diagonal."""
    ys, xs = torch.meshgrid(torch.arange(n, dtype=dtype), torch.arange(n, dtype=dtype), indexing="ij")
    verts = torch.stack([xs.flatten(), ys.flatten(), torch.zeros(n * n, dtype=dtype)], dim=1)
    faces = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, i * n + j + 1, (i + 1) * n + j + 1, (i + 1) * n + j
            faces += [[a, b, c], [a, c, d]]
    interior = [i * n + j for i in range(1, n - 1) for j in range(1, n - 1)]
    return verts, torch.tensor(faces), interior


def _fan(radii, angles_deg, height=0.0, dtype=torch.float64):
    """A closed fan: centre vertex 0 (lifted by ``height``) and a ring of vertices at polar coords (r, a)."""
    ring = [[r * math.cos(math.radians(a)), r * math.sin(math.radians(a)), 0.0]
            for r, a in zip(radii, angles_deg, strict=True)]
    verts = torch.tensor([[0.0, 0.0, height]] + ring, dtype=dtype)
    k = len(ring)
    faces = torch.tensor([[0, 1 + i, 1 + (i + 1) % k] for i in range(k)])
    return verts, faces


def _pair(angle_deg: float, dtype=torch.float64):
    """Two triangles hinged on edge (0, 1) along x; the dihedral opening is ``angle_deg`` (180 = flat)."""
    a = math.radians(angle_deg)
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.5, math.cos(a), math.sin(a)]], dtype=dtype)
    faces = torch.tensor([[0, 1, 2], [1, 0, 3]])  # consistently oriented (edge 0-1 traversed both ways)
    return verts, faces


def _random_mesh(seed=0, batch=None):
    torch.manual_seed(seed)
    base = icosphere(0, dtype=torch.float64)
    shape = (12, 3) if batch is None else (batch, 12, 3)
    verts = base.verts + 0.15 * torch.randn(shape, dtype=torch.float64)
    return verts.requires_grad_(True), base.faces


def _degenerate_mesh():
    """An octahedron with one vertex collapsed onto another: two zero-area faces, one zero-length edge."""
    verts = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]],
                         dtype=torch.float64)
    faces = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4],
                          [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    verts[4] = verts[0]  # faces 0 and 3 lose their area; edge (0, 4) has zero length
    return verts.requires_grad_(True), faces


# ---------------------------------------------------------------------------------------------------------
# silhouettes
# ---------------------------------------------------------------------------------------------------------


def test_silhouette_iou_values():
    t = torch.zeros(3, 4, 4)
    t[:, :, :2] = 1.0  # left half
    p = torch.zeros(3, 4, 4)
    p[0] = t[0]  # identical
    p[1, :, 2:] = 1.0  # disjoint
    p[2] = 0.5  # half everywhere: inter = 0.5 * 8, union = 8 * 1 + 8 * 0.5
    iou = silhouette_iou(p, t)
    np.testing.assert_allclose(iou.numpy(), [1.0, 0.0, 4.0 / 12.0], atol=1e-6)
    assert float(neg_iou_loss(p, t)) == pytest.approx(1.0 - (1.0 + 0.0 + 1.0 / 3.0) / 3.0, abs=1e-6)


def test_silhouette_iou_shapes():
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        silhouette_iou(torch.zeros(4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        silhouette_iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))


def test_silhouette_gradcheck():
    torch.manual_seed(0)
    p = torch.rand(2, 5, 6, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 5, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: silhouette_iou(x, t), (p,))
    assert torch.autograd.gradcheck(lambda x: neg_iou_loss(x, t), (p,))


# ---------------------------------------------------------------------------------------------------------
# topology
# ---------------------------------------------------------------------------------------------------------


def test_topology_pair():
    verts, faces = _pair(90.0)
    topo = MeshTopology.from_faces(faces)
    assert topo.edges.tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert topo.interior_edges.tolist() == [0]
    assert topo.interior_faces.tolist() == [[0, 1]]
    assert topo.interior_opposite.tolist() == [[2, 3]]
    assert topo.degree.tolist() == [3, 3, 2, 2]
    e = topo.edges[topo.face_edges]  # (F, 3, 2): each face's edges in order (v0 v1), (v1 v2), (v2 v0)
    expected = torch.stack([faces, faces.roll(-1, 1)], -1).sort(-1).values
    assert torch.equal(e, expected)


@pytest.mark.parametrize("level", [0, 2])
def test_topology_icosphere(level):
    mesh = icosphere(level)
    topo = MeshTopology.from_faces(mesh.faces)
    assert topo.edges.shape[0] == 30 * 4**level
    assert topo.interior_edges.shape[0] == topo.edges.shape[0]  # closed manifold
    # Each interior edge: both faces contain it, and the opposite vertices are the faces' third vertices.
    f = mesh.faces[topo.interior_faces]  # (E, 2, 3)
    e = topo.edges[topo.interior_edges]
    for s in range(2):
        has = (f[:, s] == e[:, :1]).any(1) & (f[:, s] == e[:, 1:]).any(1)
        assert bool(has.all())
        assert bool((f[:, s] == topo.interior_opposite[:, s : s + 1]).any(1).all())
        assert not bool((topo.interior_opposite[:, s : s + 1] == e).any())
    dense = topo.adjacency.to_dense()
    assert torch.equal(dense, dense.T) and torch.equal(dense.sum(1).long(), topo.degree)
    assert sorted(topo.degree.unique().tolist()) == ([5] if level == 0 else [5, 6])


def test_topology_nonmanifold_and_boundary_edges_left_out():
    faces = torch.tensor([[0, 1, 2], [1, 0, 3], [0, 1, 4]])  # edge (0, 1) has three faces
    topo = MeshTopology.from_faces(faces)
    assert topo.interior_edges.numel() == 0


def test_topology_argument_checked():
    verts, faces = _random_mesh()
    topo = MeshTopology.from_faces(faces)
    for loss in (laplacian_loss, flatten_loss, edge_length_loss, normal_consistency_loss):
        assert torch.equal(loss(verts, faces, topology=topo), loss(verts, faces))
    with pytest.raises(ValueError, match="topology was built for"):
        flatten_loss(verts[:-1], faces[:5], topology=topo)
    with pytest.raises(TypeError, match="MeshTopology"):
        laplacian_loss(verts, faces, topology="nope")
    with pytest.raises(ValueError, match="outside"):
        MeshTopology.from_faces(faces, num_verts=5)


# ---------------------------------------------------------------------------------------------------------
# Laplacian
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["uniform", "cotangent"])
def test_laplacian_flat_grid_interior_is_zero(method):
    verts, faces, interior = _grid(5)
    lap = mesh_laplacian(verts, faces, method)
    assert float(lap[interior].abs().max()) < 1e-12
    assert float(lap.abs().max()) > 0.1  # the boundary is not zero: the test can fail


@pytest.mark.parametrize("method, min_cos", [("uniform", 0.85), ("cotangent", 0.999)])
def test_laplacian_sphere_points_inward(method, min_cos):
    mesh = icosphere(2, dtype=torch.float64)
    lap = mesh_laplacian(mesh.verts, mesh.faces, method)
    radial = (lap * mesh.verts).sum(-1)
    assert bool((radial < 0).all())
    # Close to the inward normal; the uniform weights also pull tangentially where the triangles are uneven.
    cos = -radial / lap.norm(dim=1)
    assert float(cos.min()) > min_cos
    loss = laplacian_loss(mesh.verts, mesh.faces, method)
    assert float(loss) == pytest.approx(float(lap.square().sum(1).mean()))


def test_cotangent_linear_precision_irregular_fan():
    # Irregular planar fan: the cotangent Laplacian at the centre is 0, the uniform one is not.
    verts, faces = _fan([1.0, 2.0, 0.7, 1.5, 1.1], [0, 80, 150, 220, 290])
    assert float(mesh_laplacian(verts, faces, "cotangent")[0].norm()) < 1e-12
    assert float(mesh_laplacian(verts, faces, "uniform")[0].norm()) > 0.05


def _cotangent_laplacian_numpy(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Independent reference: angles via arctan2, weights accumulated edge by edge in a dict."""
    w = {}
    for tri in f:
        for k in range(3):
            c, i, j = tri[k], tri[(k + 1) % 3], tri[(k + 2) % 3]  # angle at c opposite edge (i, j)
            a, b = v[i] - v[c], v[j] - v[c]
            angle = math.atan2(np.linalg.norm(np.cross(a, b)), float(np.dot(a, b)))
            key = (min(i, j), max(i, j))
            w[key] = w.get(key, 0.0) + 0.5 / math.tan(angle)
    out = np.zeros_like(v)
    total = np.zeros(len(v))
    for (i, j), wij in w.items():
        out[i] += wij * (v[j] - v[i])
        out[j] += wij * (v[i] - v[j])
        total[i] += wij
        total[j] += wij
    return out / total[:, None]


def test_cotangent_matches_independent_reference():
    verts, faces = _random_mesh(seed=3)
    ref = _cotangent_laplacian_numpy(verts.detach().numpy(), faces.numpy())
    np.testing.assert_allclose(mesh_laplacian(verts, faces, "cotangent").detach().numpy(), ref, atol=1e-10)
    # A hand case: the regular octahedron has all angles 60 degrees, so L v = mean(neighbours) - v = -v.
    octa = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]],
                        dtype=torch.float64)
    f = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    torch.testing.assert_close(mesh_laplacian(octa, f, "cotangent"), -octa)


def test_laplacian_batched_and_bad_method():
    verts, faces = _random_mesh(batch=2)
    for method in ("uniform", "cotangent"):
        lap = mesh_laplacian(verts, faces, method)
        for b in range(2):
            torch.testing.assert_close(lap[b], mesh_laplacian(verts[b], faces, method))
    with pytest.raises(ValueError, match="method"):
        laplacian_loss(verts, faces, method="cot")


# ---------------------------------------------------------------------------------------------------------
# flatten, normal consistency, edge length
# ---------------------------------------------------------------------------------------------------------


def test_flatten_loss_values():
    verts, faces = _fan([1.0, 2.0, 0.7, 1.5, 1.1], [0, 80, 150, 220, 290])  # planar fan
    assert float(flatten_loss(verts, faces)) < 1e-10
    assert float(flatten_loss(*_pair(180.0))) < 1e-10  # flat pair
    assert float(flatten_loss(*_pair(0.0))) == pytest.approx(4.0, abs=1e-5)  # folded onto itself
    assert float(flatten_loss(*_pair(90.0))) == pytest.approx(1.0, abs=1e-5)  # cos = 0
    assert float(flatten_loss(*_pair(60.0))) == pytest.approx(1.5**2, abs=1e-5)  # cos = 0.5
    # Lifting the fan centre bends every interior edge: positive.
    assert float(flatten_loss(*_fan([1.0] * 6, range(0, 360, 60), height=0.5))) > 0.01


def test_normal_consistency_values():
    verts, faces, _ = _grid(4)
    assert float(normal_consistency_loss(verts, faces)) < 1e-12
    assert float(normal_consistency_loss(*_pair(180.0))) == pytest.approx(0.0, abs=1e-12)
    assert float(normal_consistency_loss(*_pair(0.0))) == pytest.approx(2.0, abs=1e-12)
    assert float(normal_consistency_loss(*_pair(90.0))) == pytest.approx(1.0, abs=1e-12)
    # The regular icosahedron: each face normal points along its centroid.
    mesh = icosphere(0, dtype=torch.float64)
    n = mesh.verts[mesh.faces].mean(1)
    n = n / n.norm(dim=1, keepdim=True)
    topo = MeshTopology.from_faces(mesh.faces)
    ref = (1 - (n[topo.interior_faces[:, 0]] * n[topo.interior_faces[:, 1]]).sum(-1)).mean()
    assert float(normal_consistency_loss(mesh.verts, mesh.faces)) == pytest.approx(float(ref), rel=1e-9)


def test_edge_length_values():
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])  # 4 unit edges and a diagonal of sqrt(2)
    assert float(edge_length_loss(verts, faces)) == pytest.approx((4 + 2) / 5)
    loss = edge_length_loss(verts, faces, target_length=1.0)
    assert float(loss) == pytest.approx((math.sqrt(2) - 1) ** 2 / 5)
    both = torch.stack([verts, 2 * verts])
    assert float(edge_length_loss(both, faces)) == pytest.approx((6 / 5 + 24 / 5) / 2)


# ---------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------

_LOSSES = {
    "laplacian_uniform": lambda v, f: laplacian_loss(v, f, "uniform"),
    "laplacian_cotangent": lambda v, f: laplacian_loss(v, f, "cotangent"),
    "flatten": flatten_loss,
    "edge_length": edge_length_loss,
    "edge_length_target": lambda v, f: edge_length_loss(v, f, target_length=0.7),
    "normal_consistency": normal_consistency_loss,
}


@pytest.mark.parametrize("name", sorted(_LOSSES))
@pytest.mark.parametrize("batch", [None, 2])
def test_gradcheck(name, batch):
    verts, faces = _random_mesh(seed=1, batch=batch)
    assert torch.autograd.gradcheck(lambda v: _LOSSES[name](v, faces), (verts,))


@pytest.mark.parametrize("name", sorted(_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_nan_on_degenerate_mesh(name, dtype):
    verts, faces = _degenerate_mesh()
    verts = verts.detach().to(dtype).requires_grad_(True)
    loss = _LOSSES[name](verts, faces)
    loss.backward()
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(verts.grad).all())


def test_no_nan_when_everything_collapses():
    verts = torch.zeros(6, 3, dtype=torch.float64, requires_grad=True)
    faces = _degenerate_mesh()[1]
    total = sum(fn(verts, faces) for fn in _LOSSES.values())
    total.backward()
    assert bool(torch.isfinite(total)) and bool(torch.isfinite(verts.grad).all())
