"""The live training viewer (Taichi GGUI) and the viewer of finished runs.

- :mod:`~taichi_dr.viewer.orbit`, :mod:`~taichi_dr.viewer.controls`: the free camera and its mouse/key controls;
- :mod:`~taichi_dr.viewer.images`: outputs (colour, depth, normals, opacity), overlays (wireframe, silhouette,
  camera frustums), target | render | error, the loss curve;
- :mod:`~taichi_dr.viewer.resolution`: render size that keeps the window responsive;
- :mod:`~taichi_dr.viewer.window`: the GGUI window (the only module that touches GGUI);
- :mod:`~taichi_dr.viewer.session`: one viewer's state and frames;
- :mod:`~taichi_dr.viewer.callback`: :class:`ViewerCallback`, the viewer as a training-engine callback;
- :mod:`~taichi_dr.viewer.view`: finished runs (``tdr view``).

Importing this package opens nothing: a window is created by :class:`ViewerWindow` (or the callback's
``on_start``), which needs a Vulkan driver and, unless ``show_window=False``, a display.
"""

from taichi_dr.viewer.callback import ViewerCallback, ViewerSettings
from taichi_dr.viewer.controls import KEY_BINDINGS, InputEvent, OrbitControls
from taichi_dr.viewer.orbit import OrbitCamera
from taichi_dr.viewer.session import ViewerSession
from taichi_dr.viewer.view import load_view_source, view_loop
from taichi_dr.viewer.window import ViewerWindow, display_problem

__all__ = ["KEY_BINDINGS", "InputEvent", "OrbitCamera", "OrbitControls", "ViewerCallback", "ViewerSession",
           "ViewerSettings", "ViewerWindow", "display_problem", "load_view_source", "view_loop"]
