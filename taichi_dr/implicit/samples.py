"""Samples along rays, packed ray after ray (no padding to the longest ray), as the rasterizer packs faces
into bins.

:class:`RaySamples` is what the samplers (:mod:`taichi_dr.implicit.sampling`) produce and what compositing
(:mod:`taichi_dr.implicit.compositing`) consumes. Ray ``r`` owns samples ``offsets[r] : offsets[r + 1]``, in
increasing ``t``; a ray may own none (it then composites to zero colour and opacity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RaySamples", "offsets_from_counts"]


def offsets_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """``(R,)`` non-negative sample counts -> ``(R + 1,)`` int32 offsets (``offsets[0] = 0``, exclusive scan)."""
    offsets = torch.zeros(counts.shape[0] + 1, dtype=torch.int32, device=counts.device)
    if counts.numel():
        offsets[1:] = torch.cumsum(counts.to(torch.int64), 0).to(torch.int32)
    return offsets


@dataclass
class RaySamples:
    """Packed samples of ``R`` rays, ``S`` samples in all.

    t: (S,) ray parameter of each sample (distance along its unit-direction ray), increasing within a ray.
    delta: (S,) length of ray each sample stands for: the distance to the next sample of the same ray, and
        for a ray's last sample the distance to that ray's far bound (NeRF's δ_i; density compositing uses
        it, occupancy compositing does not).
    ray_index: (S,) int32, the ray each sample belongs to.
    offsets: (R + 1,) int32, ray ``r``'s samples are ``offsets[r] : offsets[r + 1]``.

    All four live on the same device; ``t`` and ``delta`` share the rays' float dtype.
    """

    t: torch.Tensor
    delta: torch.Tensor
    ray_index: torch.Tensor
    offsets: torch.Tensor

    @property
    def n_rays(self) -> int:
        return int(self.offsets.shape[0]) - 1

    @property
    def n_samples(self) -> int:
        return int(self.t.shape[0])

    @property
    def counts(self) -> torch.Tensor:
        """(R,) int32 samples per ray."""
        return self.offsets[1:] - self.offsets[:-1]

    def points(self, origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        """Sample positions ``(S, 3)`` on rays ``origins, dirs (R, 3)`` (differentiable in the rays)."""
        idx = self.ray_index.long()
        return origins[idx] + self.t[:, None] * dirs[idx]

    def directions(self, dirs: torch.Tensor) -> torch.Tensor:
        """The ray direction of every sample, ``(S, 3)``."""
        return dirs[self.ray_index.long()]
