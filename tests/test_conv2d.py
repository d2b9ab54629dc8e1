"""conv2d against torch: values, gradients (double backward too), fused epilogue, module, errors.

The CPU path tested here is the portable direct one; faster kernels will be held to the same tests.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import TOLERANCES, assert_close_to

import pyconv.functional as PF
import pyconv.nn as pnn
from pyconv._sizes import conv_output_shape

ops = torch.ops.pyconv

# (in_channels, out_channels, kernel, stride, padding, dilation, groups)
CONFIGS = [
    (3, 8, 3, 1, 1, 1, 1),
    (4, 6, (3, 2), (2, 1), (1, 0), 1, 2),
    (4, 4, 3, 1, "same", 2, 4),  # depthwise, dilated
    (2, 3, 4, 1, "same", 1, 1),  # even kernel: asymmetric padding
    (3, 5, (2, 3), 1, "valid", (2, 1), 1),
    (6, 6, 1, 1, 0, 1, 3),
    (3, 4, 5, 3, 2, 1, 1),
]


def ids(c):
    return "-".join(str(v).replace(" ", "") for v in c)


def make(config, device, dtype, bias=True):
    cin, cout, k, s, p, d, g = config
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(2, cin, 11, 10, dtype=torch.float64, device=device)
    w = torch.randn(cout, cin // g, kh, kw, dtype=torch.float64, device=device)
    b = torch.randn(cout, dtype=torch.float64, device=device) if bias else None
    args = dict(stride=s, padding=p, dilation=d, groups=g)
    return x.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None), args


# conv sums many products: the 16-bit types are computed in float32 but their inputs and output
# are rounded, and the comparison is against float64 on the rounded inputs
CONV_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.float64: TOLERANCES[torch.float64],
    torch.float16: dict(rtol=2e-3, atol=2e-2),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-1),
}


# Winograd F(4x4, 3x3) (the default on channels_last layers whose transformed filters stay in
# cache) errs by up to about 1e-5 of the output's largest magnitude in float32 (F(2x2, 3x3) and the
# direct kernels about 1e-6): float32 comparisons allow 5e-5 of it
WINOGRAD_F4_ERROR = 5e-5


def tol32(expected64, atol):
    return dict(rtol=1e-5, atol=max(atol, WINOGRAD_F4_ERROR * expected64.abs().max().item()))


def close(actual, expected64, dtype):
    tol = CONV_TOL[dtype]
    if dtype == torch.float32:
        tol = tol32(expected64, tol["atol"])
    torch.testing.assert_close(actual.double(), expected64, **tol)


@pytest.mark.parametrize("config", CONFIGS, ids=ids)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_forward(device, dtype, config, fmt):
    x, w, b, args = make(config, device, dtype)
    x = x.contiguous(memory_format=fmt)
    ref = F.conv2d(x.double(), w.double(), b.double(), **args)
    out = PF.conv2d(x, w, b, **args)
    assert out.dtype == dtype and out.shape == ref.shape
    if fmt == torch.channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    close(out, ref, dtype)


@pytest.mark.parametrize("config", CONFIGS, ids=ids)
def test_backward(device, config):
    x, w, b, args = make(config, device, torch.float64)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    ref = F.conv2d(x, w, b, **args)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, w, b), grad)
    got = torch.autograd.grad(PF.conv2d(x, w, b, **args), (x, w, b), grad)
    for a, e in zip(got, want, strict=True):
        assert_close_to(a, e, torch.float64)


def test_only_needed_gradients_are_computed(device):
    x, w, b, args = make(CONFIGS[0], device, torch.float64)
    w.requires_grad_()
    out = PF.conv2d(x, w, b, **args)
    (gw,) = torch.autograd.grad(out.sum(), w)
    assert gw.shape == w.shape and x.grad is None


def test_graph_only_where_a_gradient_is_tracked(device):
    # without a tensor to differentiate (or under no_grad) the op skips its autograd node; any
    # tensor that needs a gradient, the residual included, gets one; forward-mode tangents are
    # refused as before rather than dropped
    x, w, b, args = make(CONFIGS[0], device, torch.float64)
    res = torch.randn_like(F.conv2d(x, w, b, **args))
    ref = torch.relu(F.conv2d(x, w, b, **args) + res)
    out = PF.conv2d(x, w, b, **args, activation="relu", residual=res)
    assert out.grad_fn is None and not out.requires_grad
    assert_close_to(out, ref, torch.float64)
    for t in (x, w, b, res):
        t.requires_grad_()
        with torch.no_grad():
            assert not PF.conv2d(x, w, b, **args, residual=res).requires_grad
        out = PF.conv2d(x, w, b, **args, activation="relu", residual=res)
        (g,) = torch.autograd.grad(out.sum(), t)
        (e,) = torch.autograd.grad(torch.relu(F.conv2d(x, w, b, **args) + res).sum(), t)
        assert_close_to(g, e, torch.float64)
        t.requires_grad_(False)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="jvp"):
        PF.conv2d(fwAD.make_dual(x, torch.randn_like(x)), w, b, **args)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[3]], ids=ids)
def test_gradcheck_and_gradgradcheck(device, config):
    cin, cout, k, s, p, d, g = config
    x, w, b, args = make(config, device, torch.float64)
    x, w, b = x[:1, :, :6, :5].clone(), w.clone(), b.clone()
    for t in (x, w, b):
        t.requires_grad_()
    fn = lambda x, w, b: PF.conv2d(x, w, b, **args)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_fused_bias_relu_residual(device, dtype):
    x, w, b, args = make(CONFIGS[0], device, dtype)
    res = torch.randn(
        conv_output_shape(x.shape, w.shape, (1, 1), (1, 1, 1, 1), (1, 1)), device=device
    ).to(dtype)
    out = PF.conv2d(x, w, b, **args, activation="relu", residual=res)
    ref = torch.relu(F.conv2d(x.double(), w.double(), b.double(), **args) + res.double())
    close(out, ref, dtype)


def test_fused_epilogue_gradients(device):
    x, w, b, args = make(CONFIGS[1], device, torch.float64)
    res = torch.randn(
        conv_output_shape(x.shape, w.shape, args["stride"], (1, 1, 0, 0), (1, 1)),
        dtype=torch.float64,
        device=device,
    )
    ts = [t.requires_grad_() for t in (x, w, b, res)]
    fn = lambda x, w, b, r: PF.conv2d(x, w, b, **args, activation="relu", residual=r)  # noqa: E731
    ref = lambda x, w, b, r: torch.relu(F.conv2d(x, w, b, **args) + r)  # noqa: E731
    out = fn(*ts)
    grad = torch.randn_like(out)
    for a, e in zip(
        torch.autograd.grad(out, ts, grad), torch.autograd.grad(ref(*ts), ts, grad), strict=True
    ):
        assert_close_to(a, e, torch.float64)
    # gradcheck on one sample (x and residual), the whole weight and bias
    small = [t.detach()[:1] if t.dim() == 4 and t is not ts[1] else t.detach() for t in ts]
    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in small))


@pytest.mark.parametrize(
    "bias,wanted",
    [(True, w) for w in ("x", "w", "b", "r", "xr", "wb", "xwbr")]
    + [(False, w) for w in ("x", "w", "r", "xr", "xwr")],
)
def test_fused_epilogue_gradient_subsets(device, bias, wanted):
    # Subsets of the differentiable arguments, with and without a bias (which shifts where the
    # residual sits among them): exactly the wanted gradients, equal to torch's.
    x, w, b, args = make(CONFIGS[0], device, torch.float64, bias=bias)
    res = torch.randn(2, 8, 11, 10, dtype=torch.float64, device=device)
    ts = dict(x=x, w=w, b=b, r=res)
    for k in wanted:
        ts[k].requires_grad_()
    out = PF.conv2d(x, w, b, **args, activation="relu", residual=res)
    ref = torch.relu(F.conv2d(x, w, b, **args) + res)
    grad = torch.randn_like(out)
    inputs = [ts[k] for k in wanted]
    for a, e in zip(
        torch.autograd.grad(out, inputs, grad),
        torch.autograd.grad(ref, inputs, grad),
        strict=True,
    ):
        assert_close_to(a, e, torch.float64)
    for t in (x, w, b, res):
        assert t is None or t.grad is None


def test_double_backward_through_fused_epilogue(device):
    # A gradient penalty on a conv + bias + residual + ReLU block: the second derivative runs
    # through the backward ops' own formulas.
    x, w, b, args = make(CONFIGS[0], device, torch.float64)
    x, w, b = x[:1, :, :5, :6], w, b
    res = torch.randn(1, 8, 5, 6, dtype=torch.float64, device=device)
    ts = tuple(t.clone().requires_grad_() for t in (x, w, b, res))
    fn = lambda x, w, b, r: PF.conv2d(x, w, b, **args, activation="relu", residual=r)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, ts)


def test_unbatched_and_empty_batch(device):
    x, w, b, args = make(CONFIGS[0], device, torch.float32)
    torch.testing.assert_close(
        PF.conv2d(x[0], w, b, **args), F.conv2d(x[0], w, b, **args), rtol=1e-5, atol=1e-4
    )
    e = torch.empty(0, 3, 11, 10, device=device)
    assert PF.conv2d(e, w, b, **args).shape == (0, 8, 11, 10)


def test_strided_input(device):
    x, w, b, args = make(CONFIGS[0], device, torch.float64)
    wide = torch.randn(2, 3, 11, 20, dtype=torch.float64, device=device)[..., ::2]
    assert_close_to(PF.conv2d(wide, w, b, **args), F.conv2d(wide, w, b, **args), torch.float64)


def test_opcheck(device):
    x, w, b, _ = make(CONFIGS[1], device, torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    geometry = ([2, 1], [1, 1, 0, 0], [1, 1], 2)
    torch.library.opcheck(ops.conv2d, (x, w, b, *geometry, True, None))
    out = ops.conv2d(x, w, b, *geometry, False, None)
    g = torch.randn_like(out)
    torch.library.opcheck(ops.conv2d_backward_input, (g, w, list(x.shape), *geometry))
    torch.library.opcheck(ops.conv2d_backward_weight, (g, x, list(w.shape), *geometry))
    torch.library.opcheck(ops.conv2d_backward_bias, (g,))
    torch.library.opcheck(ops.relu_backward, (g, out))


def test_opcheck_channels_last_strided(device):
    # channels_last stride-2 gradients (on the CPU: the input gradient's stride-phase GEMM)
    x = torch.randn(2, 32, 9, 9, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 32, 3, 3, device=device)
    geometry = ([2, 2], [1, 1, 1, 1], [1, 1], 1)
    out = ops.conv2d(x, w, None, *geometry, False, None)
    g = torch.randn_like(out)
    torch.library.opcheck(ops.conv2d_backward_input, (g, w, list(x.shape), *geometry))
    torch.library.opcheck(ops.conv2d_backward_weight, (g, x, list(w.shape), *geometry))


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    x, w, b, args = make(CONFIGS[0], device, torch.float32)
    w.requires_grad_()

    def f(x):
        return PF.conv2d(x, w, b, **args, activation="relu").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))
    torch.testing.assert_close(
        torch.autograd.grad(compiled(x), w)[0], torch.autograd.grad(f(x), w)[0]
    )


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_module_is_drop_in(padding_mode):
    theirs = torch.nn.Conv2d(4, 6, 3, stride=1, padding=1, groups=2, padding_mode=padding_mode)
    ours = pnn.Conv2d(4, 6, 3, stride=1, padding=1, groups=2, padding_mode=padding_mode)
    assert repr(ours) == repr(theirs)
    assert ours.weight.shape == theirs.weight.shape and ours.bias.shape == theirs.bias.shape
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 4, 7, 9)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    same = pnn.Conv2d(2, 2, 4, padding="same", bias=False)
    ref = torch.nn.Conv2d(2, 2, 4, padding="same", bias=False)
    ref.load_state_dict(same.state_dict())
    y = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(same(y), ref(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight=(3, 3, 2, 2)), "expected input with 3 channels, got 2"),
        (dict(weight=(3, 1, 2, 2), groups=2), "must be divisible by groups=2"),
        (dict(weight=(4, 2, 2, 2), bias=5), "expected bias to be 1-D with 4 elements"),
        (dict(weight=(4, 2, 7, 7)), "can't be greater than the padded input size"),
        (dict(stride=0), "stride must be positive"),
        (dict(dilation=0), "dilation must be positive"),
        (dict(padding=-1), "padding must be non-negative"),
        (dict(padding="same", stride=2), "'same' is not supported for strided"),
        (dict(padding="foo"), "Invalid padding string"),
    ],
)
def test_bad_arguments(kwargs, match):
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(*kwargs.pop("weight", (4, 2, 2, 2)))
    nb = kwargs.pop("bias", None)
    b = torch.randn(nb) if nb is not None else None
    with pytest.raises(RuntimeError, match=match):
        PF.conv2d(x, w, b, **kwargs)


def test_bad_dtypes_and_devices():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(RuntimeError, match="expected weight of dtype Float"):
        PF.conv2d(x, torch.randn(3, 2, 2, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="expected a floating-point input"):
        PF.conv2d(x.long(), torch.randn(3, 2, 2, 2).long())
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        PF.conv2d(x, torch.randn(3, 2, 2, 2), activation="gelu")


def check_float32_layer(x, w, b, args, fmt=torch.contiguous_format):
    """The float32 forward with the fused epilogue (relu(conv + b + residual)) and both gradients
    against float64 torch; the output and the input gradient keep the layout `fmt`."""
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.conv2d(xr, wr, b, **args)
    res = torch.randn_like(ref).contiguous(memory_format=fmt)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    out = PF.conv2d(xf, wf, b.float(), **args, activation="relu", residual=res.float())
    if x.shape[1] > 1:
        assert out.is_contiguous(memory_format=fmt)
    close(out, torch.relu(ref + res), torch.float32)
    grad = torch.randn_like(ref).contiguous(memory_format=fmt)
    want = torch.autograd.grad(ref, (xr, wr), grad)
    got = torch.autograd.grad(PF.conv2d(xf, wf, b.float(), **args), (xf, wf), grad.float())
    if x.shape[1] > 1:
        assert got[0].is_contiguous(memory_format=fmt)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), e, **tol32(e, 3e-4))
    return got, grad


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_default_routing_of_first_and_mid_layers(simd, fmt):
    # the shapes each default choice is made for, unforced: RGB stems (NCHW forward on the NCHW
    # direct kernel; weight gradients of 100+ taps on the channels_last direct kernel, on copies
    # in NCHW), 5x5 layers of few channels, 8 -> 64 3x3 (the NCHW direct weight gradient), 32 ->
    # 64 3x3 (the GEMM's weight gradient in NCHW only) and a 4-channel 5x5 layer (no NCHW GEMM)
    for cin, cout, k, s, p, h in [
        (3, 16, 7, 2, 3, 30),
        (3, 8, 11, 4, 2, 41),
        (6, 16, 5, 1, 0, 14),
        (8, 64, 3, 1, 1, 9),
        (32, 64, 3, 1, 1, 7),
        (4, 32, 5, 1, 2, 12),
        (16, 8, 3, 2, 1, 13),
    ]:
        x = torch.randn(2, cin, h, h + 3, dtype=torch.float64).contiguous(memory_format=fmt)
        w = torch.randn(cout, cin, k, k, dtype=torch.float64)
        b = torch.randn(cout, dtype=torch.float64)
        check_float32_layer(x, w, b, dict(stride=s, padding=p), fmt)


@pytest.mark.parametrize(
    "cin, cout, size, k, pad",
    [
        (8, 16, 14, 3, 0),
        (1, 8, 30, 3, 0),
        (16, 16, 8, 3, 1),
        (32, 32, 14, 3, 1),
        (16, 24, 11, 5, 2),
    ],
    ids=["direct-tail", "direct-wide", "winograd-16", "winograd-32", "winograd-5x5"],
)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_weight_gradient_keeps_infinities_where_torch_does(simd, cin, cout, size, k, pad, fmt):
    # an infinity in the input's last column (which the direct kernels' part-filled last vectors
    # read past the row's end) or corner (which Winograd's transforms mix into every tap) reaches
    # the taps it reaches in torch, and only those
    x = torch.randn(2, cin, size, size, dtype=torch.float64)
    x[:, 0, :, -1] = float("inf")
    x[0, -1, 0, 0] = float("-inf")
    out = size + 2 * pad - k + 1
    go = torch.randn(2, cout, out, out, dtype=torch.float64)
    want = torch.nn.grad.conv2d_weight(x, (cout, cin, k, k), go, padding=pad)
    got = ops.conv2d_backward_weight(
        go.float().contiguous(memory_format=fmt),
        x.float().contiguous(memory_format=fmt),
        [cout, cin, k, k],
        [1, 1],
        [pad] * 4,
        [1, 1],
        1,
    ).double()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], **tol32(want[finite], 3e-4))


@pytest.mark.parametrize("shape", [(1, 28, 24), (2, 16, 9)], ids=["blocks", "images"])
def test_kept_padding_holds_no_stale_rows(simd, shape):
    # the NCHW direct kernel's padded rows are kept per thread between tasks and calls, and only
    # what changes is written: one shape run again on new inputs, its row blocks (one image: many
    # blocks, padding above the first and below the last) meeting rows left by other blocks and
    # by the call before, whose input held NaN and infinities
    n, h, w_ = shape
    w = torch.randn(32, 1, 5, 5, dtype=torch.float64)
    before = torch.randn(n, 1, h, w_)
    before[:, :, ::3, ::4] = float("nan")
    before[:, :, 1::5, 2::3] = float("inf")
    for _ in range(2):
        PF.conv2d(before, w.float(), padding=3)
        go = torch.randn(n, 32, h + 2, w_ + 2)
        ops.conv2d_backward_input(go, w.float(), [n, 1, h, w_], [1, 1], [3, 3, 3, 3], [1, 1], 1)
    for _ in range(2):
        x = torch.randn(n, 1, h, w_, dtype=torch.float64)
        close(PF.conv2d(x.float(), w.float(), padding=3), F.conv2d(x, w, padding=3), torch.float32)
        go = torch.randn(n, 32, h + 2, w_ + 2, dtype=torch.float64)
        got = ops.conv2d_backward_input(
            go.float(), w.float(), [n, 1, h, w_], [1, 1], [3, 3, 3, 3], [1, 1], 1
        )
        want = torch.nn.grad.conv2d_input((n, 1, h, w_), w, go, padding=3)
        close(got, want, torch.float32)


@pytest.mark.parametrize("width", [9, 21, 37, 64])
def test_wide_rows_every_kernel_path(simd, width):  # simd: each CPU path this machine has
    # rows wider than every register tile, with partial last blocks, at strides 1, 2 and 3, with
    # dilation, groups and the fused epilogue
    for cin, cout, k, s, p, d, g in CONFIGS + [(5, 13, 3, (1, 2), 2, (1, 2), 1)]:
        x = torch.randn(2, cin, 7, width, dtype=torch.float64)
        kh, kw = (k, k) if isinstance(k, int) else k
        w = torch.randn(cout, cin // g, kh, kw, dtype=torch.float64)
        b = torch.randn(cout, dtype=torch.float64)
        check_float32_layer(x, w, b, dict(stride=s, padding=p, dilation=d, groups=g))


@pytest.mark.parametrize(
    "k, s, p, h",
    [
        (3, 2, 1, 12),  # ResNet's strided 3x3: phases of 1 and 2 taps
        (1, 2, 0, 11),  # the downsampling 1x1: half the phases receive nothing
        (7, 2, 3, 17),  # the stem
        (3, 3, 0, 13),  # stride 3, no padding
        (4, 2, 2, 10),  # even kernel
        (1, 2, 1, 9),  # a phase would need negative padding: the scatter path runs instead
        ((3, 5), (2, 3), (1, 2), 14),
    ],
    ids=str,
)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_strided_input_gradient_phases(simd, k, s, p, h, fmt):
    # the input gradient of strided layers, split into stride-1 phases on the forward kernel
    x = torch.randn(2, 6, h, h + 3, dtype=torch.float64).contiguous(memory_format=fmt)
    kh, kw = (k, k) if isinstance(k, int) else k
    w = torch.randn(10, 3, kh, kw, dtype=torch.float64)
    args = dict(stride=s, padding=p, groups=2)
    xr = x.clone().requires_grad_()
    ref = F.conv2d(xr, w, None, **args)
    grad = torch.randn_like(ref).contiguous(memory_format=fmt)
    (want,) = torch.autograd.grad(ref, xr, grad)
    xf = x.float().requires_grad_()
    (got,) = torch.autograd.grad(PF.conv2d(xf, w.float(), None, **args), xf, grad.float())
    close(got, want, torch.float32)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_pointwise_layers_as_matrix_products(simd, fmt, groups):
    # 1x1 stride-1 layers: one matrix product per group in each direction and layout, with
    # sizes past every cache block (rows, columns and the reduction) and the fused epilogue
    x = torch.randn(3, 520, 9, 31, dtype=torch.float64).contiguous(memory_format=fmt)
    w = torch.randn(200, 520 // groups, 1, 1, dtype=torch.float64)
    b = torch.randn(200, dtype=torch.float64)
    res = torch.randn(3, 200, 9, 31, dtype=torch.float64).contiguous(memory_format=fmt)
    ref = torch.relu(F.conv2d(x, w, b, groups=groups) + res)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    out = PF.conv2d(xf, wf, b.float(), groups=groups, activation="relu", residual=res.float())
    assert out.is_contiguous(memory_format=fmt)
    close(out, ref, torch.float32)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    bf = b.float().requires_grad_()
    grad = torch.randn_like(ref).contiguous(memory_format=fmt)
    want = torch.autograd.grad(F.conv2d(xr, wr, br, groups=groups), (xr, wr, br), grad)
    got = torch.autograd.grad(PF.conv2d(xf, wf, bf, groups=groups), (xf, wf, bf), grad.float())
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=3e-4)


@pytest.mark.parametrize("groups", [1, 2])
def test_pointwise_weight_gradient_in_pixel_slices(simd, groups):
    # channels_last 1x1 weight gradients with too few output blocks to share among threads: the
    # product over slices of pixels (three here, the last one short), added in order
    x = torch.randn(3, 40, 29, 31, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.randn(24, 40 // groups, 1, 1, dtype=torch.float64)
    grad = torch.randn(3, 24, 29, 31, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last
    )
    wr = w.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.conv2d(x, wr, groups=groups), wr, grad)
    for dtype, tol in [(torch.float32, dict(rtol=1e-5, atol=3e-4)), (torch.float64, {})]:
        wp = w.to(dtype).requires_grad_()
        (got,) = torch.autograd.grad(PF.conv2d(x.to(dtype), wp, groups=groups), wp, grad.to(dtype))
        torch.testing.assert_close(got.double(), want, **(tol or dict(rtol=1e-12, atol=1e-12)))


@pytest.mark.parametrize("cout", [128, 120])
def test_pointwise_streamed_output(simd, cout):
    # channels_last 1x1 layers whose output is 4 MiB or more store whole 64-byte lines of it past
    # the caches (AVX-512), the rest (a channel tail: rows not 64-byte aligned) as before; the fused
    # epilogue
    x = torch.randn(3, 64, 64, 64, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.randn(cout, 64, 1, 1, dtype=torch.float64) / 8
    b = torch.randn(cout, dtype=torch.float64)
    ref = F.conv2d(x, w, b)
    res = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)
    out = PF.conv2d(x.float(), w.float(), b.float(), activation="relu", residual=res.float())
    assert out.is_contiguous(memory_format=torch.channels_last)
    close(out, torch.relu(ref + res), torch.float32)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("stride", [2, (3, 2)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_strided_pointwise_layers(simd, fmt, stride, groups):
    # strided 1x1 layers (ResNet's downsampling shortcut) run as the stride-1 layer on the
    # subsampled input: forward with the fused epilogue, and both gradients
    x = torch.randn(2, 24, 11, 10, dtype=torch.float64).contiguous(memory_format=fmt)
    w = torch.randn(40, 24 // groups, 1, 1, dtype=torch.float64)
    b = torch.randn(40, dtype=torch.float64)
    check_float32_layer(x, w, b, dict(stride=stride, groups=groups), fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_weights(simd, dtype):
    # a model moved to channels_last has channels_last weights: they are read through the
    # layout transposes, with the same results (bits) as contiguous ones, for the forward and
    # both gradients (Winograd, 1x1, strided, first-layer and implicit-GEMM layers)
    for c, k, r, st, p in [
        (64, 64, 3, 1, 1),
        (8, 16, 1, 2, 0),
        (3, 16, 5, 2, 2),
        (32, 48, 3, 2, 1),
    ]:
        x = torch.randn(2, c, 13, 15, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(k, c, r, r, dtype=dtype)
        g = torch.randn_like(F.conv2d(x, w, None, st, p))
        got = []
        for wt in (w, w.contiguous(memory_format=torch.channels_last)):
            xg, wg = x.clone().requires_grad_(), wt.clone().requires_grad_()
            y = PF.conv2d(xg, wg, None, st, p)
            got.append((y, *torch.autograd.grad(y, (xg, wg), g)))
        for a, b in zip(got[0], got[1], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_gradient_in_the_input_layout(simd, dtype):
    # as torch's: the weight gradient of channels_last input is channels_last (a channels_last
    # model's parameters keep it without a copy), of NCHW input contiguous; the same values
    # either way (Winograd, 1x1, strided, first-layer, implicit-GEMM, grouped and depthwise
    # layers), and a channels_last model's parameters get channels_last gradients
    cl = torch.channels_last
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for c, k, r, st, p, gr in [
        (64, 64, 3, 1, 1, 1),
        (8, 16, 1, 2, 0, 1),
        (3, 16, 5, 2, 2, 1),
        (32, 48, 3, 2, 1, 1),
        (16, 24, 3, 1, 1, 4),
        (16, 16, 3, 1, 1, 16),
    ]:
        x = torch.randn(2, c, 13, 15, dtype=torch.float64)
        g = torch.randn_like(
            F.conv2d(x, torch.zeros(k, c // gr, r, r, dtype=torch.float64), None, st, p, 1, gr)
        )
        want = torch.nn.grad.conv2d_weight(x, (k, c // gr, r, r), g, st, p, 1, gr)
        geometry = ([st] * 2, [p] * 4, [1, 1], gr)
        for fmt in (torch.contiguous_format, cl):
            xf, gf = (
                x.to(dtype).contiguous(memory_format=fmt),
                g.to(dtype).contiguous(memory_format=fmt),
            )
            got = ops.conv2d_backward_weight(gf, xf, list(want.shape), *geometry)
            assert got.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(
                got.double(), want, **tol32(want, tol["atol"]) if dtype == torch.float32 else tol
            )
    model = pnn.Conv2d(16, 32, 3, padding=1).to(memory_format=cl)
    model(torch.randn(2, 16, 9, 9).contiguous(memory_format=cl)).sum().backward()
    assert model.weight.grad.is_contiguous(memory_format=cl)


@pytest.mark.parametrize("path", ["1", "0"], ids=["implicit-gemm", "direct"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_forward_paths_forced(monkeypatch, simd, path, fmt):
    # every configuration on the implicit GEMM and on the direct kernel (PYCONV_CONV_GEMM forces
    # one), plus a layer whose reduction (40 channels x 3 x 3) spans two packed slices and one
    # whose weights pack as whole 16-channel panels of 180 taps (not a multiple of 8)
    monkeypatch.setenv("PYCONV_CONV_GEMM", path)
    extra = [(40, 20, 3, 1, 1, 1, 1), (40, 20, 3, 2, 2, 2, 2), (20, 32, 3, 1, 1, 1, 1)]
    for cin, cout, k, s, p, d, g in CONFIGS + extra:
        x = torch.randn(2, cin, 13, 27, dtype=torch.float64).contiguous(memory_format=fmt)
        kh, kw = (k, k) if isinstance(k, int) else k
        w = torch.randn(cout, cin // g, kh, kw, dtype=torch.float64)
        b = torch.randn(cout, dtype=torch.float64)
        check_float32_layer(x, w, b, dict(stride=s, padding=p, dilation=d, groups=g), fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bias_gradient(simd, fmt, dtype):
    # the sum of grad_output over samples and pixels per channel, against float64: planes of
    # 63 and 1 pixels (vectors with a partial last one), 5 and 45 channels (rows of channels_last
    # with partial vectors), an odd number of rows, an empty batch
    for n, k, h, w in [(3, 5, 7, 9), (2, 45, 11, 13), (7, 40, 1, 1), (0, 6, 4, 4)]:
        g = torch.randn(n, k, h, w, dtype=torch.float64)
        got = ops.conv2d_backward_bias(g.to(dtype).contiguous(memory_format=fmt))
        assert got.dtype == dtype and got.shape == (k,)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.double(), g.sum((0, 2, 3)), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_implicit_gemm_reads_wide_images_in_place(monkeypatch, simd, dtype):
    # channels_last images of 32+ channels are read in place by the implicit GEMM (row pointers
    # per tap, zeros over the padding) rather than packed: reduction slices that start and end
    # inside a tap (48 and 72 channels x 25 taps), padding, strides, dilation, row tiles past the
    # last pixel (3 x 11 x 13 outputs), and the input gradient as a forward of 48 channels
    monkeypatch.setenv("PYCONV_CONV_GEMM", "1")
    for cin, cout, k, s, p, d in [(48, 40, 5, 1, 2, 1), (72, 24, 3, 2, 3, 2), (36, 48, 5, 1, 2, 1)]:
        x = torch.randn(3, cin, 11, 13, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last
        )
        w = torch.randn(cout, cin, k, k, dtype=torch.float64)
        b = torch.randn(cout, dtype=torch.float64)
        args = dict(stride=s, padding=p, dilation=d)
        if dtype == torch.float32:
            check_float32_layer(x, w, b, args, torch.channels_last)
            continue
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = PF.conv2d(xr, wr, b, **args)
        ref = F.conv2d(x, w, b, **args)
        assert_close_to(y, ref, torch.float64)
        grad = torch.randn_like(ref)
        got = torch.autograd.grad(y, (xr, wr), grad)
        want = torch.autograd.grad(F.conv2d(xr, wr, b, **args), (xr, wr), grad)
        for a, e in zip(got, want, strict=True):
            assert_close_to(a, e, torch.float64)


@pytest.mark.parametrize("path", ["0", "1", "phase"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_input_gradient_paths_forced(monkeypatch, simd, path, fmt):
    # the input gradient by col2im (products with the weights, then the columns added into place),
    # as forward convolutions (per stride phase) and as one product over every stride phase
    # (float32, dilation 1), each forced on every configuration, in float32 and float64, with
    # groups, dilation and strides up to 3
    if path == "phase":
        monkeypatch.setenv("PYCONV_CONV_PHASE", "1")
    else:
        monkeypatch.setenv("PYCONV_CONV_COL2IM", path)
    extra = [(40, 20, 3, 2, 1, 1, 1), (16, 24, 3, 3, 2, 2, 2), (12, 8, (3, 5), (2, 3), 2, 1, 4)]
    for cin, cout, k, st, p, d, g in CONFIGS + extra:
        kh, kw = (k, k) if isinstance(k, int) else k
        x = torch.randn(2, cin, 13, 17, dtype=torch.float64).contiguous(memory_format=fmt)
        w = torch.randn(cout, cin // g, kh, kw, dtype=torch.float64)
        args = dict(stride=st, padding=p, dilation=d, groups=g)
        xr = x.clone().requires_grad_()
        ref = F.conv2d(xr, w, None, **args)
        grad = torch.randn_like(ref).contiguous(memory_format=fmt)
        (want,) = torch.autograd.grad(ref, xr, grad)
        for dtype, tol in [(torch.float32, dict(rtol=1e-5, atol=3e-4)), (torch.float64, {})]:
            xp = x.to(dtype).requires_grad_()
            (got,) = torch.autograd.grad(
                PF.conv2d(xp, w.to(dtype), None, **args), xp, grad.to(dtype)
            )
            if cin > 1:
                assert got.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(got.double(), want, **(tol or dict(rtol=1e-12, atol=1e-12)))


@pytest.mark.parametrize(
    "cin, cout, k, stride, pad, groups",
    [
        (80, 40, 3, 2, 1, 1),  # ResNet's 3x3 stride 2; columns past a block, reduction past a slice
        (24, 36, 3, 2, 0, 2),  # groups, no padding, channels not a multiple of the register tile
        (16, 20, 5, 2, 2, 1),  # nine neighbours (A's order not searched)
        (16, 16, (3, 2), (2, 3), (1, 0), 1),  # a kernel narrower than its stride: empty phases
        (48, 24, 4, 3, 1, 3),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_input_gradient_over_all_phases(monkeypatch, cin, cout, k, stride, pad, groups, dtype):
    # channels_last input gradients of strided layers as one product over every stride phase:
    # odd image sizes (phases of different sizes), against float64 torch
    monkeypatch.setenv("PYCONV_CONV_PHASE", "1")
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(3, cin, 15, 13, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.randn(cout, cin // groups, kh, kw, dtype=torch.float64)
    args = dict(stride=stride, padding=pad, groups=groups)
    xr = x.clone().requires_grad_()
    ref = F.conv2d(xr, w, None, **args)
    grad = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)
    (want,) = torch.autograd.grad(ref, xr, grad)
    xf = x.to(dtype).requires_grad_()
    (got,) = torch.autograd.grad(PF.conv2d(xf, w.to(dtype), None, **args), xf, grad.to(dtype))
    assert got.is_contiguous(memory_format=torch.channels_last)
    tol = dict(rtol=1e-5, atol=3e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_direct_kernel_register_tiles(monkeypatch, simd, stride, fmt):
    # the direct kernels on padded rows pick a register tile per shape (NCHW: 1 to 8 output
    # channels x 1 to 4 vectors of columns, 12 x 2 with AVX-512; channels_last: 1 to 4 vectors of
    # output channels x 12 to 3 pixels, 24 to 6 with AVX-512; channels x taps for the weight
    # gradient): output channel counts (up to four 16-channel vectors and a tail) and row
    # widths that reach each tile, its channel and column tails (NCHW: a narrower last block of
    # 1 to 3 vectors, several rows tall), the fused epilogue and both
    # gradients (the input gradient of stride 1 runs on the same kernel, channels swapped)
    monkeypatch.setenv("PYCONV_CONV_GEMM", "0")
    for cout in (1, 2, 3, 4, 5, 7, 9, 13, 16, 24, 33, 50, 64):
        for width in (5, 16, 27, 41, 70):
            x = torch.randn(3, 2, 6, width, dtype=torch.float64).contiguous(memory_format=fmt)
            w = torch.randn(cout, 2, 3, 3, dtype=torch.float64)
            b = torch.randn(cout, dtype=torch.float64)
            got, grad = check_float32_layer(x, w, b, dict(stride=stride, padding=1), fmt)
            again = ops.conv2d_backward_weight(
                grad.float(), x.float(), list(w.shape), [stride] * 2, [1] * 4, [1, 1], 1
            )
            assert torch.equal(got[1], again)  # the image slices add in a fixed order


@pytest.mark.parametrize("stride", [1, 2])
def test_direct_kernel_channel_passes(monkeypatch, simd, stride):
    # the NCHW direct kernel sums long reductions in passes of input channels (the rows of a pass
    # stay in L1), each pass after the first adding to the outputs stored so far, and the fused
    # epilogue applied once, at the last: many input channels, one to three output channels
    # (the tall tiles of several output rows, at stride 1 loading each input row once for all
    # the kernel rows it meets, 3 to 7 of them), row and column tails, both gradients; and the
    # input gradient of layers of 1 to 3 input channels, the same kernel with the channels swapped
    monkeypatch.setenv("PYCONV_CONV_GEMM", "0")
    cases = [(48, 1, 5, 31, 29), (40, 2, 3, 20, 45), (64, 3, 3, 11, 70), (24, 1, 7, 17, 23)]
    for cin, cout, k, h, width in cases:
        x = torch.randn(2, cin, h, width, dtype=torch.float64)
        w = torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k) ** 0.5
        b = torch.randn(cout, dtype=torch.float64)
        check_float32_layer(x, w, b, dict(stride=stride, padding=k // 2))
        # the input gradient of a layer of cout -> cin channels
        y = torch.randn(2, cin, h, width, dtype=torch.float64)
        wt = torch.randn(cin, cout, k, k, dtype=torch.float64)
        want = torch.nn.grad.conv2d_input((2, cout, h, width), wt, y, padding=k // 2)
        got = ops.conv2d_backward_input(
            y.float(), wt.float(), [2, cout, h, width], [1, 1], [k // 2] * 4, [1, 1], 1
        )
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=3e-4)


@pytest.mark.parametrize(
    "n, cin, cout, k, pad, dil, h, width",
    [
        (32, 1, 32, 5, 0, 1, 28, 28),  # read in place; 25 taps in tiles of 5 (AVX-512)
        (5, 2, 12, 3, 0, 2, 19, 41),  # in place, dilated, 18 taps (tiles of 6), a row tail
        (40, 3, 32, 3, 1, 1, 60, 60),  # padded, the slices' images in two groups
        (23, 3, 8, 5, 2, 1, 50, 37),  # padded, groups that do not divide the slices
    ],
)
def test_nchw_weight_gradient_in_place_and_image_groups(simd, n, cin, cout, k, pad, dil, h, width):
    # the NCHW direct weight gradient reads the input in place where no tap reaches the padding,
    # and otherwise pads as many of a slice's images at a time as fit 256 KiB, each register tile
    # summed over every image of the group before it is stored; and the input gradient of the
    # same layers (1 -> 32 5x5: one output channel on the direct kernel, tiles of 7 rows of 28,
    # with AVX-512 reading grad_output in place: its padding rows skipped, its lanes masked)
    x = torch.randn(n, cin, h, width, dtype=torch.float64)
    w = torch.randn(cout, cin, k, k, dtype=torch.float64)
    ref = F.conv2d(x, w, None, padding=pad, dilation=dil)
    grad = torch.randn_like(ref)
    geometry = ([1, 1], [pad] * 4, [dil] * 2, 1)
    want = torch.nn.grad.conv2d_weight(x, w.shape, grad, padding=pad, dilation=dil)
    got = ops.conv2d_backward_weight(grad.float(), x.float(), list(w.shape), *geometry)
    # sums of up to 144000 products in float32: tolerance relative to the largest
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
    want = torch.nn.grad.conv2d_input(x.shape, w, grad, padding=pad, dilation=dil)
    got = ops.conv2d_backward_input(grad.float(), w.float(), list(x.shape), *geometry)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
    "cin, cout, k, stride, pad, h, width",
    [
        (1, 32, 5, 1, 0, 28, 28),  # rows of 24 in pairs
        (32, 36, 5, 1, 0, 25, 27),  # two channel passes, a channel tail, an odd row left over
        (3, 20, 3, 1, 1, 25, 20),  # rows of 20
        (3, 16, 3, 2, 1, 33, 47),  # stride 2, rows of 24
    ],
)
def test_direct_kernel_row_pairs(simd, cin, cout, k, stride, pad, h, width):
    # AVX-512 NCHW forwards on rows whose last vector is at most half full compute two rows at a
    # time, both rows' last parts in one vector: the fused epilogue, both gradients
    x = torch.randn(3, cin, h, width, dtype=torch.float64)
    w = torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k) ** 0.5
    b = torch.randn(cout, dtype=torch.float64)
    check_float32_layer(x, w, b, dict(stride=stride, padding=pad))


@pytest.mark.parametrize("stride", [1, 2])
def test_direct_kernel_padding_rows(monkeypatch, simd, stride):
    # the NCHW direct kernel skips the kernel rows that meet only padding rows above or below the
    # image: padding up to twice the kernel's reach (output rows that see no image row at all,
    # bias and residual only), dilation 1 and 2, tall tiles (one output channel) and wide ones,
    # both gradients (the input gradient of stride 1 runs on this kernel with padding k - 1 - p)
    monkeypatch.setenv("PYCONV_CONV_GEMM", "0")
    for cout, k, pad, dil, h in [
        (1, 3, 3, 1, 5),
        (5, 3, 4, 2, 7),
        (2, 5, 6, 1, 4),
        (7, 5, 2, 1, 3),
    ]:
        x = torch.randn(2, 3, h, 11, dtype=torch.float64)
        w = torch.randn(cout, 3, k, k, dtype=torch.float64)
        b = torch.randn(cout, dtype=torch.float64)
        check_float32_layer(x, w, b, dict(stride=stride, padding=pad, dilation=dil))


def test_direct_kernel_row_major(simd):
    # RGB stems on wide images, whose channels would take a pass each (their rows do not fit L1
    # together for a tile's consecutive output rows), run one pass with the output rows outermost
    # and every channel tile of a row in turn: 7x7 stride 2 on rows of 230 and 5x5 stride 1 on
    # rows of 300, channel tails (13 and 7 output channels), the fused epilogue, both gradients
    for cin, cout, k, stride, h, width in [(3, 13, 7, 2, 11, 230), (3, 7, 5, 1, 6, 300)]:
        x = torch.randn(2, cin, h, width, dtype=torch.float64)
        w = torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k) ** 0.5
        b = torch.randn(cout, dtype=torch.float64)
        check_float32_layer(x, w, b, dict(stride=stride, padding=k // 2))


def test_direct_kernel_streamed_output(simd):
    # the NCHW direct kernel writes outputs of 4 MiB or more with streaming stores where its
    # blocks cover whole 64-byte lines (rows of 16k floats, blocks of an even number of vectors,
    # one pass over the channels): depthwise on rows of 128 with the fused epilogue and both
    # gradients (small inputs: each weight gradient sums 33000 products in float32), and 3 -> 3
    # on rows of 176 (blocks of 4 vectors, then a narrower one of 2) with the fused epilogue
    x = torch.randn(2, 32, 130, 128, dtype=torch.float64) / 16
    w = torch.randn(32, 1, 3, 3, dtype=torch.float64) / 3
    b = torch.randn(32, dtype=torch.float64)
    check_float32_layer(x, w, b, dict(padding=1, groups=32))
    x = torch.randn(2, 3, 1000, 176, dtype=torch.float64)
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64) / 3
    b = torch.randn(3, dtype=torch.float64)
    res = torch.randn(2, 3, 1000, 176, dtype=torch.float64)
    want = torch.relu(F.conv2d(x, w, b, padding=1) + res)
    got = PF.conv2d(
        x.float(), w.float(), b.float(), padding=1, activation="relu", residual=res.float()
    )
    assert got.numel() * 4 >= 4 << 20
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_winograd(monkeypatch, simd, fmt, tile):
    # Winograd F(2x2, 3x3) and F(4x4, 3x3), forced wherever they apply (3x3, stride 1, no
    # dilation, one group; F(4x4) channels_last only): channel counts with and without vector
    # tails, outputs that end in partial tiles, padding 0 to 2, the fused epilogue, and the input
    # gradient (a stride-1 3x3 forward, on the same kernel). F(2x2)'s error against float64 is of
    # the order of the direct kernel's (its transforms only add, subtract and halve); F(4x4)'s
    # larger (see WINOGRAD_F4_ERROR). NCHW layers run F(4x4) on channels_last copies, as F(2x2)
    # where they have at most 64 channels each way; the last layer (70 channels) keeps F(2x2)'s
    # NCHW transforms.
    monkeypatch.setenv("PYCONV_CONV_WINOGRAD", "1")
    monkeypatch.setenv("PYCONV_WINOGRAD_F4", str(tile // 4))
    for cin, cout, h, w, p in [
        (16, 16, 8, 8, 1),
        (5, 19, 9, 7, 1),
        (33, 8, 6, 11, 0),
        (8, 40, 7, 6, 2),
        (70, 20, 7, 9, 1),
    ]:
        x = torch.randn(2, cin, h, w, dtype=torch.float64).contiguous(memory_format=fmt)
        wt = torch.randn(cout, cin, 3, 3, dtype=torch.float64)
        b = torch.randn(cout, dtype=torch.float64)
        check_float32_layer(x, wt, b, dict(padding=p), fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_winograd_5x5(monkeypatch, simd, fmt):
    # Winograd F(2x2, 5x5) (6x6 patches, F(4x4, 3x3)'s input transform), forced wherever it
    # applies (5x5, stride 1, no dilation, one group; channels_last, NCHW layers on copies):
    # channel counts with and without vector tails, outputs that end in partial tiles, padding 0
    # to 2, the fused epilogue, and the input gradient (the same kernel, filters turned); the
    # weight gradient stays on the GEMM or the direct kernels
    monkeypatch.setenv("PYCONV_CONV_WINOGRAD", "1")
    for cin, cout, h, w, p in [
        (16, 16, 8, 8, 2),
        (5, 19, 9, 7, 2),
        (33, 8, 6, 11, 0),
        (8, 40, 7, 6, 1),
        (70, 20, 7, 9, 2),
    ]:
        x = torch.randn(2, cin, h, w, dtype=torch.float64).contiguous(memory_format=fmt)
        wt = torch.randn(cout, cin, 5, 5, dtype=torch.float64) / (cin * 25) ** 0.5
        b = torch.randn(cout, dtype=torch.float64)
        check_float32_layer(x, wt, b, dict(padding=p), fmt)


def check_non_finite_inputs(k):
    """A NaN and an infinity in a 16 -> 24 k x k layer's channels_last input (padding k // 2), and
    a NaN in its grad_output, reach the outputs and input gradients they reach in torch."""
    cl, pad = torch.channels_last, k // 2
    x = torch.randn(2, 16, 12, 13, dtype=torch.float64)
    x[0, :, 5, 6] = float("nan")
    x[1, 3, 2, 9] = float("inf")
    x = x.contiguous(memory_format=cl)
    wt = torch.randn(24, 16, k, k, dtype=torch.float64).abs()
    b = torch.randn(24, dtype=torch.float64)
    want = torch.relu(F.conv2d(x, wt, b, padding=pad))
    got = PF.conv2d(x.float(), wt.float(), b.float(), padding=pad, activation="relu")
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(
        got.double(), want, equal_nan=True, **tol32(want.nan_to_num(0, 0, 0), 1e-4)
    )
    g = torch.zeros(2, 24, 12, 13, dtype=torch.float64)
    g[1, :, 4, 4] = float("nan")
    g = g.contiguous(memory_format=cl)
    want = torch.nn.grad.conv2d_input(x.shape, wt, g, padding=pad)
    got = ops.conv2d_backward_input(
        g.float(), wt.float(), list(x.shape), [1, 1], [pad] * 4, [1, 1], 1
    )
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().sum() == 16 * k * k


@pytest.mark.parametrize("chunked", ["0", "1"])
def test_winograd_5x5_error_and_non_finite_inputs(monkeypatch, simd, chunked):
    # F(2x2, 5x5)'s error against float64 with unscaled weights is within WINOGRAD_F4_ERROR of the
    # largest output, as F(4x4, 3x3)'s (AlexNet's 64 -> 192 among the layers), and within twice
    # that of the largest tap in the weight gradient (its sums are over every tile); a NaN or
    # infinite input reaches only the outputs whose windows hold it (the tiles whose patch holds
    # one are computed directly), forward and input gradient, both schedules
    monkeypatch.setenv("PYCONV_CONV_WINOGRAD", "1")
    monkeypatch.setenv("PYCONV_WINOGRAD_CHUNKED", chunked)
    cl = torch.channels_last
    for cin, cout, h, w in [(21, 37, 29, 31), (64, 192, 27, 27), (256, 64, 8, 9)]:
        x = torch.randn(2, cin, h, w, dtype=torch.float64).contiguous(memory_format=cl)
        wt = torch.randn(cout, cin, 5, 5, dtype=torch.float64)
        want = F.conv2d(x, wt, padding=2)
        got = PF.conv2d(x.float(), wt.float(), padding=2).double()
        assert (got - want).abs().max() <= WINOGRAD_F4_ERROR * want.abs().max()
        g = torch.randn_like(want)
        want = torch.nn.grad.conv2d_input(x.shape, wt, g, padding=2)
        got = ops.conv2d_backward_input(
            g.float(), wt.float(), list(x.shape), [1, 1], [2] * 4, [1, 1], 1
        ).double()
        assert (got - want).abs().max() <= WINOGRAD_F4_ERROR * want.abs().max()
        want = torch.nn.grad.conv2d_weight(x, wt.shape, g, padding=2)
        got = ops.conv2d_backward_weight(
            g.float(), x.float(), list(wt.shape), [1, 1], [2] * 4, [1, 1], 1
        ).double()
        assert (got - want).abs().max() <= 2 * WINOGRAD_F4_ERROR * want.abs().max()
    check_non_finite_inputs(5)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_dilated_layers_as_phases(simd, fmt):
    # 3x3 layers of dilation d and padding d on images of sides multiple of d run as d x d
    # undilated layers, one per phase of the image, stacked along the batch (on Winograd): d = 2
    # and 3, the fused epilogue and both gradients, in the input's layout; sides that are not
    # multiples of d, or padding other than d, keep the dilated kernels
    for cin, cout, h, w, d, p in [
        (16, 24, 12, 10, 2, 2),
        (32, 16, 9, 12, 3, 3),
        (16, 16, 11, 10, 2, 2),
        (16, 16, 12, 10, 2, 1),
    ]:
        x = torch.randn(2, cin, h, w, dtype=torch.float64).contiguous(memory_format=fmt)
        wt = torch.randn(cout, cin, 3, 3, dtype=torch.float64) / (3 * cin**0.5)
        b = torch.randn(cout, dtype=torch.float64)
        check_float32_layer(x, wt, b, dict(padding=p, dilation=d), fmt)


@pytest.mark.parametrize("chunked", ["0", "1"])
def test_winograd_f4_error_and_non_finite_inputs(monkeypatch, simd, chunked):
    # F(4x4, 3x3)'s error against float64, F(2x2)'s against the same reference, on layers of up
    # to 256 channels with unscaled weights (outputs up to about 200): F(4x4) within
    # WINOGRAD_F4_ERROR of the largest output, F(2x2) within a tenth of that. A NaN or infinite
    # input reaches only the outputs whose windows hold it, as in torch (F(4x4) computes the tiles
    # whose patch holds one directly), in the forward and the input gradient; both schedules
    monkeypatch.setenv("PYCONV_CONV_WINOGRAD", "1")
    monkeypatch.setenv("PYCONV_WINOGRAD_CHUNKED", chunked)
    cl = torch.channels_last
    for cin, cout, h, w in [(21, 37, 29, 31), (128, 128, 16, 16), (256, 64, 8, 9)]:
        x = torch.randn(2, cin, h, w, dtype=torch.float64).contiguous(memory_format=cl)
        wt = torch.randn(cout, cin, 3, 3, dtype=torch.float64)
        want = F.conv2d(x, wt, padding=1)
        for tile, bound in [(4, WINOGRAD_F4_ERROR), (2, WINOGRAD_F4_ERROR / 10)]:
            monkeypatch.setenv("PYCONV_WINOGRAD_F4", str(tile // 4))
            got = PF.conv2d(x.float(), wt.float(), padding=1).double()
            assert (got - want).abs().max() <= bound * want.abs().max()
    monkeypatch.setenv("PYCONV_WINOGRAD_F4", "1")
    check_non_finite_inputs(3)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_winograd_chunked(monkeypatch, simd, fmt, tile):
    # the Winograd forward's chunked schedule (the default for transformed filters past 4 MiB
    # (F(2x2)) or 16 MiB (F(4x4))), forced on small layers: F(2x2)'s 480 tiles in three chunks of
    # 162 (the last one short), F(4x4)'s 128 in two of 66; channel counts off the vector widths;
    # the input gradient packs the layer's own filters flipped
    monkeypatch.setenv("PYCONV_CONV_WINOGRAD", "1")
    monkeypatch.setenv("PYCONV_WINOGRAD_CHUNKED", "1")
    monkeypatch.setenv("PYCONV_WINOGRAD_F4", str(tile // 4))
    for cin, cout, h, w in [(21, 37, 29, 31), (40, 16, 7, 5)]:
        x = torch.randn(2, cin, h, w, dtype=torch.float64).contiguous(memory_format=fmt)
        wt = torch.randn(cout, cin, 3, 3, dtype=torch.float64)
        b = torch.randn(cout, dtype=torch.float64)
        check_float32_layer(x, wt, b, dict(padding=1), fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_winograd_512_channels(simd, fmt):
    # ResNet's last stage, unforced: 512 -> 512 3x3 on 7x7 runs Winograd's chunked forward and
    # input gradient (and its weight gradient); float32 against float64 at the usual tolerance
    x = torch.randn(2, 512, 7, 7, dtype=torch.float64).contiguous(memory_format=fmt)
    wt = torch.randn(512, 512, 3, 3, dtype=torch.float64) / 48
    b = torch.randn(512, dtype=torch.float64)
    check_float32_layer(x, wt, b, dict(padding=1), fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize(
    "cin, cout, k, groups",
    [(16, 16, 3, 16), (16, 32, 1, 1), (16, 32, 3, 1), (3, 8, 3, 1), (40, 20, 5, 1)],
    ids=["depthwise", "pointwise", "winograd", "direct", "gemm"],
)
def test_fused_relu_keeps_nan(simd, fmt, cin, cout, k, groups):
    # torch's relu keeps NaN: every kernel's fused epilogue must too
    x = torch.randn(2, cin, 9, 10).contiguous(memory_format=fmt)
    x[0, :, 4, 5] = float("nan")
    w = torch.randn(cout, cin // groups, k, k)
    b = torch.randn(cout)
    ref = torch.relu(F.conv2d(x.double(), w.double(), b.double(), padding=k // 2, groups=groups))
    got = PF.conv2d(x, w, b, padding=k // 2, groups=groups, activation="relu")
    assert torch.equal(got.isnan(), ref.isnan()) and ref.isnan().any()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_weight_gradient_in_slices(monkeypatch, simd, fmt):
    # the implicit-GEMM weight gradient (Winograd off) cuts the pixels into slices (3 x 33 x 35
    # pixels: two on channels_last) and adds them in order: same values as float64, same bits on
    # every run
    monkeypatch.setenv("PYCONV_CONV_WINOGRAD", "0")
    x = torch.randn(3, 24, 33, 35, dtype=torch.float64).contiguous(memory_format=fmt)
    w = torch.randn(32, 24, 3, 3, dtype=torch.float64)
    ref = F.conv2d(x, w, None, padding=1)
    grad = torch.randn_like(ref).contiguous(memory_format=fmt)
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    want = torch.nn.grad.conv2d_weight(x, w.shape, grad, padding=1)
    got = ops.conv2d_backward_weight(grad.float(), x.float(), list(w.shape), *geometry)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)
    again = ops.conv2d_backward_weight(grad.float(), x.float(), list(w.shape), *geometry)
    assert torch.equal(got, again)


@pytest.mark.parametrize(
    "cin, cout, k, stride, pad, groups, size",
    [
        (3, 20, 7, 2, 3, 1, (40, 122)),  # a stem: several row blocks, a pixel and a channel tail
        (12, 20, 5, 1, 2, 2, (13, 17)),  # groups of 6 input channels
    ],
)
def test_weight_gradient_of_nchw_operands(simd, cin, cout, k, stride, pad, groups, size):
    # NCHW weight gradients of few input channels per group on the channels_last direct kernel,
    # reading both operands as NCHW (rows and grad_output blocks reordered in the kernel)
    x = torch.randn(2, cin, *size, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, k, k, dtype=torch.float64)
    args = dict(stride=stride, padding=pad, groups=groups)
    ref = F.conv2d(x, w, None, **args)
    grad = torch.randn_like(ref)
    want = torch.nn.grad.conv2d_weight(x, w.shape, grad, **args)
    wp = w.float().requires_grad_()
    (got,) = torch.autograd.grad(PF.conv2d(x.float(), wp, None, **args), wp, grad.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_float64_paths(simd, fmt):
    # float64 runs on the implicit GEMM (AVX2) or the portable loops (generic): forward with the
    # fused epilogue, input gradient (stride 1, and per phase at strides 2 and 3) and weight
    # gradient, against torch's float64 at float64 precision; shapes with partial register tiles,
    # reductions longer than one cache block (40 x 3 x 3 > 256 taps), groups and dilation
    geometry = [  # cin, cout, k, stride, padding, dilation, groups, height, width
        (3, 16, 3, 1, 1, 1, 1, 12, 19),
        (40, 21, 3, 1, 1, 1, 1, 9, 13),
        (40, 9, 3, 2, 1, 1, 1, 11, 14),
        (12, 30, 5, 3, 2, 1, 1, 16, 17),
        (16, 24, 3, 1, 2, 2, 4, 10, 11),
        (6, 12, (1, 3), (2, 1), (0, 1), 1, 3, 9, 20),
        (24, 33, 1, 1, 0, 1, 1, 7, 9),
        (24, 32, 1, 2, 0, 1, 2, 7, 9),
    ]
    for cin, cout, k, st, p, d, g, h, wd in geometry:
        kh, kw = (k, k) if isinstance(k, int) else k
        x = torch.randn(2, cin, h, wd, dtype=torch.float64).contiguous(memory_format=fmt)
        w = torch.randn(cout, cin // g, kh, kw, dtype=torch.float64)
        b = torch.randn(cout, dtype=torch.float64)
        args = dict(stride=st, padding=p, dilation=d, groups=g)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = F.conv2d(xr, wr, b, **args)
        res = torch.randn_like(ref).contiguous(memory_format=fmt)
        xp, wp = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = PF.conv2d(xp, wp, b, **args, activation="relu", residual=res)
        assert out.dtype == torch.float64 and out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out, torch.relu(ref + res), rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(ref).contiguous(memory_format=fmt)
        want = torch.autograd.grad(ref, (xr, wr), grad)
        got = torch.autograd.grad(PF.conv2d(xp, wp, b, **args), (xp, wp), grad)
        assert got[0].is_contiguous(memory_format=fmt)
        for a, e in zip(got, want, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_relu_backward_matches_threshold_backward(device, dtype):
    # the fused ReLU's gradient: 0 where the output is <= 0 (zeros and -0.0 included), the
    # gradient elsewhere, a NaN output passing it, exactly as torch's threshold_backward
    out = torch.randn(4, 8, 9, 10, device=device).to(dtype)
    out[0, 0, 0, :4] = torch.tensor([0.0, -0.0, float("nan"), float("inf")])
    out = out.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 8, 9, 10, device=device).to(dtype)
    grad[0, 0, 0, 4] = float("nan")
    got = ops.relu_backward(grad, out)
    want = torch.ops.aten.threshold_backward(grad, out, 0)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_depthwise_channels_last_streamed_output(simd):
    # outputs of 4 MiB or more are written with streaming stores (whole lines; AVX2: interior
    # columns, AVX-512: every column, the overlapping last block's twice)
    x = torch.randn(2, 64, 96, 97, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.randn(64, 1, 3, 3, dtype=torch.float64)
    b = torch.randn(64, dtype=torch.float64)
    res = torch.randn(2, 64, 96, 97, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last
    )
    want = torch.relu(F.conv2d(x, w, b, padding=1, groups=64) + res)
    got = PF.conv2d(
        x.float(),
        w.float(),
        b.float(),
        padding=1,
        groups=64,
        activation="relu",
        residual=res.float(),
    )
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_depthwise_channels_last_row_blocks(simd, k):
    # rows of unit stride and dilation along W (AVX-512: blocks of eight columns, each input vector
    # loaded once for the k taps that read it): 48 channels, rows of 29 (blocks, the last one
    # overlapping the one before, then edge columns on both sides), stride and dilation along H,
    # the fused epilogue, and the input gradient (the same forward on grad_output with the filters
    # turned)
    x = torch.randn(2, 48, 9, 29, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(48, 1, k, k, dtype=torch.float64)
    b = torch.randn(48, dtype=torch.float64)
    args = dict(stride=(2, 1), padding=(k // 2 + 1, k // 2), dilation=(2, 1), groups=48)
    check_float32_layer(x, w, b, args, torch.channels_last)
    check_float32_layer(x, w, b, dict(padding=k // 2, groups=48), torch.channels_last)


@pytest.mark.parametrize("channels", [21, 32])
@pytest.mark.parametrize("k, s, p, d", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 2, 3, 2), (1, 1, 0, 1)])
def test_depthwise_channels_last(simd, k, s, p, d, channels):
    # channels are the vector lanes: 21 channels leave a masked tail of 5; 32 take the blocks of
    # 16 channels x 4 columns
    x = torch.randn(2, channels, 15, 12, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.randn(channels, 1, k, k, dtype=torch.float64)
    b = torch.randn(channels, dtype=torch.float64)
    args = dict(stride=s, padding=p, dilation=d, groups=channels)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ref = F.conv2d(xr, wr, br, **args)
    res = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)
    xf, wf, bf = (t.float().requires_grad_() for t in (x, w, b))
    out = PF.conv2d(xf, wf, bf, **args, activation="relu", residual=res.float())
    assert out.is_contiguous(memory_format=torch.channels_last)
    close(out, torch.relu(ref + res), torch.float32)
    grad = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)
    want = torch.autograd.grad(ref, (xr, wr, br), grad)
    got = torch.autograd.grad(PF.conv2d(xf, wf, bf, **args), (xf, wf, bf), grad.float())
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_do_not_depend_on_thread_count(fmt, dtype):
    # every CPU path splits work by shape, not by thread count, and sums in a fixed order: the
    # forward and the three gradients are bit-identical on 1, 2 and 3 threads (Winograd, direct
    # and implicit-GEMM layers, a strided one; tasks go to whichever thread comes free)
    before = torch.get_num_threads()
    geometry = [(3, 16, 3, 1, 1), (32, 32, 3, 1, 1), (8, 12, 5, 2, 2), (32, 16, 5, 2, 2)]
    try:
        for c, k, r, st, p in geometry:
            x = torch.randn(3, c, 15, 17, dtype=dtype).contiguous(memory_format=fmt)
            w = torch.randn(k, c, r, r, dtype=dtype)
            go = torch.randn_like(F.conv2d(x, w, None, st, p)).contiguous(memory_format=fmt)
            args = ([st] * 2, [p] * 4, [1, 1], 1)
            runs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                runs.append(
                    (
                        ops.conv2d(x, w, None, *args, False, None),
                        ops.conv2d_backward_input(go, w, list(x.shape), *args),
                        ops.conv2d_backward_weight(go, x, list(w.shape), *args),
                        ops.conv2d_backward_bias(go),
                    )
                )
            for run in runs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))
    finally:
        torch.set_num_threads(before)
