"""`python -m stackformer`: train and compare depth wirings (see stackformer.compare);
`python -m stackformer demo`: the random-init demo below. Both run without downloads.

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


def main(argv=None) -> int:
    """`python -m stackformer demo [options]` runs the demo; anything else (including no
    arguments, or `compare [options]`) trains and compares the depth wirings."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["demo"], ["--demo"]):
        return demo(argv[1:])
    if argv[:1] == ["compare"]:
        argv = argv[1:]
    from .compare import main as compare_main
    return compare_main(argv)


if __name__ == "__main__":
    sys.exit(main())
