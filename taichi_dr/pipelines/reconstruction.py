"""What the multi-view reconstruction methods (IDR, UNISURF, NeRF) share beyond the engine: their settings'
round trip through a checkpoint, the check that a checkpoint's networks fit a run, loading a trained field
back, and a registry so that commands (``tdr evaluate``, ``tdr mesh``) handle every method the same way.

Each method module (:mod:`~taichi_dr.pipelines.idr`, :mod:`~taichi_dr.pipelines.unisurf`,
:mod:`~taichi_dr.pipelines.nerf`) provides ``load_model(path, device) -> (model, config)``,
``mesh_field(model, config)`` (the field, level, side and cube for marching cubes) and
``render_trained(model, cameras, config) -> dict`` (``rgb``, ``mask``, ``normals``, ``depth``, each
``(B, H, W, ...)``); :func:`load_trained` picks the module from the checkpoint. For viewers, every method's
``training_views`` (:func:`dataset_training_views`) and ``snapshot_mesh`` (:func:`field_snapshot`) come from
here too.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from taichi_dr.pipelines.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from taichi_dr.pipelines.engine import Method, TrainingViews

__all__ = ["FIELD_METHODS", "RayMethod", "TrainedField", "TrainingRays", "check_run_settings", "check_same_networks",
           "config_from_dict", "config_to_dict", "dataset_training_views", "engine_config", "field_snapshot",
           "load_trained", "multistep_optimizer", "network_param_groups", "positive", "read_field_checkpoint"]

# Method name (as saved in checkpoints) -> the module that trains it.
FIELD_METHODS = {"idr": "taichi_dr.pipelines.idr", "unisurf": "taichi_dr.pipelines.unisurf",
                 "nerf": "taichi_dr.pipelines.nerf"}


def config_to_dict(config) -> dict:
    """A settings dataclass as JSON-able values (tuples become lists, nested dataclasses dicts)."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def config_from_dict(cls, d: dict, nested: dict[str, type] | None = None):
    """The inverse of :func:`config_to_dict` for the dataclass ``cls``; ``nested`` maps field names to the
    dataclass their dict holds. Lists become tuples. Unknown keys raise ValueError naming them."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown settings {sorted(unknown)}")
    for key, sub in (nested or {}).items():
        if isinstance(d.get(key), dict):
            d[key] = sub(**d[key])
    for key, value in d.items():
        if isinstance(value, list):
            d[key] = tuple(value)
    return cls(**d)


def check_same_networks(saved, config, names) -> None:
    """Raise ValueError (one line naming the first differing setting and both values) when the settings
    ``saved`` (a config of the same class) give networks of another shape than ``config``'s, judged by the
    fields ``names``."""
    for name in names:
        then, now = getattr(saved, name), getattr(config, name)
        if hasattr(then, "network_shape"):     # nested settings: only what shapes the weights must match
            then, now = then.network_shape, now.network_shape
        if then != now:
            raise ValueError(f"the checkpoint was trained with {name}={_show(then)}, this run has "
                             f"{name}={_show(now)}; the networks must match to continue")


def _show(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def read_field_checkpoint(path, method_cls, config_cls, build: Callable, device=None):
    """``(model, config, payload)`` from the checkpoint at ``path`` (file or run folder) of ``method_cls``:
    the config rebuilt with ``config_cls.from_dict``, the model with ``build(config)`` (under a forked RNG, so
    the caller's random stream is untouched) and its saved weights. CheckpointError (one line naming the file)
    for anything that does not fit."""
    from taichi_dr.core import runtime

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    payload = load_checkpoint(path, method_cls)
    try:
        config = config_cls.from_dict(payload["config"]["method_config"])
        with torch.random.fork_rng(devices=[]):
            model = build(config)
        model.load_state_dict(payload["method_state"]["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path}: {method_cls.name} settings or weights that this version cannot use "
                              f"({first[:200]})") from None
    return model.to(device or runtime.device()).eval(), config, payload


@dataclass
class TrainedField:
    """A trained reconstruction loaded from its checkpoint, whatever the method.

    method: "idr", "unisurf" or "nerf"; model, config: the method's; scale_mat: (4, 4) normalised -> world as
    saved by the run (None for runs that did not save one).
    """

    method: str
    model: Any
    config: Any
    scale_mat: torch.Tensor | None
    _module: Any

    def render(self, cameras) -> dict[str, torch.Tensor]:
        """Render views: ``rgb``, ``mask``, ``normals``, ``depth`` (``(B, H, W, ...)``)."""
        return self._module.render_trained(self.model, cameras, self.config)

    def mesh_field(self) -> dict:
        """What marching cubes needs: ``field`` ((M, 3) -> (M,)), ``level``, ``inside`` and ``bound``."""
        return self._module.mesh_field(self.model, self.config)


def load_trained(path, device=None) -> TrainedField:
    """The trained field in the checkpoint at ``path`` (a file or its run folder), of any method in
    :data:`FIELD_METHODS`; CheckpointError naming the file otherwise."""
    path = Path(path)
    file = path / CHECKPOINT_NAME if path.is_dir() else path
    payload = load_checkpoint(file)
    name = payload.get("method")
    if name not in FIELD_METHODS:
        raise CheckpointError(f"{file}: a checkpoint of method {name!r}, not of a reconstructed field "
                              f"({', '.join(FIELD_METHODS)})")
    module = importlib.import_module(FIELD_METHODS[name])
    model, config = module.load_model(file, device)
    state = payload.get("method_state") if isinstance(payload.get("method_state"), dict) else {}
    scale_mat = state.get("scale_mat")
    if not (isinstance(scale_mat, torch.Tensor) and tuple(scale_mat.shape) == (4, 4)):
        scale_mat = None
    return TrainedField(name, model, config, scale_mat, module)


# extract_mesh's ValueError when the field has no surface in its cube (its other ValueErrors are real errors).
NO_SURFACE_MESSAGE = "does not cross level"


def field_snapshot(target: dict, resolution: int, scale_mat, device=None):
    """Marching cubes of a method's ``mesh_field(model, config)`` (``target``: field, level, inside, bound) at
    ``resolution`` points per axis, in world coordinates through ``scale_mat`` (4, 4) (normalised -> world), as
    ``tdr reconstruct`` writes mesh.ply: a :class:`~taichi_dr.core.mesh.Mesh` (float32, CPU), or None when the
    field does not cross its level in the cube (no surface yet). ValueError for a bad ``resolution`` or a
    field with non-finite values."""
    from taichi_dr.implicit.meshing import extract_mesh

    if not (isinstance(resolution, int) and not isinstance(resolution, bool) and resolution >= 2):
        raise ValueError(f"snapshot_mesh: resolution must be an int >= 2, got {resolution!r}")
    try:
        return extract_mesh(target["field"], resolution, target["bound"], level=target["level"],
                            inside=target["inside"], scale_mat=scale_mat, device=device)
    except ValueError as error:
        if NO_SURFACE_MESSAGE in str(error):
            return None
        raise


def dataset_training_views(data, alpha: torch.Tensor | None, cameras=None) -> TrainingViews:
    """The :class:`~taichi_dr.pipelines.engine.TrainingViews` of a method training on the multi-view dataset
    ``data``: its cameras (or ``cameras``, e.g. refined ones), its images as ``rgb`` and ``alpha`` (N, H, W)
    float masks (or None), with the dataset's names. Views of the tensors given, no copies."""
    return TrainingViews(cameras=data.cameras if cameras is None else cameras, rgb=data.images, alpha=alpha,
                         names=list(data.names))


@dataclass
class TrainingRays:
    """One iteration's random draws for a ray-sampling method (from the engine's generator): the rays, and a
    seed for the samplers' jitter (their count of random numbers depends on the data, so they draw from a
    generator of their own, reseeded each step: the engine's stream stays independent of the data)."""

    rays: Any            # taichi_dr.data.datasets.RayBatch
    sampler_seed: int


class RayMethod(Method):
    """What the volume-rendering methods (UNISURF, NeRF) share as engine methods: the training views on the
    device (masks only when ``config.use_masks``), one Adam group for the networks, rays drawn over all training
    pixels, the samplers' own generator, and the checkpointed state (networks, iteration, the dataset's
    ``scale_mat``).

    Subclasses set ``name``, ``version`` and ``title`` and implement ``build_model(config)``,
    ``training_step(rays, iteration, generator) -> (loss, stats)``, ``render(cameras)`` and
    ``check_network_settings(saved_config, config)``. The networks are initialised from torch's global RNG:
    seed it first (``torch.manual_seed(config.seed)``).
    """

    title = "this method"

    def __init__(self, train, config, device=None):
        from taichi_dr.core import runtime

        masks = train.require_masks(f"{self.title} with use_masks") if config.use_masks else None
        runtime.ensure_init()
        self.device = torch.device(device) if device is not None else runtime.device()
        self.settings = config
        self.data = dataclasses.replace(train, images=train.images.to(self.device),
                                        masks=None if masks is None else masks.to(self.device),
                                        cameras=train.cameras.to(device=self.device))
        self.model = self.build_model(config).to(self.device)
        self.grid = self.build_grid(config)    # empty-space skipping (OccupancyGrid), or None
        self.iteration = 0
        self._sampler_generator = torch.Generator()
        # What viewers show as the targets' masks: the training masks when they are used (on the device),
        # otherwise the dataset's own when it has them (a reference where they live: not copied to the device).
        self._view_masks = self.data.masks if self.data.masks is not None else train.masks
        self._view_alpha: torch.Tensor | None = None   # _view_masks as floats, made when first asked for

    def build_model(self, config):  # pragma: no cover - interface
        raise NotImplementedError

    def training_step(self, rays, iteration: int, generator: torch.Generator):  # pragma: no cover - interface
        raise NotImplementedError

    def build_grid(self, config):
        """The run's :class:`~taichi_dr.implicit.occupancy_grid.OccupancyGrid` (updated every step through
        ``config.occupancy_grid``'s schedule with :meth:`grid_value_fn`), or None: none by default."""
        return None

    def grid_value_fn(self):  # pragma: no cover - interface (only with a grid)
        """``points (M, 3) -> (M,)`` non-negative values the grid is updated from."""
        raise NotImplementedError

    @staticmethod
    def check_network_settings(saved_config: dict, config) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        return network_param_groups(self.model, self.settings.lr, self.settings.encoding)

    def sample(self, iteration: int, generator: torch.Generator) -> TrainingRays:
        from taichi_dr.data.datasets import sample_rays

        rays = sample_rays(self.data, self.settings.rays_per_batch, generator)
        return TrainingRays(rays=rays, sampler_seed=int(torch.randint(0, 2**62, (), generator=generator)))

    def step(self, batch: TrainingRays, iteration: int):
        self.iteration = iteration
        self._sampler_generator.manual_seed(batch.sampler_seed)
        if self.grid is not None:
            self.settings.occupancy_grid.update(self.grid, iteration, self.grid_value_fn(), self._sampler_generator)
        return self.training_step(batch.rays, iteration, self._sampler_generator)

    def training_views(self) -> TrainingViews:
        """The training cameras and images (on the method's device), the masks as float ``alpha`` when the
        dataset has them (used for training or not), and the views' names. The float masks are made on the
        first call and kept (one copy for the method's lifetime, only when something asks)."""
        if self._view_alpha is None and self._view_masks is not None:
            self._view_alpha = self._view_masks.to(self.data.images.dtype)
        return dataset_training_views(self.data, self._view_alpha)

    def snapshot_mesh(self, resolution: int = 128):
        """Marching cubes of the method's field now (its module's ``mesh_field``) at ``resolution``, in the
        dataset's world coordinates (``scale_mat``), as ``tdr reconstruct``'s mesh.ply; None while the field
        has no surface in its cube (see :func:`field_snapshot`)."""
        module = importlib.import_module(FIELD_METHODS[self.name])
        return field_snapshot(module.mesh_field(self.model, self.settings), resolution, self.data.scale_mat,
                              self.device)

    def state_dict(self) -> dict:
        # scale_mat (normalised -> world) lets `tdr mesh` put a mesh in world units without the dataset.
        state = {"model": self.model.state_dict(), "iteration": self.iteration,
                 "scale_mat": torch.as_tensor(self.data.scale_mat, dtype=torch.float64).cpu().clone()}
        if self.grid is not None:
            state["grid"] = self.grid.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.iteration = int(state.get("iteration", 0))
        if self.grid is not None:
            # The grid is a cache of the field: one saved for another box or resolution, or none (a run
            # without a grid), is rebuilt from the field instead.
            try:
                self.grid.load_state_dict(state["grid"])
            except (KeyError, TypeError, RuntimeError):
                self.grid.fit(self.grid_value_fn(), self.settings.occupancy_grid.threshold)

    def config(self) -> dict:
        return self.settings.to_dict()

    def check_resume(self, saved_config: dict) -> None:
        self.check_network_settings(saved_config, self.settings)


def fitted_field_grid(model: torch.nn.Module, settings, radius: float, value_fn):
    """An occupancy grid over ``[-radius, radius]^3`` fitted to a trained field (``OccupancyGrid.fit`` of
    ``value_fn``) for rendering it, or None when ``settings`` (OccupancyGridSettings) is not enabled.

    Kept on ``model`` until its parameters change (torch counts in-place updates in ``_version``), so repeated
    renders of one field, a viewer's frames, fit it once."""
    if not settings.enabled:
        return None
    key = (settings, float(radius), tuple((id(p), p._version) for p in model.parameters()))
    cached = getattr(model, "_fitted_grid", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    grid = settings.make_grid(radius)
    grid.fit(value_fn, settings.threshold)
    model._fitted_grid = (key, grid)      # a plain attribute: not a submodule, not in the state dict
    return grid


def network_param_groups(model: torch.nn.Module, lr: float, encoding) -> list[dict]:
    """The optimiser's groups for a field method's networks: the hash tables of its encodings (if any) at
    ``encoding.table_lr`` (instant-ngp trains them at 1e-2, far above an MLP's rate), the rest at ``lr``."""
    from taichi_dr.nets.hash_grid import HashGridEncoding

    tables = {id(p) for m in model.modules() if isinstance(m, HashGridEncoding) for p in m.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in tables], "name": "networks", "lr": lr}]
    if tables:
        groups.append({"params": [p for p in model.parameters() if id(p) in tables], "name": "hash_tables",
                       "lr": encoding.table_lr})
    return groups


