"""IDR training as a library: model, one training step, the loop with checkpoints, rendering, meshing.

Usage from Python::

    from taichi_dr.data.datasets import load_dataset, split_holdout
    from taichi_dr.pipelines.idr import IDRConfig, train_idr, extract_mesh, render_views

    train, test = split_holdout(load_dataset("data/dtu_scan24"), every=8)
    model, history = train_idr(train, IDRConfig(iterations=2000), out_dir="runs/scan24")
    mesh = extract_mesh(model.geometry.sdf, resolution=256, scale_mat=train.scale_mat)
    views = render_views(model, test.cameras)

One iteration (IDR, Yariv et al. 2020): draw rays over all training pixels; sphere-trace the current SDF
(no autograd, :func:`~taichi_dr.implicit.sphere_tracing.sphere_trace`); for rays that hit the surface inside the object
mask, make the point differentiable (:func:`~taichi_dr.implicit.sphere_tracing.differentiable_intersection`), take the
normal by autograd and predict the colour (RGB L1 loss); for the other rays, the SDF at their surface or
minimum-SDF point enters the mask loss; the eikonal loss holds at random points and at the surface points.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from taichi_dr.core import runtime
from taichi_dr.core.camera import CameraParameters, Cameras
from taichi_dr.data.datasets import MultiViewDataset, sample_rays
from taichi_dr.implicit.sphere_tracing import TracerSettings, differentiable_intersection, sphere_trace
from taichi_dr.losses.implicit import alpha_schedule, eikonal_loss, mask_loss, rgb_loss
from taichi_dr.nets.fields import GeometryNetwork, RenderingNetwork

CHECKPOINT_NAME = "checkpoint.pt"


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
    init_radius: radius of the initial sphere (IDR: 0.6 of the unit sphere).
    learn_cameras / camera_lr: refine the camera poses too (IDR's "trainable cameras").
    tracer: sphere-tracing settings (the bounding sphere is also the eikonal sampling region).
    checkpoint_every, validate_every: in iterations (0 = never; a checkpoint is always written at the end).
    seed: for ray sampling and initialisation.
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
    init_radius: float = 0.6
    learn_cameras: bool = False
    camera_lr: float = 1e-4
    tracer: TracerSettings = field(default_factory=TracerSettings)
    checkpoint_every: int = 500
    validate_every: int = 0
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.iterations >= 0, "iterations must be >= 0"),
            (self.rays_per_batch >= 1, "rays_per_batch must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (all(0 < m < 1 for m in self.lr_milestones), "lr_milestones must be fractions in (0, 1)"),
            (self.alpha_init > 0, "alpha_init must be > 0"),
            (min(self.rgb_weight, self.mask_weight, self.eikonal_weight) >= 0, "loss weights must be >= 0"),
            (0 < self.init_radius < self.tracer.bounding_radius,
             "init_radius must lie in (0, tracer.bounding_radius)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"IDRConfig: {msg}")

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
        for key in ("lr_milestones", "geometry_skip_in"):
            if key in d:
                d[key] = tuple(d[key])
        return IDRConfig(**d)


class IDRModel(nn.Module):
    """Geometry network ``f(x) -> (sdf, z)`` and rendering network ``M(x, n, v, z)``."""

    def __init__(self, config: IDRConfig = IDRConfig()):
        super().__init__()
        self.geometry = GeometryNetwork(
            feature_dim=config.feature_dim, depth=config.geometry_depth, width=config.geometry_width,
            n_frequencies=config.geometry_frequencies, skip_in=config.geometry_skip_in,
            init_radius=config.init_radius)
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


def _psnr(mse: float) -> float:
    return float("inf") if mse <= 0 else -10.0 * math.log10(mse)


def training_step(model: IDRModel, batch_origins: torch.Tensor, batch_dirs: torch.Tensor,
                  target_rgb: torch.Tensor, target_mask: torch.Tensor, config: IDRConfig, alpha: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Losses of one batch of rays (``(N, 3)`` origins/dirs, possibly differentiable in the cameras,
    ``(N, 3)`` target colours, ``(N,)`` bool mask). Returns the total loss and a dict of floats."""
    n = batch_origins.shape[0]
    r = config.tracer.bounding_radius
    trace = sphere_trace(model.sdf, batch_origins.detach(), batch_dirs.detach(), config.tracer,
                         miss_min_sdf=True, generator=generator)
    surf = trace.hit & target_mask
    other = ~surf
    zero = batch_origins.sum() * 0.0

    loss_rgb, mse = zero, zero + math.nan
    grads = []
    if bool(surf.any()):
        x = differentiable_intersection(model.sdf, batch_origins[surf], batch_dirs[surf], trace.t[surf])
        rgb, _, g = model.shade(x, batch_dirs[surf], create_graph=True)
        grads.append(g)
        loss_rgb = rgb_loss(rgb, target_rgb[surf], n)
        mse = ((rgb.detach() - target_rgb[surf]) ** 2).mean()
    loss_mask = zero
    if bool(other.any()):
        pts = batch_origins[other] + trace.t[other, None] * batch_dirs[other]
        loss_mask = mask_loss(model.sdf(pts), target_mask[other], alpha, n)

    # Eikonal points: uniform in the bounding cube, plus the traced surface points.
    gen_dev = generator.device if generator is not None else "cpu"
    pts = (torch.rand(n, 3, generator=generator, device=gen_dev) * 2 - 1).to(batch_origins) * r
    _, g_rand = model.geometry.gradient(pts, create_graph=True)
    grads.append(g_rand)
    loss_eik = eikonal_loss(torch.cat(grads))

    loss = config.rgb_weight * loss_rgb + config.mask_weight * loss_mask + config.eikonal_weight * loss_eik
    # The statistics leave the device together, in one copy (each float() would wait for it separately).
    inter, union = (trace.hit & target_mask).sum(), (trace.hit | target_mask).sum()
    values = torch.stack([x.detach().to(torch.float64).reshape(()) for x in
                          (loss, loss_rgb, loss_mask, loss_eik, mse, inter, union)]).cpu().tolist()
    loss_v, rgb_v, mask_v, eik_v, mse_v, inter_v, union_v = values
    stats = dict(loss=loss_v, rgb=rgb_v, mask=mask_v, eikonal=eik_v,
                 psnr=float("nan") if math.isnan(mse_v) else _psnr(mse_v), iou=inter_v / max(1.0, union_v),
                 alpha=alpha, sdf_evals=trace.sdf_evals)
    return loss, stats


