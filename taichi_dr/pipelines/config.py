"""The engine's configuration: optimiser, learning-rate schedule, clipping (:class:`OptimizerConfig`), and
the run's length, seed, checkpoint cadence, non-finite limit and progress display (:class:`TrainConfig`).

Frozen dataclasses, validated on construction with one-line errors naming the field, round-tripping through
JSON (``to_dict``/``from_dict``: config.json and checkpoints). The schedule is a pure function of the
iteration (:func:`lr_factor`), so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["OPTIMIZERS", "PROGRESS_MODES", "SCHEDULES", "OptimizerConfig", "TrainConfig", "lr_factor"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "multistep", "exponential", "cosine")
PROGRESS_MODES = ("auto", "rich", "plain", "none")


def _fail(field_name: str, expected: str, value) -> None:
    raise ValueError(f"{field_name}: expected {expected}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser, learning-rate schedule and clipping; validated on construction.

    schedule factor at 0-based iteration i of N (see :func:`lr_factor`), with p = i / N:
      constant 1; multistep gamma ** (number of milestones m with i >= max(1, int(m * N))); exponential gamma ** p;
      cosine gamma + (1 - gamma) * (1 + cos(pi * p)) / 2; times (i + 1) / warmup while i < warmup.
    """

    name: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    schedule: str = "constant"
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    warmup: int = 0
    grad_clip: float | None = None

    def __post_init__(self):
        # Lists arrive from JSON; tuples keep the dataclass hashable and frozen in spirit.
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "milestones", tuple(self.milestones))
        p = "OptimizerConfig."
        if self.name not in OPTIMIZERS:
            _fail(p + "name", " | ".join(map(repr, OPTIMIZERS)), self.name)
        if not (_is_number(self.lr) and self.lr > 0):
            _fail(p + "lr", "a finite number > 0", self.lr)
        if len(self.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in self.betas):
            _fail(p + "betas", "two numbers in [0, 1)", self.betas)
        if not (_is_number(self.eps) and self.eps > 0):
            _fail(p + "eps", "a finite number > 0", self.eps)
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            _fail(p + "weight_decay", "a finite number >= 0", self.weight_decay)
        if not (_is_number(self.momentum) and 0 <= self.momentum < 1):
            _fail(p + "momentum", "a number in [0, 1)", self.momentum)
        if self.schedule not in SCHEDULES:
            _fail(p + "schedule", " | ".join(map(repr, SCHEDULES)), self.schedule)
        if not all(_is_number(m) and 0 < m < 1 for m in self.milestones):
            _fail(p + "milestones", "fractions of the iterations in (0, 1)", self.milestones)
        if list(self.milestones) != sorted(self.milestones):
            _fail(p + "milestones", "increasing fractions", self.milestones)
        if not (_is_number(self.gamma) and self.gamma > 0):
            _fail(p + "gamma", "a finite number > 0", self.gamma)
        if not (isinstance(self.warmup, int) and not isinstance(self.warmup, bool) and self.warmup >= 0):
            _fail(p + "warmup", "an integer >= 0", self.warmup)
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and self.grad_clip > 0):
            _fail(p + "grad_clip", "None or a finite number > 0", self.grad_clip)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"], d["milestones"] = list(self.betas), list(self.milestones)
        return d

    @staticmethod
    def from_dict(d: dict) -> OptimizerConfig:
        return OptimizerConfig(**_known_fields(OptimizerConfig, d, "OptimizerConfig"))


@dataclass(frozen=True)
class TrainConfig:
    """How long and how to train; validated on construction.

    iterations: total iterations (a resumed run may be given more than the checkpoint's run had).
    seed: seeds the engine's generator (the caller seeds torch's global RNG before building the method).
    checkpoint_every: iterations between checkpoints (0: only at the end and on interrupt); needs out_dir.
    max_nonfinite: stop after this many consecutive skipped (non-finite) steps.
    progress: "auto" (Rich bar on a terminal, plain lines otherwise) | "rich" | "plain" | "none".
    progress_every_s: plain lines at most once per this many seconds (the first and last always).
    """

    iterations: int
    seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()
    checkpoint_every: int = 100
    max_nonfinite: int = 20
    progress: str = "auto"
    progress_every_s: float = 10.0

    def __post_init__(self):
        p = "TrainConfig."
        for name, low in (("iterations", 1), ("seed", 0), ("checkpoint_every", 0), ("max_nonfinite", 1)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                _fail(p + name, f"an integer >= {low}", value)
        if isinstance(self.optimizer, dict):
            object.__setattr__(self, "optimizer", OptimizerConfig.from_dict(self.optimizer))
        if not isinstance(self.optimizer, OptimizerConfig):
            _fail(p + "optimizer", "an OptimizerConfig", self.optimizer)
        if self.progress not in PROGRESS_MODES:
            _fail(p + "progress", " | ".join(map(repr, PROGRESS_MODES)), self.progress)
        if not (_is_number(self.progress_every_s) and self.progress_every_s >= 0):
            _fail(p + "progress_every_s", "a finite number >= 0", self.progress_every_s)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["optimizer"] = self.optimizer.to_dict()
        return d

    @staticmethod
    def from_dict(d: dict) -> TrainConfig:
        return TrainConfig(**_known_fields(TrainConfig, d, "TrainConfig"))


def _known_fields(cls, d: dict, label: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{label}: expected a dict, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{label}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return dict(d)


def lr_factor(optimizer: OptimizerConfig, iteration: int, iterations: int) -> float:
    """Learning-rate multiplier for 0-based ``iteration`` of a run of ``iterations`` (formulas on
    :class:`OptimizerConfig`). Pure, so resuming needs no scheduler state."""
    progress = min(max(iteration / iterations, 0.0), 1.0)
    if optimizer.schedule == "multistep":
        # A milestone never falls on the first step (as torch's MultiStepLR, which counts from step 1).
        passed = sum(iteration >= max(1, int(m * iterations)) for m in optimizer.milestones)
        factor = optimizer.gamma ** passed
    elif optimizer.schedule == "exponential":
        factor = optimizer.gamma ** progress
    elif optimizer.schedule == "cosine":
        factor = optimizer.gamma + (1.0 - optimizer.gamma) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0
    if iteration < optimizer.warmup:
        factor *= (iteration + 1) / optimizer.warmup
    return factor
