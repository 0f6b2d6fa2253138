"""What a render is compared with: :class:`PoseTarget` (mask and/or colours) and its distance transforms."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PoseTarget", "signed_distance", "squared_distance_transform"]


@dataclass(frozen=True, eq=False)
class PoseTarget:
    """What the render is compared with.

    mask: (H, W) float in [0, 1] (the object's silhouette), or None.
    rgb:  (H, W, 3) float in [0, 1] (straight, not premultiplied, colours where there is a mask), or None.
    background: the colour the image has where the object is not. The RGB loss and fields compare the
          render composited over it (:func:`composite`) with ``rgb`` as it is when there is no mask, and with
          the target's colours composited over it with the matched mask (:func:`matched_mask`) when there is
          one, so a photo with clutter needs a mask.
    """

    mask: Tensor | None
    rgb: Tensor | None
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self):
        try:
            bg = tuple(float(b) for b in self.background)
        except (TypeError, ValueError):
            bg = ()
        if len(bg) != 3 or not all(math.isfinite(b) for b in bg):
            raise ValueError(f"PoseTarget.background: expected 3 finite numbers, got {self.background!r}")
        object.__setattr__(self, "background", bg)
        if self.mask is None and self.rgb is None:
            raise ValueError("PoseTarget: give a mask, an rgb image, or both")
        for name, x, nd in (("mask", self.mask, 2), ("rgb", self.rgb, 3)):
            if x is None:
                continue
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise TypeError(f"PoseTarget.{name}: expected a float tensor")
            if x.dim() != nd or (nd == 3 and x.shape[-1] != 3):
                want = "(H, W)" if nd == 2 else "(H, W, 3)"
                raise ValueError(f"PoseTarget.{name}: expected shape {want}, got {tuple(x.shape)}")
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"PoseTarget.{name}: contains NaN or Inf")
        if self.mask is not None and self.rgb is not None and self.mask.shape != self.rgb.shape[:2]:
            raise ValueError(f"PoseTarget: mask {tuple(self.mask.shape)} and rgb {tuple(self.rgb.shape)} "
                             "sizes differ")

    @staticmethod
    def from_image(image, name: str = "target") -> PoseTarget:
        """A target from an image: ``(H, W)`` or ``(H, W, 1)`` is a mask, ``(H, W, 3)`` an RGB image without
        mask, ``(H, W, 4)`` RGB + alpha (the silhouette). uint8 is divided by 255; floats must lie in
        [0, 1]. Tensors or arrays; float64 arrays stay float64, anything else becomes float32."""
        if isinstance(image, PoseTarget):
            return image
        if isinstance(image, Tensor):
            x = image.detach()
        else:
            arr = np.asarray(image)
            if arr.dtype.kind not in "uif":
                raise TypeError(f"{name}: expected an image of numbers, got dtype {arr.dtype}")
            x = torch.from_numpy(np.ascontiguousarray(arr))
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif not x.is_floating_point():
            raise TypeError(f"{name}: expected uint8 or float pixels, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: contains NaN or Inf")
        if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
            raise ValueError(f"{name}: float pixels must lie in [0, 1], got [{float(x.min()):.3g}, "
                             f"{float(x.max()):.3g}]")
        if x.dim() == 3 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.dim() == 2:
            return PoseTarget(mask=x, rgb=None)
        if x.dim() == 3 and x.shape[-1] == 3:
            return PoseTarget(mask=None, rgb=x)
        if x.dim() == 3 and x.shape[-1] == 4:
            return PoseTarget(mask=x[..., 3].contiguous(), rgb=x[..., :3].contiguous())
        raise ValueError(f"{name}: expected an image shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got "
                         f"{tuple(x.shape)}")

    @property
    def image_size(self) -> tuple[int, int]:
        x = self.mask if self.mask is not None else self.rgb
        return int(x.shape[0]), int(x.shape[1])

    def to(self, device=None, dtype=None) -> PoseTarget:
        def mv(x):
            return None if x is None else x.to(device=device, dtype=dtype)

        return PoseTarget(mv(self.mask), mv(self.rgb), self.background)

    def resized(self, image_size: tuple[int, int]) -> PoseTarget:
        """Area-averaged to ``(H, W)`` (the same as rendering at that size for an exact factor)."""
        if tuple(image_size) == self.image_size:
            return self

        def down(x, chans_last):
            x = x[None, None] if not chans_last else x.permute(2, 0, 1)[None]
            y = F.interpolate(x, size=tuple(image_size), mode="area")
            return y[0, 0] if not chans_last else y[0].permute(1, 2, 0).contiguous()

        return PoseTarget(None if self.mask is None else down(self.mask, False),
                          None if self.rgb is None else down(self.rgb, True), self.background)

    @cached_property
    def distance_maps(self) -> tuple[Tensor, Tensor]:
        """``(outside, inside)`` (H, W), computed once: the distance from each pixel outside the (binarised)
        mask to the mask, and from each pixel inside to the background; 0 elsewhere. In units of the longer
        image side, so losses do not depend on the resolution."""
        from scipy.ndimage import distance_transform_edt

        m = self._require_mask("the distance-transform loss")
        binary = (m.detach().cpu().numpy() >= 0.5)
        if not binary.any():
            raise ValueError("target mask: empty after thresholding at 0.5; the distance-transform loss "
                             "needs an object in the target")
        scale = 1.0 / max(binary.shape)
        outside = distance_transform_edt(~binary) * scale  # distance to the nearest mask pixel
        inside = distance_transform_edt(binary) * scale  # distance to the nearest background pixel
        return (torch.from_numpy(outside).to(device=m.device, dtype=m.dtype),
                torch.from_numpy(inside).to(device=m.device, dtype=m.dtype))

    @cached_property
    def _edge_bins(self) -> Tensor | None:
        """(H, W) int64 on the mask's device: each pixel's signed distance to the edge of the binarised mask
        as a bin of :func:`_signed_distance_bins` (computed once); None for a mask without an edge."""
        m = self._require_mask("the silhouette losses").detach() >= 0.5
        if not bool(m.any()) or bool(m.all()):
            return None
        return _signed_distance_bins(m)

    @cached_property
    def signed_distance(self) -> np.ndarray:
        """(H, W) float64 numpy: pixel-unit signed distance to the edge of the mask binarised at 0.5
        (> 0 outside, < 0 inside; see :func:`signed_distance`), computed once."""
        m = self._require_mask("the silhouette losses").detach().cpu().numpy() >= 0.5
        return signed_distance(m)

    @cached_property
    def extended_rgb(self) -> Tensor:
        """(H, W, 3): ``rgb`` with every pixel outside the mask given the colour of the nearest pixel inside,
        so the object's colour is defined wherever a soft edge reaches (computed once)."""
        from scipy.ndimage import distance_transform_edt

        m = self._require_mask("extended_rgb").detach().cpu().numpy() >= 0.5
        if self.rgb is None:
            raise ValueError("extended_rgb: the target has no colour")
        if not m.any() or m.all():
            return self.rgb
        _, (iy, ix) = distance_transform_edt(~m, return_indices=True)
        idx = torch.from_numpy(iy * m.shape[1] + ix).to(self.rgb.device).reshape(-1)
        return self.rgb.reshape(-1, 3)[idx].reshape(self.rgb.shape)

    def _require_mask(self, what: str) -> Tensor:
        if self.mask is None:
            raise ValueError(f"{what} needs a target mask (a (H, W) mask or an RGBA image), but the target "
                             "has only RGB")
        return self.mask


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed distance (pixels) from each pixel centre to the edge of a binary mask ``(H, W)``: > 0 outside,
    < 0 inside, +-0.5 next to the edge (the edge lies half-way between pixel centres). An empty or full mask
    has no edge: +inf / -inf everywhere."""
    from scipy.ndimage import distance_transform_edt

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, np.inf)
    if mask.all():
        return np.full(mask.shape, -np.inf)
    return np.where(mask, 0.5 - distance_transform_edt(mask), distance_transform_edt(~mask) - 0.5)


def squared_distance_transform(mask: Tensor) -> Tensor:
    """Exact squared Euclidean distance transform, on the mask's device: for each True pixel of ``mask (H, W)``
    bool, the squared distance in pixels (integer-valued float64) to the nearest False pixel; 0 at False
    pixels; inf everywhere when there is no False pixel.

    CPU tensors go to SciPy (``distance_transform_edt``, linear time, and the array is shared, not copied);
    tensors on a GPU stay there (:func:`_squared_edt_torch`), so a training step never waits for a copy.
    """
    if mask.device.type != "cpu":
        return _squared_edt_torch(mask)
    from scipy.ndimage import distance_transform_edt

    m = mask.numpy()
    if m.all():
        return torch.full(m.shape, math.inf, dtype=torch.float64)
    return torch.from_numpy(np.square(distance_transform_edt(m)).round())


def _squared_edt_torch(mask: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """:func:`squared_distance_transform` with torch operations of fixed sizes (no host synchronisation).

    Separable and exact: the distance along each row by running maxima/minima of the False pixels' columns,
    then ``D(i, j) = min_k g(k, j)^2 + (i - k)^2`` over the rows, in chunks of columns: ``H^2 W`` work, cheap
    on a GPU at the image sizes of pose refinement but far slower than SciPy's linear-time transform on a
    CPU (hence SciPy there).
    """
    H, W = mask.shape
    opts = dict(dtype=torch.float64, device=mask.device)
    cols = torch.arange(W, **opts)
    free = ~mask
    last = torch.where(free, cols, torch.full_like(cols, -math.inf)).cummax(dim=1).values
    following = torch.where(free, cols, torch.full_like(cols, math.inf)).flip(1).cummin(dim=1).values.flip(1)
    g2 = torch.minimum(cols - last, following - cols).square()  # inf in rows without a False pixel
    rows = torch.arange(H, **opts)
    row_d2 = (rows[:, None] - rows[None, :]).square()  # (H, H)
    out = torch.empty(H, W, **opts)
    step = max(1, chunk_elements // max(H * H, 1))
    for c0 in range(0, W, step):
        out[:, c0:c0 + step] = (g2[None, :, c0:c0 + step] + row_d2[:, :, None]).amin(dim=1)
    return out


def _signed_distance_bins(mask: Tensor) -> Tensor:
    """(H, W) int64: the signed distance of :func:`signed_distance` (``0.5 - sqrt(n)`` inside, ``sqrt(n) - 0.5``
    outside, n >= 1 the squared distance to the nearest pixel of the other side) as a bin index that
    increases with it: ``N - n`` inside, ``N - 1 + n`` outside, ``N = (H - 1)^2 + (W - 1)^2 + 1`` (so
    indices lie in ``[1, 2N - 2]``). A mask without an edge gives clamped, meaningless bins."""
    H, W = mask.shape
    N = (H - 1) ** 2 + (W - 1) ** 2 + 1
    n_in = squared_distance_transform(mask)
    n_out = squared_distance_transform(~mask)
    n = torch.where(mask, n_in, n_out).nan_to_num(posinf=N - 1).clamp(1, N - 1).round().long()
    return torch.where(mask, N - n, N - 1 + n)


def _bin_levels(n_bins: int, N: int, like: Tensor) -> Tensor:
    """The signed distance (float64) each bin of :func:`_signed_distance_bins` stands for."""
    b = torch.arange(n_bins, dtype=torch.float64, device=like.device)
    return torch.where(b < N, 0.5 - (N - b).clamp_min(0).sqrt(), (b - N + 1).clamp_min(0).sqrt() - 0.5)
