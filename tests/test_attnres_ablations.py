"""Attention Residuals ablations (issue 20; Attention Residuals, Kimi Team, arXiv 2603.15031,
Table 4): attnres_key_norm=False ("w/o key norm": K_i = v_i, s_i = w . v_i, no gain tensors),
and the block-size sweep (S = 2, 4, 8, 16, 32 with 16 transformer blocks runs and trains).

Against the float64 reference (tests/reference.py, attnres_aggregate with g None), finite
differences of the reference's loss, the torch mirror, cache / checkpointing / thread bits,
bad combinations, save/load."""
import numpy as np
import pytest

import reference as R
from ablation_checks import assert_cache_checkpoint_threads_bits, assert_probes_match_fd, build_from_reference
import stackformer as sf

BASE = dict(vocab_size=48, d_model=32, n_heads=4, n_layers=3, max_seq_len=32)
TOL = 1e-4


def build(seed=0, **kw):
    return build_from_reference(BASE, seed, **kw)


def toks(B, T, seed=1):
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], (B, T))


CASES = {
    "full": dict(residual="attnres_full"),
    "full_post_rope": dict(residual="attnres_full", norm_position="post", pos="rope"),
    "block2": dict(residual="attnres_block", attnres_block_size=2),
    "block3_post_moda": dict(residual="attnres_block", attnres_block_size=3, norm_position="post", moda=True),
    "block4_layers5_swiglu": dict(residual="attnres_block", attnres_block_size=4, n_layers=5, activation="swiglu"),
    "block1_encoder": dict(residual="attnres_block", attnres_block_size=1, causal=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_without_key_norm_matches_the_float64_reference(case):
    model, rcfg, params = build(attnres_key_norm=False, **CASES[case])
    x = toks(2, 10)
    out = model(x, trace=True)
    ref = R.forward(rcfg, {k: v.astype(np.float64) for k, v in params.items()}, tokens=x)
    assert np.abs(out.logits - ref["logits"]).max() <= TOL
    for k, (a, b) in enumerate(zip(out.trace.alpha, ref["alpha"])):
        assert np.abs(a - b).max() <= TOL, f"alpha[{k}]"
    if model.config.residual == "attnres_block":  # the direct (one-phase) path too
        assert np.abs(model(x, attnres_two_phase=False).logits - ref["logits"]).max() <= TOL


def test_key_norm_off_is_a_different_model_without_gains():
    x = toks(2, 9)
    on, _, p_on = build(residual="attnres_full")
    off, _, p_off = build(residual="attnres_full", attnres_key_norm=False)
    assert {n for n in p_on if "_res_norm" in n} and not {n for n in p_off if "_res_norm" in n}
    assert set(p_on) - set(p_off) == {n for n in p_on if "_res_norm" in n}
    assert np.abs(on(x).logits - off(x).logits).max() > 1e-4
    # the paper's init (pseudo-queries 0): uniform mixing either way, so the two models agree
    a = sf.Model(sf.Config(**BASE, residual="attnres_block", attnres_block_size=2), seed=3)
    b = sf.Model(sf.Config(**BASE, residual="attnres_block", attnres_block_size=2, attnres_key_norm=False), seed=3)
    shared = {n: v for n, v in a.state_dict().items() if "_res_norm" not in n}
    b.load_state_dict(shared)
    assert np.array_equal(a(x).logits, b(x).logits)


@pytest.mark.parametrize("case", ["full", "block3_post_moda", "block2"])
def test_gradients_match_finite_differences_of_the_reference(case):
    model, rcfg, params = build(attnres_key_norm=False, **CASES[case])
    rng = np.random.default_rng(5)
    x, y = toks(2, 8, seed=3), toks(2, 8, seed=4)
    model.forward_backward(x, y)
    grads = model.grads
    p64 = {n: v.astype(np.float64) for n, v in params.items()}
    names = [n for n in p64 if "_res_proj" in n] + ["layers.0.attn.q_proj.weight",
                                                    "layers.1.mlp.down_proj.weight", "tok_emb.weight"]
    probes = [(n, tuple(int(rng.integers(0, s)) for s in p64[n].shape)) for n in names for _ in range(2)]
    assert_probes_match_fd(rcfg, p64, grads, probes, x, y)


@pytest.mark.parametrize("case", ["full_post_rope", "block3_post_moda"])
def test_cache_checkpointing_and_threads_give_the_same_bits(case):
    model, _, _ = build(attnres_key_norm=False, **CASES[case])
    x, y = toks(2, 10), toks(2, 10, seed=2)
    assert_cache_checkpoint_threads_bits(model, x, y, prefill=4)


def test_save_load_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    model, _, _ = build(attnres_key_norm=False, residual="attnres_block", attnres_block_size=2)
    model.train_step(toks(2, 8), toks(2, 8, seed=2), lr=1e-2)
    path = str(tmp_path / "m.safetensors")
    model.save(path, optimizer=True)
    back = sf.Model.load(path)
    assert back.config == model.config
    x = toks(1, 9)
    assert np.array_equal(back(x).logits, model(x).logits)


@pytest.mark.parametrize("case", ["full", "block3_post_moda"])
def test_torch_mirror_matches_the_reference_and_names(case):
    torch = pytest.importorskip("torch")
    from stackformer.torch import TorchModel
    kw = {**BASE, **CASES[case], "attnres_key_norm": False}
    cfg, rcfg = sf.Config(**kw), R.Config(**kw)
    params = R.init_params(rcfg, np.random.default_rng(0))
    tm = TorchModel(cfg).double()
    assert list(tm.state_dict()) == list(sf.Model(cfg, seed=0).state_dict()) and set(params) == set(tm.state_dict())
    tm.load_state_dict({k: torch.tensor(v) for k, v in params.items()})
    x = toks(2, 9)
    got = tm(torch.tensor(x)).detach().numpy()
    assert np.abs(got - R.forward(rcfg, params, tokens=x)["logits"]).max() < 1e-10


def test_bad_combinations_name_the_field():
    for residual in ("plain", "denseformer", "mhc"):
        with pytest.raises(ValueError, match="attnres_key_norm"):
            sf.Config(**BASE, residual=residual, attnres_key_norm=False)
    with pytest.raises(TypeError, match="attnres_key_norm"):
        sf.Config(**BASE, residual="attnres_full", attnres_key_norm="no")


@pytest.mark.slow
@pytest.mark.parametrize("S", [2, 4, 8, 16, 32])
def test_block_size_sweep_with_16_blocks_runs_and_trains(S):
    """Table 4's block-size sweep: 16 transformer blocks (L = 32 sublayers), S = 2 .. 32
    (S = 32: one block, the embedding plus the running partial sum); loss goes down on a
    fixed batch, gradients finite, and the two-phase and direct paths agree."""
    cfg = sf.Config(vocab_size=64, d_model=32, n_heads=4, n_layers=16, max_seq_len=16,
                    residual="attnres_block", attnres_block_size=S)
    m = sf.Model(cfg, seed=0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 64, (2, 8))
    y = np.roll(x, -1, axis=1)
    assert np.abs(m(x).logits - m(x, attnres_two_phase=False).logits).max() < 1e-5
    tr = m(x, trace=True).trace
    # sublayer k mixes 1 + k // S + [k % S != 0] sources, the output 1 + ceil(32 / S)
    assert [a.shape[-1] for a in tr.alpha] == [1 + k // S + (k % S != 0) for k in range(32)] + [1 + -(-32 // S)]
    losses = [m.train_step(x, y, lr=3e-3) for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert all(np.isfinite(g).all() for g in m.grads.values())


# -- attnres_mixing="sigmoid" (Table 4: sigmoid gates instead of the softmax) ------------------

SIG = {
    "full": dict(residual="attnres_full"),
    "block2_rope": dict(residual="attnres_block", attnres_block_size=2, pos="rope"),
    "block3_post_moda": dict(residual="attnres_block", attnres_block_size=3, norm_position="post", moda=True),
    "full_no_key_norm": dict(residual="attnres_full", attnres_key_norm=False),
    "block4_layers5_encoder": dict(residual="attnres_block", attnres_block_size=4, n_layers=5, causal=False),
}


@pytest.mark.parametrize("case", list(SIG))
def test_sigmoid_mixing_matches_the_float64_reference_and_traces_the_gates(case):
    model, rcfg, params = build(attnres_mixing="sigmoid", **SIG[case])
    x = toks(2, 10)
    out = model(x, trace=True)
    ref = R.forward(rcfg, {k: v.astype(np.float64) for k, v in params.items()}, tokens=x)
    assert np.abs(out.logits - ref["logits"]).max() <= TOL
    for k, (a, b) in enumerate(zip(out.trace.alpha, ref["alpha"])):
        assert np.abs(a - b).max() <= TOL, f"alpha[{k}]"
        assert ((a > 0) & (a < 1)).all()  # gates, one per source
    sums = np.concatenate([a.sum(-1).ravel() for a in out.trace.alpha[1:]])
    assert np.abs(sums - 1).max() > 1e-2  # not a softmax: the gates need not sum to 1
    # the two-phase schedule is a softmax's; sigmoid takes the direct path whatever is asked
    assert np.array_equal(model(x, attnres_two_phase=False).logits, model(x).logits)


def test_sigmoid_at_the_papers_init_gates_every_source_by_one_half():
    cfg = sf.Config(**BASE, residual="attnres_full", attnres_mixing="sigmoid")
    tr = sf.Model(cfg, seed=0)(toks(1, 6), trace=True).trace
    assert all(np.array_equal(a, np.full_like(a, 0.5)) for a in tr.alpha)


@pytest.mark.parametrize("case", ["full", "block3_post_moda", "full_no_key_norm"])
def test_sigmoid_gradients_match_finite_differences_of_the_reference(case):
    model, rcfg, params = build(attnres_mixing="sigmoid", **SIG[case])
    rng = np.random.default_rng(6)
    x, y = toks(2, 8, seed=3), toks(2, 8, seed=4)
    model.forward_backward(x, y)
    grads = model.grads
    p64 = {n: v.astype(np.float64) for n, v in params.items()}
    names = [n for n in p64 if "_res_" in n] + ["layers.0.attn.q_proj.weight", "tok_emb.weight"]
    probes = [(n, tuple(int(rng.integers(0, s)) for s in p64[n].shape)) for n in names for _ in range(2)]
    assert_probes_match_fd(rcfg, p64, grads, probes, x, y)


@pytest.mark.parametrize("case", ["full", "block2_rope"])
def test_sigmoid_cache_checkpointing_threads_mirror_and_save(case, tmp_path):
    model, rcfg, params = build(attnres_mixing="sigmoid", **SIG[case])
    x, y = toks(2, 10), toks(2, 10, seed=2)
    full = model(x).logits
    assert_cache_checkpoint_threads_bits(model, x, y, prefill=4)
    pytest.importorskip("safetensors")
    path = str(tmp_path / "m.safetensors")
    model.save(path)
    assert np.array_equal(sf.Model.load(path)(x).logits, full)
    torch = pytest.importorskip("torch")
    from stackformer.torch import TorchModel
    tm = TorchModel(model.config).double()
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    tm.load_state_dict({k: torch.tensor(v) for k, v in p64.items()})
    got = tm(torch.tensor(x)).detach().numpy()
    assert np.abs(got - R.forward(rcfg, p64, tokens=x)["logits"]).max() < 1e-10


def test_sigmoid_bad_values_and_combinations_name_the_field():
    with pytest.raises(ValueError, match="attnres_mixing"):
        sf.Config(**BASE, residual="attnres_full", attnres_mixing="relu")
    for residual in ("plain", "hyper_connections"):
        with pytest.raises(ValueError, match="attnres_mixing"):
            sf.Config(**BASE, residual=residual, attnres_mixing="sigmoid")
