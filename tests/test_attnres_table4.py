"""The Attention Residuals Table 4 ablations that change the read's shape (issue 20; Attention
Residuals, Kimi Team, arXiv 2603.15031, Table 4 and its section; DEVELOPERS.md "Ablation
knobs" records the reading): attnres_query="input" (q_t = W x_t from the newest source),
attnres_mixing="static" (softmax of learned logits, the same for every token),
attnres_window=W (the SWA row: the embedding plus the last W sources) and attnres_heads=H
(multi-head AttnRes: one depth softmax per d/H columns).  All four run on the general read
(sf_attnres_general_forward/backward) and combine with each other where that has a meaning.

Against the float64 reference (tests/reference.py: attnres_aggregate / attnres_read written
from the definitions), finite differences of the reference's loss, the torch mirror, cache /
checkpointing / thread bits, traces, bad combinations, save/load, training."""
import numpy as np
import pytest

import reference as R
from ablation_checks import assert_cache_checkpoint_threads_bits, assert_probes_match_fd, build_from_reference
import stackformer as sf

BASE = dict(vocab_size=48, d_model=32, n_heads=4, n_layers=3, max_seq_len=32)
TOL = 1e-4

KNOBS = {
    "heads4": dict(attnres_heads=4),
    "window2": dict(attnres_window=2),
    "input_query": dict(attnres_query="input"),
    "static": dict(attnres_mixing="static", attnres_key_norm=False),
    "heads2_window3_sigmoid": dict(attnres_heads=2, attnres_window=3, attnres_mixing="sigmoid"),
    "input_heads2_no_key_norm": dict(attnres_query="input", attnres_heads=2, attnres_key_norm=False),
    "static_heads2_window1": dict(attnres_mixing="static", attnres_key_norm=False, attnres_heads=2, attnres_window=1),
}
WIRES = {
    "full": dict(residual="attnres_full"),
    "block2": dict(residual="attnres_block", attnres_block_size=2),
    "block3_post_rope_moda": dict(residual="attnres_block", attnres_block_size=3, norm_position="post",
                                  pos="rope", moda=True),
    "full_encoder_swiglu": dict(residual="attnres_full", causal=False, activation="swiglu"),
}


def build(seed=0, **kw):
    return build_from_reference(BASE, seed, **kw)


def toks(B, T, seed=1):
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], (B, T))


@pytest.mark.parametrize("wire", list(WIRES))
@pytest.mark.parametrize("knob", list(KNOBS))
def test_matches_the_float64_reference_logits_and_alphas(knob, wire):
    model, rcfg, params = build(**KNOBS[knob], **WIRES[wire])
    x = toks(2, 10)
    out = model(x, trace=True)
    ref = R.forward(rcfg, {k: v.astype(np.float64) for k, v in params.items()}, tokens=x)
    assert np.abs(out.logits - ref["logits"]).max() <= TOL
    H = rcfg.attnres_heads
    for k, (a, b) in enumerate(zip(out.trace.alpha, ref["alpha"])):
        assert a.shape == b.shape == ((2, 10, H, R.n_reader_sources(rcfg, k)) if H > 1 else
                                      (2, 10, R.n_reader_sources(rcfg, k))), f"alpha[{k}]"
        assert np.abs(a - b).max() <= TOL, f"alpha[{k}]"
    # the Block two-phase schedule does not apply: asking for it changes nothing
    assert np.array_equal(model(x, attnres_two_phase=False).logits, out.logits)


@pytest.mark.parametrize("wire", ["full", "block2", "block3_post_rope_moda"])
@pytest.mark.parametrize("knob", list(KNOBS))
def test_gradients_match_finite_differences_of_the_reference(knob, wire):
    model, rcfg, params = build(**KNOBS[knob], **WIRES[wire])
    rng = np.random.default_rng(5)
    x, y = toks(2, 8, seed=3), toks(2, 8, seed=4)
    model.forward_backward(x, y)
    grads = model.grads
    p64 = {n: v.astype(np.float64) for n, v in params.items()}
    names = [n for n in p64 if "_res_" in n] + ["layers.0.attn.q_proj.weight", "layers.1.mlp.down_proj.weight",
                                               "tok_emb.weight"]
    probes = [(n, tuple(int(rng.integers(0, s)) for s in p64[n].shape)) for n in names for _ in range(2)]
    assert_probes_match_fd(rcfg, p64, grads, probes, x, y)


