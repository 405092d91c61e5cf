"""PyTorch mirror of stackformer: the same architectures as a plain ``torch.nn.Module``.

``TorchModel(config)`` implements every mode of ``stackformer.Config`` (see DEVELOPERS.md for the
math) with plain tensor ops, and its ``state_dict()`` has exactly stackformer's names, shapes and
order, so weights move both ways unchanged:

    tm = to_torch(model)          # stackformer.Model -> TorchModel (float32, same weights)
    model = from_torch(tm)        # TorchModel -> stackformer.Model (weights copied exactly)

Importing this module needs PyTorch; nothing else in stackformer does. It is also the readable
reference of the math: MoDA is written as one softmax over [sequence | depth] key columns with a
boolean mask, and Attention Residuals use the direct computation (no two-phase schedule).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config

__all__ = ["TorchModel", "to_torch", "from_torch"]

_ACT = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dimension: `weight` (d,), `bias` for LayerNorm with bias."""

    def __init__(self, d: int, kind: str, eps: float, bias: bool):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(d))
        self.register_parameter("bias", nn.Parameter(torch.zeros(d)) if kind == "layernorm" and bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, n*dh) -> (B, n, T, dh)."""
    B, T, _ = x.shape
    return x.view(B, T, n, -1).transpose(1, 2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: (x_j, x_{j+dh/2}) -> (x_j cos - x_{j+dh/2} sin, x_{j+dh/2} cos + x_j sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _masked_softmax(s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the allowed entries of the last axis; a row with none allowed becomes 0."""
    empty = ~allowed.any(-1, keepdim=True)
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(empty, 0.0)  # no NaN rows
    return torch.softmax(s, dim=-1).masked_fill(empty, 0.0)


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        d, dh = c.d_model, c.d_head
        self.q_proj = nn.Linear(d, c.n_heads * dh, bias=c.bias)
        self.k_proj = nn.Linear(d, c.n_kv_heads * dh, bias=c.bias)
        self.v_proj = nn.Linear(d, c.n_kv_heads * dh, bias=c.bias)
        self.o_proj = nn.Linear(c.n_heads * dh, d, bias=c.bias)

    def forward(self, u, depth, seq_ok, depth_ok, rope):
        """u (B, T, d). depth: MoDA slots written so far, a list of (k, v) each (B, Hkv, T, dh).
        seq_ok (B, T, T) and depth_ok (B, T, T) say which key position a query may read as a
        sequence key / for its depth slots. Returns (output, (k, v) = this layer's depth slot)."""
        c = self.c
        B, T, _ = u.shape
        q = _heads(self.q_proj(u), c.n_heads)
        k = _heads(self.k_proj(u), c.n_kv_heads)
        v = _heads(self.v_proj(u), c.n_kv_heads)
        if rope is not None:
            q, k = _rope(q, *rope), _rope(k, *rope)
        keys, values, allowed = k, v, seq_ok
        if depth:  # MoDA: T*S depth columns, column u*S + s = slot s of position u
            S = len(depth)
            kd = torch.stack([s[0] for s in depth], dim=3).flatten(2, 3)  # (B, Hkv, T*S, dh)
            vd = torch.stack([s[1] for s in depth], dim=3).flatten(2, 3)
            keys, values = torch.cat([k, kd], dim=2), torch.cat([v, vd], dim=2)
            if c.moda_depth_only:
                seq_ok = torch.zeros_like(seq_ok)
            allowed = torch.cat([seq_ok, depth_ok.repeat_interleave(S, dim=-1)], dim=-1)
        G = c.n_heads // c.n_kv_heads  # query head h reads kv head h // G
        keys, values = keys.repeat_interleave(G, dim=1), values.repeat_interleave(G, dim=1)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(c.d_head)  # (B, H, T, columns)
        p = _masked_softmax(scores, allowed[:, None])  # one softmax over [sequence | depth]
        out = (p @ values).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, c: Config, depth_slot: bool):
        super().__init__()
        self.c = c
        d, F_ = c.d_model, c.d_ff
        if c.activation == "swiglu":
            self.gate_proj = nn.Linear(d, F_, bias=c.bias)
        self.up_proj = nn.Linear(d, F_, bias=c.bias)
        self.down_proj = nn.Linear(F_, d, bias=c.bias)
        if depth_slot:  # MoDA: this FFN writes a depth slot (u Wdk^T, u Wdv^T)
            self.depth_k_proj = nn.Linear(d, c.n_kv_heads * c.d_head, bias=False)
            self.depth_v_proj = nn.Linear(d, c.n_kv_heads * c.d_head, bias=False)

    def forward(self, u):
        """u (B, T, d) -> (output, depth slot (k, v) or None)."""
        c = self.c
        if c.activation == "swiglu":
            hid = F.silu(self.gate_proj(u)) * self.up_proj(u)
        else:
            hid = _ACT[c.activation](self.up_proj(u))
        slot = None
        if hasattr(self, "depth_k_proj"):
            slot = (_heads(self.depth_k_proj(u), c.n_kv_heads), _heads(self.depth_v_proj(u), c.n_kv_heads))
        return self.down_proj(hid), slot


