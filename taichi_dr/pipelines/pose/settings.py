"""How :func:`~taichi_dr.pipelines.pose.refine.refine_pose` optimises (:class:`PoseSettings`, :class:`Stage`)
and what it reports (:class:`PoseStep` after every step, :class:`PoseResult` at the end)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from torch import Tensor

from taichi_dr.core.camera import Cameras
from taichi_dr.core.transforms import CONVENTIONS, Pose

__all__ = ["DEFAULT_STAGES", "OPTIMIZERS", "ROTATIONS", "PoseResult", "PoseSettings", "PoseStep", "Stage"]

# The rotation updates a pose refinement offers (PoseParameters also has "6d", which whitening does not take).
ROTATIONS = ("axis_angle", "quaternion")
OPTIMIZERS = ("auto", "adam", "gauss_newton", "steepest")


@dataclass(frozen=True)
class Stage:
    """One step of the coarse-to-fine schedule.

    size: longest image side in pixels to render at (None or >= the target's: full resolution).
    sigma: the rasterizer's sigma (SoftRas NDC units: 1e-2 blurry and long-range, 1e-4 crisp).
    iters: optimisation steps.
    lr: multiplier on ``PoseSettings.lr``; within the stage it decays (cosine) to a tenth of that.
    """

    size: int | None
    sigma: float
    iters: int
    lr: float = 1.0

    def __post_init__(self):
        if self.size is not None and not (isinstance(self.size, int) and self.size >= 4):
            raise ValueError(f"Stage.size: expected None or an int >= 4, got {self.size!r}")
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ValueError(f"Stage.sigma: expected a finite value > 0, got {self.sigma!r}")
        if not (isinstance(self.iters, int) and self.iters >= 0):
            raise ValueError(f"Stage.iters: expected an int >= 0, got {self.iters!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"Stage.lr: expected a finite value > 0, got {self.lr!r}")


DEFAULT_STAGES = (
    Stage(size=64, sigma=3e-3, iters=30, lr=1.0),
    Stage(size=128, sigma=3e-4, iters=20, lr=1.0),
    Stage(size=None, sigma=1e-4, iters=15, lr=0.5),
)


@dataclass(frozen=True)
class PoseSettings:
    """How :func:`refine_pose` optimises.

    stages: the coarse-to-fine schedule (see :class:`Stage`).
    rotation: the rotation update, ``"axis_angle"`` (exp map of a 3-vector) or ``"quaternion"`` (the unit
        quaternion ``(1, x, y, z) / |.|``, a 3-vector too).
    parameterization: ``"object_to_camera"`` (the object moves) or ``"camera_to_object"`` (the camera moves);
        see the module docstring. Whitening makes the two agree to first order; for errors that are
        rotations of the object about its own centre (the usual case) object_to_camera is the more robust
        (measured: from ~10 degrees, Gauss-Newton steps on a correspondence field converge with it and
        wander with camera_to_object, which needs a large camera rotation and translation that cancel).
    refine_focal: also learn a focal-length scale (fx, fy together, about the principal point).
    refine_principal_point: also learn the principal point.
    lr: the step size. The update parameters are whitened (see :class:`PoseParameters`) so that a unit step
        moves the mesh's projected vertices by one pixel RMS at the stage's resolution, and every direction
        (an out-of-plane rotation as much as a translation) moves them independently; for the steepest and
        Adam optimizers ``lr`` is thus a step in pixels (times the stage's ``lr``, with its decay).
    optimizer: how the gradient becomes a step, in the whitened coordinates. ``"steepest"``: a step of
        ``lr`` pixels along the gradient (its direction is kept, its size ignored, so losses and
        pixel-gradient fields of any scale work); ``"gauss_newton"``: the plain gradient times ``lr``,
        which for a displacement field is a Gauss-Newton step when ``lr = 1`` (exactly for
        ``conversion="reprojection"``, about for ``"image"``, whose field is scaled to match); both limited
        to ``MAX_STEP_PX`` pixels per step. ``"adam"``: Adam, whose per-coordinate normalisation moves
        every direction with a consistent gradient sign at the full rate (measured on the benchmark: it
        turns the object away when the translation is what is wrong, 89% success against 100% for
        steepest). ``"auto"`` (default): gauss_newton for a :class:`DisplacementField`, steepest otherwise.
    multi_start: number of starts; the first is the initial pose, the others it rotated by
        ``multi_start_angle`` degrees about the object's centre (axes spread over the sphere). Each start runs
        the first stage; the one with the lowest loss continues.
    gamma: the rasterizer's depth-softmax temperature (RGB aggregation).
    shading: "gouraud" or "flat", when lights are given.
    max_nonfinite: the engine's non-finite policy: a step whose loss or gradient is NaN/Inf is skipped (the
        pose does not move) and counted; this many in a row stop the refinement with ``NonFiniteError``.
    """

    stages: tuple[Stage, ...] = DEFAULT_STAGES
    rotation: str = "axis_angle"
    parameterization: str = "object_to_camera"
    refine_focal: bool = False
    refine_principal_point: bool = False
    lr: float = 1.0
    optimizer: str = "auto"
    multi_start: int = 1
    multi_start_angle: float = 45.0
    gamma: float = 1e-4
    shading: str = "gouraud"
    max_nonfinite: int = 20

    def __post_init__(self):
        if self.rotation not in ROTATIONS:
            raise ValueError(f"PoseSettings.rotation: expected one of {ROTATIONS}, got {self.rotation!r}")
        if self.parameterization not in CONVENTIONS:
            raise ValueError(f"PoseSettings.parameterization: expected one of {CONVENTIONS}, got "
                             f"{self.parameterization!r}")
        stages = tuple(self.stages)
        if not stages or not all(isinstance(s, Stage) for s in stages):
            raise ValueError("PoseSettings.stages: expected a non-empty sequence of Stage")
        object.__setattr__(self, "stages", stages)
        for name in ("lr", "gamma", "multi_start_angle"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"PoseSettings.{name}: expected a finite number > 0, got {v!r}")
        if not (isinstance(self.multi_start, int) and self.multi_start >= 1):
            raise ValueError(f"PoseSettings.multi_start: expected an int >= 1, got {self.multi_start!r}")
        if self.shading not in ("gouraud", "flat"):
            raise ValueError(f"PoseSettings.shading: expected 'gouraud' or 'flat', got {self.shading!r}")
        if not (isinstance(self.max_nonfinite, int) and not isinstance(self.max_nonfinite, bool)
                and self.max_nonfinite >= 1):
            raise ValueError(f"PoseSettings.max_nonfinite: expected an int >= 1, got {self.max_nonfinite!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"PoseSettings.optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")


@dataclass
class PoseStep:
    """Passed to ``refine_pose``'s callback after every optimisation step."""

    start: int  # which start (multi-start), 0-based
    stage: int  # which stage, 0-based
    iteration: int  # overall step of this start, 0-based
    total: int  # steps of one start over all stages
    loss: float
    pose: Pose  # current pose (same frame as the initial pose)


@dataclass
class PoseResult:
    """What :func:`refine_pose` returns.

    pose: refined pose, in the frame of ``init_pose`` (object -> the camera's world frame).
    init_pose: the initial pose.
    K: (3, 3) refined intrinsics (the input K when they are fixed).
    camera: the refined camera (B = 1), K and world->camera extrinsics as given.
    history: loss at every step of the winning start (for fields: the RMS of a pixel-gradient field, or of
        a displacement field in pixels).
    history_stage: the stage of each history entry.
    start: index of the winning start; start_losses: final first-stage loss of every start.
    overlay: (H, W, 3) float, the target with the model's outline at the refined pose drawn on it.
    overlay_init: the same at the initial pose.
    silhouette: (H, W) hard silhouette at the refined pose (full resolution).
    seconds: wall-clock time of the whole refinement.
    extra: ``skipped_steps``: steps skipped (the pose kept) because the loss or a gradient was not finite.
    """

    pose: Pose
    init_pose: Pose
    K: Tensor
    camera: Cameras
    history: list[float]
    history_stage: list[int]
    start: int
    start_losses: list[float]
    overlay: Tensor
    overlay_init: Tensor
    silhouette: Tensor
    seconds: float
    extra: dict = field(default_factory=dict)


def settings_to_dict(settings: PoseSettings) -> dict:
    """JSON-able form of ``settings`` (config.json, checkpoints)."""
    d = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    d["stages"] = [dataclasses.asdict(s) for s in settings.stages]
    return d


def _stage_size(stage: Stage, image_size: tuple[int, int]) -> tuple[int, int]:
    H, W = image_size
    if stage.size is None or stage.size >= max(H, W):
        return H, W
    s = stage.size / max(H, W)
    return max(1, round(H * s)), max(1, round(W * s))
