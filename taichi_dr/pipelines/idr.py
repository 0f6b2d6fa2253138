"""IDR (Yariv et al. 2020) as a method of the training engine: settings, model, one step, rendering.

Usage from Python::

    from taichi_dr.data.datasets import load_dataset, split_holdout
    from taichi_dr.implicit.meshing import extract_mesh
    from taichi_dr.pipelines.idr import IDRConfig, render_views, train_idr

    train, test = split_holdout(load_dataset("data/dtu_scan24"), every=8)
    model, history = train_idr(train, IDRConfig(iterations=2000), out_dir="runs/scan24")
    mesh = extract_mesh(model.sdf, resolution=256, scale_mat=train.scale_mat)
    views = render_views(model, test.cameras)

or, to own the loop's options (callbacks, a viewer), through the engine::

    torch.manual_seed(config.seed)
    method = IDRMethod(train, config)
    Trainer(method, config.train_config(), out_dir="runs/scan24", callbacks=[...]).fit()

One iteration (IDR): draw rays over all training pixels (and the eikonal points) from the engine's generator;
sphere-trace the current SDF (no autograd, :func:`~taichi_dr.implicit.sphere_tracing.sphere_trace`); for rays
that hit the surface inside the object mask, make the point differentiable
(:func:`~taichi_dr.implicit.sphere_tracing.differentiable_intersection`), take the normal by autograd and
predict the colour (RGB L1 loss); for the other rays, the SDF at their surface or minimum-SDF point enters
the mask loss; the eikonal loss holds at random points and at the surface points. The engine
(:mod:`taichi_dr.pipelines.engine`) owns the rest: Adam with IDR's learning-rate steps, checkpoints,
interrupts, the non-finite policy, progress and the metrics log.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taichi_dr.core import runtime
from taichi_dr.core.camera import Cameras
from taichi_dr.core.transforms import CameraParameters
from taichi_dr.data.datasets import MultiViewDataset, RayBatch, rays_for_pixels, sample_rays
from taichi_dr.implicit.cone_tracing import ConeSettings, sphere_trace_images
from taichi_dr.implicit.sphere_tracing import TracerSettings, differentiable_intersection, sphere_trace
from taichi_dr.losses.implicit import alpha_schedule, eikonal_loss, mask_loss, rgb_loss
from taichi_dr.nets.encodings import EncodingSettings, position_encoding
from taichi_dr.nets.fields import GeometryNetwork, RenderingNetwork
from taichi_dr.pipelines.callbacks import Callback
from taichi_dr.pipelines.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from taichi_dr.pipelines.config import TrainConfig
from taichi_dr.pipelines.engine import Method, Trainer, TrainingViews
from taichi_dr.pipelines.reconstruction import (
    check_run_settings,
    check_same_networks,
    dataset_training_views,
    engine_config,
    field_snapshot,
    multistep_optimizer,
    network_param_groups,
    positive,
)
from taichi_dr.pipelines.views import image_metrics, render_cameras, resize_views, scale_cameras, validation_callback

__all__ = ["IDRBatch", "IDRConfig", "IDRMethod", "IDRModel", "check_network_settings", "image_metrics",
           "load_model", "render_rays", "render_views", "resize_views", "scale_cameras", "train_idr",
           "training_step", "validation_callback"]

# The settings a checkpoint's weights are shaped by: a run can only continue from a checkpoint made with
# the same ones (the others, e.g. iterations, rays per batch, loss weights, may change on resume).
NETWORK_SETTINGS = ("geometry_depth", "geometry_width", "geometry_frequencies", "geometry_skip_in", "feature_dim",
                    "rendering_depth", "rendering_width", "rendering_frequencies", "learn_cameras", "encoding")


@dataclass(frozen=True)
class IDRConfig:
    """Settings of an IDR run. Defaults follow the paper where it matters for quality (networks, loss
    weights, α schedule); iterations and rays per batch are sized for a CPU.

    iterations, rays_per_batch: training length and rays drawn (over all training views) per step.
    lr: Adam learning rate, multiplied by ``lr_gamma`` at each fraction of training in ``lr_milestones``.
    rgb_weight, mask_weight, eikonal_weight: loss weights (IDR: 1, 100, 0.1).
    alpha_init, alpha_factor, alpha_milestones: mask-loss sharpness schedule (IDR: 50, x2, 5 times).
    geometry_*, rendering_*: network sizes (IDR: 8 x 256 with 6 frequencies and a skip into layer 4; 4 x 512
        with 4 frequencies).
    encoding: the geometry network's encoding of positions (:class:`EncodingSettings`: IDR's frequencies, or
        a hash grid over the bounding cube of ``tracer.bounding_radius``, its tables at their own learning rate).
    init_radius: radius of the initial sphere (IDR: 0.6 of the unit sphere).
    learn_cameras / camera_lr: refine the camera poses too (IDR's "trainable cameras").
    tracer: sphere-tracing settings (the bounding sphere is also the eikonal sampling region).
    grad_clip: clip the global gradient norm to this (None: no clipping, as IDR).
    checkpoint_every, validate_every: in iterations (0 = never; the engine always checkpoints at the end and
        on an interrupt when there is an output folder).
    seed: for initialisation (torch's global RNG) and ray sampling (the engine's generator).

    The loop's settings derive from these: :meth:`train_config`.
    """

    iterations: int = 2000
    rays_per_batch: int = 1024
    lr: float = 5e-4
    lr_milestones: tuple[float, ...] = (0.5, 0.75)
    lr_gamma: float = 0.5
    rgb_weight: float = 1.0
    mask_weight: float = 100.0
    eikonal_weight: float = 0.1
    alpha_init: float = 50.0
    alpha_factor: float = 2.0
    alpha_milestones: int = 5
    geometry_depth: int = 8
    geometry_width: int = 256
    geometry_frequencies: int = 6
    geometry_skip_in: tuple[int, ...] = (4,)
    feature_dim: int = 256
    rendering_depth: int = 4
    rendering_width: int = 512
    rendering_frequencies: int = 4
    encoding: EncodingSettings = field(default_factory=EncodingSettings)
    init_radius: float = 0.6
    learn_cameras: bool = False
    camera_lr: float = 1e-4
    tracer: TracerSettings = field(default_factory=TracerSettings)
    grad_clip: float | None = None
    checkpoint_every: int = 500
    validate_every: int = 0
    seed: int = 0

    def __post_init__(self):
        check_run_settings(self, "IDRConfig", [
            (all(0 < m < 1 for m in self.lr_milestones), "lr_milestones must be fractions in (0, 1)"),
            (positive(self.camera_lr), "camera_lr must be > 0"),
            (positive(self.alpha_init), "alpha_init must be > 0"),
            (all(math.isfinite(w) and w >= 0 for w in (self.rgb_weight, self.mask_weight, self.eikonal_weight)),
             "loss weights must be >= 0"),
            (0 < self.init_radius < self.tracer.bounding_radius,
             "init_radius must lie in (0, tracer.bounding_radius)"),
        ])

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        d["geometry_skip_in"] = list(self.geometry_skip_in)
        return d

    @staticmethod
    def from_dict(d: dict) -> IDRConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(IDRConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"IDRConfig: unknown settings {sorted(unknown)}")
        if "tracer" in d and isinstance(d["tracer"], dict):
            d["tracer"] = TracerSettings(**d["tracer"])
        if "encoding" in d and isinstance(d["encoding"], dict):
            d["encoding"] = EncodingSettings(**d["encoding"])
        for key in ("lr_milestones", "geometry_skip_in"):
            if key in d:
                d[key] = tuple(d[key])
        return IDRConfig(**d)

    def train_config(self, **overrides) -> TrainConfig:
        """The engine's settings for this run: Adam at ``lr`` with IDR's steps (``lr_gamma`` at each of
        ``lr_milestones``), clipping at ``grad_clip``, ``iterations``, ``seed`` and ``checkpoint_every``;
        ``overrides`` (e.g. progress, max_nonfinite) go to :class:`TrainConfig`."""
        return engine_config(self, multistep_optimizer(self), **overrides)


class IDRModel(nn.Module):
    """Geometry network ``f(x) -> (sdf, z)`` and rendering network ``M(x, n, v, z)``."""

    def __init__(self, config: IDRConfig = IDRConfig()):
        super().__init__()
        encoding = position_encoding(config.encoding, config.geometry_frequencies, config.tracer.bounding_radius)
        self.geometry = GeometryNetwork(
            feature_dim=config.feature_dim, depth=config.geometry_depth, width=config.geometry_width,
            encoding=encoding, skip_in=config.geometry_skip_in, init_radius=config.init_radius)
        self.rendering = RenderingNetwork(feature_dim=config.feature_dim, depth=config.rendering_depth,
                                          width=config.rendering_width,
                                          n_frequencies=config.rendering_frequencies)

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, 3) -> (M,)``."""
        return self.geometry.sdf(x)

    def shade(self, points: torch.Tensor, view_dirs: torch.Tensor, create_graph: bool = False):
        """Colour and unit normal at surface points ``(M, 3)`` seen along ``view_dirs (M, 3)``.

        Returns ``rgb (M, 3)``, ``normals (M, 3)`` and the SDF gradient ``(M, 3)`` (for the eikonal loss).
        """
        out, g = self.geometry.gradient(points, create_graph=create_graph)
        normals = g / g.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        rgb = self.rendering(points, normals, view_dirs, out[:, 1:])
        return rgb, normals, g


def training_step(model: IDRModel, origins: torch.Tensor, dirs: torch.Tensor, target_rgb: torch.Tensor,
                  target_mask: torch.Tensor, eikonal_points: torch.Tensor, config: IDRConfig, alpha: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Losses of one batch of rays: ``(N, 3)`` origins/dirs (possibly differentiable in the cameras),
    ``(N, 3)`` target colours, ``(N,)`` bool mask, ``(M, 3)`` eikonal points; ``generator`` jitters the
    tracer's sampler.

    Returns the total loss and stats as 0-dim tensors (rgb, mask, eikonal: the loss terms; psnr of the
    surface rays (NaN when none hit); iou of traced hits vs the mask) and floats (alpha, sdf_evals), left on
    the device so the engine reads them all in one copy.
    """
    n = origins.shape[0]
    trace = sphere_trace(model.sdf, origins.detach(), dirs.detach(), config.tracer, miss_min_sdf=True,
                         generator=generator)
    surf = trace.hit & target_mask
    other = ~surf
    zero = origins.sum() * 0.0

    loss_rgb, mse = zero, zero + math.nan
    grads = []
    if bool(surf.any()):
        x = differentiable_intersection(model.sdf, origins[surf], dirs[surf], trace.t[surf])
        rgb, _, g = model.shade(x, dirs[surf], create_graph=True)
        grads.append(g)
        loss_rgb = rgb_loss(rgb, target_rgb[surf], n)
        mse = ((rgb.detach() - target_rgb[surf]) ** 2).mean()
    loss_mask = zero
    if bool(other.any()):
        pts = origins[other] + trace.t[other, None] * dirs[other]
        loss_mask = mask_loss(model.sdf(pts), target_mask[other], alpha, n)

    # Eikonal points: the given uniform ones plus the traced surface points.
    _, g_rand = model.geometry.gradient(eikonal_points.to(origins), create_graph=True)
    grads.append(g_rand)
    loss_eik = eikonal_loss(torch.cat(grads))

    loss = config.rgb_weight * loss_rgb + config.mask_weight * loss_mask + config.eikonal_weight * loss_eik
    inter, union = (trace.hit & target_mask).sum(), (trace.hit | target_mask).sum()
    stats = dict(rgb=loss_rgb.detach(), mask=loss_mask.detach(), eikonal=loss_eik.detach(),
                 psnr=-10.0 * torch.log10(mse.detach()), iou=inter / union.clamp(min=1),
                 alpha=float(alpha), sdf_evals=float(trace.sdf_evals))
    return loss, stats


@dataclass
class IDRBatch:
    """One iteration's random draws (all from the engine's generator, so a resumed run draws the same).

    rays: training rays through the dataset's cameras (pixels, targets, views); eikonal_points: (N, 3)
    uniform in the tracer's bounding cube; tracer_seed: seeds the tracer's sampler jitter for this step.
    """

    rays: RayBatch
    eikonal_points: torch.Tensor
    tracer_seed: int


class IDRMethod(Method):
    """IDR on a multi-view dataset with masks, for :class:`~taichi_dr.pipelines.engine.Trainer`.

    train: the training views (images, masks, cameras of the normalised scene); config: :class:`IDRConfig`.
    The networks are initialised from torch's global RNG: seed it first (``torch.manual_seed(config.seed)``).
    ``model`` (:class:`IDRModel`) and ``camera_params`` (CameraParameters or None) are the live state.
    """

    name = "idr"
    version = 1

    def __init__(self, train: MultiViewDataset, config: IDRConfig = IDRConfig(), device=None):
        if getattr(train, "masks", None) is None:
            raise ValueError("IDR: the training views need object masks (IDR's mask loss)")
        runtime.ensure_init()
        self.device = torch.device(device) if device is not None else runtime.device()
        self.settings = config
        self.data = dataclasses.replace(train, images=train.images.to(self.device),
                                        masks=train.masks.to(self.device),
                                        cameras=train.cameras.to(device=self.device))
        self.model = IDRModel(config).to(self.device)
        self.camera_params = (CameraParameters(self.data.cameras).to(self.device) if config.learn_cameras
                              else None)
        # The tracer's jitter draws a data-dependent number of values: from its own generator, reseeded
        # each step from the batch, so the engine's stream does not depend on how the trace went.
        self._tracer_generator = torch.Generator()
        self._view_alpha: torch.Tensor | None = None   # the masks as floats for viewers, made when first asked for

    # -- the engine's hooks

    def param_groups(self) -> list[dict]:
        groups = network_param_groups(self.model, self.settings.lr, self.settings.encoding)
        if self.camera_params is not None:
            groups.append({"params": list(self.camera_params.parameters()), "name": "cameras",
                           "lr": self.settings.camera_lr})
        return groups

    def sample(self, iteration: int, generator: torch.Generator) -> IDRBatch:
        n, r = self.settings.rays_per_batch, self.settings.tracer.bounding_radius
        rays = sample_rays(self.data, n, generator)
        eikonal = (torch.rand(n, 3, generator=generator) * 2 - 1) * r
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        return IDRBatch(rays=rays, eikonal_points=eikonal.to(self.device), tracer_seed=seed)

    def alpha(self, iteration: int) -> float:
        """The mask-loss sharpness at 0-based ``iteration`` (IDR's schedule over ``settings.iterations``)."""
        c = self.settings
        return alpha_schedule(iteration, c.iterations, c.alpha_init, c.alpha_factor, c.alpha_milestones)

    def step(self, batch: IDRBatch, iteration: int) -> tuple[torch.Tensor, dict[str, Any]]:
        rays = batch.rays
        origins, dirs = rays.origins, rays.dirs
        if self.camera_params is not None:
            # The same pixels through the refined cameras: the rays carry the gradient to the poses.
            origins, dirs = rays_for_pixels(self.camera_params(), rays.view.to(self.device),
                                            rays.pixels.to(self.device))
        self._tracer_generator.manual_seed(batch.tracer_seed)
        return training_step(self.model, origins, dirs, rays.rgb, rays.mask, batch.eikonal_points, self.settings,
                             self.alpha(iteration), self._tracer_generator)

    @torch.no_grad()
    def render(self, cameras: Cameras, chunk: int = 16384, background: float = 0.0) -> dict[str, torch.Tensor]:
        """Sphere tracing of the current SDF from ``cameras``, on this method's device: ``rgb (B, H, W, 3)``
        (``background`` where missed), ``alpha (B, H, W)`` (1 where the surface is hit, else 0), world unit
        ``normals (B, H, W, 3)`` and ``depth (B, H, W)``, the distance along the ray from the camera centre to
        the surface (not camera z; 0 where missed)."""
        out = render_views(self.model, cameras.to(device=self.device), self.settings.tracer, chunk, background)
        return {"rgb": out["rgb"], "alpha": out["mask"].to(out["rgb"].dtype), "normals": out["normals"],
                "depth": out["depth"]}

    def training_views(self) -> TrainingViews:
        """The training cameras (the refined ones now, detached, with ``learn_cameras``), images and masks
        (as float ``alpha``; made on the first call and kept) on this method's device, and the views' names."""
        if self._view_alpha is None:
            self._view_alpha = self.data.masks.to(self.data.images.dtype)
        cameras = None
        if self.camera_params is not None:
            with torch.no_grad():
                cameras = self.camera_params().detach()
        return dataset_training_views(self.data, self._view_alpha, cameras)

    def snapshot_mesh(self, resolution: int = 128):
        """Marching cubes of the SDF's zero level set now at ``resolution`` (:func:`mesh_field`), in the
        dataset's world coordinates (``scale_mat``), as ``tdr reconstruct``'s mesh.ply; None while there is no
        surface in the cube."""
        return field_snapshot(mesh_field(self.model, self.settings), resolution, self.data.scale_mat, self.device)

    def state_dict(self) -> dict:
        # scale_mat (normalised -> world) is not needed to continue, but lets `tdr mesh` put a mesh of the saved
        # field in the dataset's world coordinates without the dataset.
        return {"model": self.model.state_dict(),
                "cameras": self.camera_params.state_dict() if self.camera_params is not None else None,
                "scale_mat": torch.as_tensor(self.data.scale_mat, dtype=torch.float64).cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.camera_params is not None:
            saved = state.get("cameras")
            if saved is None or saved["rot"].shape != self.camera_params.rot.shape:
                views = "none" if saved is None else str(saved["rot"].shape[0])
                raise ValueError(f"IDR: the checkpoint's refined cameras ({views}) do not fit the "
                                 f"{len(self.data.cameras)} training views of this run")
            self.camera_params.load_state_dict(saved)

    def config(self) -> dict:
        return self.settings.to_dict()

    def check_resume(self, saved_config: dict) -> None:
        check_network_settings(saved_config, self.settings)


def check_network_settings(saved_config: dict, config: IDRConfig) -> None:
    """Raise ValueError (one line naming the first differing setting and both values) when a checkpoint made
    with ``saved_config`` (``IDRConfig.to_dict()``) has networks of another shape than ``config``'s."""
    check_same_networks(IDRConfig.from_dict(saved_config), config, NETWORK_SETTINGS)


# ---------------------------------------------------------------------------------------------------------
# rendering and image metrics


@torch.no_grad()
def render_rays(model: IDRModel, origins: torch.Tensor, dirs: torch.Tensor, tracer: TracerSettings,
                chunk: int = 16384, background: float = 0.0, *, image_width: int | None = None,
                cones: ConeSettings | None = ConeSettings(), trace_chunk: int = 2**18) -> dict[str, torch.Tensor]:
    """Render rays ``(N, 3)``: ``rgb (N, 3)`` (background where missed), ``mask (N,)`` bool,
    ``normals (N, 3)`` (world space, zero where missed) and ``depth (N,)`` (ray distance, 0 where missed).

    trace_chunk: rays sphere-traced together. Tracing holds a few numbers per ray (its network calls are
    bounded by ``tracer.chunk`` points), and a trace's ~64 marching steps cost a fixed overhead each, so big
    chunks trace faster. chunk: hit points shaded together (the colour network and autograd normals hold
    the network's activations for every point).
    image_width: the rays are whole rows of an image this many pixels wide, row by row (as
    :func:`render_views` passes them): trace chunks then hold whole rows, and ``cones`` over their pixel
    tiles (:mod:`taichi_dr.implicit.cone_tracing`) find where the rays start marching (None: no cones).
    Without it the rays may come in any order and each marches from the bounding sphere.
    """
    for name, value in (("chunk", chunk), ("trace_chunk", trace_chunk)):
        if value < 1:
            raise ValueError(f"{name}: expected a positive number of rays, got {value}")
    n = origins.shape[0]
    use_cones = image_width is not None and cones is not None
    if use_cones:
        if image_width < 1 or n % image_width:
            raise ValueError(f"image_width: expected a positive width that divides the {n} rays, got {image_width}")
        trace_chunk = max(1, trace_chunk // image_width) * image_width
    rgb = torch.full((n, 3), float(background), dtype=origins.dtype, device=origins.device)
    normals = torch.zeros(n, 3, dtype=origins.dtype, device=origins.device)
    depth = torch.zeros(n, dtype=origins.dtype, device=origins.device)
    mask = torch.zeros(n, dtype=torch.bool, device=origins.device)
    for s in range(0, n, trace_chunk):
        o, d = origins[s:s + trace_chunk].contiguous(), dirs[s:s + trace_chunk].contiguous()
        if use_cones:
            tr = sphere_trace_images(model.sdf, o, d, (1, o.shape[0] // image_width, image_width), tracer, cones)
        else:
            tr = sphere_trace(model.sdf, o, d, tracer, miss_min_sdf=False)
        mask[s:s + trace_chunk] = tr.hit
        hits = torch.nonzero(tr.hit).flatten()
        for h in hits.split(chunk):
            c, nrm, _ = model.shade(tr.points[h], d[h])
            rgb[h + s] = c.detach().to(rgb.dtype)
            normals[h + s] = nrm.detach().to(rgb.dtype)
            depth[h + s] = tr.t[h]
    return dict(rgb=rgb, mask=mask, normals=normals, depth=depth)


@torch.no_grad()
def render_views(model: IDRModel, cameras: Cameras, tracer: TracerSettings = TracerSettings(),
                 chunk: int = 16384, background: float = 0.0, *,
                 cones: ConeSettings | None = ConeSettings(), trace_chunk: int = 2**18) -> dict[str, torch.Tensor]:
    """Render whole views: ``rgb (B, H, W, 3)``, ``mask (B, H, W)``, ``normals (B, H, W, 3)`` and
    ``depth (B, H, W)``. ``cones``: cone tracing over pixel tiles before the rays march (None: off);
    ``chunk`` and ``trace_chunk`` as in :func:`render_rays`."""
    width = cameras.image_size[1]
    return render_cameras(cameras, lambda o, d: render_rays(model, o, d, tracer, chunk, background,
                                                            image_width=width, cones=cones,
                                                            trace_chunk=trace_chunk))


# ---------------------------------------------------------------------------------------------------------
# training and loading


def train_idr(train: MultiViewDataset, config: IDRConfig = IDRConfig(), out_dir=None, *, resume: bool = False,
              validation: MultiViewDataset | None = None, validation_scale: float = 0.25,
              callbacks: list[Callback] | tuple[Callback, ...] = (), progress: str = "auto"):
    """Train IDR on ``train`` with the engine; returns ``(model, history)`` (``history``: the engine's metrics
    rows, one per iteration: iteration, loss, rgb, mask, eikonal, psnr, iou, alpha, sdf_evals, grad_norm,
    lr, skipped, time_s, and val_* at validations).

    out_dir: folder for ``checkpoint.pt`` (every ``config.checkpoint_every`` iterations, at the end and on
        SIGINT/SIGTERM), ``metrics.jsonl`` and ``config.json`` (None: nothing written). ``resume`` continues
        from its checkpoint bitwise (the network settings must match; iterations may be raised).
    validation: views rendered every ``config.validate_every`` iterations at ``validation_scale`` of their
        size (:func:`validation_callback`); callbacks: more engine callbacks (they see the live method);
        progress: the engine's progress mode ("auto", "rich", "plain", "none").

    Raises the engine's Interrupted (a KeyboardInterrupt, after saving) on SIGINT/SIGTERM, NonFiniteError
    after ``max_nonfinite`` consecutive skipped steps, CheckpointError/ValueError for a checkpoint that does
    not fit.
    """
    runtime.ensure_init()
    torch.manual_seed(config.seed)
    method = IDRMethod(train, config)
    extra = list(callbacks)
    if validation is not None and config.validate_every:
        extra.insert(0, validation_callback(validation, config.validate_every, validation_scale))
    trainer = Trainer(method, config.train_config(progress=progress), out_dir=out_dir, callbacks=extra,
                      resume=resume)
    result = trainer.fit()
    method.model.eval()
    return method.model, result.history


def load_model(path, device=None) -> tuple[IDRModel, IDRConfig]:
    """A trained model and its config from a checkpoint of :func:`train_idr` / ``tdr reconstruct`` (the file
    or its folder), read with ``weights_only=True``. Raises CheckpointError (one line naming the file) for a
    missing or unreadable file, a checkpoint of another method or version, or weights that do not fit."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    payload = load_checkpoint(path, IDRMethod)
    try:
        config = IDRConfig.from_dict(payload["config"]["method_config"])
        # Building the networks draws their initial weights: keep the caller's random stream untouched.
        with torch.random.fork_rng(devices=[]):
            model = IDRModel(config)
        model.load_state_dict(payload["method_state"]["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path}: IDR settings or weights that this version cannot use ({first[:200]})") \
            from None
    return model.to(device or runtime.device()).eval(), config


def render_trained(model: IDRModel, cameras: Cameras, config: IDRConfig) -> dict[str, torch.Tensor]:
    """:func:`render_views` with a run's settings (the interface every reconstruction method shares)."""
    return render_views(model, cameras.to(device=next(model.parameters()).device), config.tracer)


def mesh_field(model: IDRModel, config: IDRConfig) -> dict:
    """The SDF's zero level set inside the bounding sphere's cube, for marching cubes."""
    return dict(field=model.sdf, level=0.0, inside="below", bound=config.tracer.bounding_radius)
