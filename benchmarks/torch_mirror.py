"""PyTorch counterparts of stackformer models, for benchmarks/bench.py.

`build(model)` returns (torch.nn.Module, impl_name). It uses `stackformer.torch.to_torch` when
that module exists (it mirrors every architecture); otherwise it falls back to the minimal
mirror below, which covers only the plain pre-norm stack the benchmark needs as a baseline:
LayerNorm, exact GELU MLP, learned positions, tied head, causal multi-head attention via
F.scaled_dot_product_attention (PyTorch's fused CPU flash-attention kernel). Parameter names
equal stackformer's state_dict names, so the weights load with strict=True.
"""
from __future__ import annotations

import importlib
from typing import Any, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class _Attn(nn.Module):
    def __init__(self, d: int, n_heads: int, bias: bool):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        B, T, d = u.shape
        H = self.n_heads
        q = self.q_proj(u).view(B, T, H, d // H).transpose(1, 2)
        k = self.k_proj(u).view(B, T, H, d // H).transpose(1, 2)
        v = self.v_proj(u).view(B, T, H, d // H).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, d))


class _MLP(nn.Module):
    def __init__(self, d: int, d_ff: int, bias: bool):
        super().__init__()
        self.up_proj = nn.Linear(d, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d, bias=bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(u)))


class _Block(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = _Attn(cfg.d_model, cfg.n_heads, cfg.bias)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = _MLP(cfg.d_model, cfg.d_ff, cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class PlainMirror(nn.Module):
    """Pre-norm LayerNorm / GELU / learned positions / tied head / causal MHA."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.layers = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb.weight[:T]
        for layer in self.layers:
            x = layer(x)
        return F.linear(self.final_norm(x), self.tok_emb.weight)


def mirror_supports(cfg: Any) -> Tuple[bool, str]:
    need = dict(residual="plain", moda=False, norm="layernorm", norm_position="pre",
                activation="gelu", pos="learned", tie_embeddings=True, final_norm=True,
                causal=True)
    bad = [f"{k}={getattr(cfg, k)!r}" for k, v in need.items() if getattr(cfg, k) != v]
    if cfg.n_kv_heads != cfg.n_heads:
        bad.append(f"n_kv_heads={cfg.n_kv_heads}")
    if bad:
        return False, "the minimal mirror covers only the plain pre-norm stack (" + ", ".join(bad) + ")"
    return True, ""


def have_to_torch() -> bool:
    try:
        mod = importlib.import_module("stackformer.torch")
    except Exception:
        return False
    return hasattr(mod, "to_torch")


def build(model: Any, impl: str = "auto") -> Tuple[nn.Module, str]:
    """torch module with the same weights as the stackformer `model`, and which impl built it.
    impl: "auto" (stackformer.torch.to_torch when present, else the mirror), "to_torch", "mirror"."""
    if impl in ("auto", "to_torch") and have_to_torch():
        from stackformer.torch import to_torch  # type: ignore
        return to_torch(model), "stackformer.torch.to_torch"
    if impl == "to_torch":
        raise RuntimeError("stackformer.torch.to_torch is not available")
    ok, why = mirror_supports(model.config)
    if not ok:
        raise NotImplementedError(why)
    m = PlainMirror(model.config)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.state_dict().items()}
    m.load_state_dict(sd, strict=True)
    return m, "benchmarks/torch_mirror.PlainMirror"


def logits_of(out: Any) -> torch.Tensor:
    """Accept a tensor, an object with .logits, or a tuple whose first entry is the logits."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    raise TypeError(f"cannot find logits in a {type(out).__name__}")


def adamw_for(module: nn.Module, model: Any, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
              weight_decay: float = 0.1, **kw: Any) -> torch.optim.Optimizer:
    """AdamW with stackformer's decay split: decay exactly the tensors model.no_decay() says."""
    decay, no_decay = [], []
    names = set(model.named_parameters())
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        nd = model.no_decay(name) if name in names else p.ndim < 2
        (no_decay if nd else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)
