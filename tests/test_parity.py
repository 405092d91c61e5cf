"""Parity of the real stackformer model (C core) with the float64 reference (tests/reference.py).

Every test loads the same random, non-trivial parameters (tests/reference.init_params, rounded to
float32) into ``stackformer.Model`` and into the reference, then compares the logits (max abs
error <= 1e-4) and every trace the model exposes: attention probabilities, hidden states,
sublayer outputs, AttnRes alphas and MoDA depth mass.
"""

import itertools
import os
import sys

import numpy as np
import pytest

import stackformer as sf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as R  # noqa: E402

BASE = dict(vocab_size=50, d_model=64, n_heads=4, n_layers=2, max_seq_len=16)
LOGITS_ATOL = 1e-4
TRACE_RTOL = 1e-4  # traces: max abs error <= 1e-4 * max(1, max |reference|)
TWO_PHASE_RTOL = 1e-5  # two-phase vs direct Block AttnRes: <= 1e-5 * max(1, max |logits|)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def build(seed=0, **kw):
    """(model, reference cfg, float32 params) for one configuration."""
    kw = {**BASE, **kw}
    cfg = sf.Config(**kw)
    rcfg = R.Config(**kw)
    assert (cfg.n_kv_heads, cfg.d_ff) == (rcfg.n_kv_heads, rcfg.d_ff)
    params = {k: v.astype(np.float32)
              for k, v in R.init_params(rcfg, np.random.default_rng(seed)).items()}
    model = sf.Model(cfg, seed=0)
    model.load_state_dict(params)
    return model, rcfg, params


def make_tokens(B, T, seed=1, V=BASE["vocab_size"]):
    return np.random.default_rng(seed).integers(0, V, size=(B, T)).astype(np.int64)


def _close(name, got, want, tol):
    got = np.asarray(got)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    err = np.abs(got.astype(np.float64) - want)
    if err.size and err.max() > tol:
        idx = np.unravel_index(np.argmax(err), err.shape)
        raise AssertionError(f"{name}: max abs error {err.max():.3e} > {tol:.1e} at {idx} "
                             f"(got {got[idx]!r}, reference {want[idx]!r})")


def _trace_list(tr, key, n_expected):
    got = getattr(tr, key)
    assert got is not None, f"trace.{key} missing"
    got = list(got)
    assert len(got) == n_expected, f"trace.{key}: {len(got)} entries, expected {n_expected}"
    return got


def compare(model, rcfg, params, tokens=None, embeds=None, key_padding_mask=None):
    """Run model and reference on the same input; assert logits and all traces agree."""
    x = tokens if tokens is not None else embeds
    out = model(x, trace=True, key_padding_mask=key_padding_mask)
    ref = R.forward(rcfg, params, tokens=tokens,
                    embeds=None if embeds is None else embeds.astype(np.float64),
                    key_padding_mask=key_padding_mask)

    logits = np.asarray(out.logits)
    assert logits.dtype == np.float32
    _close("logits", logits, ref["logits"], LOGITS_ATOL)

    tr = out.trace
    for key in ("attention", "hidden", "attn_out", "mlp_out", "alpha", "depth_mass"):
        want = ref[key]
        if want is None:  # alpha without AttnRes, depth_mass without MoDA: not defined
            continue
        for i, (g, w) in enumerate(zip(_trace_list(tr, key, len(want)), want)):
            _close(f"trace.{key}[{i}]", g, w, TRACE_RTOL * max(1.0, np.abs(w).max()))
    return out, ref


# ------------------------------------------------------------------------------------------
# plain residual: the full knob matrix
# ------------------------------------------------------------------------------------------

PLAIN_AXES = dict(
    norm_position=["pre", "post"],
    norm=["layernorm", "rmsnorm"],
    activation=["gelu", "gelu_tanh", "relu", "swiglu"],
    pos=["learned", "sinusoidal", "rope", "none"],
    causal=[True, False],
    n_kv_heads=[4, 2],  # MHA / GQA with G = 2
    tie_embeddings=[True, False],
    bias=[True, False],
    final_norm=[True, False],
)


