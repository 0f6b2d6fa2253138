"""Run a script on the Vulkan backend in a subprocess (Taichi takes one arch per process) and read its results.

The script runs after a preamble that puts the repository and tests/ on ``sys.path``, imports json, sys,
numpy as np, torch and taichi_dr, and initialises Vulkan; it leaves its results in a JSON-serialisable dict
``out``. When Vulkan cannot start the test is skipped, unless ``TAICHI_DR_REQUIRE_VULKAN`` is set (as in CI),
where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PREAMBLE = r"""
import json, os, sys
tests = os.path.join(sys.argv[1], "tests")
sys.path[:0] = [sys.argv[1], tests, *(e.path for e in sorted(os.scandir(tests), key=lambda e: e.name) if e.is_dir())]
import numpy as np
import torch
import taichi_dr
try:
    taichi_dr.init("vulkan")
except RuntimeError as e:
    print(json.dumps({"unavailable": str(e)})); sys.exit(0)
"""

EPILOGUE = r"""
json.dump(out, open(sys.argv[2], "w"))
print(json.dumps({"ok": True}))
"""


def run_on_vulkan(tmp_path: Path, script: str, timeout: float = 600):
    """Run ``script`` with TAICHI_DR_ARCH=vulkan; return the JSON it wrote (or skip/fail, see above)."""
    script_file = tmp_path / "vk.py"
    script_file.write_text(PREAMBLE + script + EPILOGUE)
    result_file = tmp_path / "vk.json"
    env = dict(os.environ, TAICHI_DR_ARCH="vulkan")
    proc = subprocess.run([sys.executable, str(script_file), str(ROOT), str(result_file)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    if "unavailable" in status:
        if os.environ.get("TAICHI_DR_REQUIRE_VULKAN"):
            pytest.fail(f"Vulkan required but unavailable: {status['unavailable']}")
        pytest.skip(f"no Vulkan driver: {status['unavailable']}")
    return json.loads(result_file.read_text())
