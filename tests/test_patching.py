"""Interventions by hook name, run in C (issue 23; stackformer.patching, sf_patch):
model(x, patch={name: array or callable}) and model(x, ablate_sources={read: [sources]}).

Checked against the float64 reference doing the same intervention from the definitions
(tests/reference.py: forward(..., patch=...)), plus: a recorded value patched back changes no
bit for any wiring, callables see the patched run so far, the model is untouched, bad input
raises naming the problem."""
import numpy as np
import pytest

import reference as R
from ablation_checks import build_from_reference
import stackformer as sf
from conftest import WIRINGS_AND_MODA

BASE = dict(vocab_size=48, d_model=32, n_heads=4, n_layers=3, max_seq_len=32)


def build(seed=0, **kw):
    model, rcfg, params = build_from_reference(BASE, seed, **kw)
    return model, rcfg, {k: v.astype(np.float64) for k, v in params.items()}


def toks(B=2, T=7, seed=1):
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], (B, T))


def patchable(cfg):
    n = cfg.n_layers
    names = ["hook_embed"] + [f"blocks.{i}.{h}" for i in range(n)
                              for h in ("hook_resid_pre", "hook_resid_mid", "hook_attn_out", "hook_mlp_out")]
    names += [f"blocks.{i}.hook_resid_post" for i in range(n - 1)]
    if cfg.residual in ("attnres_full", "attnres_block"):
        names += [f"blocks.{i}.{r}.hook_weights" for i in range(n) for r in ("attn_res", "mlp_res")]
        names.append("output_res.hook_weights")
    if cfg.moda:  # the depth slots blocks 0..n-2 write
        subs = ("attn",) if cfg.moda_depth_kv == "attn" else ("attn", "mlp")
        names += [f"blocks.{i}.{s}.hook_depth_{kv}" for i in range(n - 1) for s in subs for kv in "kv"]
    return names


@pytest.mark.parametrize("wiring", list(WIRINGS_AND_MODA))
def test_patching_recorded_values_back_changes_no_bit(wiring):
    model = sf.Model(sf.Config(**BASE, **WIRINGS_AND_MODA[wiring]), seed=3)
    rng = np.random.default_rng(0)
    for name, p in model.state_dict().items():  # off the identity-at-init of the competitors
        model.load_state_dict({name: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32)}, strict=False)
    x = toks()
    base = model(x).logits
    _, cache = model.run_with_cache(x)
    names = patchable(model.config)
    # weights patches (and ablations) take the direct read: under Block AttnRes that is the
    # one-phase schedule, equal to the two-phase one to float32 rounding, so compare with it
    # (and the weights recorded by that schedule)
    direct = model(x, attnres_two_phase=False).logits
    rec = dict(cache.items())
    if model.config.residual in ("attnres_full", "attnres_block"):
        al = model(x, attnres_two_phase=False, trace=["alpha"]).trace.alpha
        n = model.config.n_layers
        rec.update({f"blocks.{i}.{r}.hook_weights": al[2 * i + j] for i in range(n) for j, r in enumerate(("attn_res", "mlp_res"))})
        rec["output_res.hook_weights"] = al[2 * n]
    for name in names:
        want = direct if name.endswith("hook_weights") else base
        assert np.array_equal(model(x, patch={name: np.array(rec[name])}).logits, want), name
    # all at once (resid_post is the next resid_pre: left out), activations and weights apart
    acts = {n: np.array(rec[n]) for n in names if "resid_post" not in n and not n.endswith("hook_weights")}
    assert np.array_equal(model(x, patch=acts).logits, base)
    weights = {n: np.array(rec[n]) for n in names if n.endswith("hook_weights")}
    if weights:
        assert np.array_equal(model(x, patch=weights).logits, direct)
    # and a real change changes the output
    assert np.abs(model(x, patch={"blocks.1.hook_attn_out": np.zeros((2, 7, 32), np.float32)}).logits - base).max() > 1e-4