def _matrix(axes):
    keys = list(axes)
    for i, values in enumerate(itertools.product(*(axes[k] for k in keys))):
        kw = dict(zip(keys, values))
        yield pytest.param(i, kw, id="-".join(f"{k}={v}" for k, v in kw.items()))


@pytest.mark.parametrize("seed, kw", list(_matrix(PLAIN_AXES)))
def test_plain_matrix(seed, kw):
    model, rcfg, params = build(seed=seed, d_ff=96, **kw)
    compare(model, rcfg, params, tokens=make_tokens(2, 9, seed=seed))


# ------------------------------------------------------------------------------------------
# Attention Residuals
# ------------------------------------------------------------------------------------------

ATTNRES_MODES = [("attnres_full", None)] + [("attnres_block", S) for S in (1, 2, 3, "L", "L+3")]
VARIANTS = {  # a second axis of knobs so AttnRes meets GQA, swiglu, bidirectional, no-bias...
    "gelu_mha_causal": dict(activation="gelu", n_kv_heads=4, causal=True),
    "swiglu_gqa_bidir_nobias_untied": dict(activation="swiglu", n_kv_heads=2, causal=False,
                                           bias=False, tie_embeddings=False, final_norm=False),
}


def _block_size(S, n_layers):
    L = 2 * n_layers
    return {"L": L, "L+3": L + 3}.get(S, S)


def _attnres_kw(residual, S, n_layers):
    kw = dict(residual=residual, n_layers=n_layers)
    if S is not None:
        kw["attnres_block_size"] = _block_size(S, n_layers)
    return kw


@pytest.mark.parametrize("residual, S", ATTNRES_MODES, ids=lambda v: str(v))
@pytest.mark.parametrize("n_layers", [2, 3])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attnres_matrix(residual, S, n_layers, norm_position, norm, pos, variant):
    kw = dict(_attnres_kw(residual, S, n_layers), norm_position=norm_position, norm=norm,
              pos=pos, **VARIANTS[variant])
    model, rcfg, params = build(**kw)
    _, ref = compare(model, rcfg, params, tokens=make_tokens(2, 10))
    L = 2 * n_layers
    Sb = 1 if S is None else _block_size(S, n_layers)
    assert [a.shape[-1] for a in ref["alpha"]] == [R.n_attnres_sources(k, Sb) for k in range(L + 1)]


@pytest.mark.parametrize("S", [1, 2, 3, "L", "L+3"], ids=str)
@pytest.mark.parametrize("n_layers", [2, 3])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("extra", [dict(), dict(moda=True, moda_chunk=2),
                                   dict(causal=False, padded=True)],
                         ids=["plain_attn", "moda", "bidir_padded"])
def test_block_attnres_two_phase_equals_direct(S, n_layers, norm_position, extra):
    extra = dict(extra)
    padded = extra.pop("padded", False)
    model, rcfg, params = build(residual="attnres_block",
                                attnres_block_size=_block_size(S, n_layers), n_layers=n_layers,
                                norm_position=norm_position, **extra)
    tok = make_tokens(2, 11)
    kpm = None
    if padded:
        kpm = np.ones((2, 11), dtype=bool)
        kpm[0, 7:] = False
        kpm[1, [0, 5]] = False
    direct = np.asarray(model(tok, attnres_two_phase=False, key_padding_mask=kpm).logits)
    default = np.asarray(model(tok, key_padding_mask=kpm).logits)
    ref = R.forward(rcfg, params, tokens=tok, key_padding_mask=kpm)["logits"]
    # the two float32 evaluation orders may differ by a few ulps of the logits' magnitude
    tol = TWO_PHASE_RTOL * max(1.0, np.abs(ref).max())
    err = np.abs(direct.astype(np.float64) - default).max()
    assert err <= tol, f"two-phase vs direct: max abs error {err:.3e} > {tol:.1e}"
    _close("logits (direct)", direct, ref, LOGITS_ATOL)
    _close("logits (default)", default, ref, LOGITS_ATOL)


