"""torch.nn.functional-style entry points of the pyconv operators."""

import warnings

import torch

from . import _registry  # noqa: F401  (fake kernels and autograd)

__all__ = [
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "max_pool2d",
    "avg_pool2d",
    "conv2d",
]


def _check_p(p):
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def _draw_seed(generator):
    """One 63-bit seed from torch's default CPU generator, or from `generator` on its device."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=device, generator=generator)


def _run(op, op_, input, p, inplace, generator):
    seed = _draw_seed(generator)
    if not inplace:
        return op(input, p, seed)
    if torch.is_grad_enabled() and input.requires_grad:
        # Autograd of an in-place op: compute out of place and copy back, so that the graph sees
        # an in-place update of `input` (and refuses it on a leaf, as torch does).
        return input.copy_(op(input, p, seed))
    op_(input, p, seed)
    return input


def dropout(input, p=0.5, training=True, inplace=False, *, generator=None):
    """Zeroes each element of `input` with probability `p`, scaling the rest by 1 / (1 - p).

    Same meaning as ``torch.nn.functional.dropout``. The mask comes from a counter-based Philox
    stream seeded from torch's generator, so ``torch.manual_seed`` reproduces it, on the CPU and
    on CUDA alike. Backward keeps no mask: it regenerates it from the 8-byte seed.
    """
    _check_p(p)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    ops = torch.ops.pyconv
    return _run(ops.dropout, ops.dropout_, input, p, inplace, generator)


def _feature_dropout(input, p, inplace, generator):
    ops = torch.ops.pyconv
    return _run(ops.dropout2d, ops.dropout2d_, input, p, inplace, generator)


def dropout2d(input, p=0.5, training=True, inplace=False, *, generator=None):
    """Zeroes whole channels: input[n, c] is dropped with probability `p` (torch's dropout2d)."""
    _check_p(p)
    dim = input.dim()
    if dim not in (3, 4):
        warnings.warn(
            f"dropout2d: Received a {dim}-D input to dropout2d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead. Note that dropout2d "
            "exists to provide channel-wise dropout on inputs with 2 spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. 3D or 4D inputs).",
            stacklevel=2,
        )
    if dim == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
            "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim. This behavior will change in a future release to interpret the "
            "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
            "channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=2,
        )
    if not training or p == 0.0 or input.numel() == 0:
        return input
    return _feature_dropout(input, p, inplace, generator)


def _maybe_batched(input, p, training, inplace, generator, batched):
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if batched:
        return _feature_dropout(input, p, inplace, generator)
    out = _feature_dropout(input.unsqueeze(0), p, inplace, generator)
    return input if inplace else out.squeeze(0)


def dropout1d(input, p=0.5, training=True, inplace=False, *, generator=None):
    """Channel-wise dropout of (N, C, L) or unbatched (C, L) input (torch's dropout1d)."""
    _check_p(p)
    dim = input.dim()
    if dim not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {dim}D input. "
            "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
            "spatial dimension, a channel dimension, and an optional batch dimension "
            "(i.e. 2D or 3D inputs)."
        )
    return _maybe_batched(input, p, training, inplace, generator, dim == 3)


def dropout3d(input, p=0.5, training=True, inplace=False, *, generator=None):
    """Channel-wise dropout of (N, C, D, H, W) or unbatched (C, D, H, W) input (as torch)."""
    _check_p(p)
    dim = input.dim()
    if dim not in (4, 5):
        warnings.warn(
            f"dropout3d: Received a {dim}-D input to dropout3d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead. Note that dropout3d "
            "exists to provide channel-wise dropout on inputs with 3 spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. 4D or 5D inputs).",
            stacklevel=2,
        )
    return _maybe_batched(input, p, training, inplace, generator, dim == 5)


# --- pooling ---


def _pair(value, name, op):
    if isinstance(value, int):
        return [value, value]
    value = [int(v) for v in value]
    if len(value) == 1:
        return value * 2
    if len(value) != 2:
        raise RuntimeError(f"{op}: {name} must either be a single int, or a tuple of two ints")
    return value


def _pool_args(op, kernel_size, stride, padding):
    k = _pair(kernel_size, "kernel_size", op)
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else None
    s = s or _pair(stride, "stride", op)
    return k, s, _pair(padding, "padding", op)


def max_pool2d(
    input,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode=False,
    return_indices=False,
):
    """2-D max pooling with torch.nn.functional.max_pool2d's arguments and results.

    Backward keeps one byte per output element (the position of the maximum inside its window);
    torch's int64 indices are built only when ``return_indices=True`` asks for them.
    """
    k, s, p = _pool_args("max_pool2d", kernel_size, stride, padding)
    d = _pair(dilation, "dilation", "max_pool2d")
    out, argmax = torch.ops.pyconv.max_pool2d(input, k, s, p, d, bool(ceil_mode))
    if return_indices:
        indices = torch.ops.pyconv.max_pool2d_indices(
            argmax, list(input.shape), k, s, p, d, bool(ceil_mode)
        )
        return out, indices
    return out


def avg_pool2d(
    input,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    """2-D average pooling with torch.nn.functional.avg_pool2d's arguments and results."""
    k, s, p = _pool_args("avg_pool2d", kernel_size, stride, padding)
    return torch.ops.pyconv.avg_pool2d(
        input, k, s, p, bool(ceil_mode), bool(count_include_pad), divisor_override
    )


# --- convolution ---


def _conv_padding(padding, weight, dilation, stride):
    """(top, bottom, left, right) from torch's padding argument."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding != "same":
            raise RuntimeError(f"Invalid padding string: '{padding}'")
        if any(s != 1 for s in stride):
            raise RuntimeError("padding='same' is not supported for strided convolutions")
        pads = []
        for k, d in zip(weight.shape[2:], dilation, strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]  # the odd one goes after, as torch
        return pads
    ph, pw = _pair(padding, "padding", "conv2d")
    return [ph, ph, pw, pw]


def _autocast(t, dtype):
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def conv2d(
    input,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    *,
    activation=None,
    residual=None,
):
    """2-D convolution with torch.nn.functional.conv2d's arguments (padding: int, tuple, 'valid' or
    'same'), and a fused epilogue: ``activation(conv(input) + bias + residual)`` in one pass over
    the output, with ``activation`` None or ``'relu'`` and ``residual`` None or a tensor of the
    output's shape.
    """
    if activation not in (None, "relu"):
        raise ValueError(f"conv2d: activation must be None or 'relu', got {activation!r}")
    s = _pair(stride, "stride", "conv2d")
    d = _pair(dilation, "dilation", "conv2d")
    p = _conv_padding(padding, weight, d, s)
    if torch.is_autocast_enabled(input.device.type):
        # as torch's conv2d under autocast: float32/16-bit operands to the autocast dtype
        dtype = torch.get_autocast_dtype(input.device.type)
        input, weight, bias, residual = (
            _autocast(t, dtype) for t in (input, weight, bias, residual)
        )
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
        residual = residual.unsqueeze(0) if residual is not None else None
    out = torch.ops.pyconv.conv2d(
        input, weight, bias, s, p, d, int(groups), activation == "relu", residual
    )
    return out.squeeze(0) if unbatched else out
