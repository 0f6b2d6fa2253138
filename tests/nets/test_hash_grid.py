"""The multiresolution hash-grid encoding (Taichi kernels): forward against a plain PyTorch reference, the
hand-written backward against gradcheck and against Taichi's own autodiff of the same forward code, the
refused double backward, CPU against Vulkan, bad inputs, seeding."""

import math

import numpy as np
import pytest
import taichi as ti
import torch
from vulkan_subprocess import run_on_vulkan

from taichi_dr.core import runtime
from taichi_dr.nets import hash_grid
from taichi_dr.nets.encodings import EncodingSettings, check_encoding, position_encoding
from taichi_dr.nets.fields import GeometryNetwork
from taichi_dr.nets.hash_grid import HashGridEncoding, level_resolutions
from taichi_dr.nets.radiance import RadianceField

F64 = torch.float64
# 4 levels of resolutions 2, 4, 8, 16 (powers of two: cell boundaries are exact floats) over a 2^8 table:
# levels 0 and 1 ((N + 1)^3 = 27, 125 vertices) are dense, levels 2 and 3 (729, 4913) hashed.
SMALL = dict(n_levels=4, features_per_level=2, log2_table_size=8, base_resolution=2, finest_resolution=16)


def reference_encoding(x, table, resolutions, dense, bound, include_input):
    """instant-ngp's encoding in plain PyTorch (int64 hashing masked to the table), vectorised over points."""
    n_table = table.shape[1]
    u = (x.clamp(-bound, bound) + bound) * (0.5 / bound)
    feats = [x] if include_input else []
    for l, (n, is_dense) in enumerate(zip(resolutions, dense, strict=True)):
        pos = u * n
        cell = pos.floor().long().clamp(0, n - 1)
        t = pos - cell
        acc = torch.zeros(x.shape[0], table.shape[2], dtype=x.dtype)
        for c in range(8):
            offset = torch.tensor([c & 1, (c >> 1) & 1, c >> 2])
            v = cell + offset
            if is_dense:
                index = v[:, 0] + v[:, 1] * (n + 1) + v[:, 2] * (n + 1) ** 2
            else:
                index = (v[:, 0] ^ (v[:, 1] * hash_grid.PRIME_Y) ^ (v[:, 2] * hash_grid.PRIME_Z)) % n_table
            w = torch.where(offset.bool(), t, 1 - t).prod(dim=1)
            acc = acc + w[:, None] * table[l, index]
        feats.append(acc)
    return torch.cat(feats, dim=1)


def _encoder(seed=0, dtype=F64, **kwargs):
    torch.manual_seed(seed)
    enc = HashGridEncoding(**{**SMALL, "init_scale": 1.0, **kwargs})
    return enc.to(dtype)


