"""The mesh renderer: analytic depth, gradients to cameras / lights / textures / vertices by finite
differences, near-plane clipping, and bad inputs."""

import math

import pytest
import torch

from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import Mesh, icosphere
from taichi_dr.core.transforms import CameraParameters
from taichi_dr.raster import RasterSettings
from taichi_dr.raster.renderer import MeshRenderer, render_mesh
from taichi_dr.raster.shading import Lights

D = torch.float64


def quad(z0=3.0, tilt=0.4, size=1.0):
    """Two triangles forming a square tilted about the x axis, centred at depth z0, facing -z (the camera)."""
    c, s = math.cos(tilt), math.sin(tilt)
    corners = torch.tensor([[-size, -size], [size, -size], [size, size], [-size, size]], dtype=D)
    y = corners[:, 1] * c
    z = z0 + corners[:, 1] * s
    verts = torch.stack([corners[:, 0], y, z], -1)
    faces = torch.tensor([[0, 2, 1], [0, 3, 2]])  # counter-clockwise seen from the camera at the origin
    return verts, faces


def identity_camera(size=24, fov=60.0):
    return Cameras.look_at(torch.zeros(1, 3, dtype=D), at=(0.0, 0.0, 1.0), up=(0.0, -1.0, 0.0), fov=fov,
                           image_size=(size, size))


def test_depth_of_tilted_plane_is_exact():
    verts, faces = quad()
    cams = identity_camera()
    out = render_mesh(Mesh(verts=verts, faces=faces), cams, settings=RasterSettings(mode="hard"),
                      outputs=("depth", "normals"))
    covered = out.pix_to_face[0] >= 0
    assert covered.sum() > 100
    # Analytic: the ray through each pixel centre meets the plane n.x = n.p0.
    origins, dirs = cams.image_rays()
    n = torch.linalg.cross(verts[1] - verts[0], verts[2] - verts[0])
    t = (n @ verts[0]) / (dirs[0] @ n)
    depth = t * dirs[0][..., 2]
    torch.testing.assert_close(out.depth[0][covered], depth[covered], atol=1e-9, rtol=0)
    normal = -n / n.norm()  # faces are (0, 2, 1): the outward normal is (v2 - v0) x (v1 - v0) = -n
    assert normal[2] < 0  # and it points back at the camera
    torch.testing.assert_close(out.normals[0][covered], normal.expand(int(covered.sum()), 3), atol=1e-9, rtol=0)


