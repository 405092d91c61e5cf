"""Import GPT-2 weights into a stackformer Model.

GPT-2 is stackformer's default architecture with `pos="learned"`, pre-norm LayerNorm with
biases (eps 1e-5), `activation="gelu_tanh"` ("gelu_new") and a tied head. Its checkpoints store
Conv1D weights as (in, out), y = x W + b, and fuse q, k, v into one `c_attn`; both are undone
here. Accepted naming: Hugging Face `GPT2LMHeadModel.state_dict()` (`transformer.wte.weight`,
`transformer.h.{i}.attn.c_attn.weight`, ..., `lm_head.weight`) and the bare `GPT2Model` naming
of the published checkpoints (`wte.weight`, `h.{i}...`). Values may be NumPy arrays or torch
tensors (any float dtype; stored as float32). Nothing is downloaded: pass weights you have.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Mapping, Optional

import numpy as np

from .config import Config

__all__ = ["from_gpt2_state_dict", "load_gpt2_safetensors", "gpt2_config"]

_ACTIVATION = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
# GPT-2 name (after h.{i}.) -> (stackformer name after layers.{i}., transpose Conv1D weight)
_LAYER = {
    "ln_1.weight": ("attn_norm.weight", False), "ln_1.bias": ("attn_norm.bias", False),
    "attn.c_proj.weight": ("attn.o_proj.weight", True), "attn.c_proj.bias": ("attn.o_proj.bias", False),
    "ln_2.weight": ("mlp_norm.weight", False), "ln_2.bias": ("mlp_norm.bias", False),
    "mlp.c_fc.weight": ("mlp.up_proj.weight", True), "mlp.c_fc.bias": ("mlp.up_proj.bias", False),
    "mlp.c_proj.weight": ("mlp.down_proj.weight", True), "mlp.c_proj.bias": ("mlp.down_proj.bias", False),
}
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old checkpoints


def _array(v: Any, name: str) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor (also bfloat16, on any device)
        v = v.detach().to("cpu").float().numpy()
    a = np.asarray(v)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected floating-point weights, got dtype {a.dtype}")
    return a.astype(np.float32, copy=False)


def _get(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _n_head(n_head: Optional[int], config: Any, d: int) -> int:
    n = n_head if n_head is not None else _get(config, "n_head", None)
    if n is None:
        if d == 768:
            return 12  # GPT-2 small (and distilgpt2)
        raise ValueError(f"n_head is not stored in a state dict and d_model={d} is not GPT-2 small's 768: "
                         "pass n_head= (GPT-2 medium 16, large 20, xl 25) or config=")
    n = int(n)
    if n < 1 or d % n:
        raise ValueError(f"n_head={n} must divide d_model={d}")
    return n


def gpt2_config(sd: Mapping[str, Any], n_head: Optional[int] = None, config: Any = None) -> Config:
    """The stackformer Config of a GPT-2 state dict (sizes from the shapes)."""
    return _convert(sd, n_head, config)[0]


def _convert(sd: Mapping[str, Any], n_head: Optional[int], config: Any):
    if not isinstance(sd, Mapping):
        raise TypeError(f"state dict must be a mapping, got {type(sd).__name__}")
    src: Dict[str, Any] = {}
    lm_head = None
    for k, v in sd.items():
        if k == "lm_head.weight":
            lm_head = v
            continue
        name = k[len("transformer."):] if k.startswith("transformer.") else k
        if _IGNORED.match(name):
            continue
        if name in src:
            raise ValueError(f"{k}: given twice (with and without the 'transformer.' prefix)")
        src[name] = v
    used = set()

    def take(key: str, transpose: bool = False) -> np.ndarray:
        if key not in src:
            raise KeyError(f"not a complete GPT-2 state dict: {key!r} (or 'transformer.{key}') missing")
        used.add(key)
        a = _array(src[key], key)
        return np.ascontiguousarray(a.T) if transpose else a

    wte, wpe = take("wte.weight"), take("wpe.weight")
    if wte.ndim != 2 or wpe.ndim != 2 or wpe.shape[1] != wte.shape[1]:
        raise ValueError(f"wte {wte.shape} and wpe {wpe.shape} must be (vocab, d) and (positions, d)")
    V, d = wte.shape
    layers = sorted({int(m.group(1)) for k in src if (m := re.match(r"h\.(\d+)\.", k))})
    n = len(layers)
    if n == 0 or layers != list(range(n)):
        raise ValueError(f"expected blocks h.0 ... h.{{n-1}}, found {layers}")
    d_ff = int(np.shape(src.get("h.0.mlp.c_fc.weight", np.zeros((d, 0))))[1])

    act = _get(config, "activation_function", "gelu_new")
    if act not in _ACTIVATION:
        raise ValueError(f"activation_function {act!r} is not supported (choose from {sorted(_ACTIVATION)})")
    if not _get(config, "scale_attn_weights", True) or _get(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("only GPT-2's default attention scaling 1/sqrt(d_head) is supported")
    if _get(config, "add_cross_attention", False):
        raise ValueError("cross-attention GPT-2 variants are not supported")
    tied = lm_head is None or np.array_equal(_array(lm_head, "lm_head.weight"), wte)
    cfg = Config(vocab_size=V, d_model=d, n_heads=_n_head(n_head, config, d), n_layers=n,
                 max_seq_len=wpe.shape[0], d_ff=max(d_ff, 1), causal=True, pos="learned",
                 activation=_ACTIVATION[act], norm="layernorm", norm_position="pre", bias=True,
                 final_norm=True, tie_embeddings=tied,
                 norm_eps=float(_get(config, "layer_norm_epsilon", 1e-5)))

    out = {"tok_emb.weight": wte, "pos_emb.weight": wpe}
    for i in range(n):
        w, b = take(f"h.{i}.attn.c_attn.weight", True), take(f"h.{i}.attn.c_attn.bias")  # (3d, d), (3d,)
        if w.shape != (3 * d, d) or b.shape != (3 * d,):
            raise ValueError(f"h.{i}.attn.c_attn: expected weight ({d}, {3 * d}) and bias ({3 * d},), "
                             f"got {w.T.shape} and {b.shape}")
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # c_attn output = [q | k | v]
            out[f"layers.{i}.attn.{proj}.weight"] = w[j * d:(j + 1) * d]
            out[f"layers.{i}.attn.{proj}.bias"] = b[j * d:(j + 1) * d]
        for name, (target, transpose) in _LAYER.items():
            out[f"layers.{i}.{target}"] = take(f"h.{i}.{name}", transpose)
    out["final_norm.weight"], out["final_norm.bias"] = take("ln_f.weight"), take("ln_f.bias")
    if not tied:
        out["lm_head.weight"] = _array(lm_head, "lm_head.weight")
    unknown = sorted(set(src) - used)
    if unknown:
        raise ValueError(f"unexpected key(s) for GPT-2: {', '.join(unknown[:10])}")
    return cfg, out


def from_gpt2_state_dict(sd: Mapping[str, Any], n_head: Optional[int] = None, config: Any = None):
    """A stackformer Model equivalent to the GPT-2 whose weights are `sd`.

    n_head: attention heads (not recoverable from shapes); else read from `config` (a
    transformers GPT2Config or the dict of its config.json, which also supplies
    layer_norm_epsilon and activation_function); else 12 when d_model == 768, else an error.
    Shapes must be consistent (load_state_dict checks every tensor); unknown keys are an error.
    """
    from .model import Model

    cfg, weights = _convert(sd, n_head, config)
    model = Model(cfg, seed=0)
    model.load_state_dict(weights)
    return model


def load_gpt2_safetensors(path: str, n_head: Optional[int] = None, config: Any = None):
    """from_gpt2_state_dict on a local GPT-2 `model.safetensors`. Without n_head and config, a
    Hugging Face `config.json` next to the file is read when present."""
    from ._checks import check_path
    path = check_path("path", path)
    if config is None and n_head is None:
        cj = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        if os.path.exists(cj):
            with open(cj, encoding="utf-8") as f:
                config = json.load(f)
    try:
        from safetensors.numpy import load_file
        sd = load_file(path)
    except (TypeError, ValueError):  # e.g. bfloat16, which NumPy lacks: needs torch
        from safetensors.torch import load_file as load_torch
        sd = load_torch(path)
    return from_gpt2_state_dict(sd, n_head=n_head, config=config)