# ---------------------------------------------------------------------------------------------------------
# rendering


@torch.no_grad()
def render_rays(model: IDRModel, origins: torch.Tensor, dirs: torch.Tensor, tracer: TracerSettings,
                chunk: int = 16384, background: float = 0.0) -> dict[str, torch.Tensor]:
    """Render rays ``(N, 3)``: ``rgb (N, 3)`` (background where missed), ``mask (N,)`` bool,
    ``normals (N, 3)`` (world space, zero where missed) and ``depth (N,)`` (ray distance, 0 where missed)."""
    n = origins.shape[0]
    rgb = torch.full((n, 3), float(background), dtype=origins.dtype, device=origins.device)
    normals = torch.zeros(n, 3, dtype=origins.dtype, device=origins.device)
    depth = torch.zeros(n, dtype=origins.dtype, device=origins.device)
    mask = torch.zeros(n, dtype=torch.bool, device=origins.device)
    for s in range(0, n, chunk):
        o, d = origins[s:s + chunk].contiguous(), dirs[s:s + chunk].contiguous()
        tr = sphere_trace(model.sdf, o, d, tracer, miss_min_sdf=False)
        h = tr.hit
        if bool(h.any()):
            c, nrm, _ = model.shade(tr.points[h], d[h])
            idx = torch.nonzero(h).flatten() + s
            rgb[idx] = c.detach().to(rgb.dtype)
            normals[idx] = nrm.detach().to(rgb.dtype)
            depth[idx] = tr.t[h]
        mask[s:s + chunk] = h
    return dict(rgb=rgb, mask=mask, normals=normals, depth=depth)


def scale_cameras(cameras: Cameras, factor: float) -> Cameras:
    """The same cameras for images ``factor`` times the size (K's first two rows scaled)."""
    if factor == 1:
        return cameras
    h, w = cameras.image_size
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    s = torch.tensor([size[1] / w, size[0] / h, 1.0], dtype=cameras.dtype, device=cameras.device)
    return Cameras(cameras.K * s[None, :, None], cameras.R, cameras.t, size)


@torch.no_grad()
def render_views(model: IDRModel, cameras: Cameras, tracer: TracerSettings = TracerSettings(),
                 chunk: int = 16384, background: float = 0.0) -> dict[str, torch.Tensor]:
    """Render whole views: ``rgb (B, H, W, 3)``, ``mask (B, H, W)``, ``normals (B, H, W, 3)`` and
    ``depth (B, H, W)``."""
    h, w = cameras.image_size
    outs = []
    for i in range(len(cameras)):
        o, d = cameras[i].detach().image_rays()
        outs.append(render_rays(model, o.reshape(-1, 3), d.reshape(-1, 3), tracer, chunk, background))
    return {k: torch.stack([o[k] for o in outs]).reshape(len(cameras), h, w, *outs[0][k].shape[1:])
            for k in outs[0]}


