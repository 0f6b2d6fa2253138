"""A viewer or a validation render is a callback that draws the live method from any camera
(``state.method.render``). For every method: the images come back mid-run with the documented shapes and
values, and drawing them changes nothing in the run (same parameters and history bit for bit), since a
render neither draws random numbers nor touches the optimiser's state."""

from __future__ import annotations

import torch
from bitwise import assert_bitwise
from sdf_scenes import ring_cameras
from test_idr import TINY, _sphere_dataset
from test_mesh_fit import SETTINGS, _fit, problem  # noqa: F401  (problem: a pytest fixture)
from test_pose import _assert_same_result, _resume_problem

from taichi_dr.pipelines import Callback, TrainConfig, Trainer
from taichi_dr.pipelines.idr import IDRConfig, train_idr


class RenderAt(Callback):
    """Render ``state.method`` with ``cameras`` after the given iterations (what a live viewer does)."""

    def __init__(self, cameras, at=(1, 3)):
        self.cameras, self.at, self.images = cameras, set(at), []

    def on_step(self, state):
        if state.iteration in self.at:
            self.images.append(state.method.render(self.cameras))


def assert_images(images: dict, views: int, size: tuple[int, int]):
    assert images["rgb"].shape == (views, *size, 3) and images["alpha"].shape == (views, *size)
    for key in ("rgb", "alpha"):
        x = images[key].float()
        assert torch.isfinite(x).all() and 0 <= float(x.min()) and float(x.max()) <= 1, key
        assert not x.requires_grad


def test_mesh_fit_renders_live_without_changing_the_fit(problem):  # noqa: F811
    sil, rgb, cams = problem
    viewer = RenderAt(cams[torch.tensor([0, 3])])
    watched = _fit(problem, None, callbacks=[viewer])
    plain = _fit(problem, None)
    assert len(viewer.images) == 2
    for images in viewer.images:
        assert_images(images, 2, (24, 24))
    assert float(viewer.images[0]["alpha"].sum()) > 0   # the mesh is in view
    assert_bitwise(watched.method.state_dict(), plain.method.state_dict(), "method")
    assert torch.equal(watched.mesh.verts, plain.mesh.verts)


def test_idr_renders_live_without_changing_the_training():
    train = _sphere_dataset()
    config = IDRConfig(iterations=4, **TINY)
    cams = ring_cameras(2, 16)
    viewer = RenderAt(cams)
    torch.manual_seed(0)
    watched, history_w = train_idr(train, config, callbacks=[viewer], progress="none")
    torch.manual_seed(0)
    plain, history_p = train_idr(train, config, progress="none")
    assert len(viewer.images) == 2
    for images in viewer.images:
        assert_images(images, 2, (16, 16))
        assert images["normals"].shape == (2, 16, 16, 3) and images["depth"].shape == (2, 16, 16)
    assert bool(viewer.images[0]["alpha"].any())          # the initial sphere is hit
    assert_bitwise(watched.state_dict(), plain.state_dict(), "model")
    untimed = [[{k: v for k, v in row.items() if k != "time_s"} for row in h] for h in (history_w, history_p)]
    assert_bitwise(untimed[0], untimed[1], "history")


def test_pose_renders_live_without_changing_the_refinement():
    from taichi_dr.pipelines.pose import PoseMethod

    mesh, target, camera, init, settings = _resume_problem()
    results = []
    viewer = RenderAt(camera, at=(2, 7))   # inside the first start, and in the best start's last stage
    for callbacks in ([viewer], []):
        method = PoseMethod(mesh, target, camera, init, loss="rgb", settings=settings)
        Trainer(method, TrainConfig(iterations=method.iterations, progress="none"), callbacks=callbacks).fit()
        method.finish()
        results.append(method.result())
    assert len(viewer.images) == 2
    for images in viewer.images:
        assert_images(images, 1, (24, 24))
    _assert_same_result(*results)
