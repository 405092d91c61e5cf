"""Hostile input never crashes and never changes the model: each case raises an exception
whose message names the problem."""
import numpy as np
import pytest

import stackformer as sf
from conftest import small_config

BASE = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=2, max_seq_len=16)

BAD_CONFIGS = [
    (dict(d_model=30), ValueError, "divisible by n_heads"),
    (dict(n_kv_heads=3), ValueError, "n_kv_heads"),
    (dict(n_kv_heads=8), ValueError, "n_kv_heads"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(d_model=0), ValueError, "d_model"),
    (dict(n_heads=0), ValueError, "n_heads"),
    (dict(n_layers=0), ValueError, "n_layers"),
    (dict(max_seq_len=0), ValueError, "max_seq_len"),
    (dict(d_ff=0), ValueError, "d_ff"),
    (dict(d_model=32.0), TypeError, "d_model"),
    (dict(n_layers="2"), TypeError, "n_layers"),
    (dict(n_layers=True), TypeError, "n_layers"),
    (dict(pos="alibi"), ValueError, "pos"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(norm="batchnorm"), ValueError, "norm"),
    (dict(norm_position="middle"), ValueError, "norm_position"),
    (dict(residual="dense"), ValueError, "residual"),
    (dict(norm_eps=0.0), ValueError, "norm_eps"),
    (dict(norm_eps=float("nan")), ValueError, "norm_eps"),
    (dict(attnres_eps=-1.0), ValueError, "attnres_eps"),
    (dict(rope_theta=0.5), ValueError, "rope_theta"),
    (dict(attnres_block_size=0), ValueError, "attnres_block_size"),
    (dict(moda_chunk=0), ValueError, "moda_chunk"),
    (dict(moda_chunk=17), ValueError, "moda_chunk"),
    (dict(moda_depth_only=True), ValueError, "moda_depth_only"),
    (dict(pos="rope", d_model=36, n_heads=4), ValueError, "even head dimension"),
    (dict(pos="sinusoidal", d_model=33, n_heads=3), ValueError, "even d_model"),
    (dict(causal=2), TypeError, "causal"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD_CONFIGS, ids=[str(k) for k, _, _ in BAD_CONFIGS])
def test_bad_config(kw, exc, msg):
    c = dict(BASE)
    c.update(kw)
    with pytest.raises(exc, match=msg):
        sf.Config(**c)


HUGE = [
    dict(vocab_size=2**40),
    dict(d_model=2**24, n_heads=1, d_ff=2**24),
    dict(n_layers=100000),
    dict(vocab_size=2**24, d_model=2**24, n_heads=1, d_ff=1),
    dict(max_seq_len=2**24, d_model=2**20, n_heads=1, d_ff=1, vocab_size=1),
]


@pytest.mark.parametrize("kw", HUGE, ids=[str(k) for k in HUGE])
def test_absurd_sizes_fail_cleanly(kw):
    c = dict(BASE)
    c.update(kw)
    with pytest.raises((ValueError, MemoryError, OverflowError)):
        sf.Model(sf.Config(**c))


def test_config_mutated_after_construction_is_revalidated():
    c = small_config()
    c.n_heads = 5
    with pytest.raises(ValueError, match="divisible"):
        sf.Model(c)


def test_bad_seed():
    for s in (-1, 2**64, 1.5, "0", True):
        with pytest.raises(ValueError, match="seed"):
            sf.Model(small_config(), seed=s)


def test_model_needs_config():
    with pytest.raises(TypeError, match="Config"):
        sf.Model({"vocab_size": 5})


tok = np.array([[1, 2, 3]])
BAD_INPUTS = [
    (tok.astype(np.float64), ValueError, "embeddings of shape"),
    (tok.astype(bool), TypeError, "integer token ids or float embeddings"),
    (tok.astype(object), TypeError, "dtype"),
    (tok.astype(np.complex64), TypeError, "dtype"),
    (np.array(["a", "b"]), TypeError, "dtype"),
    (np.zeros((1, 2, 3), np.int64), ValueError, "shape \\(T,\\) or \\(B, T\\)"),
    (np.zeros((1, 1, 1, 1), np.int32), ValueError, "dimensions"),
    (np.array(5), ValueError, "dimensions"),
    (np.zeros((0,), np.int64), ValueError, "empty"),
    (np.zeros((3, 0), np.int64), ValueError, "empty"),
    (np.zeros((0, 3), np.int64), ValueError, "empty"),
    (np.array([[1, 50]]), IndexError, "token id 50 at \\[0, 1\\]"),
    (np.array([[-1, 2]]), IndexError, "token id -1"),
    (np.array([2**40]), IndexError, "token id"),
    (np.array([2**63 + 5], dtype=np.uint64), IndexError, "token id"),
    (np.array([2**31]), IndexError, "token id 2147483648"),
    (np.arange(17) % 50, ValueError, "exceeds max_seq_len"),
    (np.zeros((1, 3, 31), np.float32), ValueError, "d_model=32"),
    (np.full((1, 3, 32), np.nan, np.float32), ValueError, "NaN or inf"),
    (np.full((1, 3, 32), np.inf, np.float64), ValueError, "NaN or inf"),
    ("hello", TypeError, "numpy array"),
    (None, TypeError, "numpy array"),
    ([["a"]], TypeError, "token ids or floats"),
    ([1.5, 2.0], ValueError, "embeddings"),
]


@pytest.mark.parametrize("x,exc,msg", BAD_INPUTS, ids=[f"case{i}" for i in range(len(BAD_INPUTS))])
def test_bad_forward_input(model, x, exc, msg):
    before = model.state_dict()
    with pytest.raises(exc, match=msg):
        model(x)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


BAD_MASKS = [
    (np.ones((2, 6), bool), ValueError, "key_padding_mask must have shape"),
    (np.ones((3, 7), bool), ValueError, "key_padding_mask must have shape"),
    (np.ones((2, 7), np.float32), TypeError, "bool or integer"),
    (np.full((2, 7), 2), ValueError, "0 or 1"),
    ([[1] * 7] * 2, TypeError, "numpy array"),
]


@pytest.mark.parametrize("mask,exc,msg", BAD_MASKS, ids=[f"mask{i}" for i in range(len(BAD_MASKS))])
def test_bad_mask(model, tokens, mask, exc, msg):
    with pytest.raises(exc, match=msg):
        model(tokens, key_padding_mask=mask)


def test_bad_call_options(model, tokens):
    with pytest.raises(TypeError, match="trace"):
        model(tokens, trace=3.5)
    with pytest.raises(ValueError, match="n_threads"):
        model(tokens, n_threads=-2)
    with pytest.raises(TypeError, match="n_threads"):
        model(tokens, n_threads=1.5)


def _bad_state_dicts(model):
    sd = model.state_dict()
    cases = []
    d = dict(sd); d.pop("tok_emb.weight"); cases.append((d, KeyError, "missing key.*tok_emb.weight"))
    d = dict(sd); d["extra.weight"] = np.zeros(3, np.float32); cases.append((d, KeyError, "unexpected key.*extra.weight"))
    d = dict(sd); d["tok_emb.weight"] = np.zeros((50, 31), np.float32); cases.append((d, ValueError, "tok_emb.weight.*shape"))
    d = dict(sd); d["tok_emb.weight"] = np.zeros((50, 32), np.int32); cases.append((d, TypeError, "tok_emb.weight.*floating"))
    d = dict(sd); d["tok_emb.weight"] = [[0.0] * 32] * 50; cases.append((d, TypeError, "tok_emb.weight.*numpy array"))
    d = dict(sd); w = d["layers.1.mlp.up_proj.weight"].copy(); w[3, 3] = np.nan
    d["layers.1.mlp.up_proj.weight"] = w; cases.append((d, ValueError, "up_proj.weight.*NaN"))
    d = dict(sd); w = d["layers.0.attn.o_proj.bias"].copy(); w[0] = np.inf
    d["layers.0.attn.o_proj.bias"] = w; cases.append((d, ValueError, "o_proj.bias.*NaN or inf"))
    cases.append(([1, 2], TypeError, "dict"))
    return cases


def test_bad_state_dicts_leave_model_untouched(model):
    for sd, exc, msg in _bad_state_dicts(model):
        before = model.state_dict()
        with pytest.raises(exc, match=msg):
            model.load_state_dict(sd)
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(v, before[k])


def test_load_state_dict_partial_only_when_not_strict(model):
    sd = {"tok_emb.weight": np.zeros((50, 32), np.float32)}
    with pytest.raises(KeyError, match="missing"):
        model.load_state_dict(sd)
    model.load_state_dict(sd, strict=False)
    assert np.all(model.tok_emb.weight == 0)


# ---- checkpoints -------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path, model):
    p = tmp_path / "good.safetensors"
    model.save(str(p))
    return p


def _write(tmp_path, data, name="bad.safetensors"):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_truncated_checkpoints(tmp_path, ckpt):
    data = ckpt.read_bytes()
    for n in [0, 4, 8, 20, len(data) // 2, len(data) - 1]:
        with pytest.raises(ValueError):
            sf.Model.load(_write(tmp_path, data[:n]))


def test_forged_checkpoints(tmp_path, ckpt, model):
    import json
    data = ckpt.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + hlen])
    body = data[8 + hlen:]

    def build(h, b=body):
        raw = json.dumps(h).encode()
        return len(raw).to_bytes(8, "little") + raw + b

    cases = []
    cases.append((2**62).to_bytes(8, "little") + data[8:])                        # oversized header
    cases.append(hlen.to_bytes(8, "little") + b"{" * hlen + body)                # not JSON
    h = json.loads(json.dumps(header)); h["__metadata__"]["format"] = "other"; cases.append(build(h))
    h = json.loads(json.dumps(header)); del h["__metadata__"]; cases.append(build(h))
    h = json.loads(json.dumps(header)); h["__metadata__"]["config"] = "{not json"; cases.append(build(h))
    h = json.loads(json.dumps(header)); c = json.loads(h["__metadata__"]["config"]); c["d_model"] = 30
    h["__metadata__"]["config"] = json.dumps(c); cases.append(build(h))         # invalid config
    h = json.loads(json.dumps(header)); c = json.loads(h["__metadata__"]["config"]); c["n_layers"] = 3
    h["__metadata__"]["config"] = json.dumps(c); cases.append(build(h))         # config/tensors mismatch
    h = json.loads(json.dumps(header)); c = json.loads(h["__metadata__"]["config"]); c["bogus"] = 1
    h["__metadata__"]["config"] = json.dumps(c); cases.append(build(h))         # unknown field
    h = json.loads(json.dumps(header)); name = "tok_emb.weight"
    h[name]["data_offsets"] = [0, 10**12]; cases.append(build(h))               # lying offsets
    h = json.loads(json.dumps(header)); h[name]["shape"] = [50, 33]; cases.append(build(h))
    h = json.loads(json.dumps(header)); h[name]["dtype"] = "F64"; cases.append(build(h))
    h = json.loads(json.dumps(header)); h[name]["dtype"] = "I32"; cases.append(build(h))
    h = json.loads(json.dumps(header)); h["layers.0.attn.bogus"] = dict(h[name]); cases.append(build(h))
    cases.append(build(header, body[:-4]))                                        # short body
    for i, data_i in enumerate(cases):
        with pytest.raises(ValueError):
            sf.Model.load(_write(tmp_path, data_i, f"forged{i}.safetensors"))


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        sf.Model.load(str(tmp_path / "nope.safetensors"))
