"""Times the forward, input gradient and weight gradient of every conv2d shape of the ResNet-18
(CIFAR, batch 32) step, torch against pyconv, interleaved on the CPU, and the total weighted by
how often each shape occurs.

Usage: python scripts/resnet18_layers.py [--cl]
"""

import sys

import torch

import pyconv  # noqa: F401  (registers the ops)
from pyconv.bench.timing import interleaved

P = torch.ops.pyconv
A = torch.ops.aten
cl = "--cl" in sys.argv
N = 32
# in channels, out channels, input size, stride, kernel, occurrences
SHAPES = [
    (3, 64, 32, 1, 3, 1),
    (64, 64, 32, 1, 3, 4),
    (64, 128, 32, 2, 3, 1),
    (128, 128, 16, 1, 3, 3),
    (64, 128, 32, 2, 1, 1),
    (128, 256, 16, 2, 3, 1),
    (256, 256, 8, 1, 3, 3),
    (128, 256, 16, 2, 1, 1),
    (256, 512, 8, 2, 3, 1),
    (512, 512, 4, 1, 3, 3),
    (256, 512, 8, 2, 1, 1),
]


def parts(c, k, h, s, r):
    """(torch, pyconv) callables of the three directions of one shape."""
    x = torch.randn(N, c, h, h)
    w = torch.randn(k, c, r, r) * (c * r * r) ** -0.5
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    p = r // 2
    conv = [[s, s], [p, p], [1, 1], False, [0, 0], 1]
    args = ([s, s], [p] * 4, [1, 1], 1)
    go = torch.randn_like(A.convolution(x, w, None, *conv))
    fns = {
        "fwd": (
            lambda: A.convolution(x, w, None, *conv),
            lambda: P.conv2d(x, w, None, *args, False, None),
        ),
        "wgrad": (
            lambda: A.convolution_backward(go, x, w, None, *conv, [False, True, False]),
            lambda: P.conv2d_backward_weight(go, x, list(w.shape), *args),
        ),
    }
    if c > 3:  # the image itself needs no gradient
        fns["dgrad"] = (
            lambda: A.convolution_backward(go, x, w, None, *conv, [True, False, False]),
            lambda: P.conv2d_backward_input(go, w, list(x.shape), *args),
        )
    return fns


total = {"torch": 0.0, "pyconv": 0.0}
for c, k, h, s, r, count in SHAPES:
    row = []
    for name, (ft, fp) in parts(c, k, h, s, r).items():
        t = interleaved({"torch": ft, "pyconv": fp}, "cpu", 7)
        for who in total:
            total[who] += t[who] * count
        row.append(
            f"{name} {t['torch'] * 1e3:6.2f}/{t['pyconv'] * 1e3:6.2f} "
            f"({t['torch'] / t['pyconv']:.2f})"
        )
    print(f"{c:3d}->{k:3d} @{h:2d} s{s} k{r} x{count}: " + "  ".join(row))
print(
    f"total ms torch {total['torch'] * 1e3:.1f} pyconv {total['pyconv'] * 1e3:.1f} "
    f"ratio {total['torch'] / total['pyconv']:.2f}"
)
