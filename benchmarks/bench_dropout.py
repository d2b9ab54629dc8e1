"""pytest-benchmark view of the dropout cases: pytest benchmarks/bench_dropout.py

The same shapes as `python -m pyconv.bench --op dropout`; pyconv and torch as separate benchmarks
in one session, for pytest-benchmark's comparison and history tools.
"""

import pytest
import torch
from cases import dropout_cases

from pyconv.bench.dropout import callables

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(d, c) for d in DEVICES for c in dropout_cases(d) if c.quick]


@pytest.mark.parametrize("impl", ["torch", "pyconv"])
@pytest.mark.parametrize("device,case", CASES, ids=lambda v: v if isinstance(v, str) else v.label())
def test_dropout(timed, device, case, impl):
    torch_fn, our_fn, _, _, _ = callables(case, device)
    timed(torch_fn if impl == "torch" else our_fn, device)
