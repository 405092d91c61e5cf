"""Running a study: every pending run of the grid, in worker processes or in this one, each
finished run stored at once; a killed study resumes where it stopped.

Parallelism: runs are independent, so on a machine with c cores a study can run c runs side by
side with one thread each, or one run at a time with c threads. Which is faster depends on the
sizes (small matrices scale badly across threads), so a short calibration measures both on a
run of the study and the faster is used; the result is cached in the store. Workers are
started with multiprocessing's "spawn" method, never "fork": a process forked after a threaded
forward pass hangs in GNU OpenMP (issue #24).
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import queue
import signal
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..config import Config
from ..data import Corpus, default_corpus, mask_tokens
from . import budget
from .spec import Cell, StudySpec
from .store import STORE_NAME, Store

__all__ = ["run", "run_cell", "resolve_paths", "load_corpus", "data_signature", "StudyResult",
           "cpu_cores"]

# fixed seeds of the final evaluation batches and the traced batch: the same for every run,
# whatever its seed, so final losses of different seeds are measured on the same text
_EVAL_SEED = (2603, 15031)
_TRACE_SEED = (2603, 15032)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_paths(path: str) -> Tuple[str, str]:
    """(store file, report directory) of a study path: a directory (holding study.sqlite,
    report.md and the figures) or a *.sqlite / *.db file (the report goes beside it)."""
    path = os.fspath(path)
    if path.endswith((".sqlite", ".db", ".sqlite3")):
        return path, os.path.dirname(os.path.abspath(path))
    return os.path.join(path, STORE_NAME), path


# -- data -------------------------------------------------------------------------------------------
_CORPORA: Dict[Tuple, Corpus] = {}


def load_corpus(corpus_file: Optional[str], max_bytes: int) -> Corpus:
    k = (corpus_file, int(max_bytes))
    if k not in _CORPORA:
        _CORPORA[k] = (Corpus.from_file(corpus_file, max_bytes=max_bytes) if corpus_file
                       else default_corpus(max_bytes=max_bytes))
    return _CORPORA[k]


def data_signature(corpus: Corpus) -> str:
    """Hash of the corpus' tokens and split: part of every run's key (same data or not)."""
    h = hashlib.sha256(corpus.tokens.tobytes())
    h.update(f"{corpus.val_fraction!r}".encode())
    return h.hexdigest()[:16]


def _fixed_batches(corpus: Corpus, cfg: Config, n: int, batch_size: int, seq_len: int,
                   seed: Tuple[int, int]) -> List[Tuple[np.ndarray, np.ndarray]]:
    split = "val" if corpus.val.size > seq_len else "train"
    r = np.random.default_rng(list(seed))
    mr = np.random.default_rng([seed[0], seed[1], 1])
    out = []
    for _ in range(n):
        x, y = corpus.batch(batch_size, seq_len, r, split)
        if not cfg.causal:
            x, y = mask_tokens(x, mr)
        out.append((x, y))
    return out


# -- one run -----------------------------------------------------------------------------------------
def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


def _trace_summary(model, corpus: Corpus, seq_len: int, batch_size: int, grad_norms: np.ndarray) -> Dict[str, Any]:
    """What the papers plot per block, from one traced forward pass on a fixed validation batch
    after training: output RMS of each block (attn_out + mlp_out, AttnRes Fig. 5), its input RMS,
    the per-sublayer RMS table, per-block gradient norms (mean over the 2nd half of training),
    AttnRes' depth-mixing matrix (Fig. 8) and MoDA's depth mass per layer; and any other
    *_matrix summary a Trace offers (wirings added later)."""
    from ..model import Trace, TraceOptions
    cfg = model.config
    (x, _), = _fixed_batches(corpus, cfg, 1, min(batch_size, 8), seq_len, _TRACE_SEED)
    tr = model(x, trace=TraceOptions(attention=False)).trace
    n = cfg.n_layers
    out: Dict[str, Any] = {"grad_norm": grad_norms.tolist()}
    if tr.attn_out is not None and tr.mlp_out is not None:
        out["block_out_rms"] = [_rms(tr.attn_out[i] + tr.mlp_out[i]) for i in range(n)]
    if tr.hidden is not None:
        out["block_in_rms"] = [_rms(tr.hidden[i]) for i in range(n)]
    if tr.rms is not None:
        out["rms"] = np.asarray(tr.rms).tolist()
    if tr.alpha is not None and any(a is not None for a in tr.alpha):
        out["alpha_matrix"] = tr.alpha_matrix.tolist()
        out["alpha_labels"] = tr.alpha_labels
    if tr.depth_mass is not None and any(a is not None for a in tr.depth_mass):
        out["depth_mass"] = tr.depth_mass_mean.tolist()
    for name in dir(Trace):
        if name.endswith("_matrix") and name != "alpha_matrix" and isinstance(getattr(Trace, name), property):
            try:
                out[name] = np.asarray(getattr(tr, name), dtype=np.float64).tolist()
            except Exception:
                pass
    return out


def run_cell(task: Dict[str, Any], corpus: Corpus, threads: int = 0,
             on_step: Optional[Callable[[int, int, float], None]] = None) -> Dict[str, Any]:
    """Train one cell with sf.train and measure it; returns the record the store keeps."""
    from .. import set_num_threads
    from ..model import Model
    from ..train import evaluate, train
    if threads:
        set_num_threads(int(threads))
    cfg = Config.from_dict(task["config"])
    b = task["budget"]
    steps, B, T, seed = int(task["steps"]), int(b["batch_size"]), int(b["seq_len"]), int(task["seed"])
    eval_every = max(1, steps // 10) if b["eval_every"] is None else int(b["eval_every"])
    if b["eval_batches"] == 0:
        eval_every = 0
    every = max(1, steps // 100)
    holder: Dict[str, Any] = {}

    def cb(h):
        holder["h"] = h
        k = len(h.step)
        if on_step is not None and (k % every == 0 or k == steps):
            on_step(k, steps, float(h.loss[-1]))
        return False

    model = Model(cfg, seed=seed)
    t0 = time.perf_counter()
    diverged = False
    try:
        hist = train(model, corpus, steps=steps, batch_size=B, lr=float(task["lr"]), seq_len=T,
                     warmup=b["warmup"], weight_decay=b["weight_decay"], clip_norm=b["clip_norm"],
                     eval_every=eval_every, eval_batches=max(1, b["eval_batches"]), seed=seed,
                     progress=False, callback=cb)
    except FloatingPointError:  # a non-finite gradient: the run diverged (e.g. too high an lr)
        diverged = True
        hist = holder.get("h")
        if hist is None:
            from ..train import History
            hist = History()
    final_val = math.nan
    if not diverged:
        final_val = evaluate(model, _fixed_batches(corpus, cfg, int(b["final_eval_batches"]), B, T, _EVAL_SEED))
        diverged = not math.isfinite(final_val)
    g = hist.layer_grad_norms
    grad = g[len(g) // 2:].mean(axis=0) if len(g) else np.full(cfg.n_layers, np.nan)
    traces = {} if diverged else _trace_summary(model, corpus, T, B, grad)
    wall = time.perf_counter() - t0
    tail = hist.loss[-max(1, len(hist.loss) // 10):]
    flops, exact = budget.train_flops(cfg, T, B, steps)
    from .. import get_num_threads
    return dict(
        key=task["key"], wiring=task["wiring"], depth=task["depth"], width=task["width"],
        lr=float(task["lr"]), seed=seed, n_layers=cfg.n_layers, d_ff=cfg.d_ff, steps=steps,
        tokens=int(hist.tokens), params=model.num_params, train_flops=float(flops),
        flops_exact=int(exact), depth_reads=budget.depth_reads(cfg),
        final_val_loss=final_val, final_train_loss=float(np.mean(tail)) if tail else math.nan,
        diverged=int(diverged), wall_s=wall, threads=int(threads or get_num_threads()),
        finished_at=time.time(), config=cfg.to_dict(), budget=b,
        history=dict(step=hist.step, loss=hist.loss, lr=hist.lr, grad_norm=hist.grad_norm,
                     val_step=hist.val_step, val_loss=hist.val_loss,
                     layer_grad_norm=[np.asarray(v).tolist() for v in hist.layer_grad_norm],
                     train_time_s=hist.train_time_s),
        traces=traces)


def _task(cell: Cell, spec: StudySpec, data_sig: str) -> Dict[str, Any]:
    return dict(key=cell.key, wiring=cell.wiring, depth=cell.depth, width=cell.width, lr=cell.lr,
                seed=cell.seed, config=cell.config.to_dict(), steps=cell.steps,
                budget=spec.budget_dict(cell.steps), data=data_sig, label=cell.label)


def _time_steps(task: Dict[str, Any], corpus: Corpus, steps: int) -> float:
    """Seconds per training step of the task's model (after one warm-up step)."""
    from ..model import Model
    cfg = Config.from_dict(task["config"])
    b = task["budget"]
    model = Model(cfg, seed=0)
    x, y = corpus.batch(b["batch_size"], b["seq_len"], np.random.default_rng(0), "train")
    model.train_step(x, y, lr=1e-4)
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train_step(x, y, lr=1e-4)
    return (time.perf_counter() - t0) / steps


