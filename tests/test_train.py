"""sf.train: schedule, learning (memorization, a real corpus), determinism, checkpointing,
validation, per-layer gradient norms, progress output."""
import math
import sys

import numpy as np
import pytest

import stackformer as sf
from stackformer.data import Corpus, default_corpus
from stackformer.train import cross_entropy, evaluate, layer_grad_norms, lr_schedule

PANGRAM = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."


def byte_model(n_layers=2, d_model=32, seq_len=32, seed=0, **kw):
    cfg = sf.Config(vocab_size=256, d_model=d_model, n_heads=4, n_layers=n_layers, max_seq_len=seq_len, **kw)
    return sf.Model(cfg, seed=seed)


@pytest.fixture(scope="module")
def corpus():
    return default_corpus(max_bytes=400_000)


def test_lr_schedule_known_points():
    lr, lo, steps, warm = 1e-3, 1e-4, 110, 10
    f = lambda s: lr_schedule(s, lr, steps, warmup=warm, min_lr=lo)  # noqa: E731
    assert f(0) == pytest.approx(1e-4)          # lr * 1/10
    assert f(4) == pytest.approx(5e-4)          # lr * 5/10
    assert f(9) == pytest.approx(1e-3)          # end of warm-up: the peak
    assert f(10) == pytest.approx(1e-3)         # cosine starts at the peak
    assert f(60) == pytest.approx(5.5e-4)       # half way: (lr + min_lr) / 2
    assert f(35) == pytest.approx(1e-4 + 9e-4 * (1 + math.sqrt(0.5)) / 2)   # quarter way: cos(pi/4)
    assert f(110) == pytest.approx(1e-4) and f(500) == pytest.approx(1e-4)  # floor, clamped
    assert lr_schedule(0, 2e-3, 10) == pytest.approx(2e-3)                  # no warm-up
    rates = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))                    # monotone decay


def test_memorizes_a_short_string():
    model = byte_model(seq_len=len(PANGRAM) - 1, d_model=64)
    hist = sf.train(model, Corpus(PANGRAM, val_fraction=0.0), steps=150, batch_size=2, lr=3e-3,
                    eval_every=0, progress=False)
    assert hist.loss[0] == pytest.approx(math.log(256), abs=0.1)
    assert hist.loss[-1] < 0.05
    assert hist.val_loss == []
    prompt = sf.data.encode(PANGRAM[:10])
    out = model.generate(prompt, len(PANGRAM) - 11, temperature=0)
    assert sf.data.decode(out) == PANGRAM[:-1]


@pytest.mark.slow
def test_beats_unigram_baseline_on_default_corpus(corpus):
    model = byte_model(seq_len=64, d_model=64)
    hist = sf.train(model, corpus, steps=150, batch_size=16, lr=3e-3, eval_every=50, eval_batches=4,
                    progress=False)
    unigram = corpus.unigram_loss("val")
    assert hist.val_step == [0, 50, 100, 150]
    assert 5.0 < hist.val_loss[0] < 5.7                          # ~ln 256 at init
    assert hist.val_loss[-1] < unigram - 0.3, (hist.val_loss, unigram)


def test_two_runs_are_bitwise_identical(corpus):
    runs = []
    for _ in range(2):
        model = byte_model(seed=3)
        h = sf.train(model, corpus, steps=12, batch_size=4, seq_len=24, eval_every=4, eval_batches=2,
                     seed=5, progress=False)
        runs.append((h, model.flat_params.copy()))
    (a, pa), (b, pb) = runs
    assert a.loss == b.loss and a.val_loss == b.val_loss and a.grad_norm == b.grad_norm
    assert np.array_equal(a.layer_grad_norms, b.layer_grad_norms) and np.array_equal(pa, pb)
    other = sf.train(byte_model(seed=3), corpus, steps=12, batch_size=4, seq_len=24, eval_every=0,
                     seed=6, progress=False)
    assert other.loss != a.loss                                  # the seed picks the batches


def test_checkpointing_same_losses_less_memory(corpus):
    hists = {}
    for ckpt in (False, True):
        model = byte_model(n_layers=3, residual="attnres_block", attnres_block_size=2)
        hists[ckpt] = sf.train(model, corpus, steps=6, batch_size=4, seq_len=32, eval_every=3,
                               eval_batches=2, checkpoint=ckpt, progress=False)
    np.testing.assert_allclose(hists[True].loss, hists[False].loss, rtol=0, atol=1e-5)
    np.testing.assert_allclose(hists[True].val_loss, hists[False].val_loss, rtol=0, atol=1e-5)
    assert 0 < hists[True].memory_bytes < hists[False].memory_bytes
    assert hists[False].memory_bytes == model.train_memory_bytes(4, 32, False)


