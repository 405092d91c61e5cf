"""A TransformerLens-style view of one traced forward pass: `Model.run_with_cache`,
`ActivationCache` and the logit lens (issue 23).

Every array in the cache is a recording the C core made during the pass (sf_trace in
csrc/sf.h); nothing here recomputes a hook. A name that is an alias of another recording is the
same array (`blocks.{i}.hook_resid_post` is `blocks.{i+1}.hook_resid_pre`), and every array is
read-only, so a later activation-patching feature can use these names as addresses.

Names (n blocks; B, T batch and sequence; H, Hkv, dh heads, kv heads, head size; F = d_ff):

    hook_embed                      (B, T, d)    embedding output (token + learned/sinusoidal
                                                  position; TransformerLens splits off hook_pos_embed)
    blocks.{i}.hook_resid_pre       (B, T, d)    what block i's attention sublayer reads
    blocks.{i}.hook_resid_mid       (B, T, d)    what block i's MLP sublayer reads
    blocks.{i}.hook_resid_post      (B, T, d)    what comes next: block i+1's resid_pre, or for the
                                                  last block the head's input before ln_final
    blocks.{i}.attn.hook_q          (B, T, H, dh)   query projection (before RoPE)
    blocks.{i}.attn.hook_k / hook_v (B, T, Hkv, dh) key (before RoPE) / value projection
    blocks.{i}.attn.hook_pattern    (B, H, T, T [+ depth])  attention probabilities; under MoDA
                                                  columns [0, T) are sequence keys, [T, ...) depth slots
    blocks.{i}.attn.hook_depth_mass (B, H, T)    MoDA only: mass on the depth columns
    blocks.{i}.attn.hook_depth_k/v  (B, T, Hkv, dh) MoDA only (blocks 0..n-2): the depth slot
    blocks.{i}.mlp.hook_depth_k/v   (B, T, Hkv, dh)  the sublayer writes, as stored (RoPE as
                                                  moda_depth_rope stores it; no mlp slot under
                                                  moda_depth_kv="attn")
    blocks.{i}.attn.hook_z          (B, T, H, dh)   per-head attention output, before o_proj
    blocks.{i}.hook_attn_out        (B, T, d)    the attention sublayer's output as the wiring
                                                  receives it (post-norm AttnRes/HC: after its norm)
    blocks.{i}.mlp.hook_post        (B, T, F)    the MLP activation down_proj reads
    blocks.{i}.hook_mlp_out         (B, T, d)    the MLP sublayer's output
    blocks.{i}.attn_res.hook_weights (B, T, S)   depth-mixing weights of the read before the
    blocks.{i}.mlp_res.hook_weights  (B, T, S)   attention / MLP sublayer (wirings with weights)
    output_res.hook_weights          (B, T, S)   ... of the head's read (AttnRes, DenseFormer)
    ln_final.hook_normalized         (B, T, d)   the head's input after the final norm

`cache.hook_sources[name]` labels the S columns of a `hook_weights` array and
`cache.source_hooks(name)` gives, per column, the hook names whose sum is that source (None
where the source is not a recorded sum, e.g. Hyper-Connections' copies).
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ._checks import check_int

# ---- which identities hold per wiring (documented in docs/API.md, tested in tests/test_hooks.py)
#  plain pre-norm:         resid_mid = resid_pre + attn_out,  resid_post = resid_mid + mlp_out
#  denseformer pre-norm:   resid_mid = resid_pre + attn_out (the block's own stream); resid_post
#                          = sum_j w_j X_j (the DWA), X_0 = embed, X_{j+1} = resid_mid[j] + mlp_out[j]
#  attnres pre-norm:       resid_pre / resid_mid = sum_s weights[..., s] * source_s
#  everything else (post-norm, Hyper-Connections, mHC): no sum identity.


def _sub_out(j: int) -> str:
    """The hook holding sublayer j's output (j = 2i attention, 2i+1 MLP of block i)."""
    return f"blocks.{j // 2}.hook_attn_out" if j % 2 == 0 else f"blocks.{j // 2}.hook_mlp_out"


