"""Interventions by hook name (issue 23): `model(x, patch={name: array or callable},
ablate_sources={read: [sources]})`, run in C (sf_patch): an activation replaced at a hook point,
or depth sources removed from an Attention Residuals read (its softmax renormalised over the
rest, a sigmoid gate set to 0) or MoDA depth slots from a block's attention ("blocks.{i}.moda":
slots by index or depth_slot_labels(cfg, i), e.g. "attn0", "ffn0"; the joint softmax
renormalises over the rest).

The names are run_with_cache's (stackformer.hooks, docs/API.md), and a patch point is exactly
where the cache records that name, so patching a recorded value back in changes nothing.
Patchable: hook_embed; blocks.{i}.hook_resid_pre, hook_resid_mid, hook_resid_post (= block
i+1's resid_pre; not for the last block); blocks.{i}.hook_attn_out, hook_mlp_out; and for
AttnRes blocks.{i}.attn_res.hook_weights, mlp_res.hook_weights, output_res.hook_weights.

A callable is called as fn(activation, name) (or fn(activation)) with the activation as it is
in the patched run up to that point (one extra traced forward per callable, in forward order)
and returns the replacement, of the same shape.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

_BLOCK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|"
                    r"hook_mlp_out|attn_res\.hook_weights|mlp_res\.hook_weights|"
                    r"attn\.hook_depth_k|attn\.hook_depth_v|mlp\.hook_depth_k|mlp\.hook_depth_v)$")
_KIND = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_attn_out": "attn_out",
         "hook_mlp_out": "mlp_out"}
PATCHABLE = ("hook_embed", "blocks.{i}.hook_resid_pre", "blocks.{i}.hook_resid_mid",
             "blocks.{i}.hook_resid_post", "blocks.{i}.hook_attn_out", "blocks.{i}.hook_mlp_out",
             "blocks.{i}.attn_res.hook_weights", "blocks.{i}.mlp_res.hook_weights",
             "output_res.hook_weights", "blocks.{i}.attn.hook_depth_k/v", "blocks.{i}.mlp.hook_depth_k/v")


def _is_attnres(cfg) -> bool:
    return cfg.residual in ("attnres_full", "attnres_block")


def patch_point(cfg, name: str) -> Tuple[str, int, float]:
    """(kind, index, order) of a patchable hook name: the C patch slot and its place in the
    forward pass (for resolving callables in order)."""
    if not isinstance(name, str):
        raise TypeError(f"patch keys must be hook names (str), got {type(name).__name__} {name!r}")
    n, L = cfg.n_layers, 2 * cfg.n_layers
    if name == "hook_embed":
        return "embed", 0, -1.0
    if name == "output_res.hook_weights":
        if not _is_attnres(cfg):
            raise KeyError(f"{name!r}: depth weights are patchable under residual='attnres_full' or "
                           f"'attnres_block' only (this model: {cfg.residual!r})")
        return "alpha", L, 4.0 * n
    m = _BLOCK.match(name)
    if not m:
        raise KeyError(f"{name!r} is not a patch point; patchable: {', '.join(PATCHABLE)}")
    i, what = int(m.group(1)), m.group(2)
    if not 0 <= i < n:
        raise KeyError(f"{name!r}: block {i} is outside [0, n_layers={n})")
    if what == "hook_resid_post":
        if i + 1 >= n:
            raise KeyError(f"{name!r}: the last block's resid_post feeds the final norm and head, "
                           "which have no patch point")
        return "resid_pre", i + 1, 4.0 * (i + 1) + 0.5
    if ".hook_depth_" in what:  # a MoDA depth slot as stored, for every later reader
        sub, kv = what.split(".hook_depth_")
        if not cfg.moda:
            raise KeyError(f"{name!r}: this model has no MoDA depth slots (moda=False)")
        spl = 1 if cfg.moda_depth_kv == "attn" else 2
        if sub == "mlp" and spl == 1:
            raise KeyError(f"{name!r}: under moda_depth_kv='attn' the MLPs write no depth slot")
        if i >= n - 1:
            raise KeyError(f"{name!r}: the last block writes no depth slot (no block reads it)")
        return "depth_" + kv, spl * i + (sub == "mlp"), 4.0 * i + (2.8 if sub == "mlp" else 0.8)
    if what.endswith("res.hook_weights"):
        if not _is_attnres(cfg):
            raise KeyError(f"{name!r}: depth weights are patchable under residual='attnres_full' or "
                           f"'attnres_block' only (this model: {cfg.residual!r})")
        k = 2 * i + (what.startswith("mlp"))
        return "alpha", k, 4.0 * i + (2.0 if k % 2 else 0.0)
    kind = _KIND[what]
    order = {"resid_pre": 0.5, "attn_out": 1.0, "resid_mid": 2.5, "mlp_out": 3.0}[kind]
    return kind, i, 4.0 * i + order


def _trace_value(tr: Dict[str, Any], kind: str, idx: int) -> np.ndarray:
    if kind == "embed":
        return tr["embed"]
    if kind == "resid_pre":
        return tr["hidden"][idx]
    if kind == "resid_mid":
        return tr["hidden_mid"][idx]
    if kind in ("attn_out", "mlp_out", "depth_k", "depth_v"):
        return tr[kind][idx]
    return tr["alpha"][idx]


def _call(fn: Callable, act: np.ndarray, name: str) -> Any:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        two = len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    except (TypeError, ValueError):  # builtins without a signature
        two = False
    return fn(act, name) if two else fn(act)


def _as_f32(name: str, value: Any, shape: Tuple[int, ...]) -> np.ndarray:
    try:
        a = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - a value numpy cannot read at all
        raise TypeError(f"patch {name!r}: cannot read the value as an array ({e})") from None
    if a.dtype.kind not in "fiub" or a.dtype == bool:
        raise TypeError(f"patch {name!r}: expected a real-valued array, got dtype {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"patch {name!r} must have shape {shape}, got {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


_MODA = re.compile(r"^blocks\.(\d+)\.moda$")


def depth_slot_labels(cfg, i: int) -> List[str]:
    """The MoDA depth slots block i's attention reads, in column order: attn0, ffn0, attn1, ...
    (attn0, attn1, ... under moda_depth_kv="attn")."""
    if not cfg.moda:
        return []
    if cfg.moda_depth_kv == "attn":
        return [f"attn{j}" for j in range(i)]
    return [f"{s}{j}" for j in range(i) for s in ("attn", "ffn")]


def _mask(what: str, lab: List[str], sources: Any) -> np.ndarray:
    mask = np.zeros(len(lab), np.uint8)
    if isinstance(sources, (str, int, np.integer)):
        sources = [sources]
    for s in sources:
        if isinstance(s, str):
            if s not in lab:
                raise KeyError(f"ablate_sources[{what}]: no source {s!r} (its sources: {lab})")
            mask[lab.index(s)] = 1
        elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
            if not -len(lab) <= int(s) < len(lab):
                raise IndexError(f"ablate_sources[{what}]: source {int(s)} is outside its {len(lab)} sources {lab}")
            mask[int(s)] = 1
        else:
            raise TypeError(f"ablate_sources[{what}]: sources are indices or labels, got {s!r}")
    return mask


def _ablation(cfg, labels: List[List[str]], read: Any, sources: Any) -> Tuple[int, np.ndarray]:
    """(k, uint8 mask over read k's sources) from ablate_sources' key and value."""
    L = 2 * cfg.n_layers
    if isinstance(read, str):
        name = read[:-len(".hook_weights")] + ".hook_weights" if read.endswith(".hook_weights") else read + ".hook_weights"
        kind, k, _ = patch_point(cfg, name)
        if kind != "alpha":
            raise KeyError(f"ablate_sources key {read!r} is not an AttnRes read")
    elif isinstance(read, (int, np.integer)) and not isinstance(read, bool):
        k = int(read)
        if not 0 <= k <= L:
            raise IndexError(f"ablate_sources: read {k} is outside [0, {L}] (sublayers 0..{L - 1}, {L} = the output read)")
    else:
        raise TypeError(f"ablate_sources keys are sublayer indices or hook names, got {read!r}")
    if not _is_attnres(cfg):
        raise KeyError(f"ablate_sources needs residual='attnres_full' or 'attnres_block' (this model: {cfg.residual!r})")
    return k, _mask(f"{read!r} (read {k})", labels[k], sources)


def build(model, x: np.ndarray, key_padding_mask: Any, patch: Optional[Mapping[str, Any]],
          ablate_sources: Optional[Mapping[Any, Any]], n_threads: int, two_phase: bool) -> Dict[str, Any]:
    """The C patch dict for one forward call on x (callables resolved in forward order)."""
    cfg = model.config
    core: Dict[str, Any] = {}
    if ablate_sources:
        if not isinstance(ablate_sources, Mapping):
            raise TypeError("ablate_sources must be a dict {read: [sources]}")
        labels = model.alpha_labels()
        masks, dmasks = {}, {}
        for read, srcs in ablate_sources.items():
            mm = _MODA.match(read) if isinstance(read, str) else None
            if mm:  # a MoDA read: block i's attention over its depth slots
                i = int(mm.group(1))
                if not cfg.moda:
                    raise KeyError(f"ablate_sources key {read!r}: this model has no MoDA (moda=False)")
                if not 0 <= i < cfg.n_layers:
                    raise KeyError(f"ablate_sources key {read!r}: block {i} is outside [0, n_layers={cfg.n_layers})")
                dmasks[i] = _mask(repr(read), depth_slot_labels(cfg, i), srcs)
                continue
            k, m = _ablation(cfg, labels, read, srcs)
            masks[k] = m if k not in masks else (masks[k] | m)
        if masks:
            core["ablate"] = masks
        if dmasks:
            core["depth_ablate"] = dmasks
    if not patch:
        return core
    if not isinstance(patch, Mapping):
        raise TypeError("patch must be a dict {hook name: array or callable}")
    B, T = (1, x.shape[0]) if x.ndim == 1 else (x.shape[0], x.shape[1])
    points = []
    for name, value in patch.items():
        kind, idx, order = patch_point(cfg, name)
        points.append((order, name, kind, idx, value))
    points.sort(key=lambda p: p[0])
    seen = {}
    for _, name, kind, idx, _ in points:
        if (kind, idx) in seen:
            raise KeyError(f"patch names {seen[(kind, idx)]!r} and {name!r} are the same point")
        seen[(kind, idx)] = name

    def put(kind, idx, arr):
        if kind == "embed":
            core["embed"] = arr
        else:
            core.setdefault(kind, {})[idx] = arr

    d = cfg.d_model
    for _, name, kind, idx, value in points:
        if kind == "alpha":
            ns = model._c.num_sources(idx)
            shape = (B, T, cfg.attnres_heads, ns) if cfg.attnres_heads > 1 else (B, T, ns)
        elif kind in ("depth_k", "depth_v"):
            shape = (B, T, cfg.n_kv_heads, cfg.d_model // cfg.n_heads)
        else:
            shape = (B, T, d)
        if callable(value):
            from .model import TraceOptions
            flags = TraceOptions(rms=False, activations=True).flags()
            _, _, tr = model._c.forward(x, key_padding_mask, logits=False, hidden=False, trace=flags,
                                        two_phase=two_phase, n_threads=n_threads, patch=core or None)
            act = np.array(_trace_value(tr, kind, idx))
            value = _call(value, act, name)
        put(kind, idx, _as_f32(name, value, shape))
    return core
