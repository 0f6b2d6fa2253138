"""The hooks a viewer uses on every method (engine.Method): render's depth and normals against analytic shapes,
training_views (shapes, and the method's own tensors rather than copies), current_mesh / snapshot_mesh
(marching cubes of a geometrically initialised field against its sphere, in world coordinates), and
Trainer.request_stop (a Stop button: checkpoint, Interrupted, bitwise resume)."""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path

import pytest
import torch
from bitwise import assert_bitwise, run_state
from sdf_scenes import dataset_from_sdf, ring_cameras

from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import Mesh, icosphere
from taichi_dr.core.metrics import chamfer_distance
from taichi_dr.implicit.analytic import sphere_sdf
from taichi_dr.pipelines import Callback, Interrupted, Method, OptimizerConfig, TrainConfig, Trainer, TrainingViews
from taichi_dr.pipelines.checkpoint import load_checkpoint
from taichi_dr.pipelines.mesh_fit import FitSettings, MeshDeformer, MeshFitMethod
from taichi_dr.raster.renderer import render_mesh
from taichi_dr.raster.settings import RasterSettings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_subprocess_toy import NoisyLinearRegression  # noqa: E402

SIZE = 32


def _camera(eye=(0.4, 0.3, 3.0)) -> Cameras:
    return Cameras.look_at(torch.tensor([eye]), fov=40.0, image_size=(SIZE, SIZE))


def _mesh_fit_method(template: Mesh, cameras: Cameras, rgb: bool = False) -> MeshFitMethod:
    """A mesh-fit method whose current mesh is ``template`` itself (zero displacement): the deformer maps the
    normalised template back onto the template's bounding sphere."""
    _, centre, scale = template.normalized()
    model = MeshDeformer(template, centre, 1.0 / scale, learn_colors=rgb)
    h, w = cameras.image_size
    n = len(cameras)
    silhouettes = torch.rand(n, h, w, generator=torch.Generator().manual_seed(1))
    colours = torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(2)) if rgb else None
    method = MeshFitMethod(model, silhouettes, cameras, rgb=colours, settings=FitSettings(iters=4))
    torch.testing.assert_close(method.current_mesh().verts, template.verts, atol=2e-6, rtol=0)
    return method


def _camera_z(cameras: Cameras, points: torch.Tensor) -> torch.Tensor:
    """Camera-space z of world points (B, H, W, 3): R x + t, third coordinate."""
    return torch.einsum("bij,bhwj->bhwi", cameras.R, points)[..., 2] + cameras.t[:, None, None, 2]