def engine_config(config, optimizer, **overrides):
    """The engine's :class:`~taichi_dr.pipelines.config.TrainConfig` of a reconstruction run: ``optimizer``
    (an OptimizerConfig) with the run's ``iterations``, ``seed`` and ``checkpoint_every``; ``overrides`` (e.g.
    progress, max_nonfinite) win."""
    from taichi_dr.pipelines.config import TrainConfig

    settings = dict(iterations=config.iterations, seed=config.seed, optimizer=optimizer,
                    checkpoint_every=config.checkpoint_every)
    return TrainConfig(**{**settings, **overrides})


def multistep_optimizer(config):
    """Adam at ``config.lr``, times ``config.lr_gamma`` at each fraction ``config.lr_milestones`` of the run
    (IDR's steps, which the UNISURF runs here use too), clipping at ``config.grad_clip``."""
    from taichi_dr.pipelines.config import OptimizerConfig

    return OptimizerConfig(lr=config.lr, schedule="multistep", milestones=tuple(sorted(set(config.lr_milestones))),
                           gamma=config.lr_gamma, grad_clip=config.grad_clip)


def positive(x) -> bool:
    """A finite number > 0."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_run_settings(config, owner: str, checks: list) -> None:
    """Validate a reconstruction config: the settings every method has (iterations, rays_per_batch, lr,
    lr_gamma, grad_clip, checkpoint_every, validate_every, seed) and then the method's own ``checks`` (pairs of
    a condition and the message when it fails); raise ValueError ``"<owner>: <message>"`` at the first that
    fails."""
    common = [
        (config.iterations >= 1, "iterations must be >= 1"),
        (config.rays_per_batch >= 1, "rays_per_batch must be >= 1"),
        (positive(config.lr), "lr must be > 0"),
        (positive(config.lr_gamma), "lr_gamma must be > 0"),
        (config.grad_clip is None or positive(config.grad_clip), "grad_clip must be > 0 (or None)"),
        (config.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
        (config.validate_every >= 0, "validate_every must be >= 0"),
        (config.seed >= 0, "seed must be >= 0"),
    ]
    for ok, msg in common + list(checks):
        if not ok:
            raise ValueError(f"{owner}: {msg}")
