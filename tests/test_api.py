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


# -- wrong argument types across the public API ------------------------------------------------
# Every public call, every argument, a handful of wrong kinds of value: each must raise
# TypeError or ValueError whose message names the argument (never an AttributeError or a bare
# "invalid literal for int()" from inside), and leave the model untouched.
import copy as _copy
import re as _re

import importlib as _importlib

from stackformer import checkpoint as _ckpt, compare as _compare, data as _data, gpt2 as _gpt2
_train = _importlib.import_module("stackformer.train")  # sf.train is the function

_BAD = {"str": "oops", "none": None, "obj": object(), "float": 2.5, "list": ["a"], "dict": {},
        "int": 42, "nan": float("nan")}
_SWEEP_MODEL = sf.Model(sf.Config(vocab_size=256, d_model=16, n_heads=2, n_layers=2, max_seq_len=16), seed=0)
_SWEEP_CORPUS = sf.Corpus(np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint8))
_IDS = np.arange(8)[None, :]
_XY = (np.arange(8)[None, :], np.arange(1, 9)[None, :])


def _sweep_specs(tmp):
    """(label, function, good keyword arguments, {argument: bad kinds}, {argument: regex})."""
    M, C = _SWEEP_MODEL, _SWEEP_CORPUS
    nums = ["str", "none", "obj", "list"]
    ints = ["str", "none", "obj", "float", "list"]
    flags = ["str", "none", "obj", "float", "list"]
    paths = ["none", "obj", "float", "list", "dict"]
    small = dict(n_layers=1, d_model=8, n_heads=2, seq_len=8)
    return [
        ("Model", sf.Model, dict(config=M.config, seed=0), {"config": ["str", "none", "obj", "dict"],
                                                             "seed": ints}, {}),
        ("Model.__call__", M.__call__, dict(x=_IDS, trace=False, key_padding_mask=None, return_hidden=False,
                                            attnres_two_phase=True, n_threads=0),
         {"x": ["none", "obj", "float", "list", "dict"], "trace": ["obj", "float", "list", "dict", "int"],
          "key_padding_mask": ["str", "obj", "float", "list", "dict"], "return_hidden": flags,
          "attnres_two_phase": flags, "n_threads": ints}, {"x": r"\bx\b|\binput\b"}),
        ("Model(trace=TraceOptions)", lambda layers="ok", attention=True: M(_IDS, trace=sf.TraceOptions(
            layers=None if layers == "ok" else layers, attention=attention)), {},
         {"layers": ["str", "obj", "float", "list"], "attention": ["str", "none", "obj", "list"]}, {}),
        ("Model.forward_backward", M.forward_backward,
         dict(inputs=_XY[0], targets=_XY[1], key_padding_mask=None, ignore_index=-100, checkpoint=False,
              n_threads=0, dropout_seed=0),
         {"inputs": ["none", "obj", "float", "dict"], "targets": ["none", "obj", "float", "dict"],
          "ignore_index": ints, "checkpoint": flags, "n_threads": ints, "dropout_seed": ints}, {}),
        ("Model.optimizer_step", M.optimizer_step, dict(lr=0.0, betas=(0.9, 0.95), eps=1e-8,
                                                        weight_decay=0.0, clip_norm=1.0),
         {"lr": nums + ["nan"], "betas": ["str", "none", "obj", "float", "list"], "eps": nums,
          "weight_decay": nums, "clip_norm": nums}, {}),
        ("Model.train_step", M.train_step, dict(inputs=_XY[0], targets=_XY[1], lr=0.0),
         {"lr": nums, "inputs": ["none", "obj"]}, {}),
        ("Model.train_memory_bytes", M.train_memory_bytes, dict(batch_size=2, seq_len=8, checkpoint=False),
         {"batch_size": ints, "seq_len": ints, "checkpoint": flags}, {}),
        ("Model.generate", M.generate, dict(prompt=_IDS[0], max_new_tokens=2, temperature=1.0, top_k=None,
                                            seed=0, return_text=False),
         {"prompt": ["none", "obj", "float", "list", "dict"], "max_new_tokens": ints,
          "temperature": nums + ["nan"], "top_k": ["str", "obj", "float", "list"],
          "seed": ["str", "obj", "float", "list"], "return_text": flags}, {}),
        ("Model.load_state_dict", M.load_state_dict, dict(state_dict=M.state_dict(), strict=True),
         {"state_dict": ["str", "none", "obj", "float", "list"], "strict": ["str", "none", "obj", "list"]}, {}),
        ("Model.load_optimizer_state", M.load_optimizer_state, dict(state=M.optimizer_state()),
         {"state": ["str", "none", "obj", "float", "list"]}, {}),
        ("Model.save", M.save, dict(path=str(tmp / "m.safetensors"), optimizer=False, extra=None),
         {"path": paths, "optimizer": flags, "extra": ["obj"]}, {}),
        ("Model.load", sf.Model.load, dict(path=str(tmp / "none.safetensors")), {"path": paths}, {}),
        ("Model.no_decay", M.no_decay, dict(name="tok_emb.weight"), {"name": ["none", "obj", "float", "list"]}, {}),
        ("ParamTree leaf", lambda value=np.zeros((16, 16), np.float32): setattr(M.layers[0].attn.q_proj, "weight", value),
         {}, {"value": ["str", "none", "obj", "float", "list"]}, {"value": r"q_proj\.weight"}),
        ("Config", sf.Config, dict(), {
            "vocab_size": ints, "d_model": ints, "n_layers": ints, "n_kv_heads": ["str", "obj", "float"],
            "causal": ["str", "none", "float", "list"], "pos": ["none", "obj", "float", "list"],
            "residual": ["none", "obj", "list"], "activation": ["none", "list"], "norm": ["list", "obj"],
            "norm_eps": ["str", "none", "list"], "attn_dropout": ["str", "none", "list", "nan"],
            "rope_theta": ["str", "none", "list"]}, {}),
        ("Config.from_dict", sf.Config.from_dict, dict(d={}), {"d": ["str", "none", "obj", "float", "list"]},
         {"d": "config"}),
        ("Config.from_json", sf.Config.from_json, dict(s="{}"), {"s": ["none", "obj", "float", "list", "dict"]},
         {"s": "config"}),
        ("Corpus", sf.Corpus, dict(data="abc " * 500, val_fraction=0.5, name="t"),
         {"data": ["none", "obj", "float", "list", "dict"], "val_fraction": nums + ["nan"],
          "name": ["none", "obj", "float", "list"]}, {}),
        ("Corpus.from_file", sf.Corpus.from_file, dict(path=__file__, val_fraction=0.1, max_bytes=None),
         {"path": paths, "val_fraction": nums, "max_bytes": ["str", "obj", "float", "list"]}, {}),
        ("Corpus.batch", C.batch, dict(batch_size=2, seq_len=8, rng=np.random.default_rng(0), split="train"),
         {"batch_size": ints, "seq_len": ints, "rng": ["str", "none", "obj", "float", "list", "int"],
          "split": ["none", "obj", "float", "list"]}, {}),
        ("Corpus.unigram_loss", C.unigram_loss, dict(split="val"), {"split": ["none", "obj", "list"]}, {}),
        ("default_corpus", sf.default_corpus, dict(max_bytes=10_000, val_fraction=0.1),
         {"max_bytes": ints, "val_fraction": nums}, {}),
        ("data.encode", _data.encode, dict(text="a"), {"text": ["none", "obj", "float", "list", "dict"]}, {}),
        ("data.decode", _data.decode, dict(ids=[1, 2]), {"ids": ["str", "none", "obj", "float", "dict"]}, {}),
        ("data.mask_tokens", _data.mask_tokens, dict(inputs=_IDS, rng=np.random.default_rng(0), mask_prob=0.5),
         {"inputs": ["str", "none", "obj"], "rng": ["str", "none", "obj", "int"], "mask_prob": nums}, {}),
        ("train", sf.train, dict(model=M, data=C, steps=1, batch_size=1, lr=0.0, seq_len=8, progress=False),
         {"model": ["str", "none", "obj", "dict"], "data": ["none", "obj", "float", "dict"],
          "steps": ints, "batch_size": ints, "lr": nums, "seq_len": ["str", "obj", "float", "list"],
          "warmup": ["str", "obj", "float"], "min_lr": ["str", "obj"], "weight_decay": nums,
          "clip_norm": nums, "betas": ["str", "none", "obj", "float"], "eval_every": ["str", "obj", "float"],
          "eval_batches": ints, "seed": ints, "checkpoint": flags, "progress": flags,
          "callback": ["str", "obj", "float", "list"], "desc": ["none", "obj", "float", "list"]}, {}),
        ("lr_schedule", sf.lr_schedule, dict(step=0, lr=1e-3, steps=10, warmup=0, min_lr=0.0),
         {"step": ints, "lr": nums, "steps": ints, "warmup": ints, "min_lr": nums}, {}),
        ("train.evaluate", _train.evaluate, dict(model=M, batches=[_XY]),
         {"model": ["str", "none", "obj"], "batches": ["str", "none", "obj", "float"]}, {}),
        ("train.layer_grad_norms", _train.layer_grad_norms, dict(model=M), {"model": ["str", "none", "obj"]}, {}),
        ("compare.stack_config", _compare.stack_config, dict(name="plain", n_layers=1, d_model=8, n_heads=2,
                                                             seq_len=8, block_size=2),
         {"name": ["none", "obj", "float", "list"], "n_layers": ints, "d_model": ints, "n_heads": ints,
          "seq_len": ints, "block_size": ints}, {}),
        ("compare.run_stack", _compare.run_stack, dict(name="plain", corpus=C, batch_size=1, steps=1,
                                                       eval_batches=1, progress=False, **small),
         {"name": ["none", "obj", "list"], "corpus": ["str", "none", "obj", "float"], "steps": ints,
          "seed": ints, "lr": nums, "eval_every": ["str", "obj", "float"], "progress": flags}, {}),
        ("compare.format_table", _compare.format_table, dict(results=[], unigram=1.0),
         {"results": ["str", "none", "obj", "float", "list"], "unigram": nums}, {}),
        ("checkpoint.read_checkpoint", _ckpt.read_checkpoint, dict(path=str(tmp / "x")), {"path": paths}, {}),
        ("checkpoint.parse_checkpoint", _ckpt.parse_checkpoint, dict(data=b"x" * 16),
         {"data": ["str", "none", "obj", "float", "list"]}, {}),
        ("checkpoint.save_model", _ckpt.save_model, dict(model=M, path=str(tmp / "y.safetensors")),
         {"model": ["str", "none", "obj"], "path": paths}, {}),
        ("set_num_threads", lambda n=0: sf.set_num_threads(n), {}, {"n": ints}, {}),
        ("gpt2.load_gpt2_safetensors", _gpt2.load_gpt2_safetensors, dict(path=str(tmp / "g")), {"path": paths}, {}),
        ("gpt2.from_gpt2_state_dict", _gpt2.from_gpt2_state_dict, dict(sd={}),
         {"sd": ["str", "none", "obj", "float", "list"]}, {"sd": "state dict"}),
        ("use_blas", sf.use_blas, dict(library="/nonexistent/libblas.so"), {"library": ["obj", "float", "list"]}, {}),
    ]


