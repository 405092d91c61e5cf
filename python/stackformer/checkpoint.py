"""Checkpoints: safetensors files with the config in the metadata, written atomically.

The `safetensors` package is the well-kept library for the format (a small Rust parser that
validates the header and every offset); we use its NumPy API rather than parsing bytes here.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Optional, Tuple

import numpy as np

from .config import Config

FORMAT = "stackformer/1"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write data to path so that a crash leaves either the old file or the new one, whole:
    write a temporary file in the same directory, fsync it, then rename over the target."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable where the platform allows
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


OPT_M, OPT_V = "optimizer.adam_m", "optimizer.adam_v"


def save_model(model, path: str, optimizer: bool = False, extra: Optional[dict] = None) -> None:
    """Weights (and with optimizer=True AdamW's moments and step) plus `extra`, a JSON-able
    dict stored in the metadata (e.g. a data RNG state), written atomically."""
    from safetensors.numpy import save
    from ._checks import check_model, check_path
    check_model("model", model)
    path = check_path("path", path)
    tensors, st = model._snapshot(optimizer)  # weights and moments from one instant
    meta = {"format": FORMAT, "config": model.config.to_json()}
    if optimizer:
        tensors[OPT_M] = st["adam_m"]
        tensors[OPT_V] = st["adam_v"]
        meta["step"] = str(int(st["step"]))
    if extra is not None:
        try:
            meta["extra"] = json.dumps(extra, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"extra must be JSON-serializable: {e}") from None
    atomic_write_bytes(path, save(tensors, metadata=meta))


def read_checkpoint(path: str) -> Tuple[Config, Dict[str, np.ndarray], dict]:
    """Parse and validate a checkpoint file; returns (config, tensors, metadata). Raises
    ValueError naming the problem for anything that is not a well-formed checkpoint."""
    from ._checks import check_path
    path = check_path("path", path)
    with open(path, "rb") as f:
        data = f.read()
    return parse_checkpoint(data, path)


MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def parse_checkpoint(data: bytes, path: str = "<bytes>") -> Tuple[Config, Dict[str, np.ndarray], dict]:
    """parse_checkpoint(bytes) -> (config, tensors, metadata); the fuzzed entry point."""
    from safetensors import SafetensorError
    from safetensors.numpy import load
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"data must be the checkpoint's bytes, got {type(data).__name__}")
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > MAX_HEADER:
        raise ValueError(f"{path}: corrupt checkpoint (header of {header_len} bytes exceeds {MAX_HEADER})")
    if header_len > len(data) - 8:
        raise ValueError(f"{path}: truncated or corrupt checkpoint (header claims {header_len} bytes, "
                         f"file has {len(data) - 8})")
    try:
        header = json.loads(data[8: 8 + header_len])
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: corrupt checkpoint header ({type(e).__name__})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path}: not a stackformer checkpoint (metadata format must be {FORMAT!r})")
    if not isinstance(meta["config"], str):
        raise ValueError(f"{path}: config metadata must be a JSON string")
    try:  # forged metadata is a bad file, whatever Config thinks of the wrong type
        # fields added since the file was saved take the values that keep its results
        # (Config.from_saved_dict)
        config = Config.from_saved_dict(json.loads(meta["config"]))
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        raise ValueError(f"{path}: bad config in the checkpoint's metadata: {e}") from None
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: corrupt checkpoint ({e})") from None
    return config, tensors, meta


def load_model(cls, path: str):
    config, tensors, meta = read_checkpoint(path)
    for name, arr in tensors.items():
        if arr.dtype != np.float32:
            raise ValueError(f"{path}: tensor {name!r} has dtype {arr.dtype}, expected float32")
    opt = {k: tensors.pop(k) for k in (OPT_M, OPT_V) if k in tensors}
    model = cls(config)
    try:
        model.load_state_dict(tensors, strict=True)
        if opt:
            if len(opt) != 2 or "step" not in meta:
                raise ValueError("optimizer state is incomplete")
            try:
                step = int(meta["step"])
            except ValueError:
                raise ValueError("optimizer step is not an integer") from None
            model.load_optimizer_state({"adam_m": opt[OPT_M], "adam_v": opt[OPT_V], "step": step})
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: checkpoint does not match its config: {e}") from None
    model.checkpoint_extra = json.loads(meta["extra"]) if "extra" in meta else None
    return model
