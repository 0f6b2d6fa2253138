"""Kernel launches from several threads: torch runs ``backward`` on its own autograd thread on CUDA, and users
train in worker threads. Taichi launches are not thread-safe and its LLVM backends build their struct module
only on the thread that initialised them; the runtime materialises the program at init and every launch holds
one process-wide lock (taichi_dr.core.runtime.kernel_lock).

The multi-threaded runs start in a fresh process, so that kernels are compiled for the first time inside the
worker threads (the case that failed: an assertion in Taichi's LLVM context, and "Kernels cannot call other
kernels" from two threads compiling at once). Their results are compared with single-threaded runs here.
Everything runs on the suite's arch (TAICHI_DR_ARCH, cpu by default); with TAICHI_DR_ARCH=cuda and a CUDA
build of torch, backward runs on torch's own autograd thread, the case this guards.
"""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from taichi_dr.core import runtime
from taichi_dr.core.camera import Cameras
from taichi_dr.core.mesh import Mesh
from taichi_dr.implicit.analytic import sphere_sdf
from taichi_dr.implicit.sphere_tracing import TracerSettings, sphere_trace
from taichi_dr.raster import RasterSettings, soft_rasterize
from taichi_dr.raster.renderer import render_mesh

ROOT = Path(__file__).resolve().parents[2]


def dtypes() -> tuple[torch.dtype, ...]:
    return (torch.float32,) if runtime.ensure_init() == "vulkan" else (torch.float32, torch.float64)


def raster_job(seed: int, dtype: torch.dtype) -> dict:
    """soft_rasterize forward and backward on random screen-space triangles (16 x 20 image)."""
    g = torch.Generator().manual_seed(seed)
    H, W, F = 16, 20, 8
    centre = torch.rand(1, F, 1, 2, generator=g, dtype=dtype) * torch.tensor([W, H], dtype=dtype)
    uv = centre + (torch.rand(1, F, 3, 2, generator=g, dtype=dtype) - 0.5) * 12 + 0.0137
    z = 2 + 4 * torch.rand(1, F, 3, 1, generator=g, dtype=dtype)
    dev = runtime.device()
    fv = torch.cat([uv, z], -1).to(dev).requires_grad_()
    attrs = torch.rand(1, F, 3, 2, generator=g, dtype=dtype).to(dev).requires_grad_()
    alpha, image, p2f = soft_rasterize(fv, (H, W), attrs, RasterSettings(sigma=1e-2, gamma=0.05, near=1.0))
    w_alpha = torch.randn(alpha.shape, generator=g, dtype=dtype).to(dev)
    w_image = torch.randn(image.shape, generator=g, dtype=dtype).to(dev)
    ((alpha * w_alpha).sum() + (image * w_image).sum()).backward()
    return dict(alpha=alpha.detach(), image=image.detach(), pix_to_face=p2f, grad_verts=fv.grad,
                grad_attrs=attrs.grad)


def _octahedron(seed: int, dtype: torch.dtype) -> Mesh:
    g = torch.Generator().manual_seed(seed)
    verts = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=dtype)
    verts = verts * (0.6 + 0.2 * torch.rand(6, 1, generator=g, dtype=dtype))
    faces = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    colors = torch.rand(6, 3, generator=g, dtype=dtype)
    return Mesh(verts=verts, faces=faces, vert_colors=colors).to(runtime.device())


def render_job(seed: int, dtype: torch.dtype) -> dict:
    """render_mesh (rgb, depth) forward and backward to the vertices, two views."""
    mesh = _octahedron(seed, dtype)
    verts = mesh.verts.clone().requires_grad_()
    eye = torch.tensor([[0.3, 0.5, 3.0], [-2.5, 0.4, 1.5]], dtype=dtype)
    cams = Cameras.look_at(eye, fov=40.0, image_size=(18, 14)).to(device=mesh.verts.device)
    out = render_mesh(mesh.with_verts(verts), cams, None, RasterSettings(sigma=1e-3, gamma=1e-2),
                      outputs=("rgb", "depth"))
    g = torch.Generator().manual_seed(seed + 100)
    loss = sum((x * torch.randn(x.shape, generator=g, dtype=dtype).to(x.device)).sum()
               for x in (out.alpha, out.rgb, out.depth))
    loss.backward()
    return dict(alpha=out.alpha.detach(), rgb=out.rgb.detach(), depth=out.depth.detach(),
                pix_to_face=out.pix_to_face, grad_verts=verts.grad)


def trace_job(seed: int, dtype: torch.dtype) -> dict:
    """Sphere tracing (all kernels of the tracer: marching, the jittered sampler and the secant steps)."""
    g = torch.Generator().manual_seed(seed)
    n = 300
    o = torch.tensor([0.1, 0.2, -2.5], dtype=dtype).expand(n, 3).contiguous()
    target = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * 1.4
    target[:, 2] = 0
    d = target - o
    o, d = o.to(runtime.device()), (d / d.norm(dim=-1, keepdim=True)).to(runtime.device())
    centre = ((torch.rand(3, generator=g, dtype=dtype) - 0.5) * 0.2).tolist()

    def sdf(x):  # not an exact distance (scaled by 1.6): marching overshoots, so brackets get refined
        return 1.6 * sphere_sdf(x, 0.4, centre)

    result = sphere_trace(sdf, o, d, TracerSettings(max_steps=12), generator=torch.Generator().manual_seed(seed))
    return dict(t=result.t, hit=result.hit, points=result.points)