def test_history_contents(corpus):
    model = byte_model(n_layers=3)
    seen = []
    hist = sf.train(model, corpus, steps=10, batch_size=2, seq_len=16, warmup=2, lr=1e-3, min_lr=1e-4,
                    eval_every=4, eval_batches=2, progress=False, callback=lambda h: seen.append(h.step[-1]))
    assert seen == hist.step == list(range(1, 11))
    assert hist.val_step == [0, 4, 8, 10]
    assert hist.lr == [lr_schedule(i, 1e-3, 10, 2, 1e-4) for i in range(10)]
    assert hist.layer_grad_norms.shape == (10, 3) and np.all(hist.layer_grad_norms > 0)
    assert all(len(v) == 10 for v in (hist.loss, hist.grad_norm, hist.tokens_per_s))
    assert hist.tokens == 10 * 2 * 16 and hist.mean_tokens_per_s > 0
    # block norms are part of the global norm (the rest: embeddings, final norm)
    assert np.all(np.sqrt((hist.layer_grad_norms ** 2).sum(1)) <= np.array(hist.grad_norm) * (1 + 1e-6))


def test_layer_grad_norms_group_by_layer_index(corpus):
    model = byte_model(n_layers=2)
    x, y = corpus.batch(2, 16, np.random.default_rng(0))
    model.forward_backward(x, y)
    g = model.grads
    expect = [math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for k, v in g.items()
                            if k.startswith(f"layers.{i}."))) for i in range(2)]
    np.testing.assert_allclose(layer_grad_norms(model), expect, rtol=1e-12)


def test_callback_stops_early_and_still_validates(corpus):
    model = byte_model()
    hist = sf.train(model, corpus, steps=50, batch_size=2, seq_len=16, eval_every=100, eval_batches=1,
                    progress=False, callback=lambda h: len(h.step) == 3)
    assert hist.step == [1, 2, 3] and hist.val_step == [0, 3]


def test_evaluate_matches_forward_backward_loss(corpus):
    model = byte_model()
    x, y = corpus.batch(3, 20, np.random.default_rng(1), split="val")
    assert evaluate(model, [(x, y)]) == pytest.approx(model.forward_backward(x, y), rel=1e-5)
    logits = np.zeros((1, 2, 4), np.float32)
    s, n = cross_entropy(logits, np.array([[1, -100]]))
    assert n == 1 and s == pytest.approx(math.log(4))


def test_encoder_trains_on_masked_tokens(corpus):
    model = byte_model(causal=False)
    hist = sf.train(model, corpus, steps=40, batch_size=8, seq_len=32, lr=3e-3, eval_every=40,
                    eval_batches=2, progress=False)
    assert np.mean(hist.loss[-10:]) < hist.loss[0] - 1.0
    assert hist.tokens < 40 * 8 * 32 / 4                          # only masked positions count


def test_progress_output(corpus, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)          # as if tqdm were not installed
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    kw = dict(steps=20, batch_size=2, seq_len=16, eval_every=0)
    sf.train(byte_model(), corpus, progress=True, **kw)
    err = capsys.readouterr().err
    assert err.count("step ") == 10 and "step 20/20" in err and "loss" in err
    sf.train(byte_model(), corpus, progress=False, **kw)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_bad_arguments(corpus):
    with pytest.raises(ValueError, match="seq_len"):
        sf.train(byte_model(seq_len=16), corpus, steps=1, seq_len=17, progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        sf.train(sf.Model(sf.Config(vocab_size=50, d_model=16, n_heads=2, n_layers=1)), corpus, steps=1)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(residual="attnres_full"),
    dict(residual="attnres_block", attnres_block_size=2),
    dict(residual="attnres_block", attnres_block_size=3),  # 8 sublayers: the last block is short
    dict(residual="attnres_block", attnres_block_size=3, norm_position="post"),
    dict(residual="attnres_full", moda=True),
], ids=lambda kw: "-".join(f"{v}" for v in kw.values()) or "plain")
def test_checkpointing_gives_the_same_gradients(kw):
    """Checkpointing recomputes the block activations during the backward pass, and the shared
    activation buffers are overwritten block by block: every gradient must still match the run
    that keeps them all (AttnRes readers keep their own copies of the weights they need)."""
    m = sf.Model(sf.Config(vocab_size=40, d_model=32, n_heads=4, n_layers=4, max_seq_len=12, **kw), seed=3)
    rng = np.random.default_rng(3)
    for name, v in m.named_parameters().items():  # peaked, unequal AttnRes weights
        if name.endswith("res_proj.weight"):
            v[:] = rng.normal(0, 0.5, v.shape)
    x, y = rng.integers(0, 40, (3, 12)), rng.integers(0, 40, (3, 12))
    a = m.forward_backward(x, y)
    ga = {k: v.copy() for k, v in m.grads.items()}
    b = m.forward_backward(x, y, checkpoint=True)
    assert abs(a - b) < 1e-6
    for k, v in m.grads.items():
        np.testing.assert_allclose(v, ga[k], rtol=1e-5, atol=1e-7, err_msg=k)
