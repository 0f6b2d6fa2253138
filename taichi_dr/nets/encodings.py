"""Input encodings: components that lift coordinates or directions into features for the fields and
rendering networks: the frequency encoding (NeRF, IDR) here, the multiresolution hash grid (instant-ngp) in
:mod:`taichi_dr.nets.hash_grid`.

An encoding is an ``nn.Module`` with ``in_dim`` and ``out_dim`` attributes and ``forward(x (M, in_dim)) ->
(M, out_dim)``. ``includes_input`` says whether the output starts with the raw input, which IDR's geometric
initialisation of an SDF network relies on. ``supports_double_backward`` (default True) says whether a
gradient taken with ``create_graph=True`` through it can itself be differentiated; the hash grid's hand-written
backward cannot, so networks on it take the spatial gradients that losses train (eikonal, normals) by finite
differences (:class:`taichi_dr.nets.fields.GeometryNetwork`).

:class:`EncodingSettings` is how the pipelines' configs choose one: :func:`position_encoding` builds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ENCODINGS", "EncodingSettings", "FrequencyEncoding", "PositionalEncoding", "position_encoding"]

ENCODINGS = ("frequency", "hashgrid")


class FrequencyEncoding(nn.Module):
    """``[x, sin(2^0 x), cos(2^0 x), ..., sin(2^(L-1) x), cos(2^(L-1) x)]`` (NeRF / IDR).

    ``(M, d) -> (M, d * (1 + 2 L))``; the raw input comes first (``includes_input``). ``L = 0`` is the identity.
    """

    includes_input = True
    supports_double_backward = True

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


@dataclass(frozen=True)
class EncodingSettings:
    """Which encoding of positions a field network uses, and the hash grid's sizes.

    kind: "frequency" (the method's own ``*frequencies`` setting applies) or "hashgrid".
    n_levels, features_per_level, log2_table_size, base_resolution, finest_resolution: the hash grid's
        (instant-ngp's defaults: 16 levels x 2 features, 2^19 entries per level, resolutions 16 to 2048 over
        the bounding cube).
    table_lr: the learning rate of the hash tables (instant-ngp: 1e-2; the networks keep the method's ``lr``).
    """

    kind: str = "frequency"
    n_levels: int = 16
    features_per_level: int = 2
    log2_table_size: int = 19
    base_resolution: int = 16
    finest_resolution: int = 2048
    table_lr: float = 1e-2

    def __post_init__(self):
        if self.kind not in ENCODINGS:
            raise ValueError(f"EncodingSettings.kind: expected one of {', '.join(ENCODINGS)}, got {self.kind!r}")
        for name in ("n_levels", "features_per_level", "log2_table_size", "base_resolution", "finest_resolution"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EncodingSettings.{name}: expected an int >= 1, got {value!r}")
        if self.log2_table_size > 26:
            raise ValueError(f"EncodingSettings.log2_table_size: expected at most 26 (64M entries per level), got "
                             f"{self.log2_table_size}")
        if self.finest_resolution < self.base_resolution:
            raise ValueError(f"EncodingSettings.finest_resolution: expected >= base_resolution "
                             f"({self.base_resolution}), got {self.finest_resolution}")
        if not (isinstance(self.table_lr, (int, float)) and math.isfinite(self.table_lr) and self.table_lr > 0):
            raise ValueError(f"EncodingSettings.table_lr: expected > 0, got {self.table_lr!r}")

    @property
    def network_shape(self) -> tuple:
        """The settings the weights' shapes depend on (a run resumes only with the same; table_lr may change)."""
        if self.kind == "frequency":
            return (self.kind,)
        return (self.kind, self.n_levels, self.features_per_level, self.log2_table_size, self.base_resolution,
                self.finest_resolution)


def position_encoding(settings: EncodingSettings, n_frequencies: int, bound: float) -> nn.Module:
    """The encoding of 3-D positions ``settings`` asks for: ``FrequencyEncoding(3, n_frequencies)``, or a
    hash grid over the cube ``[-bound, bound]^3`` (the region the method renders; outside it the grid's
    features are those of the nearest point of the cube). Both start with the raw coordinates."""
    if settings.kind == "frequency":
        return FrequencyEncoding(3, n_frequencies)
    from taichi_dr.nets.hash_grid import HashGridEncoding

    return HashGridEncoding(n_levels=settings.n_levels, features_per_level=settings.features_per_level,
                            log2_table_size=settings.log2_table_size, base_resolution=settings.base_resolution,
                            finest_resolution=settings.finest_resolution, bound=bound)
