#!/usr/bin/env python3
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
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
THIS = Path(__file__).resolve()
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

# OpenMP wait policy as the user set it, before `import stackformer` sets its own default
# (PASSIVE) in os.environ. By default PyTorch workers run with the same policy as stackformer
# (both use libgomp: equal threading-runtime behaviour); --torch-omp-wait default gives them
# the user's setting instead (libgomp's spinning default when unset).
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
USER_GOMP_SPINCOUNT = os.environ.get("GOMP_SPINCOUNT")
TORCH_OMP_WAIT = "same"

# ---------------------------------------------------------------------------------------------
# the benchmark matrix

CONFIGS: Dict[str, Dict[str, int]] = {
    "S": dict(vocab_size=256, d_model=128, n_heads=4, n_layers=8, T=128, B=16),
    "M": dict(vocab_size=256, d_model=384, n_heads=6, n_layers=12, T=256, B=8),
    "Deep": dict(vocab_size=256, d_model=128, n_heads=4, n_layers=48, T=128, B=8),
    "Long": dict(vocab_size=256, d_model=256, n_heads=4, n_layers=4, T=2048, B=1),
}
MODES: Dict[str, Dict[str, Any]] = {
    "plain": {},
    "attnres_full": dict(residual="attnres_full"),
    "attnres_block": dict(residual="attnres_block", attnres_block_size=4),
    "moda": dict(moda=True),
}
LR = 1e-3  # train step: AdamW lr; betas (0.9, 0.95), eps 1e-8, weight decay 0.1, clip 1.0 (stackformer's defaults)
GEN_PROMPT = 32
GEN_NEW = 256
LONG_SHORT_T = 1024
TORCH_MEM_LIMIT = 4 << 30  # skip a PyTorch case whose explicit attention tensors would exceed this

TARGETS_DOC = [
    ("fwd_S_vs_torch", ">=", 2.0, "forward tokens/s, S plain, stackformer / PyTorch"),
    ("fwd_M_vs_torch", ">=", 1.3, "forward tokens/s, M plain, stackformer / PyTorch"),
    ("train_S_vs_torch", ">=", 1.5, "train step tokens/s, S plain, stackformer / PyTorch"),
    ("train_M_vs_torch", ">=", 1.1, "train step tokens/s, M plain, stackformer / PyTorch"),
    ("matmul_M_peak", ">=", 0.70, "C matmul at M's forward shapes, fraction of measured fp32 peak"),
    ("matmul_M_vs_openblas", ">=", 0.90, "C matmul at M's shapes (fwd + dW + dX), speed / OpenBLAS's speed"),
    ("perhead_vs_openblas", ">", 1.0, "per-head attention products (S, M), 1 thread per call: speed / OpenBLAS's"),
    ("overhead_full_M", "<=", 0.05, "train step time vs plain at M: Full AttnRes"),
    ("overhead_block_M", "<=", 0.03, "train step time vs plain at M: Block AttnRes (S=4)"),
    ("overhead_moda_M", "<=", 0.15, "train step time vs plain at M: MoDA"),
    ("long_mem_ratio", "<", 2.0, "Long peak RSS of the process, T=2048 / T=1024 (train step, plain)"),
    ("gen_speedup", ">=", 5.0, "256 new tokens: cached generate vs re-running the forward (S plain)"),
    ("threads_speedup_M", ">=", 1.7, "train step M plain: all threads vs 1 thread"),
    ("ckpt_mem_cut_Deep", ">=", 3.0, "Deep plain: activation memory without / with checkpointing"),
    ("ckpt_time_Deep", "<=", 0.40, "Deep plain: extra train step time with checkpointing"),
]


def make_config(name: str, mode: str, T: Optional[int] = None, max_seq_len: Optional[int] = None):
    import stackformer as sf
    spec = CONFIGS[name]
    T = T or spec["T"]
    kw = dict(vocab_size=spec["vocab_size"], d_model=spec["d_model"], n_heads=spec["n_heads"],
              n_layers=spec["n_layers"], max_seq_len=max_seq_len or max(T, spec["T"]))
    kw.update(MODES[mode])
    return sf.Config(**kw)


def make_batch(V: int, B: int, T: int, seed: int = 1234) -> Tuple[np.ndarray, np.ndarray]:
    tok = np.random.default_rng(seed).integers(0, V, (B, T + 1)).astype(np.int64)
    return np.ascontiguousarray(tok[:, :-1]), np.ascontiguousarray(tok[:, 1:])


def flops(cfg, B: int, T: int) -> Dict[str, float]:
    """Analytic FLOPs (2 per multiply-add). linear: every Linear + the head; attn: the score
    and value products over visible keys (causal: T(T+1)/2 pairs) incl. MoDA depth slots.
    Train = 3 x forward (backward does two products per forward product); recompute and
    elementwise work are not counted."""
    d, H, n, F, V = cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff, cfg.vocab_size
    dh = d // H
    qd, kvd = H * dh, cfg.n_kv_heads * dh
    N = B * T
    per_layer = d * qd + 2 * d * kvd + qd * d + d * F * (2 if cfg.activation == "swiglu" else 1) + F * d
    lin = 2.0 * N * per_layer * n + 2.0 * N * d * V
    if cfg.moda:
        lin += 2.0 * N * (2 * d * kvd) * (n - 1)
    pairs = T * (T + 1) / 2 if cfg.causal else T * T
    attn = 2.0 * 2.0 * B * H * dh * pairs * n
    if cfg.moda:  # layer l reads 2l depth slots per query (chunk 1)
        attn += 2.0 * 2.0 * B * H * dh * T * sum(2 * l for l in range(n))
    return {"fwd_linear": lin, "fwd_attn": attn, "fwd": lin + attn, "train": 3.0 * (lin + attn)}


def torch_attn_bytes(cfg, B: int, T: int, train: bool) -> float:
    """Rough size of the explicit tensors stackformer.torch materializes that grow with T*T or
    with depth: attention scores, masked copy and probabilities (MoDA appends T x n_slots depth
    columns to every query row) and, under AttnRes, the stacked sources of each aggregation.
    All layers count when training (kept for backward), the largest one for a forward. Used
    to skip cases that would not fit in memory."""
    tot, mx = 0.0, 0.0
    L = 2 * cfg.n_layers
    for l in range(cfg.n_layers):
        cols = T + (T * 2 * l if cfg.moda else 0)
        b = 4.0 * B * cfg.n_heads * T * cols * 4
        tot += b
        mx = max(mx, b)
    if cfg.residual != "plain":
        S = cfg.attnres_block_size
        for k in range(L + 1):
            ns = k + 1 if cfg.residual == "attnres_full" else 1 + k // S + (k % S != 0)
            b = 3.0 * ns * B * T * cfg.d_model * 4
            tot += b
            mx = max(mx, b)
    return tot if train else mx


# ---------------------------------------------------------------------------------------------
# small utilities

def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def loadavg() -> List[float]:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def proc_status_kib(keys=("VmRSS", "VmHWM")) -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


def busy_processes(interval: float = 1.0) -> List[Dict[str, Any]]:
    """Other processes using CPU right now (sampled over `interval` seconds)."""
    def snap():
        d = {}
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                f = open(f"/proc/{p}/stat").read()
                rest = f[f.rfind(")") + 2:].split()
                d[int(p)] = int(rest[11]) + int(rest[12])
            except (OSError, IndexError, ValueError):
                pass
        return d
    if not os.path.isdir("/proc"):
        return []
    a = snap()
    time.sleep(interval)
    b = snap()
    hz = os.sysconf("SC_CLK_TCK")
    me = {os.getpid()}
    out = []
    for pid, t in b.items():
        if pid in me or pid not in a:
            continue
        cpu = (t - a[pid]) / hz / interval
        if cpu > 0.1:
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = "?"
            out.append({"pid": pid, "cpu": round(cpu, 2), "cmd": cmd[:100]})
    return sorted(out, key=lambda r: -r["cpu"])


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                fl = line.split(":", 1)[1].split()
                return [f for f in ("avx2", "fma", "avx512f") if f in fl]
    except OSError:
        pass
    return []


def n_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def git_info() -> Dict[str, Any]:
    def run(*a):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    return {"commit": run("rev-parse", "--short", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}


def core_so_info(so: Optional[Path] = None) -> Dict[str, Any]:
    if so is None:
        import stackformer._core as core
        so = Path(core.__file__)
    newer = []
    for src in list((ROOT / "csrc").glob("*.[ch]")) + [ROOT / "python" / "stackformer" / "_core.c"]:
        if src.exists() and src.stat().st_mtime > so.stat().st_mtime + 1:
            newer.append(src.name)
    return {"path": str(so), "mtime": datetime.datetime.fromtimestamp(so.stat().st_mtime).isoformat(timespec="seconds"),
            "sources_newer_than_so": newer}


def stats(times: List[float], tokens: Optional[int] = None, fl: Optional[float] = None,
          peak: Optional[float] = None, cpu: Optional[List[float]] = None) -> Dict[str, Any]:
    med = statistics.median(times)
    s: Dict[str, Any] = {"median_s": med, "min_s": min(times), "max_s": max(times), "reps": len(times),
                         "times_s": [round(t, 6) for t in times]}
    if cpu:
        s["cpu_median_s"] = statistics.median(cpu)
    if tokens:
        s["tok_s"] = tokens / med
        s["tok_s_best"] = tokens / min(times)
    if fl:
        s["gflops"] = fl / med / 1e9
        s["gflops_best"] = fl / min(times) / 1e9
        if peak:
            s["peak_frac"] = fl / med / 1e9 / peak
            s["peak_frac_best"] = fl / min(times) / 1e9 / peak
    return s


STAT = "median"  # which statistic the table and the targets use (--stat)


def pick(s: Dict[str, Any], field: str) -> Any:
    """s[field] for the median, s[field + "_best"] for the best repetition."""
    if STAT == "best" and field + "_best" in s:
        return s[field + "_best"]
    if STAT == "best" and field == "median_s":
        return s["min_s"]
    return s.get(field)


def adaptive_reps(first_s: float, reps: int, min_total: float, cap: int = 25) -> int:
    """At least `reps`; more for fast operations so their median covers >= min_total seconds."""
    if first_s <= 0:
        return cap
    return int(max(reps, min(cap, math.ceil(min_total / first_s))))


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# fp32 peak (benchmarks/peak.c)

def snapshot_package(tmp: Path) -> Dict[str, Any]:
    """Copy the stackformer package (Python files and the built extension) into tmp and import
    it from there, here and in every subprocess (PYTHONPATH): a rebuild of the working tree
    during the run then cannot mix builds or break a worker's import half-way."""
    import importlib.util
    spec = importlib.util.find_spec("stackformer")
    if spec is None or not spec.submodule_search_locations:
        return {"snapshot": None, "error": "stackformer not importable"}
    src = Path(list(spec.submodule_search_locations)[0])
    dst = tmp / "pkg" / "stackformer"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(dst.parent))
    os.environ["PYTHONPATH"] = str(dst.parent) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    return {"snapshot": str(dst), "source": str(src)}


def build_c(src: str, tmp: Path, flags: List[str]) -> Tuple[Optional[Path], str]:
    """Compile benchmarks/<src> into a shared library under tmp: (path or None, command or error)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler (cc) found"
    so = tmp / ("lib" + Path(src).stem + ".so")
    cmd = [cc, *flags, "-shared", "-fPIC", str(HERE / src), "-o", str(so)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return None, "compile failed: " + r.stderr[-500:]
    return so, " ".join(cmd[:-2] + ["-o", so.name])


def measure_peak(threads: int, quick: bool, tmp: Path) -> Dict[str, Any]:
    res: Dict[str, Any] = {"threads": threads}
    flags = ["-O2", "-mavx2", "-mfma"] if platform.machine() in ("x86_64", "AMD64", "i686") else ["-O2"]
    so, how = build_c("peak.c", tmp, flags + ["-pthread"])
    if so is None:
        res["error"] = how
        return res
    res["compile"] = how
    lib = ctypes.CDLL(str(so))
    lib.peak_gflops.restype = ctypes.c_double
    lib.peak_gflops.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    has512 = bool(lib.peak_has_avx512())
    res["isa"] = {"avx2_fma": bool(lib.peak_has_avx2_fma()), "avx512f": has512}
    if not res["isa"]["avx2_fma"]:
        res["note"] = "no AVX2/FMA: the probe measures scalar throughput"

    def best(kind: int, nt: int, seconds: float, budget: float) -> Tuple[float, List[float]]:
        """Many short runs, keep the best: on a loaded machine a short run has a fair chance
        of not being preempted, while load from elsewhere can only lower a run's result."""
        lanes = 16 if kind == 1 else 8
        g = max(lib.peak_gflops(kind, nt, 20_000) for _ in range(3))  # calibrate
        iters = int(max(2e4, seconds * g * 1e9 / (nt * 12 * lanes * 2)))
        vals: List[float] = []
        t_end = time.perf_counter() + budget
        while len(vals) < 10 or (time.perf_counter() < t_end and len(vals) < 400):
            vals.append(lib.peak_gflops(kind, nt, iters))
        return max(vals), vals

    budget = 0.3 if quick else 1.0
    for kind, name in ((0, "avx2"), (1, "avx512")):
        if kind == 1 and not has512:
            continue
        for nt in sorted({1, threads}):
            b, vals = best(kind, nt, 0.002, budget)
            res[f"{name}_{nt}t"] = b
            res[f"{name}_{nt}t_runs"] = len(vals)
            res[f"{name}_{nt}t_median"] = statistics.median(vals)
    one = res.get("avx2_1t", 0.0)
    alln = res.get(f"avx2_{threads}t", one)
    # The reference for "% of peak" at `threads` threads: the better of the measured all-thread
    # peak and threads x the one-thread peak (a pure FMA loop scales linearly over physical
    # cores; on a loaded machine the all-thread probe undershoots, which would flatter us).
    res["peak_1t"] = one
    res["peak_all"] = max(alln, one * threads)
    res["peak_all_measured"] = alln
    if has512:
        res["avx512_vs_avx2_1t"] = res.get("avx512_1t", 0) / one if one else None
    return res


