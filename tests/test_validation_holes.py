"""The validation holes of issue #24, each refused with a clear exception at its root: the one
input parser of forward and forward_backward (python/stackformer/_core.c parse_batch) refuses
values its conversions would change and shapes that do not line up; C checks ranges, mask
values and finiteness (csrc/sf_model.c check_inputs, sf_model_restore); sizes never wrap."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import stackformer as sf

CFG = dict(vocab_size=64, d_model=32, n_heads=4, n_layers=2, max_seq_len=16)
X = np.random.default_rng(0).integers(0, 64, (2, 8))


@pytest.fixture
def m():
    return sf.Model(sf.Config(**CFG), seed=0)


def test_float64_embeddings_beyond_float32_are_refused(m):
    e = np.zeros((2, 8, 32))
    e[0, 0, 0] = 1e39  # finite in float64, inf in float32
    with pytest.raises(ValueError, match="NaN or inf"):
        m(e, key_padding_mask=None)
    with pytest.raises(ValueError, match="NaN or inf"):
        m.forward_backward(e, X)


@pytest.mark.parametrize("value", [2, 256, -1, 2**32], ids=["2", "256", "-1", "2**32"])
@pytest.mark.parametrize("call", ["forward", "forward_backward"])
def test_mask_values_other_than_0_and_1_are_refused(m, value, call):
    """256 used to wrap to 0 (padding) in the uint8 conversion; forward_backward checked
    nothing at all."""
    mask = np.ones((2, 8), dtype=np.int64)
    mask[1, 3] = value
    with pytest.raises(ValueError, match="key_padding_mask"):
        if call == "forward":
            m(X, key_padding_mask=mask)
        else:
            m.forward_backward(X, X, key_padding_mask=mask)


def test_forward_backward_checks_the_mask_like_forward(m):
    for bad, exc in [(np.ones(16, dtype=bool), ValueError), (np.ones((8, 2), dtype=bool), ValueError),
                     (np.full((2, 8), 0.5), TypeError), ([[1] * 8] * 2, TypeError)]:
        with pytest.raises(exc, match="key_padding_mask"):
            m.forward_backward(X, X, key_padding_mask=bad)
        with pytest.raises(exc, match="key_padding_mask"):
            m(X, key_padding_mask=bad)
    # a good mask gives the same loss whether bool or int
    mask = np.ones((2, 8), dtype=bool)
    mask[0, 5:] = False
    assert m.forward_backward(X, X, key_padding_mask=mask) == \
        m.forward_backward(X, X, key_padding_mask=mask.astype(np.int64))


def test_targets_must_have_the_inputs_shape_not_just_their_size(m):
    with pytest.raises(ValueError, match="targets must have shape"):
        m.forward_backward(X, X.reshape(8, 2))
    with pytest.raises(ValueError, match="targets must have shape"):
        m.forward_backward(X, X.ravel())
    # a 1-D input takes 1-D targets (or a batch of one)
    m.forward_backward(X[0], X[0])
    m.forward_backward(X[0], X[:1])


def test_uint64_targets_and_tokens_near_2_64_do_not_wrap(m):
    t = X.astype(np.uint64)
    t[0, 0] = 2**64 - 100  # used to become -100 = ignore_index
    with pytest.raises(IndexError, match="18446744073709551516"):
        m.forward_backward(X, t)
    with pytest.raises(IndexError, match="18446744073709551516"):
        m(t)
    t = X.astype(np.int64)
    t[1, 2] = 2**32 + 5  # used to wrap to 5 in int32
    with pytest.raises(IndexError, match=str(2**32 + 5)):
        m.forward_backward(X, t)
    with pytest.raises(IndexError, match=str(2**32 + 5)):
        m(t)


def test_negative_second_moment_is_refused_at_load(m, tmp_path):
    m.train_step(X, X, lr=1e-2)
    st = m.optimizer_state()
    st["adam_v"][3] = -1.0
    before = m.optimizer_state()
    with pytest.raises(ValueError, match="adam_v"):
        m.load_optimizer_state(st)
    np.testing.assert_array_equal(m.optimizer_state()["adam_v"], before["adam_v"])
    # and a checkpoint with one: refused as a bad file, not NaN everywhere one step later
    p = tmp_path / "c.safetensors"
    m.save(str(p), optimizer=True)
    tensors = load_file(str(p))
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    tensors["optimizer.adam_v"][0] = -1e-3
    save_file(tensors, str(p), metadata=meta)
    with pytest.raises(ValueError, match="adam_v"):
        sf.Model.load(str(p))


def test_check_finite_names_the_bad_tensors_and_generate_refuses_nan_logits(m):
    assert m.check_finite() is None
    ref = m.generate(X[0, :4], 3, temperature=0.0)
    m.layers[1].mlp.up_proj.weight[0, 0] = np.nan
    m.tok_emb.weight[2, 1] = np.inf
    with pytest.raises(FloatingPointError, match=r"tok_emb\.weight \(1 of .*layers\.1\.mlp\.up_proj\.weight \(1 of "):
        m.check_finite()
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        m.generate(X[0, :4], 3)
    m.layers[1].mlp.up_proj.weight[0, 0] = 0.0
    m.tok_emb.weight[2, 1] = 0.0
    m.check_finite()
    assert len(m.generate(X[0, :4], 3, temperature=0.0)) == len(ref)


FORGED = {
    "vocab str": {"vocab_size": "64"}, "vocab float": {"vocab_size": 64.5},
    "vocab huge": {"vocab_size": 2**70}, "d_model list": {"d_model": [32]},
    "d_model null": {"d_model": None}, "eps str": {"norm_eps": "1e-5"},
    "eps int 10**400": {"norm_eps": 10**400}, "causal str": {"causal": "yes"},
    "n_layers dict": {"n_layers": {"a": 1}}, "rope 2**2000": {"rope_theta": 2**2000},
    "n_layers bool": {"n_layers": True}, "heads float": {"n_heads": 4.0},
}


@pytest.mark.parametrize("name", list(FORGED))
def test_forged_config_metadata_is_a_value_error(m, tmp_path, name):
    p = tmp_path / "c.safetensors"
    m.save(str(p))
    tensors = load_file(str(p))
    cfg = dict(m.config.to_dict(), **FORGED[name])
    save_file(tensors, str(p), metadata={"format": "stackformer/1", "config": json.dumps(cfg)})
    with pytest.raises(ValueError, match="config"):
        sf.Model.load(str(p))


def test_config_range_errors_name_the_field():
    with pytest.raises(ValueError, match=r"Config\.rope_theta is out of range"):
        sf.Config(**CFG, rope_theta=10**400)
    with pytest.raises(ValueError, match=r"Config\.vocab_size is out of range"):
        sf.Config(**dict(CFG, vocab_size=2**70))


def test_string_learning_rate_and_eps_rounding_to_one_are_refused(m):
    with pytest.raises(TypeError, match="lr"):
        m.train_step(X, X, lr="0.1")
    with pytest.raises(TypeError, match="lr"):
        m.optimizer_step("0.1")
    with pytest.raises(ValueError, match="norm_eps"):
        sf.Config(**CFG, norm_eps=0.99999999)  # 1.0 in float32


def test_train_memory_bytes_does_not_wrap(m):
    with pytest.raises(OverflowError, match="overflows"):
        m.train_memory_bytes(2**62, 2**62)
    with pytest.raises(OverflowError, match="overflows"):
        m.train_memory_bytes(2**40, 2**40)
    assert m.train_memory_bytes(2, 8) > 0


def _mib(msg, label):
    import re
    m = re.search(label + r" ([\d.]+) (MiB|GiB)", msg)
    assert m, msg
    return float(m.group(1)) * (1024.0 if m.group(2) == "GiB" else 1.0)


def test_outputs_and_workspace_are_checked_as_one_total(monkeypatch):
    """Each part of a forward's memory fitting is not enough: logits + traces (the binding's
    outputs) and the C workspace are checked together against the limit, before either is
    allocated (issue #24: 7.5 GiB of logits + 21.6 GiB of workspace passed on 23.5 GiB)."""
    m = sf.Model(sf.Config(vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=256), seed=0)
    x = np.zeros((8, 256), np.int64)
    monkeypatch.setenv("STACKFORMER_MEMORY_LIMIT", "1")
    with pytest.raises(MemoryError, match="workspace") as e:
        m(x, trace=["attention"])
    out, ws = _mib(str(e.value), "outputs and traces"), _mib(str(e.value), r"\+ workspace")
    assert out > 0.5 and ws > 0.5
    mib = 1 << 20
    # each part alone fits, the sum does not: refused, and the model still works afterwards
    monkeypatch.setenv("STACKFORMER_MEMORY_LIMIT", str(int((max(out, ws) + 0.3 * min(out, ws)) * mib)))
    with pytest.raises(MemoryError, match=r"outputs and traces .* \+ workspace"):
        m(x, trace=["attention"])
    monkeypatch.setenv("STACKFORMER_MEMORY_LIMIT", str(int((out + ws + 2) * mib)))
    assert m(x, trace=["attention"]).logits.shape == (8, 256, 256)
    monkeypatch.delenv("STACKFORMER_MEMORY_LIMIT")
    assert np.isfinite(m(x[:1, :8]).logits).all()
