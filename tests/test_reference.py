"""Self-checks of tests/reference.py (no stackformer C code needed).

The reference is only useful if it is right, so it is checked here against invariants that
follow from DEVELOPERS.md, against hand-worked cases, and (when PyTorch is installed) against
torch.nn.TransformerEncoderLayer and scaled_dot_product_attention.
"""

import math
import os
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as R  # noqa: E402

V, D, H, T = 50, 64, 4, 12


def make_cfg(**kw):
    base = dict(vocab_size=V, d_model=D, n_heads=H, n_layers=2, max_seq_len=16)
    base.update(kw)
    return R.Config(**base)


def tokens_for(B=2, T=T, seed=1):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def run(cfg, seed=0, tokens=None, **kw):
    params = R.init_params(cfg, np.random.default_rng(seed))
    return R.forward(cfg, params, tokens if tokens is not None else tokens_for(), **kw), params


# A spread of configurations used by the generic invariance tests.
CONFIGS = {
    "plain_pre": dict(),
    "plain_post_rms_rope_swiglu": dict(norm_position="post", norm="rmsnorm", pos="rope",
                                       activation="swiglu", bias=False),
    "sinusoidal_gelu_tanh_gqa": dict(pos="sinusoidal", activation="gelu_tanh", n_kv_heads=2,
                                     tie_embeddings=False, final_norm=False),
    "attnres_full": dict(residual="attnres_full", n_layers=3),
    "attnres_block3_post": dict(residual="attnres_block", attnres_block_size=3, n_layers=3,
                                norm_position="post", pos="rope"),
    "moda_c1": dict(moda=True, n_layers=3, pos="rope"),
    "moda_c4_gqa_post": dict(moda=True, moda_chunk=4, n_layers=3, n_kv_heads=2,
                             norm_position="post"),
    "moda_depth_only_c2": dict(moda=True, moda_chunk=2, moda_depth_only=True, n_layers=3),
    "moda_attnres_block": dict(moda=True, moda_chunk=2, residual="attnres_block",
                               attnres_block_size=2, n_layers=3),
}


# ------------------------------------------------------------------------------------------
# Parameter table
# ------------------------------------------------------------------------------------------


def test_param_shapes_full_table_order():
    cfg = make_cfg(n_layers=2, activation="swiglu", moda=True, residual="attnres_full",
                   tie_embeddings=False, n_kv_heads=2, d_ff=96)
    kv = 2 * (D // H)
    layer = lambda i: [  # noqa: E731
        (f"layers.{i}.attn_norm.weight", (D,)), (f"layers.{i}.attn_norm.bias", (D,)),
        (f"layers.{i}.attn.q_proj.weight", (D, D)), (f"layers.{i}.attn.q_proj.bias", (D,)),
        (f"layers.{i}.attn.k_proj.weight", (kv, D)), (f"layers.{i}.attn.k_proj.bias", (kv,)),
        (f"layers.{i}.attn.v_proj.weight", (kv, D)), (f"layers.{i}.attn.v_proj.bias", (kv,)),
        (f"layers.{i}.attn.o_proj.weight", (D, D)), (f"layers.{i}.attn.o_proj.bias", (D,)),
        (f"layers.{i}.mlp_norm.weight", (D,)), (f"layers.{i}.mlp_norm.bias", (D,)),
        (f"layers.{i}.mlp.gate_proj.weight", (96, D)), (f"layers.{i}.mlp.gate_proj.bias", (96,)),
        (f"layers.{i}.mlp.up_proj.weight", (96, D)), (f"layers.{i}.mlp.up_proj.bias", (96,)),
        (f"layers.{i}.mlp.down_proj.weight", (D, 96)), (f"layers.{i}.mlp.down_proj.bias", (D,)),
    ] + ([(f"layers.{i}.mlp.depth_k_proj.weight", (kv, D)),
          (f"layers.{i}.mlp.depth_v_proj.weight", (kv, D))] if i < 1 else []) + [
        (f"layers.{i}.attn_res_proj.weight", (1, D)), (f"layers.{i}.attn_res_norm.weight", (D,)),
        (f"layers.{i}.mlp_res_proj.weight", (1, D)), (f"layers.{i}.mlp_res_norm.weight", (D,)),
    ]
    expected = ([("tok_emb.weight", (V, D)), ("pos_emb.weight", (16, D))] + layer(0) + layer(1)
                + [("output_res_proj.weight", (1, D)), ("output_res_norm.weight", (D,)),
                   ("final_norm.weight", (D,)), ("final_norm.bias", (D,)),
                   ("lm_head.weight", (V, D))])
    assert list(R.param_shapes(cfg).items()) == expected


@pytest.mark.parametrize("kw, absent", [
    (dict(norm="rmsnorm"), ["attn_norm.bias", "mlp_norm.bias", "final_norm.bias"]),
    (dict(bias=False), [".bias"]),
    (dict(pos="rope"), ["pos_emb"]),
    (dict(pos="sinusoidal"), ["pos_emb"]),
    (dict(final_norm=False), ["final_norm"]),
    (dict(), ["lm_head", "gate_proj", "depth_", "_res_"]),
    (dict(moda=True, n_layers=1), ["depth_"]),
])
def test_param_shapes_conditional(kw, absent):
    names = list(R.param_shapes(make_cfg(**kw)))
    for frag in absent:
        assert not [n for n in names if frag in n], frag
    assert "tok_emb.weight" in names and "layers.0.attn.q_proj.weight" in names


def test_init_params_shapes_and_nontrivial():
    cfg = make_cfg(residual="attnres_block", moda=True, tie_embeddings=False)
    p = R.init_params(cfg, np.random.default_rng(0))
    shapes = R.param_shapes(cfg)
    assert list(p) == list(shapes)
    for name, arr in p.items():
        assert arr.dtype == np.float64 and arr.shape == shapes[name]
        assert np.std(arr) > 0.01, name  # nothing constant: every tensor is exercised
    assert abs(p["layers.0.attn_norm.weight"].mean() - 1) < 0.1
    assert np.abs(p["layers.0.attn_res_proj.weight"]).max() > 0.1


def test_forward_rejects_wrong_params():
    cfg = make_cfg()
    p = R.init_params(cfg, np.random.default_rng(0))
    p.pop("layers.1.mlp_norm.bias")
    with pytest.raises(AssertionError):
        R.forward(cfg, p, tokens_for())


# ------------------------------------------------------------------------------------------
# Shapes, softmax, masks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trace_shapes(name):
    cfg = make_cfg(**CONFIGS[name])
    out, _ = run(cfg)
    B, n, L = 2, cfg.n_layers, 2 * cfg.n_layers
    assert out["logits"].shape == (B, T, V)
    assert out["final_hidden"].shape == (B, T, D)
    assert len(out["hidden"]) == n + 1 and len(out["attn_out"]) == n == len(out["mlp_out"])
    for l, a in enumerate(out["attention"]):
        extra = 2 * l * cfg.moda_chunk if cfg.moda else 0
        assert a.shape == (B, H, T, T + extra)
    if cfg.residual == "plain":
        assert out["alpha"] is None
    else:
        assert len(out["alpha"]) == L + 1
    if cfg.moda:
        assert [m.shape for m in out["depth_mass"]] == [(B, H, T)] * n
    else:
        assert out["depth_mass"] is None
    for k in ("logits", "final_hidden"):
        assert np.all(np.isfinite(out[k]))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("causal", [True, False])
def test_softmax_rows_sum_to_one(name, causal):
    cfg = make_cfg(causal=causal, **CONFIGS[name])
    out, _ = run(cfg)
    for a in out["attention"]:
        assert np.all(a >= 0)
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-12)
        if causal:  # no mass on future sequence keys
            assert np.all(np.triu(np.ones((T, T)), 1)[None, None] * a[..., :T] == 0)
    for al in out["alpha"] or []:
        np.testing.assert_allclose(al.sum(-1), 1.0, atol=1e-12)
    for l, (a, m) in enumerate(zip(out["attention"], out["depth_mass"] or [])):
        np.testing.assert_allclose(m, a[..., T:].sum(-1), atol=1e-12)
        if l == 0:
            assert np.all(m == 0)


