"""``tdr view RUN``: look at a finished run (its mesh, or its checkpoint rendered by its own method) with the
training viewer's controls; headless, write a turntable of frames."""

from __future__ import annotations

from pathlib import Path

import typer

from apps.command import tdr_command
from apps.common import CLIError, init_runtime


def _window_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise CLIError(f"--size: expected WIDTHxHEIGHT such as 1280x720, got {text!r}") from None
    if not (64 <= w <= 8192 and 64 <= h <= 8192):
        raise CLIError(f"--size: expected 64 to 8192 pixels per side, got {text!r}")
    return w, h


@tdr_command("view", runs=False)
def view_command(
    run: Path = typer.Argument(..., help="A run folder (tdr reconstruct: its checkpoint; tdr fit-mesh: its mesh) "
                               "or a mesh file (.obj, .ply, .glb, .off)."),
    viewer_frames: Path = typer.Option(None, "--viewer-frames", help="Draw off screen and write a turntable of "
                                       "frames as PNGs into this folder (no display needed)."),
    turntable: int = typer.Option(8, help="With --viewer-frames: frames around the turntable."),
    size: str = typer.Option("1280x720", help="Window size WIDTHxHEIGHT in pixels."),
    arch: str = typer.Option(None, help="Taichi backend: auto, cpu, cuda or vulkan."),
) -> None:
    """Open a finished run in the viewer: orbit, pan and zoom, outputs, training views, snapshots.

    Example: tdr view runs/spotrec   (or: tdr view runs/spotrec --viewer-frames frames/ for PNGs, headless)
    """
    from taichi_dr.viewer import ViewerSession, ViewerWindow, display_problem, load_view_source, view_loop

    width, height = _window_size(size)
    if turntable < 1:
        raise CLIError(f"--turntable: expected at least 1 frame, got {turntable}")
    headless = viewer_frames is not None
    if viewer_frames is not None and viewer_frames.exists() and not viewer_frames.is_dir():
        raise CLIError(f"--viewer-frames {str(viewer_frames)!r} exists and is not a folder")
    problem = display_problem(show_window=not headless)
    if problem:
        raise CLIError(f"cannot open the viewer: {problem}; use --viewer-frames DIR to write frames instead")
    init_runtime(arch)
    source = load_view_source(run)
    try:
        window = ViewerWindow(f"taichi-dr: {source.description}", (width, height), show_window=not headless)
    except RuntimeError as e:
        raise CLIError(f"cannot open the viewer: {e}") from None
    snapshots = (run if run.is_dir() else run.parent) / "snapshots"
    session = ViewerSession(window, source.render_fn, views=source.views, mesh_fn=source.mesh_fn,
                            snapshot_fn=source.snapshot_fn, snapshot_dir=snapshots, training=False,
                            frames_dir=viewer_frames, orbit=source.orbit)
    try:
        written = view_loop(session, frames=turntable, lines=[source.description])
    finally:
        window.close()
    for path in written:
        typer.echo(f"Wrote {path}", err=True)
