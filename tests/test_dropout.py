"""Dropout (attention probabilities and sublayer outputs): training-only, deterministic masks
recomputed in the backward pass — checked by finite differences with the masks held fixed."""
import numpy as np
import pytest

import stackformer as sf
from conftest import small_config

MODES = {
    "plain-pre": dict(),
    "plain-post": dict(norm_position="post"),
    "attnres_full": dict(residual="attnres_full"),
    "attnres_block-post": dict(residual="attnres_block", attnres_block_size=3, norm_position="post"),
    "moda": dict(moda=True, moda_chunk=2),
}


def _model(kw, rates=(0.2, 0.2), seed=0):
    m = sf.Model(small_config(d_model=16, max_seq_len=8, attn_dropout=rates[0], resid_dropout=rates[1], **kw), seed=seed)
    rng = np.random.default_rng(seed)
    for name, v in m.named_parameters().items():
        if name.endswith("res_proj.weight"):
            v[:] = rng.normal(0, 0.5, v.shape)
        elif "norm" in name:
            v[:] = 1 + 0.1 * rng.normal(size=v.shape)
        else:
            v[:] = rng.normal(0, 0.3, v.shape)
    return m


def _data():
    rng = np.random.default_rng(1)
    return rng.integers(0, 50, (2, 6)), rng.integers(0, 50, (2, 6))


@pytest.mark.parametrize("mode", MODES)
def test_inference_never_drops(mode):
    a, b = _model(MODES[mode]), _model(MODES[mode], rates=(0.0, 0.0))
    x, _ = _data()
    np.testing.assert_array_equal(a(x).logits, b(x).logits)


@pytest.mark.parametrize("mode", MODES)
def test_masks_are_deterministic_and_seeded(mode):
    m, ref = _model(MODES[mode]), _model(MODES[mode], rates=(0.0, 0.0))
    x, y = _data()
    l0 = m.forward_backward(x, y, dropout_seed=5)
    assert m.forward_backward(x, y, dropout_seed=5) == l0
    assert m.forward_backward(x, y, dropout_seed=6) != l0
    assert ref.forward_backward(x, y) != l0  # dropout changes the training loss


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_finite_differences(mode):
    """With the seed and step fixed the masks are fixed, so the loss is a smooth function of the
    weights. float32 central differences with eps 1e-2: truncation error ~eps^2 |f'''| and
    rounding ~1e-7 |loss| / eps ~ 3e-5 keep |numeric - analytic| well under 5e-3 + 5e-2 |g|."""
    m = _model(MODES[mode])
    x, y = _data()
    m.forward_backward(x, y, dropout_seed=3)
    grads = {k: v.copy() for k, v in m.grads.items()}
    rng = np.random.default_rng(0)
    eps = 1e-2
    for name, p in m.named_parameters().items():
        flat = p.reshape(-1)
        for j in rng.choice(flat.size, min(3, flat.size), replace=False):
            old = flat[j]
            flat[j] = old + eps
            lp = m.forward_backward(x, y, dropout_seed=3)
            flat[j] = old - eps
            lm = m.forward_backward(x, y, dropout_seed=3)
            flat[j] = old
            num, ana = (lp - lm) / (2 * eps), grads[name].reshape(-1)[j]
            assert abs(num - ana) < 5e-3 + 5e-2 * abs(ana), f"{name}[{j}]: numeric {num}, analytic {ana}"


def test_checkpointing_repeats_the_masks():
    m = _model(dict(moda=True))
    x, y = _data()
    a = m.forward_backward(x, y, dropout_seed=9)
    ga = {k: v.copy() for k, v in m.grads.items()}
    b = m.forward_backward(x, y, dropout_seed=9, checkpoint=True)
    assert abs(a - b) < 1e-6
    for k, v in m.grads.items():
        np.testing.assert_allclose(v, ga[k], atol=1e-6)


def test_bad_rates():
    for r in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="dropout"):
            small_config(attn_dropout=r)