def test_softmax_with_padding_and_empty_rows():
    """Masked keys get 0; a causal row whose only key is padding gets p = 0 and output 0."""
    cfg = make_cfg(pos="rope")
    kpm = np.ones((2, T), dtype=bool)
    kpm[0, 0] = False  # query 0 of batch 0 sees nothing (causal)
    kpm[1, 5:] = False
    out, p = run(cfg, key_padding_mask=kpm)
    for a in out["attention"]:
        assert np.all(a[0, :, 0] == 0)
        assert np.all(a[0, :, :, 0] == 0) and np.all(a[1, :, :, 5:] == 0)
        np.testing.assert_allclose(a[0, :, 1:].sum(-1), 1.0, atol=1e-12)
        np.testing.assert_allclose(a[1].sum(-1), 1.0, atol=1e-12)
    # empty row: the attention output is exactly the o_proj bias
    for i in range(cfg.n_layers):
        np.testing.assert_allclose(out["attn_out"][i][0, 0], p[f"layers.{i}.attn.o_proj.bias"],
                                   atol=1e-12)
    assert np.all(np.isfinite(out["logits"]))


def test_masked_softmax_kernel():
    logits = np.array([[1.0, 2.0, 3.0], [5.0, -1.0, 0.0]])
    vis = np.array([[True, False, True], [False, False, False]])
    p = R.masked_softmax(logits, vis)
    e = np.exp([1.0, 3.0])
    np.testing.assert_allclose(p[0], [e[0] / e.sum(), 0, e[1] / e.sum()])
    assert np.all(p[1] == 0)


# ------------------------------------------------------------------------------------------
# Causality and padding
# ------------------------------------------------------------------------------------------


def _all_traces_prefix_equal(o1, o2, t, T):
    """Every output at positions <= t is identical (up to fp64 rounding)."""
    for key in ("logits", "final_hidden"):
        np.testing.assert_allclose(o1[key][:, :t + 1], o2[key][:, :t + 1], atol=1e-12)
    for key in ("hidden", "attn_out", "mlp_out", "alpha"):
        for a, b in zip(o1[key] or [], o2[key] or []):
            np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-12)
    for a, b in zip(o1["attention"], o2["attention"]):
        np.testing.assert_allclose(a[:, :, :t + 1], b[:, :, :t + 1], atol=1e-12)
    for a, b in zip(o1["depth_mass"] or [], o2["depth_mass"] or []):
        np.testing.assert_allclose(a[:, :, :t + 1], b[:, :, :t + 1], atol=1e-12)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("t", [0, 4, 5, T - 2])
