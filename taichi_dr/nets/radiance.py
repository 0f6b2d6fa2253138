"""NeRF's radiance field (Mildenhall et al. 2020): a density MLP on an encoding of position and a colour MLP
on its features and an encoding of the view direction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from taichi_dr.nets.encodings import FrequencyEncoding, check_encoding

__all__ = ["RadianceField"]


class RadianceField(nn.Module):
    """``forward(x (M, 3), d (M, 3)) -> (density (M,), rgb (M, 3))``.

    Trunk: ``depth`` x ``width`` ReLU layers on ``encoding(x)`` (default ``FrequencyEncoding(3, 10)``), the
    encoded input concatenated again into the layers in ``skip_in`` (NeRF: 8 x 256, skip into layer 5 of 8,
    i.e. ``skip_in=(4,)`` counting from 0). Density: a linear head on the trunk, then softplus (NeRF uses ReLU;
    softplus keeps a gradient where the density is zero, so short CPU runs cannot get stuck with a dead,
    empty field). Colour: the trunk's features through a linear layer, concatenated with
    ``view_encoding(d)`` (default ``FrequencyEncoding(3, 4)``), one ReLU layer of ``colour_width`` (NeRF: 128)
    and a sigmoid.
    """

    def __init__(self, depth: int = 8, width: int = 256, skip_in: Sequence[int] = (4,), n_frequencies: int = 10,
                 view_frequencies: int = 4, colour_width: int = 128, *, encoding: nn.Module | None = None,
                 view_encoding: nn.Module | None = None):
        super().__init__()
        if depth < 1 or width < 1 or colour_width < 1:
            raise ValueError(f"RadianceField: need depth, width and colour_width >= 1, got {depth}, {width}, "
                             f"{colour_width}")
        if any(not 0 < s < depth for s in skip_in):
            raise ValueError(f"RadianceField: skip_in layers must lie in 1..{depth - 1}, got {tuple(skip_in)}")
        self.encoding = check_encoding(encoding or FrequencyEncoding(3, n_frequencies), 3, "RadianceField")
        self.view_encoding = check_encoding(view_encoding or FrequencyEncoding(3, view_frequencies), 3,
                                            "RadianceField")
        d_in = self.encoding.out_dim
        self.skip_in = tuple(skip_in)
        self.trunk = nn.ModuleList(
            nn.Linear(d_in if i == 0 else width + (d_in if i in self.skip_in else 0), width) for i in range(depth))
        self.density_head = nn.Linear(width, 1)
        self.feature = nn.Linear(width, width)
        self.colour_hidden = nn.Linear(width + self.view_encoding.out_dim, colour_width)
        self.colour_out = nn.Linear(colour_width, 3)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        inp = self.encoding(x)
        h = inp
        for i, lin in enumerate(self.trunk):
            if i in self.skip_in:
                h = torch.cat([h, inp], dim=-1)
            h = torch.relu(lin(h))
        return h

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, 3) -> (M,)`` non-negative."""
        return F.softplus(self.density_head(self._trunk(x))[:, 0])

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._trunk(x)
        density = F.softplus(self.density_head(h)[:, 0])
        c = torch.relu(self.colour_hidden(torch.cat([self.feature(h), self.view_encoding(d)], dim=-1)))
        return density, torch.sigmoid(self.colour_out(c))

    def normals(self, x: torch.Tensor) -> torch.Tensor:
        """Unit outward normals ``(M, 3)``: the direction of ``-∇density`` (no graph kept)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.density(x).sum(), x)
        n = -g
        return n / n.norm(dim=-1, keepdim=True).clamp(min=1e-8)
