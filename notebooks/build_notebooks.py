"""Build the tutorial notebooks in this folder from the cell sources below.

The .ipynb files are generated, not edited by hand: change a cell here, then run

    python notebooks/build_notebooks.py          # rewrite the four notebooks (outputs empty)
    python notebooks/build_notebooks.py --check  # exit 1 if a notebook differs from this file

Cell ids are fixed ("nb01-c003", ...) and outputs are empty, so rebuilding an unchanged
notebook gives a byte-identical file and diffs show only real changes.

Every notebook starts with a code cell that reads STACKFORMER_QUICK=1 from the environment and
shrinks its sizes and step counts (CI runs them that way: tests/test_notebooks.py); with the
default settings each runs in a few minutes on a 2-core CPU. They use only stackformer, NumPy
and matplotlib, and every number quoted in their prose is computed and printed by a cell.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))

Cell = Tuple[str, str]   # ("md" | "code", source)


def md(src: str) -> Cell:
    return ("md", src.strip("\n"))


def code(src: str) -> Cell:
    return ("code", src.strip("\n"))


# Shared first lines of every notebook's setup cell.
SETUP = r'''
import os
import re
import time

import numpy as np
import matplotlib.pyplot as plt
import stackformer as sf
from stackformer.plotting import plot_loss_curves

# STACKFORMER_QUICK=1 (set by the test suite) shrinks every size and step count below so the
# notebook runs in seconds; the default settings take a few minutes on a 2-core CPU.
QUICK = os.environ.get("STACKFORMER_QUICK") == "1"
T_START = time.perf_counter()
np.set_printoptions(precision=3, suppress=True, linewidth=110)
plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.titlesize": 10})
'''

FOOTER = r'''
print(f"notebook ran in {time.perf_counter() - T_START:.0f} s "
      f"({'QUICK' if QUICK else 'default'} settings, {sf.get_num_threads()} threads)")
'''


# =============================================================================================
# 01 - stacking blocks
# =============================================================================================
NB01: List[Cell] = [
    md(r'''
# 1 · Stacking blocks

A transformer is a stack of identical blocks; each block is an attention sublayer followed by an
MLP sublayer, and each sublayer *adds* its output to a running sum, the **residual stream**.
This notebook pushes one input through stacks of 1, 2, 3, 4 … blocks and looks at

1. what each block's attention does (head 0, block by block, side by side),
2. how the residual stream's size (RMS) grows with depth,
3. what changes when the norm sits after the residual add (post-norm) instead of before the
   sublayer (pre-norm),
4. how a bidirectional encoder's attention differs from a causal decoder's.

Every model is a byte-level model (one token per byte) trained briefly on the library's default
corpus, the Python standard library's own source code. Nothing is downloaded.
'''),
    code(SETUP + r'''
# --- sizes (QUICK shrinks them) ------------------------------------------------------------
D_MODEL, N_HEADS = (32, 4) if QUICK else (64, 4)
SEQ_LEN, BATCH = (32, 4) if QUICK else (64, 8)
MAX_BLOCKS = 3 if QUICK else 4          # stacks of 1 .. MAX_BLOCKS blocks
DEEP = 4 if QUICK else 8                # blocks of the stack used for the RMS / norm study
STEPS = 25 if QUICK else 300            # training steps per model
POS = "rope"                            # rotary positions: position-based heads are quick to learn
TEXT = "for key, value in items.items():"

corpus = sf.default_corpus(max_bytes=200_000 if QUICK else 2_000_000)
print(corpus)
print(f"QUICK={QUICK}: d_model={D_MODEL}, heads={N_HEADS}, seq_len={SEQ_LEN}, batch={BATCH}, "
      f"steps={STEPS}, stacks of 1..{MAX_BLOCKS} blocks, deep stack {DEEP} blocks")
'''),
    code(r'''
def config(n_blocks, **kw):
    """A byte-level pre-norm decoder of n_blocks blocks (kw overrides any Config field)."""
    return sf.Config(vocab_size=256, d_model=D_MODEL, n_heads=N_HEADS, n_layers=n_blocks,
                     max_seq_len=SEQ_LEN, pos=POS, **kw)


def fit(cfg, steps=STEPS, seed=0, batch_size=BATCH, lr=3e-3):
    """A fresh model trained for `steps` steps on the corpus; returns (model, history)."""
    model = sf.Model(cfg, seed=seed)
    hist = sf.train(model, corpus, steps=steps, batch_size=batch_size, seq_len=SEQ_LEN, lr=lr,
                    seed=seed, eval_batches=4, progress=False)
    return model, hist


tokens = sf.data.encode(TEXT)[None, :]          # (1, T) byte ids
chars = [c if c != " " else "␣" for c in TEXT]  # tick labels
T = tokens.shape[1]
print(f"input: {TEXT!r} -> {T} byte tokens")
'''),
    md(r'''
## 1.1 The same input through 1, 2, 3, 4 … blocks

At initialisation every weight is small (N(0, 0.02)), so queries and keys are nearly
orthogonal to everything and attention is almost **uniform** over the visible keys: in a causal
model, query *t* gives about 1/(t+1) to each of the keys 0 … t. The first cell measures that
directly, with the row entropy of each attention map as a fraction of the uniform entropy
log(t+1) (1.0 = perfectly uniform).
'''),
    code(r'''
def row_entropy_ratio(p, causal=True):
    """Mean over query rows of H(row) / H(uniform over the visible keys)."""
    Tq = p.shape[0]
    h = -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)
    visible = np.arange(1, Tq + 1) if causal else np.full(Tq, p.shape[1])
    keep = visible > 1                      # a single visible key has zero entropy either way
    return float((h[keep] / np.log(visible[keep])).mean())


init_model = sf.Model(config(MAX_BLOCKS), seed=0)
tr = init_model(tokens, trace=["attention"]).trace
for i, a in enumerate(tr.attention):
    ratios = [row_entropy_ratio(a[0, h]) for h in range(N_HEADS)]
    print(f"random init, block {i}: entropy / uniform entropy per head = "
          + ", ".join(f"{r:.4f}" for r in ratios))
'''),
    md(r'''
Uniform attention is not interesting, so the next cell trains a separate stack of each depth
(same seed, same data, same number of steps) and feeds all of them the same input. Row *k* of
the grid is the *k*-block stack; column *i* is its block *i*, head 0. Rows are queries (the
byte being processed), columns are keys (the bytes it reads); the colour scale is 0 … 1 in every
panel.
'''),
    code(r'''
stacks, histories = {}, {}
for k in range(1, MAX_BLOCKS + 1):
    t0 = time.perf_counter()
    stacks[k], histories[k] = fit(config(k))
    print(f"{k}-block stack: {stacks[k].num_params:,} params, val loss "
          f"{histories[k].val_loss[0]:.3f} -> {histories[k].val_loss[-1]:.3f} nats/byte "
          f"({time.perf_counter() - t0:.1f} s)")
print(f"unigram baseline (no context at all): {corpus.unigram_loss():.3f} nats/byte")
'''),
    code(r'''
fig, axes = plt.subplots(MAX_BLOCKS, MAX_BLOCKS, figsize=(3.1 * MAX_BLOCKS + 1, 3.1 * MAX_BLOCKS),
                         squeeze=False, layout="constrained")
for r, k in enumerate(stacks):
    att = stacks[k](tokens, trace=["attention"]).trace.attention
    for c in range(MAX_BLOCKS):
        ax = axes[r, c]
        if c >= k:
            ax.axis("off")
            continue
        im = ax.imshow(att[c][0, 0], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{k}-block stack · block {c}", fontsize=8)
        ax.set_xticks(range(T)); ax.set_xticklabels(chars, fontsize=6)
        ax.set_yticks(range(T)); ax.set_yticklabels(chars, fontsize=6)
        if c == 0:
            ax.set_ylabel("query")
        if r == MAX_BLOCKS - 1 or c == k - 1:
            ax.set_xlabel("key")
fig.colorbar(im, ax=axes, shrink=0.4, label="attention probability")
fig.suptitle(f"Head 0 attention on {TEXT!r}: row k = a k-block stack trained {STEPS} steps")
plt.show()
'''),
    md(r'''
To read the grid without squinting, the next cell summarises every map by three numbers:
the mass on the query's own byte (**self**), on the byte just before it (**prev**), and the
mean distance |t − u| the head looks back, weighted by attention. A "previous byte" head (prev
close to 1) is the classic first thing a byte-level model learns: it lets the next block see
bigrams.
'''),
    code(r'''
def head_stats(p):
    """self / previous-token mass and mean look-back distance of one (T, T) causal map."""
    Tq = p.shape[0]
    t = np.arange(Tq)
    dist = (p * np.abs(t[:, None] - t[None, :Tq])).sum(-1).mean()
    return p[t, t].mean(), p[t[1:], t[1:] - 1].mean(), dist


print(f"{'stack':>6} {'block':>5} {'head':>4} {'self':>6} {'prev':>6} {'look-back':>9}")
summary = {}
for k, model in stacks.items():
    att = model(tokens, trace=["attention"]).trace.attention
    for i in range(k):
        for h in range(N_HEADS):
            s, p, d = head_stats(att[i][0, h])
            summary[(k, i, h)] = (s, p, d)
            if h == 0:
                print(f"{k:6d} {i:5d} {h:4d} {s:6.2f} {p:6.2f} {d:9.2f}")

best = max(summary, key=lambda key: summary[key][1])
print(f"\nmost 'previous byte'-like head overall: stack {best[0]}, block {best[1]}, head {best[2]} "
      f"puts {summary[best][1]:.0%} of its mass on the previous byte")
'''),
    md(r'''
## 1.2 The residual stream grows with depth

In a pre-norm block the stream is `x ← x + Attn(Norm(x))`, then `x ← x + MLP(Norm(x))`. Nothing
ever shrinks it: every sublayer adds a vector, so its RMS grows with depth, while each
sublayer's *own* contribution is computed from a normalised input and stays roughly the same
size. A later sublayer's update is therefore a smaller and smaller fraction of what flows on,
the **dilution** that Attention Residuals (notebook 2) and MoDA (notebook 3) address.

`trace.rms` records, for every sublayer *k* (k = 2i: attention of block i, k = 2i+1: its MLP),
the RMS of its input, of its output and of the stream after it. The cell below uses a deeper
stack, pre-norm and post-norm, at initialisation and after training.
'''),
    code(r'''
deep = {}
for pos in ("pre", "post"):
    cfg = config(DEEP, norm_position=pos)
    deep[(pos, "init")] = (sf.Model(cfg, seed=0), None)
    t0 = time.perf_counter()
    deep[(pos, "trained")] = fit(cfg)
    h = deep[(pos, "trained")][1]
    print(f"{pos}-norm {DEEP}-block stack: val loss {h.val_loss[0]:.3f} -> {h.val_loss[-1]:.3f} "
          f"({time.perf_counter() - t0:.1f} s)")

# a few validation windows as the probe input: RMS over more tokens is steadier
probe_x, _ = corpus.batch(8, SEQ_LEN, np.random.default_rng(1), split="val")
rms = {key: m(probe_x, trace=["rms"]).trace.rms for key, (m, _) in deep.items()}
L = 2 * DEEP
sub_names = [f"{'attn' if k % 2 == 0 else 'mlp'}{k // 2}" for k in range(L)]
'''),
    code(r'''
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
styles = {("pre", "init"): ("C0", "--"), ("pre", "trained"): ("C0", "-"),
          ("post", "init"): ("C3", "--"), ("post", "trained"): ("C3", "-")}
for key, r in rms.items():
    color, ls = styles[key]
    label = f"{key[0]}-norm, {key[1]}"
    # stream RMS entering sublayer 0 (the embedding), then after every sublayer
    stream = np.concatenate([[r[0, 0]], r[:L, 2]])
    axes[0].plot(range(L + 1), stream, color=color, ls=ls, marker="o", ms=3, label=label)
    axes[1].plot(range(L), r[:L, 1] / stream[:L], color=color, ls=ls, marker="o", ms=3, label=label)
axes[0].set_yscale("log")
axes[0].set_xticks(range(L + 1)); axes[0].set_xticklabels(["emb"] + sub_names, rotation=90, fontsize=7)
axes[0].set_ylabel("RMS of the residual stream")
axes[0].set_title("stream size after each sublayer")
axes[1].set_yscale("log")
axes[1].set_xticks(range(L)); axes[1].set_xticklabels(sub_names, rotation=90, fontsize=7)
axes[1].set_ylabel("RMS(sublayer output) / RMS(stream it reads)")
axes[1].set_title("how much each sublayer can change the stream")
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
'''),
    code(r'''
for key, r in rms.items():
    stream = np.concatenate([[r[0, 0]], r[:L, 2]])
    rel = r[:L, 1] / stream[:L]
    print(f"{key[0]:>4}-norm {key[1]:>7}: stream RMS {stream[0]:.3f} (embedding) -> {stream[-1]:.3f} "
          f"(after {L} sublayers, x{stream[-1] / stream[0]:.1f}); update/stream ratio "
          f"first sublayer {rel[0]:.3f}, last {rel[-1]:.3f}")
'''),
    md(r'''
Two things to read off the plots and the printout:

* **Pre-norm**: the stream tends to grow with every sublayer (each one adds to it), and training
  makes the sublayers' outputs, and so the growth, larger: compare the dashed and solid blue
  lines and the printed factors. The right panel is the dilution: the ratio of what a sublayer
  writes to what is already there.
* **Post-norm** (`x ← Norm(x + Attn(x))`, the original 2017 layout) renormalises the stream after
  every sublayer, so its RMS is pinned near the norm's gain (about 1) from the first sublayer on:
  nothing accumulates, but every earlier contribution is rescaled at every step, and gradients
  have to pass through every norm on the way down. That is why deep post-norm stacks are known
  to need learning-rate warm-up and are often harder to train. The loss curves below compare
  the two layouts on the same data, seed and step count: one short run at one learning rate,
  so a sample rather than a verdict.
'''),
    code(r'''
fig, ax = plt.subplots(figsize=(6.5, 3.6))
plot_loss_curves(ax, {f"{pos}-norm": deep[(pos, "trained")][1] for pos in ("pre", "post")},
                 {"pre-norm": "C0", "post-norm": "C3"}, corpus.unigram_loss(), window=10)
ax.set_title(f"{DEEP}-block stacks: pre-norm vs post-norm")
ax.grid(alpha=0.3); ax.legend(fontsize=8)
plt.show()
for pos in ("pre", "post"):
    h = deep[(pos, "trained")][1]
    print(f"{pos}-norm: final validation loss {h.val_loss[-1]:.3f} nats/byte, "
          f"mean gradient norm {np.mean(h.grad_norm):.3f}")
'''),
    md(r'''
## 1.3 Encoder vs decoder

The only architectural difference between a decoder and an encoder here is the mask:
`causal=True` hides every key to the right of the query, `causal=False` lets every byte see the
whole window. They are trained differently too: the decoder predicts the next byte, the encoder
fills in bytes replaced by a mask byte (15 % of positions, `sf.data.mask_tokens`, which
`sf.train` uses automatically for `causal=False`). Both stacks below have the same size and
training budget; both get a larger batch and learning rate than above, because the masked-byte
objective has targets at only 15 % of positions and needs more signal per step to grow sharp
heads in a short run.
'''),
    code(r'''
N_ENC = min(2, MAX_BLOCKS)
dec_model, dec_hist = fit(config(N_ENC, causal=True), batch_size=2 * BATCH, lr=1e-2)
enc_model, enc_hist = fit(config(N_ENC, causal=False), batch_size=2 * BATCH, lr=1e-2)
print(f"decoder: next-byte loss {dec_hist.val_loss[-1]:.3f}; encoder: masked-byte loss "
      f"{enc_hist.val_loss[-1]:.3f} (different tasks, so the numbers are not comparable)")

fig, axes = plt.subplots(2 * N_ENC, N_HEADS, figsize=(3.0 * N_HEADS + 1, 3.0 * 2 * N_ENC),
                         squeeze=False, layout="constrained")
pairs = (("decoder", dec_model), ("encoder", enc_model))
for m, (name, model) in enumerate(pairs):
    att = model(tokens, trace=["attention"]).trace.attention
    for i in range(N_ENC):
        r = 2 * i + m
        for h in range(N_HEADS):
            ax = axes[r, h]
            im = ax.imshow(att[i][0, h], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"{name} · block {i} · head {h}", fontsize=8)
            ax.set_xticks(range(T)); ax.set_xticklabels(chars, fontsize=5)
            ax.set_yticks(range(T)); ax.set_yticklabels(chars, fontsize=5)
fig.colorbar(im, ax=axes, shrink=0.3, label="attention probability")
fig.suptitle(f"decoder (causal) vs encoder (bidirectional), {N_ENC} blocks each, on {TEXT!r}")
plt.show()
'''),
    code(r'''
def future_mass(p):
    """Share of attention mass on keys to the right of the query, for a (T, T) map."""
    return float(np.triu(p, k=1).sum(-1).mean())


for name, model in (("decoder", dec_model), ("encoder", enc_model)):
    att = model(tokens, trace=["attention"]).trace.attention
    for i in range(N_ENC):
        fm = [future_mass(att[i][0, h]) for h in range(N_HEADS)]
        print(f"{name} block {i}: mass on later bytes per head = " + ", ".join(f"{v:.2f}" for v in fm))

# the encoder in action: hide a few bytes and let it fill them in
masked = tokens.copy()
hide = np.arange(3, T, 7)
masked[0, hide] = sf.data.MASK_ID
pred = enc_model(masked).logits[0].argmax(-1)
shown = "".join("_" if i in set(hide.tolist()) else c for i, c in enumerate(TEXT))
guess = "".join(sf.data.decode([pred[i]]) if i in set(hide.tolist()) else c for i, c in enumerate(TEXT))
n_right = int((pred[hide] == tokens[0, hide]).sum())
print(f"\nmasked input : {shown!r}\nencoder fills: {guess!r}  ({n_right}/{len(hide)} hidden bytes right)")
'''),
    md(r'''
The decoder's maps are lower-triangular by construction (its "mass on later bytes" is exactly
zero), while the encoder's heads are free to look both ways and, as the printout shows, do put
mass on bytes to the right. Filling in a masked byte needs both sides of it, which is why
encoders exist at all.

**Next:** notebook 2 makes the stack deep and replaces the fixed "add everything" residual with
a learned, per-layer choice of which earlier layers to read (Attention Residuals).
'''),
    code(FOOTER),
]


# =============================================================================================
# 02 - plain vs Attention Residuals
# =============================================================================================
NB02: List[Cell] = [
    md(r'''
# 2 · Plain residuals vs Attention Residuals

A plain residual stack hands every sublayer the *sum* of everything before it,
`h_k = v_0 + v_1 + … + v_k` (embedding plus every earlier sublayer's output), with fixed unit
weights. **Attention Residuals** (AttnRes) replace that sum by a learned softmax mixture
`h_k = Σ_i α_{k,i} v_i`: each sublayer has a pseudo-query `w_k`, scores every earlier output by
`w_k · RMSNorm(v_i)` and reads the mixture. The pseudo-queries start at zero, so at
initialisation every sublayer reads the plain *average* of its sources.

* **Full AttnRes** lets sublayer *k* attend over all of `v_0 … v_k`.
* **Block AttnRes** (block size S) sums the outputs inside each group of S sublayers and attends
  over those group sums plus the running sum of the current group: far fewer sources.

This notebook trains a plain, a Full AttnRes and a Block AttnRes stack of the same size on the
same data and looks at the loss, at how output sizes and gradients are spread across depth, and
at which earlier layers each layer learns to read; then (2.4) the wirings AttnRes competes
with, DenseFormer, Hyper-Connections and mHC, beside them.
'''),
    code(SETUP + r'''
# --- sizes (QUICK shrinks them) ------------------------------------------------------------
N_BLOCKS = 3 if QUICK else 12           # blocks; 2 sublayers each (12 blocks = 24 sublayers)
D_MODEL, N_HEADS = (32, 4) if QUICK else (64, 4)
SEQ_LEN, BATCH = (32, 4) if QUICK else (64, 8)
STEPS = 20 if QUICK else 300
BLOCK_SIZE = 2 if QUICK else 4          # Block AttnRes: sublayers per block
POS = "rope"                            # rotary positions (all stacks)
SNAP_STEPS = sorted({0, STEPS // 10, STEPS // 3, STEPS})   # when to photograph the alphas

corpus = sf.default_corpus(max_bytes=200_000 if QUICK else 2_000_000)
L = 2 * N_BLOCKS
print(corpus)
print(f"QUICK={QUICK}: {N_BLOCKS} blocks = {L} sublayers, d_model={D_MODEL}, seq_len={SEQ_LEN}, "
      f"batch={BATCH}, steps={STEPS}, Block AttnRes block size {BLOCK_SIZE}")
'''),
    code(r'''
STACKS = {
    "plain": dict(),
    "Full AttnRes": dict(residual="attnres_full"),
    f"Block AttnRes (S={BLOCK_SIZE})": dict(residual="attnres_block", attnres_block_size=BLOCK_SIZE),
}
COLORS = dict(zip(STACKS, ["C0", "C1", "C2"]))
sub_names = [f"{'attn' if k % 2 == 0 else 'mlp'}{k // 2}" for k in range(L)]

# fixed batches, the same for every stack: one to trace, one to measure gradients on
probe_x, _ = corpus.batch(8, SEQ_LEN, np.random.default_rng(123), split="val")
grad_x, grad_y = corpus.batch(16, SEQ_LEN, np.random.default_rng(321), split="val")


def sublayer_grad_norms(model):
    """(L,) gradient norm of each sublayer's tensors (its norm, projections and AttnRes query)."""
    out = np.zeros(L)
    for name, g in model.grads.items():
        m = re.match(r"layers\.(\d+)\.(attn|mlp)", name)
        if m:
            out[2 * int(m.group(1)) + (m.group(2) == "mlp")] += np.square(g, dtype=np.float64).sum()
    return np.sqrt(out)


