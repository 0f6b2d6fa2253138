"""Settings of the soft rasterizer (see docs/design.md for the exact formulas)."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RasterSettings:
    """How faces become pixels.

    sigma: sharpness of the coverage D = sigmoid(±d²/sigma), in SoftRas's NDC units (the longer image side
        spans 2), so SoftRas's values carry over: 1e-4 is crisp, 1e-2 blurry.
    gamma: temperature of the softmax over normalised inverse depth (smaller = harder z-buffer).
    eps: background weight offset (SoftRas's epsilon).
    dist_eps: coverage cut-off; a face skips pixels where D < dist_eps (SoftRas: 1e-4).
    near, far: depth range; faces are clipped at `near` and pixels outside [near, far] ignored.
    mode: "soft" (SoftRas aggregation) or "hard" (binary coverage, nearest face).
    cull_backfaces: skip faces whose outward normal points away from the camera.
    background: value of the image where no face covers (a float, or one per channel).
    tile_size: pixels per side of a screen tile (speed only; forward results do not depend on it, gradients
        only to rounding). None picks one per call, see `tile_for`.
    deterministic: sum gradients in a fixed order, so that a backward pass is bitwise reproducible, from run
        to run and whatever the number of threads. The tile size is part of that order: `tile_for` picks it
        from the batch, the image size and the machine's core count, so set tile_size for the same bits on
        machines with different core counts. None (default): on the CPU yes, on GPUs no (there the fixed
        order costs per-tile buffers and a second pass). The forward is always deterministic. Not available
        with a texture on Vulkan.
    """

    sigma: float = 1e-4
    gamma: float = 1e-4
    eps: float = 1e-3
    dist_eps: float = 1e-4
    near: float = 0.1
    far: float = 100.0
    mode: str = "soft"
    cull_backfaces: bool = False
    background: float | tuple[float, ...] = 0.0
    tile_size: int | None = None
    deterministic: bool | None = None

    def __post_init__(self):
        checks = [
            # Smaller ones would be float32 denormals, which fast math may flush to zero (then divide by it).
            (self.sigma >= 1e-30, "sigma must be >= 1e-30"),
            (self.gamma >= 1e-30, "gamma must be >= 1e-30"),
            (0 < self.dist_eps < 0.5, "dist_eps must be in (0, 0.5)"),
            (0 < self.near < self.far, "need 0 < near < far"),
            (self.mode in ("soft", "hard"), "mode must be 'soft' or 'hard'"),
            (self.tile_size is None or (isinstance(self.tile_size, int) and 2 <= self.tile_size <= 64),
             "tile_size must be None or an int in [2, 64]"),
            (self.deterministic is None or isinstance(self.deterministic, bool),
             "deterministic must be None, True or False"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"RasterSettings: {msg} (got {self})")
        if not all(math.isfinite(x) for x in (self.sigma, self.gamma, self.eps, self.near, self.far)):
            raise ValueError(f"RasterSettings: values must be finite (got {self})")

    def sigma_px(self, image_size: tuple[int, int]) -> float:
        """sigma in pixels²: NDC units scaled so the longer image side spans 2."""
        half = max(image_size) / 2.0
        return self.sigma * half * half

    def cutoff_d2_px(self, image_size: tuple[int, int]) -> float:
        """Squared pixel distance beyond which an outside pixel's coverage is below dist_eps."""
        return self.sigma_px(image_size) * math.log(1.0 / self.dist_eps - 1.0)

    def tile_for(self, batch: int, image_size: tuple[int, int], arch: str) -> int:
        """The tile side for a call: `tile_size` if set. Otherwise, on the CPU, the largest of 32, 16 and 8
        that still gives each thread 16 tiles to balance the load (measured on 2 cores: 32 is fastest for
        B1-B3, since a thread reads each face once per tile), and 8 on GPUs, which run one thread per tile
        and need thousands of them."""
        if self.tile_size is not None:
            return self.tile_size
        if arch != "cpu":
            return 8
        threads = os.cpu_count() or 1
        H, W = image_size
        for ts in (32, 16):
            if batch * -(-H // ts) * -(-W // ts) >= 16 * threads:
                return ts
        return 8

    def deterministic_on(self, arch: str) -> bool:
        """Whether gradients are summed in a fixed order on `arch` (see `deterministic`)."""
        return (arch == "cpu") if self.deterministic is None else bool(self.deterministic)

    def background_values(self, channels: int) -> list[float]:
        """The background as ``channels`` floats (see :func:`background_values`)."""
        return background_values(self.background, channels)


def background_values(background, channels: int) -> list[float]:
    """The one parser of a background setting: a float (every channel), one value, or one per channel ->
    ``channels`` floats. ValueError naming ``RasterSettings.background`` otherwise."""
    if isinstance(background, numbers.Real) and not isinstance(background, bool):  # numpy scalars too
        return [float(background)] * channels
    try:
        if isinstance(background, (str, bytes)):
            raise TypeError
        values = [float(b) for b in background]
    except (TypeError, ValueError):
        raise ValueError(f"RasterSettings.background: expected a float or a tuple of floats, "
                         f"got {background!r}") from None
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"RasterSettings.background has {len(values)} values but the image has {channels} "
                         "channels")
    return values