# ---------------------------------------------------------------------------------------------
# direct calls into the C matmul (sf_gemm is exported by stackformer._core)

class CMatmul:
    def __init__(self):
        import stackformer._core as core
        lib = ctypes.CDLL(core.__file__)
        f = lib.sf_gemm
        P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        f.argtypes = [P, I64, P, I64, I64, P, I, P, I64, I64, I64, I, P, I]
        f.restype = None
        lib.sf_matmul_pack_floats.argtypes = [I64, I64]
        lib.sf_matmul_pack_floats.restype = I64
        lib.sf_gemm_pack_floats.argtypes = [I64, I64, I64, I]
        lib.sf_gemm_pack_floats.restype = I64
        self.lib = lib

    def case(self, kind: str, N: int, K: int, M: int, threads: int) -> Callable[[], None]:
        """A closure running one product of a Linear (x (N,K), W (M,K)):
        fwd: y = x W^T + b;  dW: dW += dy^T x;  dX: dx = dy W  (as sf_model.c calls them)."""
        x, w, b, dy = linear_operands(N, K, M)
        lib = self.lib
        keep = [x, w, b, dy]
        if kind == "fwd":
            y = np.empty((N, M), np.float32)
            pack = np.empty(lib.sf_matmul_pack_floats(K, M), np.float32)
            keep += [y, pack]
            args = (y.ctypes.data, M, x.ctypes.data, K, 1, w.ctypes.data, 1, b.ctypes.data, N, K, M, 0, pack.ctypes.data, threads)
        elif kind == "dW":
            dw = np.zeros((M, K), np.float32)
            pack = np.empty(lib.sf_gemm_pack_floats(M, N, K, 1), np.float32)  # A strided: + a chunk of A
            keep += [dw, pack]
            args = (dw.ctypes.data, K, dy.ctypes.data, 1, M, x.ctypes.data, 0, None, M, N, K, 1, pack.ctypes.data, threads)
        else:
            dx = np.empty((N, K), np.float32)
            pack = np.empty(lib.sf_matmul_pack_floats(M, K), np.float32)
            keep += [dx, pack]
            args = (dx.ctypes.data, K, dy.ctypes.data, M, 1, w.ctypes.data, 0, None, N, M, K, 0, pack.ctypes.data, threads)

        def run(_keep=keep):
            lib.sf_gemm(*args)
        return run


def linear_shapes(cfg, B: int, T: int) -> List[Tuple[str, int, int, int, int]]:
    """(name, N, K, M, count per forward) of every Linear in one forward pass."""
    d, H, n, F, V = cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff, cfg.vocab_size
    N = B * T
    return [("q/k/v/o proj", N, d, d, 4 * n), ("up_proj", N, d, F, n), ("down_proj", N, F, d, n),
            ("head", N, d, V, 1)]


