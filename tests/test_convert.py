"""pyconv.convert, fuse and param_groups on real model shapes: outputs and gradients equal to the
original's, state_dicts interchange both ways, compile (fullgraph), export, autocast, pickling."""

import copy
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn as tnn

import pyconv
import pyconv.nn as pnn


class Block(tnn.Module):
    """A ResNet basic block: conv-bn-relu, conv-bn, + shortcut, relu."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(cout)
        self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.short = tnn.Sequential()
        if stride != 1 or cin != cout:
            self.short = tnn.Sequential(
                tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.short(x))


class ResNetLike(tnn.Module):
    def __init__(self):
        super().__init__()
        self.stem = tnn.Sequential(
            tnn.Conv2d(3, 16, 3, 1, 1, bias=False), tnn.BatchNorm2d(16), tnn.ReLU()
        )
        self.pool = tnn.MaxPool2d(3, 2, 1)
        self.layer1 = Block(16, 16, 1)
        self.layer2 = Block(16, 32, 2)
        self.drop = tnn.Dropout2d(0.2)
        self.head = tnn.Sequential(
            tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Dropout(0.3), tnn.Linear(32, 10)
        )

    def forward(self, x):
        return self.head(self.drop(self.layer2(self.layer1(self.pool(self.stem(x))))))


def lenet():
    return tnn.Sequential(
        tnn.Conv2d(1, 6, 5, padding=2),
        tnn.ReLU(),
        tnn.AvgPool2d(2),
        tnn.Conv2d(6, 16, 5),
        tnn.ReLU(),
        tnn.MaxPool2d(2),
        tnn.Flatten(),
        tnn.Dropout(0.5),
        tnn.Linear(16 * 5 * 5, 10),
    )


def warmed(model, x):
    """BatchNorm running statistics away from their defaults, then eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)
    return model.eval()


