"""Byte-level text data: a 256-token tokenizer, a corpus with a train/validation split, seeded
batch sampling, masked-token batches for encoders and a unigram baseline.

Nothing is downloaded: `default_corpus()` reads the Python standard library's own source code
from the running interpreter.

>>> c = Corpus("hello world, " * 100, val_fraction=0.1)
>>> x, y = c.batch(4, 16, np.random.default_rng(0))
>>> x.shape, y.shape, bool((x[:, 1:] == y[:, :-1]).all())
((4, 16), (4, 16), True)
"""
from __future__ import annotations

import os
import sysconfig
from typing import Optional, Tuple, Union

import numpy as np

VOCAB_SIZE = 256
IGNORE_INDEX = -100
# Byte 0 (NUL) never occurs in text, so byte-level encoders use it as the [MASK] token.
MASK_ID = 0

# Directories of the standard library left out of the default corpus: installed third-party
# packages, the test suites (large, repetitive, version-dependent) and caches.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

TextLike = Union[str, bytes, bytearray, np.ndarray]


def encode(text: Union[str, bytes, bytearray]) -> np.ndarray:
    """Text -> token ids (n,) uint8: the UTF-8 bytes of a str, or the bytes themselves."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    if not isinstance(text, (bytes, bytearray)):
        raise TypeError(f"encode expects str or bytes, got {type(text).__name__}")
    return np.frombuffer(bytes(text), dtype=np.uint8).copy()


def decode(ids) -> str:
    """Token ids (any shape of ints in [0, 256)) -> str; invalid UTF-8 becomes U+FFFD."""
    a = np.asarray(ids)
    if a.size and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() >= VOCAB_SIZE):
        raise ValueError("decode expects integer token ids in [0, 256)")
    return a.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _tokens(data: TextLike) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if data.ndim != 1 or data.dtype.kind not in "iu":
            raise ValueError("a token array must be 1-D integers")
        if data.size and (data.min() < 0 or data.max() >= VOCAB_SIZE):
            raise ValueError("token ids must lie in [0, 256)")
        return data.astype(np.uint8)
    return encode(data)


class Corpus:
    """A token stream (n,) uint8 split into a leading train part and a trailing validation
    part (contiguous, so validation text is text the model never saw, not interleaved lines).

    data: str (UTF-8 encoded), bytes, or a 1-D array of byte ids.
    val_fraction: share of tokens in the validation split, in [0, 1).
    """

    def __init__(self, data: TextLike, val_fraction: float = 0.1, name: str = "text"):
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.tokens = _tokens(data)
        if self.tokens.size < 2:
            raise ValueError("a corpus needs at least 2 tokens")
        self.name = name
        self.val_fraction = float(val_fraction)
        n_val = int(round(self.tokens.size * val_fraction))
        self.train = self.tokens[: self.tokens.size - n_val]
        self.val = self.tokens[self.tokens.size - n_val:]

    @classmethod
    def from_file(cls, path: str, val_fraction: float = 0.1, max_bytes: Optional[int] = None) -> "Corpus":
        """The bytes of a file (any encoding: tokens are bytes), at most max_bytes of them."""
        with open(path, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes)
        return cls(data, val_fraction=val_fraction, name=os.path.basename(path))

    def __len__(self) -> int:
        return int(self.tokens.size)

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, {len(self):,} bytes: train {self.train.size:,}, val {self.val.size:,})"

    def split(self, split: str) -> np.ndarray:
        """The tokens of "train" or "val" (uint8 view)."""
        if split == "train":
            return self.train
        if split in ("val", "validation"):
            return self.val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def batch(self, batch_size: int, seq_len: int, rng: np.random.Generator,
              split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
        """batch_size windows of seq_len + 1 tokens at uniform random offsets of the split.

        Returns (inputs, targets), each (batch_size, seq_len) int64: targets are the inputs
        shifted by one (next-token prediction). The same rng state gives the same batch."""
        data = self.split(split)
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be >= 1")
        if data.size < seq_len + 1:
            raise ValueError(f"the {split} split has {data.size} tokens; a window of seq_len={seq_len} "
                             f"needs {seq_len + 1}")
        starts = rng.integers(0, data.size - seq_len, size=batch_size)
        windows = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
        return windows[:, :-1], windows[:, 1:]

    def unigram_loss(self, split: str = "val") -> float:
        """Entropy (nats/token) of the split's own byte frequencies: the loss of the best
        predictor that ignores context, a floor no unigram model can beat on that split."""
        counts = np.bincount(self.split(split), minlength=VOCAB_SIZE).astype(np.float64)
        if counts.sum() == 0:
            raise ValueError(f"the {split} split is empty")
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def default_corpus(max_bytes: int = 4_000_000, val_fraction: float = 0.1) -> Corpus:
    """The source code of the running interpreter's standard library as one corpus.

    The *.py files under sysconfig's "stdlib" directory, walked in sorted order (directories
    and files sorted by name; site-packages, test suites and caches skipped), concatenated
    byte for byte and cut at max_bytes. Deterministic for a given Python installation; no
    network access."""
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, fn), "rb") as f:
                    data = f.read(max_bytes - total)
            except OSError:
                continue
            parts.append(data)
            total += len(data)
            if total >= max_bytes:
                break
        if total >= max_bytes:
            break
    if total < 2:
        raise RuntimeError(f"found no Python sources under {root}")
    return Corpus(b"".join(parts), val_fraction=val_fraction, name="python-stdlib")


def mask_tokens(inputs: np.ndarray, rng: np.random.Generator, mask_prob: float = 0.15,
                mask_id: int = MASK_ID, ignore_index: int = IGNORE_INDEX) -> Tuple[np.ndarray, np.ndarray]:
    """Masked-token batch for an encoder (bidirectional) model.

    inputs: (B, T) token ids. Each position is masked independently with probability
    mask_prob (and every row gets at least one masked position, so no batch is empty).
    Returns (masked_inputs, targets), each (B, T) int64: masked positions hold mask_id in the
    inputs and the original token in the targets; every other target is ignore_index."""
    x = np.asarray(inputs)
    if x.ndim != 2 or x.dtype.kind not in "iu":
        raise ValueError("inputs must be a (B, T) integer array")
    if not 0 < mask_prob <= 1:
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
    B, T = x.shape
    mask = rng.random((B, T)) < mask_prob
    forced = rng.integers(0, T, size=B)  # drawn always, so the rng advances the same way
    empty = ~mask.any(axis=1)
    mask[empty, forced[empty]] = True
    x = x.astype(np.int64)
    targets = np.where(mask, x, ignore_index)
    return np.where(mask, mask_id, x), targets