# -- worker processes -------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when its parent dies (a SIGKILLed study must not
    leave workers training for nobody)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except Exception:
            pass


def _worker_main(wid: int, task_q, msg_q, threads: int, barrier, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    _die_with_parent()
    if os.getppid() != parent_pid:
        return
    from .. import set_num_threads
    set_num_threads(int(threads))
    while True:
        task = task_q.get()
        if task is None:
            return
        try:
            b = task["budget"]
            corpus = load_corpus(b["corpus_file"], b["corpus_max_bytes"])
            if data_signature(corpus) != task["data"]:
                raise RuntimeError("this worker's corpus differs from the study's (is the corpus file changing?)")
            if task.get("calibrate"):
                barrier.wait(timeout=120)
                msg_q.put(("calib", wid, _time_steps(task, corpus, task["calibrate"])))
                continue
            rec = run_cell(task, corpus, threads,
                           lambda s, n, l: msg_q.put(("step", wid, task["key"], s, n, l)))
            msg_q.put(("done", wid, task["key"], rec))
        except BaseException:
            msg_q.put(("error", wid, task.get("key"), traceback.format_exc()))


class _main_hidden:
    """Start spawn workers without them re-importing the caller's main module: spawn normally
    re-runs the main script in each child, which re-runs a study written without an
    `if __name__ == "__main__":` guard. The workers need nothing from it (their target lives
    here), so its __file__ and __spec__ are hidden while they start."""

    def __enter__(self):
        self.main = sys.modules.get("__main__")
        self.saved = {}
        if self.main is not None:
            for k in ("__file__", "__spec__"):
                if k in vars(self.main):
                    self.saved[k] = vars(self.main)[k]
            self.main.__spec__ = None
            vars(self.main).pop("__file__", None)
        return self

    def __exit__(self, *exc):
        if self.main is not None:
            for k, v in self.saved.items():
                setattr(self.main, k, v)
            if "__spec__" not in self.saved:
                vars(self.main).pop("__spec__", None)


class _Pool:
    """n spawn workers, each with its own task queue (it holds at most one task, so a stopped
    study leaves no queued work behind) and one shared message queue."""

    def __init__(self, n: int, threads: int):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.msg_q = ctx.Queue()
        self.task_qs = [ctx.Queue() for _ in range(n)]
        self.barrier = ctx.Barrier(n)
        self.procs = [ctx.Process(target=_worker_main, daemon=True, name=f"stackformer-study-{i}",
                                  args=(i, self.task_qs[i], self.msg_q, threads, self.barrier, os.getpid()))
                      for i in range(n)]
        with _main_hidden():
            for p in self.procs:
                p.start()

    def send(self, wid: int, task: Dict[str, Any]) -> None:
        self.task_qs[wid].put(task)

    def get(self, timeout: float):
        return self.msg_q.get(timeout=timeout)

    def dead(self) -> List[int]:
        return [i for i, p in enumerate(self.procs) if not p.is_alive()]

    def close(self, kill: bool = False) -> None:
        for i, p in enumerate(self.procs):
            if p.is_alive() and not kill:
                try:
                    self.task_qs[i].put(None)
                except Exception:
                    pass
        for p in self.procs:
            p.join(timeout=0.2 if kill else 5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for q in self.task_qs + [self.msg_q]:
            q.cancel_join_thread()
            q.close()


# -- progress ------------------------------------------------------------------------------------------
def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class StudyProgress:
    """One line on stderr for the whole study: runs done, ETA, the current run's loss. ETA is
    the remaining training FLOPs at the rate this session has trained so far."""

    def __init__(self, name: str, total: int, done: int, work: Dict[str, float], enabled: bool):
        self.name, self.total, self.done, self.work, self.enabled = name, total, done, work, enabled
        self.t0 = time.perf_counter()
        self.done_work = 0.0
        self.remaining = sum(work.values())
        self.partial: Dict[int, Tuple[str, float, str]] = {}
        self.last = 0.0
        self.width = 0

    def step(self, wid: int, key: str, label: str, s: int, n: int, loss: float) -> None:
        self.partial[wid] = (key, s / max(1, n), f"{label}: step {s}/{n} loss {loss:.3f}")
        self.render()

    def finish(self, wid: int, key: str) -> None:
        self.partial.pop(wid, None)
        w = self.work.get(key, 0.0)
        self.done_work += w
        self.remaining -= w
        self.done += 1
        self.render(force=True)

    def render(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        part = sum(self.work.get(k, 0.0) * f for k, f, _ in self.partial.values())
        el = now - self.t0
        rate = (self.done_work + part) / el if el > 0 else 0.0
        eta = (self.remaining - part) / rate if rate > 0 else math.inf
        frac = self.done / max(1, self.total)
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        cur = " | ".join(t for _, _, t in self.partial.values())
        line = f"{self.name} [{bar}] {self.done}/{self.total} runs, ETA {_fmt_time(eta)}" + (f" | {cur}" if cur else "")
        try:
            cols = os.get_terminal_size(sys.stderr.fileno()).columns
        except OSError:
            cols = 120
        line = line[: max(20, cols - 1)]
        sys.stderr.write("\r" + line + " " * max(0, self.width - len(line)))
        sys.stderr.flush()
        self.width = len(line)

    def close(self) -> None:
        if self.enabled and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()


# -- the study ----------------------------------------------------------------------------------------
class StudyResult:
    """What run() returns: the report's summary text, the paths, and how it ran."""

    def __init__(self, summary: str, report_path: str, store_path: str, execution: Dict[str, Any],
                 ran: int, total: int):
        self.summary, self.report_path, self.store_path = summary, report_path, store_path
        self.execution, self.ran, self.total = execution, ran, total

    def table(self):
        from . import load
        return load(self.store_path)

    def __repr__(self) -> str:
        return f"StudyResult({self.ran} runs this time, {self.total} in the study, report {self.report_path!r})"


def _calibrate(store: Store, task: Dict[str, Any], corpus: Corpus, cores: int, log) -> Dict[str, Any]:
    """Seconds per step of the task's run at `cores` threads alone vs `cores` 1-thread runs side
    by side; cached in the store per (sizes, cores)."""
    from .. import get_num_threads, set_num_threads
    sig = dict(cores=cores, config=task["config"], batch_size=task["budget"]["batch_size"],
               seq_len=task["budget"]["seq_len"])
    cached = store.get_meta("calibration")
    if cached and cached.get("signature") == sig:
        return dict(cached, cached=True)
    f, _ = budget.forward_flops(Config.from_dict(task["config"]), task["budget"]["seq_len"])
    est = 3 * f * task["budget"]["batch_size"] / 40e9
    steps = int(min(30, max(3, 0.8 / max(est, 1e-6))))
    log(f"calibrating: {steps} train steps at {cores} threads, then {cores} one-thread runs side by side")
    old = get_num_threads()
    set_num_threads(cores)
    try:
        t_threads = _time_steps(task, corpus, steps)
    finally:
        set_num_threads(old)
    pool = _Pool(cores, 1)
    try:
        for i in range(cores):
            pool.send(i, dict(task, calibrate=steps))
        times = []
        deadline = time.time() + 300
        while len(times) < cores:
            try:
                msg = pool.get(timeout=1.0)
            except queue.Empty:
                if pool.dead() or time.time() > deadline:
                    raise RuntimeError("calibration worker died or hung")
                continue
            if msg[0] == "error":
                raise RuntimeError(f"calibration failed in a worker:\n{msg[3]}")
            if msg[0] == "calib":
                times.append(msg[2])
    finally:
        pool.close()
    t_side = max(times)
    choice = "processes" if cores / t_side > 1.0 / t_threads else "threads"
    res = dict(signature=sig, steps=steps, s_per_step_threads=t_threads, s_per_step_side_by_side=t_side,
               runs_per_s_threads=1.0 / t_threads, runs_per_s_side_by_side=cores / t_side,
               choice=choice, measured_at=time.time())
    store.set_meta("calibration", res)
    return dict(res, cached=False)


def run(spec: StudySpec, path: str, workers: Optional[int] = None, threads: Optional[int] = None,
        progress: Optional[bool] = None, png: bool = True, verbose: bool = True,
        print_report: bool = True) -> StudyResult:
    """Run (or resume) `spec`, storing results under `path` (a directory: study.sqlite,
    report.md, figures; or a *.sqlite file), then write the report.

    workers: None = calibrate (one-thread runs side by side in spawn workers vs one run at a
        time on all cores; cached); 1 = one run at a time in this process; n > 1 = n spawn workers.
    threads: compute threads per run (default: cores // workers).
    progress: the study's progress bar on stderr (default: when stderr is a terminal).
    png: write the PNG figures (needs matplotlib; the report says when they are missing).
    Runs already in the store are not run again; a finished study only rebuilds its report.
    Ctrl-C stops the study (finished runs are kept) and raises KeyboardInterrupt.
    """
    if not isinstance(spec, StudySpec):
        raise TypeError(f"spec must be a StudySpec, got {type(spec).__name__}")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers must be None or an int >= 1, got {workers!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    spec.validate()
    store_path, out_dir = resolve_paths(path)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if verbose else (lambda m: None)
    corpus = load_corpus(spec.corpus_file, spec.corpus_max_bytes)
    if corpus.val.size < spec.seq_len + 1:
        raise ValueError(f"the corpus ({len(corpus)} bytes) is too small for seq_len {spec.seq_len}: its "
                         f"validation split (the last 10%) needs {spec.seq_len + 1} bytes")
    sig = data_signature(corpus)
    cells = spec.cells(sig)            # validates every cell before anything runs or is written
    from . import report as report_mod
    store = Store(store_path)
    try:
        store.set_meta("spec", spec.to_dict())
        store.set_meta("data", dict(signature=sig, name=corpus.name, bytes=len(corpus),
                                    unigram_val=corpus.unigram_loss("val")))
        have = store.keys()
        pending = [c for c in cells if c.key not in have]
        cores = cpu_cores()
        execution = store.get_meta("execution") or {}
        ran = 0
        if pending:
            execution = _execute(spec, store, pending, len(cells), corpus, sig, cores, workers, threads,
                                 progress, log)
            ran = len(pending)
        summary, rpath = report_mod.write(store, spec, cells, out_dir, png=png)
        if print_report:
            print(summary, flush=True)
        return StudyResult(summary, rpath, store_path, execution, ran, len(cells))
    finally:
        store.close()


def _execute(spec, store, pending, total, corpus, sig, cores, workers, threads, progress, log):
    tasks = [_task(c, spec, sig) for c in pending]
    work = {t["key"]: float(budget.train_flops(Config.from_dict(t["config"]), spec.seq_len,
                                               spec.batch_size, t["steps"])[0]) for t in tasks}
    calib = None
    if workers is None:
        if cores < 2 or len(tasks) < 2:
            workers = 1
        else:
            # calibrate on the run of median cost
            mid = sorted(tasks, key=lambda t: work[t["key"]])[len(tasks) // 2]
            calib = _calibrate(store, mid, corpus, cores, log)
            workers = cores if calib["choice"] == "processes" else 1
    workers = min(workers, len(tasks))
    if threads is None:
        threads = max(1, cores // workers)
    mode = "in-process" if workers == 1 else f"{workers} spawn workers"
    execution = dict(workers=workers, threads=threads, mode=mode, cores=cores,
                     calibration=calib, started_at=time.time())
    store.set_meta("execution", execution)
    enabled = sys.stderr.isatty() if progress is None else bool(progress)
    log(f"{spec.name}: {len(tasks)} of {total} runs to do ({total - len(tasks)} stored), "
        f"{mode} x {threads} thread(s)")
    bar = StudyProgress(spec.name, total, total - len(tasks), work, enabled)
    labels = {t["key"]: f"{t['wiring']} s{t['seed']}" + (f" d{t['depth']}" if len(spec.depths) > 1 else "")
              for t in tasks}
    try:
        if workers == 1:
            from .. import get_num_threads, set_num_threads
            old = get_num_threads()
            try:
                for t in tasks:
                    rec = run_cell(t, corpus, threads,
                                   lambda s, n, l, k=t["key"]: bar.step(0, k, labels[k], s, n, l))
                    store.add_run(rec)
                    bar.finish(0, t["key"])
            finally:
                set_num_threads(old)
        else:
            _run_pool(tasks, workers, threads, store, bar, labels)
    except KeyboardInterrupt:
        bar.close()
        log(f"\ninterrupted: {store.count()} runs stored in {store.path}; run the same command "
            f"again to resume")
        raise
    finally:
        bar.close()
    return execution


def _run_pool(tasks, workers, threads, store, bar, labels) -> None:
    pending = collections.deque(tasks)
    pool = _Pool(workers, threads)
    in_flight: Dict[int, Dict[str, Any]] = {}
    idle = list(range(workers))[::-1]
    ok = False
    try:
        while pending or in_flight:
            while idle and pending:
                wid = idle.pop()
                t = pending.popleft()
                in_flight[wid] = t
                pool.send(wid, t)
            try:
                msg = pool.get(timeout=0.5)
            except queue.Empty:
                dead = [w for w in pool.dead() if w in in_flight]
                if dead:
                    w = dead[0]
                    raise RuntimeError(f"a study worker died (exit code {pool.procs[w].exitcode}) while "
                                       f"running {in_flight[w]['label']}")
                continue
            kind, wid = msg[0], msg[1]
            if kind == "step":
                _, _, key, s, n, loss = msg
                bar.step(wid, key, labels.get(key, key), s, n, loss)
            elif kind == "done":
                store.add_run(msg[3])
                in_flight.pop(wid, None)
                idle.append(wid)
                bar.finish(wid, msg[2])
            elif kind == "error":
                t = in_flight.get(wid, {})
                raise RuntimeError(f"run {t.get('label', msg[2])} failed in a worker:\n{msg[3]}")
        ok = True
    finally:
        pool.close(kill=not ok)