def _sweep_cases():
    import pathlib
    out = []
    for label, fn, good, bad, regex in _sweep_specs(pathlib.Path("/nonexistent-dir")):
        for arg, kinds in bad.items():
            for kind in kinds:
                out.append(pytest.param(label, arg, kind, id=f"{label}-{arg}-{kind}"))
    return out


@pytest.mark.parametrize("label,arg,kind", _sweep_cases())
def test_wrong_argument_types_name_the_argument(label, arg, kind, tmp_path):
    spec = {s[0]: s for s in _sweep_specs(tmp_path)}[label]
    _, fn, good, _, regex = spec
    kwargs = dict(good)
    kwargs[arg] = _copy.copy(_BAD[kind])
    M = _SWEEP_MODEL
    before, step = M.flat_params.copy(), M.step
    with pytest.raises((TypeError, ValueError)) as e:
        fn(**kwargs)
    assert type(e.value) in (TypeError, ValueError), f"{type(e.value).__name__}: {e.value}"
    assert _re.search(regex.get(arg, rf"(?<![A-Za-z_]){_re.escape(arg)}(?![A-Za-z_])"), str(e.value)), \
        f"{label}({arg}={_BAD[kind]!r}) raised {type(e.value).__name__}: {e.value!s} (argument not named)"
    np.testing.assert_array_equal(M.flat_params, before)
    assert M.step == step


