"""Copies and pickles of a Model are whole, independent models.

The weights live in C: a shallow copy that shared them would let one experiment silently
write into another. copy.copy and copy.deepcopy both give a full copy; pickle stores config,
weights, the last gradients, AdamW's moments and step, so an unpickled model (also in another
process started with `spawn`) gives the same logits and continues training bit for bit.
"""
import copy
import multiprocessing as mp
import pickle

import numpy as np
import pytest

import stackformer as sf

CFG = dict(vocab_size=256, d_model=32, n_heads=4, n_layers=2, max_seq_len=32)
WIRINGS = {
    "plain": {},
    "attnres_block+dropout": dict(residual="attnres_block", attnres_block_size=2,
                                  attn_dropout=0.1, resid_dropout=0.1),
    "moda": dict(moda=True, pos="rope", n_kv_heads=2),
}


def _model(wiring="plain", seed=3):
    return sf.Model(sf.Config(**CFG, **WIRINGS[wiring]), seed=seed)


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (2, 16)), rng.integers(0, 256, (2, 16))) for _ in range(n)]


X = np.random.default_rng(9).integers(0, 256, (2, 12))


def _train(model, batches, first=0):
    return [model.train_step(x, y, lr=1e-2, dropout_seed=first + i) for i, (x, y) in enumerate(batches)]


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_copy_is_independent(how):
    m = _model()
    before = m(X).logits.copy()
    c = {"copy": copy.copy, "deepcopy": copy.deepcopy,
         "pickle": lambda a: pickle.loads(pickle.dumps(a))}[how](m)
    assert c is not m and isinstance(c, sf.Model)
    np.testing.assert_array_equal(c(X).logits, before)
    # mutate the copy every way a user can: a weight view, the flat buffer, a train step
    c.layers[0].attn.q_proj.weight[:] = 0.0
    c.flat_params[:10] = 1.0
    _train(c, _batches(2))
    np.testing.assert_array_equal(m(X).logits, before)
    assert m.step == 0 and not np.any(m.flat_grads)
    # ... and the other way round
    c_logits = c(X).logits.copy()
    m.tok_emb.weight[:] = 0.5
    np.testing.assert_array_equal(c(X).logits, c_logits)


@pytest.mark.parametrize("wiring", list(WIRINGS))
@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_training_continues_bit_identically(wiring, how):
    """Train 3 steps, copy, then train both 3 more: same losses, weights, moments, step as a
    run that never copied (dropout masks are keyed by the step, which travels too)."""
    batches = _batches(6)
    ref = _model(wiring)
    ref_losses = _train(ref, batches)

    m = _model(wiring)
    _train(m, batches[:3])
    m.checkpoint_extra = {"data_rng": [1, 2, 3]}
    c = {"copy": copy.copy, "deepcopy": copy.deepcopy,
         "pickle": lambda a: pickle.loads(pickle.dumps(a))}[how](m)
    assert c.step == 3 and c.last_grad_norm == m.last_grad_norm
    assert c.checkpoint_extra == m.checkpoint_extra and c.checkpoint_extra is not m.checkpoint_extra
    np.testing.assert_array_equal(c.flat_grads, m.flat_grads)
    for model in (m, c):
        assert _train(model, batches[3:], first=3) == ref_losses[3:]
        np.testing.assert_array_equal(model.flat_params, ref.flat_params)
        st, rst = model.optimizer_state(), ref.optimizer_state()
        for k in st:
            np.testing.assert_array_equal(st[k], rst[k])
        np.testing.assert_array_equal(model(X).logits, ref(X).logits)


def test_pickle_between_backward_and_step():
    """Gradients of a finished backward pass travel, so the step can be taken after unpickling."""
    x, y = _batches(1)[0]
    a = _model()
    a.forward_backward(x, y)
    b = pickle.loads(pickle.dumps(a))
    a.optimizer_step(1e-2)
    b.optimizer_step(1e-2)
    np.testing.assert_array_equal(a.flat_params, b.flat_params)
    assert a.last_grad_norm == b.last_grad_norm


def test_fresh_model_pickle_is_small():
    """A model that never trained stores no moments (they are zeros): ~ one copy of the weights."""
    m = _model()
    assert len(pickle.dumps(m)) < 4 * m.num_params * 1.1 + 4096
    _train(m, _batches(1))
    assert len(pickle.dumps(m)) > 4 * m.num_params * 3  # weights, grads, two moments


def test_corrupt_pickle_state_is_a_clear_error():
    state = _model()._getstate()
    bad = dict(state, params=state["params"][:-1])
    with pytest.raises(ValueError, match="params"):
        sf.Model._from_state(bad)
    with pytest.raises(ValueError, match="pickled stackformer model"):
        sf.Model._from_state(dict(state, format="other"))


def _logits_in_child(payload):
    model = pickle.loads(payload)
    return model(X).logits


def test_spawned_process_gets_identical_logits():
    m = _model("moda")
    _train(m, _batches(2))
    expected = m(X).logits
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_logits_in_child, (pickle.dumps(m),)).get(timeout=120)
    np.testing.assert_array_equal(got, expected)
