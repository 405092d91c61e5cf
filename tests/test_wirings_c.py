"""The C core's competitor wirings (csrc/wiring/denseformer.c, hyper.c: DenseFormer,
Hyper-Connections static and dynamic, mHC) against the float64 reference of tests/reference.py
(written from the papers, docs/WIRINGS.md): logits on many configs, and the C gradients of every
wiring tensor against central finite differences of the reference loss. (tests/test_denseformer.py
and tests/test_hyper_connections.py check the same against second, independent references.)"""
import numpy as np
import pytest

import reference as R
from ablation_checks import assert_probes_match_fd
import stackformer as sf
import wiring_params as WP

SIZES = dict(vocab_size=29, d_model=16, n_heads=2, n_layers=3, max_seq_len=10)


def build(seed=0, **kw):
    rcfg = R.Config(**{**SIZES, **kw})
    params = WP.params(rcfg, seed=seed, perturbed=True)
    model = sf.Model(sf.Config(**{**SIZES, **kw}), seed=0)
    sd = model.state_dict()
    assert set(sd) == set(params), sorted(set(sd) ^ set(params))
    for name, v in sd.items():
        assert v.shape == params[name].shape, name
    model.load_state_dict({k: v.astype(np.float32) for k, v in params.items()})
    return model, rcfg, {k: v.astype(np.float32).astype(np.float64) for k, v in params.items()}


CASES = [
    dict(residual="denseformer"),
    dict(residual="denseformer", denseformer_dilation=2, denseformer_period=2, norm_position="post"),
    dict(residual="hyper_connections"),
    dict(residual="hyper_connections", hc_dynamic=True),
    dict(residual="hyper_connections", hc_dynamic=True, hc_expansion=2, norm="rmsnorm", moda=True),
    dict(residual="hyper_connections", hc_dynamic=True, norm_position="post", pos="rope"),
    dict(residual="mhc"),
    dict(residual="mhc", hc_expansion=2, mhc_sinkhorn_iters=1),
    dict(residual="mhc", hc_expansion=3, mhc_sinkhorn_iters=5, norm="rmsnorm", n_kv_heads=1, moda=True),
    dict(residual="mhc", norm_position="post", causal=False, activation="swiglu"),
    dict(residual="mhc", tie_embeddings=False, final_norm=False, bias=False),
    # d = 12: the stream, Sinkhorn and DWA kernels' vector stretches end in a tail (d % 8 = 4)
    dict(residual="denseformer", denseformer_dilation=2, d_model=12),
    dict(residual="hyper_connections", hc_dynamic=True, d_model=12),
    dict(residual="mhc", mhc_sinkhorn_iters=4, d_model=12),
]


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
def test_logits_match_the_reference(kw):
    model, rcfg, params = build(**kw)
    x = np.random.default_rng(2).integers(0, SIZES["vocab_size"], (2, 8))
    want = R.forward(rcfg, params, tokens=x)["logits"]
    got = model(x).logits
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("kw", [c for c in CASES if c["residual"] != "denseformer"],
                         ids=[str(c) for c in CASES if c["residual"] != "denseformer"])
def test_traces_match_the_reference(kw):
    """The read weights (trace.alpha: alpha_{.,0} for HC, H_pre for mHC) and the per-copy stream
    RMS (trace.copy_rms) against the reference's own recordings."""
    model, rcfg, params = build(**kw)
    x = np.random.default_rng(2).integers(0, SIZES["vocab_size"], (2, 8))
    ref = R.forward(rcfg, params, tokens=x)["wiring"]
    tr = model(x, trace=True).trace
    E, L = model.config.hc_expansion, 2 * SIZES["n_layers"]
    want_rms = np.array([np.sqrt((h ** 2).mean(axis=(0, 1, 3))) for h in ref["streams"]])
    assert tr.copy_rms.shape == (L + 1, E) == want_rms.shape
    np.testing.assert_allclose(tr.copy_rms, want_rms, rtol=1e-4)
    reads = [a[..., 0] for a in ref["alpha"]] if kw["residual"] == "hyper_connections" else ref["pre"]
    for k in range(L):
        np.testing.assert_allclose(tr.alpha[k], reads[k], rtol=1e-4, atol=1e-5)
    assert model.alpha_labels()[0] == [f"h{j + 1}" for j in range(E)]


