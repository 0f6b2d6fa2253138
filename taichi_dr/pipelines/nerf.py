"""NeRF (Mildenhall et al. 2020) as a method of the training engine: the volume-rendering baseline UNISURF
generalises.

One iteration (NeRF's hierarchical sampling with both networks):

1. rays drawn over all training pixels from the engine's generator, cut to the bounding sphere
   (``bound_radius``, as UNISURF's, so the two see the same scene), from no nearer than the camera;
2. ``n_coarse`` stratified samples per ray (:func:`~taichi_dr.implicit.sampling.stratified_samples`), the
   coarse network's density and colour there, compositing in density mode (alpha = 1 - exp(-sigma delta),
   :func:`~taichi_dr.implicit.compositing.composite`);
3. ``n_fine`` more samples by inverse CDF of the coarse weights
   (:func:`~taichi_dr.implicit.sampling.importance_samples`), merged with the coarse ones, through the fine
   network, composited again;
4. loss: the MSE of both renders against the pixels (NeRF), plus, only when trained with masks, a BCE between
   the fine opacity and the mask. What lies beyond the bounding sphere is the ``background`` colour (black for
   DTU-like data, white for NeRF-synthetic scenes, which NeRF composites on white).

The learning rate decays exponentially to ``lr_gamma`` (NeRF: 0.1) of its start over the run.

With an occupancy grid (``occupancy_grid``, instant-ngp's and nerfacc's empty-space skipping, updated from the
fine density during training), step 2 keeps only the coarse samples in occupied cells
(:meth:`~taichi_dr.implicit.occupancy_grid.OccupancyGrid.march`: the same spacing as ``n_coarse`` samples along
a diameter of the bounding sphere, one random shift per ray); every sample then stands for one step (nerfacc's
convention), so no sample's ``delta`` reaches across skipped empty space.
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
from taichi_dr.implicit.occupancy_grid import OccupancyGrid, OccupancyGridSettings, density_value_fn
from taichi_dr.implicit.samples import RaySamples
from taichi_dr.implicit.sampling import importance_samples, merge_samples, stratified_samples
from taichi_dr.losses.implicit import mask_bce_loss
from taichi_dr.nets.encodings import EncodingSettings, position_encoding
from taichi_dr.nets.radiance import RadianceField
from taichi_dr.pipelines.config import OptimizerConfig, TrainConfig
from taichi_dr.pipelines.reconstruction import (
    RayMethod,
    check_run_settings,
    check_same_networks,
    config_from_dict,
    config_to_dict,
    engine_config,
    fitted_field_grid,
    positive,
    read_field_checkpoint,
)
from taichi_dr.pipelines.views import render_cameras

__all__ = ["NeRFConfig", "NeRFMethod", "NeRFModel", "check_network_settings", "fitted_grid", "grid_step",
           "load_model", "mesh_field", "render_batch", "render_rays", "render_trained", "render_views",
           "surface_density"]

NETWORK_SETTINGS = ("depth", "width", "skip_in", "frequencies", "view_frequencies", "colour_width", "encoding")


@dataclass(frozen=True)
class NeRFConfig:
    """Settings of a NeRF run (defaults: NeRF's networks and sampling; iterations sized for short runs).

    rays_per_batch: rays per step (NeRF: 1024). lr, lr_gamma: Adam at ``lr`` (NeRF: 5e-4) decaying
    exponentially to ``lr * lr_gamma`` (NeRF: 0.1) at the end.
    n_coarse, n_fine: samples per ray (NeRF: 64 and 128).
    depth, width, skip_in, frequencies, view_frequencies, colour_width: both networks (NeRF: 8 x 256, skip
        into layer 4 counted from 0, 10 and 4 frequencies, 128).
    encoding: both networks' encoding of positions (:class:`EncodingSettings`): NeRF's frequencies, or a hash
        grid over the cube of half-side ``min(bound_radius, 2 object_radius)`` (as UNISURF's).
    bound_radius: the sphere rays are cut to; object_radius: the object's (normalised unit) sphere, where
        meshes are taken.
    density_level: the density of the surface marching cubes takes; None (default): measured on the trained
        field (:func:`surface_density`: the median density where rays' transmittance falls to 1/2), since a
        fixed threshold (NeRF's mesh notebook uses 50 in its units) depends on the scene's scale and on how far
        training got; background: colour beyond the bounding sphere.
    use_masks, mask_weight: BCE of opacity vs mask (only with masks).
    occupancy_grid: :class:`OccupancyGridSettings`: coarse samples only in the occupied cells of a grid over the
        bounding sphere's cube, updated from the fine density (``sigma * step``). Off by default: with the
        softplus density, empty space stays above the skipping threshold (opacity 1% per coarse step) in short
        runs (a 300-iteration run on a test box, with masks, kept every cell occupied), so the grid skips
        nothing there. Off: NeRF's stratified samples over the whole segment.
    render_chunk: rays per chunk when rendering views.
    """

    iterations: int = 2000
    rays_per_batch: int = 1024
    lr: float = 5e-4
    lr_gamma: float = 0.1
    n_coarse: int = 64
    n_fine: int = 128
    depth: int = 8
    width: int = 256
    skip_in: tuple[int, ...] = (4,)
    frequencies: int = 10
    view_frequencies: int = 4
    colour_width: int = 128
    encoding: EncodingSettings = field(default_factory=EncodingSettings)
    bound_radius: float = 4.0
    object_radius: float = 1.0
    density_level: float | None = None
    background: float = 0.0
    use_masks: bool = False
    mask_weight: float = 0.1
    occupancy_grid: OccupancyGridSettings = field(default_factory=lambda: OccupancyGridSettings(enabled=False))
    render_chunk: int = 4096
    grad_clip: float | None = None
    checkpoint_every: int = 500
    validate_every: int = 0
    seed: int = 0

    def __post_init__(self):
        check_run_settings(self, "NeRFConfig", [
            (self.n_coarse >= 2, "n_coarse must be >= 2"),
            (self.n_fine >= 0, "n_fine must be >= 0"),
            (positive(self.object_radius), "object_radius must be > 0"),
            (positive(self.bound_radius) and self.bound_radius >= self.object_radius,
             "bound_radius must be >= object_radius"),
            (self.density_level is None or positive(self.density_level), "density_level must be > 0 (or None)"),
            (math.isfinite(self.background) and 0 <= self.background <= 1, "background must be in [0, 1]"),
            (math.isfinite(self.mask_weight) and self.mask_weight >= 0, "mask_weight must be >= 0"),
            (self.render_chunk >= 1, "render_chunk must be >= 1"),
        ])

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @staticmethod
    def from_dict(d: dict) -> NeRFConfig:
        return config_from_dict(NeRFConfig, d, {"encoding": EncodingSettings,
                                                "occupancy_grid": OccupancyGridSettings})

    def train_config(self, **overrides) -> TrainConfig:
        optimizer = OptimizerConfig(lr=self.lr, schedule="exponential", gamma=self.lr_gamma,
                                    grad_clip=self.grad_clip)
        return engine_config(self, optimizer, **overrides)


class NeRFModel(nn.Module):
    """The coarse and the fine :class:`~taichi_dr.nets.radiance.RadianceField` (same architecture)."""

    def __init__(self, config: NeRFConfig = NeRFConfig()):
        super().__init__()

        def field():
            encoding = position_encoding(config.encoding, config.frequencies,
                                         min(config.bound_radius, 2.0 * config.object_radius))
            return RadianceField(depth=config.depth, width=config.width, skip_in=config.skip_in,
                                 encoding=encoding, view_frequencies=config.view_frequencies,
                                 colour_width=config.colour_width)

        self.coarse = field()
        self.fine = field()

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """The fine network's density ``(M, 3) -> (M,)`` (what meshes and normals come from)."""
        return self.fine.density(x)


def grid_step(config: NeRFConfig) -> float:
    """The coarse samples' spacing with an occupancy grid: ``n_coarse`` samples along a diameter of the
    bounding sphere."""
    return 2.0 * config.bound_radius / config.n_coarse


def fitted_grid(model: NeRFModel, config: NeRFConfig) -> OccupancyGrid | None:
    """A grid rebuilt from a trained field (:func:`fitted_field_grid`: fitted once per state of the weights)
    for rendering it, or None when the config has no grid."""
    return fitted_field_grid(model, config.occupancy_grid, config.bound_radius,
                             density_value_fn(model.density, grid_step(config)))


def render_batch(model: NeRFModel, origins: torch.Tensor, dirs: torch.Tensor, config: NeRFConfig,
                 generator: torch.Generator | None = None, grid: OccupancyGrid | None = None) -> dict[str, Any]:
    """Coarse then fine rendering of rays ``(N, 3)``: ``coarse``/``fine`` composites (see
    :class:`~taichi_dr.implicit.compositing.Composite`), their colours on the background ``rgb_coarse``,
    ``rgb`` ``(N, 3)``, and ``samples`` (samples of the fine pass). Jittered when a generator is given.
    ``grid``: coarse samples only in its occupied cells (see the module docstring)."""
    t_near, t_far, _ = ray_segments(origins, dirs, config.bound_radius)
    if grid is None:
        counts = torch.full_like(t_near, config.n_coarse, dtype=torch.int32)
        coarse_samples = stratified_samples(t_near, t_far, counts, generator)
    else:
        coarse_samples = grid.march(origins, dirs, t_near, t_far, grid_step(config), generator=generator)
    density, colour = model.coarse(coarse_samples.points(origins, dirs), coarse_samples.directions(dirs))
    coarse = composite(density, colour, coarse_samples, mode="density")
    samples = coarse_samples
    if config.n_fine > 0:
        extra = importance_samples(coarse_samples, coarse.weights.detach(), config.n_fine, t_far, generator)
        samples = merge_samples(coarse_samples, extra, t_far)
        if grid is not None:
            # The gap after a sample may be skipped empty space (or reach t_far): no sample stands for more
            # than one coarse step.
            samples = RaySamples(t=samples.t, delta=samples.delta.clamp(max=grid_step(config)),
                                 ray_index=samples.ray_index, offsets=samples.offsets)
    density, colour = model.fine(samples.points(origins, dirs), samples.directions(dirs))
    fine = composite(density, colour, samples, mode="density")
    return dict(coarse=coarse, fine=fine, rgb_coarse=composite_background(coarse, config.background),
                rgb=composite_background(fine, config.background), samples=samples)


class NeRFMethod(RayMethod):
    """NeRF on a multi-view dataset (masks not needed), for :class:`~taichi_dr.pipelines.engine.Trainer`
    (the shared parts: :class:`~taichi_dr.pipelines.reconstruction.RayMethod`).

    The networks are initialised from torch's global RNG: seed it first (``torch.manual_seed(config.seed)``).
    """

    name = "nerf"
    version = 1
    title = "NeRF"

    def __init__(self, train: MultiViewDataset, config: NeRFConfig = NeRFConfig(), device=None):
        super().__init__(train, config, device)

    def build_model(self, config: NeRFConfig) -> NeRFModel:
        return NeRFModel(config)

    def build_grid(self, config: NeRFConfig) -> OccupancyGrid | None:
        return config.occupancy_grid.make_grid(config.bound_radius)

    def grid_value_fn(self):
        return density_value_fn(self.model.density, grid_step(self.settings))

    def training_step(self, rays: RayBatch, iteration: int, generator: torch.Generator):
        """NeRF's loss: the MSE of the coarse and the fine render (plus the mask BCE with masks)."""
        config = self.settings
        out = render_batch(self.model, rays.origins.detach(), rays.dirs.detach(), config, generator, self.grid)
        mse_fine = ((out["rgb"] - rays.rgb) ** 2).mean()
        loss = ((out["rgb_coarse"] - rays.rgb) ** 2).mean() + mse_fine
        stats = dict(mse=mse_fine.detach(), psnr=-10.0 * torch.log10(mse_fine.detach().clamp_min(1e-10)),
                     samples_per_ray=float(out["samples"].n_samples) / max(rays.origins.shape[0], 1))
        if config.use_masks:
            loss_mask = mask_bce_loss(out["fine"].opacity, rays.mask)
            loss = loss + config.mask_weight * loss_mask
            stats["mask"] = loss_mask.detach()
        return loss, stats

    @torch.no_grad()
    def render(self, cameras: Cameras) -> dict[str, torch.Tensor]:
        """Volume rendering of the current fields from ``cameras`` (:func:`render_rays`), ``(B, H, W, ...)``:
        ``rgb``, ``alpha`` (the rendered opacity), ``mask`` (bool: opacity > 0.5), and where masked: ``depth``,
        the expected distance along the ray from the camera centre (sum of weights times sample distances over
        the opacity; not camera z), and world unit ``normals`` of the fine density there; both 0 elsewhere."""
        return render_views(self.model, cameras.to(device=self.device), self.settings, self.grid)

    @staticmethod
    def check_network_settings(saved_config: dict, config: NeRFConfig) -> None:
        check_network_settings(saved_config, config)


def check_network_settings(saved_config: dict, config: NeRFConfig) -> None:
    """Raise ValueError (one line naming the first differing setting and both values) when a checkpoint made
    with ``saved_config`` (``NeRFConfig.to_dict()``) has networks of another shape than ``config``'s."""
    check_same_networks(NeRFConfig.from_dict(saved_config), config, NETWORK_SETTINGS)


@torch.no_grad()
def render_rays(model: NeRFModel, origins: torch.Tensor, dirs: torch.Tensor, config: NeRFConfig,
                grid: OccupancyGrid | None = None):
    """Render rays ``(N, 3)`` without jitter: ``rgb (N, 3)``, ``alpha (N,)`` opacity, ``mask (N,)``
    (opacity > 0.5), ``depth (N,)`` (expected depth over opacity; 0 where transparent) and ``normals (N, 3)``
    (of the fine density at the depth, where masked; zero elsewhere). ``grid``: skip its empty cells."""
    n, dt, dev = origins.shape[0], origins.dtype, origins.device
    out = dict(rgb=torch.zeros(n, 3, dtype=dt, device=dev), alpha=torch.zeros(n, dtype=dt, device=dev),
               mask=torch.zeros(n, dtype=torch.bool, device=dev), normals=torch.zeros(n, 3, dtype=dt, device=dev),
               depth=torch.zeros(n, dtype=dt, device=dev))
    for s in range(0, n, config.render_chunk):
        o, d = origins[s:s + config.render_chunk].contiguous(), dirs[s:s + config.render_chunk].contiguous()
        r = render_batch(model, o, d, config, grid=grid)
        fine = r["fine"]
        sl = slice(s, s + len(o))
        out["rgb"][sl] = r["rgb"]
        out["alpha"][sl] = fine.opacity
        mask = fine.opacity > 0.5
        depth = torch.where(mask, fine.depth / fine.opacity.clamp_min(1e-6), torch.zeros_like(fine.depth))
        out["mask"][sl] = mask
        out["depth"][sl] = depth
        if bool(mask.any()):
            x = o[mask] + depth[mask, None] * d[mask]
            normals = torch.zeros_like(o)
            normals[mask] = model.fine.normals(x)
            out["normals"][sl] = normals
    return out


def render_views(model: NeRFModel, cameras: Cameras, config: NeRFConfig,
                 grid: OccupancyGrid | None = None) -> dict[str, torch.Tensor]:
    """Render whole views (``(B, H, W, ...)``, see :func:`render_rays`)."""
    return render_cameras(cameras, lambda o, d: render_rays(model, o, d, config, grid))


def render_trained(model: NeRFModel, cameras: Cameras, config: NeRFConfig) -> dict[str, torch.Tensor]:
    """Render a trained field (as loaded from its checkpoint), with a grid rebuilt from it when the run had
    one (:func:`fitted_grid`)."""
    return render_views(model, cameras.to(device=next(model.parameters()).device), config,
                        fitted_grid(model, config))


@torch.no_grad()
def surface_density(model: NeRFModel, config: NeRFConfig, n_rays: int = 4096, seed: int = 0) -> float:
    """The fine density at the surface the renders see: rays from points on a sphere of radius 2.5 around the
    object aimed at random points of the object sphere (a fixed seed; no data needed) are rendered, and for
    those that become opaque (opacity > 0.5) the fine density is taken at their median depth, the sample where
    the accumulated weight first reaches 1/2 (transmittance 1/2); the median over rays is returned. 0 when no
    ray becomes opaque."""
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device

    def on_sphere(n, radius):
        v = torch.randn(n, 3, generator=g)
        return v / v.norm(dim=-1, keepdim=True) * radius

    origins = on_sphere(n_rays, 2.5 * config.object_radius)
    targets = on_sphere(n_rays, 1.0) * torch.rand(n_rays, 1, generator=g) ** (1 / 3) * config.object_radius
    dirs = targets - origins
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    out = render_batch(model, origins.to(dev), dirs.to(dev), config)
    fine, samples = out["fine"], out["samples"]
    if samples.n_samples == 0:
        return 0.0
    idx = samples.ray_index.long()
    # the weight accumulated along each ray up to each sample (samples are packed ray after ray, in order)
    total = torch.cumsum(fine.weights.double(), 0)
    start = samples.offsets[:-1].long()
    before = torch.where(start > 0, total[(start - 1).clamp_min(0)], torch.zeros_like(total[:1]))
    cumulative = total - before[idx]
    crossing = (cumulative >= 0.5) & (fine.opacity[idx] > 0.5)
    first = torch.full((samples.n_rays,), samples.n_samples, dtype=torch.long, device=dev)
    first.scatter_reduce_(0, idx[crossing], torch.nonzero(crossing).flatten(), reduce="amin")
    opaque = first < samples.n_samples
    if not bool(opaque.any()):
        return 0.0
    points = samples.points(origins.to(dev), dirs.to(dev))[first[opaque]]
    return float(model.density(points).median())


def mesh_field(model: NeRFModel, config: NeRFConfig) -> dict:
    """The fine density's ``density_level`` set (or :func:`surface_density`) in the object sphere's cube, for
    marching cubes."""
    level = config.density_level if config.density_level is not None else surface_density(model, config)
    return dict(field=model.density, level=max(level, 1e-6), inside="above", bound=config.object_radius)


def load_model(path, device=None) -> tuple[NeRFModel, NeRFConfig]:
    """A trained model and its config from a NeRF checkpoint (file or run folder)."""
    model, config, _ = read_field_checkpoint(path, NeRFMethod, NeRFConfig, NeRFModel, device)
    return model, config
