"""The trace explorer (issue 23): one self-contained HTML page for an ActivationCache --
per-block, per-head attention grids with a block slider, token hover (the row and column
highlighted, the values shown), AttnRes / DenseFormer / Hyper-Connections depth-weight
heatmaps, MoDA depth mass, and the logit-lens table. No network: the script and style are
inline and the data is embedded as JSON, so the file opens from disk anywhere.

`cache.to_html(path)` writes it; `python -m stackformer explore` builds a model and does so.
"""
from __future__ import annotations

import html
import json
import os
from typing import Any, List, Optional, Sequence

import numpy as np

MAX_TOKENS = 256


def _token_text(cache, token_text: Optional[Sequence[str]], T: int) -> List[str]:
    if token_text is not None:
        out = [str(t) for t in token_text]
        if len(out) != T:
            raise ValueError(f"text: {len(out)} token labels for {T} positions")
        return out
    if cache.tokens is None:
        return [f"#{t}" for t in range(T)]
    ids = cache.tokens[0]
    if cache.config.vocab_size >= 256:  # byte-level: show the byte itself where printable
        special = {32: "\u2423", 10: "\\n", 9: "\\t"}  # space shown as an open box
        return [special.get(int(i)) or (chr(int(i)) if 32 < int(i) < 127 else f"\\x{int(i):02x}")
                for i in ids]
    return [str(int(i)) for i in ids]


def _r(a: Any, digits: int = 4) -> Any:
    return np.round(np.asarray(a, dtype=np.float64), digits).tolist()


def page_data(cache, title: Optional[str] = None, token_text: Optional[Sequence[str]] = None,
              batch: int = 0) -> dict:
    """The JSON the page embeds (batch element `batch`): tokens, per-block per-head patterns,
    depth weights of every read, MoDA depth mass, the logit lens."""
    c = cache.config
    pat0 = cache[f"blocks.{cache.layers[0]}.attn.hook_pattern"]
    B, H, T = pat0.shape[0], pat0.shape[1], pat0.shape[2]
    if not 0 <= batch < B:
        raise IndexError(f"batch {batch} is outside [0, {B})")
    if T > MAX_TOKENS:
        raise ValueError(f"the explorer shows at most {MAX_TOKENS} positions (this cache has {T}): "
                         f"run the model on a shorter input")
    blocks = []
    for i in cache.layers:
        pat = cache[f"blocks.{i}.attn.hook_pattern"][batch]
        D = pat.shape[-1] - T
        entry = {"index": i, "depth_cols": D, "patterns": _r(pat)}
        if c.moda:
            entry["depth_mass"] = _r(cache[f"blocks.{i}.attn.hook_depth_mass"][batch])
            slots = 1 if c.moda_depth_kv == "attn" else 2
            # depth column (u - chunk_start) * slots * i + s: slot s of position chunk_start + u
            names = ["attn", "ffn"] if slots == 2 else ["attn"]
            entry["depth_labels"] = [f"+{col // (slots * i)} {names[(col % (slots * i)) % slots]}"
                                     f"{(col % (slots * i)) // slots}" for col in range(D)] if i else []
        blocks.append(entry)
    reads = []
    for name in cache.hook_sources:
        w = cache[name][batch]
        reads.append({"name": name, "labels": cache.hook_sources[name], "weights": _r(w),
                      "mean": _r(w.mean(axis=0))})
    # next-token loss where that is the task (a decoder run on token ids); else no loss column
    lens = cache.logit_lens("next" if c.causal and cache.tokens is not None and T > 1 else None)
    kind = c.residual + ("+moda" if c.moda else "")
    return {
        "title": title or f"stackformer trace explorer: {kind}",
        "summary": (f"{kind}, {c.n_layers} blocks, d_model={c.d_model}, {c.n_heads} heads, "
                    f"{c.norm_position}-{c.norm}, pos={c.pos}, {'causal' if c.causal else 'bidirectional'}"),
        "tokens": _token_text(cache, token_text, T),
        "T": T, "H": H, "moda": bool(c.moda), "blocks": blocks, "reads": reads,
        "lens": [{"stream": r.stream, "loss": r.loss, "agreement": r.agreement, "kl": r.kl}
                 for r in lens.rows],
    }