def _sources_of(cfg, k: int) -> List[Optional[Tuple[str, ...]]]:
    """Per source column of depth read k (k = L: the head's): the hooks summing to it, or None.
    Under attnres_window W a read keeps the embedding and its last W sources."""
    out = _all_sources_of(cfg, k)
    W = getattr(cfg, "attnres_window", None)
    if W is not None and cfg.residual in ("attnres_full", "attnres_block") and len(out) > 1 + W:
        out = out[:1] + out[-W:]
    return out


def _all_sources_of(cfg, k: int) -> List[Optional[Tuple[str, ...]]]:
    L = 2 * cfg.n_layers
    pre = cfg.norm_position == "pre"
    r = cfg.residual
    if r == "attnres_full":
        return [("hook_embed",)] + [(_sub_out(j),) for j in range(k)]
    if r == "attnres_block":
        S = cfg.attnres_block_size
        def block(m):  # completed block m >= 1: sublayers (m-1)S .. min(mS, L)-1
            return tuple(_sub_out(j) for j in range((m - 1) * S, min(m * S, L)))
        if k == L:
            return [("hook_embed",)] + [block(m) for m in range(1, 1 + (L + S - 1) // S)]
        m, i = k // S + 1, k % S
        out = [("hook_embed",)] + [block(j) for j in range(1, m)]
        if i:
            out.append(tuple(_sub_out(j) for j in range((m - 1) * S, (m - 1) * S + i)))
        return out
    if r == "denseformer":
        if k % 2 == 1:
            return []
        out: List[Optional[Tuple[str, ...]]] = [("hook_embed",)]
        for j in range(k // 2):
            out.append((f"blocks.{j}.hook_resid_mid", f"blocks.{j}.hook_mlp_out") if pre else None)
        return out
    if r in ("hyper_connections", "mhc"):
        return [None] * cfg.hc_expansion if k < L else []
    return []


def _labels(cfg, k: int, members: List[Optional[Tuple[str, ...]]]) -> List[str]:
    if cfg.residual in ("hyper_connections", "mhc"):
        return [f"copy{j + 1}" for j in range(len(members))]
    if cfg.residual == "denseformer":
        return ["hook_embed"] + [f"blocks.{j}.output" for j in range(len(members) - 1)]
    out = []
    for m in members:
        out.append(" + ".join(m) if len(m) <= 2 else f"{m[0]} + ... + {m[-1]} ({len(m)} terms)")
    return out


class ActivationCache(Mapping):
    """Hook name -> read-only NumPy array of one forward pass (see the module docstring).

    Dict-like: `cache[name]`, `name in cache`, `len(cache)`, `.keys()`, `.items()`; also
    `cache["pattern", 3]` for `blocks.3.attn.hook_pattern` (TransformerLens's short form).
    Unknown names raise KeyError listing the nearest ones."""

    def __init__(self, arrays: Dict[str, np.ndarray], hook_sources: Dict[str, List[str]],
                 source_members: Dict[str, List[Optional[Tuple[str, ...]]]], config, logits: np.ndarray,
                 tokens: Optional[np.ndarray], head: Dict[str, Optional[np.ndarray]], layers: List[int]):
        self._arrays = arrays
        self.hook_sources = hook_sources
        self._members = source_members
        self.config = config
        self.logits = logits
        self.tokens = tokens
        self._head = head
        self.layers = layers

    # -- mapping ---------------------------------------------------------------------------
    def _resolve(self, key: Any) -> str:
        if isinstance(key, tuple):
            if len(key) != 2 or not isinstance(key[0], str):
                raise KeyError(f"a tuple key is (short name, block), e.g. ('pattern', 0); got {key!r}")
            short, layer = key
            layer = check_int("block", layer)
            for cand in (f"blocks.{layer}.hook_{short}", f"blocks.{layer}.attn.hook_{short}",
                         f"blocks.{layer}.mlp.hook_{short}", f"blocks.{layer}.{short}"):
                if cand in self._arrays:
                    return cand
            key = f"blocks.{layer}.hook_{short}"
        if not isinstance(key, str):
            raise KeyError(f"hook names are str (or (short name, block) tuples), got {type(key).__name__}")
        if key not in self._arrays:
            near = difflib.get_close_matches(key, list(self._arrays), n=5, cutoff=0.6)
            hint = f"; nearest: {', '.join(near)}" if near else ""
            raise KeyError(f"no hook {key!r} in this cache ({self._what()}){hint}")
        return key

    def _what(self) -> str:
        c = self.config
        return (f"residual={c.residual}{'+moda' if c.moda else ''}, {len(self._arrays)} hooks, "
                f"blocks {self.layers}")

    def __getitem__(self, key: Any) -> np.ndarray:
        return self._arrays[self._resolve(key)]

    def __contains__(self, key: Any) -> bool:
        try:
            self._resolve(key)
            return True
        except (KeyError, TypeError, ValueError):
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        return f"ActivationCache({self._what()})"

    # -- wiring helpers --------------------------------------------------------------------
    def source_hooks(self, name: str) -> List[Optional[Tuple[str, ...]]]:
        """For a `*.hook_weights` name: per source column, the hook names whose sum is that
        source, or None where the source is not a recorded sum (HC copies, post-norm
        DenseFormer block outputs)."""
        name = self._resolve(name)
        if name not in self._members:
            raise KeyError(f"{name!r} is not a depth-weights hook; those are: {', '.join(self._members) or 'none'}")
        return list(self._members[name])

    def pattern_split(self, block: int) -> Tuple[np.ndarray, np.ndarray]:
        """MoDA: block's pattern as (sequence part (B, H, T, T), depth part (B, H, T, D)).
        Depth column (u - chunk_start) * slots * block + slot, slots = 2 (1 with
        moda_depth_kv="attn"): slot 2j is attn_j's, 2j+1 ffn_j's, u the key position in the
        query's chunk. Without MoDA the depth part has 0 columns."""
        p = self[f"blocks.{check_int('block', block)}.attn.hook_pattern"]
        T = p.shape[2]
        return p[..., :T], p[..., T:]

    # -- logit lens ------------------------------------------------------------------------
    def lens_streams(self) -> List[str]:
        """The streams the logit lens decodes, in depth order: every sublayer's input
        (resid_pre, resid_mid of each block; for AttnRes every aggregate h_0..h_{L-1}) and the
        head's input (the last block's resid_post)."""
        out = []
        for i in self.layers:
            out += [f"blocks.{i}.hook_resid_pre", f"blocks.{i}.hook_resid_mid"]
        last = f"blocks.{self.config.n_layers - 1}.hook_resid_post"
        if last in self._arrays:
            out.append(last)
        return out

    def decode(self, name: str) -> np.ndarray:
        """A (B, T, d) stream through the final norm and the unembedding, in float64:
        (B, T, V) logits (the weights were copied when the cache was made)."""
        x = np.asarray(self[name], dtype=np.float64)
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"{name!r} is not a (B, T, d_model) stream (shape {x.shape})")
        c, h = self.config, self._head
        if c.final_norm:
            w = h["final_norm.weight"]
            if c.norm == "layernorm":
                mu = x.mean(-1, keepdims=True)
                var = ((x - mu) ** 2).mean(-1, keepdims=True)
                x = (x - mu) / np.sqrt(var + c.norm_eps) * w
                if h.get("final_norm.bias") is not None:
                    x = x + h["final_norm.bias"]
            else:
                x = x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * w
        return x @ h["head"].T

    def logit_lens(self, targets: Any = None, ignore_index: int = -100) -> "LogitLens":
        """Decode every lens stream (`lens_streams()`) through ln_final and the head and
        compare it with the model's own final logits: per stream the mean cross-entropy
        against `targets` ((B, T) ids; "next" = the input shifted by one, last position
        skipped; None = no loss column), the share of positions whose top-1 token equals the
        final logits' and the mean KL(final || lens)."""
        tgt = _lens_targets(targets, self.tokens, self.logits.shape[:2], ignore_index, self.config.vocab_size)
        final = _log_softmax(self.logits.astype(np.float64))
        p_final = np.exp(final)
        top_final = final.argmax(-1)
        rows = []
        for name in self.lens_streams():
            lp = _log_softmax(self.decode(name))
            kl = float((p_final * (final - lp)).sum(-1).mean())
            agree = float((lp.argmax(-1) == top_final).mean())
            loss = None
            if tgt is not None:
                keep = tgt != ignore_index
                picked = np.take_along_axis(lp, np.where(keep, tgt, 0)[..., None], -1)[..., 0]
                loss = float(-picked[keep].mean())
            rows.append(LensRow(name, loss, agree, kl))
        return LogitLens(rows, self.config)

    # -- explorer --------------------------------------------------------------------------
    def to_html(self, path: str, title: Optional[str] = None, text: Optional[Sequence[str]] = None) -> str:
        """Write the trace explorer (one self-contained HTML file, no network) for this cache;
        returns the path. See stackformer.explorer."""
        from .explorer import write_html
        return write_html(self, path, title=title, token_text=text)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _lens_targets(targets, tokens, bt, ignore_index, V):
    if targets is None:
        return None
    if isinstance(targets, str):
        if targets != "next":
            raise ValueError(f"targets must be None, 'next' or (B, T) token ids, got {targets!r}")
        if tokens is None:
            raise ValueError("targets='next' needs token ids as the model's input (this cache was run on embeddings)")
        t = np.full(bt, ignore_index, dtype=np.int64)
        t[:, :-1] = tokens[:, 1:]
        if bt[1] < 2:
            raise ValueError("targets='next' needs at least 2 positions")
        return t
    t = np.asarray(targets)
    if t.dtype.kind not in "iu":
        raise TypeError(f"targets must be integer token ids, got dtype {t.dtype}")
    if t.ndim == 1:
        t = t[None]
    if t.shape != tuple(bt):
        raise ValueError(f"targets must have shape (B, T) = {tuple(bt)} like the input, got {t.shape}")
    t = t.astype(np.int64)
    bad = (t != ignore_index) & ((t < 0) | (t >= V))
    if bad.any():
        idx = tuple(int(v) for v in np.argwhere(bad)[0])
        raise IndexError(f"target {int(t[idx])} at {list(idx)} is outside [0, vocab_size={V}) and is not ignore_index ({ignore_index})")
    if not (t != ignore_index).any():
        raise ValueError("every target equals ignore_index: there is no loss to report")
    return t


@dataclass
class LensRow:
    """One decoded stream: loss against the targets (None without targets), top-1 agreement
    with the final logits (share of positions), mean KL(final || lens) in nats."""
    stream: str
    loss: Optional[float]
    agreement: float
    kl: float


class LogitLens:
    """The logit-lens table: `.rows` (LensRow, in depth order), `to_markdown()`, `plot()`."""

    def __init__(self, rows: List[LensRow], config):
        self.rows = rows
        self.config = config

    def to_markdown(self) -> str:
        has_loss = any(r.loss is not None for r in self.rows)
        head = "| stream | " + ("loss | " if has_loss else "") + "top-1 = final | KL(final ‖ lens) |"
        sep = "|---|" + ("---:|" if has_loss else "") + "---:|---:|"
        lines = [head, sep]
        for r in self.rows:
            loss = f"{r.loss:.4f} | " if has_loss else ""
            lines.append(f"| {r.stream} | {loss}{r.agreement:.3f} | {r.kl:.4g} |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"LogitLens({len(self.rows)} streams)\n" + self.to_markdown()

    def plot(self, path: Optional[str] = None, ax=None):
        """KL to final and top-1 agreement (and loss when known) along depth; matplotlib
        (optional dependency). Saves to `path` when given; returns the figure."""
        from .plotting import _pyplot
        plt = _pyplot()
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(self.rows)), 3.2))
        else:
            fig = ax.figure
        x = np.arange(len(self.rows))
        ax.plot(x, [r.kl for r in self.rows], "o-", label="KL(final ‖ lens)")
        if any(r.loss is not None for r in self.rows):
            ax.plot(x, [np.nan if r.loss is None else r.loss for r in self.rows], "s-", label="loss")
        ax.set_ylabel("nats")
        ax2 = ax.twinx()
        ax2.plot(x, [r.agreement for r in self.rows], "^--", color="tab:green", label="top-1 = final")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("top-1 agreement")
        ax.set_xticks(x)
        ax.set_xticklabels([r.stream.replace("blocks.", "").replace("hook_", "") for r in self.rows],
                           rotation=60, ha="right", fontsize=7)
        ax.set_title(f"logit lens ({self.config.residual}{'+moda' if self.config.moda else ''})")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