def test_causality(name, t):
    cfg = make_cfg(**CONFIGS[name])
    params = R.init_params(cfg, np.random.default_rng(0))
    tok = tokens_for()
    tok2 = tok.copy()
    tok2[:, t + 1] = (tok2[:, t + 1] + 7) % V
    o1, o2 = R.forward(cfg, params, tok), R.forward(cfg, params, tok2)
    _all_traces_prefix_equal(o1, o2, t, T)
    # ... and the change is visible from t+1 on (the test can fail)
    assert np.abs(o1["logits"][:, t + 1] - o2["logits"][:, t + 1]).max() > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bidirectional_sees_the_future(name):
    cfg = make_cfg(causal=False, **CONFIGS[name])
    params = R.init_params(cfg, np.random.default_rng(0))
    tok = tokens_for()
    tok2 = tok.copy()
    tok2[:, -1] = (tok2[:, -1] + 7) % V
    o1, o2 = R.forward(cfg, params, tok), R.forward(cfg, params, tok2)
    assert np.abs(o1["logits"][:, 0] - o2["logits"][:, 0]).max() > 1e-4


@pytest.mark.parametrize("name", ["plain_pre", "plain_post_rms_rope_swiglu", "attnres_full",
                                  "moda_c4_gqa_post", "moda_depth_only_c2"])
def test_padding_hides_padded_tokens(name):
    """Bidirectional: real tokens never depend on padded tokens' ids (holes anywhere)."""
    cfg = make_cfg(causal=False, **CONFIGS[name])
    params = R.init_params(cfg, np.random.default_rng(0))
    kpm = np.ones((2, T), dtype=bool)
    kpm[0, [1, 6, 7]] = False
    kpm[1, 9:] = False
    tok = tokens_for()
    tok2 = np.where(kpm, tok, (tok + 11) % V)
    o1 = R.forward(cfg, params, tok, key_padding_mask=kpm)
    o2 = R.forward(cfg, params, tok2, key_padding_mask=kpm)
    np.testing.assert_allclose(o1["logits"][kpm], o2["logits"][kpm], atol=1e-12)
    assert np.abs(o1["logits"][~kpm] - o2["logits"][~kpm]).max() > 1e-3
    o3 = R.forward(cfg, params, tok)  # ... while without the mask they do
    assert np.abs(o1["logits"][kpm] - o3["logits"][kpm]).max() > 1e-4


def test_key_padding_mask_accepts_01_ints():
    cfg = make_cfg()
    p = R.init_params(cfg, np.random.default_rng(0))
    kpm = np.ones((2, T), dtype=np.int64)
    kpm[1, 3:] = 0
    a = R.forward(cfg, p, tokens_for(), key_padding_mask=kpm)["logits"]
    b = R.forward(cfg, p, tokens_for(), key_padding_mask=kpm.astype(bool))["logits"]
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------
# Embedding, positions, kernels
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope", "none"])
def test_embeds_input_equals_tokens(pos):
    cfg = make_cfg(pos=pos)
    params = R.init_params(cfg, np.random.default_rng(0))
    tok = tokens_for()
    o1 = R.forward(cfg, params, tok)
    o2 = R.forward(cfg, params, embeds=params["tok_emb.weight"][tok])
    np.testing.assert_allclose(o1["logits"], o2["logits"], atol=1e-12)


def test_positions_change_outputs():
    tok = tokens_for()
    outs = {pos: run(make_cfg(pos=pos), tokens=tok)[0]["logits"]
            for pos in ("learned", "sinusoidal", "rope", "none")}
    names = list(outs)
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(outs[names[i]] - outs[names[j]]).max() > 1e-3, (names[i], names[j])
    # without positions and bidirectional attention the model is permutation-equivariant
    cfg = make_cfg(pos="none", causal=False)
    perm = np.random.default_rng(3).permutation(T)
    o, p = run(cfg, tokens=tok)
    op = R.forward(cfg, p, tok[:, perm])
    np.testing.assert_allclose(o["logits"][:, perm], op["logits"], atol=1e-10)


def test_sinusoidal_table_closed_form():
    d, n = 64, 20
    P = R.sinusoidal_table(n, d)
    pos = np.arange(n)[:, None]
    div = np.exp(np.arange(0, d, 2) * (-math.log(10000.0) / d))  # the "Attention is all you need" form
    np.testing.assert_allclose(P[:, 0::2], np.sin(pos * div), atol=1e-12)
    np.testing.assert_allclose(P[:, 1::2], np.cos(pos * div), atol=1e-12)


