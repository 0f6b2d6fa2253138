"""Test configuration: tests run on the cpu backend unless TAICHI_DR_ARCH says otherwise; the Vulkan
comparisons start their own subprocess (Taichi uses one arch per process)."""

import os

os.environ.setdefault("TAICHI_DR_ARCH", "cpu")
