"""The live viewer as a callback of the training engine.

Training and drawing share the main thread (Taichi's kernels are not thread-safe), so the viewer draws
between steps, on a budget: with the window idle, frames are drawn only while the viewer's time stays under
``max_share`` of the wall time (5% by default, so that training loses at most 10% with what the viewer's clock
cannot see), whatever a render costs (a cheap mesh render is redrawn often, a slow field render rarely). The
viewer's time is its frames plus the aftermath: the steps just after a frame run slower than the others (the
display server presents the frame on the same cores, the render evicted training's caches), and their excess
over the median recent undisturbed step is charged to the viewer too. Between budgeted frames, training
asks the window for input every INPUT_CHECK_S, so the user is answered at once. When the user moves the camera,
the viewer keeps the thread until the camera stops (coarse renders sized for ``target_fps``, then finer ones
until refined) and training waits; while paused, it draws and training waits. Stop checkpoints exactly like
Ctrl-C (``Trainer.request_stop``). Closing the window leaves training running without it.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from taichi_dr.pipelines.callbacks import Callback, format_duration, format_rate
from taichi_dr.viewer.session import ViewerSession
from taichi_dr.viewer.window import ViewerWindow

__all__ = ["ViewerCallback", "ViewerSettings", "status_lines"]

# Most points of the loss curve drawn (the history is thinned evenly beyond this).
CURVE_POINTS = 600
# Steps after a frame whose excess over an undisturbed step is charged to the viewer, and how many recent
# undisturbed steps give that step's median duration.
AFTERMATH_STEPS = 3
UNDISTURBED_STEPS_KEPT = 31
# Between frames, how often training looks for the user's input (a look costs microseconds).
INPUT_CHECK_S = 0.05


@dataclass(frozen=True)
class ViewerSettings:
    """How the viewer runs.

    show_window: a visible window (needs a display); False draws off screen (with ``frames_dir``).
    frames_dir: write each newly rendered frame as ``frame_<iteration>.png`` (and the last one at the end).
    window_size: (W, H) pixels; the view takes the left 70%, the panel the rest.
    max_share: the most of the wall time the viewer takes while the window is idle (0 < max_share < 1): its
        frames and the slowdown of the steps right after them. 5% by default: what the viewer's clock cannot
        see at all (every step a little slower while a window is open) costs a few percent more, and the whole
        must stay under 10% (benchmarks/viewer.py).
    target_fps: frames per second while the camera moves (the render size adapts to it).
    refine_seconds: about the longest one refined render (camera still) may take.
    snapshot_dir: where Snapshot writes (default: the run folder's ``snapshots/``).
    snapshot_resolution: marching-cubes resolution of a snapshot's mesh for neural fields.
    title: the window's title.
    """

    show_window: bool = True
    frames_dir: Path | None = None
    window_size: tuple[int, int] = (1280, 720)
    max_share: float = 0.05
    target_fps: float = 10.0
    refine_seconds: float = 1.5
    snapshot_dir: Path | None = None
    snapshot_resolution: int = 128
    title: str = "taichi-dr"

    def __post_init__(self):
        if not 0.0 < self.max_share < 1.0:
            raise ValueError(f"ViewerSettings.max_share: expected a fraction in (0, 1), got {self.max_share}")
        if not self.target_fps > 0:
            raise ValueError(f"ViewerSettings.target_fps: expected > 0, got {self.target_fps}")
        if not self.show_window and self.frames_dir is None:
            raise ValueError("ViewerSettings: a window that is not shown needs frames_dir (where its frames go)")


def status_lines(state) -> list[str]:
    """The training panel's text: iteration, loss, rate, elapsed and ETA, learning rate."""
    stats = state.stats
    lines = [f"iteration {state.iteration}/{state.total}"]
    if "loss" in stats:
        lines.append(f"loss {stats['loss']:.5g}")
    rate = state.rate_it_s
    eta = format_duration((state.total - state.iteration) / rate) if rate > 0 else "?"
    lines.append(f"{format_rate(rate)} it/s   elapsed {format_duration(state.elapsed_s)}   ETA {eta}")
    if "lr" in stats:
        lines.append(f"learning rate {stats['lr']:.3g}")
    return lines


def _loss_curve(history: list[dict]) -> list[float]:
    values = [row.get("loss") for row in history]
    values = [float("nan") if v is None else float(v) for v in values]
    if len(values) > CURVE_POINTS:
        step = len(values) / CURVE_POINTS
        values = [values[int(i * step)] for i in range(CURVE_POINTS)] + [values[-1]]
    return values


class ViewerCallback(Callback):
    """Shows the live method in a GGUI window (or writes its frames) while the engine trains it.

    settings: :class:`ViewerSettings`. window: an open :class:`ViewerWindow` to use (tests); by default one
    is opened at ``on_start``.
    on_error: what ``on_start`` does when the window cannot open (no display, no Vulkan driver): "raise"
        (RuntimeError with the reason), or "warn": say so in one line on ``stream`` (stderr) and train on,
        drawing the frames off screen instead when ``frames_dir`` is set.

    The method supplies ``render(cameras)``, and optionally ``training_views()``, ``current_mesh()`` and
    ``snapshot_mesh(resolution)`` (see :class:`taichi_dr.pipelines.engine.Method`).
    """

    def __init__(self, settings: ViewerSettings = ViewerSettings(), window: ViewerWindow | None = None,
                 on_error: str = "raise", stream=None):
        if on_error not in ("raise", "warn"):
            raise ValueError(f"ViewerCallback.on_error: expected 'raise' or 'warn', got {on_error!r}")
        self.settings = settings
        self.on_error = on_error
        self.window = window
        self.session: ViewerSession | None = None
        self.stream = stream
        self.paused = False
        self.frames = 0             # frames drawn
        self.viewer_seconds = 0.0   # time spent in idle frames and their aftermath (the budgeted part)
        self.aftermath_seconds = 0.0  # the part of viewer_seconds that slowed the steps after frames
        self.train_seconds = 0.0    # time spent outside the viewer since on_start
        self.snapshots: list[Path] = []
        self.first_frame_seconds = 0.0  # on_start's frame (outside the budget: it opens the view)
        self.max_frame_seconds = 0.0   # the slowest idle frame (the budget's slack)
        self.final_camera = None       # the camera of the last render (kept after the window closes)
        self.frames_written: list[Path] = []
        self._returned = 0.0
        self._last_cost = 0.0
        self._frame_seconds = 0.0       # the last frame's time
        self._idle_frame_seconds = 0.0  # the first frame's time in the last _frame call
        self._undisturbed: deque[float] = deque(maxlen=UNDISTURBED_STEPS_KEPT)
        self._steps_since_frame = 0
        self._input_checked = 0.0

    # -- engine hooks

    def on_start(self, state) -> None:
        s = self.settings
        if self.window is None:
            self.window = self._open_window()
            if self.window is None:
                return
        method = state.method
        snapshot_dir = s.snapshot_dir or (state.out_dir / "snapshots" if state.out_dir is not None else None)
        self.session = ViewerSession(self.window, method.render, views=method.training_views(),
                                     mesh_fn=method.current_mesh, snapshot_fn=method.snapshot_mesh,
                                     snapshot_dir=snapshot_dir, training=True, target_fps=s.target_fps,
                                     refine_seconds=s.refine_seconds, frames_dir=s.frames_dir)
        t0 = time.perf_counter()
        self._frame(state, force=True)
        self.first_frame_seconds = time.perf_counter() - t0
        # The budget starts from the cost of one frame at the refined size (the opening frames compiled
        # kernels and refined step by step: charging those would keep the view frozen for a long while).
        self._last_cost = self._frame_seconds
        self._returned = time.perf_counter()

    def on_step(self, state) -> None:
        if self.session is None:
            return
        step_seconds = time.perf_counter() - self._returned
        self._charge_step(step_seconds)
        self.session.stale = True
        # Idle frames only while the viewer's share of the wall time stays under max_share; the user's input
        # is answered at once, and what they then spend (moving the camera, pausing) is theirs, not the budget's.
        share = self.settings.max_share
        if self.viewer_seconds + self._last_cost <= share / (1.0 - share) * self.train_seconds:
            self._frame(state)
            self._last_cost = self._idle_frame_seconds
            self.max_frame_seconds = max(self.max_frame_seconds, self._last_cost)
            self.viewer_seconds += self._last_cost
            self._steps_since_frame = 0
        elif time.perf_counter() - self._input_checked >= INPUT_CHECK_S:
            self._input_checked = time.perf_counter()
            if self.window.input_pending():
                self._frame(state)
                self._steps_since_frame = 0
        self._returned = time.perf_counter()

    def _charge_step(self, step_seconds: float) -> None:
        """Split one step's time between training and the viewer (the excess of a step just after a frame)."""
        self._steps_since_frame += 1
        if self._steps_since_frame > AFTERMATH_STEPS:
            self._undisturbed.append(step_seconds)
            self.train_seconds += step_seconds
            return
        excess = max(0.0, step_seconds - statistics.median(self._undisturbed)) if self._undisturbed else 0.0
        self.aftermath_seconds += excess
        self.viewer_seconds += excess
        self.train_seconds += step_seconds - excess

    def on_end(self, state, reason: str) -> None:
        if self.session is not None:
            session = self.session
            last = session.frames_written[-1].name if session.frames_written else None
            done = last == f"frame_{state.iteration:06d}.png" and session.refined and not session.stale
            if self.settings.frames_dir is not None and self.window is not None and self.window.running and not done:
                self.session.stale = True
                self.session.frame(status_lines(state), _loss_curve(state.trainer.history), state.iteration,
                                   force_render=True, save_frame=True, refine=True)
            self._detach(None)

    def _open_window(self) -> ViewerWindow | None:
        s = self.settings
        try:
            return ViewerWindow(s.title, s.window_size, show_window=s.show_window)
        except RuntimeError as e:
            if self.on_error == "raise":
                raise RuntimeError(f"viewer: {e}") from None
            problem = str(e)
        if s.show_window and s.frames_dir is not None:
            try:
                window = ViewerWindow(s.title, s.window_size, show_window=False)
                self._say(f"viewer: no window ({problem}); writing its frames to {s.frames_dir}; training goes on")
                return window
            except RuntimeError as e:
                problem = str(e)
        self._say(f"viewer: {problem}; training goes on without it")
        return None

    # -- frames

    def _frame(self, state, force: bool = False) -> None:
        """One frame; while the user moves the camera or training is paused, keep drawing (training waits)."""
        session = self.session
        drawn = 0
        while session is not None:
            if not self.window.running:
                self._detach("the viewer window was closed; training goes on without it")
                return
            lines = status_lines(state) + (["PAUSED (Space or Resume)"] if self.paused else [])
            result = session.frame(lines, _loss_curve(state.trainer.history), state.iteration, force_render=force)
            force = False
            if not drawn:    # the idle part of this call (the frames after it are the user's)
                self._idle_frame_seconds = result.seconds
            drawn += 1
            self.frames += 1
            self._frame_seconds = result.seconds
            if result.snapshot:
                self.snapshots += session.snapshot(state.iteration, self.settings.snapshot_resolution)
                self._say(f"viewer: saved {', '.join(str(p) for p in self.snapshots[-2:])}")
            if result.stop:
                self.paused = False
                state.trainer.request_stop()
                return
            if result.pause:
                self.paused = not self.paused
            if state.trainer.stop_requested:
                return       # Ctrl-C while paused or moving: let the engine save and stop
            if not (self.paused or session.moving or not session.refined):
                return
            if not result.rendered:
                time.sleep(1 / 60)

    def _say(self, message: str) -> None:
        print(message, file=self.stream or sys.stderr, flush=True)

    def _detach(self, message: str | None) -> None:
        if message:
            self._say(message)
        if self.session is not None:
            self.final_camera = self.session.last_camera
            self.frames_written = list(self.session.frames_written)
        if self.window is not None:
            self.window.close()
        self.session = None
