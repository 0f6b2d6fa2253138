"""AdaptiveResolution: with render time proportional to pixels it settles on the largest size that fits the
frame budget; still frames are full size; limits and bad input."""

from __future__ import annotations

import math

import pytest

from taichi_dr.viewer.resolution import AdaptiveResolution


def run(adaptive, seconds_per_pixel, frames=6):
    sizes = []
    for _ in range(frames):
        h, w = adaptive.size(moving=True)
        adaptive.record((h, w), seconds_per_pixel * h * w)
        sizes.append((h, w))
    return sizes


def largest_fitting_height(full, budget_pixels):
    """Brute force: the tallest h (with w = round(h W / H)) whose h * w fits the budget."""
    H, W = full
    return max(h for h in range(1, H + 1) if h * round(h * W / H) <= budget_pixels)


@pytest.mark.parametrize("full,fps,spp", [((480, 640), 10.0, 1e-6), ((300, 300), 10.0, 2e-5),
                                          ((200, 500), 25.0, 3e-7),
                                          ((32, 24), 10.0, 1 / 7180)])  # 31 x 23 fits though 31 > sqrt(718 * 32 / 24)
def test_converges_to_the_size_meeting_the_frame_budget(full, fps, spp):
    adaptive = AdaptiveResolution(full, target_fps=fps)
    assert adaptive.seconds_per_pixel is None
    sizes = run(adaptive, spp)
    assert sizes[0] == (min(24, full[0]), round(min(24, full[0]) * full[1] / full[0]))  # nothing measured: smallest
    h, w = sizes[-1]
    assert sizes[-2] == sizes[-1]
    assert spp * h * w <= 1 / fps
    assert h == largest_fitting_height(full, 1 / (fps * spp))
    assert w == round(h * full[1] / full[0])
    assert adaptive.seconds_per_pixel == pytest.approx(spp)
    assert adaptive.size(moving=False) == full


def test_follows_a_change_of_cost():
    adaptive = AdaptiveResolution((400, 400))
    run(adaptive, 1e-6)
    assert adaptive.size(True) == (316, 316)
    sizes = run(adaptive, 4e-6, frames=12)  # four times slower: half the side
    assert sizes[-1] == (158, 158)


def test_limits():
    fast = AdaptiveResolution((120, 160))
    run(fast, 1e-12)
    assert fast.size(True) == (120, 160)
    slow = AdaptiveResolution((120, 160), min_height=30)
    run(slow, 1.0)
    assert slow.size(True) == (30, 40)
    free = AdaptiveResolution((50, 70))
    free.record((50, 70), 0.0)  # below the timer's resolution
    assert free.seconds_per_pixel == 0.0 and free.size(True) == (50, 70)
    tiny = AdaptiveResolution((10, 300), min_height=24)  # min_height above the view: the view
    assert tiny.size(True) == (10, 300)
    tall = AdaptiveResolution((1000, 10))
    tall.record((1000, 10), 1.0)
    h, w = tall.size(True)
    assert h >= 24 and w >= 1 and math.isfinite(h * w)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="full_size"):
        AdaptiveResolution((0, 10))
    with pytest.raises(ValueError, match="target_fps"):
        AdaptiveResolution((10, 10), target_fps=0.0)
    with pytest.raises(ValueError, match="min_height"):
        AdaptiveResolution((10, 10), min_height=0)
    adaptive = AdaptiveResolution((10, 10))
    for seconds in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="seconds"):
            adaptive.record((10, 10), seconds)
    with pytest.raises(ValueError, match="size"):
        adaptive.record((10, -1), 0.1)
