"""Worker processes: PyTorch peers, the perf-profiled C core, peak-memory subprocesses;
and the phase names of profiles."""
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, Tuple

import numpy as np

from .env import THIS, proc_status_kib  # noqa: E402
from .matrix import LR, make_batch  # noqa: E402
from .matmul import BLAS_OPS  # noqa: E402
from .proc import torch_env, Worker, WorkerError  # noqa: F401  (Worker, WorkerError: re-exported for the runner)


# ---------------------------------------------------------------------------------------------
# worker processes (PyTorch, memory, profiling)

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
    """(sf model, module, optimizer, impl name, adamw) with the weights of sf.Model(cfg, seed).
    impl: "sdpa" (the minimal mirror), "to_torch" (stackformer.torch), "compile" (torch.compile
    of the sdpa mirror where it covers the config, else of to_torch) or "autocast" (the same
    eager module, run under bf16 autocast by _torch_step)."""
    import torch
    import stackformer as sf
    import torch_mirror as tm
    sfm = sf.Model(cfg, seed=seed)
    base = impl
    if impl in ("compile", "autocast"):
        base = "sdpa" if tm.mirror_supports(cfg)[0] else "to_torch"
    module, name = tm.build(sfm, "to_torch" if base == "to_torch" else "mirror")
    module.train()
    kw = {"fused": True} if adamw == "fused" else {}
    try:
        opt = tm.adamw_for(module, sfm, LR, **kw)
    except Exception:
        opt = tm.adamw_for(module, sfm, LR)
        adamw = "default"
    if impl == "compile":
        # inductor, default mode; the module's parameters stay shared, so the optimizer steps
        # the compiled module's weights. Graphs are compiled by the first (warm-up) calls.
        module = torch.compile(module)
        name = f"torch.compile({name})"
    elif impl == "autocast":
        name = f"autocast(bf16, {name})"
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
            if impl in ("compile", "autocast") and not (tm.mirror_supports(cfg)[0] or tm.have_to_torch()):
                raise NotImplementedError("no PyTorch module for this mode")
            sfm, module, opt, name, adamw = _torch_build(state, impl, cfg, adamw=msg.get("adamw", "fused"))
            info.update(impl=name, adamw=adamw)
            if msg.get("check", True):  # same weights, same math: compare on 2 sequences
                # (a compiled module on the timed batch itself: a second shape would recompile
                # it with dynamic shapes, which is not what a user's fixed-shape loop runs)
                xs, ys = (x, y) if impl == "compile" else (x[:2], y[:2])
                ref = sfm(xs).logits
                with torch.inference_mode(), _maybe_autocast(impl):
                    got = tm.logits_of(module(torch.from_numpy(xs))).float().numpy()
                info["max_abs_diff_logits"] = float(np.abs(ref - got).max())
                loss_sf = sfm.forward_backward(xs, ys)
                with _maybe_autocast(impl):
                    lo = tm.logits_of(module(torch.from_numpy(xs)))
                lt = torch.nn.functional.cross_entropy(
                    lo.float().reshape(-1, cfg.vocab_size), torch.from_numpy(ys).reshape(-1))
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


def _maybe_autocast(impl: str):
    """torch.autocast("cpu", bfloat16) for the autocast peer, else a no-op context."""
    import contextlib
    import torch
    if impl == "autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _torch_step(state, impl: str, what: str) -> Callable[[], None]:
    import torch
    import torch_mirror as tm
    module, opt = state["impls"][impl]
    x, y = state["x"], state["y"]
    if what == "forward":
        def fwd():
            with torch.inference_mode(), _maybe_autocast(impl):
                tm.logits_of(module(x))
        return fwd

    def train():
        # autocast covers the forward and the loss (as torch's AMP recipe does); backward
        # follows the forward's dtypes; the optimizer steps the fp32 weights
        with _maybe_autocast(impl):
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


