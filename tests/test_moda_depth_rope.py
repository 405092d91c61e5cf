"""moda_depth_rope (issue 20): how MoDA's depth logits see RoPE positions.

    none   : the depth logits use the unrotated query and unrotated depth keys (attention slots
             hold pre-RoPE keys): q_t . k_d never depends on the absolute position t.
    own    : every depth key is rotated at its own position u, like the query at t: the logit is
             q R_{t-u} k, which at the same position (moda_chunk 1) is q . k again.
    legacy : before issue 20: attention slots rotated at u, FFN slots not rotated, query rotated
             at t, so FFN logits depend on t.

The C core against the float64 reference (tests/reference.py), finite differences of the
reference's loss, the torch mirror, the invariance under a shift of the text (left padding by
37), and the cache / checkpointing / thread bits."""
import json
import os

import numpy as np
import pytest

import reference as R
from ablation_checks import assert_cache_checkpoint_threads_bits, assert_probes_match_fd, build_from_reference
import stackformer as sf

BASE = dict(vocab_size=48, d_model=32, n_heads=4, n_layers=3, max_seq_len=64, pos="rope", moda=True)
MODES = ["none", "own", "legacy"]
TOL = 1e-4


def build(seed=0, **kw):
    return build_from_reference(BASE, seed, **kw)


def toks(B, T, seed=1):
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], (B, T))