def measure(model):
    """Everything we plot about one state of a model, from the fixed probe batches."""
    tr = model(probe_x, trace=["rms", "alpha"]).trace
    model.forward_backward(grad_x, grad_y)          # gradients only; no update
    snap = {"rms": tr.rms, "grad": sublayer_grad_norms(model)}
    if tr.alpha is not None:
        snap["alpha"] = tr.alpha_matrix
        # effective number of sources each aggregation reads, exp(entropy), averaged over tokens
        snap["eff"] = np.array([np.exp(-(a * np.log(np.clip(a, 1e-12, None))).sum(-1)).mean()
                                for a in tr.alpha])
        snap["labels"] = tr.alpha_labels
    return snap
'''),
    md(r'''
## 2.1 Train the three stacks

Same seed, same batches in the same order, same schedule (`sf.train`: AdamW, warm-up, cosine
decay). A callback photographs every stack at the steps in `SNAP_STEPS`.
'''),
    code(r'''
models, hists, snaps = {}, {}, {}
for name, kw in STACKS.items():
    cfg = sf.Config(vocab_size=256, d_model=D_MODEL, n_heads=N_HEADS, n_layers=N_BLOCKS,
                    max_seq_len=SEQ_LEN, pos=POS, **kw)
    model = sf.Model(cfg, seed=0)
    snaps[name] = {0: measure(model)}

    def photograph(h, model=model, name=name):
        if h.step[-1] in SNAP_STEPS:
            snaps[name][h.step[-1]] = measure(model)

    t0 = time.perf_counter()
    hists[name] = sf.train(model, corpus, steps=STEPS, batch_size=BATCH, seq_len=SEQ_LEN,
                           seed=0, eval_batches=4, progress=False, callback=photograph)
    models[name] = model
    print(f"{name:>22}: {model.num_params:,} params, val loss {hists[name].val_loss[0]:.3f} -> "
          f"{hists[name].val_loss[-1]:.3f}, {time.perf_counter() - t0:.0f} s")
