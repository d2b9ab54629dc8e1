"""Max and average pooling against torch: values, indices, gradients, layouts, options, errors."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, TOLERANCES, assert_close_to, layouts

import pyconv
import pyconv.functional as PF
import pyconv.nn as pnn
from pyconv._sizes import pool_output_shape, pool_output_size

ops = torch.ops.pyconv

# (kernel_size, stride, padding, dilation, ceil_mode)
MAX_CONFIGS = [
    (2, None, 0, 1, False),
    (3, 2, 1, 1, False),  # the ResNet stem
    (3, 2, 1, 1, True),
    (3, 1, 1, 1, False),
    ((2, 3), (1, 2), (1, 1), 1, True),
    (3, 2, 0, 2, False),
    ((3, 2), (2, 1), (1, 0), (2, 1), True),
    (5, 3, 2, 1, True),
    (1, 1, 0, 1, False),
    (4, 4, 2, 1, True),
]

# (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_CONFIGS = [
    (2, None, 0, False, True, None),
    (3, 2, 1, False, True, None),
    (3, 2, 1, False, False, None),
    (3, 2, 1, True, True, None),
    (3, 2, 1, True, False, None),
    ((2, 3), (1, 2), (1, 1), True, False, None),
    (3, 1, 1, False, True, 5),
    (5, 3, 2, True, True, -2),
    (1, 1, 0, False, True, None),
    (4, 4, 2, True, False, None),
]


def ids(config):
    return "-".join(str(c).replace(" ", "") for c in config)


def input_for(device, dtype, shape=(2, 5, 11, 13)):
    return torch.randn(shape, dtype=torch.float64, device=device).to(dtype)


# --- max pooling ---


@pytest.mark.parametrize("config", MAX_CONFIGS, ids=ids)
def test_max_pool2d_values_and_indices(device, dtype, config):
    k, s, p, d, ceil = config
    x = input_for(device, dtype)
    ref = F.max_pool2d(x.double(), k, s, p, d, ceil)
    # indices: torch in the same dtype (rounding to 16 bits can create ties)
    _, ref_idx = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    for name, xl in layouts(x).items():
        out, idx = PF.max_pool2d(xl, k, s, p, d, ceil, return_indices=True)
        assert out.shape == ref.shape, name
        assert_close_to(out, ref, dtype)
        assert idx.dtype == torch.int64
        assert torch.equal(idx, ref_idx), name
        if name == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert idx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("config", MAX_CONFIGS, ids=ids)
def test_max_pool2d_backward(device, dtype, config):
    k, s, p, d, ceil = config
    x = input_for(device, dtype)
    xr = x.double().requires_grad_()
    ref = F.max_pool2d(xr, k, s, p, d, ceil)
    grad = torch.randn_like(ref).to(dtype).double()  # representable in dtype
    (ref_gx,) = torch.autograd.grad(ref, xr, grad)
    for name, xl in layouts(x).items():
        xl = xl.detach().requires_grad_()
        out = PF.max_pool2d(xl, k, s, p, d, ceil)
        (gx,) = torch.autograd.grad(out, xl, grad.to(dtype))
        if name == "channels_last":
            assert gx.is_contiguous(memory_format=torch.channels_last)
        assert_close_to(gx, ref_gx, dtype)


def test_max_pool2d_nan_and_inf_follow_torch(device):
    x = torch.randn(1, 2, 8, 8, device=device)
    x[0, 0, 1, 1] = float("nan")
    x[0, 0, 5, 4] = float("nan")
    x[0, 0, 5, 5] = float("nan")
    x[0, 1, :4, :4] = float("-inf")
    for k, s, p in [(2, 2, 0), (3, 2, 1), (3, 1, 1)]:
        ref, ref_idx = F.max_pool2d(x, k, s, p, return_indices=True)
        out, idx = PF.max_pool2d(x, k, s, p, return_indices=True)
        torch.testing.assert_close(out, ref, equal_nan=True)
        assert torch.equal(idx, ref_idx)


def test_max_pool2d_unbatched_and_unpool(device):
    x = torch.randn(3, 10, 9, device=device)
    out, idx = PF.max_pool2d(x, 2, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    assert out.shape == ref.shape == (3, 5, 4)
    torch.testing.assert_close(out, ref)
    assert torch.equal(idx, ref_idx)
    x4 = x[None]
    out4, idx4 = PF.max_pool2d(x4, 2, return_indices=True)
    ref4, ref_idx4 = F.max_pool2d(x4, 2, return_indices=True)
    size = x4.shape[-2:]
    torch.testing.assert_close(
        F.max_unpool2d(out4, idx4, 2, output_size=size),
        F.max_unpool2d(ref4, ref_idx4, 2, output_size=size),
    )


def test_max_pool2d_keeps_one_byte_per_output():
    saved = []
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = PF.max_pool2d(x, 3, 2, 1)
    assert len(saved) == 1
    assert saved[0].dtype == torch.uint8 and saved[0].shape == out.shape
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = PF.max_pool2d(x, 17, 1, 8)  # 289-element windows: int32 offsets
    assert saved[0].dtype == torch.int32


def test_max_pool2d_large_window(device):
    x = torch.randn(2, 3, 20, 20, device=device, dtype=torch.float64, requires_grad=True)
    out, idx = PF.max_pool2d(x, 17, 2, 8, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 17, 2, 8, return_indices=True)
    torch.testing.assert_close(out, ref)
    assert torch.equal(idx, ref_idx)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


# --- average pooling ---


@pytest.mark.parametrize("config", AVG_CONFIGS, ids=ids)
def test_avg_pool2d_values(device, dtype, config):
    k, s, p, ceil, cip, div = config
    x = input_for(device, dtype)
    ref = F.avg_pool2d(x.double(), k, s, p, ceil, cip, div)
    for name, xl in layouts(x).items():
        out = PF.avg_pool2d(xl, k, s, p, ceil, cip, div)
        assert out.shape == ref.shape, name
        if name == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)
        assert_close_to(out, ref, dtype)


@pytest.mark.parametrize("config", AVG_CONFIGS, ids=ids)
def test_avg_pool2d_backward(device, dtype, config):
    k, s, p, ceil, cip, div = config
    x = input_for(device, dtype)
    xr = x.double().requires_grad_()
    ref = F.avg_pool2d(xr, k, s, p, ceil, cip, div)
    grad = torch.randn_like(ref).to(dtype).double()  # representable in dtype
    (ref_gx,) = torch.autograd.grad(ref, xr, grad)
    for xl in layouts(x).values():
        xl = xl.detach().requires_grad_()
        out = PF.avg_pool2d(xl, k, s, p, ceil, cip, div)
        (gx,) = torch.autograd.grad(out, xl, grad.to(dtype))
        assert_close_to(gx, ref_gx, dtype)


def test_avg_pool2d_keeps_nothing():
    saved = []
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        PF.avg_pool2d(x, 3, 2, 1)
    assert saved == []


# --- gradients, registration ---


@pytest.mark.parametrize("ceil", [False, True])
def test_gradcheck(device, ceil):
    # distinct values 0.01 apart: gradcheck's finite differences cannot swap a window's maximum
    x = torch.randperm(2 * 3 * 7 * 6, dtype=torch.float64, device=device).view(2, 3, 7, 6) * 0.01
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: PF.max_pool2d(t, 3, 2, 1, 1, ceil), (x,))
    assert torch.autograd.gradcheck(lambda t: PF.max_pool2d(t, 2, 1, 0, 2, ceil), (x,))
    assert torch.autograd.gradcheck(lambda t: PF.avg_pool2d(t, 3, 2, 1, ceil, False), (x,))
    assert torch.autograd.gradgradcheck(lambda t: PF.avg_pool2d(t, 3, 2, 1, ceil, True), (x,))


def test_opcheck(device):
    x = torch.randn(2, 3, 9, 8, device=device, requires_grad=True)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for t in (x, xcl, x.detach()[:, :, 1:, ::2], torch.randn(3, 9, 8, device=device)):
        out, argmax = ops.max_pool2d(t, [3, 3], [2, 2], [1, 1], [1, 1], True)
        torch.library.opcheck(ops.max_pool2d, (t, [3, 3], [2, 2], [1, 1], [1, 1], True))
        size = list(t.shape)
        torch.library.opcheck(
            ops.max_pool2d_backward,
            (torch.randn_like(out), argmax, size, [3, 3], [2, 2], [1, 1], [1, 1], True),
        )
        torch.library.opcheck(
            ops.max_pool2d_indices, (argmax, size, [3, 3], [2, 2], [1, 1], [1, 1], True)
        )
        torch.library.opcheck(ops.avg_pool2d, (t, [3, 2], [2, 1], [1, 1], True, False, None))
        out = ops.avg_pool2d(t, [3, 2], [2, 1], [1, 1], True, False, None)
        torch.library.opcheck(
            ops.avg_pool2d_backward,
            (torch.randn_like(out), size, [3, 2], [2, 1], [1, 1], True, False, None),
        )


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def f(x):
        return PF.avg_pool2d(PF.max_pool2d(x, 3, 2, 1), 2, ceil_mode=True).sum()

    x = torch.randn(2, 4, 15, 15, device=device, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ye, yc = f(x), compiled(x)
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(torch.autograd.grad(yc, x)[0], torch.autograd.grad(ye, x)[0])


def test_output_size_twin_matches_the_kernels():
    for h in range(1, 12):
        for k in range(1, 6):
            for s in range(1, 4):
                for p in range(0, k // 2 + 1):
                    for d in (1, 2):
                        for ceil in (False, True):
                            want = pool_output_size(h, k, p, s, d, ceil)
                            if want < 1:
                                continue
                            x = torch.empty(1, 1, h, 1)
                            out, _ = ops.max_pool2d(x, [k, 1], [s, 1], [p, 0], [d, 1], ceil)
                            assert out.shape[2] == want, (h, k, s, p, d, ceil)
    assert pool_output_shape((2, 3, 7, 7), (3, 3), (2, 2), (1, 1), (1, 1), True) == (2, 3, 4, 4)


def test_empty_batch(device):
    x = torch.randn(0, 3, 8, 8, device=device)
    assert PF.max_pool2d(x, 2).shape == (0, 3, 4, 4)
    assert PF.avg_pool2d(x, 3, 2, 1).shape == (0, 3, 4, 4)
    out, idx = PF.max_pool2d(x, 2, return_indices=True)
    assert idx.shape == (0, 3, 4, 4)


def test_simd_paths_agree(dtype):
    if not pyconv._C.cpu_has_avx2():
        pytest.skip("no AVX2 on this CPU")
    # rows wide enough for the vector paths; 43 channels: blocks of 32 and 8 and a scalar tail
    x = torch.randn(2, 43, 13, 41).to(dtype)
    results = {}
    before = pyconv._C.simd_path()
    try:
        for path in ("generic", "avx2"):
            pyconv._C.set_simd_path(path)
            r = []
            for xl in (x, x.contiguous(memory_format=torch.channels_last)):
                for k, s, p in [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)]:
                    xg = xl.detach().requires_grad_()
                    out = PF.max_pool2d(xg, k, s, p, ceil_mode=True)
                    r += [out, torch.autograd.grad(out, xg, torch.ones_like(out))[0]]
                    out = PF.avg_pool2d(xg, k, s, p, ceil_mode=True, count_include_pad=False)
                    r += [out, torch.autograd.grad(out, xg, torch.ones_like(out))[0]]
            results[path] = r
    finally:
        pyconv._C.set_simd_path(before)
    for a, b in zip(results["generic"], results["avx2"], strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])


# --- modules ---


def test_modules_are_drop_in():
    pairs = [
        (pnn.MaxPool2d(3, 2, 1), torch.nn.MaxPool2d(3, 2, 1)),
        (
            pnn.MaxPool2d((2, 3), ceil_mode=True, dilation=2),
            torch.nn.MaxPool2d((2, 3), ceil_mode=True, dilation=2),
        ),
        (
            pnn.AvgPool2d(3, 2, 1, count_include_pad=False),
            torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False),
        ),
        (pnn.AvgPool2d(2, divisor_override=3), torch.nn.AvgPool2d(2, divisor_override=3)),
    ]
    x = torch.randn(2, 3, 12, 12)
    for ours, theirs in pairs:
        assert repr(ours) == repr(theirs)
        assert isinstance(ours, type(theirs))
        assert ours.state_dict() == {}
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(pickle.loads(pickle.dumps(ours))(x), theirs(x))
        torch.testing.assert_close(copy.deepcopy(ours)(x), theirs(x))
    out, idx = pnn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(idx, torch.nn.MaxPool2d(2, return_indices=True)(x)[1])


# --- errors ---


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_size=0), "kernel_size must be greater than zero"),
        (dict(kernel_size=2, stride=0), "stride must be greater than zero"),
        (dict(kernel_size=2, padding=-1), "padding must be non-negative"),
        (dict(kernel_size=3, padding=2), "padding should be at most half of kernel_size"),
        (dict(kernel_size=(2, 2, 2)), "kernel_size must either be a single int"),
        (dict(kernel_size=9), "the output would be empty"),
    ],
)
def test_bad_arguments(kwargs, match):
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(RuntimeError, match=match):
        PF.max_pool2d(x, **kwargs)
    with pytest.raises(RuntimeError, match=match):
        PF.avg_pool2d(x, **kwargs)


def test_bad_inputs():
    with pytest.raises(RuntimeError, match="dilation must be greater than zero"):
        PF.max_pool2d(torch.randn(1, 2, 5, 5), 2, dilation=0)
    with pytest.raises(RuntimeError, match="divisor_override must be non-zero"):
        PF.avg_pool2d(torch.randn(1, 2, 5, 5), 2, divisor_override=0)
    with pytest.raises(RuntimeError, match=r"expected a 3-D \(C, H, W\) or 4-D"):
        PF.max_pool2d(torch.randn(5, 5), 2)
    with pytest.raises(RuntimeError, match=r"expected a 3-D \(C, H, W\) or 4-D"):
        PF.avg_pool2d(torch.randn(1, 0, 5, 5), 2)
    with pytest.raises(RuntimeError, match="expected a floating-point input"):
        PF.max_pool2d(torch.ones(1, 2, 4, 4, dtype=torch.int64), 2)


# --- CUDA: deterministic ---

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


@cuda
def test_cuda_backward_is_deterministic():
    x = torch.randn(8, 16, 33, 33, device="cuda", requires_grad=True)
    grads = []
    for _ in range(3):
        out = PF.avg_pool2d(PF.max_pool2d(x, 3, 2, 1), 3, 2, 1)
        grads.append(torch.autograd.grad(out, x, torch.ones_like(out))[0])
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])


@cuda
@pytest.mark.parametrize("dt", DTYPES)
def test_cuda_matches_cpu(dt):
    x = torch.randn(3, 20, 17, 19).to(dt)
    for xl in (x, x.contiguous(memory_format=torch.channels_last)):
        for k, s, p in [(2, 2, 0), (3, 2, 1), (3, 1, 1)]:
            a, ia = PF.max_pool2d(xl, k, s, p, ceil_mode=True, return_indices=True)
            b, ib = PF.max_pool2d(xl.cuda(), k, s, p, ceil_mode=True, return_indices=True)
            assert torch.equal(b.cpu(), a) and torch.equal(ib.cpu(), ia)
            a = PF.avg_pool2d(xl, k, s, p, ceil_mode=True)
            b = PF.avg_pool2d(xl.cuda(), k, s, p, ceil_mode=True)
            torch.testing.assert_close(b.cpu(), a, **TOLERANCES[dt])


@pytest.mark.parametrize("width", [40, 57, 64])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_wide_rows_take_the_vector_paths(device, width, dt):
    # rows long enough for 8-wide blocks at strides 1 and 2, an overlapping last block and
    # scalar borders on both sides
    x = input_for(device, dt, (2, 3, 9, width))
    for fmt in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=fmt)
        for k, s, p, d, ceil in MAX_CONFIGS[:5] + [(3, 1, 0, 2, False)]:
            xg = xl.detach().requires_grad_()
            out = PF.max_pool2d(xg, k, s, p, d, ceil)
            xr = x.double().requires_grad_()
            ref = F.max_pool2d(xr, k, s, p, d, ceil)
            assert_close_to(out, ref, dt)
            grad = torch.randn_like(ref).to(dt)
            (gx,) = torch.autograd.grad(out, xg, grad)
            (gr,) = torch.autograd.grad(ref, xr, grad.double())
            assert_close_to(gx, gr, dt)
        for k, s, p, ceil, cip, div in AVG_CONFIGS[:6]:
            xg = xl.detach().requires_grad_()
            out = PF.avg_pool2d(xg, k, s, p, ceil, cip, div)
            xr = x.double().requires_grad_()
            ref = F.avg_pool2d(xr, k, s, p, ceil, cip, div)
            assert_close_to(out, ref, dt)
            grad = torch.randn_like(ref).to(dt)
            (gx,) = torch.autograd.grad(out, xg, grad)
            (gr,) = torch.autograd.grad(ref, xr, grad.double())
            assert_close_to(gx, gr, dt)


@pytest.mark.parametrize("kernel", [(17, 17), (16, 16)])  # int32 and uint8 offsets
def test_windows_with_no_element_inside_the_input(device, kernel):
    # dilation can leave a window with every tap outside the input: -inf and torch's index; the
    # gradient is zero (torch's own backward sends it through that index into the next plane)
    dil = (2, 1)
    pad = (kernel[0] // 2 - 1, kernel[1] // 2)
    x = torch.randn(1, 2, 1, 1, device=device, requires_grad=True)
    args = (kernel, (19, 1), pad, dil, True)
    out, idx = PF.max_pool2d(x, *args, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, *args, return_indices=True)
    torch.testing.assert_close(out, ref)
    assert torch.equal(idx, ref_idx)
    assert torch.isinf(out).all()
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, torch.zeros_like(x))