CASES = {
    "c1": dict(),
    "c3_gqa": dict(moda_chunk=3, n_kv_heads=2),
    "post_swiglu": dict(norm_position="post", activation="swiglu", n_layers=4),
    "bidir_c2_depth_only": dict(causal=False, moda_chunk=2, moda_depth_only=True),
    "attnres_block": dict(residual="attnres_block", attnres_block_size=3, moda_chunk=2),
    "attnres_full_post": dict(residual="attnres_full", norm_position="post"),
    "hyper": dict(residual="hyper_connections", hc_dynamic=True, hc_expansion=2),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_traces_match_the_float64_reference(mode, case):
    model, rcfg, params = build(moda_depth_rope=mode, **CASES[case])
    x = toks(2, 11)
    kpm = np.ones((2, 11), dtype=np.int64)
    kpm[1, :3] = 0
    out = model(x, trace=True, key_padding_mask=kpm)
    ref = R.forward(rcfg, {k: v.astype(np.float64) for k, v in params.items()}, tokens=x, key_padding_mask=kpm)
    real = kpm.astype(bool)
    err = np.abs(out.logits.astype(np.float64) - ref["logits"])[real].max()
    assert err <= TOL, err
    for i, (a, b) in enumerate(zip(out.trace.attention, ref["attention"])):
        assert np.abs(a - b).max() <= TOL, f"attention[{i}]"


def test_the_modes_differ_and_legacy_is_the_old_rule_by_hand():
    """The three rules are different models (the test above could not tell otherwise), and
    legacy is exactly the pre-issue-20 reading: reproduced here from its description."""
    x = toks(2, 9)
    logits = {m: build(moda_depth_rope=m)[0](x).logits for m in MODES}
    assert np.abs(logits["none"] - logits["legacy"]).max() > 1e-4
    assert np.abs(logits["own"] - logits["legacy"]).max() > 1e-4
    # none vs own at chunk 1: the same logits in exact arithmetic (R_t^T R_t = I), so only rounding
    assert np.abs(logits["none"] - logits["own"]).max() < 1e-4
    # with chunks, own sees the offset t - u and none does not
    lc = {m: build(moda_depth_rope=m, moda_chunk=4)[0](x).logits for m in ("none", "own")}
    assert np.abs(lc["none"] - lc["own"]).max() > 1e-4


def _depth_logits(model, x, shift):
    """Per layer, the depth logits (B, H, T, 2l) of tokens x placed after `shift` padded
    positions (left padding: the same text at offset `shift`), each relative to the logit of
    the query's own sequence key (shift-invariant under RoPE: q R_t^T R_t k = q . k), read
    from the traced probabilities: log p_c - log p_tt = logit_c - logit_tt."""
    B, T = x.shape
    xs = np.concatenate([np.zeros((B, shift), dtype=x.dtype), x], axis=1)
    kpm = np.concatenate([np.zeros((B, shift), np.int64), np.ones((B, T), np.int64)], axis=1)
    tr = model(xs, trace=True, key_padding_mask=kpm).trace
    out = []
    for a in tr.attention:
        a = a.astype(np.float64)
        Tt = shift + T
        diag = np.einsum("bhtt->bht", a[:, :, shift:, shift:Tt])  # p of the own sequence key
        out.append(np.log(a[:, :, shift:, Tt:]) - np.log(diag)[..., None])
    return out


@pytest.mark.parametrize("mode", ["none", "own"])
@pytest.mark.parametrize("extra", [dict(), dict(n_kv_heads=2, norm_position="post")], ids=["mha", "gqa_post"])
def test_same_tokens_at_offsets_0_and_37_give_the_same_depth_logits(mode, extra):
    """Every slot kind (attention-written 2j, FFN-written 2j+1) of every layer: the depth
    logits do not depend on where the text starts."""
    model, _, _ = build(moda_depth_rope=mode, **extra)
    x = toks(2, 12)
    z0, z37 = _depth_logits(model, x, 0), _depth_logits(model, x, 37)
    for layer, (a, b) in enumerate(zip(z0, z37)):
        assert a.shape[-1] == 2 * layer
        for slot in range(2 * layer):  # moda_chunk 1: column = slot
            err = np.abs(a[..., slot] - b[..., slot]).max()
            assert err < 1e-4, f"layer {layer} slot {slot} ({'attn' if slot % 2 == 0 else 'ffn'}): {err:.2e}"


def test_legacy_ffn_slots_depend_on_the_offset():
    """The invariance test can fail: under legacy, FFN slots are read with a rotated query."""
    model, _, _ = build(moda_depth_rope="legacy")
    x = toks(2, 12)
    z0, z37 = _depth_logits(model, x, 0)[1], _depth_logits(model, x, 37)[1]
    assert np.abs(z0[..., 0] - z37[..., 0]).max() < 1e-4  # attn_0: the rotation cancels
    assert np.abs(z0[..., 1] - z37[..., 1]).max() > 1e-2  # ffn_0: it does not


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_finite_differences_of_the_reference(mode):
    model, rcfg, params = build(moda_depth_rope=mode, moda_chunk=2, n_kv_heads=2)
    rng = np.random.default_rng(5)
    x, y = toks(2, 8, seed=3), toks(2, 8, seed=4)
    model.forward_backward(x, y)
    grads = model.grads
    p64 = {n: v.astype(np.float64) for n, v in params.items()}
    probes = []
    for n in ("layers.0.attn.q_proj.weight", "layers.0.attn.k_proj.weight", "layers.1.attn.q_proj.weight",
              "layers.0.mlp.depth_k_proj.weight", "layers.1.mlp.depth_k_proj.weight",
              "layers.0.mlp.depth_v_proj.weight", "layers.2.attn.q_proj.weight", "tok_emb.weight"):
        for _ in range(3):
            probes.append((n, tuple(int(rng.integers(0, s)) for s in p64[n].shape)))
    assert_probes_match_fd(rcfg, p64, grads, probes, x, y)


@pytest.mark.parametrize("mode", MODES)
def test_cache_checkpointing_and_threads_give_the_same_bits(mode):
    model, _, _ = build(moda_depth_rope=mode, moda_chunk=2, n_kv_heads=2)
    x, y = toks(2, 10), toks(2, 10, seed=2)
    assert_cache_checkpoint_threads_bits(model, x, y, prefill=4)


@pytest.mark.parametrize("mode", MODES)
def test_torch_mirror_matches_the_reference(mode):
    torch = pytest.importorskip("torch")
    from stackformer.torch import TorchModel
    kw = {**BASE, "moda_depth_rope": mode, "moda_chunk": 2, "n_kv_heads": 2}
    cfg, rcfg = sf.Config(**kw), R.Config(**kw)
    params = R.init_params(rcfg, np.random.default_rng(0))
    tm = TorchModel(cfg).double()
    tm.load_state_dict({k: torch.tensor(v) for k, v in params.items()})
    x = toks(2, 9)
    got = tm(torch.tensor(x)).detach().numpy()
    want = R.forward(rcfg, params, tokens=x)["logits"]
    assert np.abs(got - want).max() < 1e-10


def test_bad_values_and_combinations_name_the_field():
    with pytest.raises(ValueError, match="moda_depth_rope"):
        sf.Config(**BASE, moda_depth_rope="rotate")
    for kw in (dict(moda=False), dict(pos="learned")):
        for mode in ("own", "legacy"):
            with pytest.raises(ValueError, match="moda_depth_rope"):
                sf.Config(**{**BASE, **kw, "moda_depth_rope": mode})
        sf.Config(**{**BASE, **kw})  # the default is fine without moda / rope


def test_a_checkpoint_saved_before_the_knob_loads_as_legacy(tmp_path):
    """A MoDA + RoPE checkpoint whose config predates moda_depth_rope computed the legacy rule:
    it loads as legacy and gives the same logits as a legacy model with those weights."""
    pytest.importorskip("safetensors")
    from safetensors.numpy import load, save
    model, _, params = build(moda_depth_rope="legacy")
    path = str(tmp_path / "old.safetensors")
    model.save(path)
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n])["__metadata__"]
    old_cfg = json.loads(meta["config"])
    del old_cfg["moda_depth_rope"]
    meta["config"] = json.dumps(old_cfg)
    with open(path, "wb") as f:
        f.write(save(load(data), metadata=meta))
    back = sf.Model.load(path)
    assert back.config.moda_depth_rope == "legacy"
    x = toks(1, 7)
    assert np.array_equal(back(x).logits, model(x).logits)
    # a fresh config (no checkpoint) gets the new default
    assert sf.Config.from_dict(old_cfg).moda_depth_rope == "none"
