"""Isolated C matrix products (sf_gemm via ctypes) and the OpenBLAS yardstick, with the
BLAS worker's handlers."""
import ctypes
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from .env import adaptive_reps, build_c, pick, stats  # noqa: E402
from .matrix import CONFIGS, make_config  # noqa: E402
from .proc import Worker, WorkerError  # noqa: E402


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

