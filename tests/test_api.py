"""Behaviour of the public Python API: views, state_dict, checkpoints, traces, threads."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import stackformer as sf
from conftest import small_config


def test_views_share_memory_with_c(model, tokens):
    w = model.layers[1].attn.q_proj.weight
    assert w.shape == (32, 32) and w.dtype == np.float32 and w.flags.writeable
    before = model(tokens).logits
    w[:] = 0.0  # writes through to C
    after = model(tokens).logits
    assert not np.allclose(before, after)
    assert np.all(model.state_dict()["layers.1.attn.q_proj.weight"] == 0)


def test_view_outlives_model(tokens):
    m = sf.Model(small_config(), seed=0)
    w = m.tok_emb.weight
    expected = w.copy()
    del m
    import gc
    gc.collect()
    np.testing.assert_array_equal(w, expected)  # the view keeps the C buffer alive


def test_assign_leaf_checks_shape(model):
    with pytest.raises(ValueError, match="layers.0.attn.q_proj.weight.*shape"):
        model.layers[0].attn.q_proj.weight = np.zeros((3, 3), np.float32)
    model.layers[0].attn.q_proj.weight = np.ones((32, 32))
    assert np.all(model.layers[0].attn.q_proj.weight == 1)


def test_seed_determinism_and_difference():
    a = sf.Model(small_config(), seed=3).state_dict()
    b = sf.Model(small_config(), seed=3).state_dict()
    c = sf.Model(small_config(), seed=4).state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a if k.endswith("q_proj.weight"))


def test_init_statistics():
    m = sf.Model(sf.Config(vocab_size=256, d_model=128, n_heads=4, n_layers=4,
                           residual="attnres_full"), seed=0)
    sd = m.state_dict()
    assert abs(sd["tok_emb.weight"].std() - 0.02) < 0.002
    assert abs(sd["layers.0.attn.o_proj.weight"].std() - 0.02 / np.sqrt(8)) < 0.001
    assert np.all(sd["layers.0.attn_norm.weight"] == 1) and np.all(sd["layers.0.attn_norm.bias"] == 0)
    assert np.all(sd["layers.2.mlp_res_proj.weight"] == 0)  # zero pseudo-queries
    assert np.all(sd["output_res_norm.weight"] == 1)


def test_state_dict_roundtrip_and_copy(model, tokens):
    sd = model.state_dict()
    sd["tok_emb.weight"][:] = 5.0  # a copy: the model is unchanged
    assert not np.any(model.tok_emb.weight == 5.0)
    other = sf.Model(small_config(), seed=99)
    other.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(other(tokens).logits, model(tokens).logits)


def test_num_params_matches_table(model):
    assert model.num_params == sum(v.size for v in model.state_dict().values())


def test_save_load_roundtrip(tmp_path, tokens):
    m = sf.Model(small_config(residual="attnres_block", attnres_block_size=3, moda=True,
                              pos="rope", activation="swiglu"), seed=5)
    m.layers[0].attn_res_proj.weight[:] = 0.3
    path = tmp_path / "m.safetensors"
    m.save(str(path))
    m2 = sf.Model.load(str(path))
    assert m2.config == m.config
    np.testing.assert_array_equal(m2(tokens).logits, m(tokens).logits)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_save_overwrites_atomically(tmp_path):
    path = str(tmp_path / "m.safetensors")
    sf.Model(small_config(), seed=1).save(path)
    sf.Model(small_config(), seed=2).save(path)
    np.testing.assert_array_equal(sf.Model.load(path).tok_emb.weight,
                                  sf.Model(small_config(), seed=2).tok_emb.weight)


def test_one_dim_tokens_bytes_and_lists(model):
    a = model(np.array([1, 2, 3])).logits
    b = model([1, 2, 3]).logits
    c = model(bytes([1, 2, 3])).logits
    assert a.shape == (1, 3, 50)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_any_integer_dtype_and_layout(model, tokens):
    ref = model(tokens).logits
    for dt in [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]:
        np.testing.assert_array_equal(model(tokens.astype(dt)).logits, ref)
    big = np.zeros((7, 4), dtype=np.int64)
    big[:, :2] = tokens.T
    np.testing.assert_array_equal(model(big[:, :2].T).logits, ref)  # non-contiguous
    ro = tokens.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(model(ro).logits, ref)


def test_embeddings_input_matches_tokens():
    m = sf.Model(small_config(pos="learned"), seed=2)
    toks = np.array([[3, 1, 4, 1, 5]])
    emb = m.tok_emb.weight[toks]  # pos_emb is still added inside
    np.testing.assert_allclose(m(emb).logits, m(toks).logits, atol=1e-6)
    np.testing.assert_allclose(m(emb.astype(np.float64)).logits, m(toks).logits, atol=1e-6)


def test_return_hidden(model, tokens):
    out = model(tokens, return_hidden=True)
    assert out.logits is None and out.hidden_states.shape == (2, 7, 32)
    # tied head: logits = hidden @ tok_emb^T
    np.testing.assert_allclose(out.hidden_states @ model.tok_emb.weight.T, model(tokens).logits,
                               atol=1e-5)


def test_trace_shapes_plain(model, tokens):
    tr = model(tokens, trace=True).trace
    assert len(tr.attention) == 2 and tr.attention[0].shape == (2, 4, 7, 7)
    assert len(tr.hidden) == 3 and all(h.shape == (2, 7, 32) for h in tr.hidden)
    assert tr.rms.shape == (5, 3) and np.isnan(tr.rms[4, 1])
    assert tr.alpha is None and tr.depth_mass is None
    np.testing.assert_allclose(tr.attention[1].sum(-1), 1.0, atol=1e-5)
    # plain pre-norm: hidden[i+1] = hidden[i] + attn_out[i] + mlp_out[i]
    np.testing.assert_allclose(tr.hidden[1], tr.hidden[0] + tr.attn_out[0] + tr.mlp_out[0], atol=1e-6)
    np.testing.assert_allclose(tr.rms[0, 0], np.sqrt(np.mean(tr.hidden[0] ** 2)), rtol=1e-5)


def test_trace_selection(tokens):
    m = sf.Model(small_config(n_layers=4), seed=0)
    tr = m(tokens, trace=sf.TraceOptions(hidden=False, layers=[1, 4])).trace
    assert tr.hidden is None
    assert tr.attention[0] is None and tr.attention[1] is not None and tr.attention[3] is None
    tr2 = m(tokens, trace=["rms"]).trace
    assert tr2.attention is None and tr2.rms is not None
    with pytest.raises(IndexError, match="trace layer 9"):
        m(tokens, trace=sf.TraceOptions(layers=[9]))
    with pytest.raises(ValueError, match="unknown trace kind"):
        m(tokens, trace=["attn"])


def test_trace_off_is_same_result(model, tokens):
    np.testing.assert_array_equal(model(tokens).logits, model(tokens, trace=True).logits)


def test_attnres_trace_and_labels(tokens):
    m = sf.Model(small_config(n_layers=3, residual="attnres_block", attnres_block_size=2), seed=0)
    tr = m(tokens, trace=True).trace
    assert [a.shape[-1] for a in tr.alpha] == [1, 2, 2, 3, 3, 4, 4]
    assert tr.alpha_labels[3] == ["b0", "b1", "b2^1"] and tr.alpha_labels[6] == ["b0", "b1", "b2", "b3"]
    np.testing.assert_allclose(tr.alpha[5], 1 / 4, atol=1e-6)  # zero pseudo-queries: uniform
    assert tr.alpha_matrix.shape == (7, 4) and np.isnan(tr.alpha_matrix[0, 1])


def test_moda_trace(tokens):
    m = sf.Model(small_config(n_layers=3, moda=True, moda_chunk=2), seed=0)
    tr = m(tokens, trace=True).trace
    assert [a.shape[-1] for a in tr.attention] == [7, 7 + 4, 7 + 8]
    np.testing.assert_allclose(tr.depth_mass[2], tr.attention[2][..., 7:].sum(-1), atol=1e-6)
    assert np.all(tr.depth_mass[0] == 0)
    assert tr.depth_mass_mean.shape == (3, 4)


def test_threads_bitwise_identical(tokens):
    m = sf.Model(small_config(d_model=64, n_layers=3, residual="attnres_full", moda=True), seed=0)
    toks = np.random.default_rng(1).integers(0, 50, size=(4, 16))
    outs = [m(toks, n_threads=n).logits for n in (1, 2, 3)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_concurrent_forward_matches_serial():
    # different shapes, several rounds: one call at a time holds the model's kept forward
    # workspace (growing it for a larger call), the others run on their own
    m = sf.Model(small_config(d_model=64, n_layers=3, max_seq_len=32), seed=0)
    inputs = [np.random.default_rng(i).integers(0, 50, size=(1 + i % 3, 8 * (1 + i % 4))) for i in range(8)]
    serial = [m(x).logits for x in inputs]
    m.release_memory()
    results = [[None] * 8 for _ in range(5)]

    def work(i):
        for r in range(5):
            results[r][i] = m(inputs[i]).logits

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rnd in results:
        for a, b in zip(serial, rnd):
            np.testing.assert_array_equal(a, b)


def test_forward_workspace_reuse_does_not_leak_between_calls():
    """The forward workspace is kept between calls (grown for a larger call, reused by smaller
    ones, dropped by release_memory): a call's result must not depend on what ran before."""
    cfg = small_config(d_model=64, n_layers=3, moda=True, max_seq_len=32)
    m = sf.Model(cfg, seed=0)
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 50, size=s) for s in [(1, 4), (3, 16), (2, 8), (4, 32), (1, 1), (2, 5)]]
    fresh = [sf.Model(cfg, seed=0)(x).logits for x in xs]  # each on a model that never ran before
    for rnd in range(3):
        for x, ref in zip(xs, fresh):
            np.testing.assert_array_equal(m(x).logits, ref)
            if rnd == 1:
                m(x, trace=True)  # a traced call (another workspace layout) in between
        if rnd == 0:
            m.release_memory()


