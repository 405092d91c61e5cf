"""`python -m stackformer`: a small study of the depth wirings (seeds, intervals, matched
parameters; see stackformer.study); `python -m stackformer study --preset NAME`: the papers'
tables at CPU scale; `python -m stackformer compare`: one seed per wiring, the quick look
(stackformer.compare); `python -m stackformer demo`: the random-init demo below. None of them
downloads anything.

The demo, in two parts:
1. Stacking blocks: the same sentence through plain stacks of 1, 2, ... N blocks; how the
   residual stream's RMS grows with depth and block by block head-0 attention patterns.
2. Depth wiring: for one deep random-init stack, stream RMS across depth for plain residuals
   vs Full and Block Attention Residuals, and how much attention MoDA heads put on depth.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .config import Config
from .model import Model
from .plotting import have_matplotlib, plot_attention_grid, plot_rms_curves, text_heatmap

SENTENCE = "the quick brown fox jumps over the lazy dog"


def _base(args, **kw) -> Config:
    c = dict(vocab_size=256, d_model=args.d_model, n_heads=args.heads, n_layers=args.layers,
             max_seq_len=256, norm_position=args.norm)
    c.update(kw)
    return Config(**c)


def stacking(args, tokens: np.ndarray, text: str) -> None:
    print(f"== 1. Stacking blocks: plain {args.norm}-norm stacks of 1..{args.layers} blocks ==")
    print(f"input: {text!r} ({tokens.shape[1]} byte tokens), d_model={args.d_model}, seed={args.seed}\n")
    # one deep model: a stack of k blocks is its first k blocks, so block i's pattern and the
    # stream after it are the same whether the stack stops at i or goes on
    model = Model(_base(args), seed=args.seed)
    out = model(tokens, trace=["attention", "hidden", "rms"])
    tr = out.trace
    print("blocks  stream RMS after the stack   growth vs embedding")
    rms0 = float(np.sqrt(np.mean(tr.hidden[0] ** 2)))
    for k in range(1, args.layers + 1):
        r = float(np.sqrt(np.mean(tr.hidden[k] ** 2)))
        print(f"{k:6d}  {r:26.5f}   x{r / rms0:6.2f}  {'#' * int(20 * r / rms0 / max(1, args.layers))}")
    chars = [chr(c) if 32 <= c < 127 else "?" for c in tokens[0]]
    show = min(args.layers, 4)
    print(f"\nhead-0 attention of blocks 0..{show - 1} (row = query, column = key; darker = more)")
    for i in range(show):
        print(f"block {i}:")
        print(text_heatmap(tr.attention[i][0, 0], labels=chars))
    if args.png:
        path = os.path.join(args.out, "stacking_attention.png")
        plot_attention_grid([tr.attention[i][0, 0] for i in range(args.layers)],
                            [f"block {i}" for i in range(args.layers)], chars, path)
        print(f"\nwrote {path}")


def wiring(args, tokens: np.ndarray) -> None:
    depth = args.deep
    print(f"\n== 2. Depth wiring at random init: {depth} blocks ({2 * depth} sublayers) ==")
    variants = {
        "plain": dict(),
        "attnres_full": dict(residual="attnres_full"),
        "attnres_block(S=4)": dict(residual="attnres_block", attnres_block_size=4),
        "moda": dict(moda=True),
    }
    curves = {}
    for name, kw in variants.items():
        model = Model(_base(args, n_layers=depth, **kw), seed=args.seed)
        out = model(tokens, trace=["rms", "depth_mass", "alpha"])
        rms = out.trace.rms
        curves[name] = rms[0::2, 0]  # what each block reads (its attention sublayer's input)
        line = f"{name:20s} input RMS block 0 -> {depth - 1}: {rms[0, 0]:.4f} -> {rms[2 * depth - 2, 0]:.4f}"
        line += f"  (plain running sum: {rms[2 * depth - 1, 2]:.4f})"
        if out.trace.depth_mass is not None:
            dm = out.trace.depth_mass_mean
            line += f"  depth mass: layer 1 {np.nanmean(dm[1]):.2f}, last {np.nanmean(dm[-1]):.2f}"
        print(line)
    print("\nplain: each block reads the running sum of every earlier output, so its scale grows with\n"
          "depth and one early layer's share of it shrinks. AttnRes: each block reads a softmax\n"
          "mixture of the sources (uniform at init, learned later), never their growing sum.")
    if args.png:
        path = os.path.join(args.out, "wiring_rms.png")
        plot_rms_curves(curves, path, ylabel="RMS of block input", xlabel="block",
                        title=f"random init, {depth} blocks")
        print(f"wrote {path}")


def demo(argv=None) -> int:
    """The random-init demo (`python -m stackformer demo [options]`)."""
    p = argparse.ArgumentParser(prog="python -m stackformer demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=SENTENCE, help="input sentence (bytes are tokens)")
    p.add_argument("--layers", type=int, default=6, help="blocks for the stacking demo (default 6)")
    p.add_argument("--deep", type=int, default=24, help="blocks for the wiring demo (default 24)")
    p.add_argument("--d-model", dest="d_model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--norm", choices=["pre", "post"], default="pre", help="norm placement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=".", help="directory for PNGs (default: current)")
    p.add_argument("--no-png", dest="png", action="store_false", help="do not write PNGs")
    args = p.parse_args(argv)
    if args.png and not have_matplotlib():
        print("(matplotlib not installed: text output only)")
        args.png = False
    if args.png:
        os.makedirs(args.out, exist_ok=True)
    tokens = np.frombuffer(args.text.encode("utf-8"), dtype=np.uint8)[None, :]
    if tokens.shape[1] == 0 or tokens.shape[1] > 256:
        p.error("--text must be 1..256 bytes")
    stacking(args, tokens, args.text)
    wiring(args, tokens)
    return 0


MAIN_DESCRIPTION = """\
Train plain, Full AttnRes, Block AttnRes, MoDA, DenseFormer, Hyper-Connections and mHC stacks
with several seeds each, at the same parameter count (d_ff adjusted),
on the same data in the same order per seed with the same budget, and report each wiring's
final validation loss with a 95% t-interval over seeds and its paired difference to plain:
"better" / "worse" when that interval excludes 0, else "no difference shown".

