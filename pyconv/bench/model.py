"""Benchmark body of a whole model: one training step (forward + backward) of a ResNet-18-style
network (CIFAR layout: 3x3 stem, four stages of two basic blocks, 32x32 input) in torch and the
same network through pyconv.convert."""

import copy

import torch
import torch.nn as tnn

import pyconv

UNIT = "img/s"
SCALE = 1.0  # the rate is images per second, not billions


class BasicBlock(tnn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(cout)
        self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.shortcut = tnn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = tnn.Sequential(
                tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet18(num_classes=10):
    layers, cin = [], 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return tnn.Sequential(
        tnn.Conv2d(3, 64, 3, 1, 1, bias=False),
        tnn.BatchNorm2d(64),
        tnn.ReLU(),
        *layers,
        tnn.AdaptiveAvgPool2d(1),
        tnn.Flatten(),
        tnn.Dropout(0.2),
        tnn.Linear(512, num_classes),
    )


def callables(case, device):
    """(torch_fn, pyconv_fn, None, error_fn, images): a training step of each model."""
    n = case.shape[0]
    torch.manual_seed(0)
    theirs = resnet18().to(device).train()
    ours = pyconv.convert(copy.deepcopy(theirs))
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    theirs = theirs.to(memory_format=fmt)
    ours = ours.to(memory_format=fmt)
    x = torch.randn(case.shape, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (n,), device=device)
    loss = tnn.CrossEntropyLoss()

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            loss(model(x), y).backward()

        return run

    def max_abs_error():
        a, b = copy.deepcopy(theirs).eval(), copy.deepcopy(ours).eval()
        with torch.no_grad():
            return (a(x).double() - b(x).double()).abs().max().item()

    return step(theirs), step(ours), None, max_abs_error, n