def test_set_num_threads_roundtrip():
    old = sf.get_num_threads()
    sf.set_num_threads(1)
    assert sf.get_num_threads() == 1
    sf.set_num_threads(0)
    assert sf.get_num_threads() >= 1
    with pytest.raises(ValueError):
        sf.set_num_threads(-1)
    sf.set_num_threads(old if old else 0)


def test_matmul_kernels_give_the_same_bits():
    """Every register tile (AVX-512 8x32, AVX2 6x16, portable C) computes each product element
    as the same chain of fused multiply-adds in ascending k, so a forward, a train step and the
    forward after it give identical bits whichever tile the CPU (or STACKFORMER_NO_AVX512 /
    STACKFORMER_NO_AVX2) selects. Shapes with edge rows, lone and partial panels."""
    code = ("import hashlib, numpy as np, stackformer as sf\n"
            "m = sf.Model(sf.Config(vocab_size=61, d_model=48, n_heads=3, n_layers=2, max_seq_len=40), seed=3)\n"
            "x = np.random.default_rng(1).integers(0, 61, (3, 37))\n"
            "h = hashlib.sha256(m(x).logits.tobytes())\n"
            "h.update(np.float64(m.train_step(x, np.roll(x, -1, 1), lr=1e-2)).tobytes())\n"
            "h.update(m(x).logits.tobytes())\n"
            "print(sf.matmul_kernel(), h.hexdigest())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKFORMER_NO_AVX")}
    got = []
    for flags in ({}, {"STACKFORMER_NO_AVX512": "1"}, {"STACKFORMER_NO_AVX2": "1"}):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **flags}, capture_output=True, text=True,
                             check=True)
        got.append(out.stdout.split())
    (k_default, h_default), (k_no512, h_no512), (k_generic, h_generic) = got
    assert k_default in ("avx512", "avx2", "generic") and k_no512 in ("avx2", "generic") and k_generic == "generic"
    assert sf.matmul_kernel() in ("avx512", "avx2", "generic")
    assert h_default == h_no512 == h_generic


