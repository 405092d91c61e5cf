"""Independent float64 NumPy reference of the stackformer model.

Written from DEVELOPERS.md alone (never from the C code), so that the two implementations can
check each other.  It is deliberately plain: where a loop makes the math obvious it is a loop.
Every function works on float64 arrays; parameters of any float dtype are cast on entry.

Public interface
----------------
Config                        a dataclass with the same fields/defaults as ``stackformer.Config``,
                              plus the competitor wirings' knobs (docs/WIRINGS.md)
param_shapes(cfg)             name -> shape, in DEVELOPERS.md table order (new wirings: the order
                              proposed in docs/WIRINGS.md)
init_params(cfg, rng)         name -> float64 array, random and non-trivial everywhere
wiring_init(cfg, name, shape) the papers' init of a DenseFormer / HC / mHC tensor (else None)
forward(cfg, params, ...)     logits plus every trace the C model exposes
loss(cfg, params, tok, tgt)   mean cross-entropy of forward's logits
WIRINGS                       residual name -> the wiring's function (wiring_plain, ...)
sinkhorn_knopp(logits, t)     mHC's projection onto (approximately) doubly stochastic matrices
moda_attention(...)           the attention op (plain attention when there are no depth slots)
moda_visibility(...)          the boolean mask that op uses (exposed for op-level tests)

Conventions (DEVELOPERS.md): linear weights are (out, in) and y = x W^T + b; B batch, T sequence,
d model width, H query heads, Hkv kv heads, dh = d/H, G = H/Hkv, n blocks, L = 2n sublayers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    """Same fields, order and defaults as ``stackformer.Config``; None widths are resolved."""

    vocab_size: int
    d_model: int
    n_heads: int
    n_layers: int
    max_seq_len: int
    n_kv_heads: Optional[int] = None
    d_ff: Optional[int] = None
    causal: bool = True
    pos: str = "learned"  # learned | sinusoidal | rope | none
    activation: str = "gelu"  # gelu | gelu_tanh | relu | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre | post
    bias: bool = True
    final_norm: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    residual: str = "plain"  # plain | attnres_full | attnres_block | denseformer | hyper_connections | mhc
    attnres_block_size: int = 4
    attnres_eps: float = 1e-6
    moda: bool = False
    moda_chunk: int = 1
    moda_depth_only: bool = False
    # The competitor wirings (docs/WIRINGS.md); stackformer.Config does not know these yet.
    denseformer_dilation: int = 1  # k: DWA after block i averages X_j with j = i+1 (mod k)
    denseformer_period: int = 1  # p: a DWA only after blocks i with (i+1) % p == 0
    hc_expansion: int = 4  # n copies of the residual stream (hyper_connections and mhc)
    hc_dynamic: bool = False  # hyper_connections: input-dependent (tanh) connection weights
    mhc_sinkhorn_iters: int = 20  # mhc: Sinkhorn-Knopp iterations t_max (paper: 20)
    # Ablation knobs (issue 20; DEVELOPERS.md "Ablation knobs").
    moda_depth_rope: str = "none"  # legacy | none | own: RoPE on MoDA's depth logits
    moda_depth_kv: str = "attn+ffn"  # attn | attn+ffn | attn+ffn+extra: MoDA Table 3 rows 3-5
    attnres_key_norm: bool = True  # AttnRes Table 4 "w/o key norm" = False
    attnres_mixing: str = "softmax"  # softmax | sigmoid | static (AttnRes Table 4 rows)
    attnres_query: str = "static"  # static (pseudo-query) | input (q_t = W x_t, x the newest source)
    attnres_window: Optional[int] = None  # SWA: the embedding plus the last W sources
    attnres_heads: int = 1  # multi-head AttnRes: one depth softmax per d/H columns

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        assert self.d_model % self.n_heads == 0
        assert self.n_heads % self.n_kv_heads == 0
        assert self.moda_chunk >= 1 and self.attnres_block_size >= 1
        assert self.denseformer_dilation >= 1 and self.denseformer_period >= 1
        assert self.hc_expansion >= (2 if self.residual == "mhc" else 1)
        assert self.mhc_sinkhorn_iters >= 1
        assert self.moda_depth_rope in ("legacy", "none", "own")
        assert self.moda_depth_kv in ("attn", "attn+ffn", "attn+ffn+extra")


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def _is_attnres(cfg) -> bool:
    return cfg.residual in ("attnres_full", "attnres_block")


_KNOB_DEFAULTS = dict(denseformer_dilation=1, denseformer_period=1, hc_expansion=4,
                      hc_dynamic=False, mhc_sinkhorn_iters=20)


def knob(cfg, name):
    """A competitor-wiring knob; configs that predate it (stackformer.Config) get the default."""
    return getattr(cfg, name, _KNOB_DEFAULTS[name])


def dwa_sources(i, k):
    """Indices j of the representations X_j (X_0 = embedding, X_{j} = output of block j-1) that
    the DWA after block i (0-based; the paper's depth i+1) averages, ascending:
    {j <= i+1 : j = i+1 (mod k)} (DenseFormer Sec. 3.2, dilation k)."""
    return list(range((i + 1) % k, i + 2, k))


def has_dwa(i, p):
    """DenseFormer period p: a DWA follows block i iff (i+1) % p == 0 (Sec. 3.2)."""
    return (i + 1) % p == 0


def wiring_layer_shapes(cfg, i) -> dict:
    """The competitor wirings' tensors of block i (after the block's other tensors)."""
    d, shapes = cfg.d_model, {}
    p = f"layers.{i}."
    if cfg.residual == "denseformer":
        if has_dwa(i, knob(cfg, "denseformer_period")):
            shapes[p + "dwa.weight"] = (1, len(dwa_sources(i, knob(cfg, "denseformer_dilation"))))
    elif cfg.residual == "hyper_connections":
        E = knob(cfg, "hc_expansion")
        for s in ("attn", "mlp"):
            q = f"{p}{s}_hc."
            shapes[q + "alpha.weight"] = (E, E + 1)  # static [A_m | A_r]
            shapes[q + "beta.weight"] = (E,)  # static B
            if knob(cfg, "hc_dynamic"):
                shapes[q + "norm.weight"] = (d,)
                if cfg.norm == "layernorm" and cfg.bias:
                    shapes[q + "norm.bias"] = (d,)
                shapes[q + "proj.weight"] = (E + 2, d)  # rows [W_m | W_r (E) | W_beta]
                shapes[q + "scale.weight"] = (2,)  # [s_alpha, s_beta]
    elif cfg.residual == "mhc":
        E = knob(cfg, "hc_expansion")
        for s in ("attn", "mlp"):
            q = f"{p}{s}_mhc."
            shapes[q + "proj.weight"] = (E * E + 2 * E, E * d)  # [phi_pre | phi_post | phi_res]^T
            shapes[q + "base.weight"] = (E * E + 2 * E,)  # [b_pre | b_post | b_res row-major]
            shapes[q + "scale.weight"] = (3,)  # [alpha_pre, alpha_post, alpha_res]
    return shapes


def param_shapes(cfg) -> dict:
    """name -> shape, in the order of the DEVELOPERS.md parameter table (= the flat buffer order)."""
    d, V, H, Hkv, F, n = (cfg.d_model, cfg.vocab_size, cfg.n_heads, cfg.n_kv_heads,
                          cfg.d_ff, cfg.n_layers)
    dh = d // H
    norm_bias = cfg.norm == "layernorm" and cfg.bias  # RMSNorm never has a bias
    shapes = {}

    def linear(name, out_f, in_f, bias=cfg.bias):
        shapes[name + ".weight"] = (out_f, in_f)
        if bias:
            shapes[name + ".bias"] = (out_f,)

    def norm(name):
        shapes[name + ".weight"] = (d,)
        if norm_bias:
            shapes[name + ".bias"] = (d,)

    shapes["tok_emb.weight"] = (V, d)
    if cfg.pos == "learned":
        shapes["pos_emb.weight"] = (cfg.max_seq_len, d)
    for i in range(n):
        p = f"layers.{i}."
        norm(p + "attn_norm")
        linear(p + "attn.q_proj", H * dh, d)
        linear(p + "attn.k_proj", Hkv * dh, d)
        linear(p + "attn.v_proj", Hkv * dh, d)
        linear(p + "attn.o_proj", d, H * dh)
        writes = cfg.moda and i < n - 1  # the last block's depth slots would never be read
        if writes and cfg.moda_depth_kv == "attn+ffn+extra":  # MoDA Table 3 row 5
            linear(p + "attn.depth_k_proj", Hkv * dh, d, bias=False)
            linear(p + "attn.depth_v_proj", Hkv * dh, d, bias=False)
        norm(p + "mlp_norm")
        if cfg.activation == "swiglu":
            linear(p + "mlp.gate_proj", F, d)
        linear(p + "mlp.up_proj", F, d)
        linear(p + "mlp.down_proj", d, F)
        if writes and cfg.moda_depth_kv != "attn":
            linear(p + "mlp.depth_k_proj", Hkv * dh, d, bias=False)
            linear(p + "mlp.depth_v_proj", Hkv * dh, d, bias=False)
        if _is_attnres(cfg):
            shapes.update(attnres_reader_shapes(cfg, p + "attn", 2 * i))
            shapes.update(attnres_reader_shapes(cfg, p + "mlp", 2 * i + 1))
        shapes.update(wiring_layer_shapes(cfg, i))
    if _is_attnres(cfg):
        shapes.update(attnres_reader_shapes(cfg, "output", 2 * cfg.n_layers))
    if cfg.final_norm:
        norm("final_norm")
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, d)
    return shapes


def attnres_reader_shapes(cfg, pfx, k) -> dict:
    """One AttnRes read's tensors: static mixing, its logits b (H, n_sources); otherwise the
    query, a pseudo-query w (1, d) or (input query) a projection W (d, d), and the key-norm gain."""
    d = cfg.d_model
    if cfg.attnres_mixing == "static":
        return {pfx + "_res_logits.weight": (cfg.attnres_heads, n_reader_sources(cfg, k))}
    out = {pfx + "_res_proj.weight": (d if cfg.attnres_query == "input" else 1, d)}
    if cfg.attnres_key_norm:
        out[pfx + "_res_norm.weight"] = (d,)
    return out


def n_reader_sources(cfg, k):
    S = cfg.attnres_block_size if cfg.residual == "attnres_block" else 1
    n = n_attnres_sources(k, S) if k < 2 * cfg.n_layers else 1 + -(-k // S)
    W = cfg.attnres_window
    return n if W is None else min(n, 1 + W)


def init_params(cfg, rng, weight_std=None) -> dict:
    """Random float64 parameters with the names/shapes of ``param_shapes``.

    Unlike the model's own (GPT-2 style) init, every tensor is made non-trivial so that tests
    exercise it: norm weights 1 + 0.1 N, norm biases 0.1 N, linear biases 0.1 N, AttnRes
    pseudo-queries N(0, 0.25^2) (the paper's mandatory init is 0, which would hide bugs) and
    key-norm gains 1 + 0.1 N.  Linear weights are N(0, weight_std^2), by default
    1/sqrt(fan_in): large enough that attention is far from uniform and activations leave their
    linear regime (with 0.02 a d=64 model attends almost uniformly and RoPE bugs hide).
    Embeddings are N(0, 0.25^2), which keeps the logits O(10): the parity tests compare float32
    logits with an absolute tolerance, and a float32 forward loses ~1e-6 relative.
    """
    if isinstance(rng, (int, np.integer)):
        rng = np.random.default_rng(rng)
    params = {}
    for name, shape in param_shapes(cfg).items():
        z = rng.standard_normal(shape)
        w0 = wiring_init(cfg, name, shape)
        if w0 is not None and name.endswith("scale.weight"):  # HC s_alpha, s_beta / mHC alphas
            val = 0.5 + 0.1 * z  # the papers' 0.01 would make the dynamic terms invisible
        elif w0 is not None and name.endswith("proj.weight"):  # HC W / mHC phi: papers' init 0
            val = z / math.sqrt(shape[1])
        elif w0 is not None:  # DWA weights, HC static alpha/beta, mHC biases: the init perturbed
            val = w0 + (0.5 if name.endswith("base.weight") else 0.3) * z
        elif name.endswith("_res_proj.weight"):  # AttnRes pseudo-query w_k (or input query W_k)
            val = 0.25 * z if shape[0] == 1 else z / math.sqrt(shape[1])
        elif name.endswith("_res_logits.weight"):  # AttnRes static mixing logits b_k
            val = 0.7 * z
        elif name.endswith("_res_norm.weight"):  # AttnRes key-norm gain g_k
            val = 1.0 + 0.1 * z
        elif "norm" in name:  # attn_norm / mlp_norm / final_norm weight or bias
            val = (1.0 + 0.1 * z) if name.endswith(".weight") else 0.1 * z
        elif name in ("tok_emb.weight", "pos_emb.weight"):
            val = 0.25 * z
        elif name.endswith(".bias"):
            val = 0.1 * z
        else:  # a Linear weight (out, in), including lm_head
            std = weight_std if weight_std is not None else 1.0 / math.sqrt(shape[1])
            val = std * z
        params[name] = val.astype(np.float64)
    return params


def wiring_init(cfg, name, shape):
    """The papers' init of a competitor-wiring tensor (None for every other tensor, including
    the dynamic HC norm, which starts like every norm: weight 1, bias 0).  Each makes the model
    start as the plain pre-norm stack (docs/WIRINGS.md, "identity at init"):

    DenseFormer DWA (Sec. 3.1; epfml/DenseFormer denseformer/denseformer.py _init_weights):
        alpha_{i,j} = 1 for the newest representation j = i+1, 0 for all others.
    Hyper-Connections (Sec. 2.3, Appendix J): sublayer k (= 2i attention, 2i+1 MLP) has
        A_m = e_{k mod n}, A_r = I_n, B = 1_n, dynamic W = 0, s_alpha = s_beta = 0.01.
    mHC (Sec. 4.2; alpha = 0.01 from its hyper-parameter table; the biases are our choice, see
        docs/WIRINGS.md): phi = 0, alpha_pre = alpha_post = alpha_res = 0.01,
        b_pre = -log(n-1) (H_pre = 1/n each, sums to 1), b_post = 0 (H_post = 1), b_res = 0
        (H_res = the uniform doubly stochastic matrix).
    """
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "layers":
        return None
    i, site, what = int(parts[1]), parts[2], ".".join(parts[3:])
    if site == "dwa" and what == "weight":
        w = np.zeros(shape)
        w[0, -1] = 1.0
        return w
    if site in ("attn_hc", "mlp_hc"):
        E = knob(cfg, "hc_expansion")
        k = 2 * i + (site == "mlp_hc")
        if what == "alpha.weight":
            a = np.zeros((E, E + 1))
            a[k % E, 0] = 1.0
            a[:, 1:] = np.eye(E)
            return a
        if what == "beta.weight":
            return np.ones(E)
        if what == "proj.weight":
            return np.zeros(shape)
        if what == "scale.weight":
            return np.full(2, 0.01)
        return None  # norm.weight / norm.bias
    if site in ("attn_mhc", "mlp_mhc"):
        E = knob(cfg, "hc_expansion")
        if what == "proj.weight":
            return np.zeros(shape)
        if what == "base.weight":
            b = np.zeros(E * E + 2 * E)
            b[:E] = -math.log(E - 1)
            return b
        if what == "scale.weight":
            return np.full(3, 0.01)
    return None


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

_erf = np.vectorize(math.erf, otypes=[np.float64])


def linear(x, w, b=None):
    """y = x W^T + b with W (out, in)."""
    y = x @ w.T
    return y if b is None else y + b


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance
    y = (x - mu) / np.sqrt(var + eps) * w
    return y if b is None else y + b


def rms_norm(x, w, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def gelu(x):  # exact (erf) GELU
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def relu(x):
    return np.maximum(x, 0.0)


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(s, axis=-1):
    e = np.exp(s - s.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def masked_softmax(logits, visible):
    """Softmax over the entries where ``visible``; a row with nothing visible becomes all 0."""
    z = np.where(visible, logits, -np.inf)
    m = z.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(visible, np.exp(np.where(visible, logits, 0.0) - m), 0.0)
    s = e.sum(-1, keepdims=True)
    return np.divide(e, s, out=np.zeros_like(e), where=s > 0)


def sinusoidal_table(T, d):
    """P[t, 2i] = sin(t / 10000^(2i/d)), P[t, 2i+1] = cos(t / 10000^(2i/d))."""
    P = np.zeros((T, d))
    for t in range(T):
        for c in range(d):
            even = c - c % 2  # the "2i" shared by columns 2i and 2i+1
            angle = t / 10000.0 ** (even / d)
            P[t, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    return P


def apply_rope(x, theta_base):
    """Rotate-half RoPE on (..., T, dh), position t = row index 0..T-1.

    For j < dh/2, angle_j = t * theta_base^(-2j/dh) and
    (x_j, x_{j+dh/2}) -> (x_j cos - x_{j+dh/2} sin, x_{j+dh/2} cos + x_j sin).
    """
    T, dh = x.shape[-2], x.shape[-1]
    half = dh // 2
    j = np.arange(half)
    angle = np.arange(T)[:, None] * theta_base ** (-2.0 * j / dh)  # (T, half)
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# --------------------------------------------------------------------------------------------
# The attention op (plain attention = MoDA with no depth slots)
# --------------------------------------------------------------------------------------------


def moda_visibility(B, T, n_slots, *, causal, key_padding_mask=None, chunk=1, depth_only=False):
    """Which of the T + chunk*n_slots columns each query may attend to: bool (B, T, T + chunk*n_slots).

    Column layout per query t: [T sequence keys | depth], depth column c = (u - chunk_start)*n_slots + i
    holds slot i of position u = chunk_start + c // n_slots, chunk_start = (t // chunk) * chunk.
    Sequence key u: visible unless (causal and u > t), key_padding_mask[b, u] == 0, or depth_only
    with n_slots > 0 (the query then always has its own depth slots, u = t).
    Depth column: visible iff u <= t (same chunk by construction) -- also when not causal, as
    DEVELOPERS.md says -- and position u is not padding (a padded position exposes no keys at all,
    neither its sequence key nor its depth slots).
    """
    D = chunk * n_slots
    t = np.arange(T)[:, None]
    u = np.arange(T)[None, :]
    seq = np.ones((T, T), dtype=bool)
    if causal:
        seq &= u <= t
    if depth_only and n_slots > 0:
        seq[:] = False
    seq = np.broadcast_to(seq, (B, T, T)).copy()

    if D > 0:
        c = np.arange(D)[None, :]
        u_d = (t // chunk) * chunk + c // n_slots  # (T, D) position of each depth column
        dep = np.broadcast_to(u_d <= t, (B, T, D)).copy()
    else:
        u_d = np.zeros((T, 0), dtype=int)
        dep = np.zeros((B, T, 0), dtype=bool)

    if key_padding_mask is not None:
        kpm = np.asarray(key_padding_mask).astype(bool)  # (B, T), True = real token
        seq &= kpm[:, None, :]
        if D > 0:
            dep &= kpm[:, np.minimum(u_d, T - 1)]  # u_d > t columns are already invisible
    return np.concatenate([seq, dep], axis=-1)


def moda_attention(q, k, v, kd=None, vd=None, *, causal=True, key_padding_mask=None, chunk=1,
                   depth_only=False, visible=None, q_depth=None, drop_slots=None):
    """Multi-head attention with optional Mixture-of-Depths depth slots (one softmax over both).

    q: (B, H, T, dh) queries (already RoPE-rotated if pos == "rope")
    k, v: (B, Hkv, T, dh) sequence keys/values; query head h reads kv head h // (H / Hkv)
    kd, vd: (B, Hkv, T, S, dh) depth slots of every position (S = 2l for block l, in the order
        [attn_0, ffn_0, ..., attn_{l-1}, ffn_{l-1}]), or None for plain attention
    visible: optional bool (B, T, T + chunk*S) overriding ``moda_visibility`` (for tests)
    q_depth: optional (B, H, T, dh) query of the depth logits (default q; moda_depth_rope='none'
        passes the unrotated query)
    drop_slots: optional bool (S,): slots removed from every query's read (an intervention:
        those columns become invisible, so the joint softmax renormalises over the rest)
    Returns (out, probs): out (B, H, T, dh) = sum_u p v_u + sum_c p' vd_c per head (before o_proj),
    probs (B, H, T, T + chunk*S) in the trace column layout (invisible columns are 0).
    """
    B, H, T, dh = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    S = 0 if kd is None else kd.shape[3]
    D = chunk * S
    if visible is None:
        visible = moda_visibility(B, T, S, causal=causal, key_padding_mask=key_padding_mask,
                                  chunk=chunk, depth_only=depth_only)
    if drop_slots is not None and S:
        visible = visible.copy()
        visible[:, :, T:] &= ~np.tile(np.asarray(drop_slots, bool), chunk)[None, None, :]

    # Gather, for every query t, its depth columns: column c is slot c % S of position
    # chunk_start + c // S (zero where that position lies beyond T; such columns are invisible).
    kd_cols = np.zeros((B, Hkv, T, D, dh))
    vd_cols = np.zeros((B, Hkv, T, D, dh))
    for t in range(T):
        chunk_start = (t // chunk) * chunk
        for c in range(D):
            u = chunk_start + c // S
            if u < T:
                kd_cols[:, :, t, c] = kd[:, :, u, c % S]
                vd_cols[:, :, t, c] = vd[:, :, u, c % S]

    kv_head = np.arange(H) // G  # GQA: query head h -> kv head h // G
    k_h, v_h = k[:, kv_head], v[:, kv_head]
    kd_h, vd_h = kd_cols[:, kv_head], vd_cols[:, kv_head]

    scale = 1.0 / math.sqrt(dh)
    seq_logits = np.einsum("bhtd,bhud->bhtu", q, k_h) * scale
    dep_logits = np.einsum("bhtd,bhtcd->bhtc", q if q_depth is None else q_depth, kd_h) * scale
    logits = np.concatenate([seq_logits, dep_logits], axis=-1)
    probs = masked_softmax(logits, visible[:, None, :, :])

    out = (np.einsum("bhtu,bhud->bhtd", probs[..., :T], v_h)
           + np.einsum("bhtc,bhtcd->bhtd", probs[..., T:], vd_h))
    return out, probs


# --------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------


class _Model:
    """Holds cfg + float64 params; the sublayers are methods so forward() reads like the doc."""

    def __init__(self, cfg, params):
        self.cfg = cfg
        self.p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        expected = param_shapes(cfg)
        assert set(self.p) == set(expected), (
            f"param names differ: missing {sorted(set(expected) - set(self.p))}, "
            f"unexpected {sorted(set(self.p) - set(expected))}")
        for name, shape in expected.items():
            assert self.p[name].shape == tuple(shape), (name, self.p[name].shape, shape)
        self.dh = cfg.d_model // cfg.n_heads

    def get(self, name):
        return self.p.get(name)

    def norm(self, prefix, x):
        """Norm_attn / Norm_mlp / final_norm: LayerNorm or RMSNorm with eps = norm_eps."""
        w = self.p[prefix + ".weight"]
        if self.cfg.norm == "layernorm":
            return layer_norm(x, w, self.get(prefix + ".bias"), self.cfg.norm_eps)
        return rms_norm(x, w, self.cfg.norm_eps)

    def lin(self, prefix, x):
        return linear(x, self.p[prefix + ".weight"], self.get(prefix + ".bias"))

    def embed(self, tokens, embeds):
        cfg = self.cfg
        if embeds is not None:
            x = np.asarray(embeds, dtype=np.float64).copy()
        else:
            x = self.p["tok_emb.weight"][np.asarray(tokens)]
        T = x.shape[1]
        if cfg.pos == "learned":
            x = x + self.p["pos_emb.weight"][:T]
        elif cfg.pos == "sinusoidal":
            x = x + sinusoidal_table(T, cfg.d_model)
        # rope / none: P = 0
        return x

    def split_heads(self, x, n_h):  # (B, T, n_h*dh) -> (B, n_h, T, dh)
        B, T, _ = x.shape
        return x.reshape(B, T, n_h, self.dh).transpose(0, 2, 1, 3)

    def attention(self, i, u, depth, key_padding_mask, drop_slots=None):
        """Block i's attention on input u (B,T,d).

        depth: list of the (kd, vd) pairs (2i, or i under moda_depth_kv="attn"), each (B, Hkv, T, dh), from earlier sublayers (MoDA).
        Returns (a, probs, own_slot) where own_slot = (k_d, v) is what this layer writes as
        depth slot attn_i: k_d = k rotated at its own position t (RoPE; moda_depth_rope 'own' or
        'legacy'), or k unrotated (no RoPE, or 'none', which also gives the depth logits the
        unrotated query: q_t . k_d then never depends on t).
        """
        cfg = self.cfg
        p = f"layers.{i}.attn."
        q = self.split_heads(self.lin(p + "q_proj", u), cfg.n_heads)
        k = self.split_heads(self.lin(p + "k_proj", u), cfg.n_kv_heads)
        v = self.split_heads(self.lin(p + "v_proj", u), cfg.n_kv_heads)
        q_depth, k_slot = None, k
        if cfg.pos == "rope":
            if cfg.moda and cfg.moda_depth_rope == "none":
                q_depth = q
            q = apply_rope(q, cfg.rope_theta)
            k = apply_rope(k, cfg.rope_theta)
            if q_depth is None:
                k_slot = k
        if cfg.moda and depth:
            kd = np.stack([s[0] for s in depth], axis=3)  # (B, Hkv, T, 2i, dh)
            vd = np.stack([s[1] for s in depth], axis=3)
        else:
            kd = vd = None
        ctx, probs = moda_attention(
            q, k, v, kd, vd, causal=cfg.causal, key_padding_mask=key_padding_mask,
            chunk=cfg.moda_chunk if cfg.moda else 1,
            depth_only=cfg.moda and cfg.moda_depth_only, q_depth=q_depth, drop_slots=drop_slots)
        B, H, T, dh = ctx.shape
        ctx = ctx.transpose(0, 2, 1, 3).reshape(B, T, H * dh)  # concat heads
        v_slot = v
        if cfg.moda and cfg.moda_depth_kv == "attn+ffn+extra" and i < cfg.n_layers - 1:
            # MoDA Table 3 row 5: the slot is (u Wadk^T, u Wadv^T) instead of the sequence K/V
            k_slot = self.split_heads(linear(u, self.p[p + "depth_k_proj.weight"]), cfg.n_kv_heads)
            v_slot = self.split_heads(linear(u, self.p[p + "depth_v_proj.weight"]), cfg.n_kv_heads)
            if cfg.pos == "rope" and cfg.moda_depth_rope != "none":
                k_slot = apply_rope(k_slot, cfg.rope_theta)
        return self.lin(p + "o_proj", ctx), probs, (k_slot, v_slot)

    def mlp(self, i, u):
        """Block i's MLP on input u; returns (m, depth slot ffn_i or None)."""
        cfg = self.cfg
        p = f"layers.{i}.mlp."
        if cfg.activation == "swiglu":
            hid = silu(self.lin(p + "gate_proj", u)) * self.lin(p + "up_proj", u)
        else:
            act = {"gelu": gelu, "gelu_tanh": gelu_tanh, "relu": relu}[cfg.activation]
            hid = act(self.lin(p + "up_proj", u))
        m = self.lin(p + "down_proj", hid)
        slot = None
        if cfg.moda and cfg.moda_depth_kv != "attn" and i < cfg.n_layers - 1:
            # ffn_i's depth slot: (u Wdk^T, u Wdv^T), u = the MLP's input as the MLP sees it.
            slot = (self.split_heads(linear(u, self.p[p + "depth_k_proj.weight"]), cfg.n_kv_heads),
                    self.split_heads(linear(u, self.p[p + "depth_v_proj.weight"]), cfg.n_kv_heads))
            if cfg.pos == "rope" and cfg.moda_depth_rope == "own":  # rotated at its own position
                slot = (apply_rope(slot[0], cfg.rope_theta), slot[1])
        return m, slot

    def head(self, x):
        w = self.p["tok_emb.weight"] if self.cfg.tie_embeddings else self.p["lm_head.weight"]
        return x @ w.T


