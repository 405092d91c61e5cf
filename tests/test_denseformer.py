"""DenseFormer (Pagliardini et al. 2024, arXiv 2402.02622) in the C core against an independent
float64 reference written here from the paper's equations (1)-(2) and its dilation / period
variants (sec. 3.3), following the authors' released DWAModules (epfml/DenseFormer):

    X_0 = embedding, X_{i+1} = Block_i(x_i),
    x_{i+1} = sum_m w_{i,m} X_{j_m}  over j_m = (i+1) mod k, +k, ..., i+1   if (i+1) % p == 0
    x_{i+1} = X_{i+1}                                                       otherwise.

The blocks themselves are the float64 reference's plain blocks (tests/reference.py)."""
import numpy as np
import pytest

import reference as R
import stackformer as sf

BASE = dict(vocab_size=48, d_model=32, n_heads=4, n_layers=4, max_seq_len=16)


def dwa_sources(i, k):
    """Hand rule: block i (0-based) averages X_j with j = i+1 (mod k), ascending."""
    return [j for j in range(i + 2) if j % k == (i + 1) % k]


def test_dwa_source_pattern_by_hand():
    # written out from the paper's figure/definition, not computed by the code under test
    assert dwa_sources(0, 1) == [0, 1]
    assert dwa_sources(3, 1) == [0, 1, 2, 3, 4]
    assert dwa_sources(0, 2) == [1]
    assert dwa_sources(1, 2) == [0, 2]
    assert dwa_sources(4, 2) == [1, 3, 5]
    assert dwa_sources(4, 3) == [2, 5]


def build(seed=0, dilation=1, period=1, **kw):
    kw = {**BASE, **kw}
    cfg = sf.Config(**kw, residual="denseformer", denseformer_dilation=dilation, denseformer_period=period)
    rcfg = R.Config(**kw)  # the plain reference config: its blocks are DenseFormer's blocks
    rng = np.random.default_rng(seed)
    params = {k: v.astype(np.float32) for k, v in R.init_params(rcfg, rng).items()}
    dwa = {}
    for i in range(cfg.n_layers):
        if (i + 1) % period == 0:
            n = len(dwa_sources(i, dilation))
            w = np.zeros((1, n))
            w[0, -1] = 1.0
            dwa[f"layers.{i}.dwa.weight"] = (w + 0.3 * rng.standard_normal((1, n))).astype(np.float32)
    model = sf.Model(cfg, seed=0)
    model.load_state_dict({**params, **dwa})
    return model, rcfg, params, dwa, dilation, period


def reference_forward(rcfg, params, dwa, dilation, period, tokens):
    M = R._Model(rcfg, params)
    pre = rcfg.norm_position == "pre"
    X = [M.embed(tokens, None)]
    x = X[0]
    depth = []
    for i in range(rcfg.n_layers):
        if pre:
            a, _, slot_a = M.attention(i, M.norm(f"layers.{i}.attn_norm", x), depth, None)
            x = x + a
            m, slot_f = M.mlp(i, M.norm(f"layers.{i}.mlp_norm", x))
            x = x + m
        else:
            a, _, slot_a = M.attention(i, x, depth, None)
            x = M.norm(f"layers.{i}.attn_norm", x + a)
            m, slot_f = M.mlp(i, x)
            x = M.norm(f"layers.{i}.mlp_norm", x + m)
        depth += [slot_a, slot_f]
        X.append(x)
        if (i + 1) % period == 0:
            w = np.asarray(dwa[f"layers.{i}.dwa.weight"], dtype=np.float64)[0]
            x = sum(w[m] * X[j] for m, j in enumerate(dwa_sources(i, dilation)))
    fin = M.norm("final_norm", x) if rcfg.final_norm else x
    return M.head(fin)


def reference_loss(rcfg, params, dwa, dilation, period, tokens, targets):
    logits = reference_forward(rcfg, params, dwa, dilation, period, tokens)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1).mean()


CASES = [
    dict(),
    dict(dilation=2),
    dict(period=2),
    dict(dilation=2, period=3, n_layers=6),
    dict(dilation=3),
    dict(norm_position="post"),
    dict(norm="rmsnorm", pos="rope", activation="swiglu"),
    dict(n_kv_heads=2, causal=False, pos="sinusoidal"),
    dict(moda=True),
    dict(moda=True, dilation=2, norm_position="post"),
    dict(tie_embeddings=False, final_norm=False, bias=False),
]


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
def test_logits_match_float64_reference(kw):
    model, rcfg, params, dwa, k, p = build(**kw)
    x = np.random.default_rng(3).integers(0, BASE["vocab_size"], (2, 12))
    want = reference_forward(rcfg, params, dwa, k, p, x)
    got = model(x).logits
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("kw", [dict(), dict(dilation=2, period=2), dict(norm_position="post", moda=True)],
                         ids=["default", "dilated-periodic", "post-moda"])