def _interior_points(n, enc, seed=1, margin=1e-3):
    """Random points inside the cube, each at least ``margin`` (in cells) from every level's cell boundaries."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(8 * n, 3, generator=g, dtype=F64) * 2 - 1) * 0.98 * enc.bound
    u = (x + enc.bound) / (2 * enc.bound)
    frac = torch.stack([(u * res) - (u * res).floor() for res in enc.resolutions])
    ok = ((frac > margin) & (frac < 1 - margin)).all(dim=2).all(dim=0)
    return x[ok][:n]


def test_resolutions_and_dense_levels():
    # instant-ngp's defaults: b = 128^(1/15) ~ 1.38, N_l = floor(16 b^l)
    assert level_resolutions(16, 16, 2048) == [16, 22, 30, 42, 58, 80, 111, 153, 212, 294, 406, 561, 776, 1072,
                                               1482, 2048]
    assert level_resolutions(5, 2, 32) == [2, 4, 8, 16, 32]          # b = 2 exactly: no floor rounding down
    assert level_resolutions(1, 8, 8) == [8] and level_resolutions(3, 4, 4) == [4, 4, 4]
    enc = HashGridEncoding(log2_table_size=13)    # instant-ngp's levels, small table: 17^3 <= 2^13 < 23^3
    assert enc.dense_levels == [True] + [False] * 15 and enc.out_dim == 35 and enc.in_dim == 3
    enc = _encoder()
    assert enc.resolutions == [2, 4, 8, 16] and enc.dense_levels == [True, True, False, False]
    assert enc.table.shape == (4, 256, 2) and isinstance(enc.table, torch.nn.Parameter)
    assert enc.includes_input and not enc.supports_double_backward and enc.finite_difference_step == 2 / 16
    assert not HashGridEncoding(**SMALL, include_input=False).includes_input
    assert HashGridEncoding(**SMALL, include_input=False).out_dim == 8


@pytest.mark.parametrize("include_input", [True, False])
@pytest.mark.parametrize("serial", [True, False])
def test_forward_matches_pytorch_reference(include_input, serial, monkeypatch):
    """Random points, points on the cell boundaries of every level, the cube's corners and points outside
    it (clamped) give the reference's values in float64, dense and hashed levels alike, from the serialised
    kernel (few points, on the CPU) and the parallel one."""
    monkeypatch.setattr(runtime, "serial_launch", lambda n, below=0: serial and runtime.arch() == "cpu")
    enc = _encoder(include_input=include_input, bound=1.5)
    g = torch.Generator().manual_seed(3)
    random = (torch.rand(200, 3, generator=g, dtype=F64) * 2 - 1) * 1.5
    grid = torch.arange(17, dtype=F64) / 16 * 3 - 1.5       # every level's vertices (1.5 * k / 8 is exact)
    boundary = torch.stack(torch.meshgrid(grid, grid[::4], grid[::8], indexing="ij"), -1).reshape(-1, 3)
    outside = torch.tensor([[2.0, 0.1, -0.2], [-1e6, 1e6, 0.3], [1.5, -1.5, 1.5], [-3.0, -3.0, -3.0]], dtype=F64)
    x = torch.cat([random, boundary, outside])
    y = enc(x)
    want = reference_encoding(x, enc.table.detach(), enc.resolutions, enc.dense_levels, 1.5, include_input)
    assert y.shape == (x.shape[0], enc.out_dim) and y.dtype == F64
    assert torch.allclose(y, want, rtol=0, atol=1e-13)
    assert torch.isfinite(y).all()
    # outside points take the features of the nearest point of the cube
    n_in = 3 * include_input
    assert torch.equal(y[-4:, n_in:], enc(x[-4:].clamp(-1.5, 1.5))[:, n_in:])


def test_forward_hashing_is_exact_at_fine_resolutions():
    """A 2048 level over a small table: the u32 products wrap exactly as the int64 reference's low bits."""
    enc = _encoder(n_levels=2, base_resolution=512, finest_resolution=2048, log2_table_size=10)
    assert enc.dense_levels == [False, False]
    x = torch.rand(500, 3, generator=torch.Generator().manual_seed(4), dtype=F64) * 2 - 1
    want = reference_encoding(x, enc.table.detach(), enc.resolutions, enc.dense_levels, 1.0, True)
    assert torch.allclose(enc(x), want, rtol=0, atol=1e-13)


def test_float32_matches_float64():
    enc64 = _encoder()
    enc32 = _encoder(dtype=torch.float32)
    x = torch.rand(300, 3, generator=torch.Generator().manual_seed(5), dtype=F64) * 2.2 - 1.1
    y32 = enc32(x.float())
    assert y32.dtype == torch.float32
    assert torch.allclose(y32.double(), enc64(x), rtol=0, atol=1e-5)