def bench_matmul(cfg_name: str, threads: int, reps: int, tw: Optional["Worker"], peak_all: float,
                 peak_1t: float) -> Dict[str, Any]:
    cfg = make_config(cfg_name, "plain")
    B, T = CONFIGS[cfg_name]["B"], CONFIGS[cfg_name]["T"]
    cm = CMatmul()
    rows = []
    torch_ok = tw is not None
    for kind in ("fwd", "dW", "dX"):
        for name, N, K, M, count in linear_shapes(cfg, B, T):
            fn = cm.case(kind, N, K, M, threads)
            fn()
            t0 = time.perf_counter(); fn(); first = time.perf_counter() - t0
            n = adaptive_reps(first, reps, 0.3, cap=30)
            # time_calls warms up for 0.1 s first: in the run of 2026-11-26 the first shape's
            # first 15 two-thread calls ran at exactly the one-thread time (the second core
            # busy or idle-throttled after the previous section), 57% instead of ~90% of peak
            ts = time_calls(fn, n, warm_s=0.1)
            fl = 2.0 * N * K * M
            row = {"kind": kind, "name": name, "N": N, "K": K, "M": M, "count": count, "flops": fl,
                   "sf": stats(ts, fl=fl, peak=peak_all)}
            if threads > 1:
                one = cm.case(kind, N, K, M, 1)
                one()
                ts1 = []
                for _ in range(max(3, n // 2)):
                    t0 = time.perf_counter(); one(); ts1.append(time.perf_counter() - t0)
                row["sf_1t"] = stats(ts1, fl=fl, peak=peak_1t)
            if torch_ok:
                try:
                    r = tw.call(op="matmul", kind=kind, N=N, K=K, M=M, reps=n, threads=threads)
                    row["torch"] = stats(r["times"], fl=fl, peak=peak_all)
                except WorkerError as e:
                    row["torch_error"] = str(e)[-300:]
                    torch_ok = False
            rows.append(row)

    def aggregate(key: str, peak: float) -> Dict[str, Any]:
        agg: Dict[str, Any] = {}
        groups = {"fwd": ("fwd",), "dW": ("dW",), "dX": ("dX",), "train(fwd+dW+dX)": ("fwd", "dW", "dX")}
        for gname, kinds in groups.items():
            rs = [r for r in rows if r["kind"] in kinds and key in r]
            if not rs:
                continue
            fl = sum(r["flops"] * r["count"] for r in rs)
            med = sum(r[key]["median_s"] * r["count"] for r in rs)
            best = sum(r[key]["min_s"] * r["count"] for r in rs)
            agg[gname] = {"gflops": fl / med / 1e9, "peak_frac": fl / med / 1e9 / peak,
                          "gflops_best": fl / best / 1e9, "peak_frac_best": fl / best / 1e9 / peak}
        return agg
    agg = aggregate("sf", peak_all)
    tagg = aggregate("torch", peak_all)
    for k, v in tagg.items():
        agg[k]["torch_gflops"] = v["gflops"]
        agg[k]["torch_gflops_best"] = v["gflops_best"]
    return {"config": cfg_name, "threads": threads, "rows": rows, "aggregate": agg,
            "aggregate_1t": aggregate("sf_1t", peak_1t) if threads > 1 else agg,
            "note": "one call = pack W + tiles, exactly as sf_model.c calls sf_gemm; aggregate = "
                    "FLOP-weighted over one pass's calls (count x shape)"}


# ---------------------------------------------------------------------------------------------
# OpenBLAS as a yardstick for sf_gemm (the benchmark only: stackformer never links a BLAS).
# It runs in its own worker process: OpenBLAS's threads spin for a while after every call, and
# in our process they would take a core from the OpenMP team measured next (and vice versa).

CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 101, 111, 112


def find_openblas() -> Optional[str]:
    """A loadable OpenBLAS (SF_BENCH_OPENBLAS=path overrides the search), or None."""
    if os.environ.get("SF_BENCH_OPENBLAS"):
        return os.environ["SF_BENCH_OPENBLAS"]
    import ctypes.util
    return ctypes.util.find_library("openblas")


def perhead_shapes(cfg_names: List[str]) -> List[Dict[str, Any]]:
    """The two per-head products of causal attention for one (sequence, head), per config."""
    out = []
    for c in cfg_names:
        cf = CONFIGS[c]
        T, dh, heads = cf["T"], cf["d_model"] // cf["n_heads"], cf["B"] * cf["n_heads"]
        out.append(dict(config=c, which=0, name="S = Q K^T", heads=heads, T=T, dh=dh, N=T, K=dh, M=T))
        out.append(dict(config=c, which=1, name="O = P V", heads=heads, T=T, dh=dh, N=T, K=T, M=dh))
    return out


def perhead_buffers(sh: Dict[str, Any]) -> List[np.ndarray]:
    """a, b, y of benchmarks/gemm_loop.c for one per-head shape (all heads, one after another)."""
    rng = np.random.default_rng(0)
    H, T, dh = sh["heads"], sh["T"], sh["dh"]
    a_shape = (H, T, dh) if sh["which"] == 0 else (H, T, T)
    y_shape = (H, T, T) if sh["which"] == 0 else (H, T, dh)
    return [rng.standard_normal(a_shape, dtype=np.float32), rng.standard_normal((H, T, dh), dtype=np.float32),
            np.empty(y_shape, np.float32)]


def time_calls(fn: Callable[[], Any], reps: int, warm_s: float = 0.06) -> List[float]:
    """reps timings of fn after >= warm_s seconds (and >= 2 calls) of warm-up. On the VM this was
    written on, the second core runs the first ~25 ms of work after an idle pause at about half
    speed (2 threads measure like 1), so a block that starts after a pause warms up first."""
    t_end = time.perf_counter() + warm_s
    fn(); fn()
    while time.perf_counter() < t_end:
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return ts


def load_gemm_loop(path: str):
    lib = ctypes.CDLL(path)
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.loop_sf.argtypes = [P, I, I64, I64, I64, P, P, P, P, I, I]
    lib.loop_blas.argtypes = [P, I, I64, I64, I64, P, P, P, I]
    return lib


def b_setup(state, msg):
    lib = ctypes.CDLL(msg["path"])
    lib.openblas_set_num_threads.argtypes = [ctypes.c_int]
    lib.openblas_set_num_threads(state["threads"])
    P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.cblas_sgemm.argtypes = [I, I, I, I, I, I, F, P, I, P, I, F, P, I]
    state["blas"] = lib
    state["loop"] = load_gemm_loop(msg["loop_so"]) if msg.get("loop_so") else None
    info = {"path": msg["path"]}
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        info["config"] = lib.openblas_get_config().decode()
        lib.openblas_get_num_threads.restype = ctypes.c_int
        info["threads"] = lib.openblas_get_num_threads()
    except AttributeError:
        pass
    return info


def b_linear(state, msg):
    """The products of CMatmul.case with cblas_sgemm. No bias in the forward (beta = 0): BLAS
    has no bias, and adding one would cost it an extra pass over y; leaving it out favours BLAS.
    Operands are made once per shape (the benchmark calls once per timed block)."""
    lib, N, K, M, kind = state["blas"], msg["N"], msg["K"], msg["M"], msg["kind"]
    key = (kind, N, K, M)
    if state.get("linear_key") != key:
        x, w, _, dy = linear_operands(N, K, M)
        R, NT, TR = CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS
        if kind == "fwd":  # y = x W^T
            y = np.empty((N, M), np.float32)
            args = (R, NT, TR, N, M, K, 1.0, x.ctypes.data, K, w.ctypes.data, K, 0.0, y.ctypes.data, M)
        elif kind == "dW":  # dW += dy^T x
            y = np.zeros((M, K), np.float32)
            args = (R, TR, NT, M, K, N, 1.0, dy.ctypes.data, M, x.ctypes.data, K, 1.0, y.ctypes.data, K)
        else:  # dx = dy W
            y = np.empty((N, K), np.float32)
            args = (R, NT, NT, N, K, M, 1.0, dy.ctypes.data, M, w.ctypes.data, K, 0.0, y.ctypes.data, K)
        lib.cblas_sgemm(*args)  # one call on the fresh output first: its corners check the layout flags
        state["linear_key"], state["linear_case"] = key, (args, [x, w, dy, y], [y[0, :8].tolist(), y[-1, -8:].tolist()])
    args, _, probe = state["linear_case"]
    return {"times": time_calls(lambda: lib.cblas_sgemm(*args), msg["reps"]), "probe": probe}


def linear_operands(N: int, K: int, M: int) -> List[np.ndarray]:
    """x (N,K), W (M,K), b (M,), dy (N,M): the operands of CMatmul.case, in its order."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal((N, K), dtype=np.float32), rng.standard_normal((M, K), dtype=np.float32),
            rng.standard_normal(M, dtype=np.float32), rng.standard_normal((N, M), dtype=np.float32)]


def check_blas_probe(kind: str, N: int, K: int, M: int, probe: List[List[float]]) -> float:
    """Relative error of OpenBLAS's output corners against float64 NumPy: a wrong transpose or
    leading dimension in the cblas call would time a different product; this catches it."""
    x, w, _, dy = (a.astype(np.float64) for a in linear_operands(N, K, M))
    if kind == "fwd":  # y = x W^T (no bias for BLAS)
        first, last = x[0] @ w.T, x[-1] @ w.T
    elif kind == "dW":  # dW = dy^T x, rows 0 and M-1
        first, last = dy[:, 0] @ x, dy[:, -1] @ x
    else:  # dx = dy W
        first, last = dy[0] @ w, dy[-1] @ w
    return probe_rel_err(probe, first, last)


def probe_rel_err(probe: List[List[float]], first: np.ndarray, last: np.ndarray) -> float:
    """Max |error| of a probe (the first 8 and the last 8 values of an output) against the
    float64 reference's first and last rows, relative to the reference's largest value."""
    ref = np.concatenate([first.ravel()[:8], last.ravel()[-8:]])
    return float(np.max(np.abs(np.array(probe[0] + probe[1]) - ref)) / np.max(np.abs(ref)))


def b_perhead(state, msg):
    lib, loop, sh = state["blas"], state["loop"], msg["shape"]
    if state.get("perhead_key") != sh:  # buffers made once per shape, not once per block
        state["perhead_key"], state["perhead_bufs"] = sh, perhead_buffers(sh)
    a, b, y = state["perhead_bufs"]
    fn = ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value
    lib.openblas_set_num_threads(msg["threads"])
    try:
        ts = time_calls(lambda: loop.loop_blas(fn, sh["which"], sh["heads"], sh["T"], sh["dh"], a.ctypes.data,
                                               b.ctypes.data, y.ctypes.data, 1), msg["reps"])
        return {"times": ts, "probe": [y[0].ravel()[:8].tolist(), y[-1].ravel()[-8:].tolist()]}
    finally:
        lib.openblas_set_num_threads(state["threads"])


BLAS_OPS = {"setup": b_setup, "linear": b_linear, "perhead": b_perhead}


def bench_openblas(mm: Dict[str, Any], threads: int, reps: int, tmp: Path) -> Dict[str, Any]:
    """sf_gemm against OpenBLAS on the Linear products of bench_matmul and on the per-head
    attention products at S's and M's shapes (one library call per (sequence, head); 1 thread
    per call, as the attention kernel runs a head on one thread, and all threads).

    The two are timed in alternating blocks (sf here, OpenBLAS in its worker process), with a
    pause after each OpenBLAS block: its threads spin ~0.1 s after a call before sleeping, and
    would otherwise take a core from the sf block that follows. Load changes hit both alike."""
    path = find_openblas()
    if not path:
        return {"error": "libopenblas not found (Debian/Ubuntu: apt install libopenblas-dev; or set SF_BENCH_OPENBLAS)"}
    loop_so, how = build_c("gemm_loop.c", tmp, ["-O2"])
    if loop_so is None:
        return {"error": how}
    res: Dict[str, Any] = {"compile": how}
    cm = CMatmul()
    loop = load_gemm_loop(str(loop_so))
    sf_gemm_ptr = ctypes.cast(cm.lib.sf_gemm, ctypes.c_void_p).value
    bw = Worker("blas", threads)

    def alternate(sf_fn: Callable[[], Any], blas_msg: Dict[str, Any], n: int, rounds: int = 5):
        sf_ts: List[float] = []
        bl_ts: List[float] = []
        per = max(2, math.ceil(n / rounds))
        for _ in range(rounds):
            sf_ts += time_calls(sf_fn, per)
            bl_ts += bw.call(**blas_msg, reps=per)["times"]
            time.sleep(0.15)
        return sf_ts, bl_ts

    try:
        res["library"] = bw.call(op="setup", path=path, loop_so=str(loop_so))
        time.sleep(0.15)
        lin = []
        for row in mm["rows"]:
            fl = row["flops"]
            sf_ts, bl_ts = alternate(cm.case(row["kind"], row["N"], row["K"], row["M"], threads),
                                     dict(op="linear", kind=row["kind"], N=row["N"], K=row["K"], M=row["M"]),
                                     row["sf"]["reps"])
            probe = bw.call(op="linear", kind=row["kind"], N=row["N"], K=row["K"], M=row["M"], reps=1)["probe"]
            err = check_blas_probe(row["kind"], row["N"], row["K"], row["M"], probe)
            if not err < 1e-4:
                raise RuntimeError(f"OpenBLAS {row['kind']} {row['N']}x{row['K']}x{row['M']} differs from NumPy "
                                   f"(relative error {err:.1e}): the yardstick's cblas call is wrong")
            lin.append({k: row[k] for k in ("kind", "name", "N", "K", "M", "count", "flops")}
                       | {"sf": stats(sf_ts, fl=fl), "blas": stats(bl_ts, fl=fl), "blas_check_rel_err": err})
        heads = []
        for sh in perhead_shapes(["S", "M"]):
            a, b, y = perhead_buffers(sh)
            pack = np.empty(cm.lib.sf_gemm_pack_floats(sh["N"], sh["K"], sh["M"], 0), np.float32)
            fl = 2.0 * sh["heads"] * sh["N"] * sh["K"] * sh["M"]
            for nt in sorted({1, threads}):
                def sf_fn(nt=nt, a=a, b=b, y=y, pack=pack, sh=sh):
                    loop.loop_sf(sf_gemm_ptr, sh["which"], sh["heads"], sh["T"], sh["dh"], a.ctypes.data,
                                 b.ctypes.data, y.ctypes.data, pack.ctypes.data, nt, 1)
                msg = dict(op="perhead", threads=nt, shape={k: sh[k] for k in ("which", "heads", "T", "dh")})
                sf_ts, bl_ts = alternate(sf_fn, msg, max(reps, 15))
                probe = bw.call(**msg, reps=1)["probe"]
                a64, b64 = a.astype(np.float64), b.astype(np.float64)
                first, last = (a64[h] @ (b64[h].T if sh["which"] == 0 else b64[h]) for h in (0, -1))
                err = probe_rel_err(probe, first, last)
                if not err < 1e-4:
                    raise RuntimeError(f"OpenBLAS per-head {sh['name']} differs from NumPy (relative error {err:.1e})")
                heads.append({**sh, "threads": nt, "flops": fl, "sf": stats(sf_ts, fl=fl), "blas": stats(bl_ts, fl=fl),
                              "blas_check_rel_err": err})
    finally:
        bw.close()
    res["linear"] = lin
    res["perhead"] = heads
    res["note"] = ("timed in alternating blocks; the forward is y = x W^T + b for sf and x W^T (no bias, "
                   "beta = 0) for BLAS; per-head: one library call per (sequence, head), heads in a C loop")
    return res


def openblas_ratio_linear(mm: Dict[str, Any], kinds: Tuple[str, ...]) -> Optional[float]:
    """FLOP-weighted speed of sf_gemm / OpenBLAS over one pass's Linear calls of these kinds."""
    ob = mm.get("openblas", {})
    if "linear" not in ob:
        return None
    sf_t = sum(pick(r["sf"], "median_s") * r["count"] for r in ob["linear"] if r["kind"] in kinds)
    bl_t = sum(pick(r["blas"], "median_s") * r["count"] for r in ob["linear"] if r["kind"] in kinds)
    return bl_t / sf_t if sf_t else None


# ---------------------------------------------------------------------------------------------
# worker processes (PyTorch, memory, profiling)

def torch_env() -> Dict[str, str]:
    """Environment for PyTorch processes: stackformer's OMP_WAIT_POLICY and GOMP_SPINCOUNT
    ("same", the default), or the user's own settings ("default": libgomp's spinning default
    when unset)."""
    e = dict(os.environ)
    if TORCH_OMP_WAIT == "same":
        import stackformer  # noqa: F401  (sets its default into os.environ)
        e = dict(os.environ)
    else:
        for key, user in (("OMP_WAIT_POLICY", USER_OMP_WAIT_POLICY), ("GOMP_SPINCOUNT", USER_GOMP_SPINCOUNT)):
            if user is None:
                e.pop(key, None)
            else:
                e[key] = user
    return e


class WorkerError(RuntimeError):
    pass


class Worker:
    """A persistent subprocess answering JSON-line requests (see worker_main)."""

    def __init__(self, kind: str, threads: int, env: Optional[Dict[str, str]] = None):
        e = torch_env() if kind == "torch" else dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen([sys.executable, str(THIS), "--_worker", kind, "--threads", str(threads)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=e)
        # wait until it has imported its libraries: a worker starting up (seconds of CPU) would
        # otherwise take a core from whatever is measured next
        self.call(op="ping")

    def call(self, **msg: Any) -> Dict[str, Any]:
        try:
            self.p.stdin.write(json.dumps(msg) + "\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError) as ex:
            raise WorkerError(f"worker is gone: {ex}")
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise WorkerError(f"worker exited (rc={self.p.poll()})")
            if line.startswith("@@"):
                r = json.loads(line[2:])
                if "error" in r:
                    raise WorkerError(r["error"])
                return r

    @property
    def pid(self) -> int:
        return self.p.pid

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.p.stdin.flush()
                self.p.wait(timeout=30)
            except Exception:
                self.p.kill()
                self.p.wait()


def worker_main(kind: str, threads: int) -> None:
    reply_to = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    state: Dict[str, Any] = {"threads": threads}
    handlers = {"torch": TORCH_OPS, "sfprof": SFPROF_OPS, "blas": BLAS_OPS}[kind]
    if kind == "torch":
        _torch_setup_threads(threads)
    elif kind == "sfprof":
        import stackformer  # noqa: F401
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("op") == "quit":
            break
        try:
            r = {} if msg["op"] == "ping" else handlers[msg["op"]](state, msg)
        except Exception:
            r = {"error": traceback.format_exc()}
        reply_to.write("@@" + json.dumps(r) + "\n")
        reply_to.flush()


def _torch_setup_threads(threads: int):
    import torch
    torch.set_num_threads(threads)
    return torch


def _torch_build(state: Dict[str, Any], impl: str, cfg, seed: int = 0, adamw: str = "fused"):
    """(module, optimizer, impl name) with the weights of sf.Model(cfg, seed)."""
    import torch
    import stackformer as sf
    import torch_mirror as tm
    sfm = sf.Model(cfg, seed=seed)
    module, name = tm.build(sfm, "to_torch" if impl == "to_torch" else "mirror")
    module.train()
    kw = {"fused": True} if adamw == "fused" else {}
    try:
        opt = tm.adamw_for(module, sfm, LR, **kw)
    except Exception:
        opt = tm.adamw_for(module, sfm, LR)
        adamw = "default"
    return sfm, module, opt, name, adamw


def t_setup(state, msg):
    torch = _torch_setup_threads(state["threads"])
    import stackformer as sf
    import torch_mirror as tm
    cfg = sf.Config.from_dict(msg["config"])
    B, T = msg["B"], msg["T"]
    x, y = make_batch(cfg.vocab_size, B, T)
    state["x"], state["y"] = torch.from_numpy(x), torch.from_numpy(y)
    state["impls"] = {}
    out = {}
    for impl in msg["impls"]:
        info: Dict[str, Any] = {}
        try:
            if impl == "to_torch" and not tm.have_to_torch():
                raise NotImplementedError("stackformer.torch.to_torch is not available")
            if impl == "sdpa":
                ok, why = tm.mirror_supports(cfg)
                if not ok:
                    raise NotImplementedError(why)
            sfm, module, opt, name, adamw = _torch_build(state, impl, cfg, adamw=msg.get("adamw", "fused"))
            info.update(impl=name, adamw=adamw)
            if msg.get("check", True):  # same weights, same math: compare on 2 sequences
                xs, ys = x[:2], y[:2]
                ref = sfm(xs).logits
                with torch.inference_mode():
                    got = tm.logits_of(module(torch.from_numpy(xs))).numpy()
                info["max_abs_diff_logits"] = float(np.abs(ref - got).max())
                loss_sf = sfm.forward_backward(xs, ys)
                lt = torch.nn.functional.cross_entropy(
                    tm.logits_of(module(torch.from_numpy(xs))).reshape(-1, cfg.vocab_size),
                    torch.from_numpy(ys).reshape(-1))
                lt.backward()
                module.zero_grad(set_to_none=True)
                info["loss_sf"], info["loss_torch"] = loss_sf, float(lt.detach())
            state["impls"][impl] = (module, opt)
            info["ok"] = True
        except Exception as e:
            info.update(ok=False, error=f"{type(e).__name__}: {e}"[:400])
        out[impl] = info
        gc.collect()
    return {"impls": out}


def _torch_step(state, impl: str, what: str) -> Callable[[], None]:
    import torch
    import torch_mirror as tm
    module, opt = state["impls"][impl]
    x, y = state["x"], state["y"]
    if what == "forward":
        def fwd():
            with torch.inference_mode():
                tm.logits_of(module(x))
        return fwd

    def train():
        logits = tm.logits_of(module(x))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return train


def t_run(state, msg):
    fn = _torch_step(state, msg["impl"], msg["what"])
    times, cpu = [], []
    for _ in range(msg.get("n", 1)):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"times": times, "cpu": cpu}


def t_matmul(state, msg):
    torch = _torch_setup_threads(state["threads"])
    F = torch.nn.functional
    N, K, M, kind = msg["N"], msg["K"], msg["M"], msg["kind"]
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    b, dy = torch.randn(M, generator=g), torch.randn(N, M, generator=g)
    if kind == "fwd":
        fn = lambda: F.linear(x, w, b)  # noqa: E731
    elif kind == "dW":
        fn = lambda: dy.t().mm(x)  # noqa: E731  (what autograd runs for a Linear's weight)
    else:
        fn = lambda: dy.mm(w)  # noqa: E731
    fn(); fn()
    times = []
    for _ in range(msg["reps"]):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return {"times": times}


TORCH_PHASES = [
    ("matmul", ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax", "aten::masked_fill",
                   "_softmax_backward", "aten::where", "aten::repeat_interleave", "aten::cat")),
    ("norm", ("layer_norm", "aten::rsqrt", "aten::pow", "aten::mean")),
    ("activation", ("gelu", "silu")),
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
    ("embed", ("embedding",)),
    ("optimizer", ("adamw", "_fused_adam", "clip_grad", "_foreach", "aten::norm", "linalg_vector_norm")),
]


def _torch_phase(key: str) -> str:
    k = key.lower()
    for phase, pats in TORCH_PHASES:
        if any(p.lower() in k for p in pats):
            return phase
    return "other"


def t_profile(state, msg):
    """torch.profiler self-CPU time per op, grouped in phases (run with 1 thread to compare
    with perf's CPU samples of the C core)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    fn = _torch_step(state, msg["impl"], msg["what"])
    fn()
    steps = msg.get("steps", 2)
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        fn()
    cpu_per_step = (time.process_time() - c0) / steps
    wall_per_step = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    phases: Dict[str, float] = {}
    ops: Dict[str, float] = {}
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::") and "Optimizer" not in ev.key:
            continue
        if "Optimizer" in ev.key:  # record_function range of opt.step: counted via its children
            continue
        us = ev.self_cpu_time_total
        phases[_torch_phase(ev.key)] = phases.get(_torch_phase(ev.key), 0.0) + us
        ops[ev.key] = ops.get(ev.key, 0.0) + us
    tot = sum(phases.values()) or 1.0
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {"cpu_per_step_s": cpu_per_step, "wall_per_step_s": wall_per_step,
            "share": {k: v / tot for k, v in phases.items()},
            "top_ops": [(k, v / tot) for k, v in top]}


TORCH_OPS = {"setup": t_setup, "run": t_run, "matmul": t_matmul, "profile": t_profile}


# -- profiling worker for the C core (perf attaches to it) --------------------------------------

def p_setup(state, msg):
    import stackformer as sf
    sf.set_num_threads(state["threads"])
    cfg = sf.Config.from_dict(msg["config"])
    state["model"] = sf.Model(cfg, seed=0)
    state["x"], state["y"] = make_batch(cfg.vocab_size, msg["B"], msg["T"])
    state["model"](state["x"][:1, :8])
    return {"pid": os.getpid()}


def p_run(state, msg):
    m, x, y = state["model"], state["x"], state["y"]
    fn = (lambda: m(x)) if msg["what"] == "forward" else (lambda: m.train_step(x, y, lr=LR))
    if msg.get("warm", True):
        fn()
    return {"ok": True}


def p_timed(state, msg):
    m, x, y = state["model"], state["x"], state["y"]
    fn = (lambda: m(x)) if msg["what"] == "forward" else (lambda: m.train_step(x, y, lr=LR))
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(msg.get("steps", 1)):
        fn()
    n = msg.get("steps", 1)
    return {"cpu_per_step_s": (time.process_time() - c0) / n, "wall_per_step_s": (time.perf_counter() - t0) / n}


SFPROF_OPS = {"setup": p_setup, "run": p_run, "timed": p_timed}


# -- one-shot memory worker ------------------------------------------------------------------

def mem_main(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Peak RSS of one step above the RSS just before it. A warm-up step at a tiny shape (B=1,
    T=8) first creates everything that does not scale with the batch (optimizer moments,
    gradient buffers, thread pools, library initialization), then VmHWM is reset and the real
    step runs: delta_bytes = what a step of this (B, T) needs on top of the model, whether it
    frees it afterwards or keeps it cached. steady_delta_bytes: the same for a second step."""
    threads = spec["threads"]
    impl, what = spec["impl"], spec["what"]
    import stackformer as sf
    sf.set_num_threads(threads)
    cfg = sf.Config.from_dict(spec["config"])
    B, T = spec["B"], spec["T"]
    x, y = make_batch(cfg.vocab_size, B, T)
    xs, ys = x[:1, :8].copy(), y[:1, :8].copy()
    if impl == "sf":
        m = sf.Model(cfg, seed=0)
        ck = bool(spec.get("checkpoint"))
        if what == "forward":
            fn = lambda: m(x)  # noqa: E731
            small = lambda: m(xs)  # noqa: E731
        else:
            fn = lambda: m.train_step(x, y, lr=LR, checkpoint=ck)  # noqa: E731
            small = lambda: m.train_step(xs, ys, lr=LR, checkpoint=ck)  # noqa: E731
    else:
        state: Dict[str, Any] = {"threads": threads}
        torch = _torch_setup_threads(threads)
        sfm, module, opt, name, _ = _torch_build(state, impl, cfg)
        del sfm
        state["impls"] = {impl: (module, opt)}
        state["x"], state["y"] = torch.from_numpy(xs), torch.from_numpy(ys)
        small = _torch_step(state, impl, what)
        small()
        state["x"], state["y"] = torch.from_numpy(x), torch.from_numpy(y)
        fn = _torch_step(state, impl, what)

    def measure() -> Tuple[int, int, int, str]:
        gc.collect()
        method = "clear_refs"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            method = "unavailable"
        before = proc_status_kib()
        if method != "clear_refs" or before["VmHWM"] > before["VmRSS"] + 1024:
            method = "hwm-not-reset (delta is an upper bound)"
        fn()
        after = proc_status_kib()
        return max(0, after["VmHWM"] - before["VmRSS"]) * 1024, before["VmRSS"] * 1024, after["VmHWM"] * 1024, method
    small()
    d1, rss1, hwm1, method = measure()
    d2, _, _, _ = measure()
    return {"delta_bytes": d1, "steady_delta_bytes": d2, "rss_before_bytes": rss1, "hwm_bytes": hwm1, "method": method}


def run_mem(spec: Dict[str, Any], timeout: float = 600) -> Dict[str, Any]:
    env = torch_env() if spec["impl"] != "sf" else dict(os.environ)
    # fixed malloc thresholds: every large buffer is a fresh mmap that is returned on free, so
    # each step's workspace is counted in that step (glibc's dynamic threshold would otherwise
    # keep the warm-up step's pages resident and hide them)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    env["MALLOC_TRIM_THRESHOLD_"] = "131072"
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        out = f.name
    try:
        r = subprocess.run([sys.executable, str(THIS), "--_mem", json.dumps(spec), "--_mem-out", out],
                           capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode != 0:
            return {"error": (r.stderr or r.stdout)[-400:]}
        return json.load(open(out))
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# timing

def timed(fn: Callable[[], Any]) -> Tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def interleave(sf_fn: Callable[[], Any], torch_impls: List[str], tw: Optional[Worker], what: str,
               reps: int, warmup: int, min_total: float) -> Dict[str, Any]:
    """Time sf_fn and each torch impl alternately; returns {"sf": (times, cpu), impl: ...}."""
    first = None
    for _ in range(warmup):
        first, _ = timed(sf_fn)
        for impl in torch_impls:
            tw.call(op="run", impl=impl, what=what, n=1)
    n = adaptive_reps(first or 1.0, reps, min_total)
    res: Dict[str, Any] = {"sf": ([], [])}
    for impl in torch_impls:
        res[impl] = ([], [])
    for _ in range(n):
        t, c = timed(sf_fn)
        res["sf"][0].append(t)
        res["sf"][1].append(c)
        for impl in torch_impls:
            r = tw.call(op="run", impl=impl, what=what, n=1)
            res[impl][0].append(r["times"][0])
            res[impl][1].append(r["cpu"][0])
    return res


class Bench:
    def __init__(self, args):
        self.a = args
        self.quick = args.quick
        self.threads = args.threads or n_cores()
        self.reps = args.reps or (3 if self.quick else 5)
        self.warmup = 1
        self.min_total = 0.5 if self.quick else 1.5
        self.tmp = Path(tempfile.mkdtemp(prefix="sfbench-"))
        self.R: Dict[str, Any] = {"cases": [], "extras": {}}
        self.torch_available = False
        self.have_to_torch = False
        self.load_samples: List[Tuple[str, List[float]]] = []

    # -- setup ----------------------------------------------------------------------------------
    def meta(self) -> None:
        import stackformer as sf
        sf.set_num_threads(self.threads)
        try:
            import torch  # noqa: F401  (version only; the orchestrator never runs torch ops)
            self.torch_available = not self.a.no_torch
            tv = torch.__version__
        except Exception:
            tv = None
        import torch_mirror  # noqa: F401
        try:
            import importlib.util
            self.have_to_torch = importlib.util.find_spec("stackformer.torch") is not None
        except Exception:
            self.have_to_torch = False
        busy = busy_processes()
        self.R["meta"] = {
            "started": now_iso(), "cpu_model": cpu_model(), "logical_cpus": os.cpu_count(),
            "affinity_cpus": n_cores(), "threads": self.threads, "cpu_flags": cpu_flags(),
            "matmul_kernel": getattr(sf, "matmul_kernel", lambda: "?")(),
            "python": platform.python_version(), "numpy": np.__version__, "torch": tv,
            "stackformer": getattr(sf, "__version__", "?"), "git": git_info(), "core_so": core_so_info(),
            "stackformer_torch_available": self.have_to_torch, "quick": self.quick, "reps": self.reps,
            "argv": sys.argv[1:], "loadavg_start": loadavg(), "busy_processes_start": busy, "stat": STAT,
            "omp_wait_policy": {"stackformer": os.environ.get("OMP_WAIT_POLICY", "(libgomp default)"),
                                "torch": torch_env().get("OMP_WAIT_POLICY", "(libgomp default)")},
            "gomp_spincount": {"stackformer": os.environ.get("GOMP_SPINCOUNT", "(libgomp default)"),
                               "torch": torch_env().get("GOMP_SPINCOUNT", "(libgomp default)")},
        }
        if busy:
            log(f"warning: other processes are using CPU ({sum(b['cpu'] for b in busy):.1f} cores): timings will be noisy")
        if self.R["meta"]["core_so"]["sources_newer_than_so"]:
            log("warning: csrc sources are newer than the built extension: rebuild (pip install -e .) to measure them")

    def torch_impls_for(self, mode: str) -> List[str]:
        if not self.torch_available:
            return []
        impls = []
        if self.have_to_torch and self.a.torch_impl in ("auto", "to_torch", "both"):
            impls.append("to_torch")
        if mode == "plain" and self.a.torch_impl in ("auto", "sdpa", "both"):
            impls.append("sdpa")
        return impls

    # -- the matrix -------------------------------------------------------------------------
    def run_config(self, name: str, modes: List[str]) -> None:
        import stackformer as sf
        spec = CONFIGS[name]
        B, T = spec["B"], spec["T"]
        tw = Worker("torch", self.threads) if self.torch_available else None
        peak = self.R["peak"].get("peak_all")
        try:
            for mode in modes:
                cfg = make_config(name, mode)
                t_case = time.perf_counter()
                sf.set_num_threads(self.threads)
                model = sf.Model(cfg, seed=0)
                x, y = make_batch(cfg.vocab_size, B, T)
                fl = flops(cfg, B, T)
                case: Dict[str, Any] = {"config": name, "mode": mode, "B": B, "T": T, "params": model.num_params,
                                        "flops": fl, "config_dict": cfg.to_dict(), "sf": {}, "torch": {}}
                impls = self.torch_impls_for(mode)
                if tw and impls:
                    ok_impls = []
                    for impl in impls:
                        if impl == "to_torch":
                            need = torch_attn_bytes(cfg, B, T, train=True)
                            if need > TORCH_MEM_LIMIT:
                                case["torch"][impl] = {"skipped": f"stackformer.torch would materialize ~{need / 2**30:.1f} GiB of attention tensors"}
                                continue
                        ok_impls.append(impl)
                    impls = []
                    if ok_impls:
                        try:
                            r = tw.call(op="setup", config=cfg.to_dict(), B=B, T=T, impls=ok_impls, adamw=self.a.torch_adamw)
                            for impl, info in r["impls"].items():
                                case["torch"][impl] = {"info": info}
                            impls = [i for i in ok_impls if r["impls"][i].get("ok")]
                        except WorkerError as e:
                            tw = self._torch_failed(tw, case, ok_impls, e)
                else:
                    impls = []
                try:
                    log(f"[{name}/{mode}] forward ...")
                    fwd = interleave(lambda: model(x), impls, tw, "forward", self.reps, self.warmup, self.min_total)
                    log(f"[{name}/{mode}] train step ...")
                    trn = interleave(lambda: model.train_step(x, y, lr=LR), impls, tw, "train", self.reps, self.warmup, self.min_total)
                except WorkerError as e:  # PyTorch died mid-case: measure stackformer alone
                    tw = self._torch_failed(tw, case, impls, e)
                    impls = []
                    log(f"[{name}/{mode}] forward (without PyTorch) ...")
                    fwd = interleave(lambda: model(x), [], None, "forward", self.reps, self.warmup, self.min_total)
                    log(f"[{name}/{mode}] train step (without PyTorch) ...")
                    trn = interleave(lambda: model.train_step(x, y, lr=LR), [], None, "train", self.reps, self.warmup, self.min_total)
                for key, res, f in (("forward", fwd, fl["fwd"]), ("train", trn, fl["train"])):
                    case["sf"][key] = stats(res["sf"][0], B * T, f, peak, res["sf"][1])
                    for impl in impls:
                        case["torch"][impl][key] = stats(res[impl][0], B * T, f, peak, res[impl][1])
                        case["torch"][impl][f"{key}_ratio"] = case["torch"][impl][key]["median_s"] / case["sf"][key]["median_s"]
                        case["torch"][impl][f"{key}_ratio_best"] = case["torch"][impl][key]["min_s"] / case["sf"][key]["min_s"]
                case["train_memory_bytes"] = model.train_memory_bytes(B, T, False)
                case["wall_s"] = time.perf_counter() - t_case
                self.R["cases"].append(case)
                self.load_samples.append((f"{name}/{mode}", loadavg()))
                self.print_case(case)
                del model
                gc.collect()
            # config-specific extra rows
            if name == "M" and "plain" in modes and not self.quick:
                self.threads_row()
                if len(modes) > 1:
                    self.overhead_row(modes)
            if name == "Deep" and not self.quick:
                self.checkpoint_rows(modes)
        finally:
            if tw:
                tw.close()

    def _torch_failed(self, tw: Optional[Worker], case: Dict[str, Any], impls: List[str], e: Exception) -> Optional[Worker]:
        """Record a PyTorch worker failure in the case and start a fresh worker for the next one."""
        msg = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        log(f"    PyTorch failed ({msg}); continuing")
        for impl in impls:
            case["torch"][impl] = {"info": {"ok": False, "error": msg}}
        if tw:
            tw.close()
        return Worker("torch", self.threads) if self.torch_available else None

    def print_case(self, c: Dict[str, Any]) -> None:
        def tt(impl, key):
            t = c["torch"].get(impl, {})
            return f"{t[key + '_ratio']:.2f}x vs {impl}" if key + "_ratio" in t else ""
        f, t = c["sf"]["forward"], c["sf"]["train"]
        log(f"    fwd {f['tok_s']:>9.0f} tok/s {f['gflops']:6.1f} GF/s  {tt('sdpa', 'forward')} {tt('to_torch', 'forward')}")
        log(f"    trn {t['tok_s']:>9.0f} tok/s {t['gflops']:6.1f} GF/s  {tt('sdpa', 'train')} {tt('to_torch', 'train')}")

    def threads_row(self) -> None:
        import stackformer as sf
        cfg = make_config("M", "plain")
        B, T = CONFIGS["M"]["B"], CONFIGS["M"]["T"]
        model = sf.Model(cfg, seed=0)
        x, y = make_batch(cfg.vocab_size, B, T)
        log("[M/plain] train step, 1 thread vs all ...")

        def with_threads(n):
            def f():
                sf.set_num_threads(n)
                model.train_step(x, y, lr=LR)
            return f
        f1, fn = with_threads(1), with_threads(self.threads)
        f1(); fn()
        t1, tn = [], []
        for _ in range(self.reps):
            t1.append(timed(f1)[0])
            tn.append(timed(fn)[0])
        sf.set_num_threads(self.threads)
        s1, sn = stats(t1, B * T), stats(tn, B * T)
        self.R["extras"]["threads_M_train"] = {"threads": self.threads, "1t": s1, "all": sn,
                                               "speedup": s1["median_s"] / sn["median_s"],
                                               "speedup_best": s1["min_s"] / sn["min_s"]}

    def blas_backend_rows(self, configs: List[str]) -> None:
        """stackformer with its optional BLAS backend (stackformer.use_blas, OpenBLAS here)
        against its own tiles: forward and train step of plain S and M, the two taking turns
        within each repetition. Not a target: it shows what the fallback costs or gains."""
        import stackformer as sf
        path = find_openblas()
        if not path:
            self.R["extras"]["blas_backend"] = {"error": "libopenblas not found"}
            return
        sf.set_num_threads(self.threads)
        info = sf.use_blas(path)
        sf.use_builtin_matmul()
        rows = []
        try:
            for name in [c for c in ("S", "M") if c in configs]:
                B, T = CONFIGS[name]["B"], CONFIGS[name]["T"]
                cfg = make_config(name, "plain")
                model = sf.Model(cfg, seed=0)
                x, y = make_batch(cfg.vocab_size, B, T)
                for what, step in (("forward", lambda: model(x)), ("train", lambda: model.train_step(x, y, lr=LR))):
                    log(f"[{name}/plain] {what}: BLAS backend vs tiles ...")
                    tt, tb = [], []
                    for r in range(2 + max(self.reps, 5)):  # two warm-up rounds
                        sf.use_builtin_matmul()
                        t_tiles = timed(step)[0]
                        sf.use_blas(path)
                        t_blas = timed(step)[0]
                        if r >= 2:
                            tt.append(t_tiles)
                            tb.append(t_blas)
                    st, sb = stats(tt, B * T), stats(tb, B * T)
                    rows.append({"config": name, "what": what, "tiles": st, "blas": sb,
                                 "blas_vs_tiles": st["median_s"] / sb["median_s"]})
                del model
        finally:
            sf.use_builtin_matmul()
        self.R["extras"]["blas_backend"] = {"library": info, "rows": rows}

    def overhead_row(self, modes: List[str]) -> None:
        """Train step of every mode at M, the modes taking turns within each repetition, so a
        change of machine load between the matrix's cases cannot pose as an overhead."""
        import stackformer as sf
        sf.set_num_threads(self.threads)
        B, T = CONFIGS["M"]["B"], CONFIGS["M"]["T"]
        models = {mode: sf.Model(make_config("M", mode), seed=0) for mode in modes}
        x, y = make_batch(256, B, T)
        log(f"[M] train step overheads, modes interleaved ({', '.join(modes)}) ...")
        fns = {mode: (lambda m=m: m.train_step(x, y, lr=LR)) for mode, m in models.items()}
        # Two warm-up rounds and at least 7 measured ones: with one warm-up call per mode the
        # first two rounds of every mode ran 10-20% slow on the 2-core VM this was tuned on
        # (the run of 2026-11-25), and with 5 rounds that drift decided the median.
        for _ in range(2):
            for fn in fns.values():
                fn()
        times: Dict[str, List[float]] = {mode: [] for mode in modes}
        for r in range(max(self.reps, 7)):
            order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate who goes first
            for mode in order:
                times[mode].append(timed(fns[mode])[0])
        out: Dict[str, Any] = {"modes": {mode: stats(ts, B * T) for mode, ts in times.items()}}
        for mode in modes:
            if mode != "plain":
                out[mode] = {"overhead": statistics.median(times[mode]) / statistics.median(times["plain"]) - 1.0,
                             "overhead_best": min(times[mode]) / min(times["plain"]) - 1.0,
                             # per-repetition ratio: both ran back to back, so load cancels best
                             "overhead_paired_median": statistics.median(
                                 [a / b for a, b in zip(times[mode], times["plain"])]) - 1.0}
        self.R["extras"]["overhead_M_train"] = out
        del models
        gc.collect()

    def checkpoint_rows(self, modes: List[str]) -> None:
        import stackformer as sf
        B, T = CONFIGS["Deep"]["B"], CONFIGS["Deep"]["T"]
        rows = {}
        for mode in modes:
            cfg = make_config("Deep", mode)
            model = sf.Model(cfg, seed=0)
            full, ck = model.train_memory_bytes(B, T, False), model.train_memory_bytes(B, T, True)
            row: Dict[str, Any] = {"act_bytes": full, "act_bytes_ckpt": ck, "mem_cut": full / ck}
            if mode == "plain" or self.a.ckpt_all_modes:
                log(f"[Deep/{mode}] checkpointing time ...")
                x, y = make_batch(cfg.vocab_size, B, T)
                a = lambda: model.train_step(x, y, lr=LR)  # noqa: E731
                b = lambda: model.train_step(x, y, lr=LR, checkpoint=True)  # noqa: E731
                a(); b()
                ta, tb = [], []
                for _ in range(self.reps):
                    ta.append(timed(a)[0])
                    tb.append(timed(b)[0])
                row["no_ckpt"], row["ckpt"] = stats(ta, B * T), stats(tb, B * T)
                row["time_overhead"] = row["ckpt"]["median_s"] / row["no_ckpt"]["median_s"] - 1.0
                row["time_overhead_best"] = row["ckpt"]["min_s"] / row["no_ckpt"]["min_s"] - 1.0
            rows[mode] = row
            del model
        self.R["extras"]["checkpoint_Deep"] = rows

    # -- generation ---------------------------------------------------------------------------
    def generation(self, plan: List[Tuple[str, str, int]]) -> None:
        import stackformer as sf
        out: List[Dict[str, Any]] = []
        self.R["generation"] = out
        for name, mode, rerun_reps in plan:
            cfg = make_config(name, mode, max_seq_len=GEN_PROMPT + GEN_NEW)
            model = sf.Model(cfg, seed=0)
            prompt = np.random.default_rng(7).integers(0, cfg.vocab_size, (1, GEN_PROMPT))
            n_new = GEN_NEW if not self.quick else GEN_NEW

            def cached():
                return model.generate(prompt, n_new, temperature=0)

            def rerun():
                seq = prompt
                for _ in range(n_new):
                    nxt = model(seq).logits[:, -1].argmax(-1)
                    seq = np.concatenate([seq, nxt[:, None]], axis=1)
                return seq
            log(f"[gen {name}/{mode}] cached vs re-run, {n_new} new tokens ...")
            a, b = cached(), rerun()
            agree = float((a[0, GEN_PROMPT:] == b[0, GEN_PROMPT:]).mean())
            tc = [timed(cached)[0] for _ in range(self.reps if self.quick else max(self.reps, 5))]
            tc1 = []
            if self.threads > 1:  # batch-1 decoding is latency-bound: how much do threads help?
                sf.set_num_threads(1)
                cached()
                tc1 = [timed(cached)[0] for _ in range(self.reps if self.quick else max(self.reps, 5))]
                sf.set_num_threads(self.threads)
            tr = [timed(rerun)[0] for _ in range(rerun_reps)]
            row = {"config": name, "mode": mode, "prompt": GEN_PROMPT, "new_tokens": n_new, "batch": 1,
                   "cached": stats(tc, n_new), "rerun": stats(tr, n_new),
                   "cached_1thread": stats(tc1, n_new) if tc1 else None,
                   "speedup": statistics.median(tr) / statistics.median(tc), "speedup_best": min(tr) / min(tc),
                   "greedy_agreement": agree}
            out.append(row)
            log(f"    cached {row['cached']['tok_s']:.0f} tok/s, re-run {row['rerun']['tok_s']:.0f} tok/s: {row['speedup']:.1f}x")
            del model

    # -- memory ------------------------------------------------------------------------------
    def memory(self, configs: List[str], modes: List[str]) -> None:
        mem: List[Dict[str, Any]] = []
        self.R["memory"] = mem

        def one(cfg_name, mode, impl, what, T=None, checkpoint=False):
            cfg = make_config(cfg_name, mode, T=T)
            B = CONFIGS[cfg_name]["B"]
            T = T or CONFIGS[cfg_name]["T"]
            if impl == "to_torch" and torch_attn_bytes(cfg, B, T, what == "train") > TORCH_MEM_LIMIT:
                return
            spec = {"impl": impl, "what": what, "config": cfg.to_dict(), "B": B, "T": T,
                    "threads": self.threads, "checkpoint": checkpoint}
            r = run_mem(spec)
            r.update(config=cfg_name, mode=mode, impl=impl, what=what, T=T, checkpoint=checkpoint)
            mem.append(r)
            if "error" in r:
                log(f"    memory {cfg_name}/{mode}/{impl}/{what}: error {r['error'][-200:]}")
        for name in configs:
            log(f"[memory {name}] subprocesses ...")
            for mode in modes:
                if self.quick and mode != "plain":
                    continue
                for what in ("forward", "train"):
                    one(name, mode, "sf", what)
                    if mode == "plain":  # PyTorch memory: the plain baselines only (keeps the run short)
                        for impl in self.torch_impls_for(mode):
                            if impl == "sdpa" or name == "Long":  # to_torch: only where T x T shows
                                one(name, mode, impl, what)
            if name == "Long":
                for mode in modes:
                    for what in ("forward", "train"):
                        one(name, mode, "sf", what, T=LONG_SHORT_T)
                        if mode == "plain":
                            for impl in self.torch_impls_for(mode):
                                one(name, mode, impl, what, T=LONG_SHORT_T)
            if name == "Deep" and not self.quick:
                for mode in (modes if self.a.ckpt_all_modes else [m for m in modes if m == "plain"]):
                    one(name, mode, "sf", "train", checkpoint=True)
        self.R["memory"] = mem

    # -- profiles ------------------------------------------------------------------------------
    def profile(self, name: str, modes: List[str]) -> None:
        """perf samples of the C core and torch.profiler of PyTorch, both at 1 thread, grouped
        into phases; CPU seconds per step per phase = share x CPU time per step."""
        prof: Dict[str, Any] = {"config": name, "threads": 1}
        perf = shutil.which("perf")
        spec = CONFIGS[name]
        B, T = spec["B"], spec["T"]
        if perf:
            for mode in modes:
                for what in (("forward", "train") if mode == "plain" else ("train",)):
                    log(f"[profile {name}/{mode}] perf, C core, {what} ...")
                    try:
                        prof[f"sf/{mode}/{what}"] = self.perf_profile(perf, make_config(name, mode), B, T, what)
                    except Exception as e:
                        prof[f"sf/{mode}/{what}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        else:
            prof["perf"] = "perf not found: no C-core phase breakdown"
        if self.torch_available and "plain" in modes:
            tw = Worker("torch", 1)
            try:
                cfg = make_config(name, "plain")
                impls = self.torch_impls_for("plain")
                r = tw.call(op="setup", config=cfg.to_dict(), B=B, T=T, impls=impls, check=False, adamw=self.a.torch_adamw)
                for impl in impls:
                    if not r["impls"][impl].get("ok"):
                        continue
                    for what in ("forward", "train"):
                        log(f"[profile {name}/plain] torch.profiler, {impl}, {what} ...")
                        prof[f"torch:{impl}/plain/{what}"] = tw.call(op="profile", impl=impl, what=what, steps=2)
            except WorkerError as e:
                prof["torch_error"] = str(e)[-300:]
            finally:
                tw.close()
        self.R["profile"] = prof

    def perf_profile(self, perf: str, cfg, B: int, T: int, what: str) -> Dict[str, Any]:
        w = Worker("sfprof", 1)
        data = self.tmp / f"perf-{os.getpid()}-{time.time_ns()}.data"
        try:
            w.call(op="setup", config=cfg.to_dict(), B=B, T=T)
            w.call(op="run", what=what)  # warm
            timing = w.call(op="timed", what=what, steps=1)
            steps = 2
            p = subprocess.Popen([perf, "record", "-F", "499", "-p", str(w.pid), "-o", str(data), "-q"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)
            for _ in range(steps):
                w.call(op="run", what=what, warm=True)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
            if not data.exists():
                raise RuntimeError(f"perf record failed: {err[-300:]}")
            rep = subprocess.run([perf, "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,symbol",
                                  "--percent-limit", "0.05", "-q"], capture_output=True, text=True, timeout=120)
            rows = []
            for line in rep.stdout.splitlines():
                m = re.match(r"^\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.+?)\s*$", line)
                if m:
                    sym = re.sub(r"(\s+-)+$", "", m.group(4)).strip()
                    rows.append((float(m.group(1)), m.group(2), m.group(3), sym))
            if not rows:
                raise RuntimeError(f"perf report gave nothing: {rep.stderr[-300:]}")
            share: Dict[str, float] = {}
            for pct, dso, kind, sym in rows:
                ph = sf_phase(dso, kind, sym)
                share[ph] = share.get(ph, 0.0) + pct / 100.0
            tot = sum(share.values()) or 1.0
            share = {k: v / tot for k, v in share.items()}
            top = [(sym, pct / 100.0 / tot) for pct, dso, kind, sym in rows[:12]]
            return {"cpu_per_step_s": timing["cpu_per_step_s"], "wall_per_step_s": timing["wall_per_step_s"],
                    "share": share, "top_symbols": top}
        finally:
            w.close()
            try:
                data.unlink()
            except OSError:
                pass

    # -- targets -------------------------------------------------------------------------------
    def find(self, cfg: str, mode: str) -> Optional[Dict[str, Any]]:
        for c in self.R["cases"]:
            if c["config"] == cfg and c["mode"] == mode:
                return c
        return None

    def _targets(self) -> None:
        vals: Dict[str, Tuple[Optional[float], str]] = {}

        def vs_torch(cfg, key):
            c = self.find(cfg, "plain")
            if not c:
                return None, "not measured"
            rs = {impl: pick(t, f"{key}_ratio") for impl, t in c["torch"].items() if f"{key}_ratio" in t}
            if not rs:
                return None, "PyTorch not measured"
            impl = min(rs, key=rs.get)  # the faster PyTorch baseline decides
            note = ", ".join(f"{v:.2f}x vs {k}" for k, v in sorted(rs.items()))
            return rs[impl], note
        vals["fwd_S_vs_torch"] = vs_torch("S", "forward")
        vals["fwd_M_vs_torch"] = vs_torch("M", "forward")
        vals["train_S_vs_torch"] = vs_torch("S", "train")
        vals["train_M_vs_torch"] = vs_torch("M", "train")
        mm = self.R.get("matmul")
        if mm and mm["config"] == "M":
            a = mm["aggregate"]["fwd"]
            a1 = mm["aggregate_1t"]["fwd"]
            vals["matmul_M_peak"] = (pick(a, "peak_frac"), f"{pick(a, 'gflops'):.0f} GFLOP/s of {self.R['peak']['peak_all']:.0f}; "
                                     f"fwd+bwd shapes {pick(mm['aggregate']['train(fwd+dW+dX)'], 'peak_frac') * 100:.0f}%; "
                                     f"1 thread {pick(a1, 'peak_frac') * 100:.0f}% of 1-thread peak")
        else:
            vals["matmul_M_peak"] = (None, "M not measured")
        ob = (mm or {}).get("openblas", {})
        if mm and mm["config"] == "M" and "linear" in ob:
            per = ", ".join(f"{k} {openblas_ratio_linear(mm, (k,)) * 100:.0f}%" for k in ("fwd", "dW", "dX"))
            vals["matmul_M_vs_openblas"] = (openblas_ratio_linear(mm, ("fwd", "dW", "dX")), per)
        else:
            vals["matmul_M_vs_openblas"] = (None, ob.get("error", "M not measured"))
        if "perhead" in ob:
            def ratio(r):
                return pick(r["blas"], "median_s") / pick(r["sf"], "median_s")
            one = [r for r in ob["perhead"] if r["threads"] == 1]
            alln = [r for r in ob["perhead"] if r["threads"] != 1]
            note = "min over " + ", ".join(f"{r['config']} {r['name']} {ratio(r):.2f}x" for r in one)
            if alln:
                note += f"; {alln[0]['threads']} threads: min {min(ratio(r) for r in alln):.2f}x"
            vals["perhead_vs_openblas"] = (min(ratio(r) for r in one), note)
        else:
            vals["perhead_vs_openblas"] = (None, ob.get("error", "not measured"))
        p = self.find("M", "plain")
        ov = self.R["extras"].get("overhead_M_train", {})
        for key, mode in (("overhead_full_M", "attnres_full"), ("overhead_block_M", "attnres_block"), ("overhead_moda_M", "moda")):
            c = self.find("M", mode)
            if mode in ov:
                note = f"paired per-rep {ov[mode]['overhead_paired_median']:+.1%}"
                if p and c:
                    note += (f"; matrix: train {pick(c['sf']['train'], 'median_s') / pick(p['sf']['train'], 'median_s') - 1.0:+.0%}, "
                             f"fwd {pick(c['sf']['forward'], 'median_s') / pick(p['sf']['forward'], 'median_s') - 1.0:+.0%}")
                vals[key] = (pick(ov[mode], "overhead"), note)
            elif p and c:
                vals[key] = (pick(c["sf"]["train"], "median_s") / pick(p["sf"]["train"], "median_s") - 1.0,
                             f"from the matrix (not interleaved); forward: {pick(c['sf']['forward'], 'median_s') / pick(p['sf']['forward'], 'median_s') - 1.0:+.0%}")
            else:
                vals[key] = (None, "not measured")
        lm = {(r["T"], r["what"]): r for r in self.R.get("memory", []) if r.get("config") == "Long" and r.get("mode") == "plain"
              and r.get("impl") == "sf" and "delta_bytes" in r and not r.get("checkpoint")}
        if (2048, "train") in lm and (LONG_SHORT_T, "train") in lm:
            r = lm[(2048, "train")]["delta_bytes"] / lm[(LONG_SHORT_T, "train")]["delta_bytes"]
            note = ""
            if (2048, "forward") in lm and (LONG_SHORT_T, "forward") in lm:
                note = f"forward {lm[(2048, 'forward')]['delta_bytes'] / lm[(LONG_SHORT_T, 'forward')]['delta_bytes']:.2f}x"
            tot = lm[(2048, "train")]["hwm_bytes"] / lm[(LONG_SHORT_T, "train")]["hwm_bytes"]
            # the goal is about the process's peak memory; the step's own RSS delta is shown
            # beside it: activations kept for the backward grow linearly in T, so exactly 2.00x
            # is the floor there (a T x T buffer would make it ~4x)
            vals["long_mem_ratio"] = (tot, f"the step's own RSS {r:.2f}x" + (f" ({note})" if note else "")
                                      + "; linear in T gives 2.00x there, a T x T buffer ~4x")
        else:
            vals["long_mem_ratio"] = (None, "not measured")
        g = [r for r in self.R.get("generation", []) if r["config"] == "S" and r["mode"] == "plain"]
        if g:
            others = ", ".join(f"{r['config']}/{r['mode']} {r['speedup']:.1f}x" for r in self.R["generation"] if r is not g[0])
            vals["gen_speedup"] = (pick(g[0], "speedup"), others)
        else:
            vals["gen_speedup"] = (None, "not measured")
        th = self.R["extras"].get("threads_M_train")
        vals["threads_speedup_M"] = (pick(th, "speedup"), f"{th['threads']} threads") if th else (None, "not measured")
        ck = self.R["extras"].get("checkpoint_Deep", {}).get("plain")
        if ck:
            vals["ckpt_mem_cut_Deep"] = (ck["mem_cut"], "model.train_memory_bytes")
            vals["ckpt_time_Deep"] = (pick(ck, "time_overhead") if "time_overhead" in ck else None, "")
        else:
            vals["ckpt_mem_cut_Deep"] = vals["ckpt_time_Deep"] = (None, "not measured")
        self._build_targets(vals)
        self.R["target_values"] = {k: v for k, (v, _) in vals.items()}

    def finish_targets(self) -> None:
        """targets() once per statistic; the table shows the chosen one, the note the other."""
        global STAT
        chosen = STAT
        other = "best" if chosen == "median" else "median"
        STAT = other
        self._targets()
        alt = dict(self.R["target_values"])
        STAT = chosen
        self._targets()
        out = []
        for t in self.R["targets"]:
            a = alt.get(t["name"])
            if a is not None and t["value"] is not None and abs(a - t["value"]) > 1e-9:
                pct = t["name"].startswith(("overhead", "ckpt_time", "matmul"))
                t["value_" + other] = a
                t["note"] = (f"{other}: {a * 100:.1f}%" if pct else f"{other}: {a:.2f}x") + ("; " + t["note"] if t["note"] else "")
            out.append(t)
        self.R["targets"] = out

    def _build_targets(self, vals) -> None:
        out = []
        for key, op, thr, desc in TARGETS_DOC:
            v, note = vals.get(key, (None, ""))
            met = None
            if v is not None:
                met = {">=": v >= thr, "<=": v <= thr, "<": v < thr, ">": v > thr}[op]
            out.append({"name": key, "description": desc, "value": v, "op": op, "threshold": thr, "met": met, "note": note})
        self.R["targets"] = out


SF_PHASES = [
    ("matmul", ("tile_avx2", "tile_avx512", "tile_generic", "pack_b", "pack_panel", "gemm", "sf_matmul")),
    # attention's own products (sf_gemm_tile, sf_pack_panels) are matched above, as matmul
    ("attention", ("row_logits", "depth_logits", "block_logits", "row_softmax", "row_finish", "depth_backward_row",
                   "sf_attention", "attn_backward")),
    ("attnres", ("sf_attnres",)),
    ("norm", ("sf_layernorm", "sf_rmsnorm")),
    ("activation", ("sf_gelu", "sf_act_backward", "sf_swiglu", "sf_relu", "erff", "sf_activation")),
    ("loss", ("sf_cross_entropy",)),
    ("optimizer", ("sf_adamw",)),
    ("embed/copies", ("embed", "memmove", "memcpy", "memset", "add3", "sf_add", "sf_colsum", "write_depth", "read_depth", "copy")),
]


def sf_phase(dso: str, kind: str, sym: str) -> str:
    if kind == "k":
        return "kernel (page faults, scheduling)"
    if "libgomp" in dso or sym.startswith("gomp_") or sym.startswith("GOMP_"):
        return "OpenMP wait/sync"
    if "libm" in dso:  # by library: a name pattern like "log" would also catch depth_logits
        return "libm exp/log"
    for phase, pats in SF_PHASES:
        if any(p in sym for p in pats):
            return phase
    if "stackformer" in dso or "_core." in dso:  # the C core's .so is named like a CPython module
        return "other (C core)"
    if "python" in dso or "numpy" in dso or "_multiarray" in dso:
        return "python/numpy"
    return "other"


# ---------------------------------------------------------------------------------------------
# report

def fmt_tok(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:,.1f}M"


def report(R: Dict[str, Any]) -> str:
    L: List[str] = []
    m = R["meta"]
    pk = R.get("peak", {})
    L.append("=" * 110)
    L.append(f"stackformer benchmark  {m['started']}  ({'quick' if m['quick'] else 'full'}, {m.get('duration_s', 0):.0f} s)")
    L.append(f"machine: {m['cpu_model']}, {m['affinity_cpus']} cores used ({m['logical_cpus']} logical), flags {' '.join(m['cpu_flags'])}; "
             f"threads {m['threads']}; matmul tile {m.get('matmul_kernel', '?')}")
    L.append(f"software: python {m['python']}, numpy {m['numpy']}, torch {m['torch']}, stackformer {m['stackformer']} "
             f"(git {m['git']['commit']}{'+dirty' if m['git']['dirty'] else ''}), stackformer.torch: {'yes' if m['stackformer_torch_available'] else 'no'}")
    if "omp_wait_policy" in m:
        sc = m.get("gomp_spincount")
        L.append(f"OMP_WAIT_POLICY: stackformer {m['omp_wait_policy']['stackformer']}, PyTorch {m['omp_wait_policy']['torch']}"
                 + (f"; GOMP_SPINCOUNT: stackformer {sc['stackformer']}, PyTorch {sc['torch']}" if sc else ""))
    L.append(f"load average start {m['loadavg_start']} end {m.get('loadavg_end')}"
             + (f"; OTHER PROCESSES BUSY at start: {sum(b['cpu'] for b in m['busy_processes_start']):.1f} cores" if m["busy_processes_start"] else ""))
    if "peak_1t" in pk:
        extra = f", AVX-512 1 thread {pk['avx512_1t']:.0f}" if "avx512_1t" in pk else ""
        L.append(f"fp32 peak (AVX2 FMA probe, best of many 2 ms runs): 1 thread {pk['peak_1t']:.0f} GFLOP/s, {pk['threads']} threads measured "
                 f"{pk['peak_all_measured']:.0f}; reference for % of peak: {pk['peak_all']:.0f} GFLOP/s{extra}")
    elif pk:
        L.append(f"fp32 peak: {pk.get('error')}")
    L.append("")
    # main matrix
    L.append(f"Throughput (tokens/s, {m.get('stat', 'median')} of repetitions; ratio = stackformer / PyTorch time; "
             f"GF/s = analytic matmul FLOPs incl. attention / time; mem = peak RSS delta of one step)")
    hdr = f"{'config':<6}{'mode':<14}{'fwd tok/s':>11}{'GF/s':>7}{'%pk':>5}{'vs sdpa':>9}{'vs to_t':>9}" \
          f"{'train tok/s':>12}{'GF/s':>7}{'%pk':>5}{'vs sdpa':>9}{'vs to_t':>9}{'mem fwd':>10}{'mem train':>11}"
    L.append(hdr)
    L.append("-" * len(hdr))
    mem = {(r["config"], r["mode"], r["impl"], r["what"], r["T"], r.get("checkpoint", False)): r for r in R.get("memory", [])}

    def memv(c, impl, what):
        r = mem.get((c["config"], c["mode"], impl, what, c["T"], False))
        return fmt_bytes(r.get("delta_bytes")) if r else "-"

    def ratio(c, impl, key):
        t = c["torch"].get(impl, {})
        if f"{key}_ratio" in t:
            return f"{pick(t, key + '_ratio'):.2f}x"
        if "skipped" in t:
            return "skip"
        if t.get("info") and not t["info"].get("ok"):
            return "err"
        return "-"
    for c in R["cases"]:
        f, t = c["sf"]["forward"], c["sf"]["train"]
        L.append(f"{c['config']:<6}{c['mode']:<14}{fmt_tok(pick(f, 'tok_s')):>11}{pick(f, 'gflops'):>7.1f}{(pick(f, 'peak_frac') or 0) * 100:>4.0f}%"
                 f"{ratio(c, 'sdpa', 'forward'):>9}{ratio(c, 'to_torch', 'forward'):>9}"
                 f"{fmt_tok(pick(t, 'tok_s')):>12}{pick(t, 'gflops'):>7.1f}{(pick(t, 'peak_frac') or 0) * 100:>4.0f}%"
                 f"{ratio(c, 'sdpa', 'train'):>9}{ratio(c, 'to_torch', 'train'):>9}"
                 f"{memv(c, 'sf', 'forward'):>10}{memv(c, 'sf', 'train'):>11}")
    # torch absolute
    L.append("")
    L.append("PyTorch (same weights; sdpa = benchmarks/torch_mirror.py with F.scaled_dot_product_attention, "
             "to_t = stackformer.torch.to_torch; AdamW fused)")
    hdr = f"{'config':<6}{'mode':<14}{'impl':<10}{'fwd tok/s':>11}{'train tok/s':>12}{'mem fwd':>10}{'mem train':>11}  check (max|dlogits|, loss sf/torch)"
    L.append(hdr)
    L.append("-" * len(hdr))
    for c in R["cases"]:
        for impl, t in c["torch"].items():
            if "skipped" in t:
                L.append(f"{c['config']:<6}{c['mode']:<14}{impl:<10}  skipped: {t['skipped']}")
                continue
            info = t.get("info", {})
            if not info.get("ok"):
                L.append(f"{c['config']:<6}{c['mode']:<14}{impl:<10}  error: {info.get('error', '?')[:80]}")
                continue
            chk = ""
            if "max_abs_diff_logits" in info:
                chk = f"{info['max_abs_diff_logits']:.1e}, {info['loss_sf']:.4f}/{info['loss_torch']:.4f}"
            L.append(f"{c['config']:<6}{c['mode']:<14}{impl:<10}{fmt_tok(pick(t['forward'], 'tok_s')):>11}{fmt_tok(pick(t['train'], 'tok_s')):>12}"
                     f"{memv(c, impl, 'forward'):>10}{memv(c, impl, 'train'):>11}  {chk}")
    # matmul
    mm = R.get("matmul")
    if mm:
        L.append("")
        L.append(f"Isolated C matmul (sf_gemm via ctypes, incl. packing W) at {mm['config']}'s shapes; {mm['threads']} threads vs reference peak, "
                 f"1 thread vs 1-thread peak; torch = F.linear / mm")
        hdr = f"{'product':<6}{'layer':<14}{'N x K x M':>18}{'sf GF/s':>9}{'%pk':>5}{'sf 1t':>8}{'%pk1':>6}{'torch':>8}{'sf/torch':>9}"
        L.append(hdr)
        L.append("-" * len(hdr))
        for r in mm["rows"]:
            s = r["sf"]
            one = r.get("sf_1t")
            tg = pick(r["torch"], "gflops") if "torch" in r else None
            L.append(f"{r['kind']:<6}{r['name']:<14}{r['N']:>6}x{r['K']:>5}x{r['M']:>5}{pick(s, 'gflops'):>9.1f}{pick(s, 'peak_frac') * 100:>4.0f}%"
                     + (f"{pick(one, 'gflops'):>8.1f}{pick(one, 'peak_frac') * 100:>5.0f}%" if one else f"{'-':>8}{'-':>6}")
                     + (f"{tg:>8.1f}{pick(s, 'gflops') / tg:>8.2f}x" if tg else f"{'-':>8}{'-':>9}"))
        for k, a in mm["aggregate"].items():
            tg = pick(a, "torch_gflops")
            a1 = mm.get("aggregate_1t", {}).get(k)
            L.append(f"  weighted {k:<18} {pick(a, 'gflops'):7.1f} GF/s = {pick(a, 'peak_frac') * 100:4.0f}% of peak"
                     + (f"; 1 thread {pick(a1, 'gflops'):.1f} GF/s = {pick(a1, 'peak_frac') * 100:.0f}% of 1-thread peak" if a1 and mm['threads'] > 1 else "")
                     + (f"; torch {tg:.1f} GF/s" if tg else ""))
        ob = mm.get("openblas", {})
        if "error" in ob:
            L.append(f"  OpenBLAS yardstick: {ob['error']}")
        elif "linear" in ob:
            lib = ob.get("library", {})
            L.append("")
            L.append(f"sf_gemm vs OpenBLAS ({lib.get('config', lib.get('path', '?'))}; cblas_sgemm in its own process, same threads)")
            hdr = f"{'product':<6}{'layer':<14}{'N x K x M':>18}{'sf GF/s':>9}{'BLAS':>8}{'sf/BLAS':>9}"
            L.append(hdr)
            L.append("-" * len(hdr))
            for r in ob["linear"]:
                sg, bg = pick(r["sf"], "gflops"), pick(r["blas"], "gflops")
                L.append(f"{r['kind']:<6}{r['name']:<14}{r['N']:>6}x{r['K']:>5}x{r['M']:>5}{sg:>9.1f}{bg:>8.1f}{sg / bg:>8.2f}x")
            for k in ("fwd", "dW", "dX"):
                v = openblas_ratio_linear(mm, (k,))
                L.append(f"  weighted {k:<4} sf / BLAS {v:.2f}x" if v else f"  weighted {k}: -")
            v = openblas_ratio_linear(mm, ("fwd", "dW", "dX"))
            L.append(f"  weighted fwd+dW+dX sf / BLAS {v:.2f}x" if v else "")
            hdr = f"{'per head':<6}{'':<8}{'heads x (N x K x M)':>24}{'thr':>4}{'sf GF/s':>9}{'BLAS':>8}{'sf/BLAS':>9}{'sf us/call':>11}{'BLAS':>7}"
            L.append(hdr)
            L.append("-" * len(hdr))
            for r in ob["perhead"]:
                sg, bg = pick(r["sf"], "gflops"), pick(r["blas"], "gflops")
                L.append(f"{r['config']:<6}{r['name']:<8}{r['heads']:>6} x ({r['N']:>4}x{r['K']:>4}x{r['M']:>4}){r['threads']:>4}{sg:>9.1f}{bg:>8.1f}"
                         f"{sg / bg:>8.2f}x{pick(r['sf'], 'median_s') / r['heads'] * 1e6:>11.1f}{pick(r['blas'], 'median_s') / r['heads'] * 1e6:>7.1f}")
    # extras
    ex = R.get("extras", {})
    if ex.get("threads_M_train") or ex.get("checkpoint_Deep") or ex.get("blas_backend") or R.get("generation"):
        L.append("")
        L.append("Extra rows")
    th = ex.get("threads_M_train")
    if th:
        L.append(f"  M plain train step: 1 thread {pick(th['1t'], 'tok_s'):.0f} tok/s, {th['threads']} threads {pick(th['all'], 'tok_s'):.0f} tok/s "
                 f"-> {pick(th, 'speedup'):.2f}x")
    for mode, r in ex.get("checkpoint_Deep", {}).items():
        s = f"  Deep {mode:<14} checkpointing: activations {fmt_bytes(r['act_bytes'])} -> {fmt_bytes(r['act_bytes_ckpt'])} ({r['mem_cut']:.1f}x less)"
        if "time_overhead" in r:
            s += f", step {pick(r['no_ckpt'], 'median_s') * 1e3:.0f} -> {pick(r['ckpt'], 'median_s') * 1e3:.0f} ms ({pick(r, 'time_overhead'):+.0%})"
        rr = mem.get(("Deep", mode, "sf", "train", CONFIGS["Deep"]["T"], True))
        r0 = mem.get(("Deep", mode, "sf", "train", CONFIGS["Deep"]["T"], False))
        if rr and r0 and "delta_bytes" in rr and "delta_bytes" in r0:
            s += f"; measured RSS delta {fmt_bytes(r0['delta_bytes'])} -> {fmt_bytes(rr['delta_bytes'])}"
        L.append(s)
    bb = ex.get("blas_backend")
    if bb and bb.get("rows"):
        L.append(f"  BLAS backend (stackformer.use_blas: {bb['library']}):")
        for r in bb["rows"]:
            L.append(f"    {r['config']} plain {r['what']:<8} tiles {pick(r['tiles'], 'median_s') * 1e3:7.1f} ms, "
                     f"BLAS {pick(r['blas'], 'median_s') * 1e3:7.1f} ms -> BLAS speed "
                     f"{pick(r['tiles'], 'median_s') / pick(r['blas'], 'median_s'):.2f}x the tiles'")
    ov = ex.get("overhead_M_train")
    if ov:
        parts = [f"{mode} {pick(v, 'overhead'):+.1%} (paired {v['overhead_paired_median']:+.1%})"
                 for mode, v in ov.items() if mode != "modes"]
        L.append("  Train step overhead vs plain at M, modes interleaved: " + "; ".join(parts))
    p = {c["mode"]: c for c in R["cases"] if c["config"] == "M"}
    if "plain" in p:
        parts = []
        for mode in ("attnres_full", "attnres_block", "moda"):
            if mode in p:
                tr = pick(p[mode]["sf"]["train"], "median_s") / pick(p["plain"]["sf"]["train"], "median_s") - 1
                fw = pick(p[mode]["sf"]["forward"], "median_s") / pick(p["plain"]["sf"]["forward"], "median_s") - 1
                parts.append(f"{mode} train {tr:+.1%} / fwd {fw:+.1%}")
        if parts:
            L.append("  Overhead vs plain at M from the matrix (measured minutes apart): " + "; ".join(parts))
    lm = [r for r in R.get("memory", []) if r["config"] == "Long" and r["impl"] in ("sf", "sdpa", "to_torch") and "delta_bytes" in r]
    if lm:
        by = {}
        for r in lm:
            by.setdefault((r["mode"], r["impl"], r["what"]), {})[r["T"]] = r["delta_bytes"]
        parts = []
        for (mode, impl, what), d in sorted(by.items()):
            if 2048 in d and LONG_SHORT_T in d and d[LONG_SHORT_T]:
                parts.append(f"{mode}/{impl}/{what} {fmt_bytes(d[LONG_SHORT_T])}->{fmt_bytes(d[2048])} ({d[2048] / d[LONG_SHORT_T]:.2f}x)")
        if parts:
            L.append("  Long peak memory T=1024 -> 2048 (RSS delta of one step):")
            for i in range(0, len(parts), 3):
                L.append("    " + "; ".join(parts[i:i + 3]))
    for g in R.get("generation", []):
        L.append(f"  generate {g['config']}/{g['mode']}: {g['new_tokens']} new tokens after {g['prompt']}, batch 1: cached "
                 f"{pick(g['cached'], 'tok_s'):.0f} tok/s vs re-run {pick(g['rerun'], 'tok_s'):.1f} tok/s -> {pick(g, 'speedup'):.1f}x "
                 f"(greedy agreement {g['greedy_agreement']:.0%}, re-run reps {g['rerun']['reps']})"
                 + (f"; cached on 1 thread {pick(g['cached_1thread'], 'tok_s'):.0f} tok/s" if g.get("cached_1thread") else ""))
    # profile
    pr = R.get("profile")
    if pr:
        L.append("")
        L.append(f"Phase breakdown at {pr['config']}, 1 thread (CPU ms per step = share x CPU time; C core: perf samples, PyTorch: torch.profiler self time)")
        keys = [k for k in pr if "/" in k and isinstance(pr[k], dict) and "share" in pr[k]]
        phases = []
        for k in keys:
            for ph in pr[k]["share"]:
                if ph not in phases:
                    phases.append(ph)
        order = ["matmul", "attention", "attnres", "norm", "activation", "loss", "optimizer", "embed", "embed/copies",
                 "libm exp/log", "OpenMP wait/sync", "kernel (page faults, scheduling)", "python/numpy", "other"]
        phases.sort(key=lambda p: order.index(p) if p in order else 99)
        short = {k: k.replace("torch:", "t:").replace("/plain", "").replace("forward", "fwd") for k in keys}
        hdr = f"{'phase':<34}" + "".join(f"{short[k][:16]:>17}" for k in keys)
        L.append(hdr)
        L.append("-" * len(hdr))
        for ph in phases:
            row = f"{ph:<34}"
            for k in keys:
                sh = pr[k]["share"].get(ph)
                row += f"{'':>17}" if sh is None else f"{sh * pr[k]['cpu_per_step_s'] * 1e3:>10.0f} ({sh * 100:>2.0f}%)"
            L.append(row)
        L.append(f"{'total CPU ms / step':<34}" + "".join(f"{pr[k]['cpu_per_step_s'] * 1e3:>17.0f}" for k in keys))
        for k in keys:
            if "error" in pr.get(k, {}):
                L.append(f"  {k}: {pr[k]['error']}")
    # targets
    L.append("")
    L.append("Targets")
    hdr = f"{'':<3}{'target':<20}{'value':>10}  {'goal':<8} {'description':<70} note"
    L.append(hdr)
    L.append("-" * 110)
    for t in R.get("targets", []):
        v = t["value"]
        if v is None:
            vs, mark = "-", " ? "
        else:
            pct = t["name"].startswith(("overhead", "ckpt_time", "matmul"))
            vs = f"{v * 100:.1f}%" if pct else f"{v:.2f}x"
            mark = "OK " if t["met"] else "NO "
        thr = t["threshold"]
        goal = f"{t['op']}{thr * 100:.0f}%" if t["name"].startswith(("overhead", "ckpt_time", "matmul")) else f"{t['op']}{thr}x"
        L.append(f"{mark:<3}{t['name']:<20}{vs:>10}  {goal:<8} {t['description'][:70]:<70} {t['note']}")
    for e in R.get("errors", []):
        L.append(f"ERROR in {e['stage']}: {e['error'].strip().splitlines()[-1][:150]}")
    met = sum(1 for t in R.get("targets", []) if t["met"])
    known = sum(1 for t in R.get("targets", []) if t["met"] is not None)
    L.append(f"{met}/{known} measured targets met")
    if m.get("busy_processes_start"):
        L.append("NOTE: other processes were using the CPU when the run started (see meta.busy_processes_start): "
                 "absolute numbers are pessimistic and noisy; ratios are interleaved and more robust.")
    L.append("=" * 110)
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="S only, 3 repetitions, no profile (< 1 minute on a quiet machine)")
    ap.add_argument("--out", default=None, help="JSON output path (default: benchmarks/results.json, quick: benchmarks/results-quick.json)")
    ap.add_argument("--configs", default=None, help=f"comma list of {','.join(CONFIGS)} (default: all; quick: S)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {','.join(MODES)}")
    ap.add_argument("--threads", type=int, default=0, help="threads for both libraries (default: all cores in the affinity mask)")
    ap.add_argument("--reps", type=int, default=0, help="repetitions per measurement (default 5, quick 3; fast operations get more)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--torch-impl", default="auto", choices=["auto", "both", "sdpa", "to_torch"],
                    help="PyTorch baselines: auto = stackformer.torch.to_torch for every mode when present, plus the SDPA mirror for plain")
    ap.add_argument("--torch-adamw", default="fused", choices=["fused", "default"], help="torch AdamW implementation")
    ap.add_argument("--torch-omp-wait", default="same", choices=["same", "default"],
                    help="OMP_WAIT_POLICY of the PyTorch processes: the same as stackformer's (default; import stackformer "
                         "makes it PASSIVE unless set), or the user's environment (libgomp spins by default)")
    ap.add_argument("--no-profile", action="store_true", help="skip the perf / torch.profiler phase breakdown")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--no-openblas", action="store_true", help="skip the OpenBLAS yardstick for the matmul")
    ap.add_argument("--stat", default="median", choices=["median", "best"],
                    help="statistic for the table and the targets (the JSON has both): median of the repetitions, or the best one "
                         "(use best on a machine other processes are loading)")
    ap.add_argument("--ckpt-all-modes", action="store_true", help="time checkpointing at Deep for every mode, not only plain")
    ap.add_argument("--report", default=None, metavar="JSON", help="print the table of an earlier results file and exit")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_mem", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_mem-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        worker_main(args._worker, args.threads or n_cores())
        return 0
    if args._mem:
        r = mem_main(json.loads(args._mem))
        with open(args._mem_out, "w") as f:
            json.dump(r, f)
        return 0

    global STAT, TORCH_OMP_WAIT
    STAT = args.stat
    TORCH_OMP_WAIT = args.torch_omp_wait
    if args.report:
        R = json.load(open(args.report))
        R["meta"]["stat"] = STAT
        print(report(R))
        return 0
    configs = (args.configs or ("S" if args.quick else ",".join(CONFIGS))).split(",")
    modes = args.modes.split(",")
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown config {c!r}; choose from {','.join(CONFIGS)}")
    for mo in modes:
        if mo not in MODES:
            ap.error(f"unknown mode {mo!r}; choose from {','.join(MODES)}")
    out = Path(args.out or (HERE / ("results-quick.json" if args.quick else "results.json")))
    t_start = time.perf_counter()
    b = Bench(args)
    snap = snapshot_package(b.tmp)
    src_so = None
    if snap.get("source"):
        cands = sorted(Path(snap["source"]).glob("_core*.so"))
        src_so = cands[0] if cands else None
    try:
        b.meta()
        b.R["meta"]["package_snapshot"] = snap
        def stage(what: str, fn: Callable[[], Any]) -> None:
            """Run one part; a failure is recorded and the rest of the run goes on."""
            try:
                fn()
            except Exception:
                tb = traceback.format_exc()
                log(f"ERROR in {what}: {tb.strip().splitlines()[-1]}")
                b.R.setdefault("errors", []).append({"stage": what, "error": tb[-2000:]})

        log(f"threads={b.threads}; measuring fp32 peak ...")
        b.R["peak"] = measure_peak(b.threads, b.quick, b.tmp)
        pk = b.R["peak"]
        peak_all, peak_1t = pk.get("peak_all"), pk.get("peak_1t")
        # matmul at M's shapes (quick: S's)
        mm_cfg = "M" if ("M" in configs or not args.quick) else configs[0]

        def matmul_stage() -> None:
            log(f"isolated matmul at {mm_cfg}'s shapes ...")
            tw = Worker("torch", b.threads) if b.torch_available else None
            try:
                b.R["matmul"] = bench_matmul(mm_cfg, b.threads, b.reps, tw, peak_all or 1.0, peak_1t or 1.0)
            finally:
                if tw:
                    tw.close()
            if not args.no_openblas:
                log("OpenBLAS yardstick ...")
                b.R["matmul"]["openblas"] = bench_openblas(b.R["matmul"], b.threads, b.reps, b.tmp)
        stage("matmul", matmul_stage)
        for name in configs:
            stage(f"config {name}", lambda name=name: b.run_config(name, modes))
        if not args.no_openblas and not args.quick and "plain" in modes and ("S" in configs or "M" in configs):
            stage("blas backend", lambda: b.blas_backend_rows(configs))
        if not args.no_generation:
            plan = []
            if "S" in configs:
                plan += [("S", mo, 1 if args.quick else 5) for mo in (["plain"] if args.quick else modes)]
            if "M" in configs and "plain" in modes and not args.quick:
                plan.append(("M", "plain", 1))  # re-running M 256 times is slow: one repetition
            stage("generation", lambda: b.generation(plan))
        if not args.no_memory:
            stage("memory", lambda: b.memory(configs, modes))
        if not args.no_profile and not args.quick:
            prof_cfg = "M" if "M" in configs else configs[0]
            stage("profile", lambda: b.profile(prof_cfg, modes))
        b.finish_targets()
    finally:
        shutil.rmtree(b.tmp, ignore_errors=True)
    b.R["meta"]["duration_s"] = time.perf_counter() - t_start
    if src_so is not None and src_so.exists():
        so_end = core_so_info(src_so)
        if so_end["mtime"] != b.R["meta"]["core_so"]["mtime"]:
            b.R["meta"]["core_so_rebuilt_during_run"] = so_end["mtime"]
            log("note: the working tree's extension was rebuilt during the run; this run used the snapshot taken at its start")
    b.R["meta"]["loadavg_end"] = loadavg()
    b.R["meta"]["loadavg_samples"] = b.load_samples
    b.R["meta"]["finished"] = now_iso()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(b.R, f, indent=1, default=float)
    print(report(b.R))
    print(f"results: {out}  ({b.R['meta']['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
