"""One viewer's state and its frames: camera and controls, what is shown, adaptive resolution, snapshots.

A :class:`ViewerSession` draws whatever can render itself: ``render_fn(cameras) -> {"rgb", "alpha", "depth",
"normals"}`` (a training method's ``render``, a trained field's, or a mesh's), optionally with the views it was
trained on (frustums, snapping to view i, target | render | error) and a mesh (wireframe, snapshots). It
knows nothing of training: :mod:`taichi_dr.viewer.callback` decides when a frame is drawn during training, and
:func:`taichi_dr.viewer.view_loop` runs it on its own for a finished run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from taichi_dr.core.camera import Cameras
from taichi_dr.pipelines.views import cameras_at_size
from taichi_dr.viewer.controls import KEY_BINDINGS, OrbitControls
from taichi_dr.viewer.images import (
    OUTPUTS,
    curve_image,
    display_image,
    draw_segments,
    error_image,
    frustum_segments,
    overlay_mask,
    resize_nearest,
    side_by_side,
    wireframe_segments,
)
from taichi_dr.viewer.orbit import OrbitCamera
from taichi_dr.viewer.resolution import AdaptiveResolution
from taichi_dr.viewer.window import PanelState, ViewerWindow

__all__ = ["FrameResult", "ViewerSession", "unique_path"]

# After the last input, the view counts as moving this long (coarse renders), then is refined progressively.
SETTLE_S = 0.25
FRAMING_MARGIN = 1.6
FRUSTUM_COLOUR = (1.0, 0.75, 0.2)
WIREFRAME_COLOUR = (0.3, 0.9, 1.0)


def unique_path(path: Path) -> Path:
    """``path``, or ``stem-1.suffix``, ``stem-2.suffix``, ... : the first that does not exist (snapshots never
    overwrite)."""
    path = Path(path)
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


@dataclass
class FrameResult:
    """What one frame did: rendered (the view was rendered again, not just shown), seconds spent, and the
    buttons/keys the user pressed (pause, snapshot, stop)."""

    rendered: bool
    seconds: float
    pause: bool = False
    snapshot: bool = False
    stop: bool = False


class ViewerSession:
    """What one viewer window shows, and how to draw it.

    window: a :class:`ViewerWindow` (visible or headless).
    render_fn: ``cameras (1 view) -> dict`` of ``rgb (1, H, W, 3)``, ``alpha``, ``depth``, ``normals`` (any
        subset; outputs that need a missing key say so on the panel).
    views: the training views (``TrainingViews``: cameras, target rgb/alpha) or None.
    mesh_fn: ``() -> Mesh | None``, the current surface mesh (wireframe overlay), or None.
    snapshot_fn: ``(resolution) -> Mesh | None``, the mesh a snapshot saves (fields: marching cubes).
    snapshot_dir: where snapshots go (created on the first one).
    training: the panel shows Pause and Stop.
    target_fps: frames per second while the camera moves (the render size adapts to it).
    refine_seconds: about the longest one refined (still camera) render may take; the size stops growing there.
    frames_dir: write each newly rendered frame there as a PNG (never overwriting).
    orbit: the starting camera (default: framing the training views, else OrbitCamera()).
    """

    def __init__(self, window: ViewerWindow, render_fn: Callable, views=None, mesh_fn: Callable | None = None,
                 snapshot_fn: Callable | None = None, snapshot_dir: Path | None = None, training: bool = True,
                 target_fps: float = 10.0, refine_seconds: float = 1.5, frames_dir: Path | None = None,
                 orbit: OrbitCamera | None = None):
        self.window = window
        self.render_fn = render_fn
        self.views = views
        self.mesh_fn = mesh_fn
        self.snapshot_fn = snapshot_fn or (lambda resolution: mesh_fn() if mesh_fn is not None else None)
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.frames_dir = Path(frames_dir) if frames_dir is not None else None
        self.refine_seconds = refine_seconds
        if orbit is None and views is not None:
            orbit = OrbitCamera.framing(views.cameras.detach().to(device="cpu"))
            # Back off from where the training cameras stand, so the object and the cameras around it are in view.
            orbit.zoom(FRAMING_MARGIN)
        orbit = orbit if orbit is not None else OrbitCamera()
        self.controls = OrbitControls(orbit)
        self.controls.aspect = window.view_size[0] / window.view_size[1]   # vertical pans in view heights
        self.resolution = AdaptiveResolution(window.view_size, target_fps=target_fps)
        self.panel = PanelState(num_views=len(views.cameras) if views is not None else 0, training=training,
                                help_lines=[f"{keys}: {what}" for keys, what in KEY_BINDINGS])
        self._synced_view = -1
        self._last_input = -math.inf
        self._shown: dict | None = None     # what the cached view image shows (camera key, output, ...)
        self._view_image: np.ndarray | None = None
        self._render: dict | None = None
        self.last_camera: Cameras | None = None   # the camera of the last render (for tests and snapshots)
        self.frames_written: list[Path] = []
        self._renders = 0
        self._last_render_seconds = 0.0
        self._still_size: tuple[int, int] | None = None   # the last render's size while the view was still
        self._still_final = False                           # ... and no finer one is to come
        self.stale = True                    # the scene changed since the last render (training advanced)

    # -- state

    @property
    def moving(self) -> bool:
        """The user is moving the camera (or did within SETTLE_S): render coarse."""
        return self.controls.dragging or time.monotonic() - self._last_input < SETTLE_S

    @property
    def refined(self) -> bool:
        """The last render was at the final size for a still camera."""
        return self._shown is not None and self._shown.get("refined", False)

    def camera(self, size: tuple[int, int]) -> Cameras:
        """The camera of the current view for a render of ``size`` (H, W): training view i at its own aspect,
        or the orbit camera."""
        if self.views is not None and self.panel.view_index >= 0:
            cams = self.views.cameras[self.panel.view_index:self.panel.view_index + 1].detach()
            if self.panel.compare:   # target | render | error side by side: each a third of the width
                size = (size[0], max(1, (size[1] - 4) // 3))
            return cameras_at_size(cams, self._aspect_size(size, cams.image_size))
        return self.controls.camera.cameras(size)

    @staticmethod
    def _aspect_size(size: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int]:
        # The largest size with the training view's aspect inside ``size``.
        scale = min(size[0] / image_size[0], size[1] / image_size[1])
        return max(1, round(image_size[0] * scale)), max(1, round(image_size[1] * scale))

    def _still_render_size(self) -> tuple[int, int]:
        """The size of the next render of a still view. Progressive: from the coarse size, each render doubles
        both sides until the view area is reached or the next (4x the pixels) would take longer than
        ``refine_seconds`` by the last one's time. Measuring, not modelling: a render's fixed costs (network
        set-up, kernel launches) would make a per-pixel model pick too small a size."""
        if self._still_size is None:
            return self.resolution.size(moving=True)
        if self._still_final:
            return self._still_size
        full = self.window.view_size
        return min(full[0], 2 * self._still_size[0]), min(full[1], 2 * self._still_size[1])

    # -- input

    def handle_input(self) -> set[str]:
        """Apply the input since the last frame to the camera and the panel; returns the controls' actions."""
        panel = self.panel
        self._sync_training_view()
        actions: set[str] = set()
        for event in self.window.poll():
            actions |= self.controls.handle(event)
        if actions:
            self._last_input = time.monotonic()
        for action in actions:
            if action.startswith("output:"):
                name = action.split(":", 1)[1]
                if name in OUTPUTS:
                    panel.output = OUTPUTS.index(name)
            elif action == "next_view" and panel.num_views:
                panel.view_index = (panel.view_index + 1) % panel.num_views
            elif action == "previous_view" and panel.num_views:
                panel.view_index = (panel.view_index - 1) % panel.num_views if panel.view_index >= 0 \
                    else panel.num_views - 1
            elif action == "free_view":
                panel.view_index = -1
            elif action == "compare":
                panel.compare = not panel.compare
            elif action == "overlay:frustums":
                panel.frustums = not panel.frustums
            elif action == "overlay:silhouette":
                panel.silhouette = not panel.silhouette
            elif action == "overlay:wireframe":
                panel.output = OUTPUTS.index("wireframe") if OUTPUTS[panel.output] != "wireframe" else 0
        if "camera" in actions and panel.view_index >= 0 and not actions & {"next_view", "previous_view"}:
            # The orbit camera was matched to the training view (_sync_training_view): moving it leaves the
            # view from exactly there.
            panel.view_index = -1
        self._sync_training_view()
        return actions

    def _sync_training_view(self) -> None:
        """When the shown training view changed (keys or the panel's slider), put the orbit camera at it, so
        that orbiting continues from what is on screen."""
        index = self.panel.view_index
        if index != self._synced_view and index >= 0 and self.views is not None:
            cam = self.views.cameras[index:index + 1].detach().to(device="cpu")
            self.controls.camera = OrbitCamera.matching(cam, self.controls.camera.target)
        self._synced_view = index

    # -- drawing

    def _key(self, camera: Cameras) -> dict:
        p = self.panel
        return {"K": camera.K.cpu().numpy().tobytes(), "R": camera.R.cpu().numpy().tobytes(),
                "t": camera.t.cpu().numpy().tobytes(), "size": tuple(camera.image_size), "output": p.output,
                "view": p.view_index, "compare": p.compare, "frustums": p.frustums, "silhouette": p.silhouette}

    def frame(self, lines: Sequence[str] = (), curve: Sequence[float] | None = None, iteration: int | None = None,
              force_render: bool = False, save_frame: bool = False, refine: bool = False) -> FrameResult:
        """Poll input, render again when needed (camera, output or overlays changed, the scene is ``stale``, or
        ``force_render``; a still view also one size finer each frame until refined, or at once with
        ``refine``), draw the window and (``save_frame``, or a frames folder and a new render) write the
        frame as ``frames_dir/frame_<iteration>.png``. Returns what happened and the buttons pressed."""
        start = time.perf_counter()
        actions = self.handle_input()
        moving = self.moving
        if moving:
            self._still_size, self._still_final = None, False
            size = self.resolution.size(moving=True)
        else:
            size = self._still_render_size()
        camera = self.camera(size)
        key = self._key(camera)
        need = force_render or self._view_image is None or self.stale
        if not need and self._shown is not None:
            same = {k: v for k, v in self._shown.items() if k != "refined"} == key
            # A still view is rendered again at growing sizes until refined.
            need = not same or (not moving and not self._still_final)
        while need:
            self._view_image = self._compose(camera)
            self.stale = False
            if not moving:
                full = self.window.view_size
                self._still_size = size
                # (The very first render compiles the renderer's kernels: its time says nothing of the next.)
                slow = self._renders > 1 and 4 * self._last_render_seconds > self.refine_seconds
                self._still_final = size == full or slow
            self._shown = dict(key, refined=not moving and self._still_final)
            if not refine or moving or self._still_final:
                break
            size = self._still_render_size()
            camera = self.camera(size)
            key = self._key(camera)
        self.panel.lines = list(lines)
        if curve is not None:
            ph = max(16, int(self.window.size[1] * 0.22))
            pw = max(16, self.window.size[0] - self.window.view_width - 16)
            self.panel.curve = curve_image(list(curve), (ph, pw))
        buttons = self.window.draw(self._view_image, self.panel)
        if self.frames_dir is not None and (save_frame or need):
            self.frames_dir.mkdir(parents=True, exist_ok=True)
            number = iteration if iteration is not None else len(self.frames_written)
            name = f"frame_{number:06d}.png"
            path = unique_path(self.frames_dir / name)   # a resumed run never overwrites earlier frames
            self.window.save(path)
            self.frames_written.append(path)
        self.window.present()
        return FrameResult(rendered=need, seconds=time.perf_counter() - start,
                           pause=buttons.pause or "pause" in actions,
                           snapshot=buttons.snapshot or "snapshot" in actions, stop=buttons.stop)

    def render(self, camera: Cameras) -> dict:
        """``render_fn`` at ``camera``, timed into the adaptive resolution; tensors moved to the CPU."""
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.render_fn(camera)
        seconds = time.perf_counter() - t0
        out = {k: v.detach().float().cpu() for k, v in out.items() if isinstance(v, torch.Tensor)}
        if "alpha" not in out and "mask" in out:
            out["alpha"] = out["mask"]
        if self._renders:   # the first one compiles the renderer's kernels: not a measure of its cost
            self.resolution.record(tuple(camera.image_size), seconds)
        self._renders += 1
        self._last_render_seconds = seconds
        self.last_camera = camera
        self._render = out
        return out

    def _compose(self, camera: Cameras) -> np.ndarray:
        """The view image for ``camera``: the chosen output with its overlays, or target | render | error."""
        out = self.render(camera)
        first = {k: v[0] for k, v in out.items()}
        output = OUTPUTS[self.panel.output]
        try:
            image = display_image(first, output)
        except ValueError as e:
            self.panel.lines = [*self.panel.lines, str(e)]
            image = display_image(first, "colour") if "rgb" in first else np.zeros((*camera.image_size, 3),
                                                                                    np.float32)
        if output == "wireframe" and self.mesh_fn is not None:
            mesh = self.mesh_fn()
            if mesh is not None:
                depth = first.get("depth")
                p0, p1 = wireframe_segments(mesh, camera.to(device="cpu"),
                                            depth.numpy() if depth is not None else None)
                image = draw_segments(image, p0, p1, WIREFRAME_COLOUR)
        index = self.panel.view_index
        views = self.views
        if views is not None and index >= 0:
            target_alpha = None if views.alpha is None else views.alpha[index].detach().float().cpu()
            target_rgb = None if views.rgb is None else views.rgb[index].detach().float().cpu()
            h, w = image.shape[:2]
            if (output == "silhouette" or self.panel.silhouette) and target_alpha is not None:
                image = overlay_mask(image, resize_nearest(target_alpha.numpy(), (h, w)) > 0.5)
            if self.panel.compare:
                target = target_rgb.numpy() if target_rgb is not None else (
                    np.repeat(target_alpha.numpy()[..., None], 3, -1) if target_alpha is not None else None)
                if target is not None:
                    target = resize_nearest(target, (h, w))
                    rendered = display_image(first, "colour") if target_rgb is not None else \
                        np.repeat(first["alpha"].numpy()[..., None], 3, -1)
                    image = side_by_side([target, image, error_image(rendered, target)])
        elif views is not None and self.panel.frustums:
            size = 0.1 * self.controls.camera.distance
            p0, p1 = frustum_segments(camera.to(device="cpu"), views.cameras.detach().to(device="cpu"), size)
            image = draw_segments(image, p0, p1, FRUSTUM_COLOUR)
        return np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 1.0)

    # -- snapshots

    def snapshot(self, iteration: int | None = None, resolution: int = 128) -> list[Path]:
        """Save the view (PNG of the last render at the refined size) and the current mesh (PLY) into
        ``snapshot_dir``; never overwrites. Returns the paths written."""
        from taichi_dr.core.mesh import save_mesh

        if self.snapshot_dir is None:
            return []
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{iteration:06d}" if iteration is not None else time.strftime("%Y%m%d-%H%M%S")
        written = []
        camera = self.camera(self._still_size or self.window.view_size)
        image = self._compose(camera)
        path = unique_path(self.snapshot_dir / f"view_{tag}.png")
        import imageio.v3 as iio

        iio.imwrite(path, (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
        written.append(path)
        mesh = self.snapshot_fn(resolution)
        if mesh is not None:
            path = unique_path(self.snapshot_dir / f"mesh_{tag}.ply")
            save_mesh(mesh, path)
            written.append(path)
        return written