def test_copy_rms_only_for_copy_wirings():
    m = sf.Model(sf.Config(**SIZES), seed=0)
    assert m(np.zeros((1, 4), dtype=np.int64), trace=True).trace.copy_rms is None


GRAD_CASES = [
    dict(residual="denseformer", denseformer_dilation=2),
    dict(residual="hyper_connections", hc_dynamic=True),
    dict(residual="hyper_connections", hc_dynamic=True, norm="rmsnorm", norm_position="post"),
    dict(residual="mhc"),
    dict(residual="mhc", hc_expansion=3, mhc_sinkhorn_iters=3, norm_position="post"),
    dict(residual="denseformer", denseformer_period=2, d_model=12),
    dict(residual="hyper_connections", hc_dynamic=True, d_model=12),
    dict(residual="mhc", d_model=12),
]


@pytest.mark.parametrize("kw", GRAD_CASES, ids=[str(c) for c in GRAD_CASES])
def test_gradients_match_finite_differences_of_the_reference(kw):
    model, rcfg, params = build(**kw)
    rng = np.random.default_rng(4)
    x = rng.integers(0, SIZES["vocab_size"], (2, 6))
    y = rng.integers(0, SIZES["vocab_size"], (2, 6))
    model.forward_backward(x, y)
    grads = model.grads
    h = 1e-5
    probes = []
    for name, v in params.items():
        if WP.is_wiring_tensor(name):  # several entries of every wiring tensor
            for _ in range(min(6, v.size)):
                probes.append((name, tuple(int(rng.integers(0, s)) for s in v.shape)))
    for name in ("layers.0.attn.v_proj.weight", "layers.2.mlp.up_proj.weight", "tok_emb.weight"):
        probes.append((name, tuple(int(rng.integers(0, s)) for s in params[name].shape)))
    assert_probes_match_fd(rcfg, params, grads, probes, x, y, h=h, rtol=3e-4, floor=0.1)


@pytest.mark.parametrize("residual", ["denseformer", "hyper_connections", "mhc"])
def test_c_init_is_the_papers(residual):
    rcfg = R.Config(**SIZES, residual=residual)
    sd = sf.Model(sf.Config(**SIZES, residual=residual), seed=0).state_dict()
    for name, v in sd.items():
        w0 = R.wiring_init(rcfg, name, v.shape)
        if w0 is not None:
            assert np.allclose(v, np.asarray(w0).reshape(v.shape), atol=1e-7), name


def test_mhc_starts_as_the_pre_norm_stack_and_trains():
    cfg = sf.Config(**SIZES, residual="mhc", norm_eps=1e-10)
    m = sf.Model(cfg, seed=1)
    p = sf.Model(sf.Config(**{**cfg.to_dict(), "residual": "plain"}), seed=1)
    x = np.random.default_rng(0).integers(0, 29, (2, 8))
    assert np.abs(m(x).logits - p(x).logits).max() < 1e-5
    losses = [m.train_step(x, np.roll(x, -1, 1), lr=3e-3) for _ in range(30)]
    assert losses[-1] < losses[0] - 0.5


def test_mhc_knobs_are_checked():
    with pytest.raises(ValueError, match="hc_expansion"):
        sf.Config(**SIZES, residual="mhc", hc_expansion=1)
    with pytest.raises(ValueError, match="mhc_sinkhorn_iters"):
        sf.Config(**SIZES, residual="mhc", mhc_sinkhorn_iters=0)


def test_mhc_checkpointing_threads_and_cache_bits():
    model, rcfg, params = build(residual="mhc", hc_expansion=4)
    rng = np.random.default_rng(3)
    x = rng.integers(0, 29, (3, 9))
    y = rng.integers(0, 29, (3, 9))
    l1 = model.forward_backward(x, y)
    g1 = {k: g.copy() for k, g in model.grads.items()}
    for kw in (dict(checkpoint=True), dict(n_threads=2), dict(n_threads=3)):
        assert model.forward_backward(x, y, **kw) == l1
        for k, g in model.grads.items():
            assert np.array_equal(g, g1[k]), (kw, k)
    ids = np.asarray(model.generate(x[0, :4], 5, temperature=0.0)).reshape(-1)
    logits = model(ids[:-1]).logits[0]
    assert np.array_equal(np.argmax(logits[3:], -1), ids[4:])
