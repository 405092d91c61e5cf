"""A study's report: report.md with the tables, PNG figures beside it (when matplotlib is
installed), and the summary printed at the end of a run.

Tables, per (depth, width, lr): parameters, training FLOPs, seeds, final validation loss mean ±
95% t-interval over seeds, the paired difference to the baseline wiring (same seeds) ± its
interval and the verdict; then the best lr of each wiring. Figures: loss curves with seed
bands, final loss vs depth with intervals, per-block output RMS and gradient norm across depth
(AttnRes paper Fig. 5), depth-mixing heatmaps (its Fig. 8) and MoDA's depth mass per layer;
compare.png puts the first four side by side.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict, defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .stats import Interval, mean_ci, paired_diff, verdict
from .store import Store

__all__ = ["write", "summarize", "have_matplotlib", "FIGURES"]

FIGURES = ("compare.png", "loss_curves.png", "final_loss.png", "diagnostics.png",
           "depth_mixing.png", "moda_depth_mass.png")


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _f(v: Any) -> float:
    return math.nan if v is None else float(v)


class _Data:
    """The stored runs of a study's cells, grouped."""

    def __init__(self, store: Store, spec, cells):
        self.spec = spec
        self.cells = cells
        self.wirings = [w.name for w in spec.wiring_list()]
        self.baseline = spec.baseline_name()
        keys = {c.key for c in cells}
        self.runs = {r["key"]: r for r in store.runs(keys)}
        self.n_total = len(cells)
        self.n_done = len(self.runs)
        self.data = store.get_meta("data") or {}
        self.execution = store.get_meta("execution") or {}
        # (depth, width, lr) -> wiring -> seed -> run
        self.groups: "OrderedDict[Tuple[int, int, float], Dict[str, Dict[int, dict]]]" = OrderedDict()
        for c in sorted(cells, key=lambda c: (c.depth, c.width, c.lr)):
            g = self.groups.setdefault((c.depth, c.width, c.lr), OrderedDict((w, {}) for w in self.wirings))
            r = self.runs.get(c.key)
            if r is not None:
                g[c.wiring][c.seed] = r

    def losses(self, g, w) -> Dict[int, float]:
        return {s: _f(r["final_val_loss"]) for s, r in self.groups[g][w].items()}

    def best_lr(self, depth: int, width: int, w: str) -> Optional[float]:
        best, best_m = None, math.inf
        for lr in self.spec.lrs:
            ci = mean_ci(list(self.losses((depth, width, float(lr)), w).values()))
            if ci.n and ci.mean < best_m:
                best, best_m = float(lr), ci.mean
        return best

    def cell_info(self, depth, width, w) -> dict:
        """params / d_ff / FLOPs of a (depth, width, wiring): the same at every lr and seed."""
        for c in self.cells:
            if (c.depth, c.width, c.wiring) == (depth, width, w):
                from . import budget
                f, exact = budget.train_flops(c.config, self.spec.seq_len, self.spec.batch_size, c.steps)
                return dict(params=budget.num_params(c.config), d_ff=c.config.d_ff, flops=f, exact=exact,
                            steps=c.steps, n_layers=c.config.n_layers, reads=budget.depth_reads(c.config))
        return {}


def _grad_spread(runs: Sequence[dict]) -> float:
    vals = []
    for r in runs:
        g = np.asarray([_f(v) for v in (r.get("traces") or {}).get("grad_norm", [])], dtype=float)
        if g.size and np.all(np.isfinite(g)) and g.min() > 0:
            vals.append(g.max() / g.min())
    return float(np.mean(vals)) if vals else math.nan


def _group_rows(d: _Data, g) -> List[dict]:
    depth, width, lr = g
    base = d.losses(g, d.baseline)
    rows = []
    for w in d.wirings:
        ls = d.losses(g, w)
        ci = mean_ci(list(ls.values()))
        diff = paired_diff(ls, base) if w != d.baseline else None
        info = d.cell_info(depth, width, w)
        runs = list(d.groups[g][w].values())
        rows.append(dict(wiring=w, ci=ci, diff=diff, verdict=verdict(diff) if diff is not None else "baseline",
                         seeds=sorted(ls), diverged=sum(1 for r in runs if r["diverged"]),
                         grad_spread=_grad_spread(runs), **info))
    return rows


def _ci_str(ci: Optional[Interval]) -> str:
    if ci is None:
        return "-"
    if ci.n == 0:
        return "n/a"
    if ci.n < 2:
        return f"{ci.mean:+.4f} (1 seed)"
    return f"{ci.mean:+.4f} [{ci.lo:+.4f}, {ci.hi:+.4f}]"


