"""`python -m stackformer`: train plain, Full AttnRes, Block AttnRes and MoDA stacks of the
same size with the same data, seed and budget, then compare them.

Every stack sees the same batches in the same order (same sampler seed) and starts from the
same seed. After training, one traced forward pass on a validation batch measures what each
block writes; the gradient norms logged during training show how evenly depth is trained.

Table columns (each header also says it in two words and its unit):
  params            trainable parameters of the stack
  val loss          validation loss (nats/byte) after training, same fixed batches for all stacks
  gain over unigram unigram baseline minus val loss: how much the stack gains from context
  train tok/s       training throughput (target tokens per second of training steps)
  output RMS growth RMS of the last block's output over the first block's (attn_out + mlp_out)
  grad spread       max/min over blocks of the per-block gradient norm, averaged over the second
                    half of training (1 = every block gets the same gradient)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np

from ._checks import check_bool, check_int, check_optional_int, check_real, check_seed, check_str
from .config import Config
from .data import Corpus, default_corpus
from .model import Model, TraceOptions
from .plotting import have_matplotlib
from .train import History, train

STACK_NAMES = ("plain", "attnres_full", "attnres_block", "moda")

# `--quick`: tiny sizes so the whole comparison runs in seconds (CI, tests).
QUICK = dict(layers=2, d_model=32, heads=2, seq_len=32, batch_size=4, steps=20, eval_batches=2,
             max_bytes=200_000)
DEFAULTS = dict(layers=8, d_model=64, heads=4, seq_len=64, batch_size=16, steps=300, eval_batches=8,
                max_bytes=4_000_000)

# validation runs this many times per stack (plus once before training), so the loss panel
# of compare.png draws a curve and not a handful of dots
EVAL_POINTS = 20


def stack_config(name: str, n_layers: int, d_model: int, n_heads: int, seq_len: int,
                 block_size: int = 4) -> Config:
    """The Config of one of STACK_NAMES: a byte-level pre-norm decoder, wired as named."""
    check_str("name", name)
    n_layers, d_model = check_int("n_layers", n_layers, 1), check_int("d_model", d_model, 1)
    n_heads, seq_len = check_int("n_heads", n_heads, 1), check_int("seq_len", seq_len, 1)
    block_size = check_int("block_size", block_size, 1)
    wiring = {
        "plain": dict(),
        "attnres_full": dict(residual="attnres_full"),
        "attnres_block": dict(residual="attnres_block", attnres_block_size=block_size),
        "moda": dict(moda=True),
    }
    if name not in wiring:
        raise ValueError(f"unknown stack {name!r}; choose from {', '.join(STACK_NAMES)}")
    return Config(vocab_size=256, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                  max_seq_len=seq_len, **wiring[name])


@dataclass
class StackResult:
    """One trained stack. Per-block arrays have shape (n_layers,)."""

    name: str
    label: str
    num_params: int
    history: History
    block_out_rms: np.ndarray   # RMS of attn_out + mlp_out of each block (traced, after training)
    block_in_rms: np.ndarray    # RMS of what each block reads (stream / AttnRes aggregate)
    grad_norms: np.ndarray      # per-block gradient norm, mean over the second half of training
    extra: Dict[str, float] = field(default_factory=dict)

    @property
    def val_loss(self) -> float:
        return self.history.val_loss[-1] if self.history.val_loss else float("nan")

    @property
    def rms_growth(self) -> float:
        return float(self.block_out_rms[-1] / self.block_out_rms[0])

    @property
    def grad_spread(self) -> float:
        return float(self.grad_norms.max() / self.grad_norms.min())


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


def run_stack(name: str, corpus: Corpus, n_layers: int = 8, d_model: int = 64, n_heads: int = 4,
              seq_len: int = 64, batch_size: int = 16, steps: int = 300, lr: float = 3e-3,
              block_size: int = 4, seed: int = 0, eval_every: Optional[int] = None,
              eval_batches: int = 8, progress: bool = True) -> StackResult:
    """Build stack `name` with `seed`, train it with sf.train (validation before training and
    every steps/EVAL_POINTS steps, i.e. EVAL_POINTS + 1 points, unless eval_every says
    otherwise) and measure it after training."""
    if not isinstance(corpus, Corpus):
        raise TypeError(f"corpus must be a stackformer.Corpus, got {type(corpus).__name__}")
    steps = check_int("steps", steps, 1)
    seed = check_int("seed", seed, 0)
    eval_every = check_optional_int("eval_every", eval_every, 0)
    model = Model(stack_config(name, n_layers, d_model, n_heads, seq_len, block_size), seed=seed)
    label = f"attnres_block(S={block_size})" if name == "attnres_block" else name
    eval_every = max(1, steps // EVAL_POINTS) if eval_every is None else eval_every
    hist = train(model, corpus, steps=steps, batch_size=batch_size, lr=lr, seq_len=seq_len,
                 eval_every=eval_every, eval_batches=eval_batches, seed=seed, progress=progress,
                 desc=f"{label:>18s}")
    # what each block reads and writes, on one fixed validation (or training) batch
    split = "val" if corpus.val.size > seq_len else "train"
    x, _ = corpus.batch(min(batch_size, 8), seq_len, np.random.default_rng([seed, 7]), split)
    tr = model(x, trace=TraceOptions(attention=False, alpha=False, depth_mass=False, rms=False)).trace
    out_rms = np.array([_rms(tr.attn_out[i] + tr.mlp_out[i]) for i in range(n_layers)])
    in_rms = np.array([_rms(tr.hidden[i]) for i in range(n_layers)])
    g = hist.layer_grad_norms
    grad = g[len(g) // 2:].mean(axis=0)
    return StackResult(name, label, model.num_params, hist, out_rms, in_rms, grad)


# (header line 1, header line 2, width): every header names its quantity and unit, so the
# table reads without the module docstring
_COLUMNS = [("params", "", 9), ("val loss", "(nats/B)", 9), ("gain over", "unigram", 9),
            ("train", "tok/s", 8), ("output RMS", "last/first", 10), ("grad spread", "max/min", 11)]


def format_table(results: Sequence[StackResult], unigram: float) -> str:
    """The comparison as a fixed-width text table (two header lines: quantity, then unit)."""
    if isinstance(results, (str, bytes)) or not isinstance(results, Sequence) \
            or not all(isinstance(r, StackResult) for r in results):
        raise TypeError("results must be a sequence of StackResult (from run_stack)")
    unigram = check_real("unigram", unigram)
    head1 = f"{'stack':20s} " + " ".join(f"{a:>{w}s}" for a, _, w in _COLUMNS)
    head2 = f"{'':20s} " + " ".join(f"{b:>{w}s}" for _, b, w in _COLUMNS)
    lines = [head1, head2, "-" * len(head1)]
    for r in results:
        lines.append(f"{r.label:20s} {r.num_params:9,d} {r.val_loss:9.4f} {unigram - r.val_loss:+9.4f} "
                     f"{r.history.mean_tokens_per_s:8,.0f} {r.rms_growth:10.2f} {r.grad_spread:11.2f}")
    lines.append(f"{'unigram baseline':20s} {'':9s} {unigram:9.4f}")
    return "\n".join(lines)


def table_legend() -> str:
    """What each column of format_table means, in one line each (printed under the table)."""
    return "\n".join([
        "val loss: cross-entropy on held-out text after training, in nats per byte (lower is better)",
        "gain over unigram: the unigram baseline minus val loss, what the stack learned from context",
        "train tok/s: training throughput, target tokens per second of training steps",
        "output RMS last/first: RMS of the last block's output over the first block's",
        "grad spread max/min: largest over smallest per-block gradient norm (1 = depth trained evenly)",
    ])


def plot_comparison(results: Sequence[StackResult], unigram: float, path: str) -> None:
    """Four panels, one colour per stack: the loss over the whole run (training loss per step,
    thin, and validation loss, dots), the validation loss of the second half of training
    zoomed in, per-block output RMS and per-block gradient norm."""
    from .plotting import _pyplot
    if isinstance(results, (str, bytes)) or not isinstance(results, Sequence) or not results \
            or not all(isinstance(r, StackResult) for r in results):
        raise TypeError("results must be a non-empty sequence of StackResult (from run_stack)")
    unigram = check_real("unigram", unigram)
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    whole, zoom, rms_ax, grad_ax = axes.ravel()
    for j, r in enumerate(results):
        c = f"C{j}"
        h = r.history
        whole.plot(h.step, h.loss, color=c, alpha=0.35, lw=0.8)
        whole.plot(h.val_step, h.val_loss, color=c, marker="o", ms=2.5, lw=1.2, label=f"{r.label}")
        half = [(s, v) for s, v in zip(h.val_step, h.val_loss) if s >= (h.step[-1] if h.step else 0) / 2]
        if half:
            zoom.plot(*zip(*half), color=c, marker="o", ms=3, label=r.label)
        blocks = np.arange(len(r.block_out_rms))
        rms_ax.plot(blocks, r.block_out_rms, color=c, marker="o", ms=3, label=r.label)
        grad_ax.plot(blocks, r.grad_norms, color=c, marker="o", ms=3, label=r.label)
    for ax in (whole, zoom):
        ax.axhline(unigram, color="gray", ls="--", lw=1, label="unigram baseline")
    whole.set(xlabel="training step", ylabel="loss (nats/byte)",
              title="loss over the whole run: training (thin), validation (dots)")
    whole.set_xlim(left=0)
    zoom.set(xlabel="training step", ylabel="validation loss (nats/byte)",
             title="validation loss, second half of training (zoomed)")
    rms_ax.set(xlabel="block", ylabel="RMS", title="block output RMS after training")
    grad_ax.set(xlabel="block", ylabel="gradient norm", title="per-block gradient norm (2nd half mean)")
    grad_ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator
    for ax in (rms_ax, grad_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stackformer", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="`python -m stackformer demo --help`: the random-init stacking/wiring demo.")
    d = DEFAULTS
    p.add_argument("--layers", type=int, help=f"blocks per stack (default {d['layers']})")
    p.add_argument("--d-model", dest="d_model", type=int, help=f"width (default {d['d_model']})")
    p.add_argument("--heads", type=int, help=f"attention heads (default {d['heads']})")
    p.add_argument("--seq-len", dest="seq_len", type=int, help=f"tokens per sequence (default {d['seq_len']})")
    p.add_argument("--batch-size", dest="batch_size", type=int, help=f"sequences per step (default {d['batch_size']})")
    p.add_argument("--steps", type=int, help=f"training steps per stack (default {d['steps']})")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3; warm-up + cosine)")
    p.add_argument("--stacks", default=",".join(STACK_NAMES),
                   help=f"comma-separated subset of {','.join(STACK_NAMES)} (default: all)")
    p.add_argument("--block-size", dest="block_size", type=int, default=4,
                   help="Block AttnRes block size S in sublayers (default 4)")
    p.add_argument("--corpus", metavar="FILE",
                   help="train on this text file (default: the Python standard library's source)")
    p.add_argument("--max-bytes", dest="max_bytes", type=int,
                   help=f"read at most this many bytes of the corpus (default {d['max_bytes']:,})")
    p.add_argument("--eval-batches", dest="eval_batches", type=int,
                   help=f"validation batches (default {d['eval_batches']})")
    p.add_argument("--seed", type=int, default=0, help="model and data seed (default 0)")
    p.add_argument("--threads", type=int, default=0, help="compute threads (default 0: all cores)")
    p.add_argument("--out", default=".", help="directory for compare.png (default: current)")
    p.add_argument("--no-png", dest="png", action="store_false", help="do not write the PNG")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 20 steps: runs in seconds (for CI); explicit options still win")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    bad = [s for s in stacks if s not in STACK_NAMES]
    if bad or not stacks:
        p.error(f"--stacks: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(STACK_NAMES)}")
    for k in ("layers", "d_model", "heads", "seq_len", "batch_size", "steps", "eval_batches", "max_bytes", "block_size"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.d_model % args.heads:
        p.error("--d-model must be divisible by --heads")
    if args.png and not have_matplotlib():
        print("(matplotlib not installed: no PNG)")
        args.png = False
    if args.threads:
        from ._core import set_num_threads
        set_num_threads(args.threads)

    t0 = time.perf_counter()
    corpus = Corpus.from_file(args.corpus, max_bytes=args.max_bytes) if args.corpus \
        else default_corpus(max_bytes=args.max_bytes)
    if corpus.val.size < args.seq_len + 1:
        p.error(f"the corpus ({len(corpus)} bytes) is too small for --seq-len {args.seq_len}: its "
                f"validation split (the last 10%) needs {args.seq_len + 1} bytes")
    unigram = corpus.unigram_loss("val")
    print(f"corpus: {corpus}")
    print(f"stacks: {args.layers} blocks, d_model {args.d_model}, {args.heads} heads; {args.steps} steps "
          f"of {args.batch_size}x{args.seq_len} tokens, lr {args.lr:g}, seed {args.seed}\n")
    results = []
    for name in stacks:
        results.append(run_stack(name, corpus, n_layers=args.layers, d_model=args.d_model,
                                 n_heads=args.heads, seq_len=args.seq_len, batch_size=args.batch_size,
                                 steps=args.steps, lr=args.lr, block_size=args.block_size,
                                 seed=args.seed, eval_batches=args.eval_batches, progress=args.progress))
    print()
    print(format_table(results, unigram))
    print()
    print(table_legend())
    print(f"\n(losses in nats/byte; unigram baseline = entropy of the validation split's "
          f"byte frequencies; total {time.perf_counter() - t0:.0f} s)")
    if args.png:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "compare.png")
        plot_comparison(results, unigram, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