def _assert_render_contract(images: dict, views: int):
    assert set(images) >= {"rgb", "alpha", "depth", "normals"}
    assert images["rgb"].shape == (views, SIZE, SIZE, 3) and images["normals"].shape == (views, SIZE, SIZE, 3)
    assert images["alpha"].shape == (views, SIZE, SIZE) and images["depth"].shape == (views, SIZE, SIZE)
    for key, x in images.items():
        assert torch.isfinite(x).all() and not x.requires_grad, key
    for key in ("rgb", "alpha"):
        assert 0 <= float(images[key].min()) and float(images[key].max()) <= 1, key
    empty = images["alpha"] == 0
    assert bool(empty.any()), "the test scene leaves background pixels"
    assert float(images["depth"][empty].abs().max()) == 0 and float(images["normals"][empty].abs().max()) == 0
    covered = images["alpha"] > 0.5
    torch.testing.assert_close(images["normals"][covered].norm(dim=-1), torch.ones(int(covered.sum())),
                               atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- render


@pytest.mark.parametrize("hard", [False, True])
def test_mesh_fit_render_depth_and_normals_of_a_tilted_plane(hard):
    """A tilted square: depth is the camera z of the ray's hit on the plane (perspective-correct, so exact to
    float rounding inside the square), normals the plane's unit normal."""
    e1 = torch.tensor([0.6, 0.0, 0.3])
    e2 = torch.tensor([0.1, 0.55, -0.2])
    p0 = torch.tensor([0.05, -0.1, 0.2])
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    verts = p0 + corners[:, :1] * e1 + corners[:, 1:] * e2
    plane = Mesh(verts=verts, faces=torch.tensor([[0, 1, 2], [0, 2, 3]]))
    cameras = Cameras.look_at(torch.tensor([[0.4, 0.3, 3.0], [-1.0, 0.5, 2.5]]), fov=40.0,
                              image_size=(SIZE, SIZE))
    method = _mesh_fit_method(plane, cameras)
    images = method.render(cameras, hard=hard)
    _assert_render_contract(images, 2)

    normal = torch.linalg.cross(e1, e2)
    normal = normal / normal.norm()          # faces (0, 1, 2), (0, 2, 3): counter-clockwise about e1 x e2
    origins, dirs = cameras.image_rays()
    t = ((p0 - origins) @ normal) / (dirs @ normal)
    expected = _camera_z(cameras, origins + t[..., None] * dirs)
    inside = images["alpha"] > (0.5 if hard else 0.999)
    assert int(inside.sum()) > 200
    torch.testing.assert_close(images["depth"][inside], expected[inside], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(images["normals"][inside], normal.expand(int(inside.sum()), 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("hard", [False, True])
def test_mesh_fit_render_depth_and_normals_of_a_sphere(hard):
    """An icosphere (level 4) against the analytic sphere through it, away from grazing rays: camera z of the
    ray's first hit within the facets' sagitta (hard), plus a tenth of the depth change across a pixel (soft:
    the depth softmax blends the faces whose soft coverage reaches the pixel); normals within 1.5 degrees.
    (The soft silhouette of pixel-sized faces stays near 0.97-0.99 inside, between faces; depth and normals
    are still the surface's there, since the background's weight in the depth softmax is exp(-10^4) of
    theirs.)"""
    radius, centre = 0.7, torch.tensor([0.1, -0.05, 0.2])
    sphere = icosphere(level=4, radius=radius)
    sphere = sphere.with_verts(sphere.verts + centre)
    cameras = _camera()
    images = _mesh_fit_method(sphere, cameras).render(cameras, hard=hard)
    _assert_render_contract(images, 1)

    origins, dirs = cameras.image_rays()
    oc = origins - centre
    b = (oc * dirs).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - radius ** 2)
    t = -b - disc.clamp_min(0).sqrt()
    hit_points = origins + t[..., None] * dirs
    outward = (hit_points - centre) / radius
    facing = -(outward * dirs).sum(-1)                 # cosine of the incidence angle
    clear = (disc > 0) & (facing > 0.3) & (images["alpha"] > 0.9)
    assert int(clear.sum()) > 150
    # Faces of a level-4 icosphere lie at most ~0.1% of the radius inside the sphere (0.0008 here), and the hard
    # render's depth is the nearest face's exactly. Soft: the depth's change across one pixel is its footprint
    # (z * 2 tan(fov / 2) / width) times the tangent of the incidence angle.
    expected = _camera_z(cameras, hit_points)
    footprint = expected * 2 * math.tan(math.radians(20.0)) / SIZE
    per_pixel = footprint * (1 - facing ** 2).clamp_min(0).sqrt() / facing.clamp_min(0.3)
    tolerance = 3e-3 + (0.0 if hard else 0.1) * per_pixel
    depth_error = (images["depth"] - expected).abs()
    assert bool((depth_error[clear] < tolerance[clear]).all()), float((depth_error - tolerance)[clear].max())
    cosine = (images["normals"][clear] * outward[clear]).sum(-1)
    assert float(cosine.min()) > math.cos(math.radians(1.5)), float(cosine.min())


def test_pose_render_has_depth_and_normals_of_the_current_mesh():
    """The pose method's render is render_mesh of current_mesh() (the mesh at the current pose in the camera's
    world frame) with depth and unit normals; before any step the current pose is the initial pose."""
    from test_pose import _resume_problem

    from taichi_dr.pipelines.pose import PoseMethod

    mesh, target, camera, init, settings = _resume_problem()
    method = PoseMethod(mesh, target, camera, init, loss="rgb", settings=settings)
    current = method.current_mesh()
    torch.testing.assert_close(current.verts, init.apply(mesh.verts), atol=1e-6, rtol=0)
    images = method.render(camera, sigma=1e-4)
    expected = render_mesh(current, camera, None, RasterSettings(sigma=1e-4, gamma=settings.gamma),
                           outputs=("depth", "normals"))
    torch.testing.assert_close(images["alpha"], expected.alpha.clamp(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(images["depth"], expected.depth, atol=1e-5, rtol=0)
    covered = images["alpha"] > 0.5
    torch.testing.assert_close(images["normals"][covered].norm(dim=-1),
                               torch.ones(int(covered.sum()), dtype=images["normals"].dtype), atol=1e-5, rtol=0)
    assert float(images["depth"][covered].min()) > 0

    Trainer(method, TrainConfig(iterations=method.iterations, progress="none")).fit()
    method.finish()
    result = method.result()
    torch.testing.assert_close(method.current_mesh().verts, result.pose.apply(mesh.verts), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- training views


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_mesh_fit_training_views_are_its_own_tensors():
    cameras = ring_cameras(3, SIZE)
    method = _mesh_fit_method(icosphere(level=1), cameras, rgb=True)
    views = method.training_views()
    assert isinstance(views, TrainingViews) and len(views) == 3 and views.names is None
    assert views.alpha is method.silhouettes and views.rgb is method.rgb and views.cameras is method.cameras
    assert views.alpha.shape == (3, SIZE, SIZE) and views.rgb.shape == (3, SIZE, SIZE, 3)
    # Without learned colours the targets are the silhouettes alone.
    plain = _mesh_fit_method(icosphere(level=1), cameras)
    assert plain.training_views().rgb is None
    torch.testing.assert_close(plain.training_views().cameras.K, cameras.K)


@pytest.mark.parametrize("optimizer", ["steepest", "adam"])
def test_pose_training_views_are_the_camera_and_the_target(optimizer):
    """One camera (with the refined focal length when it is refined) and the target's colours and mask."""
    from test_pose import _resume_problem

    from taichi_dr.pipelines.pose import PoseMethod

    mesh, target, camera, init, settings = _resume_problem(optimizer)
    method = PoseMethod(mesh, target, camera, init, loss="rgb", settings=settings)
    views = method.training_views()
    assert len(views) == 1 and views.rgb.shape == (1, 24, 24, 3) and views.alpha.shape == (1, 24, 24)
    assert torch.equal(views.rgb[0], target[..., :3].to(views.rgb)) and torch.equal(views.alpha[0], target[..., 3])
    assert _same_storage(views.alpha, method.target.mask) and _same_storage(views.rgb, method.target.rgb)
    torch.testing.assert_close(views.cameras.K, camera.K)
    Trainer(method, TrainConfig(iterations=method.iterations, progress="none")).fit()
    method.finish()
    K = method.training_views().cameras.K[0]
    torch.testing.assert_close(K, method.result().K)
    assert (optimizer == "adam") == (not torch.equal(K, camera.K[0].to(K)))   # adam here refines the focal


def _assert_dataset_views(views: TrainingViews, ds, masks: bool):
    assert len(views) == len(ds) and views.names == list(ds.names)
    torch.testing.assert_close(views.cameras.K, ds.cameras.K)
    torch.testing.assert_close(views.cameras.R, ds.cameras.R)
    assert torch.equal(views.rgb, ds.images)
    if masks:
        assert views.alpha.dtype == ds.images.dtype and torch.equal(views.alpha, ds.masks.to(ds.images.dtype))
    else:
        assert views.alpha is None


def test_idr_training_views_are_the_datasets_views():
    from test_idr import TINY

    from taichi_dr.pipelines.idr import IDRConfig, IDRMethod

    ds = dataset_from_sdf(lambda x: sphere_sdf(x, 0.4), ring_cameras(3, 16))
    for learn_cameras in (False, True):
        torch.manual_seed(0)
        method = IDRMethod(ds, IDRConfig(iterations=2, learn_cameras=learn_cameras, **TINY))
        views = method.training_views()
        _assert_dataset_views(views, ds, masks=True)
        assert views.rgb is method.data.images                    # the method's tensor, not a copy
        assert method.training_views().alpha is views.alpha       # the float masks are made once
        assert not views.cameras.R.requires_grad


@pytest.mark.parametrize("name", ["unisurf", "nerf"])
def test_ray_method_training_views_with_and_without_masks(name):
    if name == "unisurf":
        from test_unisurf import TINY

        from taichi_dr.pipelines.unisurf import UnisurfConfig as Config
        from taichi_dr.pipelines.unisurf import UnisurfMethod as Cls
    else:
        from test_nerf import TINY

        from taichi_dr.pipelines.nerf import NeRFConfig as Config
        from taichi_dr.pipelines.nerf import NeRFMethod as Cls
    for masks, use_masks in ((True, True), (True, False), (False, False)):
        ds = dataset_from_sdf(lambda x: sphere_sdf(x, 0.4), ring_cameras(2, 16), masks=masks)
        torch.manual_seed(0)
        method = Cls(ds, Config(iterations=2, use_masks=use_masks, **TINY))
        views = method.training_views()
        _assert_dataset_views(views, ds, masks=masks)
        assert views.rgb is method.data.images
        if masks:
            assert method.training_views().alpha is views.alpha


def test_training_views_check_their_shapes():
    cameras = ring_cameras(2, 8)
    with pytest.raises(ValueError, match=r"TrainingViews.rgb: expected shape \(2, 8, 8, 3\)"):
        TrainingViews(cameras, rgb=torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"TrainingViews.alpha: expected shape \(2, 8, 8\)"):
        TrainingViews(cameras, alpha=torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="TrainingViews.names: expected 2 labels"):
        TrainingViews(cameras, names=["a"])


def test_base_method_hooks_default_to_none():
    method = NoisyLinearRegression()
    assert method.training_views() is None and method.current_mesh() is None and method.snapshot_mesh() is None


# --------------------------------------------------------------------------------------------- snapshot meshes

# normalised -> world: scale 2, then a shift, so a mesh left in normalised coordinates would be far off.
SCALE_MAT = torch.tensor([[2.0, 0, 0, 1.0], [0, 2.0, 0, -2.0], [0, 0, 2.0, 0.5], [0, 0, 0, 1]], dtype=torch.float64)
WORLD_CENTRE = torch.tensor([1.0, -2.0, 0.5])


def _world_sphere(radius: float, centre=(0.0, 0.0, 0.0)) -> Mesh:
    """The sphere (``radius``, ``centre``) of the normalised scene, in world coordinates (SCALE_MAT)."""
    sphere = icosphere(level=4, radius=2.0 * radius)
    return sphere.with_verts(sphere.verts + WORLD_CENTRE + 2.0 * torch.tensor(centre))


def _field_method(name: str, **overrides) -> Method:
    ds = dataset_from_sdf(lambda x: sphere_sdf(x, 0.4), ring_cameras(2, 12), scale_mat=SCALE_MAT)
    torch.manual_seed(0)
    if name == "idr":
        from test_idr import TINY

        from taichi_dr.pipelines.idr import IDRConfig, IDRMethod

        return IDRMethod(ds, IDRConfig(**{"iterations": 2, **TINY, **overrides}))
    if name == "nerf":
        from test_nerf import TINY

        from taichi_dr.pipelines.nerf import NeRFConfig, NeRFMethod

        return NeRFMethod(ds, NeRFConfig(**{"iterations": 2, **TINY, **overrides}))
    from test_unisurf import TINY

    from taichi_dr.pipelines.unisurf import UnisurfConfig, UnisurfMethod

    return UnisurfMethod(ds, UnisurfConfig(**{"iterations": 2, **TINY, **overrides}))


def _analytic_field(name: str, value_of_sdf):
    """(the model's attribute mesh_field reads, a field of ``value_of_sdf(sdf)``)."""
    attribute = {"idr": "sdf", "unisurf": "occupancy", "nerf": "density"}[name]
    return attribute, lambda x: value_of_sdf(sphere_sdf(x, 0.45, (0.1, -0.05, 0.0)))


# Each method's field made an analytic sphere, at its own level: SDF 0, occupancy 0.5, density 10.
SPHERE_FIELDS = {"idr": lambda d: d, "unisurf": lambda d: torch.sigmoid(-10.0 * d),
                 "nerf": lambda d: 10.0 * torch.exp(-10.0 * d)}


@pytest.mark.parametrize("name", ["idr", "unisurf", "nerf"])
def test_snapshot_mesh_is_the_fields_surface_in_world_coordinates(name, monkeypatch):
    """With the field replaced by an analytic sphere (radius 0.45 at (0.1, -0.05, 0) normalised), the snapshot
    is that sphere through scale_mat (radius 0.9 in world units) to a fraction of a grid cell."""
    method = _field_method(name, **({"density_level": 10.0} if name == "nerf" else {}))
    attribute, field = _analytic_field(name, SPHERE_FIELDS[name])
    monkeypatch.setattr(method.model, attribute, field)
    mesh = method.snapshot_mesh(resolution=40)
    assert isinstance(mesh, Mesh) and mesh.verts.dtype == torch.float32 and mesh.num_faces > 1000
    # Grid cells: 2 / 39 of the cube of half-size 1 (IDR's tracer bound, the object radius), x2 in world units,
    # so 0.1; marching cubes puts the vertices of a smooth field's level set well within a tenth of a cell.
    radial = (mesh.verts - (WORLD_CENTRE + 2.0 * torch.tensor([0.1, -0.05, 0.0]))).norm(dim=-1) - 0.9
    assert float(radial.abs().max()) < 0.01, float(radial.abs().max())
    # and the surface is all there (a sphere's area), not a piece of it
    assert chamfer_distance(mesh, _world_sphere(0.45, (0.1, -0.05, 0.0)), 4000) < 0.05
    assert chamfer_distance(mesh, _world_sphere(0.45), 4000) > 0.1      # a mesh off by the centre is told apart


@pytest.mark.parametrize("name", ["idr", "unisurf"])
def test_snapshot_mesh_of_the_geometric_initialisation(name):
    """The untrained networks' surface (geometric initialisation, init_radius 0.5) is roughly that sphere: the
    initialisation is |x| - r only in the wide-network limit, so with a 256-wide, 3-deep network it is a blob
    within ~10% of it (radii 0.77-1.10 of the world radius 1, measured); it is centred on the world centre
    (scale_mat applied), not the origin."""
    method = _field_method(name, init_radius=0.5, geometry_width=256, geometry_depth=3)
    mesh = method.snapshot_mesh(resolution=40)
    assert isinstance(mesh, Mesh) and mesh.num_faces > 1000
    radius = (mesh.verts - WORLD_CENTRE).norm(dim=-1)     # world radius 1 = 2 x init_radius
    assert float((radius - 1.0).abs().mean()) < 0.15, float((radius - 1.0).abs().mean())   # measured 0.071
    assert 0.6 < float(radius.min()) and float(radius.max()) < 1.4
    torch.testing.assert_close(mesh.verts.mean(0), WORLD_CENTRE, atol=0.15, rtol=0)


@pytest.mark.parametrize("name", ["idr", "unisurf"])
def test_snapshot_mesh_is_none_without_a_surface_and_errors_otherwise(name, monkeypatch):
    method = _field_method(name)
    # No crossing of the level anywhere in the cube: outside everywhere (SDF 1, occupancy 0).
    attribute, outside = _analytic_field(name, lambda d: torch.full_like(d, 1.0 if name == "idr" else 0.0))
    monkeypatch.setattr(method.model, attribute, outside)
    assert method.snapshot_mesh(resolution=16) is None
    monkeypatch.setattr(method.model, attribute, lambda x: torch.full((x.shape[0],), math.nan, device=x.device))
    with pytest.raises(ValueError, match="non-finite"):
        method.snapshot_mesh(resolution=16)
    with pytest.raises(ValueError, match="snapshot_mesh: resolution must be an int >= 2, got 1"):
        method.snapshot_mesh(resolution=1)


@pytest.mark.parametrize("name", ["idr", "nerf"])
def test_snapshots_and_views_mid_run_change_nothing_in_the_run(name):
    """A viewer's Snapshot button and view slider call these between steps: the run stays bit for bit the
    same (no random numbers drawn, no state touched)."""

    class Snapshot(Callback):
        def __init__(self):
            self.meshes = []

        def on_step(self, state):
            if state.iteration == 2:
                self.meshes.append(state.method.snapshot_mesh(resolution=12))
                state.method.training_views()

    runs = []
    for callbacks in ([Snapshot()], []):
        method = _field_method(name, iterations=4)
        trainer = Trainer(method, method.settings.train_config(progress="none"), callbacks=callbacks)
        trainer.fit()
        history = [{k: v for k, v in row.items() if k != "time_s"} for row in trainer.history]
        runs.append((method.state_dict(), history, torch.get_rng_state()))
    assert_bitwise(runs[0], runs[1], f"{name} with snapshots")


def test_mesh_fit_snapshot_is_the_current_mesh():
    cameras = ring_cameras(2, SIZE)
    template = icosphere(level=1)
    method = _mesh_fit_method(template, cameras)
    assert torch.equal(method.snapshot_mesh().verts, method.current_mesh().verts)


# --------------------------------------------------------------------------------------------- request_stop


def _toy(seed: int = 0) -> NoisyLinearRegression:
    torch.manual_seed(seed)
    return NoisyLinearRegression()


def _config(iterations: int = 12) -> TrainConfig:
    return TrainConfig(iterations=iterations, progress="none", checkpoint_every=5,
                       optimizer=OptimizerConfig(lr=0.05))


class StopAt(Callback):
    def __init__(self, iteration: int, **kwargs):
        self.iteration, self.kwargs = iteration, kwargs

    def on_step(self, state):
        if state.iteration == self.iteration:
            state.trainer.request_stop(**self.kwargs)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_request_stop_checkpoints_and_resume_is_bitwise(tmp_path, signum):
    Trainer(_toy(), _config(), out_dir=tmp_path / "whole").fit()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ended = []

    class End(Callback):
        def on_end(self, state, reason):
            ended.append(reason)

    stopped = Trainer(_toy(), _config(), out_dir=tmp_path / "cut", callbacks=[StopAt(3, signum=signum), End()])
    with pytest.raises(Interrupted) as info:
        stopped.fit()
    assert (info.value.signum, info.value.iteration) == (signum, 3)
    assert info.value.checkpoint == tmp_path / "cut" / "checkpoint.pt"
    assert load_checkpoint(info.value.checkpoint)["iteration"] == 3
    assert ended == ["interrupted"]
    assert {s: signal.getsignal(s) for s in before} == before
    resumed = Trainer(_toy(seed=7), _config(), out_dir=tmp_path / "cut", resume=True)
    assert resumed.state.iteration == 3
    resumed.fit()
    assert_bitwise(run_state(tmp_path / "cut"), run_state(tmp_path / "whole"), "resumed after request_stop")


def test_request_stop_default_is_sigint_and_without_out_dir_nothing_is_saved():
    trainer = Trainer(_toy(), _config(), callbacks=[StopAt(2)])
    with pytest.raises(Interrupted) as info:
        trainer.fit()
    assert (info.value.signum, info.value.iteration, info.value.checkpoint) == (signal.SIGINT, 2, None)


def test_request_stop_outside_fit_changes_nothing_and_bad_signums_are_refused():
    trainer = Trainer(_toy(), _config(4))
    trainer.request_stop()
    assert trainer.fit().iteration == 4        # a request before fit() is not carried into it
    for bad in (0, -2, 2.0, True, "SIGINT"):
        with pytest.raises(ValueError, match="request_stop: signum must be a signal number"):
            trainer.request_stop(bad)
