"""The objective of a pose refinement: how a ``loss=`` argument (a name, a callable, a ``{loss: weight}``
mapping, or a field) becomes what every step evaluates."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from taichi_dr.pipelines.pose.fields import DisplacementField, PixelGradientField
from taichi_dr.pipelines.pose.losses import _ALIASES, LOSSES
from taichi_dr.pipelines.pose.targets import PoseTarget

__all__ = ["describe_loss", "resolve_loss"]


def _resolve_loss(loss) -> tuple[str, Callable | PixelGradientField | DisplacementField, bool]:
    """-> (kind, what, needs_rgb). kind: 'loss' or 'field'."""
    if isinstance(loss, (PixelGradientField, DisplacementField)):
        return "field", loss, "rgb" in loss.channels
    if isinstance(loss, str):
        return "loss", _named_loss(loss), loss in ("rgb",)
    if callable(loss):
        return "loss", loss, getattr(loss, "channel", "rgb") == "rgb"
    if isinstance(loss, Mapping):
        if not loss:
            raise ValueError("loss: an empty mapping; give at least one {name or callable: weight}")
        terms = []
        needs_rgb = False
        for key, w in loss.items():
            if isinstance(key, str):
                fn = _named_loss(key)
                needs_rgb |= _ALIASES.get(key, key) == "rgb"
            elif callable(key):
                fn = key
                needs_rgb |= getattr(key, "channel", "rgb") == "rgb"
            else:
                raise TypeError(f"loss: mapping keys must be loss names or callables, got {key!r}")
            try:
                w = float(w)
            except (TypeError, ValueError):
                raise TypeError(f"loss: weight of {key!r} must be a number, got {w!r}") from None
            if not math.isfinite(w):
                raise ValueError(f"loss: weight of {key!r} must be finite, got {w}")
            terms.append((fn, w))

        def combined(rendered, target, camera):
            return sum(w * fn(rendered, target, camera) for fn, w in terms)

        return "loss", combined, needs_rgb
    raise TypeError(f"loss: expected a name ({', '.join(LOSSES)}), a callable, a {{loss: weight}} mapping, a "
                    f"PixelGradientField or a DisplacementField, got {type(loss).__name__}")


def _check_target(loss, target: PoseTarget) -> None:
    """Fail before any rendering when a named loss needs what the target lacks."""
    names = [loss] if isinstance(loss, str) else [k for k in loss if isinstance(k, str)] \
        if isinstance(loss, Mapping) else []
    for name in names:
        key = _ALIASES.get(name, name)
        if key in ("silhouette_iou", "silhouette_mse", "distance_transform") and target.mask is None:
            raise ValueError(f"loss {name!r} needs a target mask (an (H, W) mask or an RGBA image), but the "
                             "target has only RGB")
        if key == "rgb" and target.rgb is None:
            raise ValueError(f"loss {name!r} needs a target with colour (an (H, W, 3) or (H, W, 4) image), "
                             "but the target is a mask")


def _named_loss(name: str) -> Callable:
    key = _ALIASES.get(name, name)
    if key not in LOSSES:
        raise ValueError(f"loss: unknown loss {name!r}; choose from {sorted(LOSSES)} (or pass a callable)")
    return LOSSES[key]


resolve_loss = _resolve_loss


def describe_loss(loss) -> str:
    """A JSON-able description of a ``loss=`` argument (config.json; a resume must use the same)."""
    if isinstance(loss, str):
        return _ALIASES.get(loss, loss)
    if isinstance(loss, (PixelGradientField, DisplacementField)):
        extra = f", conversion={loss.conversion}" if isinstance(loss, DisplacementField) else ""
        return f"{type(loss).__name__}({loss.name}, channels={list(loss.channels)}{extra})"
    if isinstance(loss, Mapping):
        return "{" + ", ".join(f"{describe_loss(k)}: {float(w)!r}" for k, w in loss.items()) + "}"
    return f"callable {getattr(loss, '__qualname__', type(loss).__name__)}"
