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


def conv_output_size(size, kernel, pad_begin, pad_end, stride, dilation):
    """Twin of conv_output_size in csrc/common/conv_shape.h."""
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def conv_output_shape(input_shape, weight_shape, stride, padding, dilation):
    """(N, K, OH, OW) of a convolution; padding is (top, bottom, left, right)."""
    n, _, h, w = input_shape
    k, _, r, s = weight_shape
    oh = conv_output_size(h, r, padding[0], padding[1], stride[0], dilation[0])
    ow = conv_output_size(w, s, padding[2], padding[3], stride[1], dilation[1])
    return (n, k, oh, ow)
