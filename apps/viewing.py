"""The ``--viewer`` and ``--viewer-frames`` options of the training commands: the viewer as engine callbacks."""

from __future__ import annotations

from pathlib import Path

from apps.common import CLIError


def viewer_callbacks(viewer: bool, frames: Path | None, *, title: str) -> list:
    """Engine callbacks for ``--viewer`` (a live window) and ``--viewer-frames DIR`` (its frames as PNGs,
    drawn off screen unless ``--viewer`` too).

    [] when neither is asked for. Without a display or a Vulkan driver, ``--viewer`` says so in one line on
    stderr when training starts and training goes on without it (with ``--viewer-frames``, the frames are
    still written, off screen).
    """
    if not viewer and frames is None:
        return []
    if frames is not None and Path(frames).exists() and not Path(frames).is_dir():
        raise CLIError(f"--viewer-frames {str(frames)!r} exists and is not a folder")
    from taichi_dr.viewer import ViewerCallback, ViewerSettings

    settings = ViewerSettings(show_window=bool(viewer), frames_dir=Path(frames) if frames is not None else None,
                              title=f"taichi-dr: {title}")
    return [ViewerCallback(settings, on_error="warn")]
