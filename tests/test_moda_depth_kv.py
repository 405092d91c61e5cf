"""moda_depth_kv (issue 20): which sublayers write MoDA depth slots (MoDA Table 3 rows 3-5).

    attn           : row 3, each attention sublayer's own (sequence) K/V only; block l reads l slots
    attn+ffn       : row 4 (the paper's default, and ours): also ffn_j = (u Wdk^T, u Wdv^T)
    attn+ffn+extra : row 5, the attention sublayer writes (u Wadk^T, u Wadv^T) from extra
                     projections of its input u (layers.{i}.attn.depth_k/v_proj) instead of
                     reusing its sequence K/V

Against the float64 reference, finite differences, the torch mirror, cache / checkpointing /
thread bits, bad values; and the Table 6 setting (d 384, 6 query heads, 2 kv heads, 24 and 48
layers, pre- and post-norm) runs and trains at small T."""
import numpy as np
import pytest

import reference as R
from ablation_checks import assert_cache_checkpoint_threads_bits, assert_probes_match_fd, build_from_reference
import stackformer as sf

BASE = dict(vocab_size=48, d_model=32, n_heads=4, n_layers=3, max_seq_len=32, moda=True)
KVS = ["attn", "attn+ffn", "attn+ffn+extra"]
TOL = 1e-4


def build(seed=0, **kw):
    return build_from_reference(BASE, seed, **kw)


def toks(B, T, seed=1):
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], (B, T))


CASES = {
    "learned": dict(),
    "rope_none_gqa_c2": dict(pos="rope", n_kv_heads=2, moda_chunk=2),
    "rope_own_post": dict(pos="rope", moda_depth_rope="own", norm_position="post", n_layers=4),
    "rope_legacy_swiglu": dict(pos="rope", moda_depth_rope="legacy", activation="swiglu"),
    "bidir_depth_only_c3": dict(causal=False, moda_depth_only=True, moda_chunk=3),
    "attnres_full_rope": dict(residual="attnres_full", pos="rope"),
    "mhc_post": dict(residual="mhc", hc_expansion=2, norm_position="post"),
}


@pytest.mark.parametrize("kv", KVS)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_traces_match_the_float64_reference(kv, case):
    model, rcfg, params = build(moda_depth_kv=kv, **CASES[case])
    x = toks(2, 10)
    kpm = np.ones((2, 10), dtype=np.int64)
    kpm[0, 6:] = 0
    out = model(x, trace=True, key_padding_mask=kpm)
    ref = R.forward(rcfg, {k: v.astype(np.float64) for k, v in params.items()}, tokens=x, key_padding_mask=kpm)
    real = kpm.astype(bool)
    assert np.abs(out.logits.astype(np.float64) - ref["logits"])[real].max() <= TOL
    per = 1 if kv == "attn" else 2
    C = model.config.moda_chunk
    for i, (a, b) in enumerate(zip(out.trace.attention, ref["attention"])):
        assert a.shape[-1] == 10 + per * i * C  # trace columns [T | slots of the chunk]
        assert np.abs(a - b).max() <= TOL, f"attention[{i}]"


def test_tensors_and_counts_follow_the_rows():
    names = {kv: set(sf.Model(sf.Config(**BASE, moda_depth_kv=kv), seed=0).state_dict()) for kv in KVS}
    ffn = {f"layers.{i}.mlp.depth_{w}_proj.weight" for i in range(2) for w in "kv"}
    att = {f"layers.{i}.attn.depth_{w}_proj.weight" for i in range(2) for w in "kv"}
    assert names["attn+ffn"] - names["attn"] == ffn and not names["attn"] - names["attn+ffn"]
    assert names["attn+ffn+extra"] - names["attn+ffn"] == att
    # Table 3: row 3 keeps the baseline's parameter count (it reuses the sequence K/V)
    plain = sf.Model(sf.Config(**{**BASE, "moda": False}), seed=0)
    assert sf.Model(sf.Config(**BASE, moda_depth_kv="attn"), seed=0).num_params == plain.num_params
    d, kvd = BASE["d_model"], BASE["d_model"]
    counts = [sf.Model(sf.Config(**BASE, moda_depth_kv=kv), seed=0).num_params for kv in KVS]
    assert counts[1] - counts[0] == counts[2] - counts[1] == 2 * 2 * kvd * d  # 2 blocks x (k, v)


def test_the_rows_are_different_models():
    x = toks(2, 8)
    lg = {kv: build(moda_depth_kv=kv)[0](x).logits for kv in KVS}
    assert np.abs(lg["attn"] - lg["attn+ffn"]).max() > 1e-4
    assert np.abs(lg["attn+ffn"] - lg["attn+ffn+extra"]).max() > 1e-4


