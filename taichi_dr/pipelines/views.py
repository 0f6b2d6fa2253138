"""Views of a trained field: cameras at another resolution, ground truth resized to match, image metrics and
the validation callback every reconstruction method (IDR, UNISURF, NeRF) shares.

A method's ``render(cameras)`` returns a dict of ``(B, H, W, ...)`` tensors: ``rgb``, ``alpha`` (opacity, or
1 where a surface is hit), ``normals`` (world, unit, zero where there is none), ``depth``, and for the methods
whose surface is found separately from the colour (UNISURF) ``mask``, where the surface is hit. The functions
here work on that dict alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from taichi_dr.core.camera import Cameras
from taichi_dr.data.datasets import MultiViewDataset
from taichi_dr.pipelines.callbacks import Validation

__all__ = ["cameras_at_size", "image_metrics", "resize_views", "scale_cameras",
           "validation_callback", "validation_image"]


def _psnr(mse: float) -> float:
    return float("inf") if mse <= 0 else -10.0 * math.log10(mse)


def cameras_at_size(cameras: Cameras, size: tuple[int, int]) -> Cameras:
    """The same cameras for images of ``size`` (H, W): K's first two rows scaled (pixel centres at +0.5 stay
    centres)."""
    h, w = cameras.image_size
    size = (int(size[0]), int(size[1]))
    if (h, w) == size:
        return cameras
    s = torch.tensor([size[1] / w, size[0] / h, 1.0], dtype=cameras.dtype, device=cameras.device)
    return Cameras(cameras.K * s[None, :, None], cameras.R, cameras.t, size)


def scale_cameras(cameras: Cameras, factor: float) -> Cameras:
    """The same cameras for images ``factor`` times the size (K's first two rows scaled)."""
    if factor == 1:
        return cameras
    h, w = cameras.image_size
    return cameras_at_size(cameras, (max(1, round(h * factor)), max(1, round(w * factor))))


def predicted_mask(rendered: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where the render found the object: its ``mask`` (a surface hit) if it has one, else ``alpha > 0.5``."""
    return rendered["mask"] if "mask" in rendered else rendered["alpha"] > 0.5


def image_metrics(rendered: dict[str, torch.Tensor], images: torch.Tensor, masks: torch.Tensor | None) -> dict:
    """Held-out view metrics, per view and their means.

    * ``psnr``: on the object-mask pixels when there are masks (the prediction there is the rendered colour,
      whatever the method put there), else on the whole image;
    * ``psnr_full``: on the whole image;
    * ``mask_iou`` (with masks): IoU of :func:`predicted_mask` and the mask.

    rendered: ``rgb (B, H, W, 3)`` and ``mask (B, H, W)`` bool or ``alpha (B, H, W)``; images ``(B, H, W, 3)``;
    masks ``(B, H, W)`` bool or None."""
    rgb, images = rendered["rgb"].cpu(), images.cpu()
    predicted = predicted_mask(rendered).cpu()
    psnrs, full, ious = [], [], []
    for i in range(images.shape[0]):
        err = (rgb[i] - images[i]) ** 2
        full.append(_psnr(float(err.mean())))
        if masks is None:
            psnrs.append(full[-1])
            continue
        m = masks[i].cpu()
        psnrs.append(_psnr(float(err[m].mean())) if bool(m.any()) else float("inf"))
        p = predicted[i]
        union = int((p | m).sum())
        ious.append(1.0 if union == 0 else int((p & m).sum()) / union)
    out = dict(psnr=float(np.mean(psnrs)), psnr_full=float(np.mean(full)), psnr_per_view=psnrs,
               psnr_full_per_view=full)
    if masks is not None:
        out.update(mask_iou=float(np.mean(ious)), mask_iou_per_view=ious)
    return out


def resize_views(ds: MultiViewDataset, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (area) and masks (nearest at 0.5; None without masks) resized to ``size`` for comparison with
    small renders."""
    if tuple(size) == ds.image_size:
        return ds.images, ds.masks
    img = F.interpolate(ds.images.permute(0, 3, 1, 2), size=size, mode="area").permute(0, 2, 3, 1)
    if ds.masks is None:
        return img, None
    msk = F.interpolate(ds.masks[:, None].float(), size=size, mode="area")[:, 0] > 0.5
    return img, msk


def to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def validation_image(rendered: dict[str, torch.Tensor]) -> np.ndarray:
    """One row per view: the colour render | its normals (n * 0.5 + 0.5, white where there is no surface)."""
    hit = predicted_mask(rendered)[..., None]
    normals = torch.where(hit, rendered["normals"] * 0.5 + 0.5, torch.ones_like(rendered["normals"]))
    rows = torch.cat([rendered["rgb"], normals], dim=2)            # (B, H, 2W, 3)
    return to_uint8(rows.reshape(-1, *rows.shape[2:]))             # (B H, 2W, 3)


def validation_callback(views: MultiViewDataset, every: int, scale: float = 0.25, folder=None) -> Validation:
    """A :class:`~taichi_dr.pipelines.callbacks.Validation` that every ``every`` iterations renders ``views``
    at ``scale`` of their size from the live method (``state.method.render``) and adds ``val_psnr`` (and
    ``val_mask_iou`` when the views have masks; see :func:`image_metrics`) to the metrics row; with ``folder``,
    also writes ``folder/iter_NNNNNN.png`` (per view a row: render | normals). Renders draw no random numbers,
    so resuming stays exact."""
    cameras = scale_cameras(views.cameras, scale)
    images, masks = resize_views(views, cameras.image_size)
    folder = Path(folder) if folder is not None else None

    def validate(state) -> dict[str, float]:
        rendered = state.method.render(cameras)
        if folder is not None:
            import imageio.v3 as iio

            folder.mkdir(parents=True, exist_ok=True)
            iio.imwrite(folder / f"iter_{state.iteration:06d}.png", validation_image(rendered))
        metrics = image_metrics(rendered, images, masks)
        row = {"val_psnr": metrics["psnr"]}
        if "mask_iou" in metrics:
            row["val_mask_iou"] = metrics["mask_iou"]
        return row

    return Validation(every, validate)


def render_cameras(cameras: Cameras, render_rays) -> dict[str, torch.Tensor]:
    """Whole views from a ray renderer: ``render_rays(origins (N, 3), dirs (N, 3)) -> {name: (N, ...)}`` is
    called once per camera on all its pixels; returns ``{name: (B, H, W, ...)}``."""
    h, w = cameras.image_size
    outs = []
    for i in range(len(cameras)):
        o, d = cameras[i].detach().image_rays()
        outs.append(render_rays(o.reshape(-1, 3), d.reshape(-1, 3)))
    return {k: torch.stack([o[k] for o in outs]).reshape(len(cameras), h, w, *outs[0][k].shape[1:])
            for k in outs[0]}
