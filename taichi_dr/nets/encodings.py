"""Input encodings: components that lift coordinates or directions into features for the fields and
rendering networks (frequency encoding today; a hash grid will implement the same small interface).

An encoding is an ``nn.Module`` with ``in_dim`` and ``out_dim`` attributes and ``forward(x (M, in_dim)) ->
(M, out_dim)``. ``includes_input`` says whether the output starts with the raw input, which IDR's geometric
initialisation of an SDF network relies on.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FrequencyEncoding", "PositionalEncoding"]


class FrequencyEncoding(nn.Module):
    """``[x, sin(2^0 x), cos(2^0 x), ..., sin(2^(L-1) x), cos(2^(L-1) x)]`` (NeRF / IDR).

    ``(M, d) -> (M, d * (1 + 2 L))``; the raw input comes first (``includes_input``). ``L = 0`` is the identity.
    """

    includes_input = True

    def __init__(self, in_dim: int = 3, n_frequencies: int = 6):
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"FrequencyEncoding: in_dim must be >= 1, got {in_dim}")
        if n_frequencies < 0:
            raise ValueError(f"FrequencyEncoding: n_frequencies must be >= 0, got {n_frequencies}")
        self.in_dim = in_dim
        self.n_frequencies = n_frequencies
        freqs = 2.0 ** torch.arange(n_frequencies, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)

    @property
    def out_dim(self) -> int:
        return self.in_dim * (1 + 2 * self.n_frequencies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_frequencies == 0:
            return x
        xf = x[..., None, :] * self.freqs.to(x.dtype)[:, None]           # (M, L, d)
        enc = torch.stack([torch.sin(xf), torch.cos(xf)], dim=-2)         # (M, L, 2, d)
        return torch.cat([x, enc.flatten(-3)], dim=-1)


# The name before encodings became components (IDR's "positional encoding").
PositionalEncoding = FrequencyEncoding


def check_encoding(encoding: nn.Module, in_dim: int, owner: str) -> nn.Module:
    """Raise a one-line error unless ``encoding`` is an encoding (see the module docstring) of ``in_dim``
    inputs; returns it."""
    if not isinstance(encoding, nn.Module) or not all(hasattr(encoding, a) for a in ("in_dim", "out_dim")):
        raise TypeError(f"{owner}: encoding must be an nn.Module with in_dim and out_dim (e.g. FrequencyEncoding), "
                        f"got {type(encoding).__name__}")
    if encoding.in_dim != in_dim:
        raise ValueError(f"{owner}: encoding takes {encoding.in_dim}-d inputs, expected {in_dim}-d")
    return encoding
