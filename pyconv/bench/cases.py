"""The benchmark cases: one list shared by `python -m pyconv.bench` and benchmarks/*.py."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    op: str  # "dropout" | "dropout2d" | "max_pool2d" | "avg_pool2d"
    shape: tuple
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    mode: str = "fwd+bwd"  # "fwd" | "fwd+bwd"
    p: float = 0.5
    quick: bool = False  # part of the --quick subset
    pool: tuple = ()  # (kernel_size, stride, padding) of pooling cases

    @property
    def layout(self):
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def dtype_name(self):
        return str(self.dtype).removeprefix("torch.")

    def label(self):
        shape = "x".join(map(str, self.shape))
        extra = " k{}s{}p{}".format(*self.pool) if self.pool else ""
        return f"{self.op}{extra} {self.mode} {shape} {self.dtype_name} {self.layout}"


RESNET = (64, 64, 56, 56)  # the activation of a ResNet stage-1 block at batch 64


def dropout_cases(device):
    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    big = RESNET if device == "cpu" else (256, 64, 112, 112)
    cases = []
    for cl in (False, True):
        for mode in ("fwd", "fwd+bwd"):
            cases.append(Case("dropout", big, f32, cl, mode, quick=True))
    cases += [
        Case("dropout", big, bf16, False, "fwd+bwd"),
        Case("dropout", big, f16, True, "fwd+bwd"),
        Case("dropout", big, f64, False, "fwd+bwd"),
        Case("dropout", (32, 128, 28, 28), f32, False, "fwd+bwd", p=0.1),
        Case("dropout", (256, 4096), f32, False, "fwd+bwd"),
        Case("dropout2d", big, f32, False, "fwd+bwd", quick=True),
        Case("dropout2d", big, f32, True, "fwd+bwd", quick=True),
        Case("dropout2d", big, bf16, True, "fwd+bwd"),
    ]
    return cases


STEM = (3, 2, 1)  # the ResNet stem's max pooling
HALVE = (2, 2, 0)


def pool_cases(device):
    f32, bf16 = torch.float32, torch.bfloat16
    big = RESNET if device == "cpu" else (256, 64, 112, 112)
    cases = []
    for op in ("max_pool2d", "avg_pool2d"):
        for pool in (STEM, HALVE):
            for cl in (False, True):
                cases.append(Case(op, big, f32, cl, "fwd+bwd", pool=pool, quick=True))
                cases.append(Case(op, big, f32, cl, "fwd", pool=pool))
        cases.append(Case(op, big, bf16, True, "fwd+bwd", pool=STEM))
    return cases


def all_cases(device):
    by_op = {}
    for c in dropout_cases(device) + pool_cases(device):
        by_op.setdefault(c.op, []).append(c)
    return by_op
