"""Dropout and feature dropout: masks, values, gradients, layouts, registration, errors."""

import copy
import pickle
import warnings

import pytest
import torch
from conftest import (
    DTYPES,
    TOLERANCES,
    assert_close_to,
    is_dense,
    layouts,
    memory_order,
    reference_keep,
)

import pyconv
import pyconv.functional as PF
import pyconv.nn as pnn

ops = torch.ops.pyconv


def seed_tensor(value, device="cpu"):
    return torch.tensor(value, dtype=torch.int64, device=device)


def expected_dropout(x, seed, p):
    """float64 reference of ops.dropout(x, p, seed): the mask from an independent Philox over the
    output's memory order (the output has x's layout when x is dense, else empty_like's)."""
    out_layout = torch.empty_like(x)
    keep = reference_keep(seed, x.numel(), p).to(x.device)
    mask = torch.empty_like(out_layout, dtype=torch.bool)
    memory_order(mask).copy_(keep)
    scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    return torch.where(
        mask, x.double() * scale, torch.zeros((), dtype=torch.float64, device=x.device)
    )


def expected_dropout2d(x, seed, p):
    n, c = x.shape[:2]
    keep = reference_keep(seed, n * c, p).to(x.device).view(n, c, *([1] * (x.dim() - 2)))
    scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    return torch.where(
        keep, x.double() * scale, torch.zeros((), dtype=torch.float64, device=x.device)
    )


# --- the random stream ---


def test_philox_known_answers():
    # Known-answer vectors of Philox4x32-10 (Random123's kat_vectors).
    assert pyconv._C.philox([0, 0, 0, 0], [0, 0]) == [
        0x6627E8D5,
        0xE169C58D,
        0xBC57AC4C,
        0x9B00DBD8,
    ]
    assert pyconv._C.philox([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [
        0x408F276D,
        0x41C83B0E,
        0xA20BC7C6,
        0x6D5451FD,
    ]
    assert pyconv._C.philox(
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]
    ) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 100, 1000, 4099])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_is_the_documented_stream(simd, n, p):
    seed = 0x1234_5678_9ABC_DEF  # uses both key words
    x = torch.rand(n) + 0.5  # never zero, so zeros in the output are exactly the dropped elements
    out = ops.dropout(x, p, seed_tensor(seed))
    assert torch.equal(out != 0, reference_keep(seed, n, p))


def test_mask_of_unaligned_ranges(simd):
    # Threads start their ranges inside 32-element blocks: a long tensor crosses many boundaries.
    seed, n = -7, 3 * 65536 + 77
    x = torch.rand(n) + 0.5
    out = ops.dropout(x, 0.3, seed_tensor(seed))
    assert torch.equal(out != 0, reference_keep(seed, n, 0.3))


def test_simd_paths_agree_bit_for_bit(dtype):
    if not pyconv._C.cpu_has_avx2():
        pytest.skip("no AVX2 on this CPU")
    x = torch.randn(3, 5, 17, 19).to(dtype)
    before = pyconv._C.simd_path()
    try:
        results = {}
        for path in ("generic", "avx2"):
            pyconv._C.set_simd_path(path)
            results[path] = (
                ops.dropout(x, 0.4, seed_tensor(11)),
                ops.dropout2d(x, 0.4, seed_tensor(11)),
                ops.dropout2d(
                    x.contiguous(memory_format=torch.channels_last), 0.4, seed_tensor(11)
                ),
            )
    finally:
        pyconv._C.set_simd_path(before)
    for a, b in zip(results["generic"], results["avx2"], strict=True):
        assert torch.equal(a, b)


# --- values against float64 torch ---


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 0.75, 1.0])
def test_dropout_values(device, dtype, p):
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, device=device)
    for name, xl in layouts(x.to(dtype)).items():
        out = ops.dropout(xl, p, seed_tensor(5))
        assert out.shape == xl.shape and out.dtype == dtype, name
        if is_dense(xl):
            assert out.stride() == xl.stride(), name
        assert_close_to(out, expected_dropout(xl, 5, p), dtype)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_dropout2d_values(device, dtype, p):
    x = torch.randn(3, 7, 5, 6, dtype=torch.float64, device=device)
    expected = expected_dropout2d(x.to(dtype), 9, p)
    for name, xl in layouts(x.to(dtype)).items():
        out = ops.dropout2d(xl, p, seed_tensor(9))
        if is_dense(xl):
            assert out.stride() == xl.stride(), name
        assert_close_to(out, expected, dtype)


