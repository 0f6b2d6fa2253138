"""Image losses of a pose: silhouettes (with the render's own edge profile), colours, distance transforms,
and features (:func:`feature_loss`).

A loss is ``fn(rendered: RenderOutput, target: PoseTarget, camera: Cameras) -> scalar tensor``, with the
rendered maps batched ``(1, H, W, ...)`` at the stage's resolution and the target at the same size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from taichi_dr.core.camera import Cameras
from taichi_dr.losses.silhouette import neg_iou_loss
from taichi_dr.pipelines.pose.targets import PoseTarget, _bin_levels, _signed_distance_bins
from taichi_dr.raster.renderer import RenderOutput

__all__ = ["LOSSES", "composite", "distance_transform_loss", "feature_loss", "matched_mask", "rgb_loss",
           "silhouette_iou_loss", "silhouette_mse_loss", "target_image"]


def matched_mask(rendered: RenderOutput, target: PoseTarget) -> Tensor:
    """The target mask drawn with the render's own edge profile: ``(1, H, W)``, no gradient.

    The soft silhouette is not a blurred version of the hard one: near a silhouette edge several faces
    (the front and back sheets, neighbours along the edge) each add coverage ``sigmoid(-d^2 / sigma)``, so
    ``alpha`` crosses 0.5 about ``sqrt(sigma)`` *outside* the true edge. Against a hard mask every loss then
    prefers a pose that shrinks the object (a few percent of the distance at SoftRas's sigma), and rotates
    it to match the shrunken shape. Instead, the profile ``alpha(s)`` as a function of the signed distance
    ``s`` to the render's hard silhouette (``pix_to_face >= 0``) is measured on the current render (the mean
    alpha at each distance) and applied to the target's signed distance map (linear interpolation between
    the distances the render has, the end values beyond), so at the true pose the two agree whatever sigma,
    mesh density or resolution. Falls back to the raw mask when nothing is rendered (or everything is).

    Runs on the render's device with fixed-size tensor operations (no host synchronisation; on a GPU no
    SciPy either): the signed distances are exact square roots of integers, so they are binned by their
    squared value.
    """
    mask = target._require_mask("the silhouette losses")
    target_bins = target._edge_bins
    if rendered.alpha.shape[0] != 1 or target_bins is None:
        return mask[None]
    with torch.no_grad():
        cov = rendered.pix_to_face[0] >= 0
        H, W = cov.shape
        N = (H - 1) ** 2 + (W - 1) ** 2 + 1
        n_bins = 2 * N
        bins = _signed_distance_bins(cov).reshape(-1)
        alpha = rendered.alpha[0].detach().to(torch.float64).reshape(-1)
        total = torch.zeros(n_bins, dtype=torch.float64, device=alpha.device).index_add_(0, bins, alpha)
        count = torch.zeros_like(total).index_add_(0, bins, torch.ones_like(alpha))
        present = count > 0
        profile = total / count.clamp_min(1)
        levels = _bin_levels(n_bins, N, total)
        # Fill the bins the render does not have: linear between the nearest present ones, constant beyond.
        idx = torch.arange(n_bins, device=total.device)
        below = torch.where(present, idx, torch.full_like(idx, -1)).cummax(0).values
        above = torch.where(present, idx, torch.full_like(idx, n_bins)).flip(0).cummin(0).values.flip(0)
        has_below, has_above = below >= 0, above < n_bins
        lo = torch.where(has_below, below, above).clamp(0, n_bins - 1)
        hi = torch.where(has_above, above, below).clamp(0, n_bins - 1)
        span = levels[hi] - levels[lo]
        w = torch.where(span > 0, (levels - levels[lo]) / span.clamp_min(1e-300), torch.zeros_like(span))
        filled = profile[lo] + w * (profile[hi] - profile[lo])
        soft = filled[target_bins.reshape(-1)].reshape(H, W)
        edged = cov.any() & ~cov.all()
        return torch.where(edged, soft.to(mask.dtype), mask)[None]


def silhouette_iou_loss(rendered: RenderOutput, target: PoseTarget, camera: Cameras | None = None, *,
                        match_edges: bool = True) -> Tensor:
    """``1 - soft IoU`` of the rendered silhouette and the target mask (drawn with the render's edge
    profile, :func:`matched_mask`, unless ``match_edges=False``)."""
    ref = matched_mask(rendered, target) if match_edges else target._require_mask("the IoU loss")[None]
    return neg_iou_loss(rendered.alpha, ref)


def silhouette_mse_loss(rendered: RenderOutput, target: PoseTarget, camera: Cameras | None = None, *,
                        match_edges: bool = True) -> Tensor:
    """Mean squared difference of the rendered silhouette and the target mask (drawn with the render's edge
    profile, :func:`matched_mask`, unless ``match_edges=False``)."""
    ref = matched_mask(rendered, target) if match_edges else target._require_mask("the MSE loss")[None]
    return (rendered.alpha - ref).square().mean()


def composite(rendered: RenderOutput, background=(0.0, 0.0, 0.0)) -> Tensor:
    """The rendered colours over a background: ``alpha * rgb + (1 - alpha) * background``, (B, H, W, 3).

    The aggregated ``rgb`` itself is not an image of the object: with SoftRas's small gamma a face's colour
    wins wherever its coverage is above zero, so ``rgb`` is the object dilated to the blur's cut-off; the
    silhouette ``alpha`` says how much of it is there.
    """
    if rendered.rgb is None:
        raise ValueError("the rendered rgb is needed (render with outputs including 'rgb')")
    bg = torch.as_tensor(background, dtype=rendered.rgb.dtype, device=rendered.rgb.device)
    a = rendered.alpha[..., None]
    return a * rendered.rgb + (1 - a) * bg


def target_image(rendered: RenderOutput, target: PoseTarget, match_edges: bool = True) -> Tensor:
    """``(1, H, W, 3)``: what :func:`composite` should equal at the true pose: ``target.rgb`` when the target
    has no mask, else its colours over its background with the (matched) mask."""
    if target.rgb is None:
        raise ValueError("the RGB loss needs a target with colour (an (H, W, 3) or (H, W, 4) image), but the "
                         "target is a mask")
    if target.mask is None:
        return target.rgb[None]
    m = (matched_mask(rendered, target) if match_edges else target.mask[None])[..., None]
    bg = torch.as_tensor(target.background, dtype=m.dtype, device=m.device)
    return m * target.extended_rgb[None] + (1 - m) * bg


def rgb_loss(rendered: RenderOutput, target: PoseTarget, camera: Cameras | None = None, *,
             match_edges: bool = True) -> Tensor:
    """Mean squared difference of the render composited over ``target.background`` and the target image
    (:func:`target_image`)."""
    ref = target_image(rendered, target, match_edges)
    return (composite(rendered, target.background) - ref).square().mean()


def distance_transform_loss(rendered: RenderOutput, target: PoseTarget,
                            camera: Cameras | None = None) -> Tensor:
    """Silhouette loss that attracts from far away:
    ``mean_p alpha_p D_out(p) + (1 - alpha_p) D_in(p)``.

    ``D_out`` is the distance from a pixel outside the target mask to the mask, ``D_in`` from a pixel inside
    to the background (:attr:`PoseTarget.distance_maps`, computed once per target). Rendered coverage far
    from the target costs in proportion to its distance, so even a render that does not overlap the target
    at all is pulled towards it; uncovered parts of the target cost likewise, so shrinking is no way out.
    Zero only when the binarised silhouettes agree.
    """
    outside, inside = target.distance_maps
    a = rendered.alpha
    return (a * outside[None] + (1 - a) * inside[None]).mean()


LOSSES: dict[str, Callable] = {
    "silhouette_iou": silhouette_iou_loss,
    "silhouette_mse": silhouette_mse_loss,
    "rgb": rgb_loss,
    "distance_transform": distance_transform_loss,
}


_ALIASES = {"iou": "silhouette_iou", "silhouette": "silhouette_iou", "mse": "silhouette_mse",
            "dt": "distance_transform"}


def feature_loss(extractor: Callable[[Tensor], Tensor], channel: str = "rgb") -> Callable:
    """A loss comparing images in a feature space: ``mean |phi(render) - phi(target)|^2``.

    extractor: differentiable ``(1, C, H, W) -> (1, ...)`` (e.g. a frozen CNN). channel: ``"rgb"`` (3
    channels: the render composited over ``target.background``, and the target composited likewise when
    it has a mask) or ``"alpha"`` (1 channel). The target's
    features are computed once per target resolution and cached.
    """
    if channel not in ("rgb", "alpha"):
        raise ValueError(f"feature_loss: channel must be 'rgb' or 'alpha', got {channel!r}")
    cache: dict = {}

    def reference(target: PoseTarget) -> Tensor:
        if channel == "alpha":
            return target._require_mask("feature_loss(channel='alpha')")[None, None]
        if target.rgb is None:
            raise ValueError("feature_loss(channel='rgb') needs a target with colour")
        ref = target.rgb
        if target.mask is not None:
            bg = torch.as_tensor(target.background, dtype=ref.dtype, device=ref.device)
            ref = target.mask[..., None] * ref + (1 - target.mask[..., None]) * bg
        return ref.permute(2, 0, 1)[None]

    def loss(rendered: RenderOutput, target: PoseTarget, camera: Cameras | None = None) -> Tensor:
        key = (id(target), target.image_size)
        if key not in cache:
            with torch.no_grad():
                # Keep the target alive with its features, so its id() is not reused by another object.
                cache[key] = (target, extractor(reference(target)).detach())
        feats_t = cache[key][1]
        if channel == "alpha":
            img = rendered.alpha[:, None]
        else:
            img = composite(rendered, target.background).permute(0, 3, 1, 2)
        feats = extractor(img)
        if feats.shape != feats_t.shape:
            raise ValueError(f"feature_loss: the extractor gave {tuple(feats.shape)} for the render but "
                             f"{tuple(feats_t.shape)} for the target")
        return (feats - feats_t).square().mean()

    loss.channel = channel
    return loss