def _mean_str(ci: Interval) -> str:
    if ci.n == 0:
        return "n/a"
    if ci.n < 2:
        return f"{ci.mean:.4f} (1 seed)"
    return f"{ci.mean:.4f} ± {ci.half_width:.4f}"


def _gflop(f: float) -> str:
    g = f / 1e9
    return f"{g:,.0f}" if g >= 100 else f"{g:.1f}" if g >= 1 else f"{g:.3f}"


def _seeds_str(seeds: List[int]) -> str:
    if not seeds:
        return "-"
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{len(seeds)} ({seeds[0]}-{seeds[-1]})"
    return f"{len(seeds)} ({','.join(map(str, seeds))})"


def summarize(d: _Data) -> str:
    """The plain-text summary (what a run prints)."""
    lines = [f"study {d.spec.name!r}: {d.n_done}/{d.n_total} runs stored"]
    wl = max([len(w) for w in d.wirings] + [16])
    for g in d.groups:
        depth, width, lr = g
        rows = _group_rows(d, g)
        lines.append("")
        lines.append(f"depth {depth}, width {width}, lr {lr:g}: final val loss (nats/byte), mean ± 95% CI "
                     f"over seeds; diff = paired difference to {d.baseline} by seed")
        head = (f"{'wiring':{wl}s} {'params':>9s} {'d_ff':>5s} {'GFLOP':>7s} {'seeds':>10s} "
                f"{'val loss':>17s} {'diff vs baseline [95% CI]':>27s} {'grad spread':>11s}  verdict")
        lines.append(head)
        lines.append("-" * len(head))
        for r in rows:
            diff = "-" if r["diff"] is None else _ci_str(r["diff"])
            gs = f"{r['grad_spread']:11.2f}" if math.isfinite(r["grad_spread"]) else f"{'-':>11s}"
            lines.append(f"{r['wiring']:{wl}s} {r.get('params', 0):9,d} {r.get('d_ff', 0):5d} "
                         f"{_gflop(r.get('flops', 0)):>7s} {_seeds_str(r['seeds']):>10s} {_mean_str(r['ci']):>17s} "
                         f"{diff:>27s} {gs}  {r['verdict']}"
                         + (f" ({r['diverged']} diverged)" if r["diverged"] else ""))
    uni = d.data.get("unigram_val")
    if uni is not None:
        lines.append(f"{'unigram baseline':{wl}s} {'':9s} {'':5s} {'':7s} {'':>10s} {uni:17.4f}  "
                     f"(context-free predictor of the validation bytes)")
    if len(d.spec.lrs) > 1:
        lines.append("")
        lines.append("best lr per wiring (lowest mean final val loss; diff: paired, at the baseline's best lr)")
        for depth in d.spec.depths:
            for width in d.spec.widths:
                for row in _best_lr_rows(d, depth, width):
                    lines.append(f"  depth {depth} width {width} {row['wiring']:{wl}s} lr {row['lr']:<8} "
                                 f"{_mean_str(row['ci']):>17s}  {_ci_str(row['diff']):>27s}  {row['verdict']}")
    if d.spec.skipped:
        lines.append("")
        lines.append("not yet available (Config does not accept them yet): "
                     + "; ".join(n for n, _ in d.spec.skipped))
    return "\n".join(lines)


def _best_lr_rows(d: _Data, depth: int, width: int) -> List[dict]:
    blr = d.best_lr(depth, width, d.baseline)
    base = d.losses((depth, width, blr), d.baseline) if blr is not None else {}
    out = []
    for w in d.wirings:
        lr = d.best_lr(depth, width, w)
        if lr is None:
            out.append(dict(wiring=w, lr="-", ci=Interval(math.nan, math.nan, math.nan, 0, math.nan),
                            diff=None, verdict="n/a"))
            continue
        ls = d.losses((depth, width, lr), w)
        diff = paired_diff(ls, base) if w != d.baseline else None
        out.append(dict(wiring=w, lr=f"{lr:g}", ci=mean_ci(list(ls.values())), diff=diff,
                        verdict="baseline" if diff is None else verdict(diff)))
    return out


