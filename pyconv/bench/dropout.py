"""Benchmark bodies of dropout and dropout2d: pyconv against torch.nn.functional."""

import torch
import torch.nn.functional as F

import pyconv.functional as PF


def make_input(case, device):
    x = torch.randn(case.shape, device=device).to(case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def callables(case, device):
    """(torch_fn, pyconv_fn, copy_fn, error_fn, bytes_moved) for one case; copy_fn moves the same
    bytes as pyconv's minimum with plain copies (the memory ceiling at this size)."""
    torch_op = F.dropout if case.op == "dropout" else F.dropout2d
    our_op = PF.dropout if case.op == "dropout" else PF.dropout2d
    x = make_input(case, device)
    p = case.p
    if case.mode == "fwd":

        def run(op):
            return lambda: op(x, p, True)

        passes = 2  # read x, write y
    else:
        xg = x.detach().requires_grad_()
        grad = torch.randn_like(xg)

        def run(op):
            def fb():
                y = op(xg, p, True)
                torch.autograd.grad(y, xg, grad)

            return fb

        passes = 4  # forward: read x, write y; backward: read grad, write grad_input

    def max_abs_error():
        # torch's own ops applied with pyconv's mask, in float64, against pyconv's output
        y = our_op(x, p, True)
        keep = y != 0
        ref = torch.where(
            keep, x.double() / (1 - p), torch.zeros((), dtype=torch.float64, device=device)
        )
        return (y.double() - ref).abs().max().item()

    nbytes = passes * x.numel() * x.element_size()
    dst = torch.empty_like(x)

    def copies():
        for _ in range(passes // 2):
            dst.copy_(x)

    return run(torch_op), run(our_op), copies, max_abs_error, nbytes
