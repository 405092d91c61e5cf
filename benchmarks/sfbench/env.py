"""The machine and the run's environment: paths, OpenMP wait policy, CPU facts, load,
repetition statistics, logging, the package snapshot and the fp32 peak (benchmarks/peak.c)."""
import ctypes
import datetime
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent.parent  # benchmarks/
ROOT = HERE.parent
THIS = HERE / "bench.py"  # the entry point workers are started through
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402,F401


# OpenMP wait policy as the user set it, before `import stackformer` sets its own default
# (PASSIVE) in os.environ. By default PyTorch workers run with the same policy as stackformer
# (both use libgomp: equal threading-runtime behaviour); --torch-omp-wait default gives them
# the user's setting instead (libgomp's spinning default when unset).
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
USER_GOMP_SPINCOUNT = os.environ.get("GOMP_SPINCOUNT")
TORCH_OMP_WAIT = "same"


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
    hasbf16 = bool(lib.peak_has_avx512_bf16())
    res["isa"] = {"avx2_fma": bool(lib.peak_has_avx2_fma()), "avx512f": has512, "avx512_bf16": hasbf16}
    if not res["isa"]["avx2_fma"]:
        res["note"] = "no AVX2/FMA: the probe measures scalar throughput"

    def best(kind: int, nt: int, seconds: float, budget: float) -> Tuple[float, List[float]]:
        """Many short runs, keep the best: on a loaded machine a short run has a fair chance
        of not being preempted, while load from elsewhere can only lower a run's result."""
        lanes = {0: 8, 1: 16, 2: 32}[kind]
        g = max(lib.peak_gflops(kind, nt, 20_000) for _ in range(3))  # calibrate
        iters = int(max(2e4, seconds * g * 1e9 / (nt * 12 * lanes * 2)))
        vals: List[float] = []
        t_end = time.perf_counter() + budget
        while len(vals) < 10 or (time.perf_counter() < t_end and len(vals) < 400):
            vals.append(lib.peak_gflops(kind, nt, iters))
        return max(vals), vals

    budget = 0.3 if quick else 1.0
    for kind, name in ((0, "avx2"), (1, "avx512"), (2, "bf16")):
        if (kind == 1 and not has512) or (kind == 2 and not hasbf16):
            continue
        for nt in sorted({1, threads}):
            b, vals = best(kind, nt, 0.002, budget)
            res[f"{name}_{nt}t"] = b
            res[f"{name}_{nt}t_runs"] = len(vals)
            res[f"{name}_{nt}t_median"] = statistics.median(vals)
    # the widest FMA the products can use: on CPUs whose 512-bit FMAs take both 256-bit pipes
    # (Zen 4) AVX-512 measures the same as AVX2, where they run at full width (Zen 5, Intel
    # server cores) twice as much, and the matmul's AVX-512 tiles must be measured against that
    one = max(res.get("avx2_1t", 0.0), res.get("avx512_1t", 0.0))
    alln = max(res.get(f"avx2_{threads}t", 0.0), res.get(f"avx512_{threads}t", 0.0)) or one
    res["peak_isa"] = "avx512" if res.get("avx512_1t", 0.0) > res.get("avx2_1t", 0.0) else "avx2"
    # The reference for "% of peak" at `threads` threads: the better of the measured all-thread
    # peak and threads x the one-thread peak (a pure FMA loop scales linearly over physical
    # cores; on a loaded machine the all-thread probe undershoots, which would flatter us).
    res["peak_1t"] = one
    res["peak_all"] = max(alln, one * threads)
    res["peak_all_measured"] = alln
    if has512:
        res["avx512_vs_avx2_1t"] = res.get("avx512_1t", 0) / one if one else None
    # the bf16 ceiling (vdpbf16ps, fp32 accumulation); without AVX512_BF16 there is no bf16
    # dot-product instruction, and a bf16 product's ceiling is the fp32 FMA peak
    if hasbf16:
        res["bf16_peak_1t"] = res["bf16_1t"]
        res["bf16_peak_all"] = max(res.get(f"bf16_{threads}t", res["bf16_1t"]), res["bf16_1t"] * threads)
    else:
        res["bf16_note"] = "no AVX512_BF16 (vdpbf16ps): bf16 products cannot beat the fp32 FMA peak on this CPU"
    return res


# ---------------------------------------------------------------------------------------------
# direct calls into the C matmul (sf_gemm is exported by stackformer._core)