# -- markdown ------------------------------------------------------------------------------------------
def _markdown(d: _Data, figures: List[str], png_note: str) -> str:
    s = d.spec
    md = [f"# Study `{s.name}`", ""]
    if s.description:
        md += [s.description, ""]
    md += [f"{d.n_done} of {d.n_total} runs stored" + ("" if d.n_done == d.n_total else
                                                        " (the study is incomplete: run it again to resume)") + ".", ""]
    md += ["## Setup", "",
           f"- grid: wirings {', '.join(f'`{w}`' for w in d.wirings)} (baseline `{d.baseline}`) x depths "
           f"{list(s.depths)} x widths {list(s.widths)} x lrs {[float(x) for x in s.lrs]} x seeds {s.seed_list()}",
           f"- budget per run: {s.steps} steps of {s.batch_size} x {s.seq_len} tokens "
           f"({s.steps * s.batch_size * s.seq_len:,} tokens; "
           + ("the same for every run" if s.equal == "tokens" else
              "steps scaled per wiring to the baseline's training FLOPs") + "), AdamW, weight decay "
           f"{s.weight_decay}, clip {s.clip_norm}, warm-up {'5% of steps' if s.warmup is None else s.warmup} "
           "then cosine to lr/10 (`sf.train`)",
           f"- parameters: " + ("matched to the baseline by adjusting `d_ff` (width and depth kept)"
                                if s.match_params else "not matched (each wiring at its own size)"),
           f"- data: {d.data.get('name', '?')} ({d.data.get('bytes', 0):,} bytes, signature "
           f"{d.data.get('signature', '?')}); seed s sets the init and the batch order, so every wiring "
           f"sees the same batches in the same order for a given seed",
           f"- final metric: mean validation loss (nats/byte) over {s.final_eval_batches} fixed validation "
           f"batches of {s.batch_size} x {s.seq_len}, the same batches for every run",
           ]
    ex = d.execution
    if ex:
        line = f"- execution (last session): {ex.get('mode')} x {ex.get('threads')} thread(s) on {ex.get('cores')} cores"
        c = ex.get("calibration")
        if c:
            line += (f"; calibration{' (cached)' if c.get('cached') else ''}: one run on {ex.get('cores')} threads "
                     f"{c['s_per_step_threads'] * 1e3:.1f} ms/step vs {ex.get('cores')} one-thread runs side by side "
                     f"{c['s_per_step_side_by_side'] * 1e3:.1f} ms/step each -> picked "
                     f"{'side by side' if c['choice'] == 'processes' else 'threads'}")
        elif ex.get("workers") is not None:
            line += " (set by the caller or too few runs to calibrate)"
        md.append(line)
    if s.expected_runtime:
        md.append(f"- expected runtime: {s.expected_runtime}")
    md += ["", "Method (docs/STUDY.md): per wiring, mean ± t_{0.975, n-1} s/sqrt(n) over n seeds; the "
           "difference to the baseline is paired by seed (same data order and init seed) with its own "
           "t-interval; \"better\"/\"worse\" when that interval excludes 0, else \"no difference shown\".", ""]
    for g in d.groups:
        depth, width, lr = g
        md += [f"## depth {depth}, width {width}, lr {lr:g}", "",
               "| wiring | blocks | params | d_ff | steps | train GFLOP | depth reads/token | seeds | final val loss (mean ± 95% CI) "
               "| paired diff vs baseline [95% CI] | verdict | grad spread |",
               "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|"]
        for r in _group_rows(d, g):
            fl = f"{r.get('flops', 0) / 1e9:,.1f}" + ("" if r.get("exact", True) else " (approx.)")
            gs = f"{r['grad_spread']:.2f}" if math.isfinite(r["grad_spread"]) else "-"
            verd = r["verdict"] + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
            md.append(f"| `{r['wiring']}` | {r.get('n_layers', '')} | {r.get('params', 0):,} | {r.get('d_ff', '')} | {r.get('steps', '')} | {fl} "
                      f"| {r.get('reads', 0)} | {_seeds_str(r['seeds'])} | {_mean_str(r['ci'])} "
                      f"| {'-' if r['diff'] is None else _ci_str(r['diff'])} | {verd} | {gs} |")
        md.append("")
    uni = d.data.get("unigram_val")
    if uni is not None:
        md += [f"Unigram baseline (entropy of the validation bytes): {uni:.4f} nats/byte. "
               "Grad spread: max/min over blocks of the per-block gradient norm, mean over the second "
               "half of training, averaged over seeds (1 = every block gets the same gradient).", ""]
    if len(s.lrs) > 1:
        md += ["## Best learning rate per wiring", "",
               "| depth | width | wiring | best lr | final val loss | paired diff vs baseline at its best lr | verdict |",
               "|---:|---:|---|---:|---:|---:|---|"]
        for depth in s.depths:
            for width in s.widths:
                for row in _best_lr_rows(d, depth, width):
                    md.append(f"| {depth} | {width} | `{row['wiring']}` | {row['lr']} | {_mean_str(row['ci'])} "
                              f"| {_ci_str(row['diff'])} | {row['verdict']} |")
        md += ["", "A wiring can lose at one lr only because it wants another: compare at each wiring's own best lr.", ""]
    if s.skipped:
        md += ["## Not yet available", "",
               "Rows of this preset that Config does not accept yet (they join the preset once it does):", ""]
        md += [f"- `{n}`: {why}" for n, why in s.skipped]
        md.append("")
    md += ["## Figures", ""]
    if figures:
        md += [f"![{f}]({f})" for f in figures]
    md += ["", png_note, ""] if png_note else [""]
    return "\n".join(md)