@pytest.mark.parametrize("wire", ["full", "block3_post_rope_moda"])
@pytest.mark.parametrize("knob", ["heads2_window3_sigmoid", "input_query", "static_heads2_window1"])
def test_cache_checkpointing_and_threads_give_the_same_bits(knob, wire):
    model, _, _ = build(**KNOBS[knob], **WIRES[wire])
    x, y = toks(2, 10), toks(2, 10, seed=2)
    assert_cache_checkpoint_threads_bits(model, x, y, prefill=4)


def test_big_batches_take_the_threaded_kernels_with_the_same_bits():
    """The general kernels go parallel above 65536 multiply-adds; a batch above that gives the
    same bits on 1 and 2 threads (token rows split over lanes of fixed order)."""
    model, _, _ = build(attnres_heads=2, attnres_query="input", residual="attnres_full")
    x, y = toks(8, 32), toks(8, 32, seed=2)
    l1 = model.forward_backward(x, y, n_threads=1)
    g1 = {n: g.copy() for n, g in model.grads.items()}
    assert model.forward_backward(x, y, n_threads=2) == l1
    assert all(np.array_equal(g, g1[n]) for n, g in model.grads.items())


def test_window_covering_every_source_is_the_default_model():
    """W >= the most sources any read has (L = 6 others here): the same model as no window (in
    exact arithmetic; the general kernel sums in another order, so to float32 rounding)."""
    x = toks(2, 9)
    for wire in ("full", "block2"):
        a, _, p = build(**WIRES[wire])
        b, _, _ = build(attnres_window=6, **WIRES[wire])
        assert np.abs(a(x).logits - b(x).logits).max() < 1e-5
        # and a real window is a different model
        c, _, _ = build(attnres_window=1, **WIRES[wire])
        assert np.abs(a(x).logits - c(x).logits).max() > 1e-3


def test_window_reads_the_embedding_and_the_last_w_sources():
    m = sf.Model(sf.Config(**BASE, residual="attnres_full", attnres_window=2), seed=0)
    labels = m.alpha_labels()
    assert labels[1] == ["v0", "v1"] and labels[2] == ["v0", "v1", "v2"]
    assert labels[5] == ["v0", "v4", "v5"] and labels[6] == ["v0", "v5", "v6"]
    tr = m(toks(1, 5), trace=True).trace
    assert [a.shape[-1] for a in tr.alpha] == [len(x) for x in labels]
    mat = tr.alpha_matrix  # each source in its own column: row 5 reads v0, v4, v5
    assert mat.shape == (7, 7)
    assert np.isnan(mat[5, 1:4]).all() and np.allclose(mat[5, [0, 4, 5]], 1 / 3)
    b = sf.Model(sf.Config(**BASE, residual="attnres_block", attnres_block_size=1, attnres_window=1), seed=0)
    assert b.alpha_labels()[4] == ["b0", "b4"] and b.alpha_labels()[6] == ["b0", "b6"]


def test_multihead_alphas_have_a_head_axis_and_a_softmax_per_head():
    model, _, _ = build(attnres_heads=4, residual="attnres_block", attnres_block_size=2)
    tr = model(toks(2, 7), trace=True).trace
    for a in tr.alpha:
        assert a.ndim == 4 and a.shape[2] == 4
        assert np.abs(a.sum(-1) - 1).max() < 1e-5
    heads_differ = max(np.abs(a[:, :, 0] - a[:, :, 1]).max() for a in tr.alpha[1:])
    assert heads_differ > 1e-3
    assert tr.alpha_matrix.shape == (7, 4)
    # H = 1 heads is the one-softmax read: a (1, d) pseudo-query split into H pieces needs no
    # new tensors, so the same parameters load into both
    one, _, p = build(residual="attnres_full")
    four = sf.Model(sf.Config(**BASE, residual="attnres_full", attnres_heads=4), seed=0)
    four.load_state_dict(p)
    assert set(one.state_dict()) == set(four.state_dict())
    assert np.abs(one(toks(1, 6)).logits - four(toks(1, 6)).logits).max() > 1e-4


