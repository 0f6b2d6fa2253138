"""The package's parts depend on each other one way only (docs/design.md, "Layout"): checked on the source's
import statements, including imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "taichi_dr"

# part -> the parts it may import (besides itself and the top-level taichi_dr package)
ALLOWED = {
    "core": set(),
    "raster": {"core"},
    "implicit": {"core"},
    "nets": {"core"},
    "losses": {"core"},
    "data": {"core"},
    "pipelines": {"core", "raster", "implicit", "nets", "losses", "data"},
    # the viewer draws what methods render; nothing below it knows a window
    "viewer": {"core", "raster", "implicit", "nets", "losses", "data", "pipelines"},
}
ENGINE = ("engine.py", "config.py", "checkpoint.py", "callbacks.py")


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import (the package uses absolute imports)"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def part_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "taichi_dr" and len(parts) > 1 and parts[1] in ALLOWED else None


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_parts_import_only_what_they_sit_on(part):
    bad = []
    for path in sorted((PACKAGE / part).rglob("*.py")):
        for module in imports_of(path):
            other = part_of(module)
            if module.split(".")[0] == "apps":
                bad.append(f"{path.relative_to(PACKAGE)} imports {module} (the library knows no CLI)")
            elif other is not None and other != part and other not in ALLOWED[part]:
                bad.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_engine_knows_no_method_renderer_or_window():
    own = {f"taichi_dr.pipelines.{name[:-3]}" for name in ENGINE}
    for name in ENGINE:
        for module in imports_of(PACKAGE / "pipelines" / name):
            root = module.split(".")[0]
            assert root not in ("taichi", "apps", "typer"), f"pipelines/{name} imports {module}"
            if root == "taichi_dr":
                # core's data types (Cameras, Mesh) name what Method hooks return; no renderer, method or window
                assert module in ("taichi_dr", "taichi_dr.__version__", "taichi_dr.core.camera", "taichi_dr.core.mesh",
                                  "taichi_dr.core.camera.Cameras", "taichi_dr.core.mesh.Mesh") or \
                    any(module == m or module.startswith(m + ".") for m in own), f"pipelines/{name} imports {module}"


def test_only_the_viewer_window_touches_ggui():
    """GGUI (ti.ui) needs a Vulkan driver and a display: one module uses it, so everything else imports anywhere."""
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if "ti.ui" in p.read_text() or "taichi.ui" in p.read_text())
    assert users == ["viewer/window.py"], users
