"""Benchmark bodies of max_pool2d and avg_pool2d: pyconv against torch.nn.functional."""

import torch
import torch.nn.functional as F

import pyconv.functional as PF


def make_input(case, device):
    x = torch.randn(case.shape, device=device).to(case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def callables(case, device):
    """(torch_fn, pyconv_fn, copy_fn, error_fn, bytes_moved) for one case (see dropout.py)."""
    k, s, p = case.pool
    if case.op == "max_pool2d":

        def torch_op(t):
            return F.max_pool2d(t, k, s, p)

        def our_op(t):
            return PF.max_pool2d(t, k, s, p)

    else:

        def torch_op(t):
            return F.avg_pool2d(t, k, s, p)

        def our_op(t):
            return PF.avg_pool2d(t, k, s, p)

    x = make_input(case, device)
    out = torch_op(x)
    es = x.element_size()
    extra = out.numel() if case.op == "max_pool2d" else 0  # the 1-byte argmax
    fwd_bytes = (x.numel() + out.numel()) * es + extra
    if case.mode == "fwd":

        def run(op):
            return lambda: op(x)

        nbytes = fwd_bytes
    else:
        xg = x.detach().requires_grad_()
        grad = torch.randn_like(out)

        def run(op):
            def fb():
                torch.autograd.grad(op(xg), xg, grad)

            return fb

        nbytes = 2 * fwd_bytes  # backward: read grad (and argmax), write grad_input

    def max_abs_error():
        ref = torch_op(x.double())
        return (our_op(x).double() - ref).abs().max().item()

    src = torch.empty(nbytes // 2 // es, dtype=x.dtype, device=device)
    dst = torch.empty_like(src)
    return run(torch_op), run(our_op), lambda: dst.copy_(src), max_abs_error, nbytes