def test_dropout2d_layouts_share_the_mask(device):
    x = torch.randn(4, 6, 5, 5, device=device)
    a = ops.dropout2d(x, 0.5, seed_tensor(3))
    b = ops.dropout2d(x.contiguous(memory_format=torch.channels_last), 0.5, seed_tensor(3))
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 10), (2, 3, 4, 5, 6), (1, 40, 1, 1)])
def test_feature_dropout_any_rank(device, shape):
    x = torch.randn(shape, dtype=torch.float64, device=device)
    assert_close_to(ops.dropout2d(x, 0.5, seed_tensor(2)), expected_dropout2d(x, 2, 0.5), x.dtype)


def test_keep_rate_is_one_minus_p():
    # 2^20 draws: the standard deviation of the kept fraction is below 5e-4.
    x = torch.ones(1 << 20)
    for p in (0.1, 0.5, 0.8):
        kept = (ops.dropout(x, p, seed_tensor(17)) != 0).double().mean().item()
        assert abs(kept - (1 - p)) < 3e-3


def test_zero_dim_and_empty(device):
    x = torch.tensor(2.0, device=device)
    out = ops.dropout(x, 0.5, seed_tensor(1))
    assert out.shape == () and out.item() in (0.0, 4.0)
    for shape in [(0,), (0, 3, 4, 4), (2, 0, 5)]:
        e = torch.empty(shape, device=device)
        assert ops.dropout(e, 0.5, seed_tensor(1)).shape == e.shape
        if len(shape) >= 2:
            assert ops.dropout2d(e, 0.5, seed_tensor(1)).shape == e.shape
        assert PF.dropout(e, 0.5) is e


# --- the functional API: torch's semantics ---


def test_functional_matches_op_with_torch_seed(device):
    x = torch.randn(4, 8, 6, 6, device=device)
    torch.manual_seed(123)
    seed = PF._draw_seed(None)
    torch.manual_seed(123)
    assert torch.equal(PF.dropout(x, 0.3), ops.dropout(x, 0.3, seed))
    torch.manual_seed(123)
    assert torch.equal(PF.dropout2d(x, 0.3), ops.dropout2d(x, 0.3, seed))


def test_manual_seed_reproduces_and_calls_differ():
    x = torch.randn(1000)
    torch.manual_seed(0)
    a, b = PF.dropout(x), PF.dropout(x)
    torch.manual_seed(0)
    assert torch.equal(PF.dropout(x), a)
    assert not torch.equal(a, b)
    g = torch.Generator().manual_seed(42)
    c = PF.dropout(x, generator=g)
    g.manual_seed(42)
    assert torch.equal(PF.dropout(x, generator=g), c)


def test_eval_and_p0_return_the_input():
    x = torch.randn(5, 5)
    assert PF.dropout(x, 0.5, training=False) is x
    assert PF.dropout(x, 0.0) is x
    assert PF.dropout2d(x[None], 0.5, training=False) is not None


def test_p1_gives_exact_zeros_and_zero_grads():
    x = torch.tensor([1.0, float("inf"), float("nan"), -2.0], requires_grad=True)
    y = PF.dropout(x, 1.0)
    assert torch.equal(y, torch.zeros(4))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(4))


@pytest.mark.parametrize("fn", [PF.dropout, PF.dropout2d])
def test_inplace_writes_into_input(device, fn):
    x = torch.randn(3, 4, 5, 5, device=device)
    g = torch.Generator().manual_seed(7)
    expected = fn(x, 0.4, generator=g)
    g.manual_seed(7)
    y = x.clone()
    ptr = y.data_ptr()
    out = fn(y, 0.4, inplace=True, generator=g)
    assert out is y and y.data_ptr() == ptr
    assert torch.equal(y, expected)


@pytest.mark.parametrize("fn", [PF.dropout, PF.dropout2d])
def test_inplace_on_non_contiguous_view(device, fn):
    base = torch.randn(4, 6, 5, 8, device=device)
    view = base[:, ::2, :, 1:7]
    g = torch.Generator().manual_seed(3)
    expected = fn(view.clone(), 0.5, generator=g)
    g.manual_seed(3)
    before = base.clone()
    fn(view, 0.5, inplace=True, generator=g)
    assert torch.equal(view, expected.to(view.dtype))
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[:, ::2, :, 1:7] = False
    assert torch.equal(base[untouched], before[untouched])