Results go to one SQLite file (--path): stop the run at any time and rerun the same command to
resume; rerunning a finished study prints its report at once. Writes report.md and the figures
next to the store and compare.png into --out.

Other commands:
  python -m stackformer study --preset NAME   the papers' tables (study --list shows them)
  python -m stackformer compare [options]     one seed per wiring, the quick look
  python -m stackformer demo [options]        the random-init stacking/wiring demo
  python -m stackformer explore [--out FILE]  the trace explorer: one self-contained HTML page
"""


def _positive(name):
    def parse(v):
        try:
            x = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an int, got {v!r}") from None
        if x < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {x}")
        return x
    return parse


def _lrs(v):
    try:
        out = [float(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr must be a number or a comma-separated list, got {v!r}") from None
    if not out or any(not (x > 0) for x in out):
        raise argparse.ArgumentTypeError(f"--lr values must be > 0, got {v!r}")
    return out


def _common(p, path_help):
    p.add_argument("--seeds", type=_positive("--seeds"), help="seeds per cell (default: the preset's)")
    p.add_argument("--path", help=path_help)
    p.add_argument("--quick", action="store_true", help="smoke-test sizes: runs in seconds, numbers mean nothing")
    p.add_argument("--workers", type=_positive("--workers"),
                   help="worker processes (default: measure 1-thread runs side by side vs one run on all cores)")
    p.add_argument("--threads", type=_positive("--threads"), help="compute threads per run (default: cores / workers)")
    p.add_argument("--no-png", dest="png", action="store_false", help="do not write PNG figures")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (it is also off when stderr is not a terminal)")


def build_main_parser() -> argparse.ArgumentParser:
    from .study.presets import main_rows
    names = [n for n, _, _ in main_rows()]
    p = argparse.ArgumentParser(prog="python -m stackformer", description=MAIN_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, "study directory (store, report, figures); default ./stackformer-study "
               "(with --quick: a temporary one)")
    p.add_argument("--out", default=".", help="directory for compare.png (default: current)")
    p.add_argument("--stacks", help=f"comma-separated subset of {','.join(names)} (default: all that exist)")
    p.add_argument("--layers", type=_positive("--layers"), help="blocks per stack (default 6; --quick 2)")
    p.add_argument("--d-model", dest="d_model", type=_positive("--d-model"), help="width (default 64; --quick 32)")
    p.add_argument("--heads", type=_positive("--heads"), help="attention heads (default width/16)")
    p.add_argument("--seq-len", dest="seq_len", type=_positive("--seq-len"), help="tokens per sequence (default 64)")
    p.add_argument("--batch-size", dest="batch_size", type=_positive("--batch-size"), help="sequences per step (default 16)")
    p.add_argument("--steps", type=_positive("--steps"), help="training steps per run (default 300; --quick 20)")
    p.add_argument("--lr", type=_lrs, help="peak learning rate, or a comma-separated list (an lr axis; default 3e-3)")
    p.add_argument("--block-size", dest="block_size", type=_positive("--block-size"), default=4,
                   help="Block AttnRes block size S in sublayers (default 4)")
    p.add_argument("--corpus", metavar="FILE", help="train on this file (default: the Python standard library's source)")
    p.add_argument("--max-bytes", dest="max_bytes", type=_positive("--max-bytes"), help="read at most this many corpus bytes")
    p.add_argument("--eval-batches", dest="eval_batches", type=_positive("--eval-batches"),
                   help="fixed validation batches of the final metric (default 16)")
    p.add_argument("--seed", type=int, default=0, help="first seed (seeds are seed, seed+1, ...; default 0)")
    p.add_argument("--no-match", dest="match", action="store_false",
                   help="do not match parameters (default: d_ff adjusted to plain's parameter count)")
    p.add_argument("--equal-flops", dest="equal_flops", action="store_true",
                   help="scale each wiring's steps to plain's training FLOPs (default: same steps and tokens)")
    return p


def _finish(p, spec, args, default_path, copy_compare_to=None) -> int:
    import shutil
    import tempfile
    from . import study
    tmp = None
    path = args.path
    if path is None:
        if args.quick:
            tmp = tempfile.mkdtemp(prefix="stackformer-quick-")
            path = tmp
        else:
            path = default_path
    png = args.png
    if png and not have_matplotlib():
        print("(matplotlib not installed: no PNG figures)")
        png = False
    workers = args.workers
    if workers is None and args.quick:
        workers = 1  # seconds of work: starting processes would cost more than it saves
    try:
        res = study.run(spec, path, workers=workers, threads=args.threads, progress=args.progress, png=png)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as e:
        p.error(str(e))
    try:
        if copy_compare_to is not None and png:
            src = os.path.join(os.path.dirname(res.report_path), "compare.png")
            if os.path.exists(src):
                os.makedirs(copy_compare_to, exist_ok=True)
                dst = os.path.join(copy_compare_to, "compare.png")
                if os.path.abspath(src) != os.path.abspath(dst):
                    shutil.copyfile(src, dst)
                print(f"wrote {dst}")
        if tmp is None:
            print(f"report: {res.report_path} (store: {res.store_path})")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main_job(argv=None) -> int:
    """`python -m stackformer [options]`: the small study (see MAIN_DESCRIPTION)."""
    import dataclasses
    from .study import presets
    from .study.spec import Wiring
    p = build_main_parser()
    args = p.parse_args(argv)
    spec = presets.quick() if args.quick else presets.main_job()
    rows = presets.main_rows(args.block_size)
    names = [n for n, _, _ in rows]
    if args.stacks is not None:
        want = [s.strip() for s in args.stacks.split(",") if s.strip()]
        bad = [s for s in want if s not in names]
        if bad or not want:
            p.error(f"--stacks: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(names)}")
    else:
        want = names
    chosen = [(n, label, o) for n, label, o in rows if n in want]
    wirings, skipped = presets._rows([(label, o) for _, label, o in chosen], {})
    if not wirings:
        p.error("--stacks: none of " + ", ".join(want) + " is available in this build's Config")
    kw = dict(wirings=wirings, skipped=skipped, baseline=None, match_params=args.match,
              equal="flops" if args.equal_flops else "tokens")
    if args.layers is not None:
        kw["depths"] = (args.layers,)
    if args.d_model is not None:
        kw["widths"] = (args.d_model,)
    width = kw.get("widths", spec.widths)[0]
    if args.heads is not None:
        if width % args.heads:
            p.error(f"--d-model ({width}) must be divisible by --heads ({args.heads})")
        kw["base"] = dict(spec.base, n_heads=args.heads)
    for name in ("seq_len", "batch_size", "steps"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.lr is not None:
        kw["lrs"] = tuple(args.lr)
    if args.eval_batches is not None:
        kw["final_eval_batches"] = args.eval_batches
    if args.max_bytes is not None:
        kw["corpus_max_bytes"] = args.max_bytes
    if args.corpus is not None:
        kw["corpus_file"] = os.path.abspath(args.corpus)
        if not os.path.isfile(args.corpus):
            p.error(f"--corpus: no such file {args.corpus!r}")
    n = args.seeds if args.seeds is not None else (spec.seed_list()[-1] + 1)
    if args.seed < 0:
        p.error("--seed must be >= 0")
    kw["seeds"] = list(range(args.seed, args.seed + n))
    spec = dataclasses.replace(spec, **kw)
    if spec.name == "main":
        spec.expected_runtime = f"about {presets._fmt_s(presets.estimate_seconds(spec))} on 2 cores (approximate)"
    return _finish(p, spec, args, os.path.join(args.out, "stackformer-study"), copy_compare_to=args.out)


def study_command(argv=None) -> int:
    """`python -m stackformer study [options]`: run a preset study."""
    from .study import presets
    p = argparse.ArgumentParser(prog="python -m stackformer study", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Run a study preset: a grid of wirings x depths x widths x lrs x seeds "
                                            "with intervals and paired differences (docs/STUDY.md). Presets:\n"
                                + "\n".join(f"  {n:18s} {(presets.PRESETS[n].__doc__ or '').strip().splitlines()[0]}"
                                            for n in presets.preset_names()))
    p.add_argument("--preset", default="main", choices=presets.preset_names(), help="which study (default main)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the preset's training steps (default 1)")
    p.add_argument("--list", action="store_true", help="list the presets with their sizes and runtimes, then exit")
    _common(p, "study directory (default ./study-PRESET; with --quick a temporary one)")
    args = p.parse_args(argv)
    if not args.scale > 0:
        p.error(f"--scale must be > 0, got {args.scale}")
    if args.list:
        for n in presets.preset_names():
            s = presets.preset(n, args.scale)
            print(f"{n}: {s.description}\n  {len(s.cells())} runs ({len(s.wiring_list())} wirings x depths "
                  f"{list(s.depths)} x {len(s.seed_list())} seeds, {s.steps} steps); {s.expected_runtime}")
            if s.skipped:
                print("  not yet available: " + "; ".join(x for x, _ in s.skipped))
        return 0
    import dataclasses
    spec = presets.preset(args.preset, args.scale)
    if args.quick:
        spec = presets.quick_version(spec)
    if args.seeds is not None:
        spec = dataclasses.replace(spec, seeds=args.seeds)
    print(f"study {spec.name}: {spec.description}; expected runtime {spec.expected_runtime}", file=sys.stderr)
    return _finish(p, spec, args, f"study-{spec.name}")


def main(argv=None) -> int:
    """`python -m stackformer demo|study|compare|explore [options]`; no command (or only options) runs
    the main job's small study."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["demo"], ["--demo"]):
        return demo(argv[1:])
    if argv[:1] == ["study"]:
        return study_command(argv[1:])
    if argv[:1] == ["compare"]:
        from .compare import main as compare_main
        return compare_main(argv[1:])
    if argv[:1] == ["explore"]:
        from .explorer import main as explore_main
        return explore_main(argv[1:])
    return main_job(argv)


if __name__ == "__main__":
    sys.exit(main())
