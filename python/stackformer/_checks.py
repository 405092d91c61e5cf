"""Argument checks shared by the public API: each raises TypeError (wrong kind of value) or
ValueError (right kind, bad value) with a message that starts with the argument's name, so a
wrong call never surfaces as an AttributeError from deep inside."""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Optional

import numpy as np


def _kind(v: Any) -> str:
    return type(v).__name__


def check_int(name: str, v: Any, min: Optional[int] = None, max: Optional[int] = None) -> int:
    """An int (Python or NumPy integer, not bool) in [min, max]."""
    if not isinstance(v, numbers.Integral) or isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {_kind(v)} {v!r}")
    v = int(v)
    if min is not None and v < min:
        raise ValueError(f"{name} must be >= {min}, got {v}")
    if max is not None and v > max:
        raise ValueError(f"{name} must be <= {max}, got {v}")
    return v


def check_optional_int(name: str, v: Any, min: Optional[int] = None) -> Optional[int]:
    return None if v is None else check_int(name, v, min)


def check_real(name: str, v: Any, min: Optional[float] = None, max: Optional[float] = None,
               min_open: bool = False, finite: bool = True) -> float:
    """A real number (int or float, not bool; finite unless finite=False) in [min, max]
    ((min, max] if min_open)."""
    if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number, got {_kind(v)} {v!r}")
    f = float(v)
    if math.isnan(f) or (finite and not math.isfinite(f)):
        raise ValueError(f"{name} must be finite, got {f}")
    if min is not None and (f < min or (min_open and f == min)):
        raise ValueError(f"{name} must be {'>' if min_open else '>='} {min}, got {f}")
    if max is not None and f > max:
        raise ValueError(f"{name} must be <= {max}, got {f}")
    return f


def check_bool(name: str, v: Any) -> bool:
    """True/False (also NumPy bools and the ints 0/1): bool("no") is True, so strings and
    other truthy objects are refused rather than silently read as True."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Integral) and int(v) in (0, 1):
        return bool(v)
    raise TypeError(f"{name} must be a bool, got {_kind(v)} {v!r}")


def check_path(name: str, v: Any) -> str:
    """A filesystem path: str or os.PathLike (bytes paths too)."""
    if not isinstance(v, (str, bytes, os.PathLike)):
        raise TypeError(f"{name} must be a file path (str or os.PathLike), got {_kind(v)}")
    p = os.fspath(v)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if not p:
        raise ValueError(f"{name} must be a non-empty path")
    return p


def check_rng(name: str, v: Any) -> np.random.Generator:
    if not isinstance(v, np.random.Generator):
        raise TypeError(f"{name} must be a numpy.random.Generator (e.g. np.random.default_rng(0)), "
                        f"got {_kind(v)}")
    return v


def check_seed(name: str, v: Any) -> Optional[int]:
    """None or an int >= 0 (what np.random.default_rng accepts as one seed)."""
    return None if v is None else check_int(name, v, 0)


def check_model(name: str, v: Any):
    from .model import Model
    if not isinstance(v, Model):
        raise TypeError(f"{name} must be a stackformer.Model, got {_kind(v)}")
    return v


def check_callable(name: str, v: Any, optional: bool = True):
    if v is None and optional:
        return None
    if not callable(v):
        raise TypeError(f"{name} must be callable{' or None' if optional else ''}, got {_kind(v)}")
    return v


def check_str(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a str, got {_kind(v)}")
    return v


def check_pair(name: str, v: Any) -> tuple:
    """Two numbers (a tuple, list, array... of length 2), e.g. AdamW's betas."""
    if isinstance(v, (str, bytes)):
        raise TypeError(f"{name} must be a pair of numbers, got {_kind(v)}")
    try:
        a, b = v
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of numbers, got {v!r}") from None
    return check_real(f"{name}[0]", a), check_real(f"{name}[1]", b)