def image_metrics(rendered: dict[str, torch.Tensor], images: torch.Tensor, masks: torch.Tensor) -> dict:
    """Held-out view metrics: PSNR on the object-mask pixels (the prediction there is the rendered colour
    where the surface is hit and black elsewhere) and mask IoU, per view and their means."""
    psnrs, ious = [], []
    for i in range(images.shape[0]):
        m = masks[i]
        mse = float(((rendered["rgb"][i][m] - images[i][m]) ** 2).mean()) if bool(m.any()) else 0.0
        psnrs.append(_psnr(mse))
        p = rendered["mask"][i]
        union = int((p | m).sum())
        ious.append(1.0 if union == 0 else int((p & m).sum()) / union)
    return dict(psnr=float(np.mean(psnrs)), mask_iou=float(np.mean(ious)), psnr_per_view=psnrs,
                mask_iou_per_view=ious)


# ---------------------------------------------------------------------------------------------------------
# meshing


@torch.no_grad()
def extract_mesh(sdf_fn: Callable[[torch.Tensor], torch.Tensor], resolution: int = 256, bound: float = 1.0,
                 scale_mat: torch.Tensor | None = None, chunk: int = 65536, device=None):
    """Marching cubes of ``sdf_fn``'s zero level set on a ``resolution³`` grid over ``[-bound, bound]³``.

    The SDF is evaluated one z-slab at a time in chunks of ``chunk`` points, so only the float32 grid
    (``4 resolution³`` bytes: 512 MB at 512³) is held. ``scale_mat (4, 4)`` maps the normalised coordinates
    to world coordinates (the dataset's ``scale_mat``). Returns a :class:`taichi_dr.core.mesh.Mesh` with outward
    (counter-clockwise) faces. Raises ValueError if the SDF has no zero crossing in the grid.
    """
    import mcubes

    from taichi_dr.core.mesh import Mesh

    if resolution < 2:
        raise ValueError(f"extract_mesh: resolution must be >= 2, got {resolution}")
    dev = device or runtime.device()
    lin = torch.linspace(-bound, bound, resolution, device=dev)
    vol = np.empty((resolution, resolution, resolution), dtype=np.float32)
    yy, zz = torch.meshgrid(lin, lin, indexing="ij")
    slab = torch.stack([yy, zz], -1).reshape(-1, 2)
    for i in range(resolution):
        pts = torch.cat([lin[i].expand(slab.shape[0], 1), slab], dim=1)
        vals = torch.cat([sdf_fn(pts[s:s + chunk]).reshape(-1) for s in range(0, pts.shape[0], chunk)])
        vol[i] = vals.reshape(resolution, resolution).float().cpu().numpy()
    if not (vol.min() < 0 < vol.max()):
        raise ValueError(f"extract_mesh: the SDF has no zero crossing in [-{bound}, {bound}]^3 "
                         f"(range {vol.min():.3g} .. {vol.max():.3g}); nothing to mesh")
    verts, faces = mcubes.marching_cubes(vol, 0.0)
    verts = verts.astype(np.float64) * (2 * bound / (resolution - 1)) - bound
    # mcubes orients faces for increasing values outward-facing: flip so that normals point to f > 0.
    faces = faces[:, ::-1].astype(np.int64)
    if scale_mat is not None:
        s = torch.as_tensor(scale_mat, dtype=torch.float64).cpu().numpy()
        verts = verts @ s[:3, :3].T + s[:3, 3]
    return Mesh(verts=torch.from_numpy(verts).float(), faces=torch.from_numpy(np.ascontiguousarray(faces)),
                name="marching_cubes").validate()


# ---------------------------------------------------------------------------------------------------------
# the loop


def _make_optimizer(model: IDRModel, cam_params: CameraParameters | None, config: IDRConfig):
    groups = [{"params": list(model.parameters()), "lr": config.lr}]
    if cam_params is not None:
        groups.append({"params": list(cam_params.parameters()), "lr": config.camera_lr})
    opt = torch.optim.Adam(groups)
    milestones = sorted({max(1, int(m * config.iterations)) for m in config.lr_milestones})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=config.lr_gamma)
    return opt, sched


def save_checkpoint(path: Path, iteration: int, model: IDRModel, opt, sched, cam_params, config: IDRConfig,
                    generator: torch.Generator, history: list) -> None:
    state = dict(iteration=iteration, model=model.state_dict(), optimizer=opt.state_dict(),
                 scheduler=sched.state_dict(), config=config.to_dict(), generator=generator.get_state(),
                 cameras=cam_params.state_dict() if cam_params is not None else None, history=history)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)   # never leave a half-written checkpoint behind