def test_rope_matches_complex_rotation_and_is_relative():
    rng = np.random.default_rng(0)
    dh, n, base = 16, 10, 500.0
    x = rng.standard_normal((3, n, dh))
    y = R.apply_rope(x, base)
    # half-split convention: pair (j, j + dh/2) is the complex number x_j + i x_{j+dh/2}
    z = x[..., :dh // 2] + 1j * x[..., dh // 2:]
    ang = np.arange(n)[:, None] * base ** (-2.0 * np.arange(dh // 2) / dh)
    zr = z * np.exp(1j * ang)
    np.testing.assert_allclose(y, np.concatenate([zr.real, zr.imag], -1), atol=1e-12)
    np.testing.assert_allclose(y[:, 0], x[:, 0])  # position 0 is not rotated
    # q_t . k_u depends only on t - u: same vectors at all positions
    q = np.broadcast_to(rng.standard_normal(dh), (n, dh))
    k = np.broadcast_to(rng.standard_normal(dh), (n, dh))
    s = R.apply_rope(q, base) @ R.apply_rope(k, base).T
    for off in range(-3, 4):
        diag = np.diagonal(s, off)
        np.testing.assert_allclose(diag, diag[0], atol=1e-12)


def test_activations_hand_values():
    x = np.array([-2.0, -0.5, 0.0, 0.7, 3.0])
    np.testing.assert_allclose(R.gelu(x), x * 0.5 * (1 + np.array([math.erf(v / math.sqrt(2))
                                                                   for v in x])))
    np.testing.assert_allclose(R.gelu(np.array([1.0])), [0.8413447460685429], rtol=1e-12)
    np.testing.assert_allclose(R.gelu_tanh(np.array([1.0])), [0.8411919906082768], rtol=1e-12)
    np.testing.assert_array_equal(R.relu(x), [0, 0, 0, 0.7, 3.0])
    np.testing.assert_allclose(R.silu(x), x / (1 + np.exp(-x)))


def test_norms_hand_values():
    x = np.array([[1.0, 2.0, 3.0, 6.0]])
    w, b = np.array([1.0, 2.0, 1.0, 1.0]), np.array([0.0, 0.0, 1.0, 0.0])
    mu, var = 3.0, (4 + 1 + 0 + 9) / 4
    np.testing.assert_allclose(R.layer_norm(x, w, b, 1e-5),
                               (x - mu) / math.sqrt(var + 1e-5) * w + b)
    np.testing.assert_allclose(R.rms_norm(x, w, 1e-5),
                               x / math.sqrt((1 + 4 + 9 + 36) / 4 + 1e-5) * w)


# ------------------------------------------------------------------------------------------
# Attention Residuals
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual, S", [("attnres_full", 1), ("attnres_block", 2),
                                         ("attnres_block", 3)])
def test_zero_pseudo_queries_give_uniform_alpha(residual, S):
    cfg = make_cfg(residual=residual, attnres_block_size=S, n_layers=3)
    p = R.init_params(cfg, np.random.default_rng(0))
    for k in p:
        if k.endswith("_res_proj.weight"):
            p[k] = np.zeros_like(p[k])
    out = R.forward(cfg, p, tokens_for())
    for al in out["alpha"]:
        np.testing.assert_allclose(al, 1.0 / al.shape[-1], atol=1e-15)
    # and with the random pseudo-queries they are not uniform
    out = run(cfg)[0]
    assert max(np.abs(al - 1.0 / al.shape[-1]).max() for al in out["alpha"]) > 0.1


@pytest.mark.parametrize("pos_", ["pre", "post"])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_block_size_1_equals_full(pos_, n_layers):
    kw = dict(n_layers=n_layers, norm_position=pos_, pos="rope")
    cfg_full = make_cfg(residual="attnres_full", **kw)
    cfg_b1 = make_cfg(residual="attnres_block", attnres_block_size=1, **kw)
    o_full, p = run(cfg_full)
    o_b1 = R.forward(cfg_b1, p, tokens_for())
    for key in ("logits", "final_hidden"):
        np.testing.assert_allclose(o_full[key], o_b1[key], atol=1e-12)
    for key in ("alpha", "hidden", "attn_out", "mlp_out"):
        for a, b in zip(o_full[key], o_b1[key]):
            np.testing.assert_allclose(a, b, atol=1e-12)


def test_block_size_at_least_L_is_one_block():
    """S = L and S = L + 3 both put every sublayer in block 1, so they agree; S = L - 1 does not."""
    n = 2
    L = 2 * n
    outs = {}
    for S in (L - 1, L, L + 3):
        cfg = make_cfg(residual="attnres_block", attnres_block_size=S, n_layers=n)
        outs[S] = run(cfg)[0]
    np.testing.assert_allclose(outs[L]["logits"], outs[L + 3]["logits"], atol=1e-12)
    assert np.abs(outs[L]["logits"] - outs[L - 1]["logits"]).max() > 1e-4


@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("S", [1, 2, 3, 4, 5, 6, 9])
def test_number_of_sources(n_layers, S):
    cfg = make_cfg(residual="attnres_block", attnres_block_size=S, n_layers=n_layers)
    out = run(cfg)[0]
    L = 2 * n_layers
    counts = [al.shape[-1] for al in out["alpha"]]
    assert counts == [1 + k // S + (k % S != 0) for k in range(L + 1)]
    assert counts[-1] == 1 + math.ceil(L / S)  # output aggregator: b_0 ... b_N
    assert counts == [R.n_attnres_sources(k, S) for k in range(L + 1)]


def test_number_of_sources_hand_listed():
    # L = 4, S = 3: k=0 [b0]; k=1 [b0, v1]; k=2 [b0, v1+v2]; k=3 [b0, b1]; out [b0, b1, b2=v4]
    cfg = make_cfg(residual="attnres_block", attnres_block_size=3, n_layers=2)
    assert [a.shape[-1] for a in run(cfg)[0]["alpha"]] == [1, 2, 2, 2, 3]
    cfg = make_cfg(residual="attnres_full", n_layers=2)
    assert [a.shape[-1] for a in run(cfg)[0]["alpha"]] == [1, 2, 3, 4, 5]


def test_attnres_sources_by_hand():
    """Sources as numbers: v_j = 10^j makes every sum readable."""
    v = [np.array(10.0 ** j) for j in range(8)]  # v_0 .. v_7, L = 7 sublayers
    src = lambda k, S: [float(s) for s in R.attnres_sources(v[:k + 1], k, "attnres_block", S)]  # noqa
    # S = 3: block 1 = sublayers 0,1,2 (v1..v3), block 2 = 3,4,5 (v4..v6), block 3 = 6 (v7)
    assert src(0, 3) == [1]
    assert src(1, 3) == [1, 10]
    assert src(2, 3) == [1, 110]
    assert src(3, 3) == [1, 1110]
    assert src(4, 3) == [1, 1110, 1e4]
    assert src(5, 3) == [1, 1110, 11e4]
    assert src(6, 3) == [1, 1110, 111e4]
    assert src(7, 3) == [1, 1110, 111e4, 1e7]  # output aggregator, short last block
    # S = 2, L = 6 (output reads b0..b3 exactly)
    assert src(6, 2) == [1, 110, 11e3, 11e5]
    # Full: every output separately
    assert [float(s) for s in R.attnres_sources(v[:4], 3, "attnres_full", 1)] == [1, 10, 100, 1000]


def test_attnres_aggregate_by_hand():
    v1 = np.array([[[3.0, 4.0]]])  # rms = sqrt(12.5)
    v2 = np.array([[[1.0, -1.0]]])  # rms = 1
    w, g, eps = np.array([1.0, 2.0]), np.array([1.0, 0.5]), 0.0
    s1 = (3 * 1 + 4 * 0.5 * 2) / math.sqrt(12.5)
    s2 = (1 * 1 - 1 * 0.5 * 2) / 1.0
    a1 = math.exp(s1) / (math.exp(s1) + math.exp(s2))
    h, al = R.attnres_aggregate([v1, v2], w, g, eps)
    np.testing.assert_allclose(al[0, 0], [a1, 1 - a1])
    np.testing.assert_allclose(h[0, 0], a1 * v1[0, 0] + (1 - a1) * v2[0, 0])


def test_attnres_post_norm_normalizes_outputs():
    """post-norm AttnRes: v_{k+1} = Norm_k(F_k(h_k)), so with unit LayerNorm every output is
    standardized; pre-norm outputs are not."""
    for position, expect in (("post", True), ("pre", False)):
        cfg = make_cfg(residual="attnres_full", norm_position=position)
        p = R.init_params(cfg, np.random.default_rng(0))
        for k in p:
            if k.startswith("layers.") and (k.endswith("_norm.weight") or k.endswith("_norm.bias")) \
                    and "_res_" not in k:
                p[k] = np.ones_like(p[k]) if k.endswith("weight") else np.zeros_like(p[k])
        out = R.forward(cfg, p, tokens_for())
        for o in out["attn_out"] + out["mlp_out"]:
            ok = np.allclose(o.mean(-1), 0, atol=1e-9) and np.allclose(o.var(-1), 1, atol=1e-3)
            assert ok == expect


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_attnres_first_sublayer_matches_plain(norm_position):
    """Sublayer 0 has the single source v_0 = x0, so h_0 = x0 and
    pre-norm: v_1 = Attn(Norm(x0)) = plain pre-norm's a;  post-norm: v_1 = Norm(Attn(x0)),
    the norm of plain post-norm's a (not Norm applied to the input)."""
    kw = dict(norm_position=norm_position, pos="rope")
    o_r, p = run(make_cfg(residual="attnres_full", **kw))
    p_plain = {k: v for k, v in p.items() if "_res_" not in k}
    o_p = R.forward(make_cfg(**kw), p_plain, tokens_for())
    a = o_p["attn_out"][0]
    if norm_position == "post":
        a = R.layer_norm(a, p["layers.0.attn_norm.weight"], p["layers.0.attn_norm.bias"], 1e-5)
    np.testing.assert_allclose(o_r["attn_out"][0], a, atol=1e-12)
    np.testing.assert_allclose(o_r["attention"][0], o_p["attention"][0], atol=1e-12)


def test_attnres_hidden_is_aggregate():
    """hidden[i] is h_{2i}: for block 0 (one source, v_0) it is the embedding itself."""
    cfg = make_cfg(residual="attnres_full", pos="learned")
    out, p = run(cfg)
    emb = p["tok_emb.weight"][tokens_for()] + p["pos_emb.weight"][:T]
    np.testing.assert_allclose(out["hidden"][0], emb, atol=1e-12)
    np.testing.assert_allclose(out["alpha"][0], 1.0)


# ------------------------------------------------------------------------------------------
# Mixture-of-Depths Attention
# ------------------------------------------------------------------------------------------


def _rand_qkv(rng, B=2, Hq=4, Hkv=2, T=9, dh=8, S=4):
    q = rng.standard_normal((B, Hq, T, dh))
    k, v = rng.standard_normal((2, B, Hkv, T, dh))
    kd, vd = rng.standard_normal((2, B, Hkv, T, S, dh))
    return q, k, v, kd, vd


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_moda_with_depth_masked_equals_plain(causal, chunk):
    rng = np.random.default_rng(0)
    q, k, v, kd, vd = _rand_qkv(rng)
    B, _, T_, _ = q.shape
    S = kd.shape[3]
    kpm = np.ones((B, T_), dtype=bool)
    kpm[1, 6:] = False
    vis = R.moda_visibility(B, T_, S, causal=causal, key_padding_mask=kpm, chunk=chunk)
    assert vis[..., T_:].any()
    vis_masked = vis.copy()
    vis_masked[..., T_:] = False
    out_m, pr_m = R.moda_attention(q, k, v, kd, vd, chunk=chunk, visible=vis_masked)
    out_p, pr_p = R.moda_attention(q, k, v, causal=causal, key_padding_mask=kpm)
    np.testing.assert_allclose(out_m, out_p, atol=1e-12)
    np.testing.assert_allclose(pr_m[..., :T_], pr_p, atol=1e-12)
    assert np.all(pr_m[..., T_:] == 0)
    out_d, _ = R.moda_attention(q, k, v, kd, vd, causal=causal, key_padding_mask=kpm, chunk=chunk)
    assert np.abs(out_d - out_p).max() > 1e-2  # visible depth does change the result


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 2, 3, 4])
def test_moda_depth_column_layout(chunk, causal):
    """Depth column (u - chunk_start)*S + i holds slot i of position u, visible iff u <= t
    (also for bidirectional attention: DEVELOPERS.md states u <= t without condition)."""
    B, Hq, T_, dh, S = 1, 2, 7, 4, 4
    for u_star in range(T_):
        for i_star in range(S):
            q = np.ones((B, Hq, T_, dh))
            k = np.zeros((B, Hq, T_, dh))
            v = np.zeros((B, Hq, T_, dh))
            kd = np.zeros((B, Hq, T_, S, dh))
            vd = np.zeros((B, Hq, T_, S, dh))
            kd[:, :, u_star, i_star] = 50.0  # one very attractive depth slot
            vd[:, :, u_star, i_star] = 1.0
            _, probs = R.moda_attention(q, k, v, kd, vd, causal=causal, chunk=chunk)
            assert probs.shape == (B, Hq, T_, T_ + chunk * S)
            for t in range(T_):
                cs = (t // chunk) * chunk
                sees = cs <= u_star <= t
                col = T_ + (u_star - cs) * S + i_star
                if sees:
                    assert probs[0, 0, t, col] > 0.999
                else:  # all visible logits are 0 then: uniform, nothing dominates
                    assert probs[0, 0, t].max() < 0.5
                # number of visible depth columns: S per position cs .. t
                n_vis = np.count_nonzero(R.moda_visibility(1, T_, S, causal=causal,
                                                           chunk=chunk)[0, t, T_:])
                assert n_vis == S * (t - cs + 1)


def test_moda_depth_only_masks_sequence():
    rng = np.random.default_rng(1)
    q, k, v, kd, vd = _rand_qkv(rng)
    _, pr = R.moda_attention(q, k, v, kd, vd, causal=False, chunk=2, depth_only=True)
    assert np.all(pr[..., :q.shape[2]] == 0)
    np.testing.assert_allclose(pr.sum(-1), 1.0, atol=1e-12)
    # no depth slots (layer 0): depth_only keeps plain attention
    o1, _ = R.moda_attention(q, k, v, causal=True, depth_only=True)
    o2, _ = R.moda_attention(q, k, v, causal=True)
    np.testing.assert_array_equal(o1, o2)


def test_moda_padding_masks_depth_of_padded_positions():
    rng = np.random.default_rng(2)
    q, k, v, kd, vd = _rand_qkv(rng, B=1, T=6)
    kpm = np.array([[True, False, True, True, True, True]])
    vis = R.moda_visibility(1, 6, 4, causal=True, key_padding_mask=kpm, chunk=3)
    # query 2 (chunk 0..2): depth of position 0 and 2 visible, position 1 (padding) not
    assert vis[0, 2, 6:].tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert vis[0, 2, :6].tolist() == [True, False, True, False, False, False]


@pytest.mark.parametrize("kw", [dict(), dict(moda_chunk=2, n_kv_heads=2),
                                dict(moda_chunk=4, norm_position="post", pos="rope"),
                                dict(moda_depth_only=True, moda_chunk=2),
                                dict(residual="attnres_full"),
                                dict(residual="attnres_block", attnres_block_size=3)])
def test_moda_layer0_equals_plain(kw):
    cfg_m = make_cfg(moda=True, n_layers=3, **kw)
    cfg_p = make_cfg(moda=False, n_layers=3, **kw)
    o_m, p = run(cfg_m)
    p_plain = {k_: v_ for k_, v_ in p.items() if "depth_" not in k_}
    o_p = R.forward(cfg_p, p_plain, tokens_for())
    np.testing.assert_allclose(o_m["attention"][0], o_p["attention"][0], atol=1e-12)
    for key in ("attn_out", "mlp_out"):
        np.testing.assert_allclose(o_m[key][0], o_p[key][0], atol=1e-12)
    np.testing.assert_allclose(o_m["hidden"][1], o_p["hidden"][1], atol=1e-12)
    assert np.all(o_m["depth_mass"][0] == 0)
    # from layer 1 on the depth slots matter
    assert np.abs(o_m["attn_out"][1] - o_p["attn_out"][1]).max() > 1e-3
    assert o_m["depth_mass"][1].min() > 0


def test_moda_single_layer_is_plain():
    cfg_m = make_cfg(moda=True, n_layers=1, moda_chunk=2)
    cfg_p = make_cfg(n_layers=1)
    o_m, p = run(cfg_m)
    o_p = R.forward(cfg_p, p, tokens_for())
    np.testing.assert_allclose(o_m["logits"], o_p["logits"], atol=1e-12)


def test_moda_depth_slots_by_hand():
    """Rebuild block 1's attention of a 2-layer pre-norm MoDA model (C = 1) by hand."""
    cfg = make_cfg(moda=True, n_layers=2, bias=False, pos="none", norm="rmsnorm")
    out, p = run(cfg)
    dh = D // H
    x = out["hidden"][0]
    rms = lambda z, w: z / np.sqrt((z ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * w  # noqa
    u0 = rms(x, p["layers.0.attn_norm.weight"])
    k0, v0 = u0 @ p["layers.0.attn.k_proj.weight"].T, u0 @ p["layers.0.attn.v_proj.weight"].T
    x1 = x + out["attn_out"][0]
    f0 = rms(x1, p["layers.0.mlp_norm.weight"])
    kf, vf = f0 @ p["layers.0.mlp.depth_k_proj.weight"].T, f0 @ p["layers.0.mlp.depth_v_proj.weight"].T
    x2 = out["hidden"][1]
    u1 = rms(x2, p["layers.1.attn_norm.weight"])
    q1, k1, v1 = (u1 @ p[f"layers.1.attn.{n}_proj.weight"].T for n in "qkv")
    b, t = 1, 5
    ctx = []
    for h in range(H):  # one query head at a time; MHA, so kv head = h
        sl = slice(h * dh, (h + 1) * dh)
        keys = [k1[b, u, sl] for u in range(t + 1)] + [k0[b, t, sl], kf[b, t, sl]]
        vals = [v1[b, u, sl] for u in range(t + 1)] + [v0[b, t, sl], vf[b, t, sl]]
        logits = np.array([q1[b, t, sl] @ key / math.sqrt(dh) for key in keys])
        pr = np.exp(logits - logits.max())
        pr /= pr.sum()
        got = out["attention"][1][b, h, t]  # columns: T sequence keys | [attn_0, ffn_0]
        assert got.shape == (T + 2,)
        np.testing.assert_allclose(got[:t + 1], pr[:t + 1], atol=1e-12)
        assert np.all(got[t + 1:T] == 0)
        np.testing.assert_allclose(got[T:], pr[t + 1:], atol=1e-12)
        np.testing.assert_allclose(out["depth_mass"][1][b, h, t], pr[t + 1:].sum(), atol=1e-12)
        ctx.append(sum(pr_ * val for pr_, val in zip(pr, vals)))
    a1 = np.concatenate(ctx) @ p["layers.1.attn.o_proj.weight"].T
    np.testing.assert_allclose(out["attn_out"][1][b, t], a1, atol=1e-12)


# ------------------------------------------------------------------------------------------
# GQA
# ------------------------------------------------------------------------------------------


def _repeat_kv_rows(w, Hkv, G, dh):
    """(Hkv*dh, ...) -> (Hkv*G*dh, ...): kv head j becomes query-group heads j*G ... j*G+G-1."""
    blocks = [w[j * dh:(j + 1) * dh] for j in range(Hkv)]
    return np.concatenate([b for b in blocks for _ in range(G)], axis=0)


@pytest.mark.parametrize("kw", [dict(), dict(pos="rope", causal=False),
                                dict(moda=True, moda_chunk=2, n_layers=3),
                                dict(residual="attnres_block", attnres_block_size=2)])
@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(kw, Hkv):
    G, dh = H // Hkv, D // H
    cfg_g = make_cfg(n_kv_heads=Hkv, **kw)
    cfg_m = make_cfg(n_kv_heads=H, **kw)
    o_g, p = run(cfg_g)
    pm = {}
    for name, arr in p.items():
        if any(s in name for s in ("k_proj", "v_proj")):  # includes depth_k/v_proj
            arr = _repeat_kv_rows(arr, Hkv, G, dh)
        pm[name] = arr
    o_m = R.forward(cfg_m, pm, tokens_for())
    np.testing.assert_allclose(o_g["logits"], o_m["logits"], atol=1e-10)
    for a, b in zip(o_g["attention"], o_m["attention"]):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_mha_is_n_kv_heads_default():
    assert make_cfg().n_kv_heads == H and make_cfg().d_ff == 4 * D
    cfg_a, cfg_b = make_cfg(), make_cfg(n_kv_heads=H)
    o_a, p = run(cfg_a)
    np.testing.assert_array_equal(o_a["logits"], R.forward(cfg_b, p, tokens_for())["logits"])


# ------------------------------------------------------------------------------------------
# Against PyTorch
# ------------------------------------------------------------------------------------------


def _torch_layers(torch, cfg, p, activation):
    layers = []
    for i in range(cfg.n_layers):
        pre = f"layers.{i}."
        layer = torch.nn.TransformerEncoderLayer(
            cfg.d_model, cfg.n_heads, dim_feedforward=cfg.d_ff, dropout=0.0,
            activation=activation, layer_norm_eps=cfg.norm_eps, batch_first=True,
            norm_first=cfg.norm_position == "pre", dtype=torch.float64)
        t = lambda n: torch.from_numpy(p[pre + n].copy())  # noqa: E731
        with torch.no_grad():
            layer.self_attn.in_proj_weight.copy_(torch.cat(
                [t("attn.q_proj.weight"), t("attn.k_proj.weight"), t("attn.v_proj.weight")]))
            layer.self_attn.in_proj_bias.copy_(torch.cat(
                [t("attn.q_proj.bias"), t("attn.k_proj.bias"), t("attn.v_proj.bias")]))
            layer.self_attn.out_proj.weight.copy_(t("attn.o_proj.weight"))
            layer.self_attn.out_proj.bias.copy_(t("attn.o_proj.bias"))
            layer.linear1.weight.copy_(t("mlp.up_proj.weight"))
            layer.linear1.bias.copy_(t("mlp.up_proj.bias"))
            layer.linear2.weight.copy_(t("mlp.down_proj.weight"))
            layer.linear2.bias.copy_(t("mlp.down_proj.bias"))
            layer.norm1.weight.copy_(t("attn_norm.weight"))
            layer.norm1.bias.copy_(t("attn_norm.bias"))
            layer.norm2.weight.copy_(t("mlp_norm.weight"))
            layer.norm2.bias.copy_(t("mlp_norm.bias"))
        layer.train()  # dropout is 0; train mode keeps torch off its fused fast path
        layers.append(layer)
    return layers


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("causal, padded", [(True, False), (False, False), (False, True),
                                            (True, True)])
def test_matches_torch_transformer_encoder(norm_position, activation, causal, padded):
    torch = pytest.importorskip("torch")
    cfg = make_cfg(n_layers=3, pos="none", activation=activation, norm_position=norm_position,
                   causal=causal, d_ff=96)
    p = R.init_params(cfg, np.random.default_rng(0))
    x = np.random.default_rng(5).standard_normal((2, T, D))
    kpm = None
    if padded:
        kpm = np.ones((2, T), dtype=bool)
        kpm[0, 8:] = False
        kpm[1, [2, 3, 10]] = False
    out = R.forward(cfg, p, embeds=x, key_padding_mask=kpm)

    xt = torch.from_numpy(x)
    # torch boolean masks: True = may NOT attend
    mask = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None
    pad = None if kpm is None else torch.from_numpy(~kpm)  # torch: True = ignore
    with torch.no_grad():
        for i, layer in enumerate(_torch_layers(torch, cfg, p, activation)):
            np.testing.assert_allclose(out["hidden"][i], xt.numpy(), atol=1e-10)
            xt = layer(xt, src_mask=mask, src_key_padding_mask=pad, is_causal=causal)
        np.testing.assert_allclose(out["hidden"][cfg.n_layers], xt.numpy(), atol=1e-10)
        fin = torch.nn.functional.layer_norm(
            xt, (D,), torch.from_numpy(p["final_norm.weight"]), torch.from_numpy(p["final_norm.bias"]),
            cfg.norm_eps)
    np.testing.assert_allclose(out["final_hidden"], fin.numpy(), atol=1e-10)
    np.testing.assert_allclose(out["logits"], fin.numpy() @ p["tok_emb.weight"].T, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_matches_torch_sdpa(causal, Hkv, padded):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    B, Hq, T_, dh = 2, 4, 10, 16
    q = rng.standard_normal((B, Hq, T_, dh))
    k, v = rng.standard_normal((2, B, Hkv, T_, dh))
    kpm = np.ones((B, T_), dtype=bool)
    if padded:  # keep key 0 real so no causal row is empty (torch would give NaN there)
        kpm[0, 6:] = False
        kpm[1, [1, 4]] = False
    out, probs = R.moda_attention(q, k, v, causal=causal, key_padding_mask=kpm if padded else None)
    allowed = np.broadcast_to(kpm[:, None, None, :], (B, 1, T_, T_)).copy()
    if causal:
        allowed &= np.tril(np.ones((T_, T_), dtype=bool))
    ref = F.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
        attn_mask=torch.from_numpy(allowed), enable_gqa=True)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-12)
    # the probabilities against an explicit torch softmax
    kh = torch.from_numpy(k).repeat_interleave(Hq // Hkv, dim=1)
    s = torch.from_numpy(q) @ kh.transpose(-1, -2) / math.sqrt(dh)
    s = s.masked_fill(~torch.from_numpy(allowed), float("-inf"))
    np.testing.assert_allclose(probs, torch.softmax(s, -1).numpy(), atol=1e-12)


def test_kernels_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 64)) * 3
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(R.gelu(x), F.gelu(xt).numpy(), atol=1e-14)
    np.testing.assert_allclose(R.gelu_tanh(x), F.gelu(xt, approximate="tanh").numpy(), atol=1e-14)
    np.testing.assert_allclose(R.relu(x), F.relu(xt).numpy(), atol=0)
    np.testing.assert_allclose(R.silu(x), F.silu(xt).numpy(), atol=1e-14)
    w, b = rng.standard_normal(64), rng.standard_normal(64)
    np.testing.assert_allclose(R.layer_norm(x, w, b, 1e-5),
                               F.layer_norm(xt, (64,), torch.from_numpy(w), torch.from_numpy(b),
                                            1e-5).numpy(), atol=1e-12)
    np.testing.assert_allclose(R.rms_norm(x, w, 1e-5),
                               F.rms_norm(xt, (64,), torch.from_numpy(w), 1e-5).numpy(), atol=1e-12)


def test_swiglu_matches_torch():
    torch = pytest.importorskip("torch")
    cfg = make_cfg(activation="swiglu", n_layers=1, d_ff=40)
    out, p = run(cfg)
    u = out["hidden"][0] + out["attn_out"][0]
    un = torch.nn.functional.layer_norm(torch.from_numpy(u), (D,),
                                        torch.from_numpy(p["layers.0.mlp_norm.weight"]),
                                        torch.from_numpy(p["layers.0.mlp_norm.bias"]), cfg.norm_eps)
    lin = lambda n, z: torch.nn.functional.linear(  # noqa: E731
        z, torch.from_numpy(p[f"layers.0.mlp.{n}.weight"]), torch.from_numpy(p[f"layers.0.mlp.{n}.bias"]))
    m = lin("down_proj", torch.nn.functional.silu(lin("gate_proj", un)) * lin("up_proj", un))
    np.testing.assert_allclose(out["mlp_out"][0], m.numpy(), atol=1e-12)


# ------------------------------------------------------------------------------------------
# Speed (the reference runs inside a large parity matrix)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(moda=True, moda_chunk=4, residual="attnres_block",
                                             attnres_block_size=3)])
def test_reference_is_fast(kw):
    cfg = make_cfg(n_layers=4, max_seq_len=16, **kw)
    p = R.init_params(cfg, np.random.default_rng(0))
    tok = tokens_for(B=2, T=16)
    t0 = time.perf_counter()
    R.forward(cfg, p, tok)
    assert time.perf_counter() - t0 < 0.5