@pytest.mark.parametrize("arg,value", [("model", "oops"), ("model", None), ("dtype", "float32"),
                                       ("dtype", "oops"), ("module", None), ("seed", "x")])
def test_torch_helpers_name_wrong_arguments(arg, value):
    torch = pytest.importorskip("torch")
    from stackformer.torch import TorchModel, from_torch, to_torch
    kw = {"model": _SWEEP_MODEL, "dtype": torch.float32}
    if arg in ("module", "seed"):
        args = dict(module=TorchModel(_SWEEP_MODEL.config), seed=0)
        args[arg] = value
        call = lambda: from_torch(**args)  # noqa: E731
    else:
        kw[arg] = value
        call = lambda: to_torch(**kw)  # noqa: E731
    with pytest.raises((TypeError, ValueError)) as e:
        call()
    assert arg in str(e.value) or (arg == "module" and "TorchModel" in str(e.value))
    with pytest.raises(TypeError, match="config"):
        TorchModel("oops")


def test_trace_properties_without_recordings_say_what_is_missing():
    tr = sf.Trace()
    for prop, what in (("rms_table", "rms"), ("alpha_matrix", "alpha"), ("depth_mass_mean", "depth_mass")):
        with pytest.raises(ValueError, match=what):
            getattr(tr, prop)


