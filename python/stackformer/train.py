"""A training loop: `train(model, corpus, ...)` -> History.

AdamW (in C) with linear warm-up and cosine decay, periodic validation on fixed batches,
per-layer gradient norms, and a progress bar (tqdm when installed, plain prints otherwise).
Given the same model seed, data, arguments and thread count, two runs produce bitwise
identical loss histories.

Decoders (causal models) learn next-token prediction; encoders (causal=False) learn to fill
in masked tokens (`data.mask_tokens`, 15% of positions).
"""
from __future__ import annotations

import math
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ._checks import (check_bool, check_callable, check_int, check_model, check_pair, check_real,
                      check_str)
from .data import IGNORE_INDEX, Corpus, DataWarning, mask_tokens

__all__ = ["History", "train", "lr_schedule", "evaluate", "cross_entropy", "layer_grad_norms"]

_LAYER = re.compile(r"^layers\.(\d+)\.")


def lr_schedule(step: int, lr: float, steps: int, warmup: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate for the 0-based step index `step` of a run of `steps` steps.

    Linear warm-up lr*(step+1)/warmup for step < warmup, then cosine decay from lr at step
    == warmup towards min_lr at step == steps: min_lr + (lr - min_lr)(1 + cos(pi r))/2 with
    r = (step - warmup)/(steps - warmup), clamped to [0, 1]."""
    step = check_int("step", step, 0)
    lr = check_real("lr", lr)
    steps = check_int("steps", steps, 1)
    warmup = check_int("warmup", warmup, 0)
    min_lr = check_real("min_lr", min_lr)
    if step < warmup:
        return lr * (step + 1) / warmup
    r = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * r))


@dataclass
class History:
    """What a training run logged, one entry per optimizer step.

    step[i]: updates applied after that step (1, 2, ...); loss[i]: training loss of its batch
    (before the update); lr[i]; grad_norm[i]: global gradient norm before clipping;
    tokens_per_s[i]: target tokens per wall-clock second of that step.
    layer_grad_norm[i]: (n_layers,) gradient norm of each block's tensors (`layers.{j}.*`).
    val_step / val_loss: validation loss after that many updates (0 = before training).
    """

    step: List[int] = field(default_factory=list)
    loss: List[float] = field(default_factory=list)
    lr: List[float] = field(default_factory=list)
    grad_norm: List[float] = field(default_factory=list)
    tokens_per_s: List[float] = field(default_factory=list)
    layer_grad_norm: List[np.ndarray] = field(default_factory=list)
    val_step: List[int] = field(default_factory=list)
    val_loss: List[float] = field(default_factory=list)
    train_time_s: float = 0.0      # seconds spent in training steps (validation excluded)
    tokens: int = 0                # target tokens trained on
    memory_bytes: int = 0          # activation workspace of one step (model.train_memory_bytes)

    @property
    def layer_grad_norms(self) -> np.ndarray:
        """(n_logged, n_layers) per-block gradient norms."""
        if not self.layer_grad_norm:
            return np.zeros((0, 0))
        return np.stack(self.layer_grad_norm)

    @property
    def mean_tokens_per_s(self) -> float:
        return self.tokens / self.train_time_s if self.train_time_s > 0 else float("nan")


def cross_entropy(logits: np.ndarray, targets: np.ndarray, ignore_index: int = IGNORE_INDEX) -> Tuple[float, int]:
    """Summed cross-entropy (nats) of logits (B, T, V) against targets (B, T), skipping
    ignore_index, in float64. Returns (sum, count)."""
    keep = targets != ignore_index
    z = logits[keep].astype(np.float64)                       # (N, V)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    t = targets[keep].astype(np.int64)
    return float(-logp[np.arange(t.size), t].sum()), int(t.size)


def evaluate(model, batches: List[Tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean per-token loss over (inputs, targets) batches, forward only (no gradients)."""
    check_model("model", model)
    if isinstance(batches, (str, bytes)) or not isinstance(batches, (list, tuple)):
        raise TypeError(f"batches must be a list of (inputs, targets) pairs, got {type(batches).__name__}")
    total, count = 0.0, 0
    for x, y in batches:
        s, n = cross_entropy(model(x).logits, y)
        total += s
        count += n
    return total / max(count, 1)


def _layer_groups(model) -> List[List[str]]:
    groups: List[List[str]] = [[] for _ in range(model.config.n_layers)]
    for name in model.grads:
        m = _LAYER.match(name)
        if m:
            groups[int(m.group(1))].append(name)
    return groups


def layer_grad_norms(model, groups: Optional[List[List[str]]] = None) -> np.ndarray:
    """(n_layers,) L2 norm of the current gradients of each block's tensors (`layers.{i}.*`)."""
    check_model("model", model)
    grads: Dict[str, np.ndarray] = model.grads
    groups = _layer_groups(model) if groups is None else groups
    out = np.empty(len(groups))
    for i, names in enumerate(groups):
        # np.square + sum, not np.dot: BLAS threads would fight the C core's OpenMP threads
        out[i] = math.sqrt(sum(float(np.square(grads[n], dtype=np.float64).sum()) for n in names))
    return out


class _Progress:
    """tqdm bar when tqdm is installed, else a line to stderr every ~10% of the run."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.total, self.enabled, self.desc, self.bar = total, enabled, desc, None
        self.every = max(1, total // 10)
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, info: Dict[str, str]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(info, refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            fields = "  ".join(f"{k} {v}" for k, v in info.items())
            print(f"{self.desc} step {step}/{self.total}  {fields}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _StopSignals:
    """While training, Ctrl-C (SIGINT) and SIGTERM stop the loop at the next point where the
    model and the History agree: right after a forward_backward (the update is not applied)
    or after a step's bookkeeping; KeyboardInterrupt / SystemExit(143) then carry the History
    of the completed steps as `.history`. A second Ctrl-C interrupts at once, as usual. The
    handlers are installed only from the main thread and only over Python's defaults (a
    handler of the caller's own is left alone), and restored on the way out."""

    def __init__(self) -> None:
        self.pending: Optional[int] = None
        self.saved: Dict[int, object] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for sig, default in defaults.items():
            if signal.getsignal(sig) is default:
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.pending is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: now
        self.pending = signum

    def check(self, hist: "History") -> None:
        if self.pending is None:
            return
        if self.pending == signal.SIGINT:
            exc: BaseException = KeyboardInterrupt()
        else:
            exc = SystemExit(128 + self.pending)
        exc.history = hist
        raise exc

    def __exit__(self, *exc) -> None:
        for sig, old in self.saved.items():
            signal.signal(sig, old)


def _truncate(hist: "History") -> None:
    """After an interrupt that landed mid-bookkeeping (not from the main thread, where the
    signal handlers defer it): keep the steps every per-step list has."""
    n = min(len(hist.step), len(hist.loss), len(hist.lr), len(hist.grad_norm),
            len(hist.tokens_per_s), len(hist.layer_grad_norm))
    for name in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "layer_grad_norm"):
        del getattr(hist, name)[n:]
    v = min(len(hist.val_step), len(hist.val_loss))
    del hist.val_step[v:], hist.val_loss[v:]