def test_attnres_default_init_is_uniform():
    """The model's own init has zero pseudo-queries, so every alpha is uniform."""
    cfg = sf.Config(**BASE, residual="attnres_block", attnres_block_size=3)
    model = sf.Model(cfg, seed=0)
    out = model(make_tokens(2, 8), trace=True)
    for k, a in enumerate(out.trace.alpha):
        a = np.asarray(a)
        np.testing.assert_allclose(a, 1.0 / a.shape[-1], atol=1e-6, err_msg=f"alpha[{k}]")


# ------------------------------------------------------------------------------------------
# Mixture-of-Depths Attention
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("pos", ["rope", "learned", "none"])
@pytest.mark.parametrize("chunk", [1, 2, 4])
@pytest.mark.parametrize("depth_only", [False, True])
def test_moda_matrix(causal, n_kv_heads, norm_position, pos, chunk, depth_only):
    model, rcfg, params = build(moda=True, n_layers=3, causal=causal, n_kv_heads=n_kv_heads,
                                norm_position=norm_position, pos=pos, moda_chunk=chunk,
                                moda_depth_only=depth_only)
    _, ref = compare(model, rcfg, params, tokens=make_tokens(2, 9))  # T = 9: short last chunk
    assert [a.shape[-1] for a in ref["attention"]] == [9 + 2 * l * chunk for l in range(3)]


@pytest.mark.parametrize("residual, S", [("attnres_full", None), ("attnres_block", 2),
                                         ("attnres_block", 3)], ids=str)
@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("depth_only", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_moda_with_attnres(residual, S, norm_position, chunk, depth_only, causal):
    model, rcfg, params = build(moda=True, moda_chunk=chunk, moda_depth_only=depth_only,
                                norm_position=norm_position, causal=causal, pos="rope",
                                n_kv_heads=2, **_attnres_kw(residual, S, 3))
    compare(model, rcfg, params, tokens=make_tokens(2, 9))


@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_moda_other_knobs(activation, norm):
    model, rcfg, params = build(moda=True, moda_chunk=3, n_layers=4, activation=activation,
                                norm=norm, bias=False, tie_embeddings=False, final_norm=False,
                                pos="sinusoidal", n_kv_heads=1)
    compare(model, rcfg, params, tokens=make_tokens(2, 10))


# ------------------------------------------------------------------------------------------
# edge cases: sequence length, batch, padding, input kinds
# ------------------------------------------------------------------------------------------

EDGE_CONFIGS = {
    "plain_pre": dict(),
    "plain_post_rope_gqa": dict(norm_position="post", pos="rope", n_kv_heads=2),
    "plain_bidir_sinusoidal": dict(causal=False, pos="sinusoidal", activation="swiglu"),
    "attnres_full": dict(residual="attnres_full", n_layers=3),
    "attnres_block2_post": dict(residual="attnres_block", attnres_block_size=2, n_layers=3,
                                norm_position="post"),
    "moda_c2": dict(moda=True, moda_chunk=2, n_layers=3, pos="rope"),
    "moda_c4_bidir_depth_only": dict(moda=True, moda_chunk=4, moda_depth_only=True, n_layers=3,
                                     causal=False),
    "moda_attnres_block3": dict(moda=True, moda_chunk=2, residual="attnres_block",
                                attnres_block_size=3, n_layers=3, n_kv_heads=2),
}


@pytest.mark.parametrize("name", list(EDGE_CONFIGS))
@pytest.mark.parametrize("B, T", [(1, 1), (3, 1), (2, 16), (3, 5)])
def test_lengths_and_batch(name, B, T):
    """T = 1, T = max_seq_len (16), B > 1 with different rows."""
    model, rcfg, params = build(**EDGE_CONFIGS[name])
    tok = make_tokens(B, T, seed=B * 100 + T)
    if B > 1:
        assert not np.array_equal(tok[0], tok[1]) or T == 1
    compare(model, rcfg, params, tokens=tok)


def _padding_masks():
    m = {}
    right = np.ones((3, 10), dtype=bool)
    right[0, 6:] = False
    right[2, 1:] = False
    m["right"] = right
    holes = np.ones((3, 10), dtype=bool)
    holes[0, [1, 4, 5]] = False
    holes[1, [0, 9]] = False  # first key padded: causal query 0 sees nothing -> output 0
    m["holes"] = holes
    empty = np.ones((3, 10), dtype=bool)
    empty[1] = False  # a fully padded row
    m["empty_row"] = empty
    return m


PADDING_MASKS = _padding_masks()


@pytest.mark.parametrize("name", list(EDGE_CONFIGS))
@pytest.mark.parametrize("mask", list(PADDING_MASKS))
@pytest.mark.parametrize("mask_dtype", [bool, np.int32])
def test_key_padding_mask(name, mask, mask_dtype):
    """Every position is compared, padded queries included (padding only masks keys).

    With MoDA the reference also hides the depth slots of padded positions from other queries
    of the same chunk; see moda_visibility in tests/reference.py."""
    model, rcfg, params = build(**EDGE_CONFIGS[name])
    kpm = PADDING_MASKS[mask].astype(mask_dtype)
    compare(model, rcfg, params, tokens=make_tokens(3, 10, seed=7), key_padding_mask=kpm)


@pytest.mark.parametrize("name", list(EDGE_CONFIGS))
@pytest.mark.parametrize("mask", ["holes", "right"])
def test_real_tokens_ignore_padded_tokens(name, mask):
    """Model-only property (no reference): what real tokens compute never depends on the ids
    of padded tokens -- through sequence keys or, with MoDA, through depth slots."""
    model, _, _ = build(**EDGE_CONFIGS[name])
    kpm = PADDING_MASKS[mask]
    tok = make_tokens(3, 10, seed=7)
    tok2 = np.where(kpm, tok, (tok + 11) % BASE["vocab_size"])
    a = np.asarray(model(tok, key_padding_mask=kpm).logits)
    b = np.asarray(model(tok2, key_padding_mask=kpm).logits)
    err = np.abs(a - b).max(-1)[kpm].max()
    assert err <= 1e-6, f"real-token logits move by {err:.3e} when padded token ids change"


@pytest.mark.parametrize("name", ["plain_pre", "plain_bidir_sinusoidal", "attnres_full",
                                  "moda_c2", "moda_attnres_block3"])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope", "none"])
def test_embeds_input(name, pos):
    model, rcfg, params = build(**{**EDGE_CONFIGS[name], "pos": pos})
    emb = (0.5 * np.random.default_rng(3).standard_normal((2, 7, BASE["d_model"]))).astype(
        np.float32)
    compare(model, rcfg, params, embeds=emb)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.uint8, np.uint16])