def write_html(cache, path: str, title: Optional[str] = None,
               token_text: Optional[Sequence[str]] = None, batch: int = 0) -> str:
    """Write the explorer page for `cache` to `path` (one file, no external resources)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    data = page_data(cache, title=title, token_text=token_text, batch=batch)
    # "</" would end the script element early: JSON allows the escaped form
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    page = (_PAGE.replace("__TITLE__", html.escape(data["title"]))
            .replace("__STYLE__", _STYLE).replace("__SCRIPT__", _SCRIPT).replace("__DATA__", blob))
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return os.fspath(path)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__STYLE__</style></head>
<body>
<header><h1 id="title">__TITLE__</h1><div id="summary"></div></header>
<section id="controls">
  <label for="block">block <span id="block-label"></span></label>
  <input type="range" id="block" min="0" max="0" step="1" value="0">
  <span class="hint">arrow keys move the slider; hover a cell or a token</span>
</section>
<section id="tokens" aria-label="tokens"></section>
<div id="info">&nbsp;</div>
<section><h2>Attention per head <small>(row = query, column = key; darker = more;
  orange columns right of the bar are MoDA depth slots)</small></h2>
  <div id="grids"></div></section>
<section id="moda-section" hidden><h2>MoDA depth mass <small>(share of each query's attention on
  depth slots, per head)</small></h2><canvas id="depth-mass"></canvas></section>
<section id="reads-section" hidden><h2>Depth weights <small>(rows: every depth read, columns: its
  sources; token mean, or the hovered token)</small></h2>
  <canvas id="depth-weights"></canvas><div id="reads-info">&nbsp;</div></section>
<section><h2>Logit lens</h2><table id="lens"></table></section>
<script type="application/json" id="sf-data">__DATA__</script>
<script>__SCRIPT__</script>
</body></html>
"""

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }
h1 { font-size: 18px; margin: 0 0 4px; } h2 { font-size: 15px; margin: 18px 0 6px; }
h2 small, .hint { font-weight: normal; color: #666; font-size: 12px; }
#summary { color: #555; }
#controls { margin: 12px 0; display: flex; gap: 12px; align-items: center; }
#block { width: 320px; }
#tokens { display: flex; flex-wrap: wrap; gap: 2px; margin: 8px 0; }
.tok { font-family: ui-monospace, monospace; padding: 1px 4px; border: 1px solid #ccc;
       border-radius: 3px; white-space: pre; cursor: default; }
.tok.hl { background: #ffe08a; border-color: #c90; }
#info, #reads-info { font-family: ui-monospace, monospace; min-height: 1.4em; color: #333; }
#grids { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; } figcaption { font-size: 12px; color: #555; }
canvas { image-rendering: pixelated; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
td:first-child, th:first-child { text-align: left; font-family: ui-monospace, monospace; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("sf-data").textContent);
  const T = D.T, H = D.H;
  const state = { block: 0, row: -1, col: -1, token: -1 };
  const $ = (id) => document.getElementById(id);

  // white -> dark blue (sequence keys), white -> dark orange (depth slots); v in [0, 1]
  function shade(v, depth) {
    v = Math.max(0, Math.min(1, v));
    const to = depth ? [127, 39, 4] : [8, 48, 107];
    const c = to.map((x) => Math.round(255 + (x - 255) * v));
    return "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")";
  }
  function diverging(v, top) {  // depth weights may be negative (DenseFormer, HC)
    const a = Math.min(1, Math.abs(v) / (top || 1));
    const to = v >= 0 ? [8, 48, 107] : [165, 15, 21];
    const c = to.map((x) => Math.round(255 + (x - 255) * a));
    return "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")";
  }
  function cellSize(cols) { return Math.max(3, Math.min(18, Math.floor(260 / cols))); }
  function tokLabel(t) { return JSON.stringify(D.tokens[t]); }

  function blockData() { return D.blocks[state.block]; }

  function drawGrid(canvas, h) {
    const b = blockData(), P = b.patterns[h], cols = T + b.depth_cols, s = cellSize(cols);
    canvas.width = cols * s; canvas.height = T * s;
    const g = canvas.getContext("2d");
    g.fillStyle = "#fff"; g.fillRect(0, 0, canvas.width, canvas.height);
    for (let t = 0; t < T; t++)
      for (let u = 0; u < cols; u++) {
        g.fillStyle = shade(P[t][u], u >= T);
        g.fillRect(u * s, t * s, s, s);
      }
    if (b.depth_cols) { g.fillStyle = "#000"; g.fillRect(T * s - 1, 0, 2, canvas.height); }
    g.strokeStyle = "#e8a400"; g.lineWidth = 2;
    if (state.row >= 0) g.strokeRect(1, state.row * s + 1, canvas.width - 2, s - 2);
    if (state.col >= 0 && state.col < cols) g.strokeRect(state.col * s + 1, 1, s - 2, canvas.height - 2);
  }

  function renderGrids() {
    const box = $("grids");
    box.textContent = "";
    const b = blockData();
    for (let h = 0; h < H; h++) {
      const fig = document.createElement("figure");
      const cv = document.createElement("canvas");
      cv.className = "attn-grid"; cv.dataset.head = String(h); cv.dataset.block = String(b.index);
      cv.addEventListener("mousemove", (e) => onGridHover(e, cv, h));
      cv.addEventListener("mouseleave", () => setHover(-1, -1, -1));
      drawGrid(cv, h);
      const cap = document.createElement("figcaption");
      cap.textContent = "block " + b.index + ", head " + h;
      fig.appendChild(cv); fig.appendChild(cap); box.appendChild(fig);
    }
  }
  function redrawGrids() {
    document.querySelectorAll("canvas.attn-grid").forEach((cv) => drawGrid(cv, Number(cv.dataset.head)));
  }

  function onGridHover(e, cv, h) {
    const b = blockData(), cols = T + b.depth_cols, s = cellSize(cols);
    const r = cv.getBoundingClientRect();
    const u = Math.floor((e.clientX - r.left) * (cv.width / r.width) / s);
    const t = Math.floor((e.clientY - r.top) * (cv.height / r.height) / s);
    if (t < 0 || t >= T || u < 0 || u >= cols) return;
    setHover(t, u, t);
    const key = u < T ? "key " + u + " " + tokLabel(u)
                      : "depth slot " + (b.depth_labels ? b.depth_labels[u - T] : u - T);
    const vals = b.patterns.map((P, hh) => "h" + hh + "=" + P[t][u].toFixed(4)).join("  ");
    $("info").textContent = "block " + b.index + " head " + h + ": query " + t + " " + tokLabel(t) +
      " -> " + key + ": " + b.patterns[h][t][u].toFixed(4) + "   [" + vals + "]";
  }

  function setHover(row, col, token) {
    state.row = row; state.col = col; state.token = token;
    document.querySelectorAll(".tok").forEach((el) =>
      el.classList.toggle("hl", Number(el.dataset.t) === row || (col < T && Number(el.dataset.t) === col)));
    redrawGrids(); drawDepthMass(); drawReads();
  }

  function renderTokens() {
    const box = $("tokens");
    D.tokens.forEach((tok, t) => {
      const el = document.createElement("span");
      el.className = "tok"; el.dataset.t = String(t); el.textContent = tok;
      el.title = "position " + t;
      el.addEventListener("mouseenter", () => {
        setHover(t, -1, t);
        const b = blockData();
        $("info").textContent = "query " + t + " " + tokLabel(t) + ", block " + b.index + ": max key " +
          b.patterns.map((P, h) => "h" + h + "=" + argmax(P[t]) + " (" + Math.max.apply(null, P[t]).toFixed(3) + ")").join("  ") +
          (b.depth_mass ? "  depth mass " + b.depth_mass.map((m) => m[t].toFixed(3)).join(" ") : "");
      });
      el.addEventListener("mouseleave", () => setHover(-1, -1, -1));
      box.appendChild(el);
    });
  }
  function argmax(a) { let k = 0; for (let i = 1; i < a.length; i++) if (a[i] > a[k]) k = i; return k; }

  function drawDepthMass() {
    if (!D.moda) return;
    const b = blockData(), cv = $("depth-mass"), s = cellSize(T);
    cv.width = T * s; cv.height = H * s;
    const g = cv.getContext("2d");
    g.fillStyle = "#fff"; g.fillRect(0, 0, cv.width, cv.height);
    for (let h = 0; h < H; h++)
      for (let t = 0; t < T; t++) { g.fillStyle = shade(b.depth_mass[h][t], true); g.fillRect(t * s, h * s, s, s); }
    if (state.token >= 0) { g.strokeStyle = "#e8a400"; g.lineWidth = 2; g.strokeRect(state.token * s + 1, 1, s - 2, cv.height - 2); }
  }

  const READ_LABEL_W = 190;  // left margin of the depth-weights canvas: the read names
  function drawReads() {
    if (!D.reads.length) return;
    const width = Math.max.apply(null, D.reads.map((r) => r.labels.length)), s = 16, x0 = READ_LABEL_W;
    const cv = $("depth-weights");
    cv.width = x0 + width * s; cv.height = D.reads.length * s;
    const g = cv.getContext("2d");
    g.fillStyle = "#fff"; g.fillRect(0, 0, cv.width, cv.height);
    const rows = D.reads.map((r) => state.token >= 0 ? r.weights[state.token] : r.mean);
    let top = 0; rows.forEach((r) => r.forEach((v) => { top = Math.max(top, Math.abs(v)); }));
    g.font = "11px ui-monospace, monospace"; g.textBaseline = "middle";
    rows.forEach((r, k) => {
      g.fillStyle = "#333"; g.fillText(D.reads[k].name.replace(".hook_weights", ""), 2, k * s + s / 2);
      r.forEach((v, j) => { g.fillStyle = diverging(v, top); g.fillRect(x0 + j * s, k * s, s, s); });
    });
    const blk = "blocks." + blockData().index + ".";
    g.strokeStyle = "#e8a400"; g.lineWidth = 2;
    D.reads.forEach((r, k) => { if (r.name.indexOf(blk) === 0) g.strokeRect(x0 + 1, k * s + 1, cv.width - x0 - 2, s - 2); });
  }
  function onReadsHover(e) {
    const cv = $("depth-weights"), r = cv.getBoundingClientRect(), s = 16;
    const j = Math.floor((e.clientX - r.left - READ_LABEL_W) / s), k = Math.floor((e.clientY - r.top) / s);
    const read = D.reads[k];
    if (!read || j >= read.labels.length) { $("reads-info").textContent = "\u00a0"; return; }
    const w = state.token >= 0 ? read.weights[state.token][j] : read.mean[j];
    $("reads-info").textContent = read.name + " <- " + read.labels[j] + ": " + w.toFixed(4) +
      (state.token >= 0 ? " (token " + state.token + ")" : " (token mean)");
  }

  function renderLens() {
    const tb = $("lens");
    const hasLoss = D.lens.some((r) => r.loss !== null);
    const head = "<tr><th>stream</th>" + (hasLoss ? "<th>loss</th>" : "") + "<th>top-1 = final</th><th>KL(final \u2016 lens)</th></tr>";
    tb.innerHTML = head + D.lens.map((r) => "<tr><td></td>" + (hasLoss ? "<td>" + (r.loss === null ? "" : r.loss.toFixed(4)) + "</td>" : "") +
      "<td>" + r.agreement.toFixed(3) + "</td><td>" + r.kl.toExponential(3) + "</td></tr>").join("");
    tb.querySelectorAll("tr td:first-child").forEach((td, k) => { td.textContent = D.lens[k].stream; });
  }

  function setBlock(k) {
    state.block = Math.max(0, Math.min(D.blocks.length - 1, k));
    $("block").value = String(state.block);
    $("block-label").textContent = D.blocks[state.block].index + " (" + (state.block + 1) + " of " + D.blocks.length + ")";
    renderGrids(); drawDepthMass(); drawReads();
  }

  $("summary").textContent = D.summary + " \u2014 " + T + " tokens";
  const slider = $("block");
  slider.max = String(D.blocks.length - 1);
  slider.addEventListener("input", () => setBlock(Number(slider.value)));
  renderTokens();
  if (D.moda) $("moda-section").hidden = false;
  if (D.reads.length) { $("reads-section").hidden = false; $("depth-weights").addEventListener("mousemove", onReadsHover); }
  renderLens();
  setBlock(0);
  window.sfExplorer = { data: D, setBlock: setBlock, setHover: setHover, cellSize: cellSize, ready: true };
})();
"""


EXPLORE_DESCRIPTION = """\
Write the trace explorer: one self-contained HTML file (no network) with per-block, per-head
attention grids, a block slider, token hover, depth-weight heatmaps (AttnRes, DenseFormer,
Hyper-Connections, mHC), MoDA depth mass and the logit lens, for a model built from the
options below (random init, or --steps of training on the default corpus first), or one
loaded from a checkpoint (--load)."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m stackformer explore [--out FILE] [config options]`."""
    import argparse

    from .config import Config
    from .model import Model
    p = argparse.ArgumentParser(prog="python -m stackformer explore", description=EXPLORE_DESCRIPTION)
    p.add_argument("--out", default="explore.html", help="the HTML file to write (default explore.html)")
    p.add_argument("--text", default="def add(a, b):\n    return a + b\n",
                   help="input text (its UTF-8 bytes are the tokens; at most 256)")
    p.add_argument("--load", metavar="CHECKPOINT", help="a model saved with Model.save (the config options are then ignored)")
    p.add_argument("--residual", default="attnres_block",
                   choices=["plain", "attnres_full", "attnres_block", "denseformer", "hyper_connections", "mhc"],
                   help="depth wiring (default attnres_block)")
    p.add_argument("--moda", action="store_true", help="Mixture-of-Depths attention")
    p.add_argument("--layers", type=int, default=4, help="blocks (default 4)")
    p.add_argument("--d-model", dest="d_model", type=int, default=64, help="width (default 64)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--block-size", dest="block_size", type=int, default=2,
                   help="Block AttnRes block size in sublayers (default 2)")
    p.add_argument("--norm", choices=["pre", "post"], default="pre", help="norm placement (default pre)")
    p.add_argument("--pos", choices=["learned", "sinusoidal", "rope", "none"], default="learned")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0,
                   help="train this many steps on the default corpus first (default 0: random init)")
    args = p.parse_args(argv)
    if args.load:
        model = Model.load(args.load)
    else:
        kw = dict(vocab_size=256, d_model=args.d_model, n_heads=args.heads, n_layers=args.layers,
                  max_seq_len=256, residual=args.residual, moda=args.moda,
                  norm_position=args.norm, pos=args.pos)
        if args.residual == "attnres_block":
            kw["attnres_block_size"] = args.block_size
        try:
            cfg = Config(**kw)
        except (TypeError, ValueError) as e:
            p.error(str(e))
        model = Model(cfg, seed=args.seed)
    if args.steps < 0:
        p.error("--steps must be >= 0")
    if args.steps:
        from .data import default_corpus
        from .train import train
        train(model, default_corpus(), steps=args.steps, batch_size=8, seq_len=64, progress=False)
    tokens = np.frombuffer(args.text.encode("utf-8"), dtype=np.uint8)[None, :]
    if not 1 <= tokens.shape[1] <= min(MAX_TOKENS, model.config.max_seq_len):
        p.error(f"--text must be 1..{min(MAX_TOKENS, model.config.max_seq_len)} bytes")
    if model.config.vocab_size < 256:
        p.error("explore feeds bytes as tokens: the model must be byte-level (vocab_size >= 256)")
    _, cache = model.run_with_cache(tokens)
    path = cache.to_html(args.out)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB): open it in a browser")
    return 0
