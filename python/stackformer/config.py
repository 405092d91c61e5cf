"""Model configuration: one dataclass generated from the C core's field table
(csrc/sf_config_fields.h), so the fields, their defaults, ranges and documentation have one
source. Python checks each value's type; the ranges and the rules between fields are C's
(sf_config_validate), reported with a message naming the field."""
from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any, Dict, Optional

import numpy as np

from . import _core

# The field table: (name, c_name, kind, default, lo, hi, choices, doc) per field, in order.
FIELDS = tuple(_core.config_fields())
_BY_NAME = {f[0]: f for f in FIELDS}
# String choices of the enum fields, and their C values (the index in choices).
CHOICES: Dict[str, tuple] = {f[0]: f[6] for f in FIELDS if f[2] == "enum"}
POS = {n: i for i, n in enumerate(CHOICES["pos"])}
ACTIVATION = {n: i for i, n in enumerate(CHOICES["activation"])}
NORM = {n: i for i, n in enumerate(CHOICES["norm"])}
NORM_POSITION = {n: i for i, n in enumerate(CHOICES["norm_position"])}
RESIDUAL = {n: i for i, n in enumerate(CHOICES["residual"])}
# INT fields whose default is computed from others (None until __post_init__)
_DERIVED = {"n_kv_heads": lambda c: c.n_heads, "d_ff": lambda c: 4 * c.d_model}
# INT fields where None means "no limit" (0 in C, which Python does not accept as a value)
_NONE_IS_ZERO = {"attnres_window": "all sources"}


def _default(f):
    name, _, kind, default = f[:4]
    if name in _DERIVED or name in _NONE_IS_ZERO:
        return None
    if kind == "int":
        return int(default)
    if kind == "bool":
        return bool(default)
    if kind == "enum":
        return f[6][int(default)]
    return float(default)


def _py_type(kind: str) -> Any:
    return {"int": int, "bool": bool, "enum": str, "real": float, "prob": float}[kind]


class BF16EmulatedWarning(RuntimeWarning):
    """compute_dtype="bfloat16" on a CPU without AVX512_BF16: the products run on an emulated
    kernel that gives the native instruction's bits, several times slower than float32."""


_bf16_warned = False  # the warning is given once per process


def _warn_bf16_emulated() -> None:
    global _bf16_warned
    if _bf16_warned or _core.bf16_kernel() == "avx512_bf16":
        return
    _bf16_warned = True
    import warnings
    warnings.warn("Config(compute_dtype='bfloat16'): this CPU has no AVX512_BF16 (or "
                  "STACKFORMER_NO_BF16=1 is set), so bf16 products run on an emulated kernel: "
                  "the same bits as vdpbf16ps, but slower than float32; use it for correctness, "
                  "not speed (stackformer.bf16_kernel() says which kernel runs)",
                  BF16EmulatedWarning, stacklevel=4)


class _ConfigMethods:
    """Behaviour of Config; its fields come from the table (see Config's docstring)."""

    def __post_init__(self) -> None:
        if self.d_ff is None and _is_int(self.d_model):
            self.d_ff = 4 * self.d_model
        if self.n_kv_heads is None and _is_int(self.n_heads):
            self.n_kv_heads = self.n_heads
        self.validate()
        if self.compute_dtype == "bfloat16":
            _warn_bf16_emulated()

    # -- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise TypeError (wrong type) or ValueError (wrong value) naming the first bad field."""
        for name, _, kind, *_rest in FIELDS:
            v = getattr(self, name)
            if name in _NONE_IS_ZERO and v is not None and _is_int(v) and v < 1:
                raise ValueError(f"Config.{name} must be None ({_NONE_IS_ZERO[name]}) or an int >= 1, got {v!r}")
            if kind == "int":
                if name in _NONE_IS_ZERO and v is None:
                    continue
                if not _is_int(v):
                    raise TypeError(f"Config.{name} must be an int, got {type(v).__name__} {v!r}")
            elif kind == "bool":
                if not isinstance(v, bool) and not (_is_int(v) and v in (0, 1)):
                    raise TypeError(f"Config.{name} must be a bool, got {v!r}")
            elif kind == "enum":
                if not isinstance(v, str) or v not in CHOICES[name]:
                    raise ValueError(f"Config.{name} must be one of {sorted(CHOICES[name])}, got {v!r}")
            elif not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise TypeError(f"Config.{name} must be a float, got {type(v).__name__} {v!r}")
        try:
            _core.config_validate(**self._c_kwargs())
        except (ValueError, OverflowError) as e:
            raise ValueError(f"Config.{e}") from None

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

    @classmethod
    def from_saved_dict(cls, d: Dict[str, Any]) -> "Config":
        """from_dict for a config saved by an older version (a checkpoint's metadata): a field
        it predates takes the value that reproduces what that version computed, where that
        differs from today's default (moda_depth_rope: 'legacy' for MoDA with RoPE)."""
        if isinstance(d, dict) and "moda_depth_rope" not in d and d.get("moda") and d.get("pos") == "rope":
            d = {**d, "moda_depth_rope": "legacy"}
        return cls.from_dict(d)

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
        """Keyword arguments of stackformer._core.CModel / config_validate: every table field,
        enums as their C values."""
        out: Dict[str, Any] = {}
        for name, _, kind, *_rest in FIELDS:
            v = getattr(self, name)
            if kind == "enum":
                out[name] = CHOICES[name].index(v)
            elif name in _NONE_IS_ZERO and v is None:
                out[name] = 0
            elif kind in ("int", "bool"):
                out[name] = int(v)
            else:  # the binding converts (an int beyond double's range: ValueError naming it)
                out[name] = v
        return out


def _docstring() -> str:
    lines = ["Architecture of a stack (fields generated from csrc/sf_config_fields.h).", ""]
    for name, _, kind, default, lo, hi, choices, doc in FIELDS:
        d = _default((name, _, kind, default, lo, hi, choices, doc))
        what = " | ".join(repr(c) for c in choices) if kind == "enum" else _py_type(kind).__name__
        lines.append(f"    {name} ({what}, default {d!r}): {doc}")
    return "\n".join(lines)


Config = dataclasses.make_dataclass(
    "Config",
    [(f[0], Optional[int] if f[0] in _DERIVED or f[0] in _NONE_IS_ZERO else _py_type(f[2]), dataclasses.field(default=_default(f)))
     for f in FIELDS],
    bases=(_ConfigMethods,),
    namespace={"__doc__": _docstring(), "__module__": __name__},
)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
