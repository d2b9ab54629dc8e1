"""pyconv: convolutional-network building blocks as hand-written CPU (SIMD) and CUDA kernels,
registered as PyTorch operators with autograd."""

import torch

from . import (  # noqa: F401
    _C,  # registers the operators
    functional,
    nn,
)
from .convert import ConvertReport, FusedConv2d, convert, fuse, param_groups

__version__ = _C.version()

__all__ = [
    "functional",
    "nn",
    "info",
    "empty_cache",
    "convert",
    "fuse",
    "param_groups",
    "ConvertReport",
    "FusedConv2d",
]


def info():
    """What was built and what runs here."""
    return {
        "version": _C.version(),
        "torch_built": _C.torch_version(),
        "torch_runtime": torch.__version__,
        "simd": _C.simd_path(),
        "cpu_has_avx2": _C.cpu_has_avx2(),
        "cpu_has_avx512": _C.cpu_has_avx512(),
        "threads": torch.get_num_threads(),
        "cuda_compiled": _C.cuda_compiled(),
        "cuda_archs": _C.cuda_archs(),
        "cuda_available": torch.cuda.is_available(),
        "cpu_buffer_cache": _C.cpu_cache_stats(),
    }


def empty_cache():
    """Return the large CPU output buffers that pyconv keeps for reuse to the operating system."""
    _C.cpu_cache_clear()
