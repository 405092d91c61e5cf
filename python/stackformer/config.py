"""Model configuration: one dataclass, every knob validated with a message naming it."""
from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np

# String choices and the C enum values they map to (csrc/sf.h).
POS = {"none": 0, "learned": 1, "sinusoidal": 2, "rope": 3}
ACTIVATION = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "swiglu": 3}
NORM = {"layernorm": 0, "rmsnorm": 1}
NORM_POSITION = {"pre": 1, "post": 0}
RESIDUAL = {"plain": 0, "attnres_full": 1, "attnres_block": 2}


@dataclass
class Config:
    """Architecture of a stack. Sizes: d_model = n_heads * d_head; d_ff defaults to 4*d_model.

    vocab_size, d_model, n_heads, n_layers, max_seq_len: the sizes (n_layers counts blocks;
        each block is an attention sublayer and an MLP sublayer).
    n_kv_heads: grouped-query attention (None = n_heads); n_heads % n_kv_heads == 0.
    causal: True for a decoder (causal mask), False for an encoder (bidirectional).
    pos: "learned" | "sinusoidal" | "rope" | "none".
    activation: "gelu" (exact) | "gelu_tanh" | "relu" | "swiglu".
    norm: "layernorm" | "rmsnorm"; norm_position: "pre" | "post".
    bias: biases in linears and LayerNorms. final_norm: norm before the head.
    tie_embeddings: head shares tok_emb.weight.
    residual: "plain" | "attnres_full" | "attnres_block" (Attention Residuals, block size
        attnres_block_size counted in sublayers).
    moda: Mixture-of-Depths Attention; moda_chunk: depth slots visible within chunks of that
        many positions (1 = same position only); moda_depth_only: depth-only ablation.
    attn_dropout, resid_dropout: dropout on attention probabilities / on every sublayer's
        output, applied in training steps only (forward calls never drop); off by default.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    max_seq_len: int = 256
    n_kv_heads: Optional[int] = None
    d_ff: Optional[int] = None
    causal: bool = True
    pos: str = "learned"
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_position: str = "pre"
    bias: bool = True
    final_norm: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    residual: str = "plain"
    attnres_block_size: int = 4
    attnres_eps: float = 1e-6
    moda: bool = False
    moda_chunk: int = 1
    moda_depth_only: bool = False
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None and _is_int(self.d_model):
            self.d_ff = 4 * self.d_model
        self.validate()

    # -- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field."""
        ints = ["vocab_size", "d_model", "n_heads", "n_layers", "max_seq_len", "n_kv_heads",
                "d_ff", "attnres_block_size", "moda_chunk"]
        for name in ints:
            v = getattr(self, name)
            if not _is_int(v):
                raise TypeError(f"Config.{name} must be an int, got {type(v).__name__} {v!r}")
            if v < 1:
                raise ValueError(f"Config.{name} must be >= 1, got {v}")
        for name in ["causal", "bias", "final_norm", "tie_embeddings", "moda", "moda_depth_only"]:
            v = getattr(self, name)
            if not isinstance(v, (bool,)) and not (isinstance(v, numbers.Integral) and v in (0, 1)):
                raise TypeError(f"Config.{name} must be a bool, got {v!r}")
        for name, choices in [("pos", POS), ("activation", ACTIVATION), ("norm", NORM),
                              ("norm_position", NORM_POSITION), ("residual", RESIDUAL)]:
            v = getattr(self, name)
            if not isinstance(v, str) or v not in choices:
                raise ValueError(f"Config.{name} must be one of {sorted(choices)}, got {v!r}")
        for name in ["norm_eps", "attnres_eps"]:
            v = getattr(self, name)
            # the C core computes in float32: the value must survive the conversion
            if not isinstance(v, numbers.Real) or not (0 < float(v) < 1) or float(np.float32(v)) <= 0:
                raise ValueError(f"Config.{name} must be a float in (0, 1) representable in float32, got {v!r}")
        for name in ["attn_dropout", "resid_dropout"]:
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not (0.0 <= float(v) < 1.0):
                raise ValueError(f"Config.{name} must be a float in [0, 1), got {v!r}")
        if not isinstance(self.rope_theta, numbers.Real) or not (1 < float(self.rope_theta) < 1e30):
            raise ValueError(f"Config.rope_theta must be a float > 1, got {self.rope_theta!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"Config.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"Config.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.pos == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"Config.pos='rope' needs an even head dimension, got d_model/n_heads = {self.d_model // self.n_heads}")
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"Config.pos='sinusoidal' needs an even d_model, got {self.d_model}")
        if self.moda_depth_only and not self.moda:
            raise ValueError("Config.moda_depth_only=True needs moda=True")
        if self.moda_chunk > self.max_seq_len:
            raise ValueError(f"Config.moda_chunk ({self.moda_chunk}) must be <= max_seq_len ({self.max_seq_len})")

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_sublayers(self) -> int:
        return 2 * self.n_layers

    # -- serialization ---------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "Config":
        try:
            d = json.loads(s)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def _c_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of stackformer._core.CModel (C enum values)."""
        return dict(
            vocab_size=int(self.vocab_size), d_model=int(self.d_model), n_heads=int(self.n_heads),
            n_kv_heads=int(self.n_kv_heads), n_layers=int(self.n_layers), d_ff=int(self.d_ff),
            max_seq_len=int(self.max_seq_len), causal=int(bool(self.causal)), pos=POS[self.pos],
            act=ACTIVATION[self.activation], norm=NORM[self.norm],
            pre_norm=NORM_POSITION[self.norm_position], bias=int(bool(self.bias)),
            final_norm=int(bool(self.final_norm)), tie_embeddings=int(bool(self.tie_embeddings)),
            norm_eps=float(self.norm_eps), rope_theta=float(self.rope_theta),
            residual=RESIDUAL[self.residual], attnres_block_size=int(self.attnres_block_size),
            attnres_eps=float(self.attnres_eps), moda=int(bool(self.moda)),
            moda_depth_only=int(bool(self.moda_depth_only)), moda_chunk=int(self.moda_chunk),
            attn_dropout=float(self.attn_dropout), resid_dropout=float(self.resid_dropout),
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