# -- figures --------------------------------------------------------------------------------------------
def _band(arrs: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.vstack(arrs)
    m = np.nanmean(a, axis=0)
    if a.shape[0] < 2:
        return m, m, m
    from .stats import t_quantile
    half = t_quantile(0.975, a.shape[0] - 1) * np.nanstd(a, axis=0, ddof=1) / math.sqrt(a.shape[0])
    return m, m - half, m + half


def _curves(runs: List[dict], xkey: str, ykey: str):
    xs = None
    ys = []
    for r in runs:
        h = r["history"]
        x, y = h.get(xkey) or [], [_f(v) for v in (h.get(ykey) or [])]
        if not x:
            continue
        if xs is None or len(x) < len(xs):
            xs = x
        ys.append(np.asarray(y, dtype=float))
    if xs is None:
        return None
    n = len(xs)
    return np.asarray(xs), [y[:n] for y in ys if len(y) >= n]


def _plot_loss(ax, d: _Data, g) -> None:
    for j, w in enumerate(d.wirings):
        runs = list(d.groups[g][w].values())
        c = _curves(runs, "val_step", "val_loss")
        if c is None or not c[1]:
            continue
        x, ys = c
        m, lo, hi = _band(ys)
        ax.plot(x, m, color=f"C{j % 10}", marker="o", ms=3, label=f"{w} ({len(ys)} seeds)")
        ax.fill_between(x, lo, hi, color=f"C{j % 10}", alpha=0.2)
    uni = d.data.get("unigram_val")
    if uni is not None:
        ax.axhline(uni, color="gray", ls=":", lw=1, label="unigram baseline")
    depth, width, lr = g
    ax.set(xlabel="step", ylabel="val loss (nats/byte)",
           title=f"validation loss, mean and 95% band over seeds\n(depth {depth}, width {width}, lr {lr:g})")
    finals = [v for w in d.wirings for v in d.losses(g, w).values() if math.isfinite(v)]
    if finals:
        ax.set_ylim(min(finals) - 0.15, max(finals) + 0.6)


def _pick_lr(d: _Data, depth: int, width: int, w: str) -> float:
    lr = d.best_lr(depth, width, w)
    return float(d.spec.lrs[0]) if lr is None else lr


def _plot_final(ax, d: _Data) -> None:
    width = d.spec.widths[0]
    depths = list(d.spec.depths)
    for j, w in enumerate(d.wirings):
        xs, ms, errs = [], [], []
        for depth in depths:
            ci = mean_ci(list(d.losses((depth, width, _pick_lr(d, depth, width, w)), w).values()))
            if ci.n:
                xs.append(depth if len(depths) > 1 else j)
                ms.append(ci.mean)
                errs.append(ci.half_width if ci.n > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ms, yerr=errs, color=f"C{j % 10}", marker="o", ms=4, capsize=3,
                        ls="-" if len(depths) > 1 else "none", label=w)
    if len(depths) > 1:
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths)
        ax.set_xticklabels([str(x) for x in depths])
        ax.set(xlabel="depth (blocks)")
    else:
        ax.set_xticks(range(len(d.wirings)))
        ax.set_xticklabels(d.wirings, rotation=30, ha="right", fontsize=7)
    lrnote = "" if len(d.spec.lrs) == 1 else ", each wiring at its best lr"
    ax.set(ylabel="final val loss", title=f"final val loss, mean ± 95% CI (width {width}{lrnote})")


def _deep_group(d: _Data, w: str):
    depth, width = max(d.spec.depths), d.spec.widths[0]
    return d.groups[(depth, width, _pick_lr(d, depth, width, w))][w]


def _mean_trace(runs: List[dict], key: str) -> Optional[np.ndarray]:
    arrs = []
    for r in runs:
        v = (r.get("traces") or {}).get(key)
        if v is not None:
            arrs.append(np.asarray([[_f(x) for x in row] if isinstance(row, list) else _f(row) for row in v],
                                   dtype=float))
    if not arrs:
        return None
    shape = arrs[0].shape
    arrs = [a for a in arrs if a.shape == shape]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells (e.g. short alpha rows)
        return np.nanmean(np.stack(arrs), axis=0)


