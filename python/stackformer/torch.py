"""PyTorch mirror of stackformer: the same architectures as a plain ``torch.nn.Module``.

``TorchModel(config)`` implements every mode of ``stackformer.Config`` (see DEVELOPERS.md for the
math) with plain tensor ops, and its ``state_dict()`` has exactly stackformer's names, shapes and
order, so weights move both ways unchanged:

    tm = to_torch(model)          # stackformer.Model -> TorchModel (float32, same weights)
    model = from_torch(tm)        # TorchModel -> stackformer.Model (weights copied exactly)

Importing this module needs PyTorch; nothing else in stackformer does. It is also the readable
reference of the math: MoDA is written as one softmax over [sequence | depth] key columns with a
boolean mask, and Attention Residuals use the direct computation (no two-phase schedule).

Each depth wiring is one class in ``WIRINGS`` (keyed by ``Config.residual``): plain, Attention
Residuals, and the competitor wirings DenseFormer, Hyper-Connections and mHC (docs/WIRINGS.md;
stackformer.Config does not accept their names yet, so only the tests build them for now).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config

__all__ = ["TorchModel", "to_torch", "from_torch"]

_ACT = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 -> fp32 as the C core converts (VCVTNEPS2BF16): round to nearest even,
    zero and denormals to a signed zero (torch's own cast keeps bf16 denormals)."""
    tiny = x.abs() < 2.0 ** -126
    r = x.to(torch.bfloat16).to(x.dtype)
    return torch.where(tiny, torch.zeros_like(x).copysign(x), r)


class _BF16Product(torch.autograd.Function):
    """compute_dtype="bfloat16": y = bf16(x) bf16(w)^T + b with fp32 accumulation; backward
    dx = bf16(dy) bf16(w), dw = bf16(dy)^T bf16(x), db = sum dy (the C core's three products;
    the accumulation order within each sum is torch's, so agreement is to rounding, not bits)."""

    @staticmethod
    def forward(ctx, x, w, b):
        xr, wr = bf16_round(x), bf16_round(w)
        ctx.save_for_backward(xr, wr)
        ctx.has_b = b is not None
        y = xr @ wr.T
        return y + b if b is not None else y

    @staticmethod
    def backward(ctx, dy):
        xr, wr = ctx.saved_tensors
        dyr = bf16_round(dy)
        dx = dyr @ wr
        dw = dyr.reshape(-1, dy.shape[-1]).T @ xr.reshape(-1, xr.shape[-1])
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_b else None
        return dx, dw, db


