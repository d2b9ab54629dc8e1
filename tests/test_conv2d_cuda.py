"""conv2d on CUDA: each kernel family forced in turn (implicit GEMM on tensor cores or SIMT, and the
direct kernels) against float64 torch, on small option-space configurations and on ResNet layer
shapes that take the 16-byte channels_last loads; determinism of the weight gradient."""

import pytest
import torch
import torch.nn.functional as F
from test_conv2d import CONFIGS, ids, make

import pyconv
import pyconv.functional as PF

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# relative error ||out - ref|| / ||ref|| allowed per compute mode
REL = {"float32": 1e-5, "float64": 1e-12, "tf32": 3e-3, "float16": 3e-3, "bfloat16": 2e-2}
MODES = {
    "float32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "float64": (torch.float64, False),
    "float16": (torch.float16, False),
    "bfloat16": (torch.bfloat16, False),
}


@pytest.fixture(params=["gemm", "direct"])
def cuda_path(request):
    pyconv._C.set_cuda_conv_path(request.param)
    yield request.param
    pyconv._C.set_cuda_conv_path("auto")


@pytest.fixture(params=list(MODES))
def mode(request):
    dtype, tf32 = MODES[request.param]
    torch.backends.cudnn.allow_tf32 = tf32
    return request.param, dtype


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output (an element left unwritten?)"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def grads(fn, x, w, b, grad):
    ts = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    out = fn(*ts)
    return (out, *torch.autograd.grad(out, ts, grad.to(out.dtype)))


@pytest.mark.parametrize("config", CONFIGS, ids=ids)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_cuda_paths_forward_backward(cuda_path, mode, config, fmt):
    name, dtype = mode
    x, w, b, args = make(config, "cuda", dtype)
    x = x.contiguous(memory_format=fmt)
    grad = torch.randn_like(F.conv2d(x.double(), w.double(), b.double(), **args))
    ref = grads(lambda x, w, b: F.conv2d(x, w, b, **args), x.double(), w.double(), b.double(), grad)
    got = grads(lambda x, w, b: PF.conv2d(x, w, b, **args), x, w, b, grad)
    assert got[0].dtype == dtype
    if fmt == torch.channels_last:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    for what, a, e in zip(["out", "grad_input", "grad_weight", "grad_bias"], got, ref, strict=True):
        assert a.shape == e.shape, what
        assert rel_err(a, e) < REL[name], what


# ResNet-like layers: (N, C, H, W, K, kernel, stride, padding, groups)
LAYERS = [
    (2, 64, 14, 14, 64, 3, 1, 1, 1),
    (2, 64, 15, 15, 128, 3, 2, 1, 1),
    (3, 64, 8, 8, 256, 1, 1, 0, 1),
    (2, 128, 9, 7, 40, 1, 2, 0, 1),
    (2, 3, 33, 31, 64, 7, 2, 3, 1),
    (2, 64, 12, 12, 64, 3, 1, 1, 4),
    (2, 32, 10, 10, 32, 3, 1, 1, 32),
]


@pytest.mark.parametrize("layer", LAYERS, ids=ids)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_cuda_layers(mode, layer, fmt):
    name, dtype = mode
    n, c, h, wd, k, ks, s, p, g = layer
    x = torch.randn(n, c, h, wd, device="cuda", dtype=torch.float64)
    w = (
        torch.randn(k, c // g, ks, ks, device="cuda", dtype=torch.float64)
        * (c // g * ks * ks) ** -0.5
    )
    b = torch.randn(k, device="cuda", dtype=torch.float64)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    x = x.contiguous(memory_format=fmt)
    args = dict(stride=s, padding=p, groups=g)
    res = torch.randn(F.conv2d(x.double(), w.double(), None, **args).shape, device="cuda").to(dtype)
    res = res.contiguous(memory_format=fmt)
    out = PF.conv2d(x, w, b, **args, activation="relu", residual=res)
    ref = torch.relu(F.conv2d(x.double(), w.double(), b.double(), **args) + res.double())
    assert rel_err(out, ref) < REL[name]
    grad = torch.randn_like(ref)
    want = grads(
        lambda x, w, b: F.conv2d(x, w, b, **args), x.double(), w.double(), b.double(), grad
    )
    got = grads(lambda x, w, b: PF.conv2d(x, w, b, **args), x, w, b, grad)
    for what, a, e in zip(
        ["out", "grad_input", "grad_weight", "grad_bias"], got, want, strict=True
    ):
        assert rel_err(a, e) < REL[name], what


def test_cuda_weight_gradient_is_deterministic():
    torch.backends.cudnn.allow_tf32 = True
    x = torch.randn(16, 64, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device="cuda")
    out = PF.conv2d(x, w, None, padding=1)
    g = torch.randn_like(out)
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    first = torch.ops.pyconv.conv2d_backward_weight(g, x, list(w.shape), *geometry)
    for _ in range(3):
        again = torch.ops.pyconv.conv2d_backward_weight(g, x, list(w.shape), *geometry)
        assert torch.equal(first, again)


def test_cuda_gradcheck_both_paths(cuda_path):
    x, w, b, args = make(CONFIGS[1], "cuda", torch.float64)
    x, w, b = (
        t[:1, :, :6, :5].clone() if t.dim() == 4 and t is x else t.clone() for t in (x, w, b)
    )
    fn = lambda x, w, b: PF.conv2d(x, w, b, **args, activation="relu")  # noqa: E731
    ts = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(fn, ts)
    assert torch.autograd.gradgradcheck(fn, ts)


def test_cuda_any_strides_and_empty():
    x = torch.randn(2, 16, 12, 24, device="cuda", dtype=torch.float64)[..., ::2]
    w = torch.randn(8, 16, 3, 3, device="cuda", dtype=torch.float64)
    assert rel_err(PF.conv2d(x, w, None, padding=1), F.conv2d(x, w, None, padding=1)) < 1e-12
    e = torch.empty(0, 16, 12, 12, device="cuda")
    assert PF.conv2d(e, w.float(), None, padding=1).shape == (0, 8, 12, 12)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_cuda_fused_relu_keeps_nan(cuda_path, fmt):
    # torch's relu keeps NaN: the fused epilogue of each path must too
    x = torch.randn(2, 16, 9, 10, device="cuda").contiguous(memory_format=fmt)
    x[0, :, 4, 5] = float("nan")
    w = torch.randn(32, 16, 3, 3, device="cuda")
    b = torch.randn(32, device="cuda")
    ref = torch.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1))
    got = PF.conv2d(x, w, b, padding=1, activation="relu")
    assert torch.equal(got.isnan(), ref.isnan()) and ref.isnan().any()