def run_with_cache(model, x: Any, key_padding_mask: Optional[np.ndarray] = None,
                   layers: Optional[Sequence[int]] = None, n_threads: int = 0):
    """See Model.run_with_cache."""
    from . import model as _m
    c = model.config
    n, L = c.n_layers, 2 * c.n_layers
    x = _m._as_array(x, "x", c.vocab_size >= 256)
    n_threads = check_int("n_threads", n_threads, 0)
    if layers is None:
        blocks = list(range(n))
    else:
        blocks = sorted(set(_m.TraceOptions(layers=layers).layer_list()))
        bad = [i for i in blocks if not 0 <= i < n]
        if bad:
            raise IndexError(f"layers: block {bad[0]} is outside [0, n_layers={n})")
    # block i's resid_post is block i+1's recorded input (or the output end, index n)
    sel = sorted(set(blocks) | {i + 1 for i in blocks} | {n})
    flags = _m.TraceOptions(rms=False, activations=True).flags()
    logits, normalized, tr = model._c.forward(x, key_padding_mask, logits=True, hidden=True, trace=flags,
                                              trace_layers=sel, n_threads=n_threads)
    arrays: Dict[str, np.ndarray] = {"hook_embed": tr["embed"]}
    alpha = tr.get("alpha")
    hook_sources: Dict[str, List[str]] = {}
    members: Dict[str, List[Optional[Tuple[str, ...]]]] = {}

    def weights(name, k):
        a = alpha[k] if alpha is not None else None
        if a is None or a.shape[-1] == 0:
            return
        arrays[name] = a
        mem = _sources_of(c, k)
        assert len(mem) == a.shape[-1], (name, len(mem), a.shape)
        members[name] = mem
        hook_sources[name] = _labels(c, k, mem)

    for i in blocks:
        p = f"blocks.{i}."
        arrays[p + "hook_resid_pre"] = tr["hidden"][i]
        weights(p + "attn_res.hook_weights", 2 * i)
        arrays[p + "attn.hook_q"] = tr["q"][i]
        arrays[p + "attn.hook_k"] = tr["k"][i]
        arrays[p + "attn.hook_v"] = tr["v"][i]
        arrays[p + "attn.hook_pattern"] = tr["attention"][i]
        if c.moda:
            arrays[p + "attn.hook_depth_mass"] = tr["depth_mass"][i]
        arrays[p + "attn.hook_z"] = tr["z"][i]
        if c.moda and i < n - 1:  # the depth slots block i writes (the last block writes none)
            spl = 1 if c.moda_depth_kv == "attn" else 2
            for j, sub in enumerate(("attn", "mlp")[:spl]):
                arrays[p + sub + ".hook_depth_k"] = tr["depth_k"][spl * i + j]
                arrays[p + sub + ".hook_depth_v"] = tr["depth_v"][spl * i + j]
        arrays[p + "hook_attn_out"] = tr["attn_out"][i]
        arrays[p + "hook_resid_mid"] = tr["hidden_mid"][i]
        weights(p + "mlp_res.hook_weights", 2 * i + 1)
        arrays[p + "mlp.hook_post"] = tr["mlp_post"][i]
        arrays[p + "hook_mlp_out"] = tr["mlp_out"][i]
        arrays[p + "hook_resid_post"] = tr["hidden"][i + 1]
    weights("output_res.hook_weights", L)
    arrays["ln_final.hook_normalized"] = normalized
    for a in arrays.values():
        a.flags.writeable = False
    logits.flags.writeable = False
    sd = model.state_dict()
    head = {"head": sd["tok_emb.weight" if c.tie_embeddings else "lm_head.weight"],
            "final_norm.weight": sd.get("final_norm.weight"), "final_norm.bias": sd.get("final_norm.bias")}
    tokens = None
    if isinstance(x, np.ndarray) and x.dtype.kind in "iu":
        tokens = np.atleast_2d(np.asarray(x)).astype(np.int64)
    cache = ActivationCache(arrays, hook_sources, members, c, logits, tokens, head, blocks)
    return logits, cache
