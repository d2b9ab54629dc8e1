"""Times the NCHW cases where torch's CPU conv2d is weakest (issue 4's first-layer and 1x1
targets), torch against pyconv, interleaved, in this process.

torch's time for these depends on whether its fresh output (and scratch) memory is already
mapped: with glibc's default malloc, outputs past its mmap threshold are mapped anew, page-faulted
and zeroed by the kernel at every call. That is the state of a fresh process; a process that has
freed larger blocks before (the full `python -m pyconv.bench` run) reuses them. pyconv's outputs
come from its buffer cache, mapped once. Run it both ways:

    python scripts/weak_cases.py
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python scripts/weak_cases.py
"""

import torch
import torch.nn.functional as F

import pyconv.functional as PF
from pyconv.bench.timing import interleaved

CASES = [  # name, input shape, out channels, kernel, stride, padding, mode
    ("3 -> 16 3x3 forward", (32, 3, 32, 32), 16, 3, 1, 1, "fwd"),
    ("64 -> 128 1x1 forward", (8, 64, 56, 56), 128, 1, 1, 0, "fwd"),
    ("1 -> 32 5x5 forward + backward", (32, 1, 28, 28), 32, 5, 1, 0, "fwd+bwd"),
]


def main():
    for name, shape, k, r, stride, pad, mode in CASES:
        x = torch.randn(*shape)
        w = torch.randn(k, shape[1], r, r) * (shape[1] * r * r) ** -0.5
        b = torch.randn(k)
        if mode == "fwd":
            fns = {
                "torch": lambda x=x, w=w, b=b, s=stride, p=pad: F.conv2d(x, w, b, s, p),
                "pyconv": lambda x=x, w=w, b=b, s=stride, p=pad: PF.conv2d(x, w, b, s, p),
            }
        else:
            xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
            grad = torch.randn_like(F.conv2d(x, w, b, stride, pad))

            def both(op, s=stride, p=pad, xg=xg, wg=wg, bg=bg, grad=grad):
                return lambda: torch.autograd.grad(op(xg, wg, bg, s, p), (xg, wg, bg), grad)

            fns = {"torch": both(F.conv2d), "pyconv": both(PF.conv2d)}
        t = interleaved(fns, "cpu", repeat=40, warmup=3)
        print(
            f"{name:32s} torch {t['torch'] * 1e3:7.3f} ms  pyconv {t['pyconv'] * 1e3:7.3f} ms"
            f"  {t['torch'] / t['pyconv']:5.2f}x"
        )


if __name__ == "__main__":
    main()