# -- text in, text out (byte-level models) -------------------------------------------------------
def test_generate_accepts_text_and_returns_text():
    m = sf.Model(sf.Config(vocab_size=256, d_model=16, n_heads=2, n_layers=1, max_seq_len=32), seed=0)
    ids = m.generate(sf.data.encode("héllo"), 8, temperature=0.8, seed=3)
    np.testing.assert_array_equal(m.generate("héllo", 8, temperature=0.8, seed=3), ids)
    np.testing.assert_array_equal(m.generate("héllo".encode(), 8, temperature=0.8, seed=3), ids)
    text = m.generate("héllo", 8, temperature=0.8, seed=3, return_text=True)
    assert isinstance(text, str) and text.startswith("héllo")
    assert text == ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
    batch = m.generate(np.stack([ids[:6], ids[:6]]), 4, temperature=0, return_text=True)
    assert isinstance(batch, list) and len(batch) == 2 and batch[0] == batch[1]
    # a str forward pass is its UTF-8 bytes
    np.testing.assert_array_equal(m("héllo").logits, m(sf.data.encode("héllo")).logits)


def test_text_needs_a_byte_level_model():
    m = sf.Model(small_config(), seed=0)   # vocab_size 50
    with pytest.raises(TypeError, match="prompt.*byte-level"):
        m.generate("hi", 2)
    with pytest.raises(ValueError, match="return_text.*byte-level"):
        m.generate(np.array([1, 2]), 2, return_text=True)


def test_return_text_marks_ids_beyond_bytes():
    m = sf.Model(sf.Config(vocab_size=300, d_model=16, n_heads=2, n_layers=1, max_seq_len=16), seed=0)
    m.tok_emb.weight[:] = 0.0
    m.tok_emb.weight[299] = 1.0      # tied head: logit of 299 = sum(final_norm(h)) = sum(bias)
    m.final_norm.bias[:] = 1.0       # = 16, every other logit 0: greedy decoding picks 299
    out = m.generate("ab", 3, temperature=0)
    assert list(out[2:]) == [299, 299, 299]
    assert m.generate("ab", 3, temperature=0, return_text=True) == "ab" + "\ufffd" * 3


# -- validation-split warnings --------------------------------------------------------------------
import warnings as _warnings


def test_repeated_text_warns_that_validation_overlaps_training():
    with pytest.warns(sf.DataWarning, match="verbatim in the training split"):
        c = sf.Corpus("hello world " * 1000)
    assert any("verbatim" in p for p in c.data_problems())
    m = sf.Model(sf.Config(vocab_size=256, d_model=16, n_heads=2, n_layers=1, max_seq_len=16), seed=0)
    with _warnings.catch_warnings(record=True) as w:
        _warnings.simplefilter("always")
        sf.train(m, "hello world " * 1000, steps=2, batch_size=2, progress=False)
    got = [x for x in w if issubclass(x.category, sf.DataWarning)]
    assert got and "verbatim" in str(got[0].message)
    assert got[0].filename == __file__   # points at the caller's line, not inside stackformer


def test_tiny_validation_split_warns():
    with pytest.warns(sf.DataWarning, match="only 50 tokens"):
        sf.Corpus(np.random.default_rng(0).integers(0, 256, 500).astype(np.uint8), val_fraction=0.1)
    m = sf.Model(sf.Config(vocab_size=256, d_model=16, n_heads=2, n_layers=1, max_seq_len=64), seed=0)
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", sf.DataWarning)
        c = sf.Corpus(np.random.default_rng(0).integers(0, 256, 500).astype(np.uint8), val_fraction=0.1)
    with pytest.warns(sf.DataWarning, match="no validation loss"):
        h = sf.train(m, c, steps=1, batch_size=1, progress=False)
    assert h.val_loss == []


def test_default_corpus_and_its_training_are_silent():
    with _warnings.catch_warnings():
        _warnings.simplefilter("error", sf.DataWarning)
        corpus = sf.default_corpus()
        assert corpus.data_problems() == []
        sf.default_corpus(max_bytes=200_000)
        sf.Corpus("no validation at all " * 100, val_fraction=0.0)
        m = sf.Model(sf.Config(vocab_size=256, d_model=16, n_heads=2, n_layers=1, max_seq_len=16), seed=0)
        sf.train(m, corpus, steps=2, batch_size=2, progress=False)