'''),
    code(r'''
fig, ax = plt.subplots(figsize=(7, 3.8))
plot_loss_curves(ax, hists, COLORS, corpus.unigram_loss())  # zoomed on where the stacks differ
ax.set_title(f"{L}-sublayer stacks on {corpus.name}")
ax.grid(alpha=0.3); ax.legend(fontsize=7, ncol=2)
plt.show()

best = min(hists, key=lambda n: hists[n].val_loss[-1])
for name, h in hists.items():
    print(f"{name:>22}: final validation loss {h.val_loss[-1]:.3f} "
          f"({h.val_loss[-1] - hists['plain'].val_loss[-1]:+.3f} vs plain)")
print(f"lowest validation loss after {STEPS} steps: {best}")
'''),
    md(r'''
## 2.2 Dilution across depth

Three views of the same question, at initialisation (dashed) and after training (solid), one
point per sublayer:

* **what each sublayer reads**: the RMS of its input. For the plain stack that is the residual
  stream, which only grows; an AttnRes input is a convex mixture of earlier outputs, so it
  cannot grow past the largest of them.
* **what each sublayer writes**: the RMS of its output.
* **how much gradient reaches it**: the norm of the gradient of its parameters on a fixed batch.
  In a plain pre-norm stack every gradient that reaches the stream through a norm is divided by
  the stream's RMS at that point, so as the stream grows the gradient is shared out unevenly
  across depth; the printout puts a number (max/min) on how evenly each wiring spreads it.
