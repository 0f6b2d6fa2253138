"""Callbacks of the training engine: progress display, metrics log, validation.

A callback receives the live :class:`~taichi_dr.pipelines.engine.TrainState` (``state.method`` included, so
it can render the current model from any camera). The engine calls, in the order the callbacks were given
(built-in ProgressCallback and MetricsLog last):

- ``on_start(state)`` once per fit() (``state.iteration`` > 0 on resume),
- ``on_step(state)`` after every step (``state.stats``: that step's floats; ``state.row``: its metrics row,
  which a callback may extend),
- ``on_checkpoint(state, path)`` after each checkpoint is written,
- ``on_end(state, reason)`` with reason "done" | "interrupted" | "nonfinite" | "error".
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from taichi_dr.pipelines.checkpoint import write_atomic

if TYPE_CHECKING:  # the engine imports this module; annotations only
    from taichi_dr.pipelines.engine import TrainState

__all__ = ["Callback", "MetricsLog", "ProgressCallback", "Validation", "format_duration", "format_rate"]

METRICS_NAME = "metrics.jsonl"


class Callback:
    """Base class: override the hooks you need (all default to doing nothing)."""

    def on_start(self, state: TrainState) -> None:
        pass

    def on_step(self, state: TrainState) -> None:
        pass

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        pass

    def on_end(self, state: TrainState, reason: str) -> None:
        pass


def format_duration(seconds: float) -> str:
    """Compact duration: "45s", "2m21s", "1h03m" ("?" for an unknown or absurd one)."""
    if not math.isfinite(seconds) or seconds < 0 or seconds > 1e8:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_rate(rate: float) -> str:
    """Iterations per second with sensible digits: "1234", "12.5", "0.25"."""
    if rate >= 100:
        return f"{rate:.0f}"
    if rate >= 1:
        return f"{rate:.1f}"
    return f"{rate:.2g}"


def _format_value(value) -> str:
    if value is None:
        return "nan"  # rows hold None where the step's value was NaN/Inf
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressCallback(Callback):
    """Progress: a Rich bar on a terminal, plain periodic lines otherwise.

    mode: "auto" (Rich when ``stream`` is a TTY, plain otherwise) | "rich" | "plain" | "none".
    every_s: plain lines at most once per this many seconds; the first step of a fit() and the last line are
        always printed, so a redirected log (batch job, nohup) shows the run started, went on and ended.
    stream: where to write (default: sys.stderr at on_start, so stdout stays free for results).
    keys: row entries shown after the loss when present (default: psnr, iou).

    A plain line: ``iter 250/2000  loss 0.1234  psnr 21.3  12.5 it/s  ETA 2m21s`` (``skipped N`` added once
    steps were skipped).
    """

    def __init__(self, mode: str = "auto", every_s: float = 10.0, stream: IO[str] | None = None,
                 keys: Sequence[str] = ("psnr", "iou")):
        if mode not in ("auto", "rich", "plain", "none"):
            raise ValueError(f"ProgressCallback.mode: expected 'auto' | 'rich' | 'plain' | 'none', got {mode!r}")
        self.mode = mode
        self.every_s = every_s
        self.stream = stream
        self.keys = tuple(keys)
        self._active = "none"
        self._bar = None
        self._task = None
        self._last_print = -math.inf
        self._last_printed_iteration = -1

    def describe(self, state: TrainState) -> str:
        """The values part of a line: loss, the chosen keys, skipped steps."""
        parts = []
        for key in ("loss", *self.keys):
            if key in state.row:
                parts.append(f"{key} {_format_value(state.row[key])}")
        if state.skipped_total:
            parts.append(f"skipped {state.skipped_total}")
        return "  ".join(parts)

    def line(self, state: TrainState) -> str:
        remaining = state.total - state.iteration
        eta = format_duration(remaining / state.rate_it_s) if state.rate_it_s > 0 else "?"
        values = self.describe(state)
        return (f"iter {state.iteration}/{state.total}  " + (values + "  " if values else "")
                + f"{format_rate(state.rate_it_s)} it/s  ETA {eta}")

    def on_start(self, state: TrainState) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        self._stream = stream
        mode = self.mode
        if mode == "auto":
            mode = "rich" if getattr(stream, "isatty", lambda: False)() else "plain"
        self._active = mode
        self._last_print = -math.inf
        self._last_printed_iteration = -1
        if mode == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                 console=Console(file=stream), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("training", total=state.total, completed=state.iteration, rate="")

    def _print(self, state: TrainState) -> None:
        print(self.line(state), file=self._stream, flush=True)
        self._last_print = time.monotonic()
        self._last_printed_iteration = state.iteration

    def on_step(self, state: TrainState) -> None:
        if self._active == "rich":
            self._bar.update(self._task, completed=state.iteration, description=self.describe(state) or "training",
                             rate=f"{format_rate(state.rate_it_s)} it/s")
        elif self._active == "plain":
            first = state.iteration == state.start_iteration + 1
            if first or state.iteration == state.total or time.monotonic() - self._last_print >= self.every_s:
                self._print(state)

    def on_end(self, state: TrainState, reason: str) -> None:
        if self._active == "rich" and self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self._active == "plain" and self._last_printed_iteration != state.iteration and state.row:
            self._print(state)
        self._active = "none"


def _json_row(row: dict) -> str:
    return json.dumps(row, allow_nan=False, default=float)


class MetricsLog(Callback):
    """Append one JSON object per iteration to ``out_dir/metrics.jsonl`` (``{"iteration": i, **stats,
    "time_s": t}``; NaN/Inf written as null, so every line is strict JSON).

    Each row is written at the next step (after every callback of its own step had the chance to add to it,
    Validation's metrics included). The file is flushed at least every ``flush_every_s`` seconds and fsynced
    at each checkpoint and at the end, so a ``kill -9`` loses only the last few seconds of rows, and none up
    to the last checkpoint. On resume, rows after the checkpoint's iteration are dropped (the resumed run
    writes them again), so the file reads as one uninterrupted run.

    path: the file (default out_dir/metrics.jsonl; inactive without out_dir).
    """

    def __init__(self, path=None, flush_every_s: float = 2.0):
        self.path = Path(path) if path is not None else None
        self.flush_every_s = flush_every_s
        self._file = None
        self._pending: dict | None = None
        self._last_flush = 0.0

    def on_start(self, state: TrainState) -> None:
        path = self.path or (state.out_dir / METRICS_NAME if state.out_dir is not None else None)
        self._target = path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = self._rows_up_to(path, state.iteration) if state.iteration > 0 else []
        text = "".join(line + "\n" for line in kept)
        write_atomic(path, lambda f: f.write(text.encode()))
        self._file = open(path, "a", encoding="utf-8")
        self._pending = None
        self._last_flush = time.monotonic()

    @staticmethod
    def _rows_up_to(path: Path, iteration: int) -> list[str]:
        """Lines of ``path`` whose iteration is <= ``iteration``; a torn last line (kill -9) is dropped."""
        if not path.is_file():
            return []
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("iteration"), int) and row["iteration"] <= iteration:
                kept.append(line)
        return kept

    def _write_pending(self) -> None:
        if self._pending is not None:
            self._file.write(_json_row(self._pending) + "\n")
            self._pending = None

    def flush(self, sync: bool = False) -> None:
        """Write the pending row and flush to the OS (``sync``: also to the disk)."""
        if self._file is None:
            return
        self._write_pending()
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())
        self._last_flush = time.monotonic()

    def on_step(self, state: TrainState) -> None:
        if self._file is None:
            return
        self._write_pending()
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()
        self._pending = state.row

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        self.flush(sync=True)

    def on_end(self, state: TrainState, reason: str) -> None:
        if self._file is not None:
            self.flush(sync=True)
            self._file.close()
            self._file = None


class Validation(Callback):
    """Every ``every`` iterations, ``fn(state) -> {name: float | 0-dim Tensor}`` (run without autograd) and
    merge the metrics into the iteration's row (metrics.jsonl, history) and ``state.stats``.

    ``fn`` typically renders ``state.method`` from held-out cameras and compares with the images. If it draws
    random numbers, it draws them at the same iterations in a resumed run, so resuming stays exact.
    """

    def __init__(self, every: int, fn: Callable[[TrainState], dict[str, Any]]):
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"Validation.every: expected an integer >= 1, got {every!r}")
        self.every = every
        self.fn = fn

    def on_step(self, state: TrainState) -> None:
        if state.iteration % self.every:
            return
        with torch.no_grad():
            metrics = self.fn(state) or {}
        values = {}
        for key, value in metrics.items():
            if key in ("iteration", "time_s"):
                raise ValueError(f"Validation: metric name {key!r} is reserved for the metrics row")
            value = float(value.item()) if isinstance(value, torch.Tensor) else float(value)
            values[key] = value
        state.stats.update(values)
        state.row.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