def load_model(path, device=None) -> tuple[IDRModel, IDRConfig]:
    """A trained model and its config from a checkpoint written by :func:`train_idr`."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint")
    state = torch.load(path, map_location=device or runtime.device(), weights_only=False)
    config = IDRConfig.from_dict(state["config"])
    model = IDRModel(config).to(device or runtime.device())
    model.load_state_dict(state["model"])
    return model, config


def train_idr(train: MultiViewDataset, config: IDRConfig = IDRConfig(), out_dir=None, *, resume: bool = False,
              validation: MultiViewDataset | None = None, validation_scale: float = 0.25,
              progress: Callable[[int, int, dict], None] | None = None,
              on_validation: Callable[[int, dict], None] | None = None):
    """Train IDR on ``train``; returns ``(model, history)`` (``history``: one stats dict per iteration).

    out_dir: where ``checkpoint.pt`` is written every ``config.checkpoint_every`` iterations and at the
        end (None: no checkpoints). ``resume`` continues from it (the config stored there must have the same
        network sizes; its iteration count and schedules are replaced by ``config``'s).
    validation: views rendered every ``config.validate_every`` iterations at ``validation_scale`` of their
        size; ``on_validation(iteration, {"rendered", "metrics"})`` receives them.
    progress: called after every iteration with ``(iteration, total, stats)``; stats has loss, rgb, mask,
        eikonal, psnr (on the surface rays), iou (traced hits vs mask), alpha, rays_per_s.
    """
    runtime.ensure_init()
    dev = runtime.device()
    torch.manual_seed(config.seed)
    model = IDRModel(config).to(dev)
    cam_params = CameraParameters(train.cameras.to(device=dev)).to(dev) if config.learn_cameras else None
    opt, sched = _make_optimizer(model, cam_params, config)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start = 0
    ckpt = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at {ckpt}")
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        saved = IDRConfig.from_dict(state["config"])
        sizes = ("geometry_depth", "geometry_width", "geometry_frequencies", "geometry_skip_in",
                 "feature_dim", "rendering_depth", "rendering_width", "rendering_frequencies",
                 "learn_cameras")
        diff = [k for k in sizes if getattr(saved, k) != getattr(config, k)]
        if diff:
            raise ValueError(f"resume: {ckpt} was trained with different network settings: "
                             + ", ".join(f"{k}={getattr(saved, k)} (now {getattr(config, k)})" for k in diff))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        sched.milestones = _make_optimizer(model, cam_params, config)[1].milestones   # this config's schedule
        generator.set_state(state["generator"])
        if cam_params is not None and state["cameras"] is not None:
            cam_params.load_state_dict(state["cameras"])
        start = int(state["iteration"])
        history = list(state.get("history", []))
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)

    images = train.images.to(dev)
    masks = train.masks.to(dev)
    data = dataclasses.replace(train, images=images, masks=masks, cameras=train.cameras.to(device=dev))
    model.train()
    for it in range(start, config.iterations):
        t0 = time.perf_counter()
        alpha = alpha_schedule(it, config.iterations, config.alpha_init, config.alpha_factor,
                               config.alpha_milestones)
        cams = cam_params() if cam_params is not None else None
        batch = sample_rays(data, config.rays_per_batch, generator, cameras=cams)
        loss, stats = training_step(model, batch.origins, batch.dirs, batch.rgb, batch.mask, config, alpha,
                                    generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        stats["rays_per_s"] = config.rays_per_batch / max(1e-9, time.perf_counter() - t0)
        stats["iteration"] = it + 1
        history.append(stats)
        if progress is not None:
            progress(it + 1, config.iterations, stats)
        done = it + 1 == config.iterations
        periodic = config.checkpoint_every and (it + 1) % config.checkpoint_every == 0
        if ckpt is not None and (done or periodic):
            save_checkpoint(ckpt, it + 1, model, opt, sched, cam_params, config, generator, history)
        if (validation is not None and on_validation is not None and config.validate_every
                and (it + 1) % config.validate_every == 0):
            model.eval()
            cams_v = scale_cameras(validation.cameras.to(device=dev), validation_scale)
            rendered = render_views(model, cams_v, config.tracer)
            small = _resize_views(validation, cams_v.image_size)
            on_validation(it + 1, dict(rendered=rendered, metrics=image_metrics(rendered, *small)))
            model.train()
    model.eval()
    return model, history


def _resize_views(ds: MultiViewDataset, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and masks resized (area / nearest) to ``size`` for comparison with small renders."""
    import torch.nn.functional as F

    if tuple(size) == ds.image_size:
        return ds.images, ds.masks
    img = F.interpolate(ds.images.permute(0, 3, 1, 2), size=size, mode="area").permute(0, 2, 3, 1)
    msk = F.interpolate(ds.masks[:, None].float(), size=size, mode="area")[:, 0] > 0.5
    return img, msk


def write_metrics(path, metrics: dict) -> None:
    Path(path).write_text(json.dumps(metrics, indent=1, default=float) + "\n")