class _BF16MatMul(torch.autograd.Function):
    """compute_dtype="bfloat16", attention's sequence products: y = bf16(a) @ bf16(b) with fp32
    accumulation (batched); backward da = bf16(dy) @ bf16(b)^T, db = bf16(a)^T @ bf16(dy), as the
    C core's dQ = dS K, dK = dS^T Q (for S = Q K^T) and dP = dO V^T, dV = P^T dO (for O = P V)."""

    @staticmethod
    def forward(ctx, a, b):
        ar, br = bf16_round(a), bf16_round(b)
        ctx.save_for_backward(ar, br)
        return ar @ br

    @staticmethod
    def backward(ctx, dy):
        ar, br = ctx.saved_tensors
        dyr = bf16_round(dy)
        da = dyr @ br.transpose(-1, -2)
        db = ar.transpose(-1, -2) @ dyr
        # b may have been broadcast over a's batch dimensions (it is not here: keys are repeated)
        return da, db


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) whose product follows Config.compute_dtype."""

    def __init__(self, i: int, o: int, bias: bool, c=None):
        super().__init__(i, o, bias=bias)
        self.bf16 = c is not None and getattr(c, "compute_dtype", "float32") == "bfloat16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bf16:
            return _BF16Product.apply(x, self.weight, self.bias)
        return super().forward(x)


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
    def __init__(self, c: Config, extra_slot: bool = False):
        super().__init__()
        self.c = c
        d, dh = c.d_model, c.d_head
        self.q_proj = Linear(d, c.n_heads * dh, c.bias, c)
        self.k_proj = Linear(d, c.n_kv_heads * dh, c.bias, c)
        self.v_proj = Linear(d, c.n_kv_heads * dh, c.bias, c)
        self.o_proj = Linear(c.n_heads * dh, d, c.bias, c)
        if extra_slot:  # moda_depth_kv='attn+ffn+extra': the depth slot from its own projections
            self.depth_k_proj = Linear(d, c.n_kv_heads * dh, False, c)
            self.depth_v_proj = Linear(d, c.n_kv_heads * dh, False, c)

    def forward(self, u, depth, seq_ok, depth_ok, rope):
        """u (B, T, d). depth: MoDA slots written so far, a list of (k, v) each (B, Hkv, T, dh).
        seq_ok (B, T, T) and depth_ok (B, T, T) say which key position a query may read as a
        sequence key / for its depth slots. Returns (output, (k, v) = this layer's depth slot)."""
        c = self.c
        B, T, _ = u.shape
        q = _heads(self.q_proj(u), c.n_heads)
        k = _heads(self.k_proj(u), c.n_kv_heads)
        v = _heads(self.v_proj(u), c.n_kv_heads)
        qd, slot_k = q, None  # the query of the depth logits, this layer's depth key
        if rope is not None:
            if c.moda and c.moda_depth_rope == "none":  # depth logits and slots never rotated
                slot_k = k
            q, k = _rope(q, *rope), _rope(k, *rope)
            qd = q if slot_k is None else qd
        slot_k = k if slot_k is None else slot_k
        slot_v = v
        if hasattr(self, "depth_k_proj"):  # the extra projections replace the sequence K/V
            slot_k, slot_v = _heads(self.depth_k_proj(u), c.n_kv_heads), _heads(self.depth_v_proj(u), c.n_kv_heads)
            if rope is not None and c.moda_depth_rope != "none":  # rotated at its own position
                slot_k = _rope(slot_k, *rope)
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
        if getattr(c, "compute_dtype", "float32") == "bfloat16":
            # the sequence columns' Q K^T and P V on bf16 operands (fp32 accumulation); MoDA's
            # depth columns, the softmax and its gradient stay fp32, as in the C core
            mm = _BF16MatMul.apply
            s_seq = mm(q, keys[:, :, :T].transpose(-1, -2))
            s_dep = qd @ keys[:, :, T:].transpose(-1, -2)
            scores = torch.cat([s_seq, s_dep], dim=-1) / math.sqrt(c.d_head)
            p = _masked_softmax(scores, allowed[:, None])
            o = mm(p[..., :T], values[:, :, :T]) + p[..., T:] @ values[:, :, T:]
            out = o.transpose(1, 2).reshape(B, T, -1)
            return self.o_proj(out), (slot_k, slot_v)
        if qd is q:
            scores = q @ keys.transpose(-1, -2) / math.sqrt(c.d_head)  # (B, H, T, columns)
        else:  # moda_depth_rope='none': rotated sequence logits, unrotated depth logits
            scores = torch.cat([q @ keys[:, :, :T].transpose(-1, -2),
                                qd @ keys[:, :, T:].transpose(-1, -2)], dim=-1) / math.sqrt(c.d_head)
        p = _masked_softmax(scores, allowed[:, None])  # one softmax over [sequence | depth]
        out = (p @ values).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out), (slot_k, slot_v)


class MLP(nn.Module):
    def __init__(self, c: Config, depth_slot: bool):
        super().__init__()
        self.c = c
        d, F_ = c.d_model, c.d_ff
        if c.activation == "swiglu":
            self.gate_proj = Linear(d, F_, c.bias, c)
        self.up_proj = Linear(d, F_, c.bias, c)
        self.down_proj = Linear(F_, d, c.bias, c)
        if depth_slot:  # MoDA: this FFN writes a depth slot (u Wdk^T, u Wdv^T)
            self.depth_k_proj = Linear(d, c.n_kv_heads * c.d_head, False, c)
            self.depth_v_proj = Linear(d, c.n_kv_heads * c.d_head, False, c)

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
        writes = c.moda and i < c.n_layers - 1  # MoDA: this block writes depth slots
        self.attn = Attention(c, extra_slot=writes and c.moda_depth_kv == "attn+ffn+extra")
        self.mlp_norm = norm()
        self.mlp = MLP(c, depth_slot=writes and c.moda_depth_kv != "attn")
        WIRINGS[c.residual].add_block_params(self, c, i)  # e.g. AttnRes w_k, g_k; HC weights