def test_static_weights_do_not_depend_on_the_token_and_sum_to_one():
    model, _, p = build(attnres_mixing="static", attnres_key_norm=False, residual="attnres_full")
    tr = model(toks(3, 8), trace=True).trace
    for k, a in enumerate(tr.alpha):
        assert np.array_equal(a, np.broadcast_to(a[0, 0], a.shape)), k
        assert abs(a[0, 0].sum() - 1) < 1e-6
        b = p[f"layers.{k // 2}.{'attn' if k % 2 == 0 else 'mlp'}_res_logits.weight" if k < 6 else "output_res_logits.weight"]
        e = np.exp(b[0] - b[0].max())
        assert np.abs(a[0, 0] - e / e.sum()).max() < 1e-6
    names = set(model.state_dict())
    assert not {n for n in names if "_res_proj" in n or "_res_norm" in n}


def test_the_papers_zero_init_gives_uniform_mixing_for_every_knob():
    x = toks(1, 6)
    for knob in KNOBS.values():
        for wire in ("full", "block2"):
            cfg = sf.Config(**BASE, **WIRES[wire], **knob)
            m = sf.Model(cfg, seed=0)
            for a in m(x, trace=True).trace.alpha:
                want = 0.5 if cfg.attnres_mixing == "sigmoid" else 1.0 / a.shape[-1]
                assert np.allclose(a, want, atol=1e-6), (knob, wire)


def test_parameter_shapes_names_and_decay():
    d = BASE["d_model"]
    m = sf.Model(sf.Config(**BASE, residual="attnres_full", attnres_query="input"), seed=0)
    sd = m.state_dict()
    assert sd["layers.0.attn_res_proj.weight"].shape == (d, d) and sd["output_res_proj.weight"].shape == (d, d)
    s = sf.Model(sf.Config(**BASE, residual="attnres_block", attnres_block_size=2, attnres_mixing="static",
                           attnres_key_norm=False, attnres_heads=2), seed=0).state_dict()
    # Block S=2 over L=6: sublayer k reads 1 + k//2 + [k odd] sources, the output 1 + 3
    assert [s[f"layers.{i}.{w}_res_logits.weight"].shape for i in range(3) for w in ("attn", "mlp")] == \
        [(2, 1), (2, 2), (2, 2), (2, 3), (2, 3), (2, 4)]
    assert s["output_res_logits.weight"].shape == (2, 4)
    info = {t["name"]: t for t in m.tensor_info()} if hasattr(m, "tensor_info") else None
    if info:
        assert not info["layers.0.attn_res_proj.weight"]["decay"]


@pytest.mark.parametrize("knob", ["input_query", "static_heads2_window1", "heads2_window3_sigmoid"])
def test_torch_mirror_matches_the_reference_and_names(knob):
    torch = pytest.importorskip("torch")
    from stackformer.torch import TorchModel
    for wire in ("full", "block3_post_rope_moda"):
        kw = {**BASE, **WIRES[wire], **KNOBS[knob]}
        cfg, rcfg = sf.Config(**kw), R.Config(**kw)
        params = R.init_params(rcfg, np.random.default_rng(0))
        tm = TorchModel(cfg).double()
        assert list(tm.state_dict()) == list(sf.Model(cfg, seed=0).state_dict())
        tm.load_state_dict({k: torch.tensor(v) for k, v in params.items()})
        x = toks(2, 9)
        got = tm(torch.tensor(x)).detach().numpy()
        assert np.abs(got - R.forward(rcfg, params, tokens=x)["logits"]).max() < 1e-10
        # the mirror's init is stackformer's: zero queries / logits (uniform mixing)
        fresh = TorchModel(cfg)
        assert all(float(p.detach().abs().max()) == 0 for n, p in fresh.named_parameters() if "_res_proj" in n or "_res_logits" in n)
        assert all(fresh.no_decay(n) for n, _ in fresh.named_parameters() if "_res_" in n)


