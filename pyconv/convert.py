"""Putting pyconv into existing models: convert (layer swap), fuse (inference folding) and
param_groups (weight decay on weights only)."""

import copy
import operator
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import functional as PF
from . import nn as pnn

# torch layer -> pyconv layer (pyconv's are subclasses holding the same state)
_SWAPS = {
    torch.nn.Conv2d: pnn.Conv2d,
    torch.nn.MaxPool2d: pnn.MaxPool2d,
    torch.nn.AvgPool2d: pnn.AvgPool2d,
    torch.nn.Dropout: pnn.Dropout,
    torch.nn.Dropout1d: pnn.Dropout1d,
    torch.nn.Dropout2d: pnn.Dropout2d,
    torch.nn.Dropout3d: pnn.Dropout3d,
}
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DEVICES = ("cpu", "cuda")


@dataclass
class LayerReport:
    name: str  # qualified name in the model ('' for the model itself)
    kind: str  # the torch class
    converted: bool
    reason: str = ""  # why a layer was kept
    max_abs_error: float | None = None  # with example_inputs: against the original layer
    speedup: float | None = None  # with example_inputs: original time / pyconv time


@dataclass
class ConvertReport:
    layers: list = field(default_factory=list)

    @property
    def converted(self):
        return [r for r in self.layers if r.converted]

    @property
    def kept(self):
        return [r for r in self.layers if not r.converted]

    def __str__(self):
        lines = [f"pyconv.convert: {len(self.converted)} layers converted, {len(self.kept)} kept"]
        for r in self.layers:
            what = "converted" if r.converted else f"kept ({r.reason})"
            extra = ""
            if r.max_abs_error is not None:
                extra = f"  max abs error {r.max_abs_error:.2e}, speedup {r.speedup:.2f}x"
            lines.append(f"  {r.name or '<model>'}: {r.kind} {what}{extra}")
        return "\n".join(lines)


def _target(module):
    """The pyconv class for `module`, or None, and why not."""
    for torch_cls, ours in _SWAPS.items():
        if type(module) is torch_cls:
            return ours, ""
    for torch_cls, ours in _SWAPS.items():
        if isinstance(module, torch_cls) and not isinstance(module, ours):
            own = [
                m
                for m in ("forward", "_conv_forward")
                if getattr(type(module), m, None) is not getattr(torch_cls, m, None)
            ]
            if own:
                return None, f"subclass {type(module).__name__} defines its own {own[0]}"
            # a subclass that keeps torch's forward: pyconv's forward in front of it
            return _mixed_class(ours, type(module)), ""
    return None, None


def _mixed_class(ours, theirs):
    name = f"Pyconv_{theirs.__module__.replace('.', '_')}_{theirs.__qualname__.replace('.', '_')}"
    cls = _MIXED.get((ours, theirs))
    if cls is None:
        cls = type(
            name,
            (ours, theirs),
            {"__module__": __name__, "__qualname__": name, "__reduce_ex__": _reduce_mixed},
        )
        _MIXED[(ours, theirs)] = cls
    return cls


_MIXED = {}


def _reduce_mixed(self, protocol):
    # pickled as its two importable bases, so that a process that never ran convert can rebuild
    # the class (the user's subclass must be importable there, as for any pickled module)
    ours, theirs = type(self).__bases__
    return _remake, (ours, theirs), self.__getstate__()


def _remake(ours, theirs):
    cls = _mixed_class(ours, theirs)
    return cls.__new__(cls)


def _unsupported(module):
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.dtype not in _DTYPES:
            return f"dtype {t.dtype} is not supported"
        if t.device.type not in _DEVICES:
            return f"device {t.device.type} is not supported"
    return ""


def convert(model, inplace=False, *, example_inputs=None, return_report=False, verbose=False):
    """Return `model` with every torch Conv2d, MaxPool2d, AvgPool2d and Dropout(1d/2d/3d) layer
    running on pyconv's kernels. Each converted layer keeps its parameters, buffers and
    state_dict keys (it becomes an instance of the pyconv subclass), so optimizers and checkpoints
    carry over. Shared layers are converted once; a subclass with its own forward, or a layer
    whose dtype or device pyconv cannot take, is kept and named in the report.

    example_inputs (a tensor or a tuple of them): each converted layer is also run on the input it
    sees in the model, against the original layer: max abs error and speedup per layer.
    return_report: return (model, ConvertReport) instead of the model; verbose: print the report.
    """
    original = model
    if not inplace:
        model = copy.deepcopy(model)
    report = ConvertReport()
    plan = []  # (name, module, pyconv class)
    seen = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            continue
        seen.add(id(module))
        cls, why = _target(module)
        if cls is None and why is None:
            continue  # not a layer pyconv replaces
        kind = type(module).__name__
        why = why or _unsupported(module)
        if why:
            report.layers.append(LayerReport(name, kind, False, why))
            continue
        plan.append((name, module, cls))
        report.layers.append(LayerReport(name, kind, True))
    if example_inputs is not None:
        _measure(original if not inplace else None, model, plan, report, example_inputs)
    for _, module, cls in plan:
        module.__class__ = cls
    if not report.converted:
        warnings.warn(
            f"pyconv.convert: no layer of {type(model).__name__} was converted"
            + (f" ({len(report.kept)} kept, see the report)" if report.kept else ""),
            stacklevel=2,
        )
    if verbose:
        print(report)
    return (model, report) if return_report else model


