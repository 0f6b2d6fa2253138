"""How large the viewer may render while the camera moves, from the time renders took.

Render time is modelled as proportional to the pixel count: ``seconds = seconds_per_pixel * H * W``. Each
:meth:`AdaptiveResolution.record` updates the estimate (an exponential moving average of the measured
seconds per pixel); :meth:`AdaptiveResolution.size` picks the largest size of the full view's aspect that the
estimate says fits the frame budget ``1 / target_fps``.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["AdaptiveResolution"]

# Weight of the newest measurement in the seconds-per-pixel average: follows a change (another output, the
# training moving on) within a few frames while smoothing timer noise.
SMOOTHING = 0.5


def _size(size, name: str) -> tuple[int, int]:
    try:
        h, w = size
        ok = all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected (H, W), two positive ints, got {size!r}")
    return int(h), int(w)


class AdaptiveResolution:
    """Chooses render sizes ``(H, W)`` that keep a moving view at ``target_fps``.

    full_size: the view's (H, W). min_height: moving renders are never shorter than this (nor than
    full_size). seconds_per_pixel: the current estimate, None before the first :meth:`record`.
    """

    def __init__(self, full_size: tuple[int, int], target_fps: float = 10.0, min_height: int = 24):
        self.full_size = _size(full_size, "AdaptiveResolution: full_size")
        target_fps = float(target_fps)
        if not math.isfinite(target_fps) or target_fps <= 0:
            raise ValueError(f"AdaptiveResolution: target_fps must be finite and > 0, got {target_fps}")
        if not isinstance(min_height, int) or min_height < 1:
            raise ValueError(f"AdaptiveResolution: min_height must be an int >= 1, got {min_height!r}")
        self.target_fps = target_fps
        self.min_height = min_height
        self.seconds_per_pixel: float | None = None

    def size(self, moving: bool) -> tuple[int, int]:
        """Still: ``full_size``. Moving: the largest (h, w) with w / h = W / H (w rounded) whose predicted time
        is <= 1 / target_fps, h within [min(min_height, H), H]; before any measurement, the smallest such
        size (a cheap first frame to measure)."""
        full_h, full_w = self.full_size
        if not moving:
            return self.full_size
        low = min(self.min_height, full_h)
        spp = self.seconds_per_pixel
        if spp is None:
            h = low
        elif spp <= 0:
            h = full_h
        else:
            budget_pixels = 1.0 / (self.target_fps * spp)
            # h * (h W / H) <= budget  <=>  h <= sqrt(budget H / W); w is rounded, so check the neighbours.
            h = int(min(math.floor(math.sqrt(budget_pixels * full_h / full_w)), full_h))
            while h < full_h and (h + 1) * self._width(h + 1) <= budget_pixels:
                h += 1
            while h > low and h * self._width(h) > budget_pixels:
                h -= 1
            h = max(h, low)
        return h, self._width(h)

    def _width(self, h: int) -> int:
        full_h, full_w = self.full_size
        return max(1, min(full_w, round(h * full_w / full_h)))

    def record(self, size: tuple[int, int], seconds: float) -> None:
        """A render of ``size`` (H, W) took ``seconds`` (finite, >= 0): update seconds_per_pixel."""
        h, w = _size(size, "AdaptiveResolution.record: size")
        seconds = float(seconds)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"AdaptiveResolution.record: seconds must be finite and >= 0, got {seconds}")
        measured = seconds / (h * w)
        if self.seconds_per_pixel is None:
            self.seconds_per_pixel = measured
        else:
            self.seconds_per_pixel += SMOOTHING * (measured - self.seconds_per_pixel)
