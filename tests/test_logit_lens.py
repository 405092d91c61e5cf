"""cache.logit_lens() (issue 23): every sublayer's input stream and the head's input decoded
through ln_final and the unembedding; the last row is the model's own output, an intermediate
row matches an independent float64 computation from tests/reference.py."""
import os
import sys

import numpy as np
import pytest

import stackformer as sf
from conftest import WIRINGS_AND_MODA, small_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as R  # noqa: E402


def toks(seed=0, B=2, T=9, V=50):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("wiring", list(WIRINGS_AND_MODA))
def test_last_row_is_the_model_output(wiring):
    cfg = small_config(n_layers=3, **WIRINGS_AND_MODA[wiring])
    m = sf.Model(cfg, seed=3)
    x = toks()
    logits, cache = m.run_with_cache(x)
    lens = cache.logit_lens(targets="next")
    n = cfg.n_layers
    # every aggregate / sublayer input in depth order, then the head's input
    want = [f"blocks.{i}.hook_{s}" for i in range(n) for s in ("resid_pre", "resid_mid")]
    want.append(f"blocks.{n - 1}.hook_resid_post")
    assert [r.stream for r in lens.rows] == want
    last = lens.rows[-1]
    assert last.agreement == 1.0
    assert abs(last.kl) < 1e-9
    np.testing.assert_allclose(cache.decode(last.stream), logits, atol=1e-4)
    # the model's own loss on the same targets
    y = np.full(x.shape, -100)
    y[:, :-1] = x[:, 1:]
    lp = _log_softmax(logits.astype(np.float64))
    keep = y != -100
    want_loss = -np.take_along_axis(lp, np.where(keep, y, 0)[..., None], -1)[..., 0][keep].mean()
    assert abs(last.loss - want_loss) < 1e-5
    for r in lens.rows:
        assert 0.0 <= r.agreement <= 1.0 and r.kl > -1e-9 and np.isfinite(r.loss)
    # earlier streams are not the output: some KL is clearly positive
    assert max(r.kl for r in lens.rows[:-1]) > 1e-6


@pytest.mark.parametrize("kw", [dict(), dict(norm="rmsnorm", tie_embeddings=False),
                                dict(final_norm=False, pos="sinusoidal")])
def test_intermediate_row_against_float64_reference(kw):
    kw = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=3, max_seq_len=16, **kw)
    cfg, rcfg = sf.Config(**kw), R.Config(**kw)
    params = {k: v.astype(np.float32) for k, v in R.init_params(rcfg, np.random.default_rng(7)).items()}
    model = sf.Model(cfg)
    model.load_state_dict(params)
    x = toks(seed=8)
    y = toks(seed=9)
    y[0, 2] = -100
    _, cache = model.run_with_cache(x)
    lens = cache.logit_lens(targets=y)
    row = next(r for r in lens.rows if r.stream == "blocks.1.hook_resid_mid")
    # independent: the reference's stream after block 1's attention, its final norm and head
    ref = R.forward(rcfg, params, tokens=x)
    M = R._Model(rcfg, params)
    h = ref["hidden"][1] + ref["attn_out"][1]
    if rcfg.final_norm:
        h = M.norm("final_norm", h)
    lp = _log_softmax(M.head(h))
    final = _log_softmax(ref["logits"])
    keep = y != -100
    loss = -np.take_along_axis(lp, np.where(keep, y, 0)[..., None], -1)[..., 0][keep].mean()
    kl = (np.exp(final) * (final - lp)).sum(-1).mean()
    agree = (lp.argmax(-1) == final.argmax(-1)).mean()
    assert abs(row.loss - loss) < 1e-4
    assert abs(row.kl - kl) < 1e-5 * max(1.0, kl)
    assert row.agreement == agree
    assert kl > 1e-4  # a real intermediate layer, not the output


def test_table_and_plot(tmp_path):
    cfg = small_config(n_layers=2, residual="attnres_full")
    _, cache = sf.Model(cfg, seed=0).run_with_cache(toks())
    lens = cache.logit_lens()
    assert all(r.loss is None for r in lens.rows)
    md = lens.to_markdown()
    lines = md.splitlines()
    assert lines[0].startswith("| stream |") and "loss" not in lines[0]
    assert len(lines) == 2 + len(lens.rows) == 2 + 5
    assert "blocks.1.hook_resid_post" in lines[-1] and "1.000" in lines[-1]
    assert repr(lens).startswith("LogitLens(5 streams)") and md in repr(lens)
    with_loss = cache.logit_lens("next").to_markdown()
    assert "| loss |" in with_loss.splitlines()[0]
    pytest.importorskip("matplotlib")
    fig = lens.plot(str(tmp_path / "lens.png"))
    assert (tmp_path / "lens.png").stat().st_size > 1000
    assert len(fig.axes) == 2


def test_lens_with_selected_layers_and_embeddings():
    cfg = small_config(n_layers=3)
    m = sf.Model(cfg, seed=0)
    _, part = m.run_with_cache(toks(), layers=[1])
    assert [r.stream for r in part.logit_lens().rows] == ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid"]
    emb = np.random.default_rng(0).normal(size=(1, 5, cfg.d_model)).astype(np.float32)
    _, ce = m.run_with_cache(emb)
    assert len(ce.logit_lens().rows) == 7
    with pytest.raises(ValueError, match="needs token ids"):
        ce.logit_lens("next")


def test_target_errors():
    cfg = small_config()
    _, c = sf.Model(cfg, seed=0).run_with_cache(toks(B=2, T=5))
    with pytest.raises(ValueError, match=r"shape \(B, T\) = \(2, 5\)"):
        c.logit_lens(np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="integer"):
        c.logit_lens(np.zeros((2, 5)))
    with pytest.raises(IndexError, match="target 50 at"):
        c.logit_lens(np.full((2, 5), 50))
    with pytest.raises(ValueError, match="'next'"):
        c.logit_lens("previous")
    with pytest.raises(ValueError, match="ignore_index"):
        c.logit_lens(np.full((2, 5), -100))
    with pytest.raises(ValueError, match="not a \\(B, T, d_model\\) stream"):
        c.decode("blocks.0.attn.hook_pattern")
