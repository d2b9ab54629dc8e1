"""pyconv: convolutional-network building blocks as hand-written CPU (SIMD) and CUDA kernels."""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers the operators)
