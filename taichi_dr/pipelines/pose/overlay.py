"""Pictures of a result: the hard silhouette at a pose and its outline drawn over the target."""

from __future__ import annotations

import torch
from torch import Tensor

from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import Mesh
from taichi_dr.core.transforms import Pose
from taichi_dr.raster.renderer import render_mesh
from taichi_dr.raster.settings import RasterSettings

__all__ = ["draw_overlay"]


@torch.no_grad()
def _hard_silhouette(mesh: Mesh, K: Tensor, T: Pose, image_size) -> Tensor:
    """(H, W) hard (pix_to_face) coverage of ``mesh`` at the object->camera pose ``T`` with intrinsics
    ``K (3, 3)``."""
    cam = Cameras(K, T.R, T.t, image_size, validate=False)
    out = render_mesh(mesh, cam, None, RasterSettings(mode="hard"), outputs=())
    return out.alpha[0]


def draw_overlay(image: Tensor, mask: Tensor, color=(0.0, 1.0, 0.0), width: int = 1) -> Tensor:
    """The outline of ``mask (H, W)`` (thresholded at 0.5) drawn over ``image`` ((H, W) grey or (H, W, 3))
    in ``color``, ``width`` pixels wide: ``(H, W, 3)`` float."""
    from scipy.ndimage import binary_dilation, binary_erosion

    img = image.detach().cpu().float()
    if img.dim() == 2:
        img = img[..., None].expand(-1, -1, 3)
    if img.dim() != 3 or img.shape[-1] != 3:
        raise ValueError(f"draw_overlay: image must be (H, W) or (H, W, 3), got {tuple(image.shape)}")
    if tuple(mask.shape) != tuple(img.shape[:2]):
        raise ValueError(f"draw_overlay: mask {tuple(mask.shape)} and image {tuple(img.shape[:2])} "
                         "sizes differ")
    m = mask.detach().cpu().numpy() >= 0.5
    edge = m & ~binary_erosion(m, border_value=0)
    if width > 1:
        edge = binary_dilation(edge, iterations=width - 1)
    out = img.clone()
    out[torch.from_numpy(edge)] = torch.tensor(color, dtype=out.dtype)
    return out