def test_token_dtypes(dtype):
    model, rcfg, params = build()
    tok = make_tokens(2, 8)
    want = R.forward(rcfg, params, tokens=tok)["logits"]
    got = np.asarray(model(tok.astype(dtype)).logits)
    _close(f"logits ({np.dtype(dtype).name} tokens)", got, want, LOGITS_ATOL)


# ------------------------------------------------------------------------------------------
# parameters: table, default init, state_dict round trip
# ------------------------------------------------------------------------------------------

TABLE_CONFIGS = {
    "default": dict(),
    "everything": dict(activation="swiglu", moda=True, residual="attnres_block", n_kv_heads=2,
                       tie_embeddings=False, d_ff=96, n_layers=3),
    "rms_nobias_rope": dict(norm="rmsnorm", bias=False, pos="rope", final_norm=False),
    "ln_nobias_sinusoidal": dict(bias=False, pos="sinusoidal", residual="attnres_full"),
    "moda_single_layer": dict(moda=True, n_layers=1),
}


@pytest.mark.parametrize("name", list(TABLE_CONFIGS))
def test_state_dict_names_shapes_order(name):
    kw = {**BASE, **TABLE_CONFIGS[name]}
    model = sf.Model(sf.Config(**kw), seed=0)
    sd = model.state_dict()
    want = R.param_shapes(R.Config(**kw))
    assert {k: tuple(np.shape(v)) for k, v in sd.items()} == want
    assert list(sd) == list(want), "state_dict order differs from the DEVELOPERS.md table"
    for k, v in sd.items():
        assert isinstance(v, np.ndarray) and v.dtype == np.float32, k


