"""Puts this folder on sys.path so that bench_*.py import the shared cases.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
