"""sf.data: byte tokenizer, corpus, splits, seeded batches, masking, unigram baseline."""
import numpy as np
import pytest

from stackformer import data


def test_encode_decode_round_trip():
    text = "héllo wörld — 数据 ✓\n\ttabs"
    ids = data.encode(text)
    assert ids.dtype == np.uint8 and ids.ndim == 1 and len(ids) == len(text.encode("utf-8"))
    assert data.decode(ids) == text
    assert data.decode(ids.astype(np.int64).reshape(1, -1)) == text    # any int dtype / shape
    assert np.array_equal(data.encode(b"\x00\xff"), [0, 255])
    assert data.decode([0xC3]) == "\ufffd"                               # invalid UTF-8 replaced
    with pytest.raises(ValueError):
        data.decode([256])
    with pytest.raises(TypeError):
        data.encode(123)


def test_corpus_split_sizes():
    c = data.Corpus("abcdefghij" * 100, val_fraction=0.1)
    assert len(c) == 1000 and c.train.size == 900 and c.val.size == 100
    assert np.array_equal(np.concatenate([c.train, c.val]), c.tokens)   # contiguous, in order
    assert data.Corpus("x" * 10, val_fraction=0.0).val.size == 0
    with pytest.raises(ValueError):
        data.Corpus("abc", val_fraction=1.0)
    with pytest.raises(ValueError):
        c.split("test")


def test_corpus_from_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"0123456789" * 10)
    c = data.Corpus.from_file(str(p), val_fraction=0.2, max_bytes=50)
    assert len(c) == 50 and c.val.size == 10 and c.name == "t.txt"


def test_default_corpus_is_deterministic_python_source():
    a = data.default_corpus(max_bytes=300_000)
    b = data.default_corpus(max_bytes=300_000)
    assert len(a) == 300_000 and np.array_equal(a.tokens, b.tokens)
    text = data.decode(a.tokens[:100_000])
    assert "def " in text and "import " in text
    small = data.default_corpus(max_bytes=1000)
    assert np.array_equal(small.tokens, a.tokens[:1000])                # a prefix: same order


def test_batch_shapes_targets_and_seeding():
    c = data.Corpus(bytes(range(256)) * 20)
    x, y = c.batch(5, 12, np.random.default_rng(3))
    assert x.shape == y.shape == (5, 12) and x.dtype.kind == "i"
    assert np.array_equal(x[:, 1:], y[:, :-1])                          # next-token targets
    assert np.array_equal((x + 1) % 256, y)                              # consecutive bytes
    x2, y2 = c.batch(5, 12, np.random.default_rng(3))
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = c.batch(5, 12, np.random.default_rng(4))
    assert not np.array_equal(x, x3)
    xv, _ = c.batch(5, 12, np.random.default_rng(3), split="val")
    val = set(c.val.tolist())
    assert set(xv.ravel().tolist()) <= val
    with pytest.raises(ValueError, match="seq_len"):
        c.batch(1, c.val.size, np.random.default_rng(0), split="val")


def test_batch_windows_cover_the_whole_split():
    # the last window of the split (ending at its final token) must be reachable
    c = data.Corpus(np.arange(20, dtype=np.uint8), val_fraction=0.0)
    x, y = c.batch(2000, 10, np.random.default_rng(0))
    assert x[:, 0].min() == 0 and y[:, -1].max() == 19


def test_mask_tokens():
    rng = np.random.default_rng(0)
    x = np.random.default_rng(1).integers(1, 256, size=(64, 32))
    xm, t = data.mask_tokens(x, rng, mask_prob=0.15, mask_id=0)
    masked = xm == 0
    assert xm.shape == t.shape == x.shape
    assert np.array_equal(t[masked], x[masked])                          # original token targets
    assert np.all(t[~masked] == -100) and np.array_equal(xm[~masked], x[~masked])
    assert 0.12 < masked.mean() < 0.18
    xm2, t2 = data.mask_tokens(x, np.random.default_rng(0))
    assert np.array_equal(xm, xm2) and np.array_equal(t, t2)            # seeded
    # every row has something to predict, even at a tiny mask probability
    _, t3 = data.mask_tokens(x, rng, mask_prob=1e-6)
    assert np.all((t3 != -100).sum(axis=1) >= 1)


def test_unigram_loss():
    assert data.Corpus("abab" * 50, val_fraction=0.5).unigram_loss("val") == pytest.approx(np.log(2))
    assert data.Corpus("aaaa" * 10).unigram_loss("train") == pytest.approx(0.0)
    c = data.Corpus(np.random.default_rng(0).integers(0, 256, 200_000).astype(np.uint8))
    assert c.unigram_loss() == pytest.approx(np.log(256), abs=0.01)