JOBS = {"raster": raster_job, "render": render_job, "trace": trace_job}
FORWARD_KEYS = ("alpha", "image", "rgb", "depth", "pix_to_face", "t", "hit", "points")


def work_items(n_seeds: int = 2):
    return [(name, seed, dtype) for name in JOBS for seed in range(n_seeds) for dtype in dtypes()]


def assert_same(result: dict, reference: dict, what: str) -> None:
    """Forward outputs bitwise equal. Gradients equal up to the order of the backward kernels' float atomic
    sums (a few ulps; exact once the deterministic accumulation is in)."""
    assert result.keys() == reference.keys(), what
    for key, ref in reference.items():
        got = result[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, f"{what} {key}"
        if key in FORWARD_KEYS:
            assert torch.equal(got, ref), f"{what} {key}: differs from the single-threaded run"
        else:
            scale = float(ref.abs().max()) + 1e-30
            tol = 1e-5 if ref.dtype == torch.float32 else 1e-12
            err = float((got - ref).abs().max())
            assert err <= tol * scale, f"{what} {key}: max difference {err:.3g} (scale {scale:.3g})"


WORKER_SCRIPT = r"""
import sys, threading, torch
sys.path.insert(0, sys.argv[1] + "/tests/core")
import taichi_dr
taichi_dr.init()   # TAICHI_DR_ARCH (cpu unless set): on cuda, backward really runs on torch's autograd thread
from test_threading import JOBS, work_items

results, errors = {}, []

# 0. The very first kernel launch of the process happens on a worker thread (init was on the main one).
def first():
    try:
        results["first_launch_on_thread"] = JOBS["trace"](0, torch.float32)
    except Exception as e:
        errors.append("first launch on a thread: " + repr(e))
t = threading.Thread(target=first)
t.start(); t.join()

# 1. Forward on the main thread, backward on another (as torch's autograd thread does on CUDA); the backward
#    kernel is compiled there.
from taichi_dr.raster import RasterSettings, soft_rasterize
fv = torch.tensor([[[[2.0, 2.0, 3.0], [12.0, 3.0, 3.0], [4.0, 11.0, 3.0]]]], device=taichi_dr.core.runtime.device(),
                  requires_grad=True)
alpha, _, _ = soft_rasterize(fv, (14, 14), settings=RasterSettings(sigma=1e-2))
def backward():
    try:
        alpha.square().sum().backward()
    except Exception as e:
        errors.append("backward thread: " + repr(e))
t = threading.Thread(target=backward)
t.start(); t.join()
results["backward_on_thread"] = dict(alpha=alpha.detach(), grad_verts=fv.grad)

# 2. Several threads at once, each compiling and running every job.
def worker(k):
    try:
        for name, seed, dtype in work_items():
            results[(k, name, seed, str(dtype))] = JOBS[name](seed, dtype)
    except Exception as e:
        errors.append(f"worker {k}: {e!r}")
threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
for t in threads: t.start()
for t in threads: t.join()
torch.save(dict(results=results, errors=errors), sys.argv[2])
"""


@pytest.fixture(scope="module")
def threaded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("threads") / "results.pt"
    script = out.parent / "threads.py"
    script.write_text(WORKER_SCRIPT)
    env = dict(os.environ, TAICHI_DR_ARCH=runtime.ensure_init())   # the arch this suite runs on
    proc = subprocess.run([sys.executable, str(script), str(ROOT), str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_threads_raise_no_errors(threaded_run):
    assert threaded_run["errors"] == []


def test_first_kernel_launch_on_another_thread(threaded_run):
    assert_same(threaded_run["results"]["first_launch_on_thread"], trace_job(0, torch.float32),
                "the first launch, on a worker thread")


def test_backward_on_another_thread_matches(threaded_run):
    fv = torch.tensor([[[[2.0, 2.0, 3.0], [12.0, 3.0, 3.0], [4.0, 11.0, 3.0]]]], device=runtime.device(),
                      requires_grad=True)
    alpha, _, _ = soft_rasterize(fv, (14, 14), settings=RasterSettings(sigma=1e-2))
    alpha.square().sum().backward()
    got = threaded_run["results"]["backward_on_thread"]
    assert float(fv.grad.abs().max()) > 0
    assert_same(got, dict(alpha=alpha.detach(), grad_verts=fv.grad), "backward on a worker thread")


def test_concurrent_threads_match_a_single_threaded_run(threaded_run):
    results = threaded_run["results"]
    for name, seed, dtype in work_items():
        reference = JOBS[name](seed, dtype)
        for k in range(4):
            assert_same(results[(k, name, seed, str(dtype))], reference, f"thread {k} {name} seed {seed} {dtype}")


def test_in_process_worker_threads_match():
    """The same in this (already initialised) process: two threads run every job concurrently."""
    items = work_items(n_seeds=1)
    got: dict = {}
    errors: list = []

    def worker(k):
        try:
            for name, seed, dtype in items:
                got[(k, name, seed, dtype)] = JOBS[name](seed, dtype)
        except Exception as e:  # reported below; a thread's exception would otherwise only be printed
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for name, seed, dtype in items:
        reference = JOBS[name](seed, dtype)
        for k in range(2):
            assert_same(got[(k, name, seed, dtype)], reference, f"thread {k} {name} {dtype}")