def test_gradients_match_finite_differences_of_the_reference(kw):
    model, rcfg, params, dwa, k, p = build(**kw)
    rng = np.random.default_rng(5)
    x = rng.integers(0, BASE["vocab_size"], (2, 10))
    y = rng.integers(0, BASE["vocab_size"], (2, 10))
    model.forward_backward(x, y)
    grads = model.grads
    p64 = {n: v.astype(np.float64) for n, v in params.items()}
    d64 = {n: v.astype(np.float64) for n, v in dwa.items()}
    h = 1e-5
    # every DWA weight, and a few entries of the blocks' own tensors (the paths through them)
    probes = [(n, idx) for n, v in d64.items() for idx in np.ndindex(v.shape)]
    for n in ("layers.0.attn.q_proj.weight", "layers.1.mlp.down_proj.weight", "tok_emb.weight"):
        for _ in range(3):
            probes.append((n, tuple(int(rng.integers(0, s)) for s in p64[n].shape)))
    for name, idx in probes:
        table = d64 if name in d64 else p64
        old = table[name][idx]
        table[name][idx] = old + h
        lp = reference_loss(rcfg, p64, d64, k, p, x, y)
        table[name][idx] = old - h
        lm = reference_loss(rcfg, p64, d64, k, p, x, y)
        table[name][idx] = old
        fd = (lp - lm) / (2 * h)
        got = float(grads[name][idx])
        assert abs(got - fd) <= 2e-4 * max(1.0, abs(fd)), f"{name}{idx}: C {got:.6g} vs FD {fd:.6g}"


def test_identity_init_equals_the_plain_stack():
    """The paper's init (w = (0, .., 0, 1)) makes the model the plain residual stack."""
    for kw in (dict(), dict(denseformer_dilation=2, denseformer_period=2), dict(norm_position="post", moda=True)):
        cfg = sf.Config(**BASE, residual="denseformer", **kw)
        dense, plain = sf.Model(cfg, seed=4), sf.Model(sf.Config(**{**cfg.to_dict(), "residual": "plain"}), seed=4)
        x = np.random.default_rng(0).integers(0, 48, (2, 12))
        assert np.array_equal(dense(x).logits, plain(x).logits)
        for name, w in dense.state_dict().items():
            if "dwa" in name:
                assert w[0, -1] == 1.0 and not w[0, :-1].any()


def test_dwa_weights_are_decayed_like_the_authors_linear_weights():
    m = sf.Model(sf.Config(**BASE, residual="denseformer"), seed=0)
    assert not m.no_decay("layers.0.dwa.weight")


def test_checkpointing_cache_and_threads_give_the_same_bits():
    model, *_ = build(dilation=2, period=1, moda=True)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 48, (3, 12))
    y = rng.integers(0, 48, (3, 12))
    l1 = model.forward_backward(x, y)
    g1 = {n: g.copy() for n, g in model.grads.items()}
    l2 = model.forward_backward(x, y, checkpoint=True)
    assert l1 == l2
    for n, g in model.grads.items():
        assert np.array_equal(g, g1[n]), n
    full = model(x[:1]).logits
    ids = model.generate(x[0, :5], 6, temperature=0.0)
    assert ids.shape[-1] == 11
    # greedy decoding with the cache equals argmax of the full forward at every step
    logits = model(ids[..., :-1].reshape(1, -1)).logits[0]
    assert np.array_equal(np.argmax(logits[4:], -1), np.asarray(ids).reshape(-1)[5:])
    assert full.shape == (1, 12, 48)


def test_trace_shows_the_dwa_weights():
    model, rcfg, params, dwa, k, p = build(dilation=2)
    out = model(np.arange(8) % 48, trace=["alpha"])
    a = out.trace.alpha
    L = 2 * BASE["n_layers"]
    assert len(a) == L + 1
    # sublayer 2(i+1) reads the DWA output of block i: its weights sit at the sources' columns
    w = dwa["layers.1.dwa.weight"][0]
    row = a[4][0, 3]
    assert row.shape == (3,)
    assert np.allclose(row, [w[0], 0.0, w[1]])  # block 1, dilation 2: sources X_0, X_2
    assert a[1].shape[-1] == 0  # MLPs read inside their block
    w3 = dwa["layers.3.dwa.weight"][0]  # the head's input: block 3, sources X_0, X_2, X_4
    assert np.allclose(a[L][0, 0], [w3[0], 0.0, w3[1], 0.0, w3[2]])
    assert np.allclose(a[0], 1.0)  # block 0 reads the embedding itself


def test_bad_knobs_are_named():
    for field, value in (("denseformer_dilation", 0), ("denseformer_period", 5000)):
        with pytest.raises(ValueError, match=field):
            sf.Config(**BASE, residual="denseformer", **{field: value})
