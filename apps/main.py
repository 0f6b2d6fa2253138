"""The ``tdr`` command line: render, fit-mesh, demo, reconstruct, evaluate, make-dataset, pose, mesh, view.

Installed as the console script ``tdr`` (``apps.main:app``) and runnable as ``python -m apps``. Each command
lives in its own module; this one only assembles them. Bad input gives a one-line ``Error: ...`` on stderr
and exit status 1 (``TDR_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import typer

from apps.demo import demo_command
from apps.fit_mesh import fit_mesh_command
from apps.make_dataset import make_dataset_command
from apps.mesh import mesh_command
from apps.pose import pose_command
from apps.reconstruct import evaluate_command, reconstruct_command
from apps.render import render_command
from apps.view import view_command

app = typer.Typer(
    name="tdr",
    help="taichi-dr: differentiable rendering from the command line.",
    no_args_is_help=True,
    # `tdr --install-completion` installs shell completion (bash, zsh, fish, PowerShell).
    add_completion=True,
    pretty_exceptions_show_locals=False,
)
app.command("render")(render_command)
app.command("fit-mesh")(fit_mesh_command)
app.command("demo")(demo_command)
app.command("reconstruct")(reconstruct_command)
app.command("evaluate")(evaluate_command)
app.command("make-dataset")(make_dataset_command)
app.command("pose")(pose_command)
app.command("mesh")(mesh_command)
app.command("view")(view_command)


if __name__ == "__main__":
    app(prog_name="tdr")