def _measure(_, model, plan, report, example_inputs, repeat=5):
    """Per converted layer: its input in the model, then the original and pyconv forward."""
    inputs = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda mod, args, name=name: inputs.setdefault(name, args) and None
        )
        for name, module, _ in plan
    ]
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.no_grad():
        model(*args)
    for h in hooks:
        h.remove()
    by_name = {r.name: r for r in report.layers}
    for name, module, cls in plan:
        if name not in inputs:
            continue  # not reached by the example
        theirs = copy.deepcopy(module)
        ours = copy.deepcopy(module)
        ours.__class__ = cls
        layer_args = inputs[name]
        with torch.no_grad():
            theirs.eval() if not module.training else theirs.train()
            if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.training:
                err = 0.0  # random masks: nothing to compare value by value
            else:
                err = (ours(*layer_args).double() - theirs(*layer_args).double()).abs().max()
                err = float(err) if torch.is_tensor(err) else err
            times = {}
            for label, m in (("torch", theirs), ("pyconv", ours)):
                m(*layer_args)
                samples = []
                for _ in range(repeat):
                    if layer_args[0].is_cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    m(*layer_args)
                    if layer_args[0].is_cuda:
                        torch.cuda.synchronize()
                    samples.append(time.perf_counter() - t0)
                times[label] = sorted(samples)[len(samples) // 2]
        by_name[name].max_abs_error = err
        by_name[name].speedup = times["torch"] / times["pyconv"]


_NORMS = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.LocalResponseNorm,
)


def param_groups(model, weight_decay):
    """Optimizer parameter groups that apply weight decay to the weights only, as the lecture
    prescribes: biases and the parameters of normalisation layers are not decayed.

        torch.optim.SGD(pyconv.param_groups(model, 5e-4), lr=0.1, momentum=0.9)
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if isinstance(module, _NORMS) or name == "bias" or name.endswith("_bias"):
                no_decay.append(p)
            else:
                decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --- fuse ---


class FusedConv2d(pnn.Conv2d):
    """A conv with BatchNorm folded in and its epilogue fused: relu?(conv(x) + bias + residual).
    Built by pyconv.fuse; forward(input, residual=None)."""

    activation = None
    takes_residual = False

    def forward(self, input, residual=None):
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(
                input, self._reversed_padding_repeated_twice, mode=self.padding_mode
            )
            padding = 0
        else:
            padding = self.padding
        return PF.conv2d(
            input,
            self.weight,
            self.bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            activation=self.activation,
            residual=residual,
        )

    def extra_repr(self):
        fused = [f"activation={self.activation!r}"] if self.activation else []
        return ", ".join([super().extra_repr(), *fused, f"residual={self.takes_residual}"])


def _is_relu(node, modules):
    if node.op == "call_module":
        return isinstance(modules.get(node.target), torch.nn.ReLU)
    if node.op == "call_function":
        return node.target in (torch.relu, torch.nn.functional.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node):
    if node.op == "call_function":
        return node.target in (operator.add, torch.add, operator.iadd) and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and not node.kwargs


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _folded(conv, bn):
    """conv with bn (eval statistics) folded into its weight and bias, as a FusedConv2d."""
    fused = FusedConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        w = conv.weight.double()
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(w[:, 0, 0, 0])
        if bn is not None:
            scale = bn.weight.double() if bn.weight is not None else torch.ones_like(b)
            shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(b)
            inv = scale / torch.sqrt(bn.running_var.double() + bn.eps)
            w = w * inv.view(-1, 1, 1, 1)
            b = (b - bn.running_mean.double()) * inv + shift
        fused.weight.copy_(w.to(conv.weight.dtype))
        fused.bias.copy_(b.to(conv.weight.dtype))
    return fused


def fuse(model, inplace=False):
    """For inference: a torch.fx GraphModule of `model` (in eval mode) in which each Conv2d
    followed by a BatchNorm2d has the BatchNorm folded into its weights, and a following ReLU, and
    an add of another tensor before that ReLU (a residual connection), run in pyconv's fused conv
    epilogue. Outputs equal the unfused model's within float rounding. The model must be
    traceable by torch.fx.symbolic_trace.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) not in (
            torch.nn.Conv2d,
            pnn.Conv2d,
        ):
            continue
        conv = modules[node.target]
        last, bn, residual, relu = node, None, None, False
        user = _only_user(last)
        if (
            user is not None
            and user.op == "call_module"
            and isinstance(modules.get(user.target), torch.nn.BatchNorm2d)
            and modules[user.target].running_mean is not None
        ):
            bn, last = modules[user.target], user
            user = _only_user(last)
        if user is not None and _is_add(user) and len(user.args) == 2:
            other = user.args[1] if user.args[0] is last else user.args[0]
            if isinstance(other, torch.fx.Node) and other is not last:
                residual, last = other, user
                user = _only_user(last)
        if user is not None and _is_relu(user, modules):
            relu, last = True, user
        if last is node:
            continue  # nothing follows the conv that pyconv can fuse
        fused = _folded(conv, bn)
        fused.activation = "relu" if relu else None
        fused.takes_residual = residual is not None
        name = f"{node.target.replace('.', '_')}_fused"
        gm.add_submodule(name, fused)
        with gm.graph.inserting_before(last):
            args = (node.args[0],) if residual is None else (node.args[0], residual)
            new = gm.graph.call_module(name, args)
        last.replace_all_uses_with(new)
        count += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    if count == 0:
        warnings.warn(f"pyconv.fuse: nothing to fuse in {type(model).__name__}", stacklevel=2)
    return gm
