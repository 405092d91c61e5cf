"""The benchmark's pure helpers (benchmarks/bench.py). Nothing here times anything."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sf_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sf_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_profile_phases_group_by_library_and_symbol(bench):
    # "log" in a name must not make a symbol libm's: depth_logits once showed as libm exp/log
    assert bench.sf_phase("_core.so", "u", "depth_logits") == "attention"
    assert bench.sf_phase("_core.so", "u", "block_logits") == "attention"
    assert bench.sf_phase("libm.so.6", "u", "__ieee754_exp_fma") == "libm exp/log"
    assert bench.sf_phase("_core.so", "u", "tile_avx2") == "matmul"
    assert bench.sf_phase("_core.so", "u", "sf_gemm._omp_fn.1") == "matmul"
    assert bench.sf_phase("libgomp.so.1", "u", "gomp_barrier_wait_end") == "OpenMP wait/sync"
    assert bench.sf_phase("[kernel.kallsyms]", "k", "clear_page_erms") == "kernel (page faults, scheduling)"
    # the C core's .so is named like a CPython module; its OpenMP bodies carry the static
    # function's name (the gemm with the dW tiles inlined once showed as "python/numpy")
    core = "_core.cpython-311-x86_64-linux-gnu.so"
    assert bench.sf_phase(core, "u", "gemm._omp_fn.1") == "matmul"
    assert bench.sf_phase(core, "u", "some_new_kernel._omp_fn.0") == "other (C core)"
    assert bench.sf_phase("_multiarray_umath.cpython-311-x86_64-linux-gnu.so", "u", "npy_sum") == "python/numpy"
    assert bench.sf_phase("python3.11", "u", "_PyEval_EvalFrameDefault") == "python/numpy"


@pytest.mark.parametrize("kind", ["fwd", "dW", "dX"])
def test_blas_probe_check_accepts_the_product_and_rejects_a_wrong_layout(bench, kind):
    """check_blas_probe guards the OpenBLAS yardstick against timing a different product (a
    wrong transpose flag or leading dimension): it must pass the right corners, fail others."""
    N, K, M = 12, 7, 20
    x, w, _, dy = bench.linear_operands(N, K, M)
    right = {"fwd": x @ w.T, "dW": dy.T @ x, "dX": dy @ w}[kind]
    wrong = {"fwd": x @ w[::-1].T, "dW": (dy.T @ x)[::-1], "dX": dy @ w[:, ::-1]}[kind]

    def corners(y):
        return [y[0, :8].tolist(), y[-1, -8:].tolist()]

    assert bench.check_blas_probe(kind, N, K, M, corners(right)) < 1e-5
    assert bench.check_blas_probe(kind, N, K, M, corners(wrong)) > 1e-2
