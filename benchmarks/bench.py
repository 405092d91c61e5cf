#!/usr/bin/env python3
"""stackformer performance benchmark: `python benchmarks/bench.py [--quick] [options]`.

The code is the small package beside this file, `benchmarks/sfbench/` (its __init__ maps the
modules); this file is the entry point, also for the worker subprocesses a run starts.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from sfbench.cli import main  # noqa: E402
from sfbench.matmul import check_blas_probe, linear_operands  # noqa: E402,F401  (the helper tests use these)
from sfbench.workers import sf_phase  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