def test_config_resolves_defaults():
    cfg = sf.Config(**BASE)
    assert cfg.n_kv_heads == BASE["n_heads"] and cfg.d_ff == 4 * BASE["d_model"]
    cfg = sf.Config(**BASE, n_kv_heads=2, d_ff=100)
    assert cfg.n_kv_heads == 2 and cfg.d_ff == 100


@pytest.mark.parametrize("n_layers", [1, 3])
def test_default_init_contract(n_layers):
    """GPT-2 style init: N(0, 0.02) weights, o_proj/down_proj N(0, 0.02/sqrt(2n)), biases 0,
    norm weights 1, AttnRes pseudo-queries 0, key-norm gains 1; deterministic per seed."""
    kw = dict(BASE, n_layers=n_layers, residual="attnres_full", moda=True, activation="swiglu",
              tie_embeddings=False, d_model=128, n_heads=4)
    cfg = sf.Config(**kw)
    sd = sf.Model(cfg, seed=0).state_dict()
    for name, v in sd.items():
        if name.endswith("_res_proj.weight") or name.endswith(".bias"):
            assert np.all(v == 0), name
        elif "norm" in name:  # attn/mlp/final norm weights and AttnRes gains
            assert np.all(v == 1), name
        else:
            std = 0.02 / np.sqrt(2 * n_layers) if ("o_proj" in name or "down_proj" in name) \
                else 0.02
            assert abs(v.std() / std - 1) < 0.15, (name, v.std(), std)
            assert abs(v.mean()) < 5 * std / np.sqrt(v.size), name
    again = sf.Model(sf.Config(**kw), seed=0).state_dict()
    other = sf.Model(sf.Config(**kw), seed=1).state_dict()
    for name in sd:
        np.testing.assert_array_equal(sd[name], again[name], err_msg=name)
    assert any(not np.array_equal(sd[n], other[n]) for n in sd if sd[n].std() > 0)
    # distinct tensors draw distinct numbers
    assert not np.array_equal(sd["layers.0.attn.q_proj.weight"], sd["layers.0.attn.k_proj.weight"])


def test_default_init_parity():
    """The model's own weights, read back through state_dict, drive the reference too."""
    kw = dict(BASE, moda=True, moda_chunk=2, residual="attnres_block", attnres_block_size=3,
              n_layers=3, pos="rope", n_kv_heads=2)
    model = sf.Model(sf.Config(**kw), seed=5)
    compare(model, R.Config(**kw), model.state_dict(), tokens=make_tokens(2, 9))


def test_load_state_dict_round_trip_and_copies():
    model, rcfg, params = build(tie_embeddings=False)
    sd = model.state_dict()
    assert list(sd) == list(params)
    for k in params:
        np.testing.assert_array_equal(sd[k], params[k], err_msg=k)
    tok = make_tokens(2, 6)
    before = np.asarray(model(tok).logits).copy()
    for v in sd.values():  # state_dict returns copies: writing to them changes nothing
        v[...] = 0
    np.testing.assert_array_equal(np.asarray(model(tok).logits), before)
    # float64 input is accepted and cast to float32
    p64 = R.init_params(rcfg, np.random.default_rng(9))
    model.load_state_dict(p64)
    sd = model.state_dict()
    for k in p64:
        np.testing.assert_array_equal(sd[k], p64[k].astype(np.float32), err_msg=k)
    _close("logits after float64 load", np.asarray(model(tok).logits),
           R.forward(rcfg, {k: v.astype(np.float32) for k, v in p64.items()}, tokens=tok)["logits"],
           LOGITS_ATOL)


@pytest.mark.parametrize("name", list(EDGE_CONFIGS))
@pytest.mark.parametrize("padded", [False, True])
def test_long_sequences_span_attention_blocks(name, padded):
    """T = 112 crosses the C attention's 48-row query blocks and many 16-key tiles; with padding
    holes and a padded tail, every position is compared with the reference."""
    model, rcfg, params = build(**{**EDGE_CONFIGS[name], "max_seq_len": 128})
    T = 112
    kpm = None
    if padded:
        kpm = np.ones((2, T), dtype=bool)
        kpm[0, [3, 47, 48, 60]] = False
        kpm[1, 100:] = False
    compare(model, rcfg, params, tokens=make_tokens(2, T, seed=11), key_padding_mask=kpm)
