"""Checkpoints: safetensors files with the config in the metadata, written atomically.

The `safetensors` package is the well-kept library for the format (a small Rust parser that
validates the header and every offset); we use its NumPy API rather than parsing bytes here.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Dict, Optional, Tuple

import numpy as np

from .config import Config

FORMAT = "stackformer/1"


TMP_PREFIX = ".tmp-"  # our temporaries: .tmp-<target name>.<pid>.<random>.part


def _tmp_name(target: str) -> str:
    return f"{TMP_PREFIX}{os.path.basename(target)}.{os.getpid()}.{os.urandom(4).hex()}.part"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temporaries(directory: str, target: str) -> None:
    """Temporaries of our own naming for this target, left by saves that were killed: their
    process is gone (a live one may be mid-save: its file is left alone)."""
    head = f"{TMP_PREFIX}{os.path.basename(target)}."
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(head) and name.endswith(".part")):
            continue
        parts = name[len(head):-len(".part")].split(".")
        if len(parts) != 2 or not parts[0].isdigit() or len(parts[1]) != 8:
            continue
        if int(parts[0]) == os.getpid() or _pid_alive(int(parts[0])):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def writable_target(path: str) -> str:
    """The file a save to `path` replaces: a symlink's target (written through, the link
    stays), checked before anything is serialized or written: its directory must exist and be
    writable, and the path must not be a directory."""
    path = os.fspath(path)
    target = os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)
    directory = os.path.dirname(target)
    try:
        is_dir = stat.S_ISDIR(os.stat(directory).st_mode)
    except PermissionError:  # a directory above it cannot be searched: it may well exist
        raise PermissionError(f"cannot save to {path!r}: directory {directory!r} cannot be reached "
                              "(no search permission on a directory above it)") from None
    except OSError:
        is_dir = False
    if not is_dir:
        raise FileNotFoundError(f"cannot save to {path!r}: directory {directory!r} does not exist")
    if os.path.isdir(target):
        raise IsADirectoryError(f"cannot save to {path!r}: it is a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot save to {path!r}: directory {directory!r} is not writable")
    return target


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write data to path so that a crash, a full disk or a file-size limit leaves either the
    old file or the new one, whole: write a temporary file in the same directory, fsync it,
    then rename over the target (a symlink's target: the link is kept). A new file gets the
    mode the umask allows (0666 & ~umask), a replaced one keeps its mode. Temporaries of
    earlier saves that were killed are removed."""
    target = writable_target(path)
    directory = os.path.dirname(target)
    _remove_stale_temporaries(directory, target)
    try:
        mode = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    tmp = os.path.join(directory, _tmp_name(target))
    # O_EXCL with 0666: the kernel applies the umask, as for any file the user creates
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
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
    writable_target(path)  # a missing or read-only directory fails before anything is built
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
    ValueError naming the problem for anything that is not a well-formed checkpoint. Only a
    regular file is read (a FIFO or /dev/zero is refused without blocking), and the 8-byte
    header, the metadata and the tensor list are checked against the file's size before the
    tensors are read."""
    import stat
    from ._checks import check_path
    path = check_path("path", path)
    # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore it
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file (a checkpoint is a file written by save())")
        size = st.st_size
        head = f.read(8)
        header_len = _check_header_len(head, size, path)
        header_bytes = f.read(header_len)
        config, _, meta = _check_header(head + header_bytes, size, path)
        data = head + header_bytes + f.read(size - 8 - header_len)
    return parse_checkpoint(data, path, config)


MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def _check_header_len(head: bytes, size: int, path: str) -> int:
    if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {len(head)} bytes)")
    header_len = int.from_bytes(head[:8], "little")
    if header_len > MAX_HEADER:
        raise ValueError(f"{path}: corrupt checkpoint (header of {header_len} bytes exceeds {MAX_HEADER})")
    if header_len > size - 8:
        raise ValueError(f"{path}: truncated or corrupt checkpoint (header claims {header_len} bytes, "
                         f"file has {size - 8})")
    return header_len


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1}


def _check_header(data: bytes, size: int, path: str) -> Tuple[Config, dict, dict]:
    """The header (data holds at least the 8-byte length and the JSON) against a file of
    `size` bytes: metadata, config, and every tensor the config implies, with its dtype, shape
    and byte range, before any tensor is read or any model is built."""
    from . import _core
    header_len = _check_header_len(data[:8], size, path)
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
        table, num_params = _core.config_tensors(**config._c_kwargs())
    except (TypeError, ValueError, OverflowError, RecursionError, MemoryError) as e:
        raise ValueError(f"{path}: bad config in the checkpoint's metadata: {e}") from None
    expected = {name: tuple(shape) for name, shape in table}
    if any(k in header for k in (OPT_M, OPT_V)):
        expected[OPT_M] = expected[OPT_V] = (num_params,)
    names = set(header) - {"__metadata__"}
    missing = [k for k in expected if k not in names]
    if missing:
        raise ValueError(f"{path}: checkpoint does not match its config: missing tensor(s) "
                         f"{', '.join(missing[:5])}" + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    unexpected = sorted(names - set(expected))
    if unexpected:
        raise ValueError(f"{path}: checkpoint does not match its config: unexpected tensor(s) "
                         f"{', '.join(unexpected[:5])}")
    data_size = size - 8 - header_len
    for name, shape in expected.items():
        info = header[name]
        if not isinstance(info, dict):
            raise ValueError(f"{path}: corrupt checkpoint (entry {name!r} is not an object)")
        if info.get("dtype") != "F32":
            raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, expected float32 (F32)")
        got = info.get("shape")
        if not isinstance(got, list) or tuple(got) != shape:
            raise ValueError(f"{path}: checkpoint does not match its config: {name} has shape {got}, "
                             f"expected {list(shape)}")
        off = info.get("data_offsets")
        if (not isinstance(off, list) or len(off) != 2 or not all(isinstance(o, int) for o in off)
                or not 0 <= off[0] <= off[1] <= data_size or off[1] - off[0] != 4 * int(np.prod(shape))):
            raise ValueError(f"{path}: corrupt checkpoint (byte range of {name!r} is {off}, "
                             f"the data section holds {data_size} bytes)")
    return config, header, meta


def parse_checkpoint(data: bytes, path: str = "<bytes>", config: Optional[Config] = None
                     ) -> Tuple[Config, Dict[str, np.ndarray], dict]:
    """parse_checkpoint(bytes) -> (config, tensors, metadata); the fuzzed entry point. The
    header and tensor list are checked before safetensors reads the tensors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"data must be the checkpoint's bytes, got {type(data).__name__}")
    parsed, _, meta = _check_header(data, len(data), path)
    config = config if config is not None else parsed
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