CASES = {
    "plain": {},
    "plain_post": dict(norm_position="post"),
    "attnres_full": dict(residual="attnres_full"),
    "attnres_block_post_rope": dict(residual="attnres_block", attnres_block_size=2, norm_position="post", pos="rope"),
    "attnres_full_heads_window": dict(residual="attnres_full", attnres_heads=2, attnres_window=2),
    "attnres_block_sigmoid_moda": dict(residual="attnres_block", attnres_block_size=3, attnres_mixing="sigmoid", moda=True),
    "hyper_connections": dict(residual="hyper_connections", hc_dynamic=True),
    "denseformer": dict(residual="denseformer", denseformer_dilation=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_patched_runs_equal_the_float64_reference_doing_the_same(case):
    model, rcfg, p64 = build(**CASES[case])
    x = toks()
    B, T, d = 2, 7, 32
    rng = np.random.default_rng(7)
    arr = lambda: (0.5 * rng.standard_normal((B, T, d))).astype(np.float32)  # noqa: E731
    patch = {"hook_embed": arr(), "blocks.0.hook_mlp_out": arr(), "blocks.1.hook_resid_pre": arr(),
             "blocks.1.hook_resid_mid": arr(), "blocks.2.hook_attn_out": arr()}
    ref_patch = {"embed": patch["hook_embed"].astype(np.float64),
                 "mlp_out": {0: patch["blocks.0.hook_mlp_out"].astype(np.float64)},
                 "resid_pre": {1: patch["blocks.1.hook_resid_pre"].astype(np.float64)},
                 "resid_mid": {1: patch["blocks.1.hook_resid_mid"].astype(np.float64)},
                 "attn_out": {2: patch["blocks.2.hook_attn_out"].astype(np.float64)}}
    ablate = None
    if rcfg.residual in ("attnres_full", "attnres_block"):
        H, ns = rcfg.attnres_heads, R.n_reader_sources(rcfg, 3)
        w = rng.random((B, T, H, ns) if H > 1 else (B, T, ns)).astype(np.float32)
        patch["blocks.1.mlp_res.hook_weights"] = w
        ref_patch["alpha"] = {3: w.astype(np.float64)}
        ablate = {4: [0], 2 * rcfg.n_layers: [1]}  # sublayer 4 without the embedding; the head without v1/b1
        ref_patch["ablate"] = {}
        for k, srcs in ablate.items():
            m = np.zeros(R.n_reader_sources(rcfg, k), bool)
            m[srcs] = True
            ref_patch["ablate"][k] = m
    got = model(x, patch=patch, ablate_sources=ablate).logits
    ref = R.forward(rcfg, p64, tokens=x, patch=ref_patch)["logits"]
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(got - model(x).logits).max() > 1e-3  # the intervention did something


def test_what_if_a_read_could_not_see_the_embedding():
    """The issue's one-liner: sublayer 4 (block 2's attention) without the embedding source."""
    model, _, _ = build(residual="attnres_full")
    x = toks()
    out = model(x, ablate_sources={"blocks.2.attn_res": ["v0"]}, trace=["alpha"])
    a = out.trace.alpha[4]
    assert np.all(a[..., 0] == 0) and np.allclose(a.sum(-1), 1, atol=1e-6)
    same = model(x, ablate_sources={4: [0]}, trace=["alpha"]).trace.alpha[4]
    assert np.array_equal(a, same)
    # the other reads are untouched, and an ordinary call afterwards is the unpatched model
    plain = model(x, trace=["alpha"]).trace.alpha
    assert all(np.array_equal(out.trace.alpha[k], plain[k]) for k in range(4))
    assert not np.array_equal(a, plain[4])


def test_sigmoid_gates_are_zeroed_not_renormalised():
    model, _, _ = build(residual="attnres_full", attnres_mixing="sigmoid")
    x = toks()
    full = model(x, trace=["alpha"]).trace.alpha[3]
    cut = model(x, ablate_sources={3: [1, 2]}, trace=["alpha"]).trace.alpha[3]
    assert np.all(cut[..., 1:3] == 0)
    assert np.array_equal(cut[..., [0, 3]], full[..., [0, 3]])
    # every gate removed is allowed for sigmoid (the read is then zero); softmax refuses
    model(x, ablate_sources={2: [0, 1, 2]})
    soft, _, _ = build(residual="attnres_full")
    with pytest.raises(ValueError, match="nothing to mix"):
        soft(x, ablate_sources={2: [0, 1, 2]})


def test_callables_see_the_patched_run_so_far_in_forward_order():
    model, _, _ = build()
    x = toks()
    E = np.full((2, 7, 32), 0.1, np.float32)
    seen = {}

    def grab(a, name):
        seen[name] = a.copy()
        return a

    out = model(x, patch={"blocks.0.hook_resid_pre": grab, "hook_embed": E, "blocks.1.hook_attn_out": lambda a: 2 * a})
    assert np.array_equal(seen["blocks.0.hook_resid_pre"], E)  # plain: block 0 reads the (patched) embedding
    _, cache = model.run_with_cache(x)
    base_attn = model(x, patch={"hook_embed": E}, trace=["sublayer_outputs"]).trace.attn_out[1]
    ref = model(x, patch={"hook_embed": E, "blocks.1.hook_attn_out": 2 * base_attn}).logits
    assert np.array_equal(out.logits, ref)
    assert not np.array_equal(out.logits, model(x).logits)


def test_the_model_is_untouched_and_bad_input_names_the_problem():
    model, _, _ = build(residual="attnres_block", attnres_block_size=2)
    x = toks()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    base = model(x).logits
    z = np.zeros((2, 7, 32), np.float32)
    model(x, patch={"blocks.0.hook_attn_out": z}, ablate_sources={3: [0]})
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())
    assert np.array_equal(model(x).logits, base)
    with pytest.raises(KeyError, match="not a patch point"):
        model(x, patch={"blocks.0.attn.hook_q": z})
    with pytest.raises(KeyError, match="outside"):
        model(x, patch={"blocks.7.hook_attn_out": z})
    with pytest.raises(KeyError, match="last block"):
        model(x, patch={"blocks.2.hook_resid_post": z})
    with pytest.raises(ValueError, match="shape"):
        model(x, patch={"blocks.0.hook_attn_out": np.zeros((2, 6, 32))})
    bad = z.copy()
    bad[1, 3, 5] = np.nan
    with pytest.raises(ValueError, match="hook_attn_out has NaN"):
        model(x, patch={"blocks.0.hook_attn_out": bad})
    with pytest.raises(TypeError, match="real-valued"):
        model(x, patch={"blocks.0.hook_attn_out": np.zeros((2, 7, 32), complex)})
    with pytest.raises(ValueError, match="shape"):
        model(x, patch={"blocks.0.hook_attn_out": lambda a: a[:, :3]})
    with pytest.raises(KeyError, match="no source"):
        model(x, ablate_sources={3: ["v9"]})
    with pytest.raises(IndexError, match="outside"):
        model(x, ablate_sources={3: [5]})
    with pytest.raises(IndexError, match="outside"):
        model(x, ablate_sources={99: [0]})
    with pytest.raises(KeyError, match="same point"):
        model(x, patch={"blocks.0.hook_resid_post": z, "blocks.1.hook_resid_pre": z})
    plain, _, _ = build()
    with pytest.raises(KeyError, match="attnres"):
        plain(x, patch={"blocks.0.attn_res.hook_weights": z})
    with pytest.raises(KeyError, match="attnres"):
        plain(x, ablate_sources={1: [0]})
    # C refuses an intervention on cached decoding and a mask that is not 0/1
    cache = model._c.new_cache(2, 8)
    with pytest.raises(ValueError, match="cached decoding"):
        model._c.forward(x, cache=cache, patch={"attn_out": {0: z}})
    with pytest.raises(ValueError, match="not 0 or 1"):
        model._c.forward(x, patch={"ablate": {3: np.array([0, 2, 0], np.uint8)}})
    with pytest.raises(TypeError, match="float32"):
        model._c.forward(x, patch={"attn_out": {0: z.astype(np.float64)}})
    assert np.array_equal(model(x).logits, base)


MODA = {
    "moda": dict(moda=True),
    "moda_chunk2_post_rope": dict(moda=True, moda_chunk=2, norm_position="post", pos="rope"),
    "moda_attn_only_gqa": dict(moda=True, moda_depth_kv="attn", n_kv_heads=2),
    "moda_depth_only_attnres": dict(moda=True, moda_depth_only=True, residual="attnres_full"),
}


@pytest.mark.parametrize("case", list(MODA))
def test_moda_depth_slot_ablation_equals_the_reference(case):
    from stackformer.patching import depth_slot_labels
    model, rcfg, p64 = build(**MODA[case])
    x = toks()
    labels = depth_slot_labels(model.config, 2)
    drop = [labels[0], labels[-1]]
    out = model(x, ablate_sources={"blocks.2.moda": drop, "blocks.1.moda": [0]}, trace=["attention"])
    masks = {}
    for i, d in ((2, drop), (1, [0])):
        lab = depth_slot_labels(model.config, i)
        masks[i] = np.array([(s in d) or (j in d) for j, s in enumerate(lab)], bool)
    ref = R.forward(rcfg, p64, tokens=x, patch={"depth_ablate": masks})
    assert np.abs(out.logits - ref["logits"]).max() <= 1e-4
    for i in (1, 2):
        assert np.abs(out.trace.attention[i] - ref["attention"][i]).max() <= 1e-5
    T, S, C = 7, len(labels), model.config.moda_chunk
    cols = [T + c for c in range(C * S) if labels[c % S] in drop]
    assert np.all(out.trace.attention[2][..., cols] == 0)
    assert np.abs(out.logits - model(x).logits).max() > 1e-4


def test_moda_ablation_errors_name_the_problem():
    model, _, _ = build(moda=True, moda_depth_only=True)
    x = toks()
    with pytest.raises(ValueError, match="nothing to attend"):
        model(x, ablate_sources={"blocks.1.moda": ["attn0", "ffn0"]})
    with pytest.raises(KeyError, match="no source"):
        model(x, ablate_sources={"blocks.1.moda": ["attn1"]})
    with pytest.raises(KeyError, match="outside"):
        model(x, ablate_sources={"blocks.5.moda": [0]})
    plain, _, _ = build()
    with pytest.raises(KeyError, match="no MoDA"):
        plain(x, ablate_sources={"blocks.1.moda": [0]})
    with pytest.raises(ValueError, match="needs moda"):
        plain._c.forward(x, patch={"depth_ablate": {1: np.zeros(0, np.uint8)}})


@pytest.mark.parametrize("case", ["moda", "moda_chunk2_post_rope", "moda_attn_only_gqa"])
def test_depth_slot_patches_equal_the_reference(case):
    model, rcfg, p64 = build(**MODA[case])
    x = toks()
    rng = np.random.default_rng(3)
    Hkv, dh = model.config.n_kv_heads, 32 // 4
    k0 = rng.standard_normal((2, 7, Hkv, dh)).astype(np.float32)
    v1 = rng.standard_normal((2, 7, Hkv, dh)).astype(np.float32)
    attn_only = rcfg.moda_depth_kv == "attn"
    slot1 = 1 if attn_only else 2  # block 1's attention slot
    got = model(x, patch={"blocks.0.attn.hook_depth_k": k0, "blocks.1.attn.hook_depth_v": v1}).logits
    ref_patch = {"depth_k": {0: k0.transpose(0, 2, 1, 3).astype(np.float64)},
                 "depth_v": {slot1: v1.transpose(0, 2, 1, 3).astype(np.float64)}}
    ref = R.forward(rcfg, p64, tokens=x, patch=ref_patch)["logits"]
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(got - model(x).logits).max() > 1e-4
    with pytest.raises(KeyError, match="last block"):
        model(x, patch={"blocks.2.attn.hook_depth_k": k0})
    if attn_only:
        with pytest.raises(KeyError, match="write no depth slot"):
            model(x, patch={"blocks.0.mlp.hook_depth_k": k0})


def test_recorded_depth_slots_are_the_attention_keys_values_and_the_mlp_projections():
    """Without RoPE an attention-written slot holds that layer's own k and v (MoDA Table 3
    row 4) and an FFN slot (u W_dk^T, u W_dv^T) of the MLP's normed input."""
    model, _, p64 = build(moda=True, norm="rmsnorm", bias=False)
    _, cache = model.run_with_cache(toks())
    for i in range(2):
        p = f"blocks.{i}."
        assert np.array_equal(cache[p + "attn.hook_depth_k"], cache[p + "attn.hook_k"])
        assert np.array_equal(cache[p + "attn.hook_depth_v"], cache[p + "attn.hook_v"])
        h = cache[p + "hook_resid_mid"].astype(np.float64)
        u = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-5) * p64[f"layers.{i}.mlp_norm.weight"]
        kd = (u @ p64[f"layers.{i}.mlp.depth_k_proj.weight"].T).reshape(2, 7, 4, 8)
        assert np.abs(cache[p + "mlp.hook_depth_k"] - kd).max() < 1e-5
