"""Interleaved timing of competing implementations: median of repeated runs after warm-up."""

import statistics
import time

import torch


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns, device, repeat, warmup=2, inner=1):
    """Median seconds per call of each function in `fns` (a dict), the functions taking turns so
    that drifts in clock speed or memory state hit them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():

            def run(fn=fn):
                for _ in range(inner):
                    fn()

            samples[name].append(time_once(run, device) / inner)
    return {name: statistics.median(v) for name, v in samples.items()}


def copy_bandwidth(device, nbytes=256 << 20, repeat=9):
    """Bytes read + written per second by a plain device copy (the memcpy ceiling)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src)}, device, repeat)["copy"]
    return 2 * nbytes / t


def matmul_rate(device, n=2048, repeat=9):
    """torch's float32 n x n matrix product in FLOP/s: how fast this machine multiplies and adds
    right now (its speed drifts between and within runs)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t = interleaved({"mm": lambda: a @ b}, device, repeat)["mm"]
    return 2 * n**3 / t
