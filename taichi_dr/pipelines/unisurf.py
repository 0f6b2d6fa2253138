"""UNISURF (Oechsle et al. 2021) as a method of the training engine: reconstruction from RGB images alone,
with occupancy as alpha.

One iteration (UNISURF's ``unisurf`` rendering):

1. rays drawn over all training pixels from the engine's generator; each is cut to the bounding sphere
   (``bound_radius``; UNISURF: 4 for DTU, so that the table and what lies around the object are reconstructed
   too), starting no nearer than the camera;
2. surface search without autograd (:func:`~taichi_dr.implicit.occupancy.find_surface`: 256 uniform steps,
   the first outside -> inside crossing of o = 0.5, 8 secant steps; rays starting inside are no hits);
3. packed samples (:func:`~taichi_dr.implicit.sampling.unisurf_samples`): around the surface in an interval
   that narrows with the iteration, plus free space in front of it later in training; rays without a surface
   sample their whole segment;
4. occupancy, features and normals at every sample (normals by autograd, with a graph: they feed the
   appearance network and train the geometry), colour from the appearance network shared with IDR;
5. compositing with occupancy as alpha (:func:`~taichi_dr.implicit.compositing.composite`, Taichi kernels
   with a hand-written backward); what lies beyond the bounding sphere is the ``background`` colour (a
   documented choice: UNISURF's DTU setting is black; NeRF-synthetic scenes, composited on white, use white);
6. losses: L1 RGB (sum over channels, mean over rays, as UNISURF), UNISURF's surface smoothness
   ``‖n(x_s) - n(x_s + ε)‖`` (ε ~ U(±0.005), weight 0.005) and, only when trained with masks, a BCE between
   the opacity and the mask (``mask_weight``, NeuS's 0.1).

The engine (:mod:`taichi_dr.pipelines.engine`) owns the optimiser, schedule, checkpoints, interrupts, the
non-finite policy, progress and metrics.

Usage::

    train, test = split_holdout(load_dataset("data/dtu_scan24"), every=8)
    torch.manual_seed(config.seed)
    method = UnisurfMethod(train, UnisurfConfig(iterations=4000))
    Trainer(method, method.settings.train_config(), out_dir="runs/unisurf").fit()
    mesh = extract_mesh(**mesh_field(method.model, method.settings), resolution=256, scale_mat=train.scale_mat)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from taichi_dr.core.camera import Cameras
from taichi_dr.core.rays import ray_segments
from taichi_dr.data.datasets import MultiViewDataset, RayBatch
from taichi_dr.implicit.compositing import composite, composite_background
from taichi_dr.implicit.occupancy import SurfaceSearchSettings, find_surface, find_surface_in_grid
from taichi_dr.implicit.occupancy_grid import OccupancyGrid, OccupancyGridSettings, occupancy_value_fn
from taichi_dr.implicit.sampling import IntervalSettings, interval_width, unisurf_samples
from taichi_dr.losses.implicit import mask_bce_loss, rgb_loss, smoothness_loss
from taichi_dr.nets.encodings import EncodingSettings, position_encoding
from taichi_dr.nets.fields import GeometryNetwork, OccupancyNetwork
from taichi_dr.nets.rendering import RenderingNetwork
from taichi_dr.pipelines.config import TrainConfig
from taichi_dr.pipelines.reconstruction import (
    RayMethod,
    check_run_settings,
    check_same_networks,
    config_from_dict,
    config_to_dict,
    engine_config,
    fitted_field_grid,
    multistep_optimizer,
    positive,
    read_field_checkpoint,
)
from taichi_dr.pipelines.views import render_cameras

__all__ = ["UnisurfConfig", "UnisurfMethod", "UnisurfModel", "check_network_settings", "load_model",
           "fitted_grid", "mesh_field", "render_rays", "render_trained", "render_views", "search_surface",
           "training_step"]

NETWORK_SETTINGS = ("geometry_depth", "geometry_width", "geometry_frequencies", "geometry_skip_in", "feature_dim",
                    "rendering_depth", "rendering_width", "rendering_frequencies", "encoding")


@dataclass(frozen=True)
class UnisurfConfig:
    """Settings of a UNISURF run. Network sizes, loss weights, the search, the interval schedule and the
    bounding sphere follow UNISURF's code (its DTU configuration); iterations, rays and the learning-rate
    schedule are sized for short runs (UNISURF: 1e-4 over 400k iterations, halved at 4k and 8k... of its
    epochs; here halved at ``lr_milestones`` fractions of ``iterations``).

    rays_per_batch: rays per step (UNISURF: 1024).
    rgb_weight, smooth_weight, smooth_epsilon: L1 colour, surface smoothness and its neighbour jitter (UNISURF:
        1, 0.005, 0.005).
    use_masks, mask_weight: add a BCE of opacity vs the object mask (only with masks; NeuS's weight 0.1).
    geometry_*, feature_dim: the occupancy network (UNISURF: 8 x 256, 6 frequencies, skip into layer 4, 256
        features); rendering_*: the appearance network (UNISURF: 4 x 256, 4 view frequencies).
    encoding: the occupancy network's encoding of positions (:class:`EncodingSettings`): UNISURF's
        frequencies, or a hash grid over the cube of half-side ``min(bound_radius, 2 object_radius)`` (its
        resolution goes to the object, not to the far background; beyond the cube the grid's features are
        those of its boundary and the raw coordinates still tell the points apart).
    sharpness: o = sigmoid(-s f) (UNISURF: 10); init_radius: the initial ball (UNISURF: 0.6).
    bound_radius: the sphere rays are cut to (UNISURF: 4.0); object_radius: the sphere of the object (the
        normalised unit sphere) where meshes are taken and the rendered mask is the surface.
    search, interval: :class:`SurfaceSearchSettings` and :class:`IntervalSettings` (UNISURF's defaults).
    occupancy_grid: :class:`OccupancyGridSettings`: a grid over the bounding sphere's cube, updated from the
        occupancy during training; the surface search evaluates the occupancy only in occupied cells (rays
        through none are not searched); the samples still cover the whole segment, so free space keeps being
        trained. Off: UNISURF's search over the whole segment.
    background: colour of what lies beyond the bounding sphere (0 black, 1 white).
    render_chunk: rays per chunk when rendering views (bounds memory: every sample keeps a graph for its normal).
    """

    iterations: int = 2000
    rays_per_batch: int = 1024
    lr: float = 5e-4
    lr_milestones: tuple[float, ...] = (0.5, 0.75)
    lr_gamma: float = 0.5
    rgb_weight: float = 1.0
    smooth_weight: float = 0.005
    smooth_epsilon: float = 0.005
    use_masks: bool = False
    mask_weight: float = 0.1
    geometry_depth: int = 8
    geometry_width: int = 256
    geometry_frequencies: int = 6
    geometry_skip_in: tuple[int, ...] = (4,)
    feature_dim: int = 256
    rendering_depth: int = 4
    rendering_width: int = 256
    rendering_frequencies: int = 4
    encoding: EncodingSettings = field(default_factory=EncodingSettings)
    sharpness: float = 10.0
    init_radius: float = 0.6
    bound_radius: float = 4.0
    object_radius: float = 1.0
    search: SurfaceSearchSettings = field(default_factory=SurfaceSearchSettings)
    interval: IntervalSettings = field(default_factory=IntervalSettings)
    occupancy_grid: OccupancyGridSettings = field(default_factory=OccupancyGridSettings)
    background: float = 0.0
    render_chunk: int = 1024
    grad_clip: float | None = None
    checkpoint_every: int = 500
    validate_every: int = 0
    seed: int = 0

    def __post_init__(self):
        check_run_settings(self, "UnisurfConfig", [
            (all(0 < m < 1 for m in self.lr_milestones), "lr_milestones must be fractions in (0, 1)"),
            (all(math.isfinite(w) and w >= 0 for w in (self.rgb_weight, self.smooth_weight, self.mask_weight)),
             "loss weights must be >= 0"),
            (math.isfinite(self.smooth_epsilon) and self.smooth_epsilon >= 0, "smooth_epsilon must be >= 0"),
            (positive(self.sharpness), "sharpness must be > 0"),
            (positive(self.object_radius), "object_radius must be > 0"),
            (positive(self.bound_radius) and self.bound_radius >= self.object_radius,
             "bound_radius must be >= object_radius"),
            (0 < self.init_radius < self.object_radius, "init_radius must lie in (0, object_radius)"),
            (math.isfinite(self.background) and 0 <= self.background <= 1, "background must be in [0, 1]"),
            (self.render_chunk >= 1, "render_chunk must be >= 1"),
        ])

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @staticmethod
    def from_dict(d: dict) -> UnisurfConfig:
        return config_from_dict(UnisurfConfig, d, {"search": SurfaceSearchSettings, "interval": IntervalSettings,
                                                   "encoding": EncodingSettings,
                                                   "occupancy_grid": OccupancyGridSettings})

    def train_config(self, **overrides) -> TrainConfig:
        """The engine's settings: Adam at ``lr``, multiplied by ``lr_gamma`` at each of ``lr_milestones``."""
        return engine_config(self, multistep_optimizer(self), **overrides)


class UnisurfModel(nn.Module):
    """Occupancy network ``o(x)`` with features z, and the appearance network ``M(x, n, v, z)`` (IDR's)."""

    def __init__(self, config: UnisurfConfig = UnisurfConfig()):
        super().__init__()
        encoding = position_encoding(config.encoding, config.geometry_frequencies,
                                     min(config.bound_radius, 2.0 * config.object_radius))
        geometry = GeometryNetwork(feature_dim=config.feature_dim, depth=config.geometry_depth,
                                   width=config.geometry_width, encoding=encoding, skip_in=config.geometry_skip_in,
                                   init_radius=config.init_radius)
        self.field = OccupancyNetwork(geometry, config.sharpness)
        self.rendering = RenderingNetwork(feature_dim=config.feature_dim, depth=config.rendering_depth,
                                          width=config.rendering_width, n_frequencies=config.rendering_frequencies)

    def occupancy(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, 3) -> (M,)``."""
        return self.field.occupancy(x)

    def radiance(self, points: torch.Tensor, view_dirs: torch.Tensor, create_graph: bool = True):
        """Occupancy ``(M,)``, colour ``(M, 3)`` and unit normals ``(M, 3)`` at ``points`` seen along
        ``view_dirs`` (both ``(M, 3)``)."""
        occ, features, normals = self.field.with_normals(points, create_graph=create_graph)
        return occ, self.rendering(points, normals, view_dirs, features), normals


def _render_samples(model: UnisurfModel, origins, dirs, t_near, t_far, hits, iteration: int,
                    config: UnisurfConfig, generator, create_graph: bool):
    samples = unisurf_samples(t_near, t_far, hits.t, hits.hit, iteration, config.interval, generator)
    points = samples.points(origins, dirs)
    occ, colour, _ = model.radiance(points, samples.directions(dirs), create_graph=create_graph)
    out = composite(occ, colour, samples, mode="alpha")
    return composite_background(out, config.background), out, samples


def search_surface(model: UnisurfModel, origins: torch.Tensor, dirs: torch.Tensor, t_near: torch.Tensor,
                   t_far: torch.Tensor, config: UnisurfConfig, grid: OccupancyGrid | None = None,
                   generator: torch.Generator | None = None):
    """UNISURF's surface search on ``[t_near, t_far]`` (:func:`find_surface`: ``search.n_steps`` steps per
    ray), or, with a ``grid``, the same search evaluated only in the grid's occupied cells
    (:func:`find_surface_in_grid`, with UNISURF's spacing along a diameter of the bounding sphere,
    ``2 bound_radius / n_steps``; rays through no occupied cell: no hit and no evaluation). Returns
    :class:`~taichi_dr.implicit.occupancy.SurfaceHits`."""
    if grid is None:
        return find_surface(model.occupancy, origins, dirs, t_near, t_far, config.search, generator)
    step = 2.0 * config.bound_radius / config.search.n_steps
    return find_surface_in_grid(model.occupancy, origins, dirs, t_near, t_far, grid, step, config.search, generator)


def fitted_grid(model: UnisurfModel, config: UnisurfConfig) -> OccupancyGrid | None:
    """A grid rebuilt from a trained field (:func:`fitted_field_grid`: fitted once per state of the weights)
    for rendering it, or None when the config has no grid."""
    return fitted_field_grid(model, config.occupancy_grid, config.bound_radius, occupancy_value_fn(model.occupancy))


def training_step(model: UnisurfModel, rays: RayBatch, iteration: int, config: UnisurfConfig,
                  generator: torch.Generator | None = None,
                  grid: OccupancyGrid | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Losses of one batch of rays (see the module docstring); stats stay on the device as 0-dim tensors.
    ``grid``: the run's occupancy grid (:func:`search_surface`), or None."""
    origins, dirs = rays.origins.detach(), rays.dirs.detach()
    n = origins.shape[0]
    t_near, t_far, _ = ray_segments(origins, dirs, config.bound_radius)
    hits = search_surface(model, origins, dirs, t_near, t_far, config, grid, generator)
    rgb, out, samples = _render_samples(model, origins, dirs, t_near, t_far, hits, iteration, config, generator,
                                        create_graph=True)
    loss_rgb = rgb_loss(rgb, rays.rgb, n)
    zero = loss_rgb * 0.0
    loss_smooth = zero
    if config.smooth_weight > 0 and bool(hits.hit.any()):
        surface = origins[hits.hit] + hits.t[hits.hit, None] * dirs[hits.hit]
        jitter = (torch.rand(surface.shape, generator=generator, dtype=surface.dtype) - 0.5) * 2
        neighbours = surface + jitter.to(surface.device) * config.smooth_epsilon
        _, _, normals = model.field.with_normals(torch.cat([surface, neighbours]), create_graph=True)
        m = surface.shape[0]
        loss_smooth = smoothness_loss(normals[:m], normals[m:])
    loss_mask = zero
    if config.use_masks:
        if rays.mask is None:
            raise ValueError("UNISURF: use_masks is set but the rays carry no masks")
        loss_mask = mask_bce_loss(out.opacity, rays.mask)
    loss = config.rgb_weight * loss_rgb + config.smooth_weight * loss_smooth + config.mask_weight * loss_mask
    mse = ((rgb.detach() - rays.rgb) ** 2).mean()
    stats = dict(rgb=loss_rgb.detach(), smooth=loss_smooth.detach(), psnr=-10.0 * torch.log10(mse.clamp_min(1e-10)),
                 hit_fraction=hits.hit.float().mean(), samples_per_ray=float(samples.n_samples) / max(n, 1),
                 interval=interval_width(iteration, config.interval), evaluations=float(hits.evaluations))
    if config.use_masks:
        stats["mask"] = loss_mask.detach()
    return loss, stats


class UnisurfMethod(RayMethod):
    """UNISURF on a multi-view dataset (masks not needed), for :class:`~taichi_dr.pipelines.engine.Trainer`
    (the shared parts: :class:`~taichi_dr.pipelines.reconstruction.RayMethod`).

    The networks are initialised from torch's global RNG: seed it first (``torch.manual_seed(config.seed)``).
    """

    name = "unisurf"
    version = 1
    title = "UNISURF"

    def __init__(self, train: MultiViewDataset, config: UnisurfConfig = UnisurfConfig(), device=None):
        super().__init__(train, config, device)

    def build_model(self, config: UnisurfConfig) -> UnisurfModel:
        return UnisurfModel(config)

    def build_grid(self, config: UnisurfConfig) -> OccupancyGrid | None:
        return config.occupancy_grid.make_grid(config.bound_radius)

    def grid_value_fn(self):
        return occupancy_value_fn(self.model.occupancy)

    def training_step(self, rays: RayBatch, iteration: int, generator: torch.Generator):
        return training_step(self.model, rays, iteration, self.settings, generator, self.grid)

    @torch.no_grad()
    def render(self, cameras: Cameras) -> dict[str, torch.Tensor]:
        """Volume rendering of the current field from ``cameras`` (:func:`render_rays`), ``(B, H, W, ...)``:
        ``rgb``, ``alpha`` (the rendered opacity), ``mask`` (bool: a surface found in the object sphere),
        world unit ``normals`` there, and ``depth`` there: the distance along the ray from the camera centre
        to that surface (not camera z); normals and depth 0 elsewhere."""
        return render_views(self.model, cameras.to(device=self.device), self.settings, self.iteration, self.grid)

    @staticmethod
    def check_network_settings(saved_config: dict, config: UnisurfConfig) -> None:
        check_network_settings(saved_config, config)


def check_network_settings(saved_config: dict, config: UnisurfConfig) -> None:
    """Raise ValueError (one line naming the first differing setting and both values) when a checkpoint made
    with ``saved_config`` (``UnisurfConfig.to_dict()``) has networks of another shape than ``config``'s."""
    check_same_networks(UnisurfConfig.from_dict(saved_config), config, NETWORK_SETTINGS)


# ---------------------------------------------------------------------------------------------------------
# rendering


def render_rays(model: UnisurfModel, origins: torch.Tensor, dirs: torch.Tensor, config: UnisurfConfig,
                iteration: int, grid: OccupancyGrid | None = None) -> dict[str, torch.Tensor]:
    """Render rays ``(N, 3)`` as at ``iteration`` of training (its interval width; no jitter):
    ``rgb (N, 3)``, ``alpha (N,)`` opacity, ``mask (N,)`` the surface found inside the object sphere,
    ``normals (N, 3)`` there (zero elsewhere) and ``depth (N,)`` its distance (0 elsewhere). ``grid``: search
    only where it has occupied cells (:func:`search_surface`)."""
    n, dt, dev = origins.shape[0], origins.dtype, origins.device
    out = dict(rgb=torch.zeros(n, 3, dtype=dt, device=dev), alpha=torch.zeros(n, dtype=dt, device=dev),
               mask=torch.zeros(n, dtype=torch.bool, device=dev), normals=torch.zeros(n, 3, dtype=dt, device=dev),
               depth=torch.zeros(n, dtype=dt, device=dev))
    for s in range(0, n, config.render_chunk):
        o, d = origins[s:s + config.render_chunk].contiguous(), dirs[s:s + config.render_chunk].contiguous()
        t_near, t_far, _ = ray_segments(o, d, config.bound_radius)
        hits = search_surface(model, o, d, t_near, t_far, config, grid)
        rgb, comp, _ = _render_samples(model, o, d, t_near, t_far, hits, iteration, config, None,
                                       create_graph=False)
        out["rgb"][s:s + len(o)] = rgb.detach()
        out["alpha"][s:s + len(o)] = comp.opacity.detach()
        # The object's surface: the first crossing inside the object sphere. Where the whole ray's first
        # crossing already lies there it is that one; only the other rays (a surface in front of the object
        # sphere, e.g. the table, or none) are searched again, inside the object sphere alone.
        surface_t, hit = hits.t.clone(), hits.hit.clone()
        x = o + surface_t[:, None] * d
        hit &= x.norm(dim=-1) <= config.object_radius
        again = torch.nonzero(~hit).flatten()
        if again.numel():
            near1, far1, _ = ray_segments(o[again], d[again], config.object_radius)
            inner = search_surface(model, o[again], d[again], near1, far1, config, grid)
            surface_t[again], hit[again] = inner.t, inner.hit
        if bool(hit.any()):
            idx = torch.nonzero(hit).flatten() + s
            x = o[hit] + surface_t[hit, None] * d[hit]
            _, _, normals = model.field.with_normals(x, create_graph=False)
            out["mask"][idx] = True
            out["normals"][idx] = normals.detach()
            out["depth"][idx] = surface_t[hit]
    return out


def render_views(model: UnisurfModel, cameras: Cameras, config: UnisurfConfig,
                 iteration: int | None = None, grid: OccupancyGrid | None = None) -> dict[str, torch.Tensor]:
    """Render whole views (``(B, H, W, ...)``, see :func:`render_rays`); ``iteration`` defaults to the end of
    training (``config.iterations``)."""
    iteration = config.iterations if iteration is None else iteration
    return render_cameras(cameras, lambda o, d: render_rays(model, o, d, config, iteration, grid))


def render_trained(model: UnisurfModel, cameras: Cameras, config: UnisurfConfig) -> dict[str, torch.Tensor]:
    """Render a trained field (as loaded from its checkpoint), with a grid rebuilt from it when the run had
    one (:func:`fitted_grid`)."""
    return render_views(model, cameras.to(device=next(model.parameters()).device), config,
                        grid=fitted_grid(model, config))


def mesh_field(model: UnisurfModel, config: UnisurfConfig) -> dict:
    """The occupancy's 0.5 level set (UNISURF's τ) in the object sphere's cube, for marching cubes."""
    return dict(field=model.occupancy, level=config.search.level, inside="above", bound=config.object_radius)


def load_model(path, device=None) -> tuple[UnisurfModel, UnisurfConfig]:
    """A trained model and its config from a UNISURF checkpoint (file or run folder); CheckpointError naming
    the file for anything else."""
    model, config, _ = read_field_checkpoint(path, UnisurfMethod, UnisurfConfig, UnisurfModel, device)
    return model, config