def test_save_load_round_trip_and_config_json(tmp_path):
    pytest.importorskip("safetensors")
    for knob in ("input_query", "static_heads2_window1"):
        model, _, _ = build(**KNOBS[knob], residual="attnres_block", attnres_block_size=2)
        model.train_step(toks(2, 8), toks(2, 8, seed=2), lr=1e-2)
        path = str(tmp_path / f"{knob}.safetensors")
        model.save(path, optimizer=True)
        back = sf.Model.load(path)
        assert back.config == model.config
        assert sf.Config.from_json(model.config.to_json()) == model.config
        x = toks(1, 9)
        assert np.array_equal(back(x).logits, model(x).logits)


@pytest.mark.parametrize("knob", list(KNOBS))
def test_trains(knob):
    cfg = sf.Config(**BASE, residual="attnres_block", attnres_block_size=2, **KNOBS[knob])
    m = sf.Model(cfg, seed=0)
    x = toks(4, 12)
    y = np.roll(x, -1, axis=1)
    losses = [m.train_step(x, y, lr=1e-2) for _ in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    moved = [n for n, v in m.state_dict().items() if ("_res_proj" in n or "_res_logits" in n) and np.abs(v).max() > 0]
    assert moved  # the routing parameters learn from their zero init


def test_bad_values_and_combinations_name_the_field():
    def bad(match, exc=ValueError, **kw):
        with pytest.raises(exc, match=match):
            sf.Config(**{**BASE, **kw})
    for residual in ("plain", "denseformer", "hyper_connections"):
        bad("attnres_query", residual=residual, attnres_query="input")
        bad("attnres_window", residual=residual, attnres_window=4)
        bad("attnres_heads", residual=residual, attnres_heads=2)
        bad("attnres_mixing", residual=residual, attnres_mixing="static", attnres_key_norm=False)
    bad("attnres_key_norm=False", residual="attnres_full", attnres_mixing="static")
    bad("attnres_query='input'", residual="attnres_full", attnres_mixing="static", attnres_key_norm=False,
        attnres_query="input")
    bad("attnres_heads", residual="attnres_full", attnres_heads=3)
    bad("attnres_heads", residual="attnres_full", attnres_heads=0)
    bad("attnres_window", residual="attnres_full", attnres_window=0)
    bad("attnres_window", residual="attnres_full", attnres_window=-2)
    bad("attnres_window", TypeError, residual="attnres_full", attnres_window=2.5)
    bad("attnres_query", residual="attnres_full", attnres_query="dynamic")
    bad("attnres_mixing", residual="attnres_full", attnres_mixing="relu")
    assert sf.Config(**BASE, residual="attnres_full").attnres_window is None


def test_run_with_cache_names_windowed_sources_and_mixes_heads():
    """The TransformerLens-style cache under a window and heads: each read's hook_sources name
    the embedding and its last W sources, and its input is the head-wise mixture of them."""
    m, _, _ = build(attnres_window=2, attnres_heads=2, residual="attnres_full")
    _, cache = m.run_with_cache(toks(2, 6))
    name = "blocks.2.attn_res.hook_weights"  # sublayer 4 reads v0, v3, v4
    assert cache.hook_sources[name] == ["hook_embed", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"]
    w = cache[name].astype(np.float64)  # (B, T, H, 3)
    srcs = np.stack([cache[s].astype(np.float64) for s in cache.hook_sources[name]], axis=2)  # (B, T, 3, d)
    B, T, n, d = srcs.shape
    mixed = np.einsum("bthn,btnhe->bthe", w, srcs.reshape(B, T, n, 2, d // 2)).reshape(B, T, d)
    assert np.abs(mixed - cache["blocks.2.hook_resid_pre"]).max() < 1e-5