'''),
    code(r'''
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
for name in STACKS:
    for step, ls in ((0, "--"), (STEPS, "-")):
        s = snaps[name][step]
        lab = f"{name}, {'init' if step == 0 else f'step {step}'}"
        axes[0].plot(range(L), s["rms"][:L, 0], ls=ls, color=COLORS[name], marker=".", label=lab)
        axes[1].plot(range(L), s["rms"][:L, 1], ls=ls, color=COLORS[name], marker=".", label=lab)
        axes[2].plot(range(L), s["grad"], ls=ls, color=COLORS[name], marker=".", label=lab)
titles = ["RMS of what each sublayer reads", "RMS of what each sublayer writes",
          "gradient norm of each sublayer's parameters"]
for ax, title in zip(axes, titles):
    ax.set_yscale("log"); ax.set_title(title)
    ax.set_xticks(range(L)); ax.set_xticklabels(sub_names, rotation=90, fontsize=6)
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=7)
fig.tight_layout()
plt.show()
'''),
    code(r'''
print(f"{'stack':>22} {'input RMS last/first':>21} {'output/input, last':>19} {'grad max/min':>13}")
for name in STACKS:
    s = snaps[name][STEPS]
    inp, out, g = s["rms"][:L, 0], s["rms"][:L, 1], s["grad"]
    print(f"{name:>22} {inp[-1] / inp[0]:21.1f} {out[-1] / inp[-1]:19.3f} {g.max() / g.min():13.1f}")
print("\ninput RMS last/first: how much larger the last sublayer's input is than the first's;"
      "\noutput/input, last : how much the last sublayer can change what it reads;"
      "\ngrad max/min       : how unevenly the gradient is spread over the sublayers (1 = even).")
'''),
    md(r'''
## 2.3 Which earlier layers does each layer read?

`trace.alpha_matrix` averages each sublayer's depth-attention weights over tokens: row *k* is
sublayer *k* (the last row, `out`, is the aggregation that feeds the output head), column *i* is
source *i*. For Full AttnRes the sources are `emb` (the embedding, `v0`) and every earlier
sublayer's output; for Block AttnRes they are the embedding, the completed block sums `b1, b2, …`
and, in the last column of each row, the running sum of the sublayer's own block. Empty cells
are sources a row cannot see.
'''),
    code(r'''
attn_stacks = [n for n in STACKS if n != "plain"]


def source_names(name):
    if "Full" in name:
        return ["emb"] + sub_names
    n_src = snaps[name][STEPS]["alpha"].shape[1]
    return ["emb"] + [f"b{j}" for j in range(1, n_src)]


def alpha_heatmap(ax, a, name, title, labels=True):
    cmap = plt.get_cmap("magma").copy()
    cmap.set_bad("#e8e8e8")
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    src = source_names(name)
    ax.set_xticks(range(len(src))); ax.set_xticklabels(src, rotation=90, fontsize=6)
    ax.set_yticks(range(L + 1)); ax.set_yticklabels(sub_names + ["out"], fontsize=6)
    if labels:
        ax.set_xlabel("source (earlier layer)"); ax.set_ylabel("reading sublayer")
    ax.set_title(title)
    return im


fig, axes = plt.subplots(1, len(attn_stacks), figsize=(6.5 * len(attn_stacks), 5.8), squeeze=False,
                         layout="constrained")
for ax, name in zip(axes[0], attn_stacks):
    im = alpha_heatmap(ax, snaps[name][STEPS]["alpha"], name, f"{name}: α after {STEPS} steps")
fig.colorbar(im, ax=axes, shrink=0.7, label="mean depth-attention weight α")
plt.show()
'''),
    code(r'''
for name in attn_stacks:
    a = snaps[name][STEPS]["alpha"]
    eff = snaps[name][STEPS]["eff"]
    n_src = np.sum(~np.isnan(a), axis=1)
    top = np.nanargmax(a, axis=1)
    src = source_names(name)
    emb_mass = a[1:, 0].mean()
    uniform_emb = np.mean(1 / n_src[1:])
    recent = np.mean(top[1:] == n_src[1:] - 1)
    print(f"{name}:")
    print(f"  mean weight on the embedding (rows 1..{L}): {emb_mass:.2f} (uniform reading would give {uniform_emb:.2f})")
    print(f"  rows whose largest weight is the most recent source: {recent:.0%}")
    print(f"  effective number of sources read per token, mean over rows: {eff.mean():.2f} "
          f"(of {n_src.mean():.1f} visible on average)")
    print(f"  the output aggregation reads most from {src[top[-1]]!r} (α = {a[-1, top[-1]]:.2f})")
'''),
    md(r'''
### How the weights move during training

At step 0 every row is uniform (the pseudo-queries start at zero). The snapshots show the
weights sharpening as training goes on; the line plot tracks the *effective number of sources*
(exp of the entropy of α, averaged over tokens) per sublayer: at step 0 it equals the number of
visible sources, and it drops as a sublayer commits to a few of them.
'''),
    code(r'''
steps_shown = [s for s in SNAP_STEPS if s in snaps[attn_stacks[0]]]
fig, axes = plt.subplots(len(attn_stacks), len(steps_shown), figsize=(3.7 * len(steps_shown) + 1,
                         4.2 * len(attn_stacks)), squeeze=False, layout="constrained")
for r, name in enumerate(attn_stacks):
    for c, step in enumerate(steps_shown):
        im = alpha_heatmap(axes[r, c], snaps[name][step]["alpha"], name, f"{name}, step {step}",
                           labels=False)
    axes[r, 0].set_ylabel("reading sublayer")
fig.colorbar(im, ax=axes, shrink=0.6, label="mean α")
fig.suptitle("depth-attention weights during training (columns: sources, rows: readers)")
plt.show()

fig, axes = plt.subplots(1, len(attn_stacks), figsize=(6.5 * len(attn_stacks), 3.4), squeeze=False)
for ax, name in zip(axes[0], attn_stacks):
    for j, step in enumerate(steps_shown):
        ax.plot(range(L + 1), snaps[name][step]["eff"], marker=".",
                color=plt.get_cmap("viridis")(j / max(1, len(steps_shown) - 1)), label=f"step {step}")
    ax.set_xticks(range(L + 1)); ax.set_xticklabels(sub_names + ["out"], rotation=90, fontsize=6)
    ax.set_ylabel("effective number of sources"); ax.set_title(name)
    ax.grid(alpha=0.3); ax.legend(fontsize=7)
fig.tight_layout()
plt.show()
for name in attn_stacks:
    print(name + ": mean effective sources " + ", ".join(
        f"step {s}: {snaps[name][s]['eff'].mean():.2f}" for s in steps_shown))
