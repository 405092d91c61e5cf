"""The runner: interleaved timing and the Bench (matrix, extra rows, generation, memory,
profiles)."""
import gc
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
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import env
from .matmul import find_openblas
from .targets import TargetsMixin
from .env import adaptive_reps, busy_processes, core_so_info, cpu_flags, cpu_model, git_info, loadavg, log, n_cores, now_iso, stats  # noqa: E402
from .matrix import TORCH_PEERS, CONFIGS, GEN_NEW, GEN_PROMPT, LONG_SHORT_T, LR, TORCH_MEM_LIMIT, flops, make_batch, make_config, torch_attn_bytes  # noqa: E402
from .workers import Worker, WorkerError, run_mem, sf_phase, torch_env  # noqa: E402


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


class Bench(TargetsMixin):
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
            "argv": sys.argv[1:], "loadavg_start": loadavg(), "busy_processes_start": busy, "stat": env.STAT,
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
        """The PyTorch peers timed beside a mode: eager (to_torch for every mode, the SDPA
        mirror for plain), torch.compile and bf16 autocast (of the best eager module), as
        --torch-impl and --torch-peers select."""
        if not self.torch_available:
            return []
        peers = self.a.torch_peers.split(",")
        impls = []
        if "eager" in peers:
            if self.have_to_torch and self.a.torch_impl in ("auto", "to_torch", "both"):
                impls.append("to_torch")
            if mode == "plain" and self.a.torch_impl in ("auto", "sdpa", "both"):
                impls.append("sdpa")
        peer_modes = self.a.peer_modes.split(",") if self.a.peer_modes else None
        if (mode == "plain" or self.have_to_torch) and (peer_modes is None or mode in peer_modes):
            impls += [p for p in ("compile", "autocast") if p in peers]
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
                        if impl == "to_torch" or (impl in ("compile", "autocast") and mode != "plain"):
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
                if "moda" in modes:  # the MoDA paper's setting: 6 query heads, 2 kv heads
                    self.overhead_row(["plain", "moda"], key="overhead_M_gqa_train", n_kv_heads=2)
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
        log(f"    fwd {f['tok_s']:>9.0f} tok/s {f['gflops']:6.1f} GF/s  " + " ".join(tt(i, 'forward') for i in TORCH_PEERS))
        log(f"    trn {t['tok_s']:>9.0f} tok/s {t['gflops']:6.1f} GF/s  " + " ".join(tt(i, 'train') for i in TORCH_PEERS))

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

    def overhead_row(self, modes: List[str], key: str = "overhead_M_train", **extra: Any) -> None:
        """Train step of every mode at M, the modes taking turns within each repetition, so a
        change of machine load between the matrix's cases cannot pose as an overhead. extra:
        Config overrides shared by all modes (n_kv_heads=2 gives the M-GQA row)."""
        import stackformer as sf
        sf.set_num_threads(self.threads)
        B, T = CONFIGS["M"]["B"], CONFIGS["M"]["T"]
        models = {mode: sf.Model(make_config("M", mode, **extra), seed=0) for mode in modes}
        x, y = make_batch(256, B, T)
        log(f"[M{'-GQA' if extra else ''}] train step overheads, modes interleaved ({', '.join(modes)}) ...")
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
        fl_plain = flops(models["plain"].config, B, T)["train"]
        out: Dict[str, Any] = {"modes": {mode: stats(ts, B * T) for mode, ts in times.items()}, "config": extra}
        for mode in modes:
            if mode != "plain":
                out[mode] = {"overhead": statistics.median(times[mode]) / statistics.median(times["plain"]) - 1.0,
                             "overhead_best": min(times[mode]) / min(times["plain"]) - 1.0,
                             # per-repetition ratio: both ran back to back, so load cancels best
                             "overhead_paired_median": statistics.median(
                                 [a / b for a, b in zip(times[mode], times["plain"])]) - 1.0,
                             # the analytic FLOPs the mode adds (matmuls incl. MoDA's depth
                             # projections and depth attention; wirings' own element-wise work
                             # is not in it)
                             "flop_overhead": flops(models[mode].config, B, T)["train"] / fl_plain - 1.0}
        self.R["extras"][key] = out
        del models
        gc.collect()

    def bf16_rows(self, configs: List[str]) -> None:
        """stackformer's bf16 compute mode against PyTorch's bf16 autocast (and stackformer
        fp32), plain S and M, forward and train step, taking turns within each repetition."""
        import stackformer as sf
        out: Dict[str, Any] = {}
        self.R["extras"]["bf16"] = out
        if "compute_dtype" not in getattr(sf.Config, "__dataclass_fields__", {}):
            out["error"] = "this stackformer has no bf16 compute mode"
            return
        out["kernel"] = getattr(sf, "bf16_kernel", lambda: "?")()
        tw = Worker("torch", self.threads) if self.torch_available and "autocast" in self.a.torch_peers else None
        try:
            for name in [c for c in ("S", "M") if c in configs]:
                B, T = CONFIGS[name]["B"], CONFIGS[name]["T"]
                cfg = make_config(name, "plain", compute_dtype="bfloat16")
                sf.set_num_threads(self.threads)
                model = sf.Model(cfg, seed=0)
                x, y = make_batch(cfg.vocab_size, B, T)
                impls: List[str] = []
                if tw:
                    r = tw.call(op="setup", config=make_config(name, "plain").to_dict(), B=B, T=T, impls=["autocast"],
                                adamw=self.a.torch_adamw)
                    if r["impls"]["autocast"].get("ok"):
                        impls = ["autocast"]
                    out[f"{name}_autocast_info"] = r["impls"]["autocast"]
                fl = flops(cfg, B, T)
                row: Dict[str, Any] = {}
                for what, fn, f in (("forward", lambda: model(x), fl["fwd"]),
                                    ("train", lambda: model.train_step(x, y, lr=LR), fl["train"])):
                    log(f"[{name}/plain bf16] {what} ...")
                    res = interleave(fn, impls, tw, what, self.reps, self.warmup, self.min_total)
                    row[what] = {"sf_bf16": stats(res["sf"][0], B * T, f)}
                    if impls:
                        row[what]["autocast"] = stats(res["autocast"][0], B * T, f)
                        row[what]["ratio"] = (row[what]["autocast"]["median_s"] / row[what]["sf_bf16"]["median_s"])
                        row[what]["ratio_best"] = (row[what]["autocast"]["min_s"] / row[what]["sf_bf16"]["min_s"])
                out[name] = row
                del model
        finally:
            if tw:
                tw.close()

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

