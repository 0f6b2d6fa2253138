"""The renderer at extreme scales: triangles 1e-3 to 1e6 units across crossing the camera plane (issue 8's
float32 NaN repro and a seeded fuzz), against float64 and against analytic ray casting; and the guard-band
clipping that keeps projected corners near the image, which must not change any pixel."""

import pytest
import torch

import taichi_dr.raster.renderer as renderer
from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import Mesh, icosphere
from taichi_dr.raster import RasterSettings
from taichi_dr.raster.clip import clip_near, guard_planes
from taichi_dr.raster.renderer import render_mesh
from taichi_dr.raster.shading import Lights

K_REPRO = [[12.0, 0, 12], [0, 12, 16], [0, 0, 1]]
SETTINGS = RasterSettings(sigma=0.0587, gamma=0.0301)
FACE = torch.tensor([[0, 1, 2]])


def render_all(verts, colors, cams, settings=SETTINGS):
    """Render rgb (lit), depth and normals and back-propagate all of them; returns (outputs, gradients)."""
    v = verts.clone().requires_grad_()
    c = colors.clone().requires_grad_()
    out = render_mesh(Mesh(verts=v, faces=FACE, vert_colors=c), cams, Lights.default(dtype=verts.dtype), settings,
                      outputs=("rgb", "depth", "normals"))
    (out.alpha.sum() + out.rgb.sum() + out.depth.sum() + out.normals.sum()).backward()
    return out, (v.grad, c.grad)


def assert_finite(out, grads, label):
    for name in ("alpha", "rgb", "depth", "normals"):
        x = getattr(out, name)
        assert torch.isfinite(x).all(), f"{label}: {name} has {int((~torch.isfinite(x)).sum())} NaN/Inf pixels"
    for name, g in zip(("vertex", "colour"), grads, strict=True):
        assert torch.isfinite(g).all(), f"{label}: {name} gradients not finite"


def test_issue8_repro_float32_has_no_nan_and_agrees_with_float64():
    """Issue 8's repro: one float32 triangle ~1e6 units across crossing the camera plane gave NaN depth and
    normals, and alpha 0.5 along a line where float64 renders nothing."""
    R = torch.tensor([[0.34138911962509155, 1.1862954174546303e-08, 0.9399220943450928],
                      [-0.810717761516571, -0.505993664264679, 0.29446080327033997],
                      [0.4755946099758148, -0.8625372052192688, -0.17274071276187897]])
    v = torch.tensor([[584255.5, -533441.4375, -237447.6875], [396335.5625, -480743.375, 285592.65625],
                      [-625630.25, 470868.0, 603233.25]])
    colors = torch.eye(3)
    alphas = {}
    for dt in (torch.float32, torch.float64):
        cams = Cameras(torch.tensor([K_REPRO], dtype=dt), R[None].to(dt), torch.tensor([[0.0, 0.0, 2.7]], dtype=dt),
                       (32, 24))
        out, grads = render_all(v.to(dt), colors.to(dt), cams)
        assert_finite(out, grads, str(dt))
        alphas[dt] = out.alpha
    torch.testing.assert_close(alphas[torch.float32].double(), alphas[torch.float64], atol=1e-4, rtol=0)


def _rotation(g):
    q = torch.randn(4, generator=g, dtype=torch.float64)
    w, x, y, z = q / q.norm()
    return torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]], dtype=torch.float64)