MODELS = {
    "lenet": (lenet, (4, 1, 28, 28)),
    "resnet": (ResNetLike, (4, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_converted_model_matches(name, fmt):
    make, shape = MODELS[name]
    x = torch.randn(shape).contiguous(memory_format=fmt)
    model = warmed(make(), x)
    ours, report = pyconv.convert(model, return_report=True)
    assert ours is not model and report.converted and not report.kept
    assert not any(type(m) is tnn.Conv2d for m in ours.modules())
    assert any(isinstance(m, pnn.Conv2d) for m in ours.modules())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = model(xa), ours(xb)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(want)
    pa = [xa, *model.parameters()]
    pb = [xb, *ours.parameters()]
    for a, b in zip(torch.autograd.grad(want, pa, g), torch.autograd.grad(got, pb, g), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_state_dicts_interchange_and_modules_copy():
    model = ResNetLike()
    ours = pyconv.convert(model)
    torch_again = ResNetLike()
    torch_again.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(model.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(model.state_dict())
    assert repr(ours.layer1.conv1) == repr(model.layer1.conv1)
    x = torch.randn(2, 3, 32, 32)
    ours.eval()
    clone = copy.deepcopy(ours)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    pickled = pickle.loads(pickle.dumps(ours))
    for m in (clone, loaded, pickled):
        torch.testing.assert_close(m(x), ours(x))
    as_double = copy.deepcopy(ours).to(torch.float64)
    torch.testing.assert_close(as_double(x.double()).float(), ours(x), rtol=1e-4, atol=1e-4)


def test_inplace_shared_and_subclasses():
    class Plain(tnn.Conv2d):  # keeps torch's forward: converted
        pass

    class Custom(tnn.Conv2d):  # its own forward: kept
        def forward(self, x):
            return super().forward(x) * 2

    shared = tnn.Conv2d(4, 4, 3, padding=1)
    model = tnn.Sequential(shared, tnn.ReLU(), shared, Plain(4, 4, 1), Custom(4, 4, 1))
    x = torch.randn(2, 4, 8, 8)
    want = model(x)
    same, report = pyconv.convert(model, inplace=True, return_report=True)
    assert same is model
    assert model[0] is model[2] and isinstance(model[0], pnn.Conv2d)
    assert isinstance(model[3], pnn.Conv2d) and isinstance(model[3], Plain)
    assert type(model[4]) is Custom
    assert [r.name for r in report.kept] == ["4"] and "forward" in report.kept[0].reason
    assert len(report.converted) == 2  # the shared conv once, and the plain subclass
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


class PlainSubclass(tnn.Conv2d):  # importable: pickles by reference
    pass


def test_converted_subclass_unpickles_in_a_fresh_process(tmp_path):
    # the class pyconv builds for a subclass that keeps torch's forward pickles as its two
    # importable bases, so a process that never ran convert rebuilds it
    ours = pyconv.convert(tnn.Sequential(PlainSubclass(3, 4, 3)))
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps((ours, x, ours(x))))
    code = (
        "import pickle, sys, torch; "
        f"sys.path.insert(0, {os.path.dirname(__file__)!r}); "
        f"m, x, y = pickle.loads(open({str(path)!r}, 'rb').read()); "
        "import pyconv.nn as pnn, test_convert as t; "
        "assert isinstance(m[0], pnn.Conv2d) and isinstance(m[0], t.PlainSubclass); "
        "torch.testing.assert_close(m(x), y)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    clone = copy.deepcopy(ours)
    torch.testing.assert_close(clone(x), ours(x))


def test_unsupported_and_nothing_to_convert():
    model = tnn.Sequential(tnn.Conv2d(2, 2, 3, dtype=torch.complex64), tnn.Linear(3, 3))
    with pytest.warns(UserWarning, match="no layer"):
        ours, report = pyconv.convert(model, return_report=True)
    assert type(ours[0]) is tnn.Conv2d and "dtype" in report.kept[0].reason
    with pytest.warns(UserWarning, match="no layer"):
        same = pyconv.convert(tnn.Sequential(tnn.Linear(2, 2)))
    assert type(same[0]) is tnn.Linear


def test_report_with_example_inputs():
    model = lenet().eval()
    x = torch.randn(8, 1, 28, 28)
    ours, report = pyconv.convert(model, example_inputs=x, return_report=True)
    measured = [r for r in report.converted if r.speedup is not None]
    assert len(measured) == len(report.converted) == 5
    for r in measured:
        assert r.max_abs_error < 1e-4 and r.speedup > 0
    assert "converted" in str(report)
    torch.testing.assert_close(ours(x), model(x), rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_and_export():
    torch._dynamo.reset()
    model = pyconv.convert(warmed(ResNetLike(), torch.randn(4, 3, 32, 32)))
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    exported = torch.export.export(model, (x,))
    names = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("pyconv.conv2d" in n for n in names)
    torch.testing.assert_close(exported.module()(x), model(x))


def test_autocast_casts_like_torch():
    model = lenet().eval()
    ours = pyconv.convert(model)
    x = torch.randn(2, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model[0](x)
        got = ours[0](x)
        full = ours(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=5e-2)
    assert full.dtype == model(x).dtype or full.dtype == torch.bfloat16


def test_half_precision_model():
    model = lenet().eval()
    ours = pyconv.convert(model).to(torch.bfloat16)
    x = torch.randn(2, 1, 28, 28)
    out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(x), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_fuse_folds_batchnorm_relu_and_residual(fmt):
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=fmt)
    model = warmed(ResNetLike(), x)
    fused = pyconv.fuse(model)
    kinds = [m for m in fused.modules() if isinstance(m, pyconv.FusedConv2d)]
    # stem, 2 per block and the downsampling shortcut; ReLU fused into all but the shortcut, the
    # residual add into the second conv of each block
    assert len(kinds) == 6
    assert (
        sum(m.takes_residual for m in kinds) == 2
        and sum(m.activation == "relu" for m in kinds) == 5
    )
    assert not any(isinstance(m, tnn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


def test_param_groups_decay_weights_only():
    model = ResNetLike()
    decay, no_decay = pyconv.param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    convs = [m.weight for m in model.modules() if isinstance(m, tnn.Conv2d)]
    norms = [p for m in model.modules() if isinstance(m, tnn.BatchNorm2d) for p in m.parameters()]
    biases = [m.bias for m in model.modules() if isinstance(m, tnn.Linear)]
    assert ids(convs) | {id(model.head[3].weight)} <= ids(decay["params"])
    assert ids(norms) | ids(biases) <= ids(no_decay["params"])
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == len(list(model.parameters()))
    torch.optim.SGD([decay, no_decay], lr=0.1, momentum=0.9)
