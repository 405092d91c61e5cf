"""Budgets of a study: parameters, training FLOPs and depth reads of a Config, and parameter
matching by adjusting d_ff.

Parameters are counted exactly from the C parameter table (a Model is built: the table is the
single source of truth, and wirings added to Config later are counted with no change here);
`analytic_params` writes the count out from DEVELOPERS.md's table for the wirings known today
and is tested against it.

FLOPs (forward, per training sequence of T tokens; 2 FLOPs per multiply-add; element-wise
work such as norms, activations and softmax exponentials is left out except where it is the
wiring's own cost):
  attention projections  2T d (H dh + 2 Hkv dh) + 2T (H dh) d
  attention scores + PV  4 H dh * (visible keys summed over queries): T(T+1)/2 causal, T^2 not
  MoDA                   depth K/V of each FFN sublayer 4T d Hkv dh (blocks 0..n-2), and
                         4 H dh per visible depth slot per query (2l slots at block l with
                         moda_chunk 1; a chunk of C positions multiplies by the chunk-visible
                         positions)
  MLP                    2T d F (up) [+ 2T d F (gate, swiglu)] + 2T F d (down)
  AttnRes depth reads    per sublayer k and the output aggregation, per token and source: the
                         key's RMS (2d), score (2d), mixing (2d) = 6d per source read
  plain residual         d per sublayer add
  DenseFormer            the plain adds, plus per DWA (after block i when (i+1) % period == 0)
                         2d per source (multiply-add), (i+1)//dilation + 1 sources
  Hyper-Connections      per sublayer and token, n = hc_expansion copies: the read 2nd, the
                         copies' mixing 2n^2 d, the write back 2nd; dynamic (hc_dynamic) adds
                         the projections of the normed copies 2nd(n+2); the head's sum of the
                         copies nd
  mHC                    per sublayer and token: read 2nd, mixing 2n^2 d, write 2nd, the
                         projection of vec(H) 2nd(n^2+2n), Sinkhorn 4 n^2 per iteration; head nd
  head                   2T d V
Training = 3 x forward (backward ~ 2 x forward) x batch x steps. Wirings this file does not
know (added to Config later) are counted as their plain stack plus nothing, flagged
`flops_exact=False` in the tables.
"""
from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from typing import Any, Dict, Tuple

from ..config import Config

__all__ = ["num_params", "analytic_params", "forward_flops", "train_flops", "depth_reads",
           "match_d_ff", "KNOWN_RESIDUALS"]

KNOWN_RESIDUALS = ("plain", "attnres_full", "attnres_block", "denseformer", "hyper_connections", "mhc")


def _cfg(c: Any) -> Config:
    if isinstance(c, Config):
        return c
    return Config.from_dict(dict(c))


@lru_cache(maxsize=4096)
def _num_params_json(cfg_json: str) -> int:
    from ..model import Model
    return Model(Config.from_json(cfg_json), seed=0).num_params


def num_params(cfg: Any) -> int:
    """Exact parameter count of a Config (from the C parameter table)."""
    return _num_params_json(_cfg(cfg).to_json())


def analytic_params(cfg: Any) -> int:
    """Parameter count written out from DEVELOPERS.md's parameter table, for the wirings and
    knobs known when this was written (raises ValueError for others)."""
    c = _cfg(cfg)
    if c.residual not in KNOWN_RESIDUALS:
        raise ValueError(f"analytic_params does not know residual={c.residual!r}")
    d, F, V, n = c.d_model, c.d_ff, c.vocab_size, c.n_layers
    H, Hkv, dh = c.n_heads, c.n_kv_heads, c.d_head
    b = 1 if c.bias else 0
    norm = d * (1 + (b if c.norm == "layernorm" else 0))
    attn = d * H * dh + 2 * d * Hkv * dh + H * dh * d + b * (H * dh + 2 * Hkv * dh + d)
    mlp = (2 if c.activation == "swiglu" else 1) * (F * d + b * F) + d * F + b * d
    per_layer = 2 * norm + attn + mlp
    total = V * d + (c.max_seq_len * d if c.pos == "learned" else 0) + n * per_layer
    if c.moda:
        total += (n - 1) * 2 * Hkv * dh * d
    if c.residual in ("attnres_full", "attnres_block"):
        total += n * 4 * d + 2 * d
    elif c.residual == "denseformer":
        total += sum(_dwa_sources(c, i) for i in range(n) if (i + 1) % c.denseformer_period == 0)
    elif c.residual in ("hyper_connections", "mhc"):
        E = c.hc_expansion
        if c.residual == "mhc":
            per_sub = (E * E + 2 * E) * (E * d + 1) + 3
        else:
            per_sub = E * (E + 1) + E
            if c.hc_dynamic:
                per_sub += d * (2 if c.bias and c.norm == "layernorm" else 1) + (E + 2) * d + 2
        total += 2 * n * per_sub
    if c.final_norm:
        total += norm
    if not c.tie_embeddings:
        total += V * d
    return total