def train(model, data, steps: int = 1000, batch_size: int = 16, lr: float = 3e-3,
          seq_len: Optional[int] = None, warmup: Optional[int] = None, min_lr: Optional[float] = None,
          weight_decay: float = 0.1, clip_norm: float = 1.0, betas: Tuple[float, float] = (0.9, 0.95),
          eval_every: Optional[int] = None, eval_batches: int = 8, seed: int = 0,
          checkpoint: bool = False, progress: bool = True,
          callback: Optional[Callable[[History], Optional[bool]]] = None, desc: str = "train") -> History:
    """Train `model` in place on `data` and return the History.

    data: a Corpus (or str/bytes/token array, wrapped with the default 10% validation split).
    steps, batch_size, seq_len: run length and batch shape (batch_size, seq_len); seq_len
        defaults to model.config.max_seq_len.
    lr, warmup, min_lr: peak rate, warm-up steps (default 5% of steps), final rate (default
        lr/10): see lr_schedule. weight_decay, clip_norm, betas: AdamW (model.optimizer_step).
    eval_every: validation every that many steps, before training and after the last step
        (default: steps/10; 0 disables, as does an empty validation split). Validation loss
        is the mean token loss over eval_batches batches drawn once from a fixed seed.
    seed: seeds the batch sampler (and masking); the model's own seed sets its weights.
    checkpoint: activation checkpointing (less memory, more compute, same numbers).
    progress: tqdm bar or periodic lines on stderr; False prints nothing.
    callback(history): called after every step; returning True stops training early.
    Ctrl-C (KeyboardInterrupt) or SIGTERM (SystemExit(143)) stop it after the running step's
    forward/backward (that update is not applied) or step; the exception's `.history` holds
    the History of the completed steps, and the model is usable (and continues bit for bit).

    Warns (stackformer.DataWarning) when the validation loss would mislead: str/bytes data
    whose validation split is tiny or repeats the training text (see Corpus.data_problems),
    or a validation split too short for one window of seq_len + 1 tokens (no validation).
    """
    check_model("model", model)
    if isinstance(data, Corpus):
        corpus = data
    else:
        with warnings.catch_warnings():   # re-issued below, pointing at the caller's line
            warnings.simplefilter("ignore", DataWarning)
            corpus = Corpus(data)
        for problem in corpus.data_problems():
            warnings.warn(problem, DataWarning, stacklevel=2)
    cfg = model.config
    T = cfg.max_seq_len if seq_len is None else check_int("seq_len", seq_len)
    if not 1 <= T <= cfg.max_seq_len:
        raise ValueError(f"seq_len must be in [1, max_seq_len={cfg.max_seq_len}], got {T}")
    if cfg.vocab_size < 256:
        raise ValueError(f"byte-level data needs vocab_size >= 256, got {cfg.vocab_size}")
    steps = check_int("steps", steps)
    batch_size = check_int("batch_size", batch_size)
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    lr = check_real("lr", lr)
    warmup = max(1, steps // 20) if warmup is None else check_int("warmup", warmup, 0)
    min_lr = lr / 10 if min_lr is None else check_real("min_lr", min_lr)
    eval_every = max(1, steps // 10) if eval_every is None else check_int("eval_every", eval_every, 0)
    eval_batches = check_int("eval_batches", eval_batches, 1)
    seed = check_int("seed", seed, 0)
    checkpoint = check_bool("checkpoint", checkpoint)
    progress = check_bool("progress", progress)
    check_callable("callback", callback)
    desc = check_str("desc", desc)
    weight_decay = check_real("weight_decay", weight_decay)
    clip_norm = check_real("clip_norm", clip_norm, finite=False)
    betas = check_pair("betas", betas)
    if corpus.val.size < T + 1:
        if eval_every > 0 and corpus.val.size > 0:
            warnings.warn(f"{corpus.name}: the validation split has {corpus.val.size} tokens, fewer "
                          f"than one window of seq_len + 1 = {T + 1}: no validation loss will be "
                          f"measured", DataWarning, stacklevel=2)
        eval_every = 0

    rng = np.random.default_rng(seed)
    mask_rng = np.random.default_rng([seed, 1])

    def sample(split: str, r: np.random.Generator, mr: np.random.Generator):
        x, y = corpus.batch(batch_size, T, r, split)
        if not cfg.causal:  # encoder: predict masked tokens of the (unshifted) window
            x, y = mask_tokens(x, mr)
        return x, y

    val_batches = []
    if eval_every > 0:
        vr, vmr = np.random.default_rng([seed, 2]), np.random.default_rng([seed, 3])
        val_batches = [sample("val", vr, vmr) for _ in range(eval_batches)]

    hist = History(memory_bytes=model.train_memory_bytes(batch_size, T, checkpoint))
    groups = _layer_groups(model)
    bar = _Progress(steps, progress, desc)
    if val_batches:
        hist.val_step.append(0)
        hist.val_loss.append(evaluate(model, val_batches))
    stops = _StopSignals()
    try:
        with stops:
            for i in range(steps):
                x, y = sample("train", rng, mask_rng)
                rate = lr_schedule(i, lr, steps, warmup, min_lr)
                t0 = time.perf_counter()
                loss = model.forward_backward(x, y, checkpoint=checkpoint)
                stops.check(hist)  # a signal during the backward: stop before the update
                layer_norms = layer_grad_norms(model, groups)   # unclipped, like grad_norm
                gnorm = model.optimizer_step(rate, betas=betas, weight_decay=weight_decay, clip_norm=clip_norm)
                dt = time.perf_counter() - t0
                n_tok = int(np.count_nonzero(y != IGNORE_INDEX))
                hist.step.append(i + 1)
                hist.loss.append(loss)
                hist.lr.append(rate)
                hist.grad_norm.append(gnorm)
                hist.tokens_per_s.append(n_tok / dt if dt > 0 else float("nan"))
                hist.layer_grad_norm.append(layer_norms)
                hist.train_time_s += dt
                hist.tokens += n_tok
                info = {"loss": f"{loss:.3f}", "lr": f"{rate:.2e}"}
                if val_batches and ((i + 1) % eval_every == 0 or i + 1 == steps):
                    hist.val_step.append(i + 1)
                    hist.val_loss.append(evaluate(model, val_batches))
                if hist.val_loss:
                    info["val"] = f"{hist.val_loss[-1]:.3f}"
                info["tok/s"] = f"{hist.mean_tokens_per_s:,.0f}"
                bar.update(i + 1, info)
                stops.check(hist)
                if callback is not None and callback(hist):
                    break
    except (KeyboardInterrupt, SystemExit) as e:
        if not hasattr(e, "history"):  # not deferred (another thread, a second Ctrl-C)
            _truncate(hist)
            e.history = hist
        raise
    finally:
        bar.close()
    if val_batches and hist.step and hist.val_step[-1] != hist.step[-1]:  # stopped early
        hist.val_step.append(hist.step[-1])
        hist.val_loss.append(evaluate(model, val_batches))
    return hist
