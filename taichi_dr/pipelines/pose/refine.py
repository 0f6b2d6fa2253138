"""6-DoF pose refinement of a known mesh through the soft rasterizer.

Aligning a known 3D model to an object in an image: render the mesh at the current pose, compare with the
target (silhouette IoU/MSE, RGB, a distance-transform silhouette loss that attracts from far away, or any
differentiable image-space function such as a feature extractor), and follow the gradient to the pose.
Instead of a loss, the caller may supply the gradient itself (:class:`PixelGradientField`: ``dL/d(image)``
per pixel, propagated through the rasterizer's backward pass), or a 2D displacement per pixel
(:class:`DisplacementField`, e.g. a learned correspondence field as in Grabner et al. 2020, "Geometric
Correspondence Fields"), turned into ``dL/d(image) = grad(image) . displacement`` for the rasterizer's
backward pass, or propagated analytically through the projection of the surface points the rasterizer
found at each pixel.

Silhouette losses compare the soft silhouette with the target mask drawn with the render's own edge
profile (:func:`matched_mask`): SoftRas's soft silhouette is inflated by about ``sqrt(sigma)`` beyond the
true edge, which against a hard mask biases the pose by percents of the distance.

Frames. A :class:`Pose` ``(R, t)`` maps object (mesh) coordinates into the world frame of the camera it is
used with: ``x_world = R x_obj + t``. For a camera given only by its intrinsics (identity extrinsics, the
usual case for a photo) that is the object-to-camera transform ``x_cam = R x_obj + t`` (OpenCV axes). The
renderer sees the mesh in object coordinates and a camera whose extrinsics are the full object-to-camera
transform ``E o P`` (E the camera's world->camera extrinsics, P the pose). :meth:`Pose.camera_to_object`
gives the inverse (the camera's pose in object coordinates) and :meth:`Pose.from_camera_to_object` reads one.

What moves during the optimisation (``PoseSettings.parameterization``):

* ``"object_to_camera"``: the object rotates about its bounding-box centre (axes of the camera) and
  translates along the camera axes; rotation and translation are decoupled, which suits an object seen by
  a fixed camera.
* ``"camera_to_object"``: the camera rotates about its own centre and its centre moves in object axes, as in
  refining a camera's extrinsics against a fixed model.

Both reach the same optimum. The rotation update is an axis-angle vector (exp map) or a quaternion; the
update is folded into the base pose at every stage, so it stays small. The intrinsics are fixed unless
``refine_focal`` / ``refine_principal_point`` is set.

Coarse-to-fine (``PoseSettings.stages``): early stages render a downsampled image with a large sigma (blurry
coverage reaching far, cheap because the image is small), later ones sharpen at full resolution.

Optimisation: at every stage the update parameters are whitened (:meth:`PoseParameters.whiten`) so that a
unit step moves the projected mesh by one pixel RMS in uncorrelated ways; losses take steepest-descent steps
of a few pixels, displacement fields Gauss-Newton steps (``PoseSettings.optimizer``). Measured figures and
the reasons for these choices: docs/benchmarks_pose.md.

:func:`refine_pose` runs :class:`~taichi_dr.pipelines.pose.method.PoseMethod` on the training engine
(:class:`~taichi_dr.pipelines.engine.Trainer`, without an output folder); ``tdr pose`` runs the same method with
checkpoints, so an interrupted refinement resumes bitwise. The package has one job a file: ``io`` (pose
files, errors), ``targets``, ``losses``, ``fields``, ``objective`` (what ``loss=`` means), ``parameters``
(starts, whitening points, the step), ``settings``, ``method``, ``overlay``, and this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import Mesh
from taichi_dr.core.transforms import CONVENTIONS, Pose, PoseParameters
from taichi_dr.pipelines.callbacks import Callback
from taichi_dr.pipelines.config import TrainConfig
from taichi_dr.pipelines.engine import Trainer
from taichi_dr.pipelines.pose.fields import (
    DisplacementField,
    PixelGradientField,
    image_gradient,
    reprojection_flow,
    surface_points,
)
from taichi_dr.pipelines.pose.io import load_pose, rotation_error_deg, save_pose, translation_error
from taichi_dr.pipelines.pose.losses import (
    LOSSES,
    composite,
    distance_transform_loss,
    feature_loss,
    matched_mask,
    rgb_loss,
    silhouette_iou_loss,
    silhouette_mse_loss,
    target_image,
)
from taichi_dr.pipelines.pose.method import PoseMethod, _lights_in_object  # noqa: F401
from taichi_dr.pipelines.pose.overlay import _hard_silhouette, draw_overlay  # noqa: F401
from taichi_dr.pipelines.pose.settings import (
    DEFAULT_STAGES,
    OPTIMIZERS,
    ROTATIONS,
    PoseResult,
    PoseSettings,
    PoseStep,
    Stage,
)
from taichi_dr.pipelines.pose.targets import PoseTarget, signed_distance, squared_distance_transform
from taichi_dr.raster.shading import Lights

__all__ = [
    "CONVENTIONS",
    "DEFAULT_STAGES",
    "LOSSES",
    "OPTIMIZERS",
    "ROTATIONS",
    "DisplacementField",
    "PixelGradientField",
    "Pose",
    "PoseMethod",
    "PoseParameters",
    "PoseResult",
    "PoseSettings",
    "PoseStep",
    "PoseTarget",
    "Stage",
    "composite",
    "distance_transform_loss",
    "draw_overlay",
    "feature_loss",
    "image_gradient",
    "load_pose",
    "matched_mask",
    "refine_pose",
    "reprojection_flow",
    "rgb_loss",
    "rotation_error_deg",
    "save_pose",
    "signed_distance",
    "silhouette_iou_loss",
    "squared_distance_transform",
    "silhouette_mse_loss",
    "surface_points",
    "target_image",
    "translation_error",
]


class PoseStepCallback(Callback):
    """Calls ``fn(PoseStep)`` after every engine step of a :class:`PoseMethod` (``refine_pose``'s callback)."""

    def __init__(self, fn: Callable[[PoseStep], None]):
        self.fn = fn

    def on_step(self, state) -> None:
        self.fn(state.method.pose_step(state.iteration - 1, state.stats["loss"]))


def refine_pose(mesh: Mesh, target, camera: Cameras, init_pose: Pose | None = None, *,
                loss="silhouette_iou", settings: PoseSettings | None = None, lights: Lights | None = None,
                outputs: Sequence[str] | None = None, callback: Callable[[PoseStep], None] | None = None
                ) -> PoseResult:
    """Refine the 6-DoF pose of ``mesh`` so that its render matches ``target``.

    Args:
        mesh: the object, in its own coordinates (its colours/texture are used by the RGB loss).
        target: a :class:`PoseTarget`, or an image ``(H, W)`` mask / ``(H, W, 3)`` RGB / ``(H, W, 4)`` RGBA
            (tensor or array, uint8 or float in [0, 1]); its size must be the camera's image size.
        camera: one camera (``Cameras`` with B = 1): intrinsics, image size and world->camera extrinsics.
        init_pose: object -> world pose (object -> camera for identity extrinsics); a Pose, a (4, 4) matrix,
            or None for the identity (the mesh is already placed in the world).
        loss: ``"silhouette_iou"``, ``"silhouette_mse"``, ``"rgb"``, ``"distance_transform"``, a callable
            ``fn(rendered, target, camera) -> scalar`` (e.g. :func:`feature_loss`), a ``{loss: weight}``
            mapping of those, or a :class:`PixelGradientField` / :class:`DisplacementField`.
        settings: :class:`PoseSettings` (stages, parameterization, what is refined, optimizer).
        lights: shading for the rendered rgb, with directions in *camera* coordinates (OpenCV: x right,
            y down, z forward; e.g. (0, -1, -1) is above and behind the camera), so the lighting stays put
            while the object moves. None: unlit albedo.
        outputs: the render outputs the loss or field reads besides alpha (any of "rgb", "depth",
            "normals"); default: "rgb" for the RGB loss, callables and rgb fields, else none.
        callback: called with a :class:`PoseStep` after every step (progress bars).

    Runs :class:`PoseMethod` on a :class:`~taichi_dr.pipelines.engine.Trainer` without an output folder and
    without a progress display (for checkpoints, progress and resuming, run the method on a Trainer
    yourself, as ``tdr pose`` does). Steps whose loss or gradient is not finite are skipped and counted
    (``extra["skipped_steps"]``); ``settings.max_nonfinite`` in a row raise
    :class:`~taichi_dr.pipelines.engine.NonFiniteError` (a FloatingPointError).

    Returns a :class:`PoseResult` with the refined pose, loss history and overlays.
    """
    t_start = time.perf_counter()
    method = PoseMethod(mesh, target, camera, init_pose, loss=loss, settings=settings, lights=lights,
                        outputs=outputs)
    if method.iterations:
        config = TrainConfig(iterations=method.iterations, checkpoint_every=0, progress="none",
                             max_nonfinite=method.settings.max_nonfinite)
        Trainer(method, config, callbacks=[PoseStepCallback(callback)] if callback is not None else []).fit()
    method.finish()
    return method.result(seconds=time.perf_counter() - t_start)
