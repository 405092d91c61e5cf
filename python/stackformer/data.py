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
import warnings
from typing import List, Optional, Tuple, Union

import numpy as np

from ._checks import check_int, check_path, check_real, check_rng, check_str

VOCAB_SIZE = 256
IGNORE_INDEX = -100
# Byte 0 (NUL) never occurs in text, so byte-level encoders use it as the [MASK] token.
MASK_ID = 0

# Directories of the standard library left out of the default corpus: installed third-party
# packages, the test suites (large, repetitive, version-dependent) and caches.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

TextLike = Union[str, bytes, bytearray, np.ndarray]

# Corpus data checks (see Corpus.data_problems): a validation split under TINY_VAL_TOKENS
# tokens gives a noisy loss; one whose sampled OVERLAP_WINDOW-byte windows mostly occur
# verbatim in the training split (a repeated string, a duplicated file) measures memory, not
# generalisation. 32 evenly spaced windows are searched with bytes.find: ~30 ms for the 4 MB
# default corpus, which has none of them in its training part.
TINY_VAL_TOKENS = 1024
OVERLAP_WINDOW = 64
OVERLAP_SAMPLES = 32
OVERLAP_WARN_SHARE = 0.5


class DataWarning(UserWarning):
    """A corpus or training run whose numbers are likely misleading: a tiny validation split,
    or validation text that also occurs in the training text. Silence it with
    warnings.simplefilter("ignore", stackformer.DataWarning)."""