def attnres_aggregate(sources, w, g, eps, mixing="softmax", heads=1, logits=None):
    """One AttnRes aggregation, per token.

    sources: list of (B, T, d) arrays v_i; w: pseudo-query (d,), or one query per token
    (B, T, d) (attnres_query="input"); g: key-norm gain (d,), or None for the paper's Table 4
    ablation without the key norm (K_i = v_i).
    K_i = v_i / sqrt(mean(v_i^2) + eps) * g (eq. 3-5),  s_i = w . K_i,  alpha = softmax_i(s),
    h = sum alpha_i v_i.  mixing="sigmoid" (Table 4): alpha_i = sigmoid(s_i), no normalisation;
    mixing="static": s = logits (heads, n_sources), the same for every token (no keys, no query).
    heads = H > 1: the d columns split into H contiguous heads, head h's logit
    s_{h,i} = w_h . K_{i,h} over its columns (K normalised over the whole d), its own softmax,
    and h's columns of the output mix with alpha_{h,.}.
    Returns (h (B, T, d), alpha (B, T, n_sources), or (B, T, H, n_sources) for H > 1).
    """
    V = np.stack(sources, axis=2)  # (B, T, n_src, d)
    B, T, n, d = V.shape
    H = heads
    Vh = V.reshape(B, T, n, H, d // H)
    if mixing == "static":
        s = np.broadcast_to(np.asarray(logits, np.float64).T[None, None], (B, T, n, H))
    else:
        K = V if g is None else V / np.sqrt((V ** 2).mean(-1, keepdims=True) + eps) * g
        wq = np.broadcast_to(w, (B, T, d)).reshape(B, T, H, d // H)
        s = np.einsum("bthe,btnhe->btnh", wq, K.reshape(B, T, n, H, d // H))  # no 1/sqrt(d) scaling
    alpha = 1.0 / (1.0 + np.exp(-s)) if mixing == "sigmoid" else softmax(s, axis=2)  # (B, T, n, H)
    h = np.einsum("btnh,btnhe->bthe", alpha, Vh).reshape(B, T, d)
    alpha = alpha.transpose(0, 1, 3, 2)  # (B, T, H, n)
    return h, (alpha[:, :, 0] if H == 1 else alpha)


def attnres_read(cfg, M, pfx, srcs, alpha=None, drop=None):
    """The read of one AttnRes reader with parameter prefix pfx over its sources srcs.
    Interventions: alpha = the weights to mix with (B, T[, H], n) instead of computing them;
    drop = a mask of removed sources (their logits -inf: the softmax renormalises over the
    rest; a sigmoid gate is 0)."""
    H = cfg.attnres_heads
    if alpha is not None:
        V = np.stack(srcs, axis=2)
        B, T, n, d = V.shape
        a = alpha if H > 1 else alpha[:, :, None, :]
        h = np.einsum("bthn,btnhe->bthe", a, V.reshape(B, T, n, H, d // H)).reshape(B, T, d)
        return h, alpha
    if drop is not None and np.any(drop):
        return _attnres_read_dropped(cfg, M, pfx, srcs, np.asarray(drop, bool))
    if cfg.attnres_mixing == "static":
        return attnres_aggregate(srcs, None, None, cfg.attnres_eps, "static", cfg.attnres_heads,
                                 M.p[pfx + "_res_logits.weight"])
    W = M.p[pfx + "_res_proj.weight"]
    q = srcs[-1] @ W.T if cfg.attnres_query == "input" else W[0]  # input: from the newest source
    return attnres_aggregate(srcs, q, M.p.get(pfx + "_res_norm.weight"), cfg.attnres_eps,
                             cfg.attnres_mixing, cfg.attnres_heads)


def _attnres_read_dropped(cfg, M, pfx, srcs, drop):
    """attnres_read with sources removed, from the definition: the kept sources' logits as in
    the full read, the dropped ones' weight 0, the softmax over the kept ones only."""
    H = cfg.attnres_heads
    V = np.stack(srcs, axis=2)
    B, T, n, d = V.shape
    if cfg.attnres_mixing == "static":
        s = np.broadcast_to(M.p[pfx + "_res_logits.weight"].T[None, None], (B, T, n, H)).copy()
    else:
        W = M.p[pfx + "_res_proj.weight"]
        q = srcs[-1] @ W.T if cfg.attnres_query == "input" else W[0]
        g = M.p.get(pfx + "_res_norm.weight")
        K = V if g is None else V / np.sqrt((V ** 2).mean(-1, keepdims=True) + cfg.attnres_eps) * g
        wq = np.broadcast_to(q, (B, T, d)).reshape(B, T, H, d // H)
        s = np.einsum("bthe,btnhe->btnh", wq, K.reshape(B, T, n, H, d // H))
    if cfg.attnres_mixing == "sigmoid":
        a = 1.0 / (1.0 + np.exp(-s))
        a[:, :, drop, :] = 0.0
    else:
        e = np.exp(s - s[:, :, ~drop, :].max(axis=2, keepdims=True))
        e[:, :, drop, :] = 0.0
        a = e / e.sum(axis=2, keepdims=True)
    h = np.einsum("btnh,btnhe->bthe", a, V.reshape(B, T, n, H, d // H)).reshape(B, T, d)
    a = a.transpose(0, 1, 3, 2)
    return h, (a[:, :, 0] if H == 1 else a)


def block_sum(v, first, last):
    """Sum of the outputs of sublayers first .. last-1, i.e. v[first+1] + ... + v[last]."""
    return sum(v[j + 1] for j in range(first, last))


def attnres_sources(v, k, residual, S, window=None):
    """The source list that sublayer k (or the output aggregator, k = L) reads.

    v = [v_0, v_1, ..., v_k]: v_0 the embedding, v_{j+1} the output of sublayer j.
    Full: [v_0 ... v_k].
    Block (size S), straight from the definition: b_0 = v_0; block m >= 1 holds sublayers
    (m-1)S ... mS-1 and b_m is the sum of their outputs.  Sublayer k lies in block m = k//S + 1;
    it reads the completed blocks [b_0 ... b_{m-1}] plus, unless it is its block's first
    sublayer, the partial sum b_m^{i-1} of the outputs of the sublayers before it in block m.
    The output aggregator (k = L) reads [b_0 ... b_N], N = ceil(L/S), the last block possibly short.
    """
    assert len(v) == k + 1
    if window is not None:  # SWA (Table 4): the embedding b_0 and the last W of the others
        srcs = attnres_sources(v, k, residual, S)
        return srcs if len(srcs) <= 1 + window else [srcs[0]] + srcs[-window:]
    if residual == "attnres_full":
        return list(v)
    m = k // S + 1  # the block holding sublayer k (k = L: the block after the last full one)
    completed = [v[0]] + [block_sum(v, (b - 1) * S, b * S) for b in range(1, m)]
    first = (m - 1) * S  # first sublayer of block m
    if k == first:
        return completed
    return completed + [block_sum(v, first, k)]  # b_m^{i-1}; for k = L this is the short b_N


def n_attnres_sources(k, S):
    """1 + floor(k/S) + [k mod S != 0] (S = 1 gives Full AttnRes: k + 1)."""
    return 1 + k // S + (k % S != 0)


# --------------------------------------------------------------------------------------------
# The stack and its wirings: one function per wiring
# --------------------------------------------------------------------------------------------
#
# A wiring decides what each sublayer reads and what its output does to the state; the stack
# (_Stack) runs the sublayers themselves.  Sublayer k = 0 .. L-1: k = 2i is block i's attention,
# k = 2i+1 its MLP.  Every wiring function takes (cfg, S, x0) and returns (x, extra): x (B,T,d)
# the stream before the final norm, extra a dict of wiring traces ("alpha" for AttnRes,
# "wiring" for the competitor wirings).  The wirings fill S.hidden / S.attn_out / S.mlp_out.


class _Stack:
    """The sublayers of one forward call: runs F_k, keeps MoDA's depth slots and the traces."""

    def __init__(self, M, key_padding_mask, patch=None):
        self.M, self.cfg, self.kpm = M, M.cfg, key_padding_mask
        # interventions (issue 23): {"embed": a, "resid_pre"|"resid_mid"|"attn_out"|"mlp_out":
        # {i: a}, "alpha": {k: a}, "ablate": {k: mask}} -- what a sublayer reads, what it
        # outputs as the wiring takes it, an AttnRes read's weights or removed sources
        self.patch = patch or {}
        self.pre = M.cfg.norm_position == "pre"
        assert M.cfg.norm_position in ("pre", "post")
        self.depth = []  # MoDA depth slots [attn_0, ffn_0, attn_1, ...], each (k, v) or None
        self.attention, self.hidden, self.attn_out, self.mlp_out = [], [], [], []

    def norm_name(self, k):
        return f"layers.{k // 2}.attn_norm" if k % 2 == 0 else f"layers.{k // 2}.mlp_norm"

    def norm(self, k, x):
        """Norm_k: block k//2's attn_norm (k even) or mlp_norm (k odd)."""
        return self.M.norm(self.norm_name(k), x)

    def F(self, k, u):
        """Sublayer k's function on its input u (as it sees it, i.e. already normed in pre-norm);
        records the attention probabilities and appends the sublayer's MoDA depth slot."""
        i = k // 2
        if k % 2 == 0:
            out, probs, slot = self.M.attention(i, u, self.depth, self.kpm, self.P("depth_ablate", i, None))
            self.attention.append(probs)
        else:
            out, slot = self.M.mlp(i, u)
        if slot is not None:  # moda_depth_kv='attn': FFNs write none
            s = len(self.depth)  # interventions: the slot's keys / values replaced, (B, Hkv, T, dh)
            slot = (self.P("depth_k", s, slot[0]), self.P("depth_v", s, slot[1]))
            self.depth.append(slot)
        return out

    def P(self, kind, i, value):
        """The patched value of hook point (kind, i), or value itself."""
        return self.patch.get(kind, {}).get(i, value)

    def branch(self, k, h):
        """Sublayer k as a branch off a wiring's state (AttnRes, Hyper-Connections, mHC):
        pre-norm F_k(Norm_k(h)); post-norm Norm_k(F_k(h)) (no single residual add to put the norm
        after, so post-norm moves the sublayer's norm to its output, as DEVELOPERS.md says for
        AttnRes).  Records the output as attn_out / mlp_out."""
        h = self.P("resid_pre" if k % 2 == 0 else "resid_mid", k // 2, h)
        out = self.F(k, self.norm(k, h) if self.pre else h)
        out = out if self.pre else self.norm(k, out)
        out = self.P("attn_out" if k % 2 == 0 else "mlp_out", k // 2, out)
        (self.attn_out if k % 2 == 0 else self.mlp_out).append(out)
        return out

    def block(self, i, x):
        """Block i of the plain residual stack on stream x (DEVELOPERS.md "Blocks, plain"):
        pre-norm  a = Attn(Norm_attn(x)); x = x + a; m = MLP(Norm_mlp(x)); x = x + m
        post-norm a = Attn(x); x = Norm_attn(x + a); m = MLP(x); x = Norm_mlp(x + m)."""
        x = self.P("resid_pre", i, x)  # patches: the stream itself at each hook point
        if self.pre:
            a = self.P("attn_out", i, self.F(2 * i, self.norm(2 * i, x)))
            x = self.P("resid_mid", i, x + a)
            m = self.P("mlp_out", i, self.F(2 * i + 1, self.norm(2 * i + 1, x)))
            x = x + m
        else:
            a = self.P("attn_out", i, self.F(2 * i, x))
            x = self.P("resid_mid", i, self.norm(2 * i, x + a))
            m = self.P("mlp_out", i, self.F(2 * i + 1, x))  # the MLP sees x itself
            x = self.norm(2 * i + 1, x + m)
        self.attn_out.append(a)
        self.mlp_out.append(m)
        return x


def wiring_plain(cfg, S, x0):
    """residual="plain": hidden[i] = the stream entering block i, hidden[n] = after the last."""
    x = x0
    for i in range(cfg.n_layers):
        S.hidden.append(x)
        x = S.block(i, x)
    S.hidden.append(x)
    return x, {}


def wiring_attnres(cfg, S, x0):
    """residual="attnres_full" / "attnres_block" (DEVELOPERS.md "Attention Residuals"):
    h_k = sum_i alpha_i v_i over sublayer k's sources, v_{k+1} = branch_k(h_k); the output is one
    more aggregation.  hidden[i] = h_{2i}, hidden[n] = the output aggregation."""
    M = S.M
    Sb = cfg.attnres_block_size if cfg.residual == "attnres_block" else 1
    L = 2 * cfg.n_layers
    v = [x0]  # v_0 = embedding (incl. P); v_{k+1} = output of sublayer k
    alpha = []
    for k in range(L):
        pfx = f"layers.{k // 2}.attn" if k % 2 == 0 else f"layers.{k // 2}.mlp"
        srcs = attnres_sources(v, k, cfg.residual, Sb, cfg.attnres_window)
        h, al = attnres_read(cfg, M, pfx, srcs, S.P("alpha", k, None), S.P("ablate", k, None))
        alpha.append(al)
        if k % 2 == 0:
            S.hidden.append(h)
        v.append(S.branch(k, h))
    srcs = attnres_sources(v, L, cfg.residual, Sb, cfg.attnres_window)
    x, al = attnres_read(cfg, M, "output", srcs, S.P("alpha", L, None), S.P("ablate", L, None))
    alpha.append(al)
    S.hidden.append(x)
    return x, {"alpha": alpha}


def wiring_denseformer(cfg, S, x0):
    """residual="denseformer" (Pagliardini et al. 2024, Sec. 3.1-3.2; epfml/DenseFormer).

    X_0 = x0 (embedding incl. P), Y_0 = X_0.  Block i (0-based, the paper's B_{i+1}) is the plain
    block: X_{i+1} = Block_i(Y_i).  If (i+1) % p == 0 a DWA follows:
        Y_{i+1} = sum_{j in J_i} alpha_{i,j} X_j,  J_i = {j <= i+1 : j = i+1 (mod k)} ascending,
    with alpha_{i,.} = layers.{i}.dwa.weight[0]; otherwise Y_{i+1} = X_{i+1}.  Output Y_n.
    hidden[i] = Y_i (block i's input), hidden[n] = Y_n.
    wiring: {"dwa_matrix": (n, n+1) with row i = the weights of X_0..X_n in Y_{i+1} (a one-hot
    row where block i has no DWA), "X": [X_0 .. X_n]}.
    """
    k, p, n = knob(cfg, "denseformer_dilation"), knob(cfg, "denseformer_period"), cfg.n_layers
    X, y = [x0], x0
    W = np.zeros((n, n + 1))
    for i in range(n):
        S.hidden.append(y)
        X.append(S.block(i, y))
        if has_dwa(i, p):
            w = S.M.p[f"layers.{i}.dwa.weight"][0]
            J = dwa_sources(i, k)
            y = sum(w[c] * X[j] for c, j in enumerate(J))
            W[i, J] = w
        else:
            y = X[i + 1]
            W[i, i + 1] = 1.0
    S.hidden.append(y)
    return y, {"wiring": {"dwa_matrix": W, "X": X}}


def hc_weights(cfg, M, pfx, H):
    """Hyper-Connections' connection weights for one sublayer (Zhu et al., Sec. 2.1-2.2, App. J).

    H (B,T,E,d): the E copies.  Static: alpha = [A_m | A_r] (E, E+1), beta = B (E,).  Dynamic:
    Hbar = norm(H) per copy (the model's norm kind, own weight/bias), Z = Hbar W^T (E, E+2) with
    W = proj.weight, alpha = [A_m | A_r] + s_alpha tanh(Z[:, :E+1]), beta = B + s_beta tanh(Z[:, E+1]).
    Returns alpha (B,T,E,E+1), beta (B,T,E)."""
    Bsz, T, E, _ = H.shape
    A = M.p[pfx + ".alpha.weight"]
    Bv = M.p[pfx + ".beta.weight"]
    if not knob(cfg, "hc_dynamic"):
        return np.broadcast_to(A, (Bsz, T, E, E + 1)), np.broadcast_to(Bv, (Bsz, T, E))
    Z = M.norm(pfx + ".norm", H) @ M.p[pfx + ".proj.weight"].T
    s = M.p[pfx + ".scale.weight"]
    return A + s[0] * np.tanh(Z[..., :E + 1]), Bv + s[1] * np.tanh(Z[..., E + 1])


def wiring_hyper_connections(cfg, S, x0):
    """residual="hyper_connections" (Zhu et al. 2024, arXiv 2409.19606), expansion E.

    H = [x0; ...; x0] (E copies).  Sublayer k, with alpha, beta from hc_weights:
        h_k = sum_i alpha[i,0] H_i                     (A_m^T H: the sublayer's input)
        H'_j = sum_i alpha[i,1+j] H_i                  (A_r^T H: width connections)
        o_k = branch_k(h_k);  H_j <- beta_j o_k + H'_j  (B^T o + H': depth connections)
    Output: sum_j H_j (App. J: the copies are summed before the final norm).
    hidden[i] = sum of the copies entering block i, hidden[n] = the output.
    wiring: {"alpha": L x (B,T,E,E+1), "beta": L x (B,T,E), "streams": L+1 x (B,T,E,d) (the
    copies entering each sublayer, then the final ones), "stream_norms": L+1 x (B,T,E)}."""
    E, L = knob(cfg, "hc_expansion"), 2 * cfg.n_layers
    H = np.repeat(x0[:, :, None, :], E, axis=2)
    tr = {"alpha": [], "beta": [], "streams": [], "stream_norms": []}
    for k in range(L):
        pfx = f"layers.{k // 2}.{'attn' if k % 2 == 0 else 'mlp'}_hc"
        tr["streams"].append(H)
        if k % 2 == 0:
            S.hidden.append(H.sum(axis=2))
        alpha, beta = hc_weights(cfg, S.M, pfx, H)
        mix = np.einsum("btie,btid->bted", alpha, H)  # (B,T,E+1,d) = alpha^T H
        o = S.branch(k, mix[:, :, 0])
        H = beta[..., None] * o[:, :, None, :] + mix[:, :, 1:]
        tr["alpha"].append(alpha)
        tr["beta"].append(beta)
    tr["streams"].append(H)
    tr["stream_norms"] = [np.sqrt((h ** 2).sum(-1)) for h in tr["streams"]]
    x = H.sum(axis=2)
    S.hidden.append(x)
    return x, {"wiring": tr}


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def sinkhorn_knopp(logits, iters):
    """mHC's projection (Sec. 4.2): M^(0) = exp(logits), M^(t) = T_r(T_c(M^(t-1))), t = 1..iters,
    T_c dividing every column by its sum, T_r every row by its sum; returns M^(iters) (..., E, E).
    Rows sum to 1 exactly (T_r is last); columns converge to 1 as iters grows."""
    M = np.exp(logits)
    for _ in range(iters):
        M = M / M.sum(axis=-2, keepdims=True)  # T_c: columns
        M = M / M.sum(axis=-1, keepdims=True)  # T_r: rows
    return M


def mhc_maps(cfg, M, pfx, H):
    """mHC's three maps for one sublayer (Xie et al., DeepSeek, arXiv 2512.24880, Sec. 4.2).

    x = vec(H) (B,T,E*d), copy-major; x' = x / sqrt(mean(x^2) + norm_eps) (RMSNorm, no gain);
    z = x' Phi^T with Phi = proj.weight (E^2+2E, E*d), a = scale.weight, b = base.weight:
        H_pre  = sigmoid(a_0 z[:E] + b[:E])                          (B,T,E)
        H_post = 2 sigmoid(a_1 z[E:2E] + b[E:2E])                    (B,T,E)
        H_res  = SinkhornKnopp(a_2 mat(z[2E:]) + mat(b[2E:]))        (B,T,E,E), mat row-major."""
    Bsz, T, E, d = H.shape
    x = H.reshape(Bsz, T, E * d)
    xr = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps)
    z = xr @ M.p[pfx + ".proj.weight"].T
    a, b = M.p[pfx + ".scale.weight"], M.p[pfx + ".base.weight"]
    pre = sigmoid(a[0] * z[..., :E] + b[:E])
    post = 2.0 * sigmoid(a[1] * z[..., E:2 * E] + b[E:2 * E])
    res_logits = (a[2] * z[..., 2 * E:] + b[2 * E:]).reshape(Bsz, T, E, E)
    return pre, post, sinkhorn_knopp(res_logits, knob(cfg, "mhc_sinkhorn_iters"))


def wiring_mhc(cfg, S, x0):
    """residual="mhc": x_{l+1} = H_res x_l + H_post^T F(H_pre x_l) per sublayer (Sec. 3-4):
        h_k = sum_i H_pre[i] H_i;  o_k = branch_k(h_k);  H_i <- sum_j H_res[i,j] H_j + H_post[i] o_k.
    H starts as E copies of x0 and is summed at the end (as Hyper-Connections).
    wiring: {"pre", "post": L x (B,T,E), "res": L x (B,T,E,E), "streams", "stream_norms"}."""
    E, L = knob(cfg, "hc_expansion"), 2 * cfg.n_layers
    H = np.repeat(x0[:, :, None, :], E, axis=2)
    tr = {"pre": [], "post": [], "res": [], "streams": [], "stream_norms": []}
    for k in range(L):
        pfx = f"layers.{k // 2}.{'attn' if k % 2 == 0 else 'mlp'}_mhc"
        tr["streams"].append(H)
        if k % 2 == 0:
            S.hidden.append(H.sum(axis=2))
        pre, post, res = mhc_maps(cfg, S.M, pfx, H)
        o = S.branch(k, np.einsum("bti,btid->btd", pre, H))
        H = np.einsum("btij,btjd->btid", res, H) + post[..., None] * o[:, :, None, :]
        tr["pre"].append(pre)
        tr["post"].append(post)
        tr["res"].append(res)
    tr["streams"].append(H)
    tr["stream_norms"] = [np.sqrt((h ** 2).sum(-1)) for h in tr["streams"]]
    x = H.sum(axis=2)
    S.hidden.append(x)
    return x, {"wiring": tr}


WIRINGS = {
    "plain": wiring_plain,
    "attnres_full": wiring_attnres,
    "attnres_block": wiring_attnres,
    "denseformer": wiring_denseformer,
    "hyper_connections": wiring_hyper_connections,
    "mhc": wiring_mhc,
}


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def forward(cfg, params, tokens=None, embeds=None, key_padding_mask=None, patch=None):
    """Full forward pass with traces; see the module docstring and DEVELOPERS.md.

    Returns a dict with float64 arrays:
      logits (B,T,V); final_hidden (B,T,d) (after final norm, before the head);
      attention: n arrays (B,H,T,T + 2l*C) (C = moda_chunk; no depth columns without moda);
      hidden: n+1 arrays (B,T,d).  plain: the stream entering block i, hidden[n] = stream after
        the last block, before the final norm.  attnres: hidden[i] = h_{2i} (aggregated input of
        block i's attention sublayer), hidden[n] = the output aggregation, before the final norm;
        denseformer: Y_i; hyper_connections / mhc: the sum of the copies (see the wiring functions);
      attn_out, mlp_out: n arrays (B,T,d): plain / denseformer: a and m (what is added / normed
        with x); attnres / hyper_connections / mhc: the branch outputs of sublayers 2i and 2i+1;
      alpha: attnres only (else None): L+1 arrays (B,T,n_sources_k), the last = output aggregator;
      depth_mass: moda only (else None): n arrays (B,H,T), attention mass on the depth columns;
      wiring: the competitor wirings' traces (else None), see wiring_denseformer & co.
    """
    assert (tokens is None) != (embeds is None), "give exactly one of tokens / embeds"
    assert cfg.residual in WIRINGS, cfg.residual
    M = _Model(cfg, params)
    x0 = M.embed(tokens, embeds)
    x0 = (patch or {}).get("embed", x0)
    S = _Stack(M, key_padding_mask, patch)
    x, extra = WIRINGS[cfg.residual](cfg, S, x0)

    final_hidden = M.norm("final_norm", x) if cfg.final_norm else x
    logits = M.head(final_hidden)
    T = x0.shape[1]
    depth_mass = [pr[..., T:].sum(-1) for pr in S.attention] if cfg.moda else None
    return dict(logits=logits, final_hidden=final_hidden, attention=S.attention, hidden=S.hidden,
                attn_out=S.attn_out, mlp_out=S.mlp_out, alpha=extra.get("alpha"),
                depth_mass=depth_mass, wiring=extra.get("wiring"))


def loss(cfg, params, tokens, targets, **kw):
    """Mean cross-entropy of forward()'s logits against targets (B,T) (all counted)."""
    z = forward(cfg, params, tokens=tokens, **kw)["logits"]
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    t = np.asarray(targets)
    return -np.take_along_axis(logp, t[..., None], axis=-1).mean()