def crossing_triangle(seed):
    """A random triangle 1e-3 to 1e6 units across with one or two corners behind the camera, around a point
    in the view cone, under a random camera rotation: (world verts (3, 3) float32, R, t, scale)."""
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** (9 * torch.rand(1, generator=g).item() - 3)
    depth = 10 ** (2 * torch.rand(1, generator=g).item() - 1.5) * max(scale, 0.2)
    centre = torch.tensor([0.0, 0.0, depth], dtype=torch.float64)
    centre = centre + (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * 0.3 * depth
    corners = centre + (torch.rand(3, 3, generator=g, dtype=torch.float64) - 0.5) * 2 * scale
    behind = 1 + int(torch.rand(1, generator=g).item() < 0.5)
    corners[:behind, 2] = -torch.rand(behind, generator=g, dtype=torch.float64) * scale - 0.05
    corners[behind:, 2] = torch.rand(3 - behind, generator=g, dtype=torch.float64) * scale + 0.5
    R, t = _rotation(g), torch.tensor([0.0, 0.3, 2.7], dtype=torch.float64)
    world = (corners - t) @ R  # camera = R world + t
    return world.float(), R.float(), t.float(), scale


def test_fuzz_triangles_crossing_the_camera_plane():
    """50 seeded triangles at scales 1e-3..1e6 crossing the camera plane: outputs and gradients finite in
    float32 and float64, and float32's alpha within 1e-4 of float64's (the same float32 inputs for both)."""
    covered = 0
    for seed in range(50):
        verts, R, t, scale = crossing_triangle(seed)
        alphas = {}
        for dt in (torch.float32, torch.float64):
            cams = Cameras(torch.tensor([K_REPRO], dtype=dt), R[None].to(dt), t[None].to(dt), (32, 24))
            out, grads = render_all(verts.to(dt), torch.eye(3, dtype=dt), cams)
            assert_finite(out, grads, f"seed {seed}, scale {scale:.3g}, {dt}")
            alphas[dt] = out.alpha
        diff = (alphas[torch.float32].double() - alphas[torch.float64]).abs().max().item()
        assert diff <= 1e-4, f"seed {seed}, scale {scale:.3g}: float32 alpha off by {diff:.3g}"
        covered += int(alphas[torch.float64].mean() > 0.01)
    assert covered >= 20  # most cases really put the triangle in view


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_crossing_triangle_against_ray_casting(dtype):
    """Hard mode, identity camera: a pixel is covered iff its ray meets the triangle in front of the near
    plane (ray casting in float64), and its depth is the ray-plane intersection's."""
    H, W, near = 40, 48, 0.1
    K = torch.tensor([[30.0, 0, 24], [0, 30.0, 20], [0, 0, 1]], dtype=torch.float64)
    cams = Cameras(K[None].to(dtype), torch.eye(3, dtype=dtype)[None], torch.zeros(1, 3, dtype=dtype), (H, W))
    # Corners 4e5 from (0.5, 0.2, 5), one behind the camera; the edge between corners 0 and 1 passes through
    # that point, in view.
    tri = torch.tensor([[119976.5078125, 319936.21875, 207963.40625], [-119975.5078125, -319935.8125, -207953.40625],
                        [-377382.03125, 41931.59375, 125799.1796875]], dtype=torch.float32)
    tri64 = tri.double()  # the exact values the float32 render sees
    settings = RasterSettings(mode="hard", near=near, far=1e7)
    out = render_mesh(Mesh(verts=tri.to(dtype), faces=FACE), cams, None, settings, outputs=("depth",))

    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                          indexing="ij")
    dirs = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1)
    n = torch.linalg.cross(tri64[1] - tri64[0], tri64[2] - tri64[0])
    depth = (n @ tri64[0]) / (dirs @ n)  # z of the ray-plane intersection (dirs have z = 1)
    p = depth[..., None] * dirs
    # Barycentrics of p in 3D, by sub-triangle areas along n.
    bary = torch.stack([torch.linalg.cross(tri64[(k + 1) % 3] - p, tri64[(k + 2) % 3] - p) @ n for k in range(3)],
                       -1) / (n @ n)
    hit = (bary.min(-1).values >= 0) & (depth >= near)
    clear = (bary.min(-1).values.abs() > 1e-6) & ((depth - near).abs() > 1e-3)  # away from edges
    covered = out.pix_to_face[0] >= 0
    assert hit.sum() > 50 and (~hit).sum() > 50  # edges cross the image
    assert torch.equal(covered[clear], hit[clear])
    torch.testing.assert_close(out.depth[0][hit & covered].double(), depth[hit & covered],
                               rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=0)


