"""Python twin of csrc/common/pool_shape.h, for fake kernels; tests hold the two equal."""


def pool_output_size(size, kernel, pad, stride, dilation, ceil_mode):
    """torch's pooling output size: with ceil_mode, a window must start inside the input or its
    left padding."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def pool_output_shape(input_shape, kernel_size, stride, padding, dilation, ceil_mode):
    h, w = input_shape[-2:]
    oh = pool_output_size(h, kernel_size[0], padding[0], stride[0], dilation[0], ceil_mode)
    ow = pool_output_size(w, kernel_size[1], padding[1], stride[1], dilation[1], ceil_mode)
    return (*input_shape[:-2], oh, ow)
