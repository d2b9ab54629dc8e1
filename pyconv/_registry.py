"""Fake (meta) kernels and autograd formulas of the pyconv operators.

The compiled library (csrc/ops.cpp) defines the schemas and the CPU/CUDA kernels; this module adds
what torch.compile, torch.export and autograd need. Backward formulas save no per-element data.
"""

import torch
from torch._prims_common import suggest_memory_format

from . import _C  # noqa: F401  (the schemas must exist before registering against them)
from ._sizes import conv_output_shape, pool_output_shape

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


# --- convolution ---


@_lib.register_fake("pyconv::conv2d")
def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups, relu, residual):
    shape = conv_output_shape(input.shape, weight.shape, stride, padding, dilation)
    return _pool_empty(input, shape)


@_lib.register_fake("pyconv::conv2d_backward_input")
def _conv2d_backward_input_fake(grad_output, weight, input_size, stride, padding, dilation, groups):
    return _pool_empty(grad_output, input_size)


@_lib.register_fake("pyconv::conv2d_backward_weight")
def _conv2d_backward_weight_fake(
    grad_output, input, weight_size, stride, padding, dilation, groups
):
    # in the input's layout, as torch's: channels_last for channels_last input
    cl = input.dim() == 4 and suggest_memory_format(input) == torch.channels_last
    return torch.empty(
        weight_size,
        dtype=grad_output.dtype,
        device=grad_output.device,
        memory_format=torch.channels_last if cl else torch.contiguous_format,
    )


@_lib.register_fake("pyconv::conv2d_backward_bias")
def _conv2d_backward_bias_fake(grad_output):
    return grad_output.new_empty(grad_output.shape[1])


@_lib.register_fake("pyconv::relu_backward")
def _relu_backward_fake(grad_output, output):
    return _pool_empty(output, output.shape, grad_output.dtype)


# conv2d's own autograd formula is C++ (csrc/conv2d_autograd.cpp): it runs once per conv of
# every training step, where a Python formula's overhead is as long as a small layer.


# Double backward: each backward op is linear in each argument, and its adjoints are the other
# convolution ops, so gradient penalties run on the same kernels.
def _backward_input_setup(ctx, inputs, output):
    grad_output, weight, _, *ctx.geometry = inputs
    ctx.save_for_backward(grad_output, weight)


def _backward_input_backward(ctx, ggi):
    grad_output, weight = ctx.saved_tensors
    ops = torch.ops.pyconv
    dgo = dw = None
    if ctx.needs_input_grad[0]:
        dgo = ops.conv2d(ggi, weight, None, *ctx.geometry, False, None)
    if ctx.needs_input_grad[1]:
        dw = ops.conv2d_backward_weight(grad_output, ggi, list(weight.shape), *ctx.geometry)
    return dgo, dw, None, None, None, None, None


_lib.register_autograd(
    "pyconv::conv2d_backward_input", _backward_input_backward, setup_context=_backward_input_setup
)


def _backward_weight_setup(ctx, inputs, output):
    grad_output, input, _, *ctx.geometry = inputs
    ctx.save_for_backward(grad_output, input)


def _backward_weight_backward(ctx, ggw):
    grad_output, input = ctx.saved_tensors
    ops = torch.ops.pyconv
    dgo = dx = None
    if ctx.needs_input_grad[0]:
        dgo = ops.conv2d(input, ggw, None, *ctx.geometry, False, None)
    if ctx.needs_input_grad[1]:
        dx = ops.conv2d_backward_input(grad_output, ggw, list(input.shape), *ctx.geometry)
    return dgo, dx, None, None, None, None, None


_lib.register_autograd(
    "pyconv::conv2d_backward_weight",
    _backward_weight_backward,
    setup_context=_backward_weight_setup,
)


def _backward_bias_setup(ctx, inputs, output):
    ctx.shape = inputs[0].shape


def _backward_bias_backward(ctx, ggb):
    return ggb.view(1, -1, 1, 1).expand(ctx.shape)


_lib.register_autograd(
    "pyconv::conv2d_backward_bias", _backward_bias_backward, setup_context=_backward_bias_setup
)


def _relu_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _relu_backward_backward(ctx, gg):
    (output,) = ctx.saved_tensors
    return torch.ops.pyconv.relu_backward(gg, output), None


_lib.register_autograd(
    "pyconv::relu_backward", _relu_backward_backward, setup_context=_relu_backward_setup
)
