"""The benchmark matrix: configs, modes, batches and the analytic FLOP count."""
from typing import Any, Dict, Optional, Tuple

import numpy as np

# ---------------------------------------------------------------------------------------------
# the benchmark matrix

CONFIGS: Dict[str, Dict[str, int]] = {
    "S": dict(vocab_size=256, d_model=128, n_heads=4, n_layers=8, T=128, B=16),
    "M": dict(vocab_size=256, d_model=384, n_heads=6, n_layers=12, T=256, B=8),
    "Deep": dict(vocab_size=256, d_model=128, n_heads=4, n_layers=48, T=128, B=8),
    "Long": dict(vocab_size=256, d_model=256, n_heads=4, n_layers=4, T=2048, B=1),
}
MODES: Dict[str, Dict[str, Any]] = {
    "plain": {},
    "attnres_full": dict(residual="attnres_full"),
    "attnres_block": dict(residual="attnres_block", attnres_block_size=4),
    "moda": dict(moda=True),
    # the competitor wirings (issue #19's overhead targets: M train step vs plain)
    "denseformer": dict(residual="denseformer"),
    "hyper_connections": dict(residual="hyper_connections", hc_expansion=4),
    "mhc": dict(residual="mhc", hc_expansion=4),
}
# PyTorch peers, each in its own worker state: eager (sdpa: benchmarks/torch_mirror.py, plain
# only; to_torch: stackformer.torch, every mode), torch.compile (inductor) of the best eager
# module for the mode, and eager under torch.autocast("cpu", dtype=torch.bfloat16)
TORCH_PEERS = ("sdpa", "to_torch", "compile", "autocast")
LR = 1e-3  # train step: AdamW lr; betas (0.9, 0.95), eps 1e-8, weight decay 0.1, clip 1.0 (stackformer's defaults)
GEN_PROMPT = 32
GEN_NEW = 256
LONG_SHORT_T = 1024
TORCH_MEM_LIMIT = 4 << 30  # skip a PyTorch case whose explicit attention tensors would exceed this



def make_config(name: str, mode: str, T: Optional[int] = None, max_seq_len: Optional[int] = None, **extra: Any):
    """The Config of (config, mode); extra overrides (e.g. n_kv_heads=2 for M-GQA,
    compute_dtype="bfloat16")."""
    import stackformer as sf
    spec = CONFIGS[name]
    T = T or spec["T"]
    kw = dict(vocab_size=spec["vocab_size"], d_model=spec["d_model"], n_heads=spec["n_heads"],
              n_layers=spec["n_layers"], max_seq_len=max_seq_len or max(T, spec["T"]))
    kw.update(MODES[mode])
    kw.update(extra)
    return sf.Config(**kw)


def make_batch(V: int, B: int, T: int, seed: int = 1234) -> Tuple[np.ndarray, np.ndarray]:
    tok = np.random.default_rng(seed).integers(0, V, (B, T + 1)).astype(np.int64)
    return np.ascontiguousarray(tok[:, :-1]), np.ascontiguousarray(tok[:, 1:])


def flops(cfg, B: int, T: int) -> Dict[str, float]:
    """Analytic FLOPs (2 per multiply-add). linear: every Linear + the head; attn: the score
    and value products over visible keys (causal: T(T+1)/2 pairs) incl. MoDA depth slots.
    Train = 3 x forward (backward does two products per forward product); recompute and
    elementwise work are not counted."""
    d, H, n, F, V = cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff, cfg.vocab_size
    dh = d // H
    qd, kvd = H * dh, cfg.n_kv_heads * dh
    N = B * T
    per_layer = d * qd + 2 * d * kvd + qd * d + d * F * (2 if cfg.activation == "swiglu" else 1) + F * d
    lin = 2.0 * N * per_layer * n + 2.0 * N * d * V
    if cfg.moda:
        lin += 2.0 * N * (2 * d * kvd) * (n - 1)
    pairs = T * (T + 1) / 2 if cfg.causal else T * T
    attn = 2.0 * 2.0 * B * H * dh * pairs * n
    if cfg.moda:  # layer l reads 2l depth slots per query (chunk 1)
        attn += 2.0 * 2.0 * B * H * dh * T * sum(2 * l for l in range(n))
    return {"fwd_linear": lin, "fwd_attn": attn, "fwd": lin + attn, "train": 3.0 * (lin + attn)}


def torch_attn_bytes(cfg, B: int, T: int, train: bool) -> float:
    """Rough size of the explicit tensors stackformer.torch materializes that grow with T*T or
    with depth: attention scores, masked copy and probabilities (MoDA appends T x n_slots depth
    columns to every query row) and, under AttnRes, the stacked sources of each aggregation.
    All layers count when training (kept for backward), the largest one for a forward. Used
    to skip cases that would not fit in memory."""
    tot, mx = 0.0, 0.0
    L = 2 * cfg.n_layers
    for l in range(cfg.n_layers):
        cols = T + (T * 2 * l if cfg.moda else 0)
        b = 4.0 * B * cfg.n_heads * T * cols * 4
        tot += b
        mx = max(mx, b)
    if cfg.residual != "plain":
        S = cfg.attnres_block_size
        for k in range(L + 1):
            ns = k + 1 if cfg.residual == "attnres_full" else 1 + k // S + (k % S != 0)
            b = 3.0 * ns * B * T * cfg.d_model * 4
            tot += b
            mx = max(mx, b)
    return tot if train else mx


# ---------------------------------------------------------------------------------------------