def test_inplace_autograd_follows_torch():
    leaf = torch.randn(10, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        PF.dropout(leaf, 0.5, inplace=True)
    x = leaf * 1.0
    g = torch.Generator().manual_seed(1)
    y = PF.dropout(x, 0.5, inplace=True, generator=g)
    assert y is x
    y.sum().backward()
    keep = y != 0
    torch.testing.assert_close(leaf.grad, keep.float() * 2.0)


# --- gradients ---


@pytest.mark.parametrize("op", [ops.dropout, ops.dropout2d])
def test_gradcheck(device, op):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    seed = seed_tensor(21)
    assert torch.autograd.gradcheck(lambda t: op(t, 0.4, seed), (x,))
    assert torch.autograd.gradgradcheck(lambda t: op(t, 0.4, seed), (x,))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_backward_uses_the_forward_mask_whatever_the_grad_layout(device, fmt):
    x = torch.randn(2, 8, 5, 7, device=device).contiguous(memory_format=fmt).requires_grad_()
    y = PF.dropout(x, 0.5)
    keep = (y != 0).float()
    # a grad in the other layout, and an expanded (stride 0) one
    other = torch.channels_last if fmt == torch.contiguous_format else torch.contiguous_format
    grad = torch.randn_like(y).contiguous(memory_format=other)
    (gx,) = torch.autograd.grad(y, x, grad, retain_graph=True)
    torch.testing.assert_close(gx, grad * keep * 2.0)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, keep * 2.0)


def test_dropout2d_backward(device, dtype):
    x = torch.randn(3, 5, 4, 4, device=device).to(dtype).requires_grad_()
    y = PF.dropout2d(x, 0.25)
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    keep = (y != 0).double()
    assert_close_to(gx, grad.double() * keep / 0.75, dtype)


def test_backward_keeps_no_mask():
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(64, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        PF.dropout(x, 0.5).sum().backward()
        PF.dropout2d(x[None], 0.5).sum().backward()
    assert saved and all(t.numel() == 1 and t.dtype == torch.int64 for t in saved)


# --- registration: opcheck, compile ---


@pytest.mark.parametrize("name", ["dropout", "dropout2d"])
def test_opcheck(device, name):
    op = getattr(ops, name)
    op_ = getattr(ops, name + "_")
    samples = [
        torch.randn(2, 3, 4, 5, device=device),
        torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last),
        torch.randn(2, 3, 4, 10, dtype=torch.float64, device=device)[..., ::2],
        torch.randn(4, 6, device=device, requires_grad=True),
    ]
    for x in samples:
        torch.library.opcheck(op, (x, 0.3, seed_tensor(4)))
        torch.library.opcheck(op_, (x.detach().clone(), 0.3, seed_tensor(4)))


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def f(x):
        return PF.dropout2d(torch.relu(PF.dropout(x, 0.3)), 0.2).sum(dim=(2, 3))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 6, 6, device=device, requires_grad=True)
    torch.manual_seed(5)
    ye = f(x)
    (ge,) = torch.autograd.grad(ye.sum(), x)
    torch.manual_seed(5)
    yc = compiled(x)
    (gc,) = torch.autograd.grad(yc.sum(), x)
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(gc, ge)


def test_fake_tensor_shapes_match_the_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fo = ops.dropout(fx, 0.5, mode.from_tensor(seed_tensor(1)))
    real = ops.dropout(x, 0.5, seed_tensor(1))
    assert fo.shape == real.shape and fo.stride() == real.stride() and fo.dtype == real.dtype


# --- torch's wrappers: dropout1d / dropout2d / dropout3d input rules ---


def test_dropout2d_warnings_follow_torch():
    x3 = torch.randn(3, 4, 5)
    with pytest.warns(UserWarning, match="assuming that channel-wise 1D dropout"):
        y = PF.dropout2d(x3, 0.5)
    assert torch.equal(((y != 0).sum(-1) % 5), torch.zeros(3, 4, dtype=torch.long))
    with pytest.warns(UserWarning, match="Received a 5-D input to dropout2d"):
        PF.dropout2d(torch.randn(2, 3, 4, 5, 6), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PF.dropout2d(torch.randn(2, 3, 4, 5), 0.5)


def test_dropout1d_and_3d_unbatched():
    x = torch.randn(6, 50) + 10
    y = PF.dropout1d(x, 0.5)
    assert y.shape == x.shape
    assert all(bool((row == 0).all()) or bool((row != 0).all()) for row in y)
    with pytest.raises(RuntimeError, match="Expected 2D or 3D input"):
        PF.dropout1d(torch.randn(2, 3, 4, 5), 0.5)
    v = torch.randn(4, 3, 5, 5) + 10
    z = PF.dropout3d(v, 0.5)
    assert all(bool((c == 0).all()) or bool((c != 0).all()) for c in z)
    w = v.clone()
    assert PF.dropout3d(w, 0.5, inplace=True) is w


# --- modules ---


@pytest.mark.parametrize("name", ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d"])
def test_modules_are_drop_in(name):
    ours, theirs = getattr(pnn, name)(p=0.3), getattr(torch.nn, name)(p=0.3)
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, getattr(torch.nn, name))
    assert ours.state_dict() == theirs.state_dict() == {}
    assert pickle.loads(pickle.dumps(ours)).p == 0.3
    assert copy.deepcopy(ours).p == 0.3
    with pytest.raises(ValueError, match="between 0 and 1"):
        getattr(pnn, name)(p=1.5)


def test_dropout_module_train_eval():
    m = pnn.Dropout(0.5)
    x = torch.randn(100) + 5
    assert (m(x) == 0).any()
    m.eval()
    assert m(x) is x
    m2 = pnn.Dropout2d(0.5, inplace=True).train()
    y = torch.randn(2, 8, 3, 3) + 5
    assert m2(y) is y


# --- errors ---


@pytest.mark.parametrize("fn", [PF.dropout, PF.dropout1d, PF.dropout2d, PF.dropout3d])
@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_bad_p_raises_value_error(fn, p):
    with pytest.raises(ValueError, match=r"between 0 and 1, but got"):
        fn(torch.randn(2, 3, 4), p)


def test_integer_input_raises():
    with pytest.raises(RuntimeError, match="expected a floating-point input"):
        PF.dropout(torch.arange(10), 0.5)
    with pytest.raises(RuntimeError, match="expected a floating-point input"):
        PF.dropout2d(torch.ones(2, 3, 4, 4, dtype=torch.int32), 0.5)


def test_op_argument_errors():
    x = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match=r"expected p \(the drop probability\) in \[0, 1\]"):
        ops.dropout(x, 1.5, seed_tensor(0))
    with pytest.raises(RuntimeError, match="one-element int64 tensor"):
        ops.dropout(x, 0.5, torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="at least 2 dimensions"):
        ops.dropout2d(torch.randn(5), 0.5, seed_tensor(0))