class TorchModel(nn.Module):
    """stackformer's model as a torch.nn.Module: same config, same parameter names and shapes.

    forward(x, key_padding_mask=None) -> logits (B, T, V): x is token ids (T,) / (B, T) or float
    embeddings (B, T, d_model); key_padding_mask (B, T), 1 = real token, 0 = padding. New
    parameters follow stackformer's init distribution (not its RNG: use to_torch for equal weights).
    """

    def __init__(self, config: Config):
        super().__init__()
        self._check_config(config)
        c = self.config = dataclasses.replace(config)
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        if c.pos == "learned":
            self.pos_emb = nn.Embedding(c.max_seq_len, c.d_model)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.wiring = WIRINGS[c.residual](c)  # holds no parameters: names stay layers.{i}.…
        self.wiring.add_model_params(self, c)
        if c.final_norm:
            self.final_norm = Norm(c.d_model, c.norm, c.norm_eps, c.bias)
        if not c.tie_embeddings:
            self.lm_head = Linear(c.d_model, c.vocab_size, False, c)
        self.reset_parameters()

    @staticmethod
    def _check_config(config) -> None:
        if not isinstance(config, Config):
            raise TypeError(f"config must be a stackformer.Config, got {type(config).__name__}")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init as in DEVELOPERS.md: N(0, 0.02), o_proj/down_proj N(0, 0.02/sqrt(2n)),
        biases 0, norm weights 1, AttnRes pseudo-queries 0 and key gains 1; the competitor
        wirings' tensors get their papers' init (docs/WIRINGS.md) from their wiring."""
        for name, p in self.named_parameters():
            if self.wiring.owns(name):
                continue
            if name.endswith(("_res_proj.weight", "_res_logits.weight")):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0 if name.endswith(".weight") else 0.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                out_proj = name.endswith(("o_proj.weight", "down_proj.weight"))
                p.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layers) if out_proj else 0.02)
        self.wiring.reset_parameters(self)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's load_state_dict, also accepting NumPy arrays (e.g. stackformer's state_dict())."""
        sd = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
              for k, v in state_dict.items()}
        return super().load_state_dict(sd, strict=strict, assign=assign)

    def no_decay(self, name: str) -> bool:
        """stackformer's AdamW rule: decay 2-D weights and embeddings only (never norms, biases,
        AttnRes pseudo-queries or gains, nor Hyper-Connections / mHC connection weights; DenseFormer's
        (1, m) DWA weights are decayed, as in the authors' code)."""
        return (self.get_parameter(name).dim() != 2 or "_res_proj" in name or "_res_logits" in name
                or self.wiring.no_decay(name))

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

        x = self.wiring(self, h, att)
        if c.final_norm:
            x = self.final_norm(x)
        head = self.tok_emb.weight if c.tie_embeddings else self.lm_head.weight
        if getattr(c, "compute_dtype", "float32") == "bfloat16":
            return _BF16Product.apply(x, head, None)
        return x @ head.T

    def sublayer(self, k: int, u: torch.Tensor, depth: list, att: dict) -> torch.Tensor:
        """Sublayer k (2i: block i's attention, 2i+1: its MLP) on its input u as it sees it;
        appends the sublayer's MoDA depth slot to depth when moda is on."""
        blk = self.layers[k // 2]
        out, slot = blk.attn(u, depth, **att) if k % 2 == 0 else blk.mlp(u)
        if k % 2 == 1 and slot is not None and att["rope"] is not None and self.config.moda_depth_rope == "own":
            slot = (_rope(slot[0], *att["rope"]), slot[1])  # FFN key rotated at its own position
        if self.config.moda and slot is not None:  # none: an FFN under moda_depth_kv='attn', the last block's
            depth.append(slot)
        return out

    def sublayer_norm(self, k: int) -> "Norm":
        blk = self.layers[k // 2]
        return blk.attn_norm if k % 2 == 0 else blk.mlp_norm

    def branch(self, k: int, h: torch.Tensor, depth: list, att: dict) -> torch.Tensor:
        """Sublayer k as a branch off a wiring's state (AttnRes, Hyper-Connections, mHC):
        pre-norm F_k(Norm_k(h)), post-norm Norm_k(F_k(h))."""
        norm = self.sublayer_norm(k)
        if self.config.norm_position == "pre":
            return self.sublayer(k, norm(h), depth, att)
        return norm(self.sublayer(k, h, depth, att))

    def block(self, i: int, x: torch.Tensor, depth: list, att: dict) -> torch.Tensor:
        """Block i of the plain residual stack on stream x (pre- or post-norm)."""
        blk = self.layers[i]
        if self.config.norm_position == "pre":
            x = x + self.sublayer(2 * i, blk.attn_norm(x), depth, att)
            return x + self.sublayer(2 * i + 1, blk.mlp_norm(x), depth, att)
        x = blk.attn_norm(x + self.sublayer(2 * i, x, depth, att))
        return blk.mlp_norm(x + self.sublayer(2 * i + 1, x, depth, att))

    # -- training helper ------------------------------------------------------------------------
    def loss(self, x, targets, key_padding_mask=None, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy over targets != ignore_index: what stackformer's
        Model.forward_backward returns (targets (B, T) are aligned with the inputs)."""
        logits = self(x, key_padding_mask)
        targets = torch.as_tensor(targets, device=logits.device).long().reshape(logits.shape[:-1])
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index)


def _aggregate(sources, proj: Optional[nn.Linear], gain: Optional[Norm], mixing: str = "softmax",
               heads: int = 1, query: str = "static", logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention Residuals, per token: K_i = RMSNorm(v_i) * g (K_i = v_i without the key norm,
    gain None), alpha = softmax_i(w . K_i) (or sigmoid gates, mixing="sigmoid"),
    h = sum_i alpha_i v_i (no 1/sqrt(d) scaling). The Table 4 ablations: query="input" reads
    with q_t = W x_t (proj a d -> d Linear, x the newest source) instead of the pseudo-query;
    mixing="static" mixes with softmax(logits) (heads, n_sources), the same for every token;
    heads H > 1 gives each d/H columns their own logits over the head's columns and softmax."""
    V = torch.stack(sources, dim=2)  # (B, T, n_sources, d)
    if heads == 1 and query == "static" and mixing != "static":
        s = proj(V if gain is None else gain(V)).squeeze(-1)
        alpha = torch.softmax(s, dim=-1) if mixing == "softmax" else torch.sigmoid(s)
        return (alpha.unsqueeze(-1) * V).sum(dim=2)
    B, T, n, d = V.shape
    Vh = V.reshape(B, T, n, heads, d // heads)
    if mixing == "static":
        s = logits.t().expand(B, T, n, heads)
    else:
        K = (V if gain is None else gain(V)).reshape(B, T, n, heads, d // heads)
        q = proj(sources[-1]) if query == "input" else proj.weight[0].expand(B, T, d)
        s = (K * q.reshape(B, T, 1, heads, d // heads)).sum(-1)  # (B, T, n, H)
    alpha = torch.sigmoid(s) if mixing == "sigmoid" else torch.softmax(s, dim=2)
    return (alpha.unsqueeze(-1) * Vh).sum(dim=2).reshape(B, T, d)


# -- depth wirings -----------------------------------------------------------------------------
#
# A wiring is one nn.Module class in WIRINGS, keyed by Config.residual.  It holds no parameters
# itself: add_block_params / add_model_params attach its tensors to the blocks and the model, so
# state_dict names stay stackformer's (layers.{i}.attn_res_proj.weight, layers.{i}.attn_hc.…);
# forward(model, x0, att) runs the stack through model.sublayer / model.branch / model.block and
# returns the stream before the final norm.  The math is in DEVELOPERS.md and docs/WIRINGS.md.


class _Weight(nn.Module):
    """A bare tensor named ``<module>.weight`` (connection weights that are not a Linear)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape))


class Wiring(nn.Module):
    """Base class of a depth wiring (see the comment above)."""

    prefixes: tuple = ()  # name fragments of the tensors this wiring owns (init, weight decay)

    def __init__(self, c):
        super().__init__()
        self.c = c

    @staticmethod
    def add_block_params(blk: nn.Module, c, i: int) -> None:
        pass

    def add_model_params(self, model: nn.Module, c) -> None:
        pass

    def owns(self, name: str) -> bool:
        """Whether reset_parameters leaves tensor ``name`` to this wiring's reset_parameters."""
        return any(p in name for p in self.prefixes)

    def no_decay(self, name: str) -> bool:
        return False

    @torch.no_grad()
    def reset_parameters(self, model: nn.Module) -> None:
        pass

    def forward(self, model, x0, att):
        raise NotImplementedError


class PlainWiring(Wiring):
    """residual="plain": x = x + a; x = x + m per block (or the post-norm block)."""

    def forward(self, model, x, att):
        depth = []  # MoDA slots [attn_0, ffn_0, ...]
        for i in range(self.c.n_layers):
            x = model.block(i, x, depth, att)
        return x


class AttnResWiring(Wiring):
    """residual="attnres_full" / "attnres_block": h_k = softmax-weighted sum of sublayer k's
    sources, v_{k+1} = branch_k(h_k), one more aggregation for the output."""

    @staticmethod
    def _add_reader(mod, c, s: str, k: int) -> None:
        """One read's tensors: the pseudo-query w_k (a d -> 1 Linear; attnres_query="input":
        d -> d) and the key RMSNorm gain g_k, or with static mixing its logits (H, n_sources)."""
        if c.attnres_mixing == "static":
            setattr(mod, s + "_res_logits", _Weight(c.attnres_heads, len(AttnResWiring(c)._source_ids(k))))
            return
        setattr(mod, s + "_res_proj", nn.Linear(c.d_model, c.d_model if c.attnres_query == "input" else 1, bias=False))
        if c.attnres_key_norm:  # Table 4 "w/o key norm": no norm, no gain
            setattr(mod, s + "_res_norm", Norm(c.d_model, "rmsnorm", c.attnres_eps, False))

    @staticmethod
    def add_block_params(blk, c, i):
        AttnResWiring._add_reader(blk, c, "attn", 2 * i)
        AttnResWiring._add_reader(blk, c, "mlp", 2 * i + 1)

    def add_model_params(self, model, c):
        AttnResWiring._add_reader(model, c, "output", 2 * c.n_layers)

    def _read(self, mod, s: str, srcs):
        c = self.c
        lg = getattr(mod, s + "_res_logits", None)
        return _aggregate(srcs, getattr(mod, s + "_res_proj", None), getattr(mod, s + "_res_norm", None),
                          c.attnres_mixing, c.attnres_heads, c.attnres_query, lg.weight if lg is not None else None)

    def forward(self, model, x0, att):
        depth, v, L = [], [x0], 2 * self.c.n_layers  # v_0 = embedding, v_{k+1} = F_k's output
        for k in range(L):
            blk, s = model.layers[k // 2], "attn" if k % 2 == 0 else "mlp"
            h = self._read(blk, s, self._sources(v, k))
            v.append(model.branch(k, h, depth, att))  # post-norm: v_{k+1} = Norm_k(F_k(h_k))
        return self._read(model, "output", self._sources(v, L))

    def _source_ids(self, k: int) -> List[int]:
        """Positions in the unwindowed source list that read k keeps (attnres_window W: the
        embedding and the last W)."""
        S = 1 if self.c.residual == "attnres_full" else self.c.attnres_block_size
        L = 2 * self.c.n_layers
        n = 1 + -(-k // S) if k >= L else 1 + k // S + (k % S != 0)
        W = self.c.attnres_window
        return list(range(n)) if W is None or n <= 1 + W else [0] + list(range(n - W, n))

    def _sources(self, v: List[torch.Tensor], k: int) -> List[torch.Tensor]:
        """What sublayer k (k = L: the output) reads, given v = [v_0 ... v_k].
        Full: all of v. Block (size S): b_0 = v_0, the sums b_m of each completed block of S
        sublayer outputs, and the partial sum of k's own block so far (if non-empty)."""
        if self.c.residual == "attnres_full":
            out = list(v)
        else:
            S, m = self.c.attnres_block_size, k // self.c.attnres_block_size
            blocks = [v[0]] + [sum(v[j * S + 1:(j + 1) * S + 1]) for j in range(m)]
            partial = v[m * S + 1:k + 1]
            out = blocks + ([sum(partial)] if partial else [])
        return [out[j] for j in self._source_ids(k)]


def dwa_sources(i: int, k: int) -> List[int]:
    """DenseFormer: the X_j (X_0 = embedding, X_{j+1} = block j's output) that the DWA after
    block i averages, ascending: {j <= i+1 : j = i+1 (mod k)} (dilation k, paper Sec. 3.2)."""
    return list(range((i + 1) % k, i + 2, k))


class DenseFormerWiring(Wiring):
    """residual="denseformer" (Pagliardini et al. 2024): plain blocks; after block i, when
    (i+1) % denseformer_period == 0, Y_{i+1} = sum_j dwa[j] X_j over dwa_sources(i, dilation)
    (weights layers.{i}.dwa.weight, shape (1, m), init [0, ..., 0, 1]); else Y_{i+1} = X_{i+1}."""

    prefixes = (".dwa.",)

    @staticmethod
    def add_block_params(blk, c, i):
        if (i + 1) % c.denseformer_period == 0:
            blk.dwa = _Weight(1, len(dwa_sources(i, c.denseformer_dilation)))

    @torch.no_grad()
    def reset_parameters(self, model):
        for blk in model.layers:
            if hasattr(blk, "dwa"):  # identity: all weight on the newest representation
                blk.dwa.weight.zero_()
                blk.dwa.weight[0, -1] = 1.0

    def forward(self, model, x0, att):
        depth, X, y = [], [x0], x0
        for i, blk in enumerate(model.layers):
            X.append(model.block(i, y, depth, att))
            if hasattr(blk, "dwa"):
                w = blk.dwa.weight[0]
                y = sum(w[c] * X[j] for c, j in enumerate(dwa_sources(i, self.c.denseformer_dilation)))
            else:
                y = X[-1]
        return y


class HyperConnection(nn.Module):
    """One sublayer's hyper-connection (Zhu et al. 2024, Sec. 2, App. J), E = hc_expansion:
    alpha.weight (E, E+1) = [A_m | A_r], beta.weight (E,) = B; dynamic: norm (the model's norm
    kind), proj.weight (E+2, d) = rows [W_m, W_r (E), W_beta], scale.weight (2,) = [s_alpha, s_beta]."""

    def __init__(self, c, k: int):
        super().__init__()
        E, d = c.hc_expansion, c.d_model
        self.E, self.k, self.dynamic = E, k, c.hc_dynamic
        self.alpha = _Weight(E, E + 1)
        self.beta = _Weight(E)
        if self.dynamic:
            self.norm = Norm(d, c.norm, c.norm_eps, c.bias)
            self.proj = nn.Linear(d, E + 2, bias=False)
            self.scale = _Weight(2)

    @torch.no_grad()
    def reset_parameters(self):
        """Sec. 2.3: A_m = e_{k mod E}, A_r = I, B = 1; W = 0, s = 0.01 (App. J)."""
        a = self.alpha.weight
        a.zero_()
        a[self.k % self.E, 0] = 1.0
        a[:, 1:] = torch.eye(self.E, dtype=a.dtype, device=a.device)
        self.beta.weight.fill_(1.0)
        if self.dynamic:
            self.norm.weight.fill_(1.0)
            if self.norm.bias is not None:
                self.norm.bias.zero_()
            self.proj.weight.zero_()
            self.scale.weight.fill_(0.01)

    def weights(self, H):
        """H (B, T, E, d) -> alpha (.., E, E+1), beta (.., E)."""
        alpha, beta = self.alpha.weight, self.beta.weight
        if self.dynamic:
            z = self.proj(self.norm(H))  # (B, T, E, E+2)
            s = self.scale.weight
            alpha = alpha + s[0] * torch.tanh(z[..., :self.E + 1])
            beta = beta + s[1] * torch.tanh(z[..., self.E + 1])
        return alpha, beta


class HyperConnectionsWiring(Wiring):
    """residual="hyper_connections": E copies H of the stream. Per sublayer k:
    h = A_m^T H, H' = A_r^T H, o = branch_k(h), H <- B^T o + H'. Output: the copies' sum."""

    prefixes = ("_hc.",)

    @staticmethod
    def add_block_params(blk, c, i):
        blk.attn_hc = HyperConnection(c, 2 * i)
        blk.mlp_hc = HyperConnection(c, 2 * i + 1)

    def no_decay(self, name):
        return "_hc." in name

    @torch.no_grad()
    def reset_parameters(self, model):
        for blk in model.layers:
            blk.attn_hc.reset_parameters()
            blk.mlp_hc.reset_parameters()

    def forward(self, model, x0, att):
        depth, E = [], self.c.hc_expansion
        H = x0.unsqueeze(2).expand(*x0.shape[:2], E, x0.shape[-1])
        for k in range(2 * self.c.n_layers):
            blk = model.layers[k // 2]
            hc = blk.attn_hc if k % 2 == 0 else blk.mlp_hc
            alpha, beta = hc.weights(H)
            mix = alpha.transpose(-1, -2) @ H  # (B, T, E+1, d)
            o = model.branch(k, mix[..., 0, :], depth, att)
            H = beta.unsqueeze(-1) * o.unsqueeze(-2) + mix[..., 1:, :]
        return H.sum(dim=2)


def sinkhorn_knopp(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """mHC Sec. 4.2: M = exp(logits), then iters times columns to sum 1, then rows (T_r(T_c(M)));
    autograd differentiates through every iteration."""
    M = logits.exp()
    for _ in range(iters):
        M = M / M.sum(dim=-2, keepdim=True)
        M = M / M.sum(dim=-1, keepdim=True)
    return M


class ManifoldHyperConnection(nn.Module):
    """One sublayer's mHC maps (Xie et al., DeepSeek 2025, Sec. 4.2), E = hc_expansion:
    proj.weight (E^2+2E, E*d) = [phi_pre | phi_post | phi_res]^T, base.weight (E^2+2E,) = biases,
    scale.weight (3,) = [alpha_pre, alpha_post, alpha_res]."""

    def __init__(self, c):
        super().__init__()
        E, d = c.hc_expansion, c.d_model
        self.E, self.eps, self.iters = E, c.norm_eps, c.mhc_sinkhorn_iters
        self.proj = nn.Linear(E * d, E * E + 2 * E, bias=False)
        self.base = _Weight(E * E + 2 * E)
        self.scale = _Weight(3)

    @torch.no_grad()
    def reset_parameters(self):
        """phi = 0, alphas 0.01; b_pre = -log(E-1) (H_pre = 1/E), b_post = 0 (H_post = 1), b_res = 0."""
        self.proj.weight.zero_()
        self.base.weight.zero_()
        self.base.weight[:self.E] = -math.log(self.E - 1)
        self.scale.weight.fill_(0.01)

    def maps(self, H):
        """H (B, T, E, d) -> H_pre (.., E), H_post (.., E), H_res (.., E, E)."""
        E = self.E
        x = H.flatten(-2)  # vec: copy-major
        z = self.proj(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        a, b = self.scale.weight, self.base.weight
        pre = torch.sigmoid(a[0] * z[..., :E] + b[:E])
        post = 2.0 * torch.sigmoid(a[1] * z[..., E:2 * E] + b[E:2 * E])
        res = (a[2] * z[..., 2 * E:] + b[2 * E:]).unflatten(-1, (E, E))
        return pre, post, sinkhorn_knopp(res, self.iters)


class MHCWiring(Wiring):
    """residual="mhc": per sublayer k, h = H_pre H, o = branch_k(h), H <- H_res H + H_post^T o.
    Output: the copies' sum."""

    prefixes = ("_mhc.",)

    @staticmethod
    def add_block_params(blk, c, i):
        blk.attn_mhc = ManifoldHyperConnection(c)
        blk.mlp_mhc = ManifoldHyperConnection(c)

    def no_decay(self, name):
        return "_mhc." in name

    @torch.no_grad()
    def reset_parameters(self, model):
        for blk in model.layers:
            blk.attn_mhc.reset_parameters()
            blk.mlp_mhc.reset_parameters()

    def forward(self, model, x0, att):
        depth, E = [], self.c.hc_expansion
        H = x0.unsqueeze(2).expand(*x0.shape[:2], E, x0.shape[-1])
        for k in range(2 * self.c.n_layers):
            blk = model.layers[k // 2]
            pre, post, res = (blk.attn_mhc if k % 2 == 0 else blk.mlp_mhc).maps(H)
            o = model.branch(k, (pre.unsqueeze(-1) * H).sum(dim=2), depth, att)
            H = res @ H + post.unsqueeze(-1) * o.unsqueeze(-2)
        return H.sum(dim=2)


WIRINGS = {
    "plain": PlainWiring,
    "attnres_full": AttnResWiring,
    "attnres_block": AttnResWiring,
    "denseformer": DenseFormerWiring,
    "hyper_connections": HyperConnectionsWiring,
    "mhc": MHCWiring,
}


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
