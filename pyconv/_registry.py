"""Fake (meta) kernels and autograd formulas of the pyconv operators.

The compiled library (csrc/ops.cpp) defines the schemas and the CPU/CUDA kernels; this module adds
what torch.compile, torch.export and autograd need. Backward formulas save no per-element data.
"""

import torch
from torch._prims_common import suggest_memory_format

from . import _C  # noqa: F401  (the schemas must exist before registering against them)
from ._sizes import pool_output_shape

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


# --- pooling ---


def _pool_format(t):
    # the layout the kernels run in: torch's suggest_memory_format, as csrc/common/pool.h
    return suggest_memory_format(t) if t.dim() == 4 else torch.contiguous_format


def _pool_empty(like, shape, dtype=None):
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device).contiguous(
        memory_format=_pool_format(like)
    )


def _argmax_dtype(kernel_size):
    return torch.uint8 if kernel_size[0] * kernel_size[1] <= 256 else torch.int32


@_lib.register_fake("pyconv::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    shape = pool_output_shape(input.shape, kernel_size, stride, padding, dilation, ceil_mode)
    return _pool_empty(input, shape), _pool_empty(input, shape, _argmax_dtype(kernel_size))


@_lib.register_fake("pyconv::max_pool2d_backward")
def _max_pool2d_backward_fake(
    grad_output, argmax, input_size, kernel_size, stride, padding, dilation, ceil_mode
):
    return _pool_empty(argmax, input_size, grad_output.dtype)


@_lib.register_fake("pyconv::max_pool2d_indices")
def _max_pool2d_indices_fake(argmax, input_size, kernel_size, stride, padding, dilation, ceil_mode):
    return _pool_empty(argmax, argmax.shape, torch.int64)


@_lib.register_fake("pyconv::avg_pool2d")
def _avg_pool2d_fake(
    input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
):
    shape = pool_output_shape(input.shape, kernel_size, stride, padding, (1, 1), ceil_mode)
    return _pool_empty(input, shape)


@_lib.register_fake("pyconv::avg_pool2d_backward")
def _avg_pool2d_backward_fake(
    grad_output, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor
):
    return _pool_empty(grad_output, input_size)


def _max_pool2d_setup(ctx, inputs, output):
    input, ctx.kernel_size, ctx.stride, ctx.padding, ctx.dilation, ctx.ceil_mode = inputs
    ctx.input_size = list(input.shape)
    _, argmax = output
    ctx.mark_non_differentiable(argmax)
    ctx.save_for_backward(argmax)  # one byte per output element; neither input nor output


def _max_pool2d_backward(ctx, grad_output, _grad_argmax):
    (argmax,) = ctx.saved_tensors
    grad_input = torch.ops.pyconv.max_pool2d_backward(
        grad_output,
        argmax,
        ctx.input_size,
        ctx.kernel_size,
        ctx.stride,
        ctx.padding,
        ctx.dilation,
        ctx.ceil_mode,
    )
    return grad_input, None, None, None, None, None


_lib.register_autograd("pyconv::max_pool2d", _max_pool2d_backward, setup_context=_max_pool2d_setup)


def _avg_pool2d_setup(ctx, inputs, output):
    input, *ctx.params = inputs  # kernel_size, stride, padding, ceil_mode, count_include_pad, div
    ctx.input_size = list(input.shape)


def _avg_pool2d_backward(ctx, grad_output):
    grad_input = torch.ops.pyconv.avg_pool2d_backward(grad_output, ctx.input_size, *ctx.params)
    return grad_input, None, None, None, None, None, None


_lib.register_autograd("pyconv::avg_pool2d", _avg_pool2d_backward, setup_context=_avg_pool2d_setup)


# Average pooling's backward is linear in grad_output, and its adjoint is the forward: double
# backward (gradient penalties) runs on the same kernels.
def _avg_pool2d_backward_setup(ctx, inputs, output):
    _, _, *ctx.params = inputs


def _avg_pool2d_double_backward(ctx, grad_grad_input):
    gg = torch.ops.pyconv.avg_pool2d(grad_grad_input, *ctx.params)
    return gg, None, None, None, None, None, None, None


_lib.register_autograd(
    "pyconv::avg_pool2d_backward",
    _avg_pool2d_double_backward,
    setup_context=_avg_pool2d_backward_setup,
)