# --- CUDA: the same stream on the GPU ---

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


@cuda
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_cuda_mask_bit_identical_to_cpu(dt, offset):
    # offset > 0 leaves the CUDA data pointer unaligned: the scalar kernel must give the same mask.
    shape = (5, 7, 33, 9)
    base = torch.randn(5 * 7 * 33 * 9 + offset).to(dt)
    base_gpu = base.cuda()
    pairs = [(base[offset:].view(shape), base_gpu[offset:].view(shape))]
    cl = torch.channels_last
    pairs.append(
        (pairs[0][0].contiguous(memory_format=cl), pairs[0][1].contiguous(memory_format=cl))
    )
    for x, xg in pairs:
        for op in (ops.dropout, ops.dropout2d):
            a = op(x, 0.35, seed_tensor(99))
            b = op(xg, 0.35, seed_tensor(99))
            c = op(xg, 0.35, seed_tensor(99, "cuda"))
            assert b.stride() == a.stride()
            assert torch.equal(a != 0, b.cpu() != 0)
            assert torch.equal(b, c)
            torch.testing.assert_close(b.cpu(), a, **TOLERANCES[dt])


@cuda
@pytest.mark.parametrize(
    "op, out_of_place", [(ops.dropout_, ops.dropout), (ops.dropout2d_, ops.dropout2d)]
)
def test_cuda_inplace_matches_out_of_place(op, out_of_place):
    x = torch.randn(4, 6, 10, 10, device="cuda")
    expected = out_of_place(x, 0.5, seed_tensor(5))
    for view in (x.clone(), x.clone()[:, :, :, :]):
        op(view, 0.5, seed_tensor(5))
        assert torch.equal(view, expected)


@cuda
def test_cuda_functional_reproduces_cpu_mask():
    x = torch.randn(64, 1000) + 5
    torch.manual_seed(8)
    a = PF.dropout(x, 0.5)
    torch.manual_seed(8)
    b = PF.dropout(x.cuda(), 0.5)
    assert torch.equal(a != 0, b.cpu() != 0)


# --- the buffer cache ---


@pytest.mark.parametrize("numel", [1 << 19, 1 << 15], ids=["2MiB", "128KiB"])
def test_large_outputs_reuse_cached_buffers(numel):
    x = torch.randn(numel)  # at least the cache's floor of 128 KiB
    pyconv.empty_cache()
    before = pyconv._C.cpu_cache_stats()
    y = ops.dropout(x, 0.5, seed_tensor(1))
    del y
    assert pyconv._C.cpu_cache_stats()["cached_bytes"] >= x.numel() * 4
    y = ops.dropout(x, 0.5, seed_tensor(1))
    assert pyconv._C.cpu_cache_stats()["hits"] > before["hits"]
    assert torch.equal(y, ops.dropout(x.clone(), 0.5, seed_tensor(1)))
    del y
    pyconv.empty_cache()
    assert pyconv._C.cpu_cache_stats()["cached_bytes"] == 0


def test_info():
    info = pyconv.info()
    for key in ("version", "torch_built", "torch_runtime", "simd", "cuda_compiled", "cuda_archs"):
        assert key in info
    assert info["simd"] in ("avx512", "avx2", "generic")
    assert (info["simd"] == "avx512") == info["cpu_has_avx512"]  # the widest path by default