@pytest.mark.parametrize("kv,extra", [("attn", dict()), ("attn+ffn+extra", dict()),
                                      ("attn+ffn+extra", dict(pos="rope", moda_depth_rope="own")),
                                      ("attn+ffn+extra", dict(pos="rope")),
                                      ("attn", dict(pos="rope", moda_depth_rope="legacy", n_kv_heads=2))],
                         ids=["attn", "extra", "extra_rope_own", "extra_rope_none", "attn_rope_legacy_gqa"])
def test_gradients_match_finite_differences_of_the_reference(kv, extra):
    model, rcfg, params = build(moda_depth_kv=kv, moda_chunk=2, **extra)
    rng = np.random.default_rng(5)
    x, y = toks(2, 8, seed=3), toks(2, 8, seed=4)
    model.forward_backward(x, y)
    grads = model.grads
    p64 = {n: v.astype(np.float64) for n, v in params.items()}
    names = [n for n in p64 if "depth_" in n] + ["layers.0.attn.k_proj.weight", "layers.0.attn.v_proj.weight",
                                                 "layers.1.attn.q_proj.weight", "tok_emb.weight"]
    probes = [(n, tuple(int(rng.integers(0, s)) for s in p64[n].shape)) for n in names for _ in range(2)]
    assert_probes_match_fd(rcfg, p64, grads, probes, x, y)


@pytest.mark.parametrize("kv", ["attn", "attn+ffn+extra"])
def test_cache_checkpointing_and_threads_give_the_same_bits(kv):
    model, _, _ = build(moda_depth_kv=kv, moda_chunk=2, n_kv_heads=2, pos="rope", moda_depth_rope="own")
    x, y = toks(2, 10), toks(2, 10, seed=2)
    assert_cache_checkpoint_threads_bits(model, x, y, prefill=3)


def test_save_load_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    model, _, _ = build(moda_depth_kv="attn+ffn+extra", pos="rope")
    model.train_step(toks(2, 8), toks(2, 8, seed=2), lr=1e-2)
    path = str(tmp_path / "m.safetensors")
    model.save(path, optimizer=True)
    back = sf.Model.load(path)
    assert back.config == model.config
    x = toks(1, 9)
    assert np.array_equal(back(x).logits, model(x).logits)


@pytest.mark.parametrize("kv", KVS)
def test_torch_mirror_matches_the_reference_and_names(kv):
    torch = pytest.importorskip("torch")
    from stackformer.torch import TorchModel
    kw = {**BASE, "moda_depth_kv": kv, "pos": "rope", "moda_depth_rope": "own", "moda_chunk": 2, "n_kv_heads": 2}
    cfg, rcfg = sf.Config(**kw), R.Config(**kw)
    params = R.init_params(rcfg, np.random.default_rng(0))
    tm = TorchModel(cfg).double()
    assert list(tm.state_dict()) == list(sf.Model(cfg, seed=0).state_dict()) and set(params) == set(tm.state_dict())
    tm.load_state_dict({k: torch.tensor(v) for k, v in params.items()})
    x = toks(2, 9)
    got = tm(torch.tensor(x)).detach().numpy()
    assert np.abs(got - R.forward(rcfg, params, tokens=x)["logits"]).max() < 1e-10


def test_bad_values_and_combinations_name_the_field():
    with pytest.raises(ValueError, match="moda_depth_kv"):
        sf.Config(**BASE, moda_depth_kv="ffn")
    for kv in ("attn", "attn+ffn+extra"):
        with pytest.raises(ValueError, match="moda_depth_kv"):
            sf.Config(**{**BASE, "moda": False, "moda_depth_kv": kv})


TABLE6 = dict(vocab_size=256, d_model=384, n_heads=6, n_kv_heads=2, max_seq_len=16, pos="rope", moda=True)


@pytest.mark.slow
@pytest.mark.parametrize("n_layers,norm_position,kv", [(24, "pre", "attn+ffn"), (24, "post", "attn"),
                                                       (48, "post", "attn+ffn"), (48, "pre", "attn")])
def test_table6_setting_runs_and_trains_at_small_T(n_layers, norm_position, kv):
    """MoDA Table 6: width 384, 6 query heads, 2 kv heads (G = 3), 24 and 48 layers, pre- and
    post-norm, Depth KV (attn) and + Extra FFN KV Proj. (attn+ffn); here at T = 6, a few steps
    on one batch: the loss goes down, every gradient is finite."""
    cfg = sf.Config(**TABLE6, n_layers=n_layers, norm_position=norm_position, moda_depth_kv=kv)
    m = sf.Model(cfg, seed=0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 6))
    y = np.roll(x, -1, axis=1)
    losses = [m.train_step(x, y, lr=3e-4) for _ in range(4)]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    assert all(np.isfinite(g).all() for g in m.grads.values())