def _attnres_sources(c: Config) -> Tuple[int, ...]:
    """Sources read by each AttnRes aggregation k = 0..L (L = the output one)."""
    L = 2 * c.n_layers
    if c.residual == "attnres_full":
        return tuple(k + 1 for k in range(L + 1))
    S = c.attnres_block_size
    out = [1 + k // S + (1 if k % S else 0) for k in range(L)]
    out.append(1 + (L + S - 1) // S)
    return tuple(out)


def _dwa_sources(c: Config, i: int) -> int:
    """Sources of DenseFormer's DWA after block i: j = (i+1) % k, +k, ..., i+1 (k = dilation)."""
    return (i + 1) // c.denseformer_dilation + 1


def _visible_depth_positions(T: int, C: int) -> int:
    """Sum over queries t of the positions u with u // C == t // C and u <= t."""
    total = 0
    for start in range(0, T, C):
        m = min(C, T - start)
        total += m * (m + 1) // 2
    return total


def _moda_slots_per_block(c) -> int:
    """MoDA depth slots a block writes: its attention's, and its FFN's unless moda_depth_kv='attn'."""
    return 1 if getattr(c, "moda_depth_kv", "attn+ffn") == "attn" else 2


def depth_reads(cfg: Any) -> int:
    """Vectors read across depth per token by the wiring (AttnRes: sources per aggregation,
    summed; MoDA: depth slots visible to one query head at chunk 1, summed over blocks; plain: 0)."""
    c = _cfg(cfg)
    reads = 0
    if c.residual in ("attnres_full", "attnres_block"):
        reads += sum(_attnres_sources(c))
    if c.moda:
        reads += sum(_moda_slots_per_block(c) * l for l in range(c.n_layers))
    return reads


def forward_flops(cfg: Any, seq_len: int) -> Tuple[int, bool]:
    """(FLOPs of one forward pass over one sequence of seq_len tokens, exact-for-this-wiring)."""
    c = _cfg(cfg)
    T, d, F, V, n = int(seq_len), c.d_model, c.d_ff, c.vocab_size, c.n_layers
    H, Hkv, dh = c.n_heads, c.n_kv_heads, c.d_head
    keys = T * (T + 1) // 2 if c.causal else T * T
    attn = 2 * T * d * (H * dh + 2 * Hkv * dh) + 2 * T * H * dh * d + 4 * H * dh * keys
    mlp = (2 if c.activation == "swiglu" else 1) * 2 * T * d * F + 2 * T * F * d
    total = n * (attn + mlp) + 2 * T * d * V
    if c.moda:
        kv = getattr(c, "moda_depth_kv", "attn+ffn")  # slot projections (k and v) per block
        total += (n - 1) * 4 * T * d * Hkv * dh * {"attn": 0, "attn+ffn": 1, "attn+ffn+extra": 2}[kv]
        pos = _visible_depth_positions(T, c.moda_chunk) if c.causal else T * T
        total += sum(4 * H * dh * pos * _moda_slots_per_block(c) * l for l in range(n))
    exact = c.residual in KNOWN_RESIDUALS
    L = 2 * n
    if c.residual in ("attnres_full", "attnres_block"):
        total += 6 * d * T * sum(_attnres_sources(c))
    elif c.residual in ("hyper_connections", "mhc"):
        E = c.hc_expansion
        per_sub = 2 * E * d + 2 * E * E * d + 2 * E * d
        if c.residual == "mhc":
            per_sub += 2 * E * d * (E * E + 2 * E) + 4 * E * E * c.mhc_sinkhorn_iters
        elif c.hc_dynamic:
            per_sub += 2 * E * d * (E + 2)
        total += T * (L * per_sub + E * d)
    else:
        total += 2 * n * T * d
        if c.residual == "denseformer":
            total += 2 * d * T * sum(_dwa_sources(c, i) for i in range(n)
                                     if (i + 1) % c.denseformer_period == 0)
    return int(total), exact


def train_flops(cfg: Any, seq_len: int, batch_size: int, steps: int) -> Tuple[int, bool]:
    """(Training FLOPs of a run: 3 x forward x batch_size x steps, exact-for-this-wiring)."""
    f, exact = forward_flops(cfg, seq_len)
    return 3 * f * int(batch_size) * int(steps), exact


def match_d_ff(cfg: Any, target: int) -> int:
    """The d_ff >= 1 whose parameter count is nearest `target` (other fields kept).

    Parameters are affine in d_ff (every MLP tensor has d_ff rows or columns), so two exact
    counts give the slope; the nearest integer is then checked against its neighbours."""
    c = _cfg(cfg)
    f0 = int(c.d_ff)
    p0 = num_params(dataclasses.replace(c, d_ff=f0))
    p1 = num_params(dataclasses.replace(c, d_ff=f0 + 1))
    slope = p1 - p0
    if slope <= 0:
        return f0
    guess = max(1, round(f0 + (target - p0) / slope))
    best = min((max(1, g) for g in (guess - 1, guess, guess + 1)),
               key=lambda g: (abs(p0 + (g - f0) * slope - target), g))
    return int(best)
