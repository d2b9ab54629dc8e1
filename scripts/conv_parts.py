"""Times forward, input gradient and weight gradient of one conv2d shape, torch against pyconv,
interleaved on the CPU.

Usage: python scripts/conv_parts.py N C H W K R [stride pad groups] [--cl] [--double]
"""

import sys

import torch

import pyconv  # noqa: F401  (registers the ops)
from pyconv.bench.timing import interleaved

args = [a for a in sys.argv[1:] if not a.startswith("--")]
cl = "--cl" in sys.argv
dtype = torch.float64 if "--double" in sys.argv else torch.float32
n, c, h, w, k, r = map(int, args[:6])
stride, pad, groups = (list(map(int, args[6:9])) + [1, r // 2, 1][len(args[6:9]) :])[:3]
x = torch.randn(n, c, h, w, dtype=dtype)
wt = torch.randn(k, c // groups, r, r, dtype=dtype) * (c * r * r) ** -0.5
if cl:
    x = x.contiguous(memory_format=torch.channels_last)
out = torch.nn.functional.conv2d(x, wt, None, stride, pad, 1, groups)
go = torch.randn_like(out)
flops = 2 * out.numel() * (c // groups) * r * r
P = torch.ops.pyconv
A = torch.ops.aten
fns = {
    "fwd": (
        lambda: A.convolution(x, wt, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], groups),
        lambda: P.conv2d(x, wt, None, [stride] * 2, [pad] * 4, [1, 1], groups, False, None),
    ),
    "dgrad": (
        lambda: A.convolution_backward(
            go,
            x,
            wt,
            None,
            [stride] * 2,
            [pad] * 2,
            [1, 1],
            False,
            [0, 0],
            groups,
            [True, False, False],
        ),
        lambda: P.conv2d_backward_input(
            go, wt, list(x.shape), [stride] * 2, [pad] * 4, [1, 1], groups
        ),
    ),
    "wgrad": (
        lambda: A.convolution_backward(
            go,
            x,
            wt,
            None,
            [stride] * 2,
            [pad] * 2,
            [1, 1],
            False,
            [0, 0],
            groups,
            [False, True, False],
        ),
        lambda: P.conv2d_backward_weight(
            go, x, list(wt.shape), [stride] * 2, [pad] * 4, [1, 1], groups
        ),
    ),
}
for name, (ft, fp) in fns.items():
    t = interleaved({"torch": ft, "pyconv": fp}, "cpu", repeat=int(9 if flops < 1e9 else 5))
    print(
        f"{name:6s} torch {t['torch'] * 1e3:8.2f} ms ({flops / t['torch'] / 1e9:6.1f} GF)  "
        f"pyconv {t['pyconv'] * 1e3:8.2f} ms ({flops / t['pyconv'] / 1e9:6.1f} GF)  "
        f"ratio {t['torch'] / t['pyconv']:.2f}"
    )
