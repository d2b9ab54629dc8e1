"""Builds pyconv._C: CPU sources always, CUDA sources when nvcc and a CUDA build of torch exist."""

import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _cuda_home_from_nvcc():
    """The toolkit root as nvcc itself reports it (its `TOP=` line), for wrapper scripts on PATH."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        m = re.search(r"TOP=(\S+)", line)
        if m:
            return os.path.realpath(m.group(1))
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
if not os.environ.get("CUDA_HOME") and not os.environ.get("PYCONV_NO_CUDA"):
    home = _cuda_home_from_nvcc()
    if home:
        os.environ["CUDA_HOME"] = home

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _want_cuda():
    if os.environ.get("PYCONV_NO_CUDA", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None and shutil.which("nvcc")


def _sources(pattern):
    return sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )


def _arch_list():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            archs = ";".join(f"{a}.{b}" for a, b in sorted(caps))
        else:
            archs = "9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def _extension():
    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/**/*.cpp")
    # The C++ standard is the one torch.utils.cpp_extension picks for the installed torch.
    # -fopenmp: at::parallel_for is a header template that threads through OpenMP only when the
    # extension itself is compiled with it; the runtime is torch's own libgomp (same soname), so
    # torch.set_num_threads governs our loops too.
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    link = ["-fopenmp"]
    macros = [
        ("PYCONV_VERSION", f'"{VERSION}"'),
        ("PYCONV_TORCH_VERSION", f'"{torch.__version__.split("+")[0]}"'),
    ]
    if _want_cuda():
        archs = _arch_list()
        macros += [("PYCONV_WITH_CUDA", "1"), ("PYCONV_CUDA_ARCHS", f'"{archs}"')]
        nvcc = ["-O3", "-lineinfo"]
        if os.environ.get("PYCONV_PTXAS_VERBOSE", "0") not in ("", "0"):
            nvcc.append("-Xptxas=-v")  # registers, shared memory and spills per kernel
        return CUDAExtension(
            "pyconv._C",
            cpu_sources + _sources("csrc/cuda/**/*.cu"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension(
        "pyconv._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


# PYCONV_SKIP_EXT=1: install the package (e.g. `pip install -e .`) without compiling; the Makefile
# then builds the extension in place with `setup.py build_ext --inplace`, incrementally.
_skip_ext = os.environ.get("PYCONV_SKIP_EXT", "0") not in ("", "0")

setup(
    name="pyconv",
    version=VERSION,
    packages=find_packages(include=["pyconv", "pyconv.*"]),
    ext_modules=[] if _skip_ext else [_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
