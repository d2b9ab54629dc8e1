"""Benchmark bodies of conv2d: pyconv against torch.nn.functional.conv2d (oneDNN on the CPU)."""

import torch
import torch.nn.functional as F

import pyconv.functional as PF

UNIT = "GFLOP/s"


def callables(case, device):
    """(torch_fn, pyconv_fn, None, error_fn, flops) for one case; case.conv is
    (in_channels, out_channels, kernel, stride, padding, groups[, dilation])."""
    cin, cout, k, stride, pad, groups, *rest = case.conv
    dilation = rest[0] if rest else 1
    n, _, h, w = case.shape
    x = torch.randn(n, cin, h, w, device=device).to(case.dtype)
    wt = (
        torch.randn(cout, cin // groups, k, k, device=device).to(case.dtype) * (cin * k * k) ** -0.5
    )
    b = torch.randn(cout, device=device).to(case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if device == "cuda":  # read by torch (cuDNN) and pyconv alike, at each call
        torch.backends.cudnn.allow_tf32 = case.tf32 is not False
    args = dict(stride=stride, padding=pad, dilation=dilation, groups=groups)
    out = F.conv2d(x, wt, b, **args)
    flops = 2 * out.numel() * (cin // groups) * k * k
    res = torch.randn_like(out)
    if case.mode == "fwd":

        def run(op):
            return lambda: op(x, wt, b, **args)

    elif case.mode == "fused":  # relu(conv + bias + residual): torch's conv, add and relu
        fns = (
            lambda: torch.relu(F.conv2d(x, wt, b, **args) + res),
            lambda: PF.conv2d(x, wt, b, **args, activation="relu", residual=res),
        )

        def max_abs_error():
            ref = torch.relu(F.conv2d(x.double(), wt.double(), b.double(), **args) + res.double())
            got = PF.conv2d(x, wt, b, **args, activation="relu", residual=res)
            return (got.double() - ref).abs().max().item()

        return fns[0], fns[1], None, max_abs_error, flops

    else:
        xg, wg, bg = (t.detach().requires_grad_() for t in (x, wt, b))
        grad = torch.randn_like(out)

        def run(op):
            return lambda: torch.autograd.grad(op(xg, wg, bg, **args), (xg, wg, bg), grad)

        flops *= 3  # input and weight gradients cost a forward each

    def max_abs_error():
        ref = F.conv2d(x.double(), wt.double(), b.double(), **args)
        return (PF.conv2d(x, wt, b, **args).double() - ref).abs().max().item()

    return run(F.conv2d), run(PF.conv2d), None, max_abs_error, flops
