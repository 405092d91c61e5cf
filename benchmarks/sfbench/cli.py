"""Command line: python benchmarks/bench.py [options]."""
import argparse
import json
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

from . import env
from .matmul import bench_matmul, bench_openblas
from .workers import worker_main, mem_main, Worker
from .cases import Bench
from .report import report
from . import __doc__ as PKG_DOC
from .env import HERE, core_so_info, loadavg, log, measure_peak, n_cores, now_iso, snapshot_package  # noqa: E402
from .matrix import CONFIGS, MODES  # noqa: E402

# ---------------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=PKG_DOC.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="S only, 3 repetitions, no profile (< 1 minute on a quiet machine)")
    ap.add_argument("--out", default=None, help="JSON output path (default: benchmarks/results.json, quick: benchmarks/results-quick.json)")
    ap.add_argument("--configs", default=None, help=f"comma list of {','.join(CONFIGS)} (default: all; quick: S)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {','.join(MODES)}")
    ap.add_argument("--threads", type=int, default=0, help="threads for both libraries (default: all cores in the affinity mask)")
    ap.add_argument("--reps", type=int, default=0, help="repetitions per measurement (default 5, quick 3; fast operations get more)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--torch-impl", default="auto", choices=["auto", "both", "sdpa", "to_torch"],
                    help="PyTorch baselines: auto = stackformer.torch.to_torch for every mode when present, plus the SDPA mirror for plain")
    ap.add_argument("--torch-peers", default="eager,compile,autocast",
                    help="comma list of PyTorch peers: eager (see --torch-impl), compile (torch.compile, inductor), "
                         "autocast (eager under torch.autocast cpu bfloat16)")
    ap.add_argument("--peer-modes", default="", help="comma list of modes that get the compile/autocast peers "
                    "(default: every mode; compiling each takes a minute or more on 2 cores)")
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

    env.STAT = args.stat
    env.TORCH_OMP_WAIT = args.torch_omp_wait
    if args.report:
        R = json.load(open(args.report))
        R["meta"]["stat"] = env.STAT
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
        if "plain" in modes and ("S" in configs or "M" in configs):
            stage("bf16", lambda: b.bf16_rows(configs))
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