'''),
    md(r"""
## 2.4 The wirings AttnRes competes with: DenseFormer, Hyper-Connections, mHC

The Attention Residuals paper measures itself against two other ways of wiring depth, and
Hyper-Connections is the one those build on. Each is one `residual=` name here (the equations,
sources and every choice made are in `docs/WIRINGS.md`):

* **DenseFormer** (`residual="denseformer"`): after every block a *depth-weighted average* of
  the embedding and all block outputs so far, with learned scalar weights that start as the
  identity (weight 1 on the newest, 0 elsewhere), so the model starts as a plain stack.
* **Hyper-Connections** (`residual="hyper_connections"`): the stream is widened to `hc_expansion`
  copies; each sublayer reads a learned mixture of the copies and writes its output back into
  every copy with learned weights, while the copies also mix among themselves. Initialised so
  the model starts equivalent to the pre-norm stack; `hc_dynamic=True` makes the weights
  input-dependent.
* **mHC** (`residual="mhc"`): Hyper-Connections whose copy-mixing matrix is projected onto the
  doubly-stochastic matrices by Sinkhorn-Knopp iterations (so it can only average the copies,
  never amplify them), with input-dependent read and write maps.

They train on the same data, in the same order, with the same schedule as the three stacks
above. `trace.alpha` records their depth-mixing weights too (DenseFormer: the DWA weights over
`x0..xi` before each block; HC/mHC: the read weights over the copies), and `trace.copy_rms` the
size of every copy of the stream through depth.
"""),
    code(r"""
COMPETITORS = {
    "DenseFormer": dict(residual="denseformer"),
    "Hyper-Connections (n=4)": dict(residual="hyper_connections"),
    "mHC (n=4)": dict(residual="mhc"),
}
COLORS.update(zip(COMPETITORS, ["C3", "C4", "C5"]))
traces = {}
for name, kw in COMPETITORS.items():
    cfg = sf.Config(vocab_size=256, d_model=D_MODEL, n_heads=N_HEADS, n_layers=N_BLOCKS,
                    max_seq_len=SEQ_LEN, pos=POS, **kw)
    model = sf.Model(cfg, seed=0)
    t0 = time.perf_counter()
    hists[name] = sf.train(model, corpus, steps=STEPS, batch_size=BATCH, seq_len=SEQ_LEN,
                           seed=0, eval_batches=4, progress=False)
    models[name] = model
    traces[name] = model(probe_x, trace=["rms", "alpha"]).trace
    print(f"{name:>24}: {model.num_params:,} params, val loss {hists[name].val_loss[0]:.3f} -> "
          f"{hists[name].val_loss[-1]:.3f}, {time.perf_counter() - t0:.0f} s")

print()
base = hists["plain"].val_loss[-1]
for name, h in hists.items():
    print(f"{name:>24}: {models[name].num_params:>9,} params, final validation loss "
          f"{h.val_loss[-1]:.3f} ({h.val_loss[-1] - base:+.3f} vs plain)")
print("\nOne seed each: differences this size are within seed-to-seed noise at this budget. "
      "`python -m stackformer` runs these wirings with several seeds and gives intervals.")
"""),
    code(r"""
fig, axes = plt.subplots(1, 3, figsize=(15, 3.9))
plot_loss_curves(axes[0], hists, COLORS, corpus.unigram_loss())
axes[0].set_title("all six wirings"); axes[0].grid(alpha=0.3); axes[0].legend(fontsize=6, ncol=2)

# DenseFormer: the DWA before block i mixes x0 (embedding) .. xi (block outputs); rows k = 2i
a = traces["DenseFormer"].alpha_matrix[0::2]           # blocks 0..n-1, then the head's read
cmap = plt.get_cmap("magma").copy(); cmap.set_bad("#e8e8e8")
im = axes[1].imshow(np.ma.masked_invalid(a), cmap=cmap, aspect="auto")
axes[1].set_xticks(range(a.shape[1])); axes[1].set_xticklabels(["emb"] + [f"x{j}" for j in range(1, a.shape[1])], fontsize=6, rotation=90)
axes[1].set_yticks(range(a.shape[0])); axes[1].set_yticklabels([f"block{i}" for i in range(N_BLOCKS)] + ["out"], fontsize=6)
axes[1].set_title(f"DenseFormer: DWA weights after {STEPS} steps"); fig.colorbar(im, ax=axes[1])

# Hyper-Connections / mHC: the RMS of every copy of the stream entering each sublayer
for name, ls in (("Hyper-Connections (n=4)", "-"), ("mHC (n=4)", "--")):
    cr = traces[name].copy_rms
    for j in range(cr.shape[1]):
        axes[2].plot(range(L + 1), cr[:, j], ls=ls, color=COLORS[name], alpha=0.5 + 0.5 * j / cr.shape[1],
                     label=f"{name}, copy {j + 1}" if j in (0, cr.shape[1] - 1) else None)
axes[2].plot(range(L + 1), snaps["plain"][STEPS]["rms"][:, 0], color=COLORS["plain"], label="plain stream")
axes[2].set_yscale("log"); axes[2].set_xticks(range(L + 1))
axes[2].set_xticklabels(sub_names + ["out"], rotation=90, fontsize=6)
axes[2].set_title("RMS of each copy of the stream"); axes[2].grid(alpha=0.3); axes[2].legend(fontsize=6)
fig.tight_layout()
plt.show()

for name in ("Hyper-Connections (n=4)", "mHC (n=4)"):
    reads = np.array([a.mean(axis=(0, 1)) for a in traces[name].alpha[:L]])   # (L, n)
    print(f"{name}: mean read weight per copy over the sublayers: {reads.mean(0)}; "
          f"copy RMS at the head: {traces[name].copy_rms[L]}")
"""),
    md(r'''
**Reading the results.** The plain stack's inputs grow along the depth axis while what each
sublayer writes stays roughly the same size, so late sublayers make relatively small changes;
AttnRes inputs stay on the scale of single outputs because they are mixtures, not sums. Whether
that buys a lower loss after a short CPU run is what the loss table above measures, for this
size and budget only; the heatmaps show *what* the depth attention learned to prefer.

**Next:** notebook 3 puts depth into attention itself (MoDA): heads read keys and values that
earlier layers wrote at the same position.
'''),
    code(FOOTER),
]


# =============================================================================================
# 03 - MoDA
# =============================================================================================
NB03: List[Cell] = [
    md(r'''
# 3 · Mixture-of-Depths Attention (MoDA)

In an ordinary block, a head at position *t* attends over the keys and values of positions
0 … t, all computed by *this* layer. With **MoDA** (`Config(moda=True)`), block *l*'s heads also
see **depth slots**: keys/values that earlier sublayers wrote *at position t* (every attention
sublayer writes its own k, v; every MLP writes a projection of its input through
`depth_k_proj` / `depth_v_proj`). Sequence logits and depth logits share one softmax, so a head
decides, token by token, how much to read from other positions and how much from earlier layers.

`trace.attention[i]` therefore has shape `(B, H, T, T + 2i)`: `T` sequence columns, then `2i`
depth columns in the order `attn0, mlp0, attn1, mlp1, …` (`trace.seq_len` marks the boundary).
`trace.depth_mass[i]` is the share of each head's mass on the depth columns.
'''),
    code(SETUP + r'''
# --- sizes (QUICK shrinks them) ------------------------------------------------------------
N_BLOCKS = 3 if QUICK else 6
D_MODEL, N_HEADS = (32, 4) if QUICK else (64, 4)
SEQ_LEN, BATCH = (32, 4) if QUICK else (64, 8)
STEPS = 20 if QUICK else 300
POS = "rope"                            # rotary positions (depth keys written by attention are rotated too)
TEXT = "while not done: x = f(x)"

corpus = sf.default_corpus(max_bytes=200_000 if QUICK else 2_000_000)
print(corpus)
print(f"QUICK={QUICK}: {N_BLOCKS} blocks, d_model={D_MODEL}, heads={N_HEADS}, seq_len={SEQ_LEN}, "
      f"batch={BATCH}, steps={STEPS}")
'''),
    code(r'''
def config(**kw):
    return sf.Config(vocab_size=256, d_model=D_MODEL, n_heads=N_HEADS, n_layers=N_BLOCKS,
                     max_seq_len=SEQ_LEN, pos=POS, **kw)


tokens = sf.data.encode(TEXT)[None, :]
chars = [c if c != " " else "␣" for c in TEXT]
T = tokens.shape[1]


def slot_names(i):
    """Depth columns of block i (moda_chunk=1): attn0, mlp0, ..., attn{i-1}, mlp{i-1}."""
    return [f"{'attn' if j % 2 == 0 else 'mlp'}{j // 2}" for j in range(2 * i)]


model0 = sf.Model(config(moda=True), seed=0)
tr0 = model0(tokens, trace=True).trace
print(f"input {TEXT!r}: T = {tr0.seq_len} sequence columns")
for i, a in enumerate(tr0.attention):
    print(f"block {i}: attention {a.shape}, depth columns {slot_names(i) or 'none'}")
'''),
    md(r'''
## 3.1 Depth mass at initialisation

With near-zero weights attention is almost uniform over everything a query can see. Query *t*
of block *i* sees `t + 1` sequence keys and `2i` depth slots, so a uniform head would put
`2i / (t + 1 + 2i)` of its mass on depth: large for early positions and deep blocks, small for
late positions. The cell compares the traced depth mass with that count-based expectation.
'''),
    code(r'''
def uniform_depth_share(i, Tq):
    t = np.arange(Tq)
    return float(np.mean(2 * i / (t + 1 + 2 * i)))


for i in range(N_BLOCKS):
    traced = tr0.depth_mass[i].mean()
    print(f"block {i}: traced depth mass {traced:.3f}, uniform expectation {uniform_depth_share(i, T):.3f}")
'''),
    md(r'''
## 3.2 Train MoDA, pre-norm and post-norm

