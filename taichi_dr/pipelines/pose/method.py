"""Pose refinement as a method of the training engine (:class:`PoseMethod`).

The engine's iterations run the whole schedule, a pure function of the iteration: every start's first stage
(start k covers iterations ``[k S0, (k + 1) S0)``), then the remaining stages of the start whose first stage
ended with the lowest loss. Each (start, stage) is a *segment*: it begins by whitening the parameters and
building the stage's optimiser, and ends by reading its losses into the history (one host copy per stage);
a start ends with :meth:`PoseParameters.bake`, the run with one more. Transitions happen at the first step of
the next segment (or in :meth:`PoseMethod.finish`), so a checkpoint taken after any step holds an open segment
and everything needed to continue it bitwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import Mesh
from taichi_dr.core.transforms import Pose, PoseParameters, axis_angle_to_matrix
from taichi_dr.pipelines.engine import Method, TrainingViews
from taichi_dr.pipelines.mesh_fit import mesh_render_images
from taichi_dr.pipelines.pose.fields import DisplacementField, _field_gradients, _reprojection_step
from taichi_dr.pipelines.pose.objective import _check_target, describe_loss, resolve_loss
from taichi_dr.pipelines.pose.overlay import _hard_silhouette, draw_overlay
from taichi_dr.pipelines.pose.parameters import WARMUP_STEPS, _sgd_step_direction, _start_rotations, _visible_points
from taichi_dr.pipelines.pose.settings import PoseResult, PoseSettings, PoseStep, _stage_size, settings_to_dict
from taichi_dr.pipelines.pose.targets import PoseTarget
from taichi_dr.raster.renderer import render_mesh
from taichi_dr.raster.settings import RasterSettings
from taichi_dr.raster.shading import Lights

__all__ = ["PoseMethod"]


class PoseMethod(Method):
    """6-DoF pose refinement of ``mesh`` against ``target`` (arguments as :func:`refine_pose`'s).

    ``manual_optimization``: the pose solver is not a torch optimiser with a learning-rate schedule. Per
    stage it whitens the update coordinates (a unit step moves the projected mesh one pixel RMS), then
    takes steepest-descent steps of ``lr`` pixels (losses) or Gauss-Newton steps (displacement fields),
    both inside a trust region of ``MAX_STEP_PX`` pixels, or Adam steps, with a cosine decay within the
    stage; and a multi-start picks the start to continue. It skips a non-finite step itself (a zero step,
    decided on the device) and reports it in ``stats["finite"]``, so the engine counts it.

    :attr:`iterations` is the length of the whole schedule (``multi_start * stages[0].iters`` plus the other
    stages' iterations): train with ``TrainConfig(iterations=method.iterations)``, then call :meth:`finish`
    (refine_pose does both) and :meth:`result`.
    """

    name = "pose"
    version = 1
    manual_optimization = True

    def __init__(self, mesh: Mesh, target, camera: Cameras, init_pose: Pose | None = None, *,
                 loss="silhouette_iou", settings: PoseSettings | None = None, lights: Lights | None = None,
                 outputs: Sequence[str] | None = None):
        settings = settings or PoseSettings()
        if not isinstance(settings, PoseSettings):
            raise TypeError(f"settings: expected PoseSettings, got {type(settings).__name__}")
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh: expected taichi_dr.Mesh, got {type(mesh).__name__}")
        if not isinstance(camera, Cameras):
            raise TypeError(f"camera: expected taichi_dr.Cameras, got {type(camera).__name__}")
        if len(camera) != 1:
            raise ValueError(f"camera: expected one camera (B = 1), got {len(camera)}; select one with camera[i]")
        dtype, device = mesh.verts.dtype, mesh.verts.device
        target = PoseTarget.from_image(target).to(device=device, dtype=dtype)
        if target.image_size != tuple(camera.image_size):
            raise ValueError(f"target: image size {target.image_size} (H, W) does not match the camera's "
                             f"image_size {tuple(camera.image_size)}")
        self.kind, self.objective, needs_rgb = resolve_loss(loss)
        _check_target(loss, target)
        self.outputs = tuple(outputs) if outputs is not None else (("rgb",) if needs_rgb else ())
        if init_pose is None:
            init_pose = Pose.identity(dtype, device)
        elif not isinstance(init_pose, Pose):
            init_pose = Pose.from_matrix(init_pose, name="init_pose")
        self.init_pose = init_pose.to(device, dtype)
        self.camera = camera.detach().to(device=device, dtype=dtype)
        self.extrinsics = Pose(self.camera.R[0], self.camera.t[0], validate=False)
        self.T0 = self.extrinsics.compose(self.init_pose)  # object -> camera
        self.verts = mesh.verts.detach()
        lo, hi = self.verts.amin(0), self.verts.amax(0)
        self.pivot = 0.5 * (lo + hi)
        if not float((self.verts - self.pivot).norm(dim=1).max()) > 0:
            raise ValueError(f"mesh {mesh.name!r}: all vertices coincide; its pose is undefined")
        self.mesh = mesh.with_verts(self.verts)
        self.target, self.settings, self.lights, self.loss_description = target, settings, lights, describe_loss(loss)
        self.optimizer = settings.optimizer
        if self.optimizer == "auto":
            self.optimizer = "gauss_newton" if isinstance(self.objective, DisplacementField) else "steepest"
        self.correspondences = isinstance(self.objective, DisplacementField) and \
            self.objective.conversion == "reprojection"
        self.starts = _start_rotations(settings.multi_start, settings.multi_start_angle, dtype, device)
        # The schedule: (start, stage) segments; start None = the best start, chosen after the first stage.
        stages = settings.stages
        self.segments = [(k, 0) for k in range(settings.multi_start)] + [(None, si) for si in range(1, len(stages))]
        self.offsets = [0]
        for _, si in self.segments:
            self.offsets.append(self.offsets[-1] + stages[si].iters)
        self.iterations = self.offsets[-1]
        self.steps_per_start = sum(s.iters for s in stages)
        self._stage_targets: dict = {}
        self._reset_progress()

    def _reset_progress(self) -> None:
        self.segment = -1            # the segment in progress (begun, not ended); -1 before the first
        self.finished = False
        self.params: PoseParameters | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.history: list[float] = []        # of the current start (after the first stage: the best one's)
        self.history_stage: list[int] = []
        self.stage_values: list = []          # this segment's losses (0-dim tensors) or field values (floats)
        self.last = math.nan                  # the last value of the current run of stages
        self.start_losses: list[float] = []
        self.best: dict | None = None         # {"value", "start", "params", "history", "history_stage"}
        self.best_start = 0
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.verts.device)

    # -- the schedule

    def _make_params(self, k: int) -> PoseParameters:
        """Start k: the initial pose rotated about the object's centre (in camera axes)."""
        s, T0 = self.settings, self.T0
        D = axis_angle_to_matrix(self.starts[k])
        c = T0.R @ self.pivot
        return PoseParameters(D @ T0.R, T0.t + c - D @ c, self.camera.K[0], self.camera.image_size, self.pivot,
                              s.rotation, s.parameterization, s.refine_focal, s.refine_principal_point)

    def _blank_params(self) -> PoseParameters:
        s, T0 = self.settings, self.T0
        return PoseParameters(T0.R, T0.t, self.camera.K[0], self.camera.image_size, self.pivot, s.rotation,
                              s.parameterization, s.refine_focal, s.refine_principal_point)

    def _target_at(self, size) -> PoseTarget:
        if size not in self._stage_targets:
            self._stage_targets[size] = self.target.resized(size)
        return self._stage_targets[size]

    def _build_optimizer(self, stage_index: int) -> None:
        opt_cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD
        self.opt = opt_cls(self.params.parameters(), lr=self.settings.lr * self.settings.stages[stage_index].lr)

    def _begin(self, j: int) -> None:
        k, si = self.segments[j]
        if si == 0:
            self.params = self._make_params(k)
            self.history, self.history_stage, self.last = [], [], math.nan
        elif self.best is not None:  # the first of the remaining stages: continue the best start
            self._enter_best()
        size = _stage_size(self.settings.stages[si], self.camera.image_size)
        # Whiten with what the objective sees move: the visible surface for correspondences; all vertices
        # for image losses, whose silhouettes depend on the whole shape (measured: better).
        points = _visible_points(self.mesh, self.params.cameras(size)) if self.correspondences else self.verts
        self.params.whiten(points, size)
        self._build_optimizer(si)

    def _enter_best(self) -> None:
        best, self.best = self.best, None
        self.best_start = best["start"]
        self.params, self.history, self.history_stage = best["params"], best["history"], best["history_stage"]
        self.last = best["value"]

    def _end(self, j: int) -> None:
        k, si = self.segments[j]
        values = _to_floats(self.stage_values)
        self.stage_values = []
        self.history.extend(values)
        if values:
            self.last = values[-1]
        self.opt = None
        if si == 0:  # the end of start k's run (its first stage)
            self.params.bake()
            self.start_losses.append(self.last)
            if self.best is None or self.last < self.best["value"]:
                self.best = {"value": self.last, "start": k, "params": self.params, "history": self.history,
                             "history_stage": self.history_stage}

    def _advance_to(self, j: int) -> None:
        while self.segment < j:
            if self.segment >= 0:
                self._end(self.segment)
            self.segment += 1
            self._begin(self.segment)

    def locate(self, iteration: int) -> tuple[int, int]:
        """``(segment, step within it)`` of 0-based ``iteration`` (empty segments are passed over)."""
        for j in range(len(self.segments)):
            if iteration < self.offsets[j + 1]:
                return j, iteration - self.offsets[j]
        raise ValueError(f"iteration {iteration}: past the schedule's {self.iterations} iterations")

    def finish(self) -> None:
        """End the schedule after its last iteration: close the open segment, pass any empty ones, continue
        the best start if no stage did, and bake. Idempotent."""
        if self.finished:
            return
        if self.segment >= 0:
            self._end(self.segment)
        for j in range(self.segment + 1, len(self.segments)):
            self.segment = j
            self._begin(j)
            self._end(j)
        if self.best is not None:
            self._enter_best()
        self.params.bake()
        self.segment = len(self.segments)
        self.finished = True

    # -- one step

    def step(self, batch, iteration: int):
        j, it = self.locate(iteration)
        self._advance_to(j)
        k, si = self.segments[j]
        stage, s = self.settings.stages[si], self.settings
        size = _stage_size(stage, self.camera.image_size)
        tgt = self._target_at(size)
        raster = RasterSettings(sigma=stage.sigma, gamma=s.gamma)
        params, opt = self.params, self.opt
        # Cosine decay to 10% over the stage, for fine convergence at the end, after a short warm-up:
        # Adam's first steps have full size in every direction, however small its gradient, which
        # would throw away the previous stage's accuracy.
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * it / max(stage.iters - 1, 1)))
        if self.optimizer == "adam":
            decay *= min(1.0, (it + 1) / WARMUP_STEPS)
        group = opt.param_groups[0]
        group["lr"] = s.lr * stage.lr * decay
        opt.zero_grad(set_to_none=True)
        render_cam = params.cameras(size)
        lights_obj = _lights_in_object(self.lights, render_cam.R[0]) if self.lights is not None else None
        rendered = render_mesh(self.mesh, render_cam, lights_obj, raster, shading=s.shading, outputs=self.outputs)
        # No host synchronisation in a step for a loss (fields read their own values): the loss stays a
        # tensor, a non-finite step is skipped on the device, and the engine reads both once per step.
        if self.kind == "loss":
            value = self.objective(rendered, tgt, render_cam.detach())
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError("loss: the loss function must return a scalar tensor, got "
                                 f"{value if not isinstance(value, Tensor) else tuple(value.shape)}")
            value = value.reshape(())
            if value.requires_grad:
                value.backward()
            last = value.detach()
        elif self.correspondences:
            last = _reprojection_step(self.objective, self.mesh, rendered, tgt, render_cam)
        else:
            maps, grads, rms = _field_gradients(self.objective, rendered, tgt, render_cam.detach())
            if any(m.requires_grad for m in maps):
                torch.autograd.backward(maps, grads)
            last = rms
        coords = list(params.parameters())
        finite = torch.isfinite(torch.as_tensor(last, device=params.R0.device)).all()
        has_grad = coords[0].grad is not None
        if has_grad:
            g = torch.cat([p.grad for p in coords])
            finite = finite & torch.isfinite(g).all()
        if self.optimizer == "adam":
            # Adam's moments would move the pose even on a zeroed gradient: decide on the host.
            if bool(finite):
                opt.step()
        else:
            if has_grad:
                step = _sgd_step_direction(g, finite, group["lr"], self.optimizer == "steepest")
                for p, part in zip(coords, step.split([p.numel() for p in coords]), strict=True):
                    p.grad.copy_(part.view_as(p))
            opt.step()  # plain SGD: a zero gradient leaves the pose exactly as it was
        self.skipped += (~finite).to(torch.int64)
        self.stage_values.append(last)
        self.history_stage.append(si)
        return last, {"finite": finite, "stage": float(si), "start": float(self.best_start if k is None else k)}

    def pose_step(self, iteration: int, loss: float) -> PoseStep:
        """The :class:`PoseStep` a ``refine_pose`` callback gets after 0-based ``iteration``."""
        j, it = self.locate(iteration)
        k, si = self.segments[j]
        within = it + (self.offsets[j] - self.offsets[self.settings.multi_start] + self.settings.stages[0].iters
                       if k is None else 0)
        return PoseStep(self.best_start if k is None else k, si, within, self.steps_per_start, loss,
                        self.current_pose())

    # -- results

    def current_pose(self) -> Pose:
        """The pose now, in the frame of the initial pose (object -> the camera's world frame)."""
        with torch.no_grad():
            R, t = self.params.object_to_camera()
        return self.extrinsics.inverse().compose(Pose(R.detach(), t.detach(), validate=False))

    def render(self, cameras: Cameras, **options) -> dict[str, Tensor]:
        """The mesh at the current pose (:meth:`current_mesh`) seen by ``cameras`` (world -> camera, as the
        refinement's camera; moved to the mesh's device and dtype), a soft render at the last stage's sigma
        (options: ``sigma``), unlit, over black (see :func:`~taichi_dr.pipelines.mesh_fit.mesh_render_images`):
        ``"rgb" (B, H, W, 3)`` the mesh's colours (white without), ``"alpha" (B, H, W)``, ``"depth" (B, H, W)``
        camera-space z (not the distance along the ray), ``"normals" (B, H, W, 3)`` world unit normals."""
        with torch.no_grad():
            mesh = self.current_mesh()
            cameras = cameras.detach().to(device=self.verts.device, dtype=self.verts.dtype)
            sigma = options.get("sigma", self.settings.stages[-1].sigma)
            raster = RasterSettings(sigma=sigma, gamma=self.settings.gamma)
            out = render_mesh(mesh, cameras, None, raster, outputs=("rgb", "depth", "normals"))
            return mesh_render_images(out)

    @torch.no_grad()
    def current_mesh(self) -> Mesh:
        """The mesh at the current pose (before the first step: the first start's), in the camera's world
        frame: what :meth:`render` draws. Detached, on the mesh's device and dtype."""
        params = self.params if self.params is not None else self._make_params(0)
        R, t = params.object_to_camera()
        world = self.extrinsics.inverse().compose(Pose(R.detach(), t.detach(), validate=False))
        return self.mesh.with_verts(world.apply(self.verts))

    def training_views(self) -> TrainingViews:
        """The one camera (with the current intrinsics when focal length or principal point are refined) and
        the target: its mask as ``alpha``, its colours as ``rgb`` (each None when the target has none), at the
        target's full size, views of the method's tensors."""
        camera = self.camera
        if self.params is not None and (self.settings.refine_focal or self.settings.refine_principal_point):
            K = self.params.intrinsics().detach()
            camera = Cameras(K.reshape(1, 3, 3), camera.R, camera.t, camera.image_size, validate=False)
        mask, rgb = self.target.mask, self.target.rgb
        return TrainingViews(cameras=camera, rgb=None if rgb is None else rgb[None],
                             alpha=None if mask is None else mask[None])

    def result(self, seconds: float = 0.0) -> PoseResult:
        """The :class:`PoseResult` (after :meth:`finish`)."""
        if not self.finished:
            raise RuntimeError("PoseMethod.result: call finish() after the last iteration first")
        cam = self.camera
        with torch.no_grad():
            R, t = self.params.object_to_camera()
            K = self.params.intrinsics().detach()
        T = Pose(R.detach(), t.detach(), validate=False)
        pose = self.extrinsics.inverse().compose(T)
        sil = _hard_silhouette(self.mesh, K, T, cam.image_size)
        sil0 = _hard_silhouette(self.mesh, cam.K[0], self.T0, cam.image_size)
        background = self.target.rgb if self.target.rgb is not None else self.target.mask
        return PoseResult(pose=pose, init_pose=self.init_pose, K=K, camera=Cameras(K, cam.R, cam.t, cam.image_size),
                          history=list(self.history), history_stage=list(self.history_stage),
                          start=self.best_start, start_losses=list(self.start_losses),
                          overlay=draw_overlay(background, sil), overlay_init=draw_overlay(background, sil0),
                          silhouette=sil, seconds=seconds, extra={"skipped_steps": int(self.skipped)})

    # -- checkpoints

    def config(self) -> dict:
        return {"settings": settings_to_dict(self.settings), "loss": self.loss_description,
                "image_size": list(self.camera.image_size), "iterations": self.iterations,
                "mesh": {"name": self.mesh.name, "verts": int(self.verts.shape[0]),
                         "faces": int(self.mesh.faces.shape[0])}}

    def check_resume(self, saved_config: dict) -> None:
        now = self.config()
        for key in ("settings", "loss", "image_size", "mesh"):
            if key in saved_config and saved_config[key] != now[key]:
                if isinstance(now[key], dict) and isinstance(saved_config[key], dict):
                    diff = sorted(k for k in now[key] if saved_config[key].get(k) != now[key][k])
                    if diff:
                        field = diff[0]
                        raise ValueError(f"{key}.{field}: the checkpoint has {saved_config[key].get(field)!r}, "
                                         f"this run {now[key][field]!r}")
                raise ValueError(f"{key}: the checkpoint has {saved_config[key]!r}, this run {now[key]!r}")

    def state_dict(self) -> dict:
        best = self.best
        return {
            "segment": self.segment, "finished": self.finished,
            "params": self.params.state_dict() if self.params is not None else None,
            "optimizer": self.opt.state_dict() if self.opt is not None else None,
            "history": list(self.history), "history_stage": list(self.history_stage),
            "stage_values": [v.detach().cpu() if isinstance(v, Tensor) else float(v) for v in self.stage_values],
            "last": float(self.last), "start_losses": list(self.start_losses), "best_start": self.best_start,
            "best": None if best is None else {
                "value": float(best["value"]), "start": best["start"], "params": best["params"].state_dict(),
                "history": list(best["history"]), "history_stage": list(best["history_stage"])},
            "skipped": self.skipped.detach().cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._reset_progress()
        self.segment, self.finished = int(state["segment"]), bool(state["finished"])
        device = self.verts.device
        if state["params"] is not None:
            self.params = self._blank_params()
            self.params.load_state_dict(state["params"])
        self.history, self.history_stage = list(state["history"]), list(state["history_stage"])
        self.stage_values = [v.to(device) if isinstance(v, Tensor) else v for v in state["stage_values"]]
        self.last, self.start_losses = state["last"], list(state["start_losses"])
        self.best_start = int(state["best_start"])
        self.skipped = state["skipped"].to(device)
        if state["best"] is not None:
            b = state["best"]
            params = self._blank_params()
            params.load_state_dict(b["params"])
            self.best = {"value": b["value"], "start": b["start"], "params": params, "history": list(b["history"]),
                         "history_stage": list(b["history_stage"])}
        if state["optimizer"] is not None and 0 <= self.segment < len(self.segments):
            self._build_optimizer(self.segments[self.segment][1])
            self.opt.load_state_dict(state["optimizer"])


def _lights_in_object(lights: Lights, R: Tensor) -> Lights:
    """Camera-space light directions -> object space (``d_obj = R^T d_cam``), differentiable in R."""
    dirs = lights.directions.to(R) @ R  # row vectors: (R^T d)^T = d^T R
    return dataclasses.replace(lights, directions=dirs)


def _to_floats(values: list) -> list[float]:
    """Python floats of a list of floats and 0-dim tensors, with one device-to-host copy."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(torch.stack([v.detach().to(torch.float64).reshape(()) for v in tensors]).cpu().tolist())
    return [next(read) if isinstance(v, Tensor) else float(v) for v in values]