def encode(text: Union[str, bytes, bytearray]) -> np.ndarray:
    """Text -> token ids (n,) uint8: the UTF-8 bytes of a str, or the bytes themselves."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    if not isinstance(text, (bytes, bytearray)):
        raise TypeError(f"text: encode expects str or bytes, got {type(text).__name__}")
    return np.frombuffer(bytes(text), dtype=np.uint8).copy()


def decode(ids) -> str:
    """Token ids (any shape of ints in [0, 256)) -> str; invalid UTF-8 becomes U+FFFD."""
    if isinstance(ids, (str, dict)) or ids is None:
        raise TypeError(f"ids: decode expects integer token ids, got {type(ids).__name__}")
    if isinstance(ids, (bytes, bytearray)):
        return bytes(ids).decode("utf-8", errors="replace")
    try:
        a = np.asarray(ids)
    except (ValueError, TypeError) as e:
        raise ValueError(f"ids: decode expects integer token ids: {e}") from None
    if a.size and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() >= VOCAB_SIZE):
        raise ValueError("ids: decode expects integer token ids in [0, 256)")
    return a.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _tokens(data: TextLike) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if data.ndim != 1 or data.dtype.kind not in "iu":
            raise ValueError("data: a token array must be 1-D integers")
        if data.size and (data.min() < 0 or data.max() >= VOCAB_SIZE):
            raise ValueError("data: token ids must lie in [0, 256)")
        return data.astype(np.uint8)
    if not isinstance(data, (str, bytes, bytearray)):
        raise TypeError(f"data must be a str, bytes or a 1-D array of byte ids, got {type(data).__name__}")
    return encode(data)


def _overlap_share(train: np.ndarray, val: np.ndarray) -> float:
    """Share of OVERLAP_SAMPLES evenly spaced validation windows (OVERLAP_WINDOW bytes, or the
    whole split when shorter) found verbatim in the training split."""
    w = min(OVERLAP_WINDOW, val.size)
    if w < 8 or train.size < w:
        return 0.0
    hay = train.tobytes()
    n = min(OVERLAP_SAMPLES, val.size - w + 1)
    starts = np.linspace(0, val.size - w, n).astype(np.int64)
    hits = sum(val[s: s + w].tobytes() in hay for s in starts)
    return hits / n


class Corpus:
    """A token stream (n,) uint8 split into a leading train part and a trailing validation
    part (contiguous, so validation text is text the model never saw, not interleaved lines).

    data: str (UTF-8 encoded), bytes, or a 1-D array of byte ids.
    val_fraction: share of tokens in the validation split, in [0, 1).
    """

    def __init__(self, data: TextLike, val_fraction: float = 0.1, name: str = "text"):
        val_fraction = check_real("val_fraction", val_fraction)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.name = check_str("name", name)
        self.tokens = _tokens(data)
        if self.tokens.size < 2:
            raise ValueError("data: a corpus needs at least 2 tokens")
        self.val_fraction = float(val_fraction)
        n_val = int(round(self.tokens.size * val_fraction))
        self.train = self.tokens[: self.tokens.size - n_val]
        self.val = self.tokens[self.tokens.size - n_val:]
        for problem in self.data_problems():
            warnings.warn(problem, DataWarning, stacklevel=2)

    def data_problems(self) -> List[str]:
        """Why this corpus's validation loss may mislead (empty list: nothing found). A
        validation split under TINY_VAL_TOKENS tokens is noisy; one whose text mostly occurs
        verbatim in the training split (a short repeated string, a duplicated file) measures
        recall of the training text, not generalisation. A corpus warns (DataWarning) with
        these when it is built; val_fraction=0 (no validation) is not a problem."""
        out = []
        if self.val.size == 0:
            return out
        if self.val.size < TINY_VAL_TOKENS:
            out.append(f"{self.name}: the validation split has only {self.val.size} tokens "
                       f"(< {TINY_VAL_TOKENS}): its loss is a noisy estimate; use more text or a "
                       f"larger val_fraction")
        share = _overlap_share(self.train, self.val)
        if share >= OVERLAP_WARN_SHARE:
            out.append(f"{self.name}: {share:.0%} of sampled {min(OVERLAP_WINDOW, self.val.size)}-byte "
                       f"windows of the validation split also occur verbatim in the training split "
                       f"(repeated text?): the validation loss will not show how well the model "
                       f"generalises")
        return out

    @classmethod
    def from_file(cls, path: str, val_fraction: float = 0.1, max_bytes: Optional[int] = None) -> "Corpus":
        """The bytes of a file (any encoding: tokens are bytes), at most max_bytes of them."""
        path = check_path("path", path)
        if max_bytes is not None:
            max_bytes = check_int("max_bytes", max_bytes, 2)
        with open(path, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes)
        with warnings.catch_warnings():   # re-issued below, pointing at the caller's line
            warnings.simplefilter("ignore", DataWarning)
            corpus = cls(data, val_fraction=val_fraction, name=os.path.basename(path))
        for problem in corpus.data_problems():
            warnings.warn(problem, DataWarning, stacklevel=2)
        return corpus

    def __len__(self) -> int:
        return int(self.tokens.size)

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, {len(self):,} bytes: train {self.train.size:,}, val {self.val.size:,})"

    def split(self, split: str) -> np.ndarray:
        """The tokens of "train" or "val" (uint8 view)."""
        if not isinstance(split, str):
            raise TypeError(f"split must be 'train' or 'val', got {type(split).__name__}")
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
        batch_size = check_int("batch_size", batch_size, 1)
        seq_len = check_int("seq_len", seq_len, 1)
        check_rng("rng", rng)
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
    max_bytes = check_int("max_bytes", max_bytes, 2)
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
    with warnings.catch_warnings():   # re-issued below, pointing at the caller's line
        warnings.simplefilter("ignore", DataWarning)
        corpus = Corpus(b"".join(parts), val_fraction=val_fraction, name="python-stdlib")
    for problem in corpus.data_problems():   # only when max_bytes is small: a tiny split
        warnings.warn(problem, DataWarning, stacklevel=2)
    return corpus


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
    check_rng("rng", rng)
    mask_prob = check_real("mask_prob", mask_prob)
    mask_id = check_int("mask_id", mask_id)
    ignore_index = check_int("ignore_index", ignore_index)
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