def test_guard_band_changes_no_hard_pixel(monkeypatch):
    """Hard mode, float64, the camera inside a sphere with a near plane so close that the cut faces' corners
    project far beyond the band: the same images with the guard band as without it (a margin so large that
    it cuts nothing), though the band really cut faces; pix_to_face names the original faces."""
    mesh = icosphere(2, radius=1.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    colors = torch.rand(mesh.num_verts, 3, generator=g, dtype=torch.float64)
    cams = Cameras.look_at(torch.tensor([[0.1, 0.05, -0.98]], dtype=torch.float64), at=(0.0, 0.0, 0.0), fov=90,
                           image_size=(24, 24))
    settings = RasterSettings(mode="hard", near=0.01)
    slots = []
    real_clip = renderer.clip_near

    def spy(corners, near, guard=None):
        clipped, index = real_clip(corners, near, guard)
        slots.append(clipped.shape[1])
        return clipped, index

    monkeypatch.setattr(renderer, "clip_near", spy)
    results = []
    for margin in (None, 1e30):
        if margin is not None:
            monkeypatch.setattr(renderer, "guard_margin", lambda settings, size, m=margin: m)
        results.append(render_mesh(Mesh(verts=mesh.verts, faces=mesh.faces, vert_colors=colors), cams,
                                   Lights.default(dtype=torch.float64), settings, outputs=("rgb", "depth", "normals")))
    assert slots[0] > slots[1] > mesh.num_faces  # the band cut pieces of the near plane's cuts
    a, b = results
    assert (a.pix_to_face >= 0).all() and (a.pix_to_face < mesh.num_faces).all()
    assert torch.equal(a.pix_to_face, b.pix_to_face)
    for name in ("rgb", "depth", "normals"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-9, rtol=0)


def test_clip_against_guard_band_keeps_the_inside_part():
    """clip_near with guard planes, on a face crossing the near plane: every kept corner is in front of it and
    projects inside the band, attributes stay linear in 3D, winding is kept, and a point of the image plane is
    in a kept piece iff its ray meets the face in front of the near plane and it lies in the band. A face
    wholly in front, though reaching past the band, is left as it is."""
    K = torch.tensor([[[20.0, 0.5, 11.0], [0.0, -18.0, 9.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    H, W, margin, near = 18, 22, 5.0, 1.0
    crossing = torch.tensor([[-30.0, -2.0, 4.0], [40.0, 1.0, 8.0], [2.0, 35.0, -3.0]], dtype=torch.float64)
    in_front = torch.tensor([[-30.0, -2.0, 4.0], [40.0, 1.0, 8.0], [2.0, 35.0, 3.0]], dtype=torch.float64)
    coef = torch.tensor([[0.3, -1.2, 0.7], [2.0, 0.1, -0.4]], dtype=torch.float64)
    offset = torch.tensor([0.5, -1.0], dtype=torch.float64)
    tris = torch.stack([crossing, in_front])
    clipped, index = clip_near(torch.cat([tris, tris @ coef.T + offset], -1)[None], near,
                               guard_planes(K, (H, W), margin))
    assert torch.equal(clipped[0, 1, :, :3], in_front) and index[0, 1] == 1
    pieces = clipped[0][(index[0] == 0) & (clipped[0, :, :, 2] >= near).all(-1)]
    assert pieces.shape[0] >= 3

    def project(xyz):
        return torch.stack([(K[0, 0, 0] * xyz[..., 0] + K[0, 0, 1] * xyz[..., 1]) / xyz[..., 2] + K[0, 0, 2],
                            K[0, 1, 1] * xyz[..., 1] / xyz[..., 2] + K[0, 1, 2]], -1)

    uv = project(pieces[..., :3])
    assert (uv[..., 0] >= -margin - 1e-9).all() and (uv[..., 0] <= W + margin + 1e-9).all()
    assert (uv[..., 1] >= -margin - 1e-9).all() and (uv[..., 1] <= H + margin + 1e-9).all()
    torch.testing.assert_close(pieces[..., 3:], pieces[..., :3] @ coef.T + offset)
    normal = torch.linalg.cross(crossing[1] - crossing[0], crossing[2] - crossing[0])
    for t in pieces[..., :3]:  # winding kept
        assert torch.dot(torch.linalg.cross(t[1] - t[0], t[2] - t[0]), normal) > 0

    def inside(p, t):  # points p (N, 2) in triangles t (M, 3, 2) of either winding -> (N, M)
        e = [(t[:, (k + 1) % 3] - t[:, k]) for k in range(3)]
        s = torch.stack([e[k][:, 0] * (p[:, None, 1] - t[:, k, 1]) - e[k][:, 1] * (p[:, None, 0] - t[:, k, 0])
                         for k in range(3)], -1)
        return (s > 0).all(-1) | (s < 0).all(-1)

    g = torch.Generator().manual_seed(0)
    pts = torch.rand(20000, 2, generator=g, dtype=torch.float64) * torch.tensor([W + 40.0, H + 40.0]) - 20.0
    dirs = torch.stack([(pts[:, 0] - K[0, 0, 2] - K[0, 0, 1] * (pts[:, 1] - K[0, 1, 2]) / K[0, 1, 1]) / K[0, 0, 0],
                        (pts[:, 1] - K[0, 1, 2]) / K[0, 1, 1], torch.ones(len(pts), dtype=torch.float64)], -1)
    depth = (normal @ crossing[0]) / (dirs @ normal)
    hit_point = depth[:, None] * dirs
    bary = torch.stack([torch.linalg.cross(crossing[(k + 1) % 3] - hit_point, crossing[(k + 2) % 3] - hit_point)
                        @ normal for k in range(3)], -1)
    hit = (bary.min(-1).values >= 0) & (depth >= near)
    in_band = ((pts >= -margin) & (pts <= torch.tensor([W + margin, H + margin], dtype=torch.float64))).all(-1)
    expected = hit & in_band
    assert expected.sum() > 1000 and (hit & ~in_band).sum() > 1000
    # Points within 1e-9 px of a cut are ambiguous; random points are not there.
    assert torch.equal(inside(pts, uv).any(-1), expected)