def _plot_block(ax, d: _Data, key: str, ylabel: str, title: str, log: bool = False) -> None:
    for j, w in enumerate(d.wirings):
        m = _mean_trace(list(_deep_group(d, w).values()), key)
        if m is not None:
            ax.plot(np.arange(len(m)), m, color=f"C{j % 10}", marker="o", ms=3, label=w)
    ax.set(xlabel="block", ylabel=ylabel, title=f"{title} (depth {max(d.spec.depths)})")
    if log:
        ax.set_yscale("log")


def _figures(d: _Data, out_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)
        written.append(name)

    def finish(ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)

    groups = list(d.groups)
    # compare.png: the four main panels
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    _plot_loss(axes[0], d, groups[0])
    _plot_final(axes[1], d)
    _plot_block(axes[2], d, "block_out_rms", "RMS", "block output RMS")
    _plot_block(axes[3], d, "grad_norm", "gradient norm", "per-block gradient norm", log=True)
    for ax in axes:
        finish(ax)
    for ax in axes[2:]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save(fig, "compare.png")
    # loss curves, one panel per group (at most 12)
    shown = groups[:12]
    cols = min(3, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax, g in zip(axes.flat, shown):
        _plot_loss(ax, d, g)
        finish(ax)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    save(fig, "loss_curves.png")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _plot_final(ax, d)
    finish(ax)
    save(fig, "final_loss.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _plot_block(axes[0], d, "block_out_rms", "RMS of attn_out + mlp_out", "block output RMS")
    _plot_block(axes[1], d, "grad_norm", "gradient norm (2nd half mean)", "per-block gradient norm", log=True)
    for ax in axes:
        finish(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save(fig, "diagnostics.png")
    # depth-mixing heatmaps: AttnRes alpha (and any other *_matrix a trace records)
    mats = []
    for w in d.wirings:
        runs = list(_deep_group(d, w).values())
        keys = sorted({k for r in runs for k in (r.get("traces") or {}) if k.endswith("_matrix")})
        for k in keys:
            m = _mean_trace(runs, k)
            if m is not None and m.ndim == 2:
                mats.append((w, k, m))
    if mats:
        n = len(mats)
        fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 0.6, 4.2), squeeze=False)
        for ax, (w, k, m) in zip(axes[0], mats):
            im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", aspect="auto", vmin=0)
            ax.set(title=f"{w}\n{k} (mean over seeds, tokens)", xlabel="source", ylabel="sublayer (last = output)")
            fig.colorbar(im, ax=ax, fraction=0.046)
        save(fig, "depth_mixing.png")
    dms = [(w, _mean_trace(list(_deep_group(d, w).values()), "depth_mass")) for w in d.wirings]
    dms = [(w, m) for w, m in dms if m is not None]
    if dms:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for j, (w, m) in enumerate(dms):
            per_layer = np.nanmean(m, axis=1) if m.ndim == 2 else m
            ax.plot(np.arange(len(per_layer)), per_layer, marker="o", ms=3, label=w)
        ax.set(xlabel="block", ylabel="attention mass on depth slots",
               title=f"MoDA depth mass per layer (mean over heads, seeds; depth {max(d.spec.depths)})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        finish(ax)
        save(fig, "moda_depth_mass.png")
    return written


def write(store: Store, spec, cells, out_dir: str, png: bool = True) -> Tuple[str, str]:
    """Write report.md (and the figures) into out_dir; returns (summary text, report path).
    Figures are redrawn only when the stored runs changed since the last report."""
    d = _Data(store, spec, cells)
    summary = summarize(d)
    os.makedirs(out_dir, exist_ok=True)
    mpl = have_matplotlib()
    state = hashlib.sha256(json.dumps([sorted(d.runs), png, mpl, spec.to_dict()], sort_keys=True,
                                      default=str).encode()).hexdigest()
    prev = store.get_meta("report_state") or {}
    figures: List[str] = []
    note = ""
    if d.n_done == 0:
        note = "No runs stored yet: no figures."
    elif not png:
        note = "PNG figures were not written (png=False / --no-png)."
    elif not mpl:
        note = "PNG figures were not written: matplotlib is not installed (pip install matplotlib)."
    else:
        if prev.get("state") == state and all(os.path.exists(os.path.join(out_dir, f)) for f in prev.get("figures", [])):
            figures = prev.get("figures", [])
        else:
            figures = _figures(d, out_dir)
    text = _markdown(d, figures, note)
    path = os.path.join(out_dir, "report.md")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    store.set_meta("report_state", dict(state=state, figures=figures))
    return summary, path