Three stacks with the same size, seed, batches and schedule: MoDA with pre-norm, MoDA with
post-norm, and a plain pre-norm stack (no depth slots) as the reference. In the post-norm
layout the MLP reads the stream itself (already normalised by the attention sublayer's norm)
rather than a normalised copy of a growing stream, so its depth slots are projections of a
different input; the depth keys written by attention sublayers come from each block's own key
projection in both layouts.
'''),
    code(r'''
RUNS = {
    "MoDA pre-norm": config(moda=True, norm_position="pre"),
    "MoDA post-norm": config(moda=True, norm_position="post"),
    "plain pre-norm": config(norm_position="pre"),
}
COLORS = dict(zip(RUNS, ["C1", "C3", "C0"]))
models, hists = {}, {}
for name, cfg in RUNS.items():
    t0 = time.perf_counter()
    models[name] = sf.Model(cfg, seed=0)
    hists[name] = sf.train(models[name], corpus, steps=STEPS, batch_size=BATCH, seq_len=SEQ_LEN,
                           seed=0, eval_batches=4, progress=False)
    print(f"{name:>15}: {models[name].num_params:,} params, val loss {hists[name].val_loss[0]:.3f} -> "
          f"{hists[name].val_loss[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")
'''),
    code(r'''
fig, ax = plt.subplots(figsize=(7, 3.8))
plot_loss_curves(ax, hists, COLORS, corpus.unigram_loss())  # zoomed on where the stacks differ
ax.set_title(f"{N_BLOCKS}-block stacks")
ax.grid(alpha=0.3); ax.legend(fontsize=7, ncol=2)
plt.show()
for name, h in hists.items():
    print(f"{name:>15}: final validation loss {h.val_loss[-1]:.3f} "
          f"({h.val_loss[-1] - hists['plain pre-norm'].val_loss[-1]:+.3f} vs plain pre-norm)")
'''),
    md(r'''
## 3.3 Attention maps: [sequence KV | depth KV]

Head 0 of every block of the trained pre-norm MoDA stack on the input sentence. Left of the
white line: the ordinary causal map over the sentence's bytes. Right of it: the block's depth
slots for the same position, labelled by the sublayer that wrote them. Block 0 has no earlier
sublayers and so no depth columns.
'''),
    code(r'''
def moda_maps(model, head, title, ncols=3):
    tr = model(tokens, trace=["attention"]).trace
    nrows = -(-N_BLOCKS // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 1, 4.2 * nrows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[N_BLOCKS:]:
        ax.axis("off")
    for i, (ax, a) in enumerate(zip(axes.flat, tr.attention)):
        im = ax.imshow(a[0, head], cmap="viridis", vmin=0, vmax=1, aspect="auto")
        if a.shape[-1] > tr.seq_len:
            ax.axvline(tr.seq_len - 0.5, color="white", lw=2)
        ax.set_xticks(range(a.shape[-1]))
        ax.set_xticklabels(chars + slot_names(i), rotation=90, fontsize=6)
        for lab in ax.get_xticklabels()[tr.seq_len:]:
            lab.set_color("C3")
        ax.set_yticks(range(T)); ax.set_yticklabels(chars, fontsize=6)
        ax.set_title(f"block {i}: {tr.seq_len} sequence keys | {a.shape[-1] - tr.seq_len} depth slots",
                     fontsize=8)
    for r in range(nrows):
        axes[r, 0].set_ylabel("query")
    fig.colorbar(im, ax=axes, shrink=0.5, label="attention probability")
    fig.suptitle(title)
    plt.show()


moda_maps(models["MoDA pre-norm"], 0, f"MoDA pre-norm, head 0, after {STEPS} steps "
          "(sequence keys | depth slots)")
'''),
    md(r'''
## 3.4 How much each head reads from depth

`trace.depth_mass_mean` is a (blocks × heads) table: the mean share of each head's attention on
depth slots, averaged over tokens of a batch of validation windows. Block 0 has nothing to
read from depth, so its row is zero. One colour scale for all three panels.
'''),
    code(r'''
probe_x, _ = corpus.batch(8, SEQ_LEN, np.random.default_rng(7), split="val")
panels = {"MoDA, init": model0,
          f"MoDA pre-norm, step {STEPS}": models["MoDA pre-norm"],
          f"MoDA post-norm, step {STEPS}": models["MoDA post-norm"]}
dm = {name: m(probe_x, trace=["depth_mass"]).trace.depth_mass_mean for name, m in panels.items()}
vmax = max(float(np.nanmax(v)) for v in dm.values())

fig, axes = plt.subplots(1, len(dm), figsize=(4 * len(dm) + 1, 3.6), squeeze=False,
                         layout="constrained")
for ax, (name, m) in zip(axes[0], dm.items()):
    im = ax.imshow(m, cmap="magma", vmin=0, vmax=vmax, aspect="auto")
    for (i, h), v in np.ndenumerate(m):
        ax.text(h, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v < 0.6 * vmax else "black")
    ax.set_xticks(range(N_HEADS)); ax.set_xticklabels([f"head {h}" for h in range(N_HEADS)])
    ax.set_yticks(range(N_BLOCKS)); ax.set_yticklabels([f"block {i}" for i in range(N_BLOCKS)])
    ax.set_title(name)
fig.colorbar(im, ax=axes, shrink=0.8, label="share of attention on depth slots")
plt.show()
'''),
    code(r'''
uniform = np.array([uniform_depth_share(i, SEQ_LEN) for i in range(N_BLOCKS)])
print(f"{'block':>5} {'uniform':>8} " + " ".join(f"{n:>28}" for n in dm))
for i in range(N_BLOCKS):
    print(f"{i:5d} {uniform[i]:8.3f} " + " ".join(f"{m[i].mean():28.3f}" for m in dm.values()))
for name, m in dm.items():
    ratio = m[1:].mean() / uniform[1:].mean()
    top = np.unravel_index(np.nanargmax(m), m.shape)
    print(f"{name}: mean depth mass (blocks 1+) is {ratio:.2f}x the uniform share; "
          f"most depth-hungry head: block {top[0]}, head {top[1]} ({m[top]:.2f})")
'''),
    md(r'''
### Which earlier sublayers do the heads read?

Splitting the depth mass by slot (averaged over heads and tokens) gives a lower-triangular
picture, the MoDA analogue of notebook 2's α matrix: row *i* is block *i*, column *j* the slot
written by sublayer *j*.
'''),
    code(r'''
def slot_usage(model):
    tr = model(probe_x, trace=["attention"]).trace
    out = np.full((N_BLOCKS, 2 * (N_BLOCKS - 1)), np.nan)
    for i, a in enumerate(tr.attention):
        if i:
            out[i, : 2 * i] = a[..., tr.seq_len:].mean(axis=(0, 1, 2))
    return out


usage = {name: slot_usage(models[name]) for name in ("MoDA pre-norm", "MoDA post-norm")}
vmax = max(float(np.nanmax(u)) for u in usage.values())
cmap = plt.get_cmap("magma").copy(); cmap.set_bad("#e8e8e8")
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
for ax, (name, u) in zip(axes, usage.items()):
    im = ax.imshow(np.ma.masked_invalid(u), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(u.shape[1])); ax.set_xticklabels(slot_names(N_BLOCKS - 1), rotation=90)
    ax.set_yticks(range(N_BLOCKS)); ax.set_yticklabels([f"block {i}" for i in range(N_BLOCKS)])
    ax.set_xlabel("depth slot (written by)"); ax.set_title(f"{name}, step {STEPS}")
fig.colorbar(im, ax=axes, shrink=0.8, label="mean attention on the slot")
plt.show()
for name, u in usage.items():
    att_share = np.nansum(u[:, 0::2]) / np.nansum(u)
    print(f"{name}: {att_share:.0%} of the depth mass goes to slots written by attention sublayers, "
          f"{1 - att_share:.0%} to slots written by MLPs")
'''),
    md(r'''
**What to take away.** At initialisation the depth share is just a matter of counting visible
slots. Training moves each head away from that count, in either direction: a head can come to
read mostly depth or mostly the sequence, and the tables above say which heads did what in
this run (the ratio to the uniform share is the quickest summary). Pre-norm and post-norm MoDA
reach the losses printed in 3.2 and, as the heatmaps show, spread their depth mass over heads
and slots differently.

`moda_chunk=C` widens the depth window to the earlier positions of the same chunk of C tokens
(`trace.attention[i]` then has `T + C·2i` columns), and `moda_depth_only=True` masks sequence
keys wherever depth slots exist; both are an easy edit of `config(...)` above.

**Next:** notebook 4 builds a task that needs an early feature late and compares how plain,
AttnRes and MoDA stacks of increasing depth solve it.
'''),
    code(FOOTER),
]


# =============================================================================================
# 04 - depth as memory
# =============================================================================================
NB04: List[Cell] = [
    md(r'''
# 4 · Depth as memory

Deep stacks have to *carry* information: whatever an early layer computes must survive every
later layer until the one that needs it. This notebook builds a small synthetic task in which
a feature computed by an early block is the input of a later block, and asks two questions:

1. **Accuracy vs depth**: with the same training budget, how do plain, Full AttnRes and MoDA
   stacks of 1, 2, 4, 8 blocks do on it?
2. **Linear probes**: how well does each layer's stream (`trace.hidden[i]`) still carry the
   layer-1 features? A least-squares probe in NumPy answers it layer by layer.
'''),
    code(SETUP + r'''
# --- sizes (QUICK shrinks them) ------------------------------------------------------------
N_MEM = 4 if QUICK else 6                        # memory cells (and pointer values) per sequence
D_MODEL, N_HEADS = (32, 4) if QUICK else (64, 4)
DEPTHS = (1, 2) if QUICK else (1, 2, 4, 8)       # blocks per stack
SEEDS = (0,)                                     # add seeds for firmer numbers (time x len(SEEDS))
STEPS, BATCH, LR = (60, 16, 3e-3) if QUICK else (1000, 32, 3e-3)
EVAL_EVERY = max(1, STEPS // 20)

print(f"QUICK={QUICK}: {N_MEM} memory cells, d_model={D_MODEL}, depths {DEPTHS}, seeds {SEEDS}, "
      f"{STEPS} steps of batch {BATCH}")
'''),
    md(r'''
## 4.1 The task: pointer chasing, one or two hops

A sequence is `N_MEM` **memory** cells, each holding a pointer to a cell (a value in
0 … N_MEM−1), followed by `N_MEM` **queries**. A query is one of two kinds of token:

* `@j` (one hop): answer the content of cell *j*, `m[j]`;
* `@@j` (two hops): follow the pointer once more, `m[m[j]]`.

Loss is taken at the query positions only (targets elsewhere are `-100`, the ignore index).
A one-hop query needs one attention lookup. A two-hop query needs the result of the first
lookup (`m[j]`, written into the stream by an early block) as the *address* of a second lookup
by a later block: an early-layer feature that is needed late. A 1-block stack has a single
attention sublayer, so two dependent lookups are out of its reach.
'''),
    code(r'''
V = N_MEM + 2 * N_MEM          # token ids: cell values 0..N-1, then @0..@N-1, then @@0..@@N-1
SEQ = 2 * N_MEM
IGNORE = -100


def make_batch(n, rng):
    """(x, y, hops, first): inputs, targets, hop count and first-hop value per query."""
    mem = rng.integers(0, N_MEM, size=(n, N_MEM))
    q = rng.integers(0, N_MEM, size=(n, N_MEM))
    hops = rng.integers(1, 3, size=(n, N_MEM))
    first = np.take_along_axis(mem, q, axis=1)
    second = np.take_along_axis(mem, first, axis=1)
    x = np.concatenate([mem, N_MEM + (hops - 1) * N_MEM + q], axis=1)
    y = np.full_like(x, IGNORE)
    y[:, N_MEM:] = np.where(hops == 1, first, second)
    return x, y, hops, first


def show(x, y):
    mem = " ".join(str(v) for v in x[:N_MEM])
    qs = " ".join(("@" if v < 2 * N_MEM else "@@") + str((v - N_MEM) % N_MEM) for v in x[N_MEM:])
    return f"memory  {mem}\nqueries {qs}\nanswers {' '.join(str(v) for v in y[N_MEM:])}"


test_x, test_y, test_hops, test_first = make_batch(512, np.random.default_rng(12345))
print(show(test_x[0], test_y[0]))

# what two-hop queries score without a second lookup, for reference
two_q = test_hops == 2
mem_mode = np.array([np.bincount(r, minlength=N_MEM).argmax() for r in test_x[:, :N_MEM]])
BASELINES = {
    "chance": 1 / N_MEM,
    "answer the first hop m[j]": float((test_first == test_y[:, N_MEM:])[two_q].mean()),
    "answer the sequence's most common pointer": float((mem_mode[:, None] == test_y[:, N_MEM:])[two_q].mean()),
}
print(f"\n{np.mean(two_q):.0%} of the test queries are two-hop; on them, without a second lookup:")
for name, v in BASELINES.items():
    print(f"  {name:<42} {v:.3f}")
'''),
    code(r'''
STACKS = {"plain": dict(), "Full AttnRes": dict(residual="attnres_full"), "MoDA": dict(moda=True)}
COLORS = dict(zip(STACKS, ["C0", "C1", "C3"]))


def accuracy(model, x, y, hops):
    """Test accuracy on one-hop and on two-hop queries."""
    right = model(x).logits[:, N_MEM:].argmax(-1) == y[:, N_MEM:]
    return float(right[hops == 1].mean()), float(right[hops == 2].mean())


def train_task(kind, n_blocks, seed):
    cfg = sf.Config(vocab_size=V, d_model=D_MODEL, n_heads=N_HEADS, n_layers=n_blocks,
                    max_seq_len=SEQ, **STACKS[kind])
    model = sf.Model(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    curve = [(0, *accuracy(model, test_x, test_y, test_hops))]
    for step in range(STEPS):
        x, y, _, _ = make_batch(BATCH, rng)
        lr = sf.lr_schedule(step, LR, STEPS, warmup=max(1, STEPS // 50))
        model.train_step(x, y, lr=lr, weight_decay=0.0)
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == STEPS:
            curve.append((step + 1, *accuracy(model, test_x, test_y, test_hops)))
    return model, np.array(curve)            # curve rows: (step, one-hop acc, two-hop acc)
'''),
    md(r'''
## 4.2 Accuracy vs depth

Every (stack, depth) pair is trained from scratch for the same number of steps, once per seed
in `SEEDS` (a seed sets both the weights and the batches), and scored on a fixed test set of
fresh sequences. This is the slowest cell of the notebook.
'''),
    code(r'''
results, curves, trained = {}, {}, {}
for kind in STACKS:
    for n in DEPTHS:
        for seed in SEEDS:
            t0 = time.perf_counter()
            model, curve = train_task(kind, n, seed)
            results[kind, n, seed] = curve[-1, 1:]
            curves[kind, n, seed] = curve
            if seed == SEEDS[0]:
                trained[kind, n] = model
            print(f"{kind:>12}, {n} blocks, seed {seed}: one-hop {curve[-1, 1]:.3f}, "
                  f"two-hop {curve[-1, 2]:.3f} ({time.perf_counter() - t0:.1f} s)")
'''),
    code(r'''
def mean_acc(kind, n, hop):
    return float(np.mean([results[kind, n, s][hop - 1] for s in SEEDS]))


fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), layout="constrained")
ax = axes[0]
for kind in STACKS:
    ax.plot(DEPTHS, [mean_acc(kind, n, 2) for n in DEPTHS], "o-", color=COLORS[kind], label=f"{kind}, two-hop")
    ax.plot(DEPTHS, [mean_acc(kind, n, 1) for n in DEPTHS], "s:", color=COLORS[kind], ms=3,
            label=f"{kind}, one-hop")
    for s in SEEDS[1:]:
        ax.plot(DEPTHS, [results[kind, n, s][1] for n in DEPTHS], "x", color=COLORS[kind])
best_heuristic = max(v for k, v in BASELINES.items() if k != "chance")
ax.axhline(best_heuristic, color="gray", ls="--", lw=1, label="two-hop without a 2nd lookup (best heuristic)")
ax.axhline(1 / N_MEM, color="gray", ls=":", lw=1, label="chance")
ax.set_xscale("log", base=2); ax.set_xticks(DEPTHS); ax.set_xticklabels(DEPTHS)
ax.set_xlabel("blocks"); ax.set_ylabel(f"test accuracy after {STEPS} steps")
ax.set_title("accuracy vs depth" + (f" (mean of {len(SEEDS)} seeds, x = single seeds)" if len(SEEDS) > 1 else ""))
deepest = DEPTHS[-1]
for kind in STACKS:
    c = curves[kind, deepest, SEEDS[0]]
    axes[1].plot(c[:, 0], c[:, 2], color=COLORS[kind], label=f"{kind}, two-hop")
    axes[1].plot(c[:, 0], c[:, 1], color=COLORS[kind], ls=":", label=f"{kind}, one-hop")
axes[1].axhline(1 / N_MEM, color="gray", ls=":", lw=1)
axes[1].set_xlabel("step"); axes[1].set_ylabel("test accuracy")
axes[1].set_title(f"learning curves, {deepest}-block stacks (seed {SEEDS[0]})")
for ax in axes:
    ax.set_ylim(0, 1.05); ax.grid(alpha=0.3); ax.legend(fontsize=7)
plt.show()

print(f"{'two-hop accuracy':>16} " + " ".join(f"{n:>3} blk" for n in DEPTHS))
for kind in STACKS:
    print(f"{kind:>16} " + " ".join(f"{mean_acc(kind, n, 2):7.3f}" for n in DEPTHS))
one_hop = min(mean_acc(kind, n, 1) for kind in STACKS for n in DEPTHS)
print(f"\none-hop accuracy, lowest over all stacks and depths: {one_hop:.3f}")
print(f"two-hop accuracy of the 1-block stacks: "
      + ", ".join(f"{kind} {mean_acc(kind, 1, 2):.3f}" for kind in STACKS if 1 in DEPTHS)
      + f"; best heuristic without a second lookup: {best_heuristic:.3f}")


def steps_to(curve, level=0.9):
    hit = np.nonzero(curve[:, 2] >= level)[0]
    return int(curve[hit[0], 0]) if hit.size else None


print()
for kind in STACKS:
    reached = [steps_to(curves[kind, n, SEEDS[0]]) for n in DEPTHS]
    print(f"{kind:>12}: first evaluation with two-hop accuracy >= 90%, by depth: "
          + ", ".join(f"{n} blk: " + ("not reached" if r is None else f"step {r}")
                      for n, r in zip(DEPTHS, reached)))
'''),
    md(r'''
One-hop queries need a single lookup, and every stack can learn them at every depth (the
printout gives the lowest one-hop accuracy). Two-hop queries are where depth matters. A 1-block
stack cannot follow two pointers in a row; whatever it scores above chance on them comes from
statistics of the pointers (the heuristics printed in 4.1 are two examples), and an MLP can
squeeze a little more out of a uniform glance at all cells. Deeper stacks can learn the second
hop, and the learning curves show that they get it after a plateau whose length varies with
the stack and the seed. With one seed per configuration, read small differences with care, and
add seeds to `SEEDS` for firmer numbers.

## 4.3 Linear probes: does the stream still carry the layer-1 features?

Take the deepest stack of each kind and trace the test set. `hidden[i]` is what block *i* reads
(plain and MoDA: the residual stream; AttnRes: the mixture its attention sublayer aggregates);
`hidden[n]` is the top of the stack. Three least-squares probes, each fitted on half of the test
sequences and scored on the other half:

* **R² of the layer-1 stream**: how much of `hidden[1]` (everything present after block 0) can
  still be linearly reconstructed from `hidden[i]` (1 = nothing lost, only mixed).
* **first hop** `m[j]` at two-hop query positions: the intermediate result an early block
  computes and a later block needs as an address.
* **answer** `m[m[j]]` at two-hop query positions: present only once the second lookup is done.
'''),
    code(r'''
def lstsq_fit(X, Y, ridge=1e-3):
    """Ridge-regularised least squares with a bias column; returns the weight matrix."""
    X1 = np.hstack([X, np.ones((X.shape[0], 1))])
    A = X1.T @ X1
    A += ridge * np.trace(A) / A.shape[0] * np.eye(A.shape[0])
    return np.linalg.solve(A, X1.T @ Y)


def lstsq_apply(W, X):
    return np.hstack([X, np.ones((X.shape[0], 1))]) @ W


def r2(X_tr, Y_tr, X_te, Y_te):
    pred = lstsq_apply(lstsq_fit(X_tr, Y_tr), X_te)
    return float(1 - ((Y_te - pred) ** 2).sum() / ((Y_te - Y_te.mean(0)) ** 2).sum())


def classify(X_tr, c_tr, X_te, c_te, n_classes):
    W = lstsq_fit(X_tr, np.eye(n_classes)[c_tr])
    return float((lstsq_apply(W, X_te).argmax(-1) == c_te).mean())


half = test_x.shape[0] // 2
two = test_hops == 2                                    # (B, N_MEM) two-hop query mask
answer = test_y[:, N_MEM:]
n = DEPTHS[-1]
probes = {}
for kind in STACKS:
    hid = trained[kind, n](test_x, trace=["hidden"]).trace.hidden   # n + 1 arrays (B, SEQ, d)
    ref = hid[1].reshape(-1, D_MODEL)
    split = half * SEQ
    rows = []
    for h in hid:
        X = h.reshape(-1, D_MODEL)
        Xq = h[:, N_MEM:]                                   # query positions (B, N_MEM, d)
        tr_, te_ = two[:half], two[half:]
        rows.append((
            r2(X[:split], ref[:split], X[split:], ref[split:]),
            classify(Xq[:half][tr_], test_first[:half][tr_], Xq[half:][te_], test_first[half:][te_], N_MEM),
            classify(Xq[:half][tr_], answer[:half][tr_], Xq[half:][te_], answer[half:][te_], N_MEM),
        ))
    probes[kind] = np.array(rows)
'''),
    code(r'''
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
titles = ["R² of hidden[1] from hidden[i]", "probe accuracy: first hop m[j] (two-hop queries)",
          "probe accuracy: answer m[m[j]] (two-hop queries)"]
for j, ax in enumerate(axes):
    for kind in STACKS:
        ax.plot(range(n + 1), probes[kind][:, j], "o-", color=COLORS[kind], ms=4,
                label=f"{kind} (two-hop task acc. {results[kind, n, SEEDS[0]][1]:.0%})")
    if j:
        ax.axhline(1 / N_MEM, color="gray", ls=":", lw=1, label="chance")
    ax.set_xticks(range(n + 1))
    ax.set_xticklabels([f"h[{i}]" for i in range(n + 1)])
    ax.set_xlabel("stream read by block i (h[n] = top of the stack)")
    ax.set_title(titles[j]); ax.set_ylim(-0.05, 1.05); ax.grid(alpha=0.3)
axes[0].legend(fontsize=7)
fig.suptitle(f"linear probes of the {n}-block stacks (seed {SEEDS[0]})")
plt.show()


def first_at(col, level=0.9):
    i = next((i for i in range(n + 1) if col[i] >= level), None)
    return "no layer" if i is None else f"hidden[{i}]"


for kind, p in probes.items():
    print(f"{kind:>12}: R² of hidden[1] at the top {p[-1, 0]:.2f} (lowest above block 0: {p[1:, 0].min():.2f}); "
          f"first hop >= 90% decodable from {first_at(p[:, 1])}, {p[-1, 1]:.0%} at the top; "
          f"answer >= 90% decodable from {first_at(p[:, 2])}, {p[-1, 2]:.0%} at the top")
'''),
    md(r'''
**How to read the probes.** The first-hop curve shows where the intermediate result appears
and how long it stays readable; the answer curve shows where the second lookup happens. The
gap between the two is the stretch of depth over which the stack has to *keep* an early
feature for a later block. A plain residual stream can only add to what it carries, so an early
feature fades only by being outweighed; an AttnRes layer reads a mixture it chooses, so its
input can drop an early feature and pick it up again later from an earlier source. MoDA's
stream *is* a plain residual stream, so the probes measure the same kind of object as for the
plain stack; MoDA's extra memory, the depth slots, is invisible to them.

Where the deep stacks take their inputs from says the same thing from the other side:
'''),
    code(r'''
names = ["emb"] + [f"{'attn' if k % 2 == 0 else 'mlp'}{k // 2}" for k in range(2 * n)]
tr = trained["Full AttnRes", n](test_x, trace=["alpha"]).trace
for k in (2 * n - 2, 2 * n):        # the last block's attention sublayer, and the output
    a = tr.alpha[k][:, N_MEM:][two].mean(axis=0)
    order = np.argsort(a)[::-1][:3]
    who = "output aggregation" if k == 2 * n else f"sublayer {names[k + 1]}"
    print(f"Full AttnRes, {who}, two-hop queries: reads most from "
          + ", ".join(f"{names[i]} ({a[i]:.2f})" for i in order))

dm = trained["MoDA", n](test_x, trace=["depth_mass"]).trace.depth_mass
per_block = [float(d[:, :, N_MEM:].mean(axis=1)[two].mean()) for d in dm]
print("MoDA, share of attention on depth slots at two-hop queries, per block: "
      + ", ".join(f"{v:.2f}" for v in per_block))
'''),
    code(FOOTER),
]


NOTEBOOKS = {
    "01_stacking_blocks.ipynb": NB01,
    "02_plain_vs_attnres.ipynb": NB02,
    "03_moda.ipynb": NB03,
    "04_depth_as_memory.ipynb": NB04,
}


def build(cells: List[Cell], prefix: str):
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    nb = new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, src) in enumerate(cells):
        cell = new_markdown_cell(src) if kind == "md" else new_code_cell(src)
        cell["id"] = f"{prefix}-c{i:03d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(cells: List[Cell], prefix: str) -> str:
    import nbformat
    return nbformat.writes(build(cells, prefix)) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if a notebook differs from what this script builds")
    ap.add_argument("--out", default=HERE, help="directory to write to (default: this folder)")
    args = ap.parse_args(argv)
    stale = []
    for fname, cells in NOTEBOOKS.items():
        path = os.path.join(args.out, fname)
        text = render(cells, "nb" + fname[:2])
        if args.check:
            try:
                with open(path, encoding="utf-8") as f:
                    same = f.read() == text
            except FileNotFoundError:
                same = False
            if not same:
                stale.append(fname)
        else:
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
            print(f"wrote {path}")
    if stale:
        print("out of date (run python notebooks/build_notebooks.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
