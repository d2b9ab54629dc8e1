"""pytest-benchmark view of the pooling cases: pytest benchmarks/bench_pool.py

The same shapes as `python -m pyconv.bench --op max_pool2d` / `--op avg_pool2d`; pyconv and torch
as separate benchmarks in one session.
"""

import pytest
import torch
from cases import pool_cases

from pyconv.bench.pool import callables

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(d, c) for d in DEVICES for c in pool_cases(d) if c.quick]


@pytest.mark.parametrize("impl", ["torch", "pyconv"])
@pytest.mark.parametrize("device,case", CASES, ids=lambda v: v if isinstance(v, str) else v.label())
def test_pool(timed, device, case, impl):
    torch_fn, our_fn, _, _, _ = callables(case, device)
    timed(torch_fn if impl == "torch" else our_fn, device)
