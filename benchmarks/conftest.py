"""Shared pieces of the pytest-benchmark files: this folder on sys.path (for cases.py), and a
`timed` fixture that synchronises CUDA inside the timed call."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def timed(benchmark):
    def run(fn, device):
        if device == "cuda":

            def fn_sync():
                fn()
                torch.cuda.synchronize()

            return benchmark(fn_sync)
        return benchmark(fn)

    return run
