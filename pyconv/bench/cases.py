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
    # conv cases: (in_channels, out_channels, kernel, stride, padding, groups[, dilation])
    conv: tuple = ()
    tf32: bool | None = None  # CUDA float32 convolutions: TF32 allowed (torch's default) or not

    @property
    def layout(self):
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def dtype_name(self):
        return str(self.dtype).removeprefix("torch.")

    @property
    def dtype_label(self):
        """The dtype, and for float32 convolutions whether TF32 was allowed."""
        if self.conv and self.dtype == torch.float32 and self.tf32 is not None:
            return self.dtype_name + ("/tf32" if self.tf32 else "/strict")
        return self.dtype_name

    def label(self):
        shape = "x".join(map(str, self.shape))
        extra = " k{}s{}p{}".format(*self.pool) if self.pool else ""
        if self.conv:
            extra = " {}->{} k{}s{}p{}g{}".format(*self.conv[:6])
            if len(self.conv) > 6 and self.conv[6] != 1:
                extra += f"d{self.conv[6]}"
        return f"{self.op}{extra} {self.mode} {shape} {self.dtype_label} {self.layout}"


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


def conv_cases(device):
    """Issue 4's suite: LeNet, AlexNet, VGG and ResNet layers (first layers, 1x1, 3x3 plain,
    strided and dilated, 5x5, depthwise) in float32; float64 forward + backward on four of them."""
    f32 = torch.float32
    cases = []
    for shape, conv, quick in [
        ((32, 3, 32, 32), (3, 16, 3, 1, 1, 1), True),  # CIFAR first layer
        ((32, 1, 28, 28), (1, 32, 5, 1, 0, 1), True),  # LeNet first layer
        ((8, 64, 56, 56), (64, 128, 1, 1, 0, 1), True),  # 1x1
        ((8, 64, 56, 56), (64, 64, 3, 1, 1, 1), True),  # ResNet stage 1
        ((8, 64, 56, 56), (64, 128, 3, 2, 1, 1), False),  # strided
        ((8, 64, 56, 56), (64, 64, 3, 1, 1, 64), False),  # depthwise
        ((32, 6, 14, 14), (6, 16, 5, 1, 0, 1), False),  # LeNet second layer
        ((8, 3, 224, 224), (3, 64, 11, 4, 2, 1), False),  # AlexNet first layer
        ((8, 64, 27, 27), (64, 192, 5, 1, 2, 1), False),  # AlexNet second layer
        ((4, 256, 28, 28), (256, 256, 3, 1, 1, 1), False),  # VGG stage 3
        ((8, 3, 224, 224), (3, 64, 7, 2, 3, 1), False),  # ResNet stem
        ((8, 512, 7, 7), (512, 512, 3, 1, 1, 1), False),  # ResNet stage 4
        ((8, 128, 28, 28), (128, 128, 3, 1, 2, 1, 2), False),  # dilated (DeepLab-style)
    ]:
        for cl in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                cases.append(
                    Case("conv2d", shape, f32, cl, mode, conv=conv, quick=quick and not cl)
                )
    for shape, conv in [  # float64 (torch: its own loops and BLAS, no oneDNN)
        ((32, 3, 32, 32), (3, 16, 3, 1, 1, 1)),
        ((8, 64, 56, 56), (64, 128, 1, 1, 0, 1)),
        ((8, 64, 56, 56), (64, 64, 3, 1, 1, 1)),
        ((8, 64, 56, 56), (64, 128, 3, 2, 1, 1)),
    ]:
        for cl in (False, True):
            cases.append(Case("conv2d", shape, torch.float64, cl, "fwd+bwd", conv=conv))
    return cases


def cuda_conv_cases():
    """Issue 6's ResNet-50 layers against cuDNN: 16-bit and TF32 channels_last, strict float32,
    and the fused epilogue (mode "fused": relu(conv + bias + residual))."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    layers = [
        ((32, 64, 56, 56), (64, 64, 3, 1, 1, 1)),
        ((256, 256, 14, 14), (256, 256, 3, 1, 1, 1)),
        ((32, 256, 56, 56), (256, 64, 1, 1, 0, 1)),
        ((32, 128, 56, 56), (128, 128, 3, 2, 1, 1)),
    ]
    cases = []
    for shape, conv in layers:
        for mode in ("fwd", "fwd+bwd"):
            cases.append(Case("conv2d", shape, bf16, True, mode, conv=conv, quick=True, tf32=True))
        cases.append(Case("conv2d", shape, f16, True, "fwd", conv=conv))
        cases.append(Case("conv2d", shape, f32, True, "fwd", conv=conv, tf32=True))
        cases.append(Case("conv2d", shape, f32, True, "fwd+bwd", conv=conv, tf32=True))
        cases.append(Case("conv2d", shape, f32, False, "fwd", conv=conv, tf32=False))
        cases.append(Case("conv2d", shape, bf16, True, "fused", conv=conv))
    cases.append(Case("conv2d", (32, 64, 56, 56), bf16, False, "fwd", conv=(64, 64, 3, 1, 1, 1)))
    cases.append(
        Case("conv2d", (32, 128, 28, 28), bf16, True, "fwd+bwd", conv=(128, 128, 3, 1, 1, 128))
    )
    return cases


def model_cases(device):
    """Issue 5's model-level case: a ResNet-18-style training step, batch 32, 32x32 input."""
    return [
        Case("resnet18", (32, 3, 32, 32), torch.float32, cl, "fwd+bwd", quick=True)
        for cl in (False, True)
    ]


def all_cases(device):
    by_op = {}
    cases = dropout_cases(device) + pool_cases(device) + model_cases(device)
    cases += conv_cases(device) if device == "cpu" else cuda_conv_cases()
    for c in cases:
        by_op.setdefault(c.op, []).append(c)
    return by_op
