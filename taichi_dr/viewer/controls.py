"""Mouse and key input -> orbit camera motion and viewer actions, independent of any window.

The window turns its input into :class:`InputEvent` s (cursor in fractions of the view area, x right, y down);
:class:`OrbitControls` moves its :class:`~taichi_dr.viewer.orbit.OrbitCamera` and says what else was asked
for as action names (see :meth:`OrbitControls.handle`). :data:`KEY_BINDINGS` is the table the panel and the
README show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from taichi_dr.viewer.images import OUTPUTS
from taichi_dr.viewer.orbit import OrbitCamera

__all__ = ["InputEvent", "KEY_BINDINGS", "OrbitControls"]

MOUSE_BUTTONS = ("LMB", "RMB", "MMB")
# A middle-button drag over the full view height zooms as much as this many W/S presses.
ZOOM_STEPS_PER_HEIGHT = 10.0

KEY_BINDINGS: tuple[tuple[str, str], ...] = (
    ("left drag", "orbit"),
    ("right drag, Shift + left drag", "pan"),
    ("middle drag (up / down)", "zoom in / out"),
    ("W / S, Up / Down", "zoom in / out"),
    ("A / D, Left / Right", "orbit left / right"),
    ("Q / E", "orbit down / up"),
    ("R", "reset the view"),
    ("Space", "pause / resume training"),
    ("P", "snapshot (PNG of the view + mesh)"),
    ("1-6", "show " + ", ".join(OUTPUTS)),
    ("F", "training camera frustums on / off"),
    ("C", "compare: target | render | error"),
    ("[ / ]", "previous / next training view"),
    ("Escape", "back to the free view"),
)

# key -> action for the keys that do not move the camera
_KEY_ACTIONS = {
    " ": "pause",
    "p": "snapshot",
    "f": "overlay:frustums",
    "c": "compare",
    "[": "previous_view",
    "]": "next_view",
    "Escape": "free_view",
    **{str(i + 1): f"output:{name}" for i, name in enumerate(OUTPUTS)},
}


@dataclass(frozen=True)
class InputEvent:
    """One input event. kind: "press" | "release" | "move". key: GGUI's name ("LMB", "RMB", "MMB", lower-case
    letters, "Shift", "Escape", " ", "Left", "Right", "Up", "Down", "Tab", "[", "]", digits); empty for moves.
    x, y: the cursor in fractions of the view area, x right, y down."""

    kind: str
    key: str = ""
    x: float = 0.0
    y: float = 0.0


class OrbitControls:
    """Drives ``camera`` from :class:`InputEvent` s.

    left drag: orbit, ``rotate_degrees_per_width`` degrees per view width (and per view height vertically;
    dragging right turns the scene right, dragging down tilts its front down); right drag or Shift + left
    drag: pan (the scene follows the cursor); middle drag: zoom (down = out). Keys: W/S or Up/Down zoom by
    ``zoom_step``, A/D or Left/Right orbit by ``key_degrees`` in azimuth, Q/E in elevation, R resets to
    ``home`` (a copy of the camera at construction). ``aspect`` (the view's H / W; the window sets it) scales
    vertical pans.
    """

    def __init__(self, camera: OrbitCamera, rotate_degrees_per_width: float = 180.0, key_degrees: float = 10.0,
                 zoom_step: float = 1.15):
        if not isinstance(camera, OrbitCamera):
            raise TypeError(f"OrbitControls: camera must be an OrbitCamera, got {type(camera).__name__}")
        for name, value in (("rotate_degrees_per_width", rotate_degrees_per_width), ("key_degrees", key_degrees)):
            if not math.isfinite(float(value)):
                raise ValueError(f"OrbitControls: {name} must be finite, got {value}")
        if not (math.isfinite(float(zoom_step)) and zoom_step > 1):
            raise ValueError(f"OrbitControls: zoom_step must be a finite number > 1, got {zoom_step}")
        self.camera = camera
        self.home = camera.copy()
        self.rotate_degrees_per_width = float(rotate_degrees_per_width)
        self.key_degrees = float(key_degrees)
        self.zoom_step = float(zoom_step)
        self.aspect = 1.0
        self._held: set[str] = set()          # mouse buttons and Shift currently down
        self._cursor: tuple[float, float] | None = None

    @property
    def dragging(self) -> bool:
        """A mouse button is held (the view is moving: render coarse)."""
        return any(b in self._held for b in MOUSE_BUTTONS)

    def handle(self, event: InputEvent) -> set[str]:
        """Apply one event; returns the actions it asked for: "camera" (the view changed), "pause", "snapshot",
        "next_view", "previous_view", "free_view", "output:<name>" (name in OUTPUTS, keys 1-6),
        "overlay:frustums", "compare". (Stop is a panel button, not a key; "overlay:silhouette" and
        "overlay:wireframe" are the panel's, no key gives them.)"""
        key = event.key.lower() if len(event.key) == 1 else event.key
        if event.kind == "move":
            return self._move(event.x, event.y)
        if event.kind == "release":
            self._held.discard(key)
            return set()
        if event.kind != "press":
            raise ValueError(f"InputEvent.kind must be 'press', 'release' or 'move', got {event.kind!r}")
        if key in MOUSE_BUTTONS or key == "Shift":
            self._held.add(key)
            if key in MOUSE_BUTTONS:
                self._cursor = (event.x, event.y)
            return set()
        return self._press(key)

    # -- internals --------------------------------------------------------------------------------------

    def _move(self, x: float, y: float) -> set[str]:
        previous, self._cursor = self._cursor, (x, y)
        if previous is None or not self.dragging:
            return set()
        dx, dy = x - previous[0], y - previous[1]
        if not (math.isfinite(dx) and math.isfinite(dy)) or (dx == 0 and dy == 0):
            return set()
        cam = self.camera
        if "RMB" in self._held or ("LMB" in self._held and "Shift" in self._held):
            cam.pan(dx, dy, aspect=self.aspect)
        elif "LMB" in self._held:
            cam.orbit(dx * self.rotate_degrees_per_width, dy * self.rotate_degrees_per_width)
        else:  # MMB
            cam.zoom(self.zoom_step ** (dy * ZOOM_STEPS_PER_HEIGHT))
        return {"camera"}

    def _press(self, key: str) -> set[str]:
        cam = self.camera
        if key in ("w", "Up"):
            cam.zoom(1.0 / self.zoom_step)
        elif key in ("s", "Down"):
            cam.zoom(self.zoom_step)
        elif key in ("a", "Left"):
            cam.orbit(self.key_degrees, 0.0)     # the eye moves to its left: the scene turns right
        elif key in ("d", "Right"):
            cam.orbit(-self.key_degrees, 0.0)
        elif key == "q":
            cam.orbit(0.0, -self.key_degrees)
        elif key == "e":
            cam.orbit(0.0, self.key_degrees)
        elif key == "r":
            cam.set_from(self.home.copy())
        else:
            action = _KEY_ACTIONS.get(key)
            return {action} if action else set()
        return {"camera"}
