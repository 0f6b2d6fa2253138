"""The GGUI window of the viewer: the view image on the left, a panel of widgets on the right.

Only this module touches Taichi's GGUI (``ti.ui``). It draws what it is given (an (H, W, 3) image for the
view, the panel's text, a curve image) and turns GGUI's input into :class:`~taichi_dr.viewer.controls.InputEvent`
and button presses; what to render and when is :mod:`taichi_dr.viewer.session`'s business.

GGUI needs a Vulkan driver (Mesa's software one will do) and, for a visible window, a display (X11, Wayland
or Xvfb). Headless (``show_window=False``) the window cannot take input, and frames are written with
``save_image`` (``show()`` would crash without a display).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from taichi_dr.viewer.controls import InputEvent
from taichi_dr.viewer.images import OUTPUTS, resize_nearest

__all__ = ["PanelActions", "PanelState", "ViewerWindow", "display_problem"]

# GGUI's mouse buttons and the keys the controls use; other keys are passed on as GGUI names them.
_MOUSE = ("LMB", "RMB", "MMB")
BACKGROUND = (0.12, 0.12, 0.14)


def display_problem(show_window: bool) -> str | None:
    """Why a viewer window cannot open here (one line), or None when it can be tried.

    A visible window needs a display: $DISPLAY (X11, Xvfb) or $WAYLAND_DISPLAY. Whether Vulkan works is only
    known by opening the window (:class:`ViewerWindow` raises RuntimeError with the reason).
    """
    if show_window and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display ($DISPLAY and $WAYLAND_DISPLAY are unset)"
    return None


@dataclass
class PanelState:
    """What the panel shows and lets the user change (the session owns it; the window edits it)."""

    lines: list[str] = field(default_factory=list)     # status text (iteration, loss, rate, ...)
    curve: np.ndarray | None = None                      # (h, w, 3) loss curve image, drawn under the widgets
    output: int = 0                                      # index into OUTPUTS
    view_index: int = -1                                 # -1: free view; else training view i
    num_views: int = 0
    compare: bool = False                                # target | render | error of the training view
    frustums: bool = True
    silhouette: bool = False
    training: bool = True                                # show Pause / Stop (not in `tdr view`)
    paused: bool = False
    help_lines: list[str] = field(default_factory=list)


@dataclass
class PanelActions:
    """Buttons pressed in this frame."""

    pause: bool = False
    snapshot: bool = False
    stop: bool = False


class ViewerWindow:
    """A GGUI window of ``size`` (W, H) pixels: view on the left, panel (``panel_width`` of W) on the right.

    show_window: False draws off screen (frames saved with :meth:`save`; no input).
    Raises RuntimeError (one line) when GGUI cannot open (no Vulkan driver, no display).
    """

    def __init__(self, title: str = "taichi-dr", size: tuple[int, int] = (1280, 720), show_window: bool = True,
                 panel_width: float = 0.3):
        import taichi as ti

        from taichi_dr.core import runtime

        width, height = int(size[0]), int(size[1])
        if width < 64 or height < 64:
            raise ValueError(f"ViewerWindow.size: expected at least 64 x 64 pixels, got {size}")
        problem = display_problem(show_window)
        if problem:
            raise RuntimeError(problem)
        runtime.ensure_init()
        self._ti = ti
        try:
            with runtime.kernel_lock():
                self._window = ti.ui.Window(title, (width, height), show_window=show_window, vsync=False)
        except Exception as e:  # GGUI raises RuntimeError or its own types, with multi-line texts
            reason = " ".join(str(e).split()) or type(e).__name__
            raise RuntimeError(f"GGUI could not open a window ({reason}); a Vulkan driver is needed, e.g. "
                               "apt-get install mesa-vulkan-drivers libvulkan1") from None
        self._canvas = self._window.get_canvas()
        self.size = (width, height)
        self.show_window = show_window
        self.panel_width = panel_width
        self.view_width = int(round(width * (1.0 - panel_width)))
        self._held: set[tuple[str, str]] = set()   # (controls' name, GGUI's name) of held keys
        self._pending: list[InputEvent] = []       # events read by input_pending(), for the next poll()
        self._cursor = (0.0, 0.0)
        self._closed = False

    # -- geometry

    @property
    def view_size(self) -> tuple[int, int]:
        """(H, W) of the view area in pixels."""
        return self.size[1], self.view_width

    @property
    def running(self) -> bool:
        """False once the user closed the window (headless windows run until closed)."""
        if self._closed:
            return False
        return bool(self._window.running) if self.show_window else True

    # -- input

    def poll(self) -> list[InputEvent]:
        """The input since the last frame as InputEvents (cursor in fractions of the view area, y down).

        Headless windows have no input: []. Mouse motion is reported as one "move" event per frame while the
        cursor moved (GGUI gives positions, not motion events)."""
        if not self.show_window or self._closed:
            return []
        events, self._pending = self._pending, []
        return events + self._read_input()

    def input_pending(self) -> bool:
        """Whether the user pressed a key or button (or closed the window) since the last frame. Cheap (no
        drawing): training asks between frames, so the viewer answers the user at once rather than at its next
        budgeted frame. The events are kept for the next :meth:`poll`."""
        if not self.show_window or self._closed:
            return False
        if not self.running:
            return True
        events = self._read_input()
        self._pending += events
        return any(e.kind == "press" for e in events)

    def _read_input(self) -> list[InputEvent]:
        ti, win = self._ti, self._window
        x, y_up = win.get_cursor_pos()
        # GGUI's cursor is in fractions of the whole window with y up; the controls want the view area, y down.
        cursor = (float(x) * self.size[0] / self.view_width, 1.0 - float(y_up))
        events = []
        # GGUI's events carry only a key, so presses come from the press queue and releases from is_pressed()
        # turning false for a key held since an earlier frame.
        for e in win.get_events(ti.ui.PRESS):
            key = str(e.key)
            if key in _MOUSE and cursor[0] > 1.0:
                continue  # a click on the panel belongs to its widgets, not to the camera
            key = key.lower() if len(key) == 1 else key
            events.append(InputEvent("press", key, *cursor))
            self._held.add((key, str(e.key)))
        for key, name in sorted(self._held):
            if not win.is_pressed(name):
                events.append(InputEvent("release", key, *cursor))
                self._held.discard((key, name))
        if cursor != self._cursor:
            events.append(InputEvent("move", "", *cursor))
            self._cursor = cursor
        return events

    # -- drawing

    def draw(self, view: np.ndarray, panel: PanelState) -> PanelActions:
        """Show ``view`` ((H', W', 3) float in [0, 1], fitted into the view area keeping its aspect) and the
        panel; returns the buttons pressed. Edits ``panel`` (output, view index, toggles) from the widgets."""
        canvas = np.empty((self.size[1], self.size[0], 3), np.float32)
        canvas[:] = BACKGROUND
        y0, x0, fitted = self.fit_view(view)
        canvas[y0:y0 + fitted.shape[0], x0:x0 + fitted.shape[1]] = fitted
        if panel.curve is not None:
            h, w = panel.curve.shape[:2]
            top = self.size[1] - h - 8
            left = self.view_width + 8
            if top > 0 and left + w <= self.size[0]:
                canvas[top:top + h, left:left + w] = panel.curve
        self._set_image(canvas)
        actions = self._widgets(panel)
        return actions

    def _set_image(self, canvas: np.ndarray) -> None:
        """Show an (H, W, 3) float image. GGUI's images are x-major with y up, one RGBA8 word per pixel: packing
        them here (rounded, as save_image reads them back) costs a third of what canvas.set_image's own
        float conversion does (12 vs 34 ms at 1280 x 720 on 2 CPU cores), which matters within the 10% budget."""
        rgba = np.empty((*canvas.shape[:2], 4), np.uint8)
        rgba[..., :3] = np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5
        rgba[..., 3] = 255
        packed = np.ascontiguousarray(rgba.view(np.uint32)[::-1, :, 0].T)   # (W, H), y up
        try:
            from taichi.ui.canvas import get_field_info

            self._canvas.canvas.set_image(get_field_info(packed))
        except (ImportError, AttributeError):   # another Taichi than the 1.7 this was measured on: public path
            self._canvas.set_image(np.ascontiguousarray(canvas[::-1].transpose(1, 0, 2)))

    def fit_view(self, view: np.ndarray) -> tuple[int, int, np.ndarray]:
        """Where ``view`` goes in the view area: (top, left, the image resized by nearest neighbour to fit)."""
        view = np.asarray(view, np.float32)
        vh, vw = self.view_size
        h, w = view.shape[:2]
        scale = min(vh / max(h, 1), vw / max(w, 1))
        size = (max(1, min(vh, int(h * scale))), max(1, min(vw, int(w * scale))))
        fitted = resize_nearest(view, size) if size != (h, w) else view
        return (vh - size[0]) // 2, (vw - size[1]) // 2, fitted

    def _widgets(self, panel: PanelState) -> PanelActions:
        actions = PanelActions()
        gui = self._window.get_gui()
        x = 1.0 - self.panel_width
        with gui.sub_window("taichi-dr", x, 0.0, self.panel_width, 0.74) as w:
            for line in panel.lines:
                w.text(line)
            if panel.training:
                actions.pause = w.button("Resume" if panel.paused else "Pause")
            actions.snapshot = w.button("Snapshot (PNG + mesh)")
            if panel.training:
                actions.stop = w.button("Stop (checkpoint)")
            panel.output = w.slider_int(f"output: {OUTPUTS[panel.output]}", panel.output, 0, len(OUTPUTS) - 1)
            if panel.num_views:
                label = "free view" if panel.view_index < 0 else f"training view {panel.view_index}"
                panel.view_index = w.slider_int(label, panel.view_index, -1, panel.num_views - 1)
                panel.compare = w.checkbox("target | render | error", panel.compare)
                panel.silhouette = w.checkbox("target silhouette", panel.silhouette)
                panel.frustums = w.checkbox("camera frustums", panel.frustums)
            for line in panel.help_lines:
                w.text(line)
        return actions

    def present(self) -> None:
        """Put the frame on screen (a visible window; headless windows only keep it for :meth:`save`)."""
        if self.show_window and not self._closed:
            self._window.show()

    def save(self, path) -> None:
        """Write the current frame (view and panel) as a PNG."""
        self._window.save_image(str(path))

    def __enter__(self) -> ViewerWindow:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Destroy the window. Close every window you open, before opening the next: GGUI holds one window at a
        time, and a window left to the garbage collector after another was destroyed can crash the process."""
        if not self._closed:
            self._closed = True
            try:
                self._window.destroy()
            except Exception:  # already gone with the display
                pass
