"""Fake (meta) kernels and autograd formulas of the pyconv operators.

The compiled library (csrc/ops.cpp) defines the schemas and the CPU/CUDA kernels; this module adds
what torch.compile, torch.export and autograd need. Backward formulas save no per-element data.
"""

import torch

from . import _C  # noqa: F401  (the schemas must exist before registering against them)

_lib = torch.library


# --- dropout ---


@_lib.register_fake("pyconv::dropout")
def _dropout_fake(input, p, seed):
    return torch.empty_like(input)


@_lib.register_fake("pyconv::dropout_")
def _dropout_inplace_fake(input, p, seed):
    return None


@_lib.register_fake("pyconv::dropout2d")
def _dropout2d_fake(input, p, seed):
    torch._check(input.dim() >= 2, lambda: "dropout2d: expected an input of at least 2 dimensions")
    return torch.empty_like(input)


@_lib.register_fake("pyconv::dropout2d_")
def _dropout2d_inplace_fake(input, p, seed):
    return None


def _dropout_setup(ctx, inputs, output):
    _, p, seed = inputs
    ctx.p = p
    # The mask is a function of (seed, memory position in the output): remember the output's
    # layout (strides only) and the 8-byte seed. Nothing per element is kept.
    ctx.out_stride = output.stride()
    ctx.save_for_backward(seed)


def _in_layout(grad, stride):
    if grad.stride() == tuple(stride):
        return grad
    return grad.new_empty_strided(grad.shape, stride).copy_(grad)


def _dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    grad_input = torch.ops.pyconv.dropout(_in_layout(grad, ctx.out_stride), ctx.p, seed)
    return grad_input, None, None


_lib.register_autograd("pyconv::dropout", _dropout_backward, setup_context=_dropout_setup)


def _dropout2d_setup(ctx, inputs, output):
    _, p, seed = inputs
    ctx.p = p
    ctx.save_for_backward(seed)  # the channel mask does not depend on the layout


def _dropout2d_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return torch.ops.pyconv.dropout2d(grad, ctx.p, seed), None, None


_lib.register_autograd("pyconv::dropout2d", _dropout2d_backward, setup_context=_dropout2d_setup)
