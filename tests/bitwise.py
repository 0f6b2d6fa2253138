"""One comparison for "resumed equals uninterrupted": nested states identical bit for bit."""

from __future__ import annotations

import math

import torch


def assert_bitwise(a, b, what: str = "state") -> None:
    """Nested dicts/lists/tuples of tensors and numbers are identical, bit for bit (NaN equals NaN)."""
    assert type(a) is type(b), f"{what}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{what}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_bitwise(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{what}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{what}: {a.dtype} {tuple(a.shape)} != {b.dtype} {tuple(b.shape)}"
        if not torch.equal(a, b):
            if a.is_floating_point():
                raise AssertionError(f"{what}: max difference {float((a.double() - b.double()).abs().max()):.3g}")
            raise AssertionError(f"{what}: tensors differ")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{what}: nan != {b!r}"
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def run_state(path) -> dict:
    """What must match between an uninterrupted and a resumed run: the run folder's checkpoint without
    timings (method state, optimiser, RNG, history rows, non-finite counter)."""
    ckpt = torch.load(path / "checkpoint.pt", weights_only=True)
    history = [{k: v for k, v in row.items() if k != "time_s"} for row in ckpt["history"]]
    return dict(iteration=ckpt["iteration"], method_state=ckpt["method_state"], optimizer=ckpt["optimizer"],
                rng=ckpt["rng"], history=history, nonfinite=ckpt["nonfinite"])
