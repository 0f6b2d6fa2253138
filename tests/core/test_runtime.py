"""The runtime module: one initialisation per process, clear errors, and the CPU loop schedule."""

import pytest
import taichi as ti
import torch

from taichi_dr.core import runtime


def test_init_is_idempotent_and_refuses_to_switch():
    arch = runtime.ensure_init()
    assert runtime.init() == arch
    assert runtime.init(arch) == arch
    other = "vulkan" if arch != "vulkan" else "cpu"
    with pytest.raises(RuntimeError, match="already initialised"):
        runtime.init(other)


def test_unknown_arch_names_the_argument():
    with pytest.raises(ValueError, match="TAICHI_DR_ARCH"):
        runtime.init("tpu")


def test_cpu_loops_are_split_into_small_tasks():
    # Taichi's default CPU schedule hands each thread one block of at least 512 iterations, which left the
    # rasterizer's few hundred tile tasks on one core; runtime.init must turn it off on the cpu arch.
    if runtime.ensure_init() != "cpu":
        pytest.skip("cpu arch only")
    cfg = ti.lang.impl.current_cfg()
    assert cfg.make_cpu_multithreading_loop is False
    assert cfg.default_cpu_block_dim <= 32


def test_serial_launch_only_for_small_loops_on_the_cpu():
    arch = runtime.ensure_init()
    assert runtime.serial_launch(runtime.SERIAL_BELOW) is False
    assert runtime.serial_launch(10, below=5) is False
    # a GPU never runs a loop on one thread
    assert runtime.serial_launch(10) is (arch == "cpu")


def test_torch_runs_small_evaluations_on_one_thread_and_restores_its_count():
    arch = runtime.ensure_init()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with runtime.torch_threads_for(10):
            inside_small = torch.get_num_threads()
        with runtime.torch_threads_for(runtime.TORCH_SERIAL_BELOW):
            inside_large = torch.get_num_threads()
        with pytest.raises(RuntimeError), runtime.torch_threads_for(10):
            raise RuntimeError("restored even so")
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert inside_small == (2 if arch == "cuda" else 1)
    assert inside_large == 2 and after == 2
