"""Shared fixtures and reference helpers for the pyconv test suite."""

import numpy as np
import pytest
import torch

import pyconv  # noqa: F401  (registers the operators)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Tolerances for comparing pyconv (in its own dtype) against a float64 reference.
TOLERANCES = {
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Seeds torch, and makes every CPU output buffer start as NaN bytes, so that an element a
    kernel fails to write fails the comparison instead of passing as a lucky zero."""
    torch.manual_seed(0)  # every test sees the same inputs on every run
    pyconv._C.cpu_cache_set_poison(True)
    yield
    pyconv._C.cpu_cache_set_poison(False)
    pyconv.empty_cache()


@pytest.fixture(autouse=True)
def strict_float32_convolutions():
    """float32 convolutions compare against float64 at float32's tolerance: TF32 (which torch
    allows for cuDNN convolutions by default, and pyconv follows) is turned off unless a test
    turns it on."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda t: str(t).removeprefix("torch."))
def dtype(request):
    return request.param


def simd_paths():
    """The CPU instruction-set paths this machine can run."""
    paths = ["generic"]
    if pyconv._C.cpu_has_avx2():
        paths.append("avx2")
    if pyconv._C.cpu_has_avx512():
        paths.append("avx512")
    return paths


@pytest.fixture(params=simd_paths())
def simd(request):
    before = pyconv._C.simd_path()
    pyconv._C.set_simd_path(request.param)
    yield request.param
    pyconv._C.set_simd_path(before)


def assert_close_to(actual, expected64, dtype):
    """Compare a result in `dtype` with a float64 reference, at that dtype's tolerance."""
    torch.testing.assert_close(actual.double(), expected64, **TOLERANCES[dtype])


def layouts(x):
    """The same values in the layouts every op must accept: contiguous, channels_last (4-D) and
    a non-contiguous view (every other element of a wider tensor)."""
    out = {"contiguous": x.contiguous()}
    if x.dim() == 4:
        out["channels_last"] = x.contiguous(memory_format=torch.channels_last)
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    out["strided"] = wide[..., ::2]
    return out


# --- an independent Philox4x32-10 (numpy), to check the compiled stream bit for bit -------------

_MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    c = [np.asarray(v, dtype=np.uint64) & _MASK for v in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0) & _MASK, np.uint64(k1) & _MASK
    for r in range(10):
        if r:
            k0 = (k0 + np.uint64(0x9E3779B9)) & _MASK
            k1 = (k1 + np.uint64(0xBB67AE85)) & _MASK
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ k0,
            p1 & _MASK,
            (p0 >> np.uint64(32)) ^ c[3] ^ k1,
            p0 & _MASK,
        ]
    return c


def philox_draws(seed, n, offset=0):
    """Draws 0 .. n-1 of the stream keyed by (seed, offset): element i is word (i // 8) % 4 of
    group (i // 32) * 8 + i % 8."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    i = np.arange(n, dtype=np.uint64)
    group = (i >> np.uint64(5)) * np.uint64(8) + (i & np.uint64(7))
    word = ((i >> np.uint64(3)) & np.uint64(3)).astype(np.int64)
    out = philox4x32_10(
        group & _MASK,
        group >> np.uint64(32),
        offset & 0xFFFFFFFF,
        offset >> 32,
        seed & 0xFFFFFFFF,
        seed >> 32,
    )
    return np.choose(word, out).astype(np.uint64)


def keep_threshold(p):
    t = p * 4294967296.0
    return 0xFFFFFFFF if t >= 4294967295.0 else int(t)


def reference_keep(seed, n, p):
    """The keep mask pyconv's dropout must produce for draws 0 .. n-1."""
    if p >= 1.0:
        return torch.zeros(n, dtype=torch.bool)
    return torch.from_numpy(philox_draws(seed, n) >= np.uint64(keep_threshold(p)))


def is_dense(t):
    """True when the elements of `t` fill its memory span exactly once (any order of strides)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def memory_order(t):
    """The elements of a dense tensor in memory order (a 1-D view of its storage span)."""
    assert is_dense(t)
    return t.as_strided((t.numel(),), (1,))