def test_gradcheck_table_and_points():
    """float64 gradcheck of the hand-written backward, for the points (away from the cell boundaries, where
    trilinear interpolation has kinks) and for the table (as the input of a functional call)."""
    enc = _encoder(init_scale=1.0)
    x = _interior_points(6, enc).requires_grad_(True)
    assert torch.autograd.gradcheck(enc, (x,), eps=1e-7, atol=1e-6)

    def with_table(table):
        return torch.func.functional_call(enc, {"table": table}, (x.detach(),))

    table = enc.table.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(with_table, (table,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradients_only_where_asked():
    enc = _encoder()
    x = _interior_points(10, enc)
    enc(x).sum().backward()                          # x without grad: only the table's
    assert enc.table.grad is not None and x.grad is None
    enc.table.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    enc(xg).square().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("scatter", ["per_level", "atomic"])
def test_backward_equals_taichi_autodiff(scatter, monkeypatch):
    """Test oracle: Taichi's reverse-mode autodiff of the same forward code (the kernels' @ti.func, run on
    fields) gives the hand-written backward's gradients of the table and of the points, with the CPU's
    level-by-level scatter and with the GPUs' atomic one."""
    runtime.ensure_init()
    if runtime.arch() != "cpu":
        pytest.skip("Taichi autodiff oracle runs on the cpu backend")
    if scatter == "atomic":     # more threads than levels: the encoding falls back to atomic adds
        monkeypatch.setattr(hash_grid, "_cpu_threads", lambda: 1000)
    enc = _encoder(include_input=False)
    x = _interior_points(40, enc)
    x = torch.cat([x, torch.tensor([[1.3, -0.2, 0.4], [0.1, -1.7, 2.0]], dtype=F64)])   # clamped: zero d x
    m, (n_levels, n_table, n_feat) = x.shape[0], enc.table.shape
    g = torch.randn(m, n_levels * n_feat, generator=torch.Generator().manual_seed(6), dtype=F64)
    xg = x.clone().requires_grad_(True)
    (gx, gt) = torch.autograd.grad(enc(xg), (xg, enc.table), g)

    with runtime.kernel_lock():
        xf = ti.field(ti.f64, shape=(m, 3), needs_grad=True)
        tf = ti.field(ti.f64, shape=(n_levels, n_table, n_feat), needs_grad=True)
        of = ti.field(ti.f64, shape=(m, n_levels * n_feat), needs_grad=True)
        lf = ti.field(ti.i32, shape=(n_levels, 2))
        cf = ti.field(ti.f64, shape=2)

        @ti.kernel
        def forward():
            for i, l in ti.ndrange(m, n_levels):
                hash_grid._encode(xf, tf, of, lf, cf, i, l, 0, n_feat)

        xf.from_numpy(x.numpy())
        tf.from_numpy(enc.table.detach().numpy())
        lf.from_numpy(enc.levels.numpy())
        cf.from_numpy(np.array([1.0, 0.5]))
        forward()
        assert np.allclose(of.to_numpy(), enc(x).detach().numpy(), rtol=0, atol=1e-13)
        of.grad.from_numpy(g.numpy())
        forward.grad()
        auto_x, auto_table = xf.grad.to_numpy(), tf.grad.to_numpy()
    assert np.allclose(gt.numpy(), auto_table, rtol=0, atol=1e-12)
    assert np.allclose(gx.numpy(), auto_x, rtol=0, atol=1e-10)
    # the clamped coordinates carry no gradient (the x of the first extra point, all but y of the second)
    assert gx[-2, 0] == 0 and gx[-1, 1] == 0 and gx[-1, 2] == 0 and gx[-2, 1] != 0


def test_double_backward_raises_naming_the_op():
    enc = _encoder()
    x = _interior_points(5, enc).requires_grad_(True)
    sdf = enc(x).sum(dim=1)
    with pytest.raises(RuntimeError, match="HashGridOp: double backward"):
        (g,) = torch.autograd.grad(sdf.sum(), x, create_graph=True)
        g.square().sum().backward()
    # first order (normals) works without create_graph
    (g,) = torch.autograd.grad(enc(x).sum(), x)
    assert g.shape == (5, 3) and torch.isfinite(g).all()


def test_networks_take_the_encoding():
    torch.manual_seed(0)
    enc = HashGridEncoding(**SMALL)
    assert check_encoding(enc, 3, "test") is enc
    net = GeometryNetwork(feature_dim=4, depth=2, width=32, skip_in=(1,), encoding=enc)
    assert net.finite_difference_step == enc.finite_difference_step
    x = torch.rand(20, 3) - 0.5
    out, g = net.gradient(x, create_graph=False)          # autograd through the encoding (first order)
    assert out.shape == (20, 5) and torch.isfinite(g).all()
    # IDR's geometric initialisation zeroes the weights of the grid features: train without it here
    net = GeometryNetwork(feature_dim=4, depth=2, width=32, skip_in=(1,), encoding=enc, geometric_init=False)
    out, g = net.gradient(x, create_graph=True)           # finite differences
    ((g.norm(dim=-1) - 1) ** 2).mean().backward()
    assert enc.table.grad is not None and enc.table.grad.abs().sum() > 0
    field = RadianceField(encoding=HashGridEncoding(**SMALL, include_input=False))
    assert field.encoding.out_dim == 8
    settings = EncodingSettings(kind="hashgrid", n_levels=4, log2_table_size=8, finest_resolution=64)
    enc = position_encoding(settings, 6, 2.0)
    assert isinstance(enc, HashGridEncoding) and enc.bound == 2.0 and enc.resolutions[-1] == 64


def test_chunked_launches_equal_one_launch(monkeypatch):
    """Launches split so that int32 indices never overflow (millions of points): the same results."""
    enc = _encoder()
    x = (torch.rand(37, 3, generator=torch.Generator().manual_seed(7), dtype=F64) * 2 - 1).requires_grad_(True)
    y = enc(x)
    gx, gt = torch.autograd.grad(y.square().sum(), (x, enc.table))
    monkeypatch.setattr(hash_grid, "_INDEX_LIMIT", 11 * 5)     # 5 rows per launch
    y2 = enc(x)
    gx2, gt2 = torch.autograd.grad(y2.square().sum(), (x, enc.table))
    assert torch.equal(y, y2) and torch.equal(gx, gx2) and torch.allclose(gt, gt2, rtol=0, atol=1e-13)


def test_empty_and_extreme_inputs():
    enc = _encoder(dtype=torch.float32)
    x = torch.zeros(0, 3, requires_grad=True)
    y = enc(x)
    assert y.shape == (0, enc.out_dim)
    y.sum().backward()
    assert x.grad.shape == (0, 3) and not enc.table.grad.any()
    x = torch.tensor([[1e6, -1e6, 0.0], [-1e30, 1e30, 1e6], [math.inf, -math.inf, 0.5]], requires_grad=True)
    y = enc(x)
    assert torch.isfinite(y[:, 3:]).all()
    y[:, 3:].sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(enc.table.grad).all()
    # NaN is not checked for; it must not disturb the other points (nor read outside the table)
    x = torch.tensor([[math.nan, 0.2, 0.3], [0.1, -0.4, 0.5], [0.3, math.nan, math.nan]])
    assert torch.equal(enc(x)[1], enc(x[1:2])[0])


def test_bad_arguments():
    enc = _encoder(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x: expected shape \(M, 3\), got \(4, 2\)"):
        enc(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"x: expected shape"):
        enc(torch.zeros(3))
    with pytest.raises(TypeError, match="x: expected dtype torch.float32, got torch.float64"):
        enc(torch.zeros(4, 3, dtype=F64))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        enc(np.zeros((4, 3), dtype=np.float32))
    for name in ("n_levels", "features_per_level", "log2_table_size", "base_resolution", "finest_resolution"):
        for bad in (0, -1, 2.0, True):
            with pytest.raises(ValueError, match=f"HashGridEncoding: {name} must be an int >= 1"):
                HashGridEncoding(**{**SMALL, name: bad})
    with pytest.raises(ValueError, match=r"finest_resolution must be >= base_resolution \(32\), got 16"):
        HashGridEncoding(base_resolution=32, finest_resolution=16)
    with pytest.raises(ValueError, match="log2_table_size must be at most 26"):
        HashGridEncoding(log2_table_size=27)
    with pytest.raises(ValueError, match="must stay below 2"):
        HashGridEncoding(n_levels=64, log2_table_size=26, features_per_level=1)
    for bad in (0.0, -1.0, math.inf, math.nan, "1"):
        with pytest.raises(ValueError, match="bound must be a finite number > 0"):
            HashGridEncoding(**SMALL, bound=bad)
    with pytest.raises(ValueError, match="init_scale must be a finite number >= 0"):
        HashGridEncoding(**SMALL, init_scale=-1.0)
    with pytest.raises(TypeError, match="include_input must be a bool"):
        HashGridEncoding(**SMALL, include_input=1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        HashGridEncoding(**SMALL, generator=0)
    with pytest.raises(TypeError, match="the table must be float32 or float64"):
        HashGridEncoding(**SMALL).half()(torch.zeros(2, 3, dtype=torch.float16))


def test_same_seed_same_table():
    torch.manual_seed(11)
    a = HashGridEncoding(**SMALL)
    torch.manual_seed(11)
    b = HashGridEncoding(**SMALL)
    torch.manual_seed(12)
    c = HashGridEncoding(**SMALL)
    assert torch.equal(a.table, b.table) and not torch.equal(a.table, c.table)
    assert a.table.abs().max() <= 1e-4 and a.table.abs().max() > 0.5e-4        # instant-ngp's uniform(-1e-4, 1e-4)
    d = HashGridEncoding(**SMALL, generator=torch.Generator().manual_seed(3))
    e = HashGridEncoding(**SMALL, generator=torch.Generator().manual_seed(3))
    assert torch.equal(d.table, e.table)
    assert set(a.state_dict()) == {"table"}


def vulkan_results():
    """Forward and backward (d table, d x) of a fixed float32 encoding and points, on whatever backend runs."""
    torch.manual_seed(0)
    enc = HashGridEncoding(**SMALL, init_scale=1.0)
    g = torch.Generator().manual_seed(8)
    x = (torch.rand(300, 3, generator=g) * 2.4 - 1.2).requires_grad_(True)
    w = torch.randn(300, enc.out_dim, generator=g)
    y = enc(x)
    gx, gt = torch.autograd.grad((y * w).sum(), (x, enc.table))
    return {"y": y.tolist(), "gx": gx.tolist(), "gt": gt.tolist()}


VULKAN_SCRIPT = r"""
from test_hash_grid import vulkan_results
out = vulkan_results()
enc = taichi_dr.nets.hash_grid.HashGridEncoding(n_levels=2, log2_table_size=6, base_resolution=2,
                                                finest_resolution=4).double()
try:
    enc(torch.zeros(2, 3, dtype=torch.float64))
except TypeError as e:
    out["float64"] = str(e)
"""


@pytest.mark.vulkan
def test_vulkan_matches_cpu(tmp_path):
    vk = run_on_vulkan(tmp_path, "import taichi_dr.nets.hash_grid\n" + VULKAN_SCRIPT)
    assert vk["float64"].startswith("x: float64 is not supported on the vulkan backend")
    cpu = vulkan_results()
    for name, tol in (("y", 1e-5), ("gx", 1e-3), ("gt", 1e-4)):
        a, b = np.asarray(cpu[name]), np.asarray(vk[name])
        assert a.shape == b.shape and np.isfinite(b).all(), name
        # float32 sums in different orders (atomics); d x sums 4 levels x 8 corners scaled by N_l <= 16
        assert np.allclose(a, b, rtol=1e-4, atol=tol), (name, np.abs(a - b).max())
