"""Small plotting and text-rendering helpers (matplotlib is optional and imported lazily)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

_SHADES = " .:-=+*#%@"


def text_heatmap(m: np.ndarray, labels: Optional[Sequence[str]] = None) -> str:
    """Render a 2-D array of non-negative values as shaded characters, one row per line,
    each row scaled to its own maximum (attention rows differ a lot in peakiness)."""
    m = np.asarray(m, dtype=np.float64)
    lines = []
    for r in range(m.shape[0]):
        row_max = np.nanmax(m[r]) if m.shape[1] else 0.0
        top = float(row_max) if row_max > 0 else 1.0
        cells = "".join(_SHADES[min(len(_SHADES) - 1, int(v / top * (len(_SHADES) - 1) + 0.5))]
                        if np.isfinite(v) else " " for v in m[r])
        prefix = f"{labels[r]!s:>3} " if labels is not None else ""
        lines.append(prefix + "|" + cells + "|")
    return "\n".join(lines)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_attention_grid(maps: Sequence[np.ndarray], titles: Sequence[str], tokens: Sequence[str],
                        path: str, boundary: Optional[int] = None) -> None:
    """Side-by-side attention maps (each (T, T+extra)); `boundary` marks sequence|depth."""
    plt = _pyplot()
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 1, 3.2), squeeze=False)
    for ax, m, title in zip(axes[0], maps, titles):
        ax.imshow(m, cmap="viridis", vmin=0, aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks(range(len(tokens)))
        ax.set_yticklabels(tokens, fontsize=6)
        if boundary is not None and m.shape[1] > boundary:
            ax.axvline(boundary - 0.5, color="white", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rms_curves(curves: Dict[str, np.ndarray], path: str, ylabel: str = "RMS",
                    xlabel: str = "depth", title: str = "") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, ys in curves.items():
        ax.plot(np.arange(len(ys)), ys, marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def smooth(y: Sequence[float], window: int = 15) -> np.ndarray:
    """Running mean over `window` points (shortened to len(y)); 'valid' part only."""
    y = np.asarray(y, dtype=float)
    w = max(1, min(window, len(y)))
    return np.convolve(y, np.ones(w) / w, mode="valid")


def plot_loss_curves(ax, histories: Dict[str, "object"], colors: Dict[str, str], baseline: float,
                     window: int = 15) -> None:
    """Training loss (smoothed) and validation loss of each `sf.train` History on `ax`, one
    colour per name, the unigram `baseline` as a dotted line, and the y range zoomed on where
    the runs differ (the first steps fall from ~ln(vocab) for everyone)."""
    for name, h in histories.items():
        s = smooth(h.loss, window)
        ax.plot(np.arange(len(s)) + len(h.loss) - len(s) + 1, s, color=colors[name], alpha=0.6,
                label=f"{name} train (smoothed)")
        ax.plot(h.val_step, h.val_loss, "o--", color=colors[name], ms=4, label=f"{name} validation")
    ax.axhline(baseline, color="gray", ls=":", lw=1, label="unigram baseline")
    low = min(smooth(h.loss, window).min() for h in histories.values())
    ax.set_ylim(low - 0.1, max(baseline + 0.6, max(h.val_loss[-1] for h in histories.values()) + 0.3))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