def test_repr_and_attribute_errors(model):
    assert "plain" in repr(model) and "params" in repr(model)
    with pytest.raises(AttributeError, match="no parameter or submodule 'q'"):
        model.layers[0].attn.q
    with pytest.raises(AttributeError):
        model.nonexistent


def test_config_json_roundtrip():
    c = small_config(residual="attnres_full", moda=True, pos="rope")
    assert sf.Config.from_json(c.to_json()) == c


def test_demo_runs(tmp_path, capsys):
    from stackformer.__main__ import main
    assert main(["demo", "--layers", "2", "--deep", "3", "--out", str(tmp_path), "--no-png"]) == 0
    text = capsys.readouterr().out
    assert "Stacking blocks" in text and "attnres_full" in text


def test_misaligned_and_strided_inputs(model, tokens):
    ref = model(tokens).logits
    raw = np.zeros(tokens.size * 8 + 1, dtype=np.uint8)
    mis = raw[1:].view(np.int64)[: tokens.size].reshape(tokens.shape)  # not 8-byte aligned
    mis[...] = tokens
    assert not mis.flags.aligned
    np.testing.assert_array_equal(model(mis).logits, ref)
    emb = model.tok_emb.weight[tokens].astype(np.float32)
    rawf = np.zeros(emb.size * 4 + 2, dtype=np.uint8)
    misf = rawf[2:].view(np.float32)[: emb.size].reshape(emb.shape)
    misf[...] = emb
    np.testing.assert_array_equal(model(misf).logits, model(emb).logits)
    wide = np.zeros((2, 7, 64), np.float32)
    wide[:, :, ::2] = emb  # every other column: a strided view
    np.testing.assert_array_equal(model(wide[:, :, ::2]).logits, model(emb).logits)
    assert model.forward_backward(mis, mis) == model.forward_backward(tokens, tokens)


def test_import_sets_openmp_wait_defaults_only_when_unset():
    """import stackformer makes OpenMP waits sleep after a short spin, unless the user chose a
    wait policy (then neither variable is touched)."""
    code = "import os, stackformer; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "1000"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ACTIVE", "None"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "5"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "5"]
