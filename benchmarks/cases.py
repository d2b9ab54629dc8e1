"""The benchmark case lists: the same ones `python -m pyconv.bench` runs (pyconv/bench/cases.py)."""

from pyconv.bench.cases import Case, all_cases, dropout_cases, pool_cases  # noqa: F401