def small_scene(dtype=D):
    mesh = icosphere(1, radius=0.8, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    colors = torch.rand(mesh.num_verts, 3, generator=g, dtype=dtype)
    # Jitter the vertices: a symmetric icosphere has normals exactly perpendicular to axis-aligned lights,
    # where max(0, n.l) has a kink that finite differences cannot check.
    mesh = mesh.with_verts(mesh.verts + 0.02 * torch.randn(mesh.verts.shape, generator=g, dtype=dtype))
    cams = Cameras.from_spherical(3.0, torch.tensor([20.0, -10.0], dtype=dtype),
                                  torch.tensor([30.0, 200.0], dtype=dtype), fov=40, image_size=(12, 12))
    return Mesh(verts=mesh.verts, faces=mesh.faces, vert_colors=colors), cams


SOFT = RasterSettings(sigma=3e-2, gamma=0.1)


def lights(specular=0.3):
    return Lights(ambient=torch.full((3,), 0.3, dtype=D), directions=torch.tensor([[0.3, 0.8, -0.5]], dtype=D),
                  colors=torch.tensor([[0.6, 0.5, 0.4]], dtype=D), specular=torch.full((3,), specular, dtype=D),
                  shininess=8.0)


def test_gradcheck_vertices_and_colours():
    mesh, cams = small_scene()
    def fn(verts, colors):
        out = render_mesh(Mesh(verts=verts, faces=mesh.faces, vert_colors=colors), cams, lights(), SOFT)
        return out.rgb, out.alpha

    inputs = (mesh.verts.clone().requires_grad_(), mesh.vert_colors.clone().requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_gradcheck_camera_parameters():
    mesh, cams = small_scene()
    params = CameraParameters(cams, rotation="axis_angle", learn_focal=True).double()
    names = [n for n, _ in params.named_parameters()]
    assert {"rot", "dt"} <= set(names)

    def fn(*values):
        for (_, p), v in zip(params.named_parameters(), values, strict=True):
            p.data = v
        # Rebuild the graph from the tensors gradcheck perturbs.
        out = torch.func.functional_call(params, dict(zip(names, values, strict=True)), ())
        return render_mesh(mesh, out, None, SOFT).rgb

    values = tuple((p.detach().clone() + 0.01).requires_grad_() for _, p in params.named_parameters())
    assert torch.autograd.gradcheck(fn, values, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_gradcheck_lights():
    mesh, cams = small_scene()

    def fn(ambient, directions, colors, specular):
        lights = Lights(ambient, directions, colors, specular, shininess=8.0)
        return render_mesh(mesh, cams, lights, SOFT).rgb

    base = lights(0.2)
    values = tuple(x.clone().requires_grad_() for x in (base.ambient, base.directions, base.colors, base.specular))
    assert torch.autograd.gradcheck(fn, values, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_gradcheck_texture():
    mesh, cams = small_scene()
    g = torch.Generator().manual_seed(1)
    uvs = torch.rand(mesh.num_verts, 2, generator=g, dtype=D)
    texture = torch.rand(4, 5, 3, generator=g, dtype=D)

    def fn(texture):
        textured = Mesh(verts=mesh.verts, faces=mesh.faces, uvs=uvs, face_uvs_idx=mesh.faces, texture=texture)
        return render_mesh(textured, cams, lights(0.2), SOFT).rgb

    assert torch.autograd.gradcheck(fn, (texture.clone().requires_grad_(),), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_camera_inside_near_plane_no_nan():
    """Vertices behind the camera and faces crossing the near plane: finite values and gradients, and the
    clipped render matches an unclipped one where no vertex was near."""
    mesh = icosphere(2, radius=1.0, dtype=torch.float32)
    cams = Cameras.look_at(torch.tensor([[0.0, 0.0, -1.05]]), at=(0.0, 0.0, 0.0), fov=90, image_size=(24, 24))
    verts = mesh.verts.clone().requires_grad_()
    settings = RasterSettings(sigma=1e-3, near=0.3)
    out = render_mesh(Mesh(verts=verts, faces=mesh.faces), cams, Lights.default(), settings,
                      outputs=("rgb", "depth", "normals"))
    assert (cams.world_to_camera(mesh.verts)[..., 2] < 0.3).any()  # some vertices really are behind it
    loss = out.rgb.sum() + out.alpha.sum() + out.depth.sum() + out.normals.sum()
    loss.backward()
    for t in (out.rgb, out.alpha, out.depth, out.normals, verts.grad):
        assert torch.isfinite(t).all()
    assert (out.pix_to_face >= 0).float().mean() > 0.95  # the sphere (seen through the clipped hole) fills the view
    assert (out.pix_to_face < mesh.num_faces).all()  # extra clipped faces map back to originals


def test_clipping_path_matches_fast_path_when_nothing_crosses():
    """An unreferenced vertex behind the camera forces the per-corner clipping path; no face crosses the near
    plane, so the image must equal the fast path's."""
    mesh, cams = small_scene(torch.float32)
    lit = Lights.default()
    fast = render_mesh(mesh, cams, lit, RasterSettings(sigma=1e-3), outputs=("rgb", "depth"))
    at_camera = cams.camera_centers()[:1]  # depth 0 for camera 0: nearer than the near plane
    far_away = torch.cat([mesh.verts, at_camera], 0)
    colors = torch.cat([mesh.vert_colors, torch.zeros(1, 3)], 0)
    clipped = render_mesh(Mesh(verts=far_away, faces=mesh.faces, vert_colors=colors), cams, lit,
                          RasterSettings(sigma=1e-3), outputs=("rgb", "depth"))
    torch.testing.assert_close(fast.rgb, clipped.rgb, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast.depth, clipped.depth, atol=1e-5, rtol=0)
    assert torch.equal(fast.pix_to_face, clipped.pix_to_face)


def test_mesh_renderer_and_bad_inputs():
    mesh, cams = small_scene(torch.float32)
    out = MeshRenderer(RasterSettings(), Lights.default())(mesh, cams, outputs=("rgb", "depth"))
    assert out.rgb.shape == (2, 12, 12, 3) and out.depth.shape == (2, 12, 12) and out.normals is None
    with pytest.raises(ValueError, match="outputs"):
        render_mesh(mesh, cams, outputs=("colour",))
    with pytest.raises(TypeError, match="float64"):
        render_mesh(mesh.to(dtype=torch.float64), cams)
    with pytest.raises(ValueError, match="batch"):
        render_mesh(mesh.with_verts(mesh.verts[None].repeat(3, 1, 1)), cams)
    bad = mesh.verts.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        render_mesh(mesh.with_verts(bad), cams)


def test_one_background_parser():
    """render_mesh, the rasterizer and the reference read RasterSettings.background with one parser."""
    import numpy as np

    from taichi_dr.raster.reference import soft_rasterize_reference
    from taichi_dr.raster.settings import background_values

    mesh, cams = small_scene(torch.float32)
    out = render_mesh(mesh, cams, settings=RasterSettings(background=(0.25, 0.5, 0.75)))
    empty = out.alpha == 0
    assert empty.any() and torch.equal(out.rgb[empty], torch.tensor([0.25, 0.5, 0.75]).expand(int(empty.sum()), 3))
    grey = render_mesh(mesh, cams, settings=RasterSettings(background=np.float32(0.5))).rgb
    assert torch.equal(grey[empty], torch.full((int(empty.sum()), 3), 0.5))
    assert background_values((2.0,), 4) == [2.0] * 4 and background_values(1, 2) == [1.0, 1.0]
    fv = torch.tensor([[[[2.0, 2.0, 1.0], [6.0, 2.0, 1.0], [2.0, 6.0, 1.0]]]], dtype=D)
    attrs = torch.zeros(1, 1, 3, 3, dtype=D)
    for bad, message in (((0.1, 0.2), "RasterSettings.background has 2 values but the image has 3 channels"),
                         ("0.5", "RasterSettings.background: expected a float or a tuple of floats"),
                         (True, "RasterSettings.background: expected a float or a tuple of floats")):
        with pytest.raises(ValueError, match=message):
            render_mesh(mesh, cams, settings=RasterSettings(background=bad))
        with pytest.raises(ValueError, match=message):
            soft_rasterize_reference(fv, (8, 8), attrs, RasterSettings(background=bad))