class Block(nn.Module):
    def __init__(self, c: Config, i: int):
        super().__init__()
        norm = lambda: Norm(c.d_model, c.norm, c.norm_eps, c.bias)  # noqa: E731
        self.attn_norm = norm()
        self.attn = Attention(c)
        self.mlp_norm = norm()
        self.mlp = MLP(c, depth_slot=c.moda and i < c.n_layers - 1)
        if c.residual != "plain":  # AttnRes pseudo-queries w_k and key RMSNorm gains g_k
            self.attn_res_proj = nn.Linear(c.d_model, 1, bias=False)
            self.attn_res_norm = Norm(c.d_model, "rmsnorm", c.attnres_eps, False)
            self.mlp_res_proj = nn.Linear(c.d_model, 1, bias=False)
            self.mlp_res_norm = Norm(c.d_model, "rmsnorm", c.attnres_eps, False)


class TorchModel(nn.Module):
    """stackformer's model as a torch.nn.Module: same config, same parameter names and shapes.

    forward(x, key_padding_mask=None) -> logits (B, T, V): x is token ids (T,) / (B, T) or float
    embeddings (B, T, d_model); key_padding_mask (B, T), 1 = real token, 0 = padding. New
    parameters follow stackformer's init distribution (not its RNG: use to_torch for equal weights).
    """

    def __init__(self, config: Config):
        super().__init__()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a stackformer.Config, got {type(config).__name__}")
        c = self.config = dataclasses.replace(config)
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        if c.pos == "learned":
            self.pos_emb = nn.Embedding(c.max_seq_len, c.d_model)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        if c.residual != "plain":
            self.output_res_proj = nn.Linear(c.d_model, 1, bias=False)
            self.output_res_norm = Norm(c.d_model, "rmsnorm", c.attnres_eps, False)
        if c.final_norm:
            self.final_norm = Norm(c.d_model, c.norm, c.norm_eps, c.bias)
        if not c.tie_embeddings:
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init as in DEVELOPERS.md: N(0, 0.02), o_proj/down_proj N(0, 0.02/sqrt(2n)),
        biases 0, norm weights 1, AttnRes pseudo-queries 0 and key gains 1."""
        for name, p in self.named_parameters():
            if name.endswith("_res_proj.weight"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0 if name.endswith(".weight") else 0.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                out_proj = name.endswith(("o_proj.weight", "down_proj.weight"))
                p.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layers) if out_proj else 0.02)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's load_state_dict, also accepting NumPy arrays (e.g. stackformer's state_dict())."""
        sd = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
              for k, v in state_dict.items()}
        return super().load_state_dict(sd, strict=strict, assign=assign)

    def no_decay(self, name: str) -> bool:
        """stackformer's AdamW rule: decay 2-D weights and embeddings only (never norms, biases,
        AttnRes pseudo-queries or gains)."""
        return self.get_parameter(name).dim() != 2 or "_res_proj" in name

    def param_groups(self, weight_decay: float) -> List[Dict[str, Any]]:
        """Parameter groups for torch.optim.AdamW with stackformer's decay rule."""
        named = [(self.no_decay(n), p) for n, p in self.named_parameters()]
        return [{"params": [p for nd, p in named if not nd], "weight_decay": weight_decay},
                {"params": [p for nd, p in named if nd], "weight_decay": 0.0}]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x, key_padding_mask=None) -> torch.Tensor:
        c = self.config
        dtype, dev = self.tok_emb.weight.dtype, self.tok_emb.weight.device
        x = torch.as_tensor(x, device=dev)
        if x.is_floating_point():
            h = x.to(dtype)  # embeddings given directly (P is still added)
        else:
            x = x.long()
            h = self.tok_emb(x[None] if x.dim() == 1 else x)
        B, T, d = h.shape
        if T > c.max_seq_len:
            raise ValueError(f"sequence length T={T} exceeds max_seq_len={c.max_seq_len}")
        t = torch.arange(T, device=dev)
        if c.pos == "learned":
            h = h + self.pos_emb.weight[:T]
        elif c.pos == "sinusoidal":  # P[t, 2i] = sin(t/10000^(2i/d)), P[t, 2i+1] = cos(...)
            ang = t[:, None].double() / 10000.0 ** (torch.arange(0, d, 2, device=dev).double() / d)
            h = h + torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(1).to(dtype)
        rope = None
        if c.pos == "rope":  # theta_j = t * rope_theta^(-2j/dh), j < dh/2
            j = torch.arange(c.d_head // 2, device=dev).double()
            ang = t[:, None].double() * c.rope_theta ** (-2.0 * j / c.d_head)
            rope = (ang.cos().to(dtype), ang.sin().to(dtype))

        # Visibility, [query t, key position u]: a padded position exposes no key at all.
        real = (torch.ones(B, T, dtype=torch.bool, device=dev) if key_padding_mask is None
                else torch.as_tensor(key_padding_mask, device=dev).reshape(B, T).bool())
        u_pos, t_pos = t[None, :], t[:, None]
        seq_ok = (u_pos <= t_pos if c.causal else torch.ones(T, T, dtype=torch.bool, device=dev))
        seq_ok = seq_ok[None] & real[:, None, :]
        # MoDA: depth slots of positions u <= t in t's chunk (also for encoders).
        chunk = c.moda_chunk
        depth_ok = ((u_pos <= t_pos) & (u_pos // chunk == t_pos // chunk))[None] & real[:, None, :]
        att = dict(seq_ok=seq_ok, depth_ok=depth_ok, rope=rope)

        x = self._plain(h, att) if c.residual == "plain" else self._attnres(h, att)
        if c.final_norm:
            x = self.final_norm(x)
        head = self.tok_emb.weight if c.tie_embeddings else self.lm_head.weight
        return x @ head.T

    def _plain(self, x, att):
        pre, depth = self.config.norm_position == "pre", []  # depth: [attn_0, ffn_0, ...] (MoDA)
        for blk in self.layers:
            if pre:
                a, slot_a = blk.attn(blk.attn_norm(x), depth, **att)
                x = x + a
                m, slot_f = blk.mlp(blk.mlp_norm(x))
                x = x + m
            else:
                a, slot_a = blk.attn(x, depth, **att)
                x = blk.attn_norm(x + a)
                m, slot_f = blk.mlp(x)
                x = blk.mlp_norm(x + m)
            if self.config.moda:
                depth += [slot_a, slot_f]
        return x

    def _attnres(self, x0, att):
        c = self.config
        pre, depth, v = c.norm_position == "pre", [], [x0]  # v_0 = embedding, v_{k+1} = F_k's output
        for k in range(2 * c.n_layers):
            blk, is_attn = self.layers[k // 2], k % 2 == 0
            if is_attn:
                proj, gain, norm, fn = blk.attn_res_proj, blk.attn_res_norm, blk.attn_norm, blk.attn
            else:
                proj, gain, norm, fn = blk.mlp_res_proj, blk.mlp_res_norm, blk.mlp_norm, blk.mlp
            h = _aggregate(self._sources(v, k), proj, gain)
            u = norm(h) if pre else h
            out, slot = fn(u, depth, **att) if is_attn else fn(u)
            v.append(out if pre else norm(out))  # post-norm: v_{k+1} = Norm_k(F_k(h_k))
            if c.moda:
                depth.append(slot)
        return _aggregate(self._sources(v, 2 * c.n_layers), self.output_res_proj, self.output_res_norm)

    def _sources(self, v: List[torch.Tensor], k: int) -> List[torch.Tensor]:
        """What sublayer k (k = L: the output) reads, given v = [v_0 ... v_k].
        Full: all of v. Block (size S): b_0 = v_0, the sums b_m of each completed block of S
        sublayer outputs, and the partial sum of k's own block so far (if non-empty)."""
        if self.config.residual == "attnres_full":
            return list(v)
        S, m = self.config.attnres_block_size, k // self.config.attnres_block_size
        blocks = [v[0]] + [sum(v[j * S + 1:(j + 1) * S + 1]) for j in range(m)]
        partial = v[m * S + 1:k + 1]
        return blocks + ([sum(partial)] if partial else [])

    # -- training helper ------------------------------------------------------------------------
    def loss(self, x, targets, key_padding_mask=None, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy over targets != ignore_index: what stackformer's
        Model.forward_backward returns (targets (B, T) are aligned with the inputs)."""
        logits = self(x, key_padding_mask)
        targets = torch.as_tensor(targets, device=logits.device).long().reshape(logits.shape[:-1])
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index)


def _aggregate(sources, proj: nn.Linear, gain: Norm) -> torch.Tensor:
    """Attention Residuals, per token: K_i = RMSNorm(v_i) * g, alpha = softmax_i(w . K_i),
    h = sum_i alpha_i v_i (no 1/sqrt(d) scaling)."""
    V = torch.stack(sources, dim=2)  # (B, T, n_sources, d)
    alpha = torch.softmax(proj(gain(V)).squeeze(-1), dim=-1)
    return (alpha.unsqueeze(-1) * V).sum(dim=2)


def to_torch(model, dtype: torch.dtype = torch.float32, device=None) -> TorchModel:
    """A TorchModel with the config and weights of a stackformer.Model."""
    from ._checks import check_model
    check_model("model", model)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    tm = TorchModel(model.config)
    tm.load_state_dict(model.state_dict())
    return tm.to(device=device, dtype=dtype)


def from_torch(module: TorchModel, seed: int = 0):
    """A stackformer.Model with the config and weights of a TorchModel (cast to float32)."""
    from .model import Model

    if not isinstance(module, TorchModel):
        raise TypeError(f"expected a stackformer.torch.TorchModel, got {type(module).__name__}")
    model = Model(module.config, seed=seed)
    model.load_state_dict({k: v.detach().to("cpu", torch.float32).numpy()
                           for k, v in module.state_dict().items()})
    return model
