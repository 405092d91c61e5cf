"""stackformer performance benchmark: one command, one JSON file, one readable table.

    python benchmarks/bench.py                     # full run (see README.md for what it measures)
    python benchmarks/bench.py --quick             # S only, fewer repetitions (< 1 minute on a quiet machine)
    python benchmarks/bench.py --configs S,M --modes plain,moda --out results.json

Everything is float32 and uses all cores (threads = the CPU affinity count unless --threads).
Timings are the median of >= 5 repetitions after warm-up (--quick: 3). stackformer and PyTorch
repetitions are interleaved (sf, torch, sf, torch, ...) so a machine whose load changes during
the run slows both alike; PyTorch runs in a separate process so the two OpenMP runtimes never
spin against each other. Peak memory is measured in a fresh subprocess per case (VmHWM reset
through /proc/self/clear_refs, so the number is the high-water mark of one steady-state step
minus the resident size just before it). The machine's fp32 peak comes from a small FMA
kernel (benchmarks/peak.c) compiled here at run time.


The package: env (machine, statistics, peak), matrix (configs, modes, FLOPs), proc (worker
processes: environment and protocol), matmul
(isolated products, OpenBLAS), workers (PyTorch / profiling / memory subprocesses), cases
(the runner), targets, report, cli.
"""
