"""Model.run_with_cache and ActivationCache (issue 23): TransformerLens hook names and shapes for
every wiring, the contents against the float64 reference (tests/reference.py) and the torch
mirror, which residual identities hold under which wiring (and that the others really fail),
and the error messages."""
import os
import sys

import numpy as np
import pytest

import stackformer as sf
from conftest import WIRINGS_AND_MODA, perturbed, small_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as R  # noqa: E402

B, T = 2, 7


def toks(V=50, seed=0, B=B, T=T):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def per_block_names(i, cfg):
    p = f"blocks.{i}."
    names = [p + s for s in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_q",
                             "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z",
                             "hook_attn_out", "hook_mlp_out", "mlp.hook_post")]
    if cfg.moda:
        names.append(p + "attn.hook_depth_mass")
        if i < cfg.n_layers - 1:  # the depth slots this block writes (the last writes none)
            subs = ("attn",) if cfg.moda_depth_kv == "attn" else ("attn", "mlp")
            names += [p + f"{s}.hook_depth_{kv}" for s in subs for kv in "kv"]
    if cfg.residual != "plain":
        names.append(p + "attn_res.hook_weights")
        if cfg.residual != "denseformer":
            names.append(p + "mlp_res.hook_weights")
    return names


# ------------------------------------------------------------------------------------------
# names, shapes, aliasing, read-only
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wiring", list(WIRINGS_AND_MODA))
def test_names_and_shapes(wiring):
    cfg = small_config(n_layers=3, n_kv_heads=2, **WIRINGS_AND_MODA[wiring])
    m = perturbed(cfg)
    x = toks()
    logits, cache = m.run_with_cache(x)
    np.testing.assert_array_equal(logits, m(x).logits)  # recording changes nothing
    n, H, Hkv, dh, d, F = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads, cfg.d_model, cfg.d_ff
    want = {"hook_embed", "ln_final.hook_normalized"}
    for i in range(n):
        want |= set(per_block_names(i, cfg))
    if cfg.residual.startswith("attnres") or cfg.residual == "denseformer":
        want.add("output_res.hook_weights")
    assert set(cache.keys()) == want
    assert len(cache) == len(want) and all(k in cache for k in want)
    for i in range(n):
        p = f"blocks.{i}."
        for s in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            assert cache[p + s].shape == (B, T, d), s
        assert cache[p + "attn.hook_q"].shape == (B, T, H, dh)
        assert cache[p + "attn.hook_z"].shape == (B, T, H, dh)
        assert cache[p + "attn.hook_k"].shape == (B, T, Hkv, dh)
        assert cache[p + "attn.hook_v"].shape == (B, T, Hkv, dh)
        assert cache[p + "mlp.hook_post"].shape == (B, T, F)
        pat = cache[p + "attn.hook_pattern"]
        depth = (2 * i * cfg.moda_chunk) if cfg.moda else 0
        assert pat.shape == (B, H, T, T + depth)
        np.testing.assert_allclose(pat.sum(-1), 1.0, atol=1e-5)
        seq, dep = cache.pattern_split(i)
        assert seq.shape == (B, H, T, T) and dep.shape == (B, H, T, depth)
        if cfg.moda:
            np.testing.assert_allclose(cache[p + "attn.hook_depth_mass"], dep.sum(-1), atol=1e-5)
            if i < n - 1:
                assert cache[p + "attn.hook_depth_k"].shape == (B, T, Hkv, dh)
                assert cache[p + "mlp.hook_depth_v"].shape == (B, T, Hkv, dh)
        # TransformerLens: resid_post of block i is resid_pre of block i+1 (the same recording)
        if i + 1 < n:
            assert cache[p + "hook_resid_post"] is cache[f"blocks.{i + 1}.hook_resid_pre"]
    for name in [k for k in cache if k.endswith("hook_weights")]:
        w = cache[name]
        assert w.shape[:2] == (B, T) and w.shape[2] == len(cache.hook_sources[name]) == len(cache.source_hooks(name))
        if cfg.residual.startswith("attnres"):  # a softmax (DWA, HC, mHC weights are not)
            np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert cache["ln_final.hook_normalized"].shape == (B, T, d)
    for v in cache.values():
        assert not v.flags.writeable
    with pytest.raises(ValueError):
        cache["hook_embed"][0, 0, 0] = 1.0
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["resid_pre", 2] is cache["blocks.2.hook_resid_pre"]
    assert cache["post", 0] is cache["blocks.0.mlp.hook_post"]


def test_source_labels():
    cfg = small_config(n_layers=2, residual="attnres_full")
    _, c = sf.Model(cfg).run_with_cache(toks())
    assert c.hook_sources["blocks.1.mlp_res.hook_weights"] == [
        "hook_embed", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.1.hook_attn_out"]
    cfg = small_config(n_layers=3, residual="attnres_block", attnres_block_size=4)
    _, c = sf.Model(cfg).run_with_cache(toks())
    # sublayer 5 (block 2's MLP) reads b0, b1 = sublayers 0..3 and the partial sum of sublayer 4
    assert c.source_hooks("blocks.2.mlp_res.hook_weights") == [
        ("hook_embed",),
        ("blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"),
        ("blocks.2.hook_attn_out",)]
    assert c.hook_sources["blocks.2.mlp_res.hook_weights"][1] == \
        "blocks.0.hook_attn_out + ... + blocks.1.hook_mlp_out (4 terms)"
    # the output reads b0, b1 and the short last block b2 = sublayers 4, 5
    assert c.source_hooks("output_res.hook_weights")[2] == ("blocks.2.hook_attn_out", "blocks.2.hook_mlp_out")
    cfg = small_config(n_layers=2, residual="hyper_connections", hc_expansion=3)
    _, c = sf.Model(cfg).run_with_cache(toks())
    assert c.hook_sources["blocks.0.attn_res.hook_weights"] == ["copy1", "copy2", "copy3"]
    assert c.source_hooks("blocks.0.attn_res.hook_weights") == [None, None, None]


def test_layers_selection():
    cfg = small_config(n_layers=4, residual="attnres_block", attnres_block_size=2, moda=True)
    m = perturbed(cfg)
    x = toks()
    _, full = m.run_with_cache(x)
    _, part = m.run_with_cache(x, layers=[1, 3])
    assert part.layers == [1, 3]
    assert not any(k.startswith(("blocks.0.", "blocks.2.")) for k in part)
    for k in part:
        np.testing.assert_array_equal(part[k], full[k], err_msg=k)
    assert "blocks.3.hook_resid_post" in part and "blocks.1.hook_resid_post" in part


# ------------------------------------------------------------------------------------------
# contents against the float64 reference (plain; q/k before RoPE; post-norm too)
# ------------------------------------------------------------------------------------------

REF_CONFIGS = {
    "plain pre layernorm gelu": dict(),
    "plain post rmsnorm rope swiglu gqa": dict(norm_position="post", norm="rmsnorm", pos="rope",
                                               activation="swiglu", n_kv_heads=2, bias=False),
    "plain sinusoidal untied relu": dict(pos="sinusoidal", tie_embeddings=False, activation="relu"),
}


@pytest.mark.parametrize("name", list(REF_CONFIGS))
def test_plain_against_float64_reference(name):
    kw = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=3, max_seq_len=16, **REF_CONFIGS[name])
    cfg, rcfg = sf.Config(**kw), R.Config(**kw)
    params = {k: v.astype(np.float32) for k, v in R.init_params(rcfg, np.random.default_rng(3)).items()}
    model = sf.Model(cfg)
    model.load_state_dict(params)
    x = toks(seed=4)
    logits, cache = model.run_with_cache(x)
    ref = R.forward(rcfg, params, tokens=x)
    M = R._Model(rcfg, params)
    pre = rcfg.norm_position == "pre"
    H, Hkv, dh = rcfg.n_heads, rcfg.n_kv_heads, rcfg.d_model // rcfg.n_heads

    def close(hook, want, tol=2e-4):
        got = cache[hook].astype(np.float64)
        assert got.shape == want.shape, (hook, got.shape, want.shape)
        err = np.abs(got - want).max()
        assert err <= tol * max(1.0, np.abs(want).max()), f"{hook}: max abs error {err:.2e}"

    close("hook_embed", M.embed(x, None))
    for i in range(rcfg.n_layers):
        p, lp = f"blocks.{i}.", f"layers.{i}."
        x_in = ref["hidden"][i]
        a, mo = ref["attn_out"][i], ref["mlp_out"][i]
        mid = x_in + a if pre else M.norm(lp + "attn_norm", x_in + a)
        close(p + "hook_resid_pre", x_in)
        close(p + "hook_attn_out", a)
        close(p + "hook_resid_mid", mid)
        close(p + "hook_mlp_out", mo)
        close(p + "hook_resid_post", ref["hidden"][i + 1])
        close(p + "attn.hook_pattern", ref["attention"][i])
        u = M.norm(lp + "attn_norm", x_in) if pre else x_in
        q = M.lin(lp + "attn.q_proj", u).reshape(B, T, H, dh)       # before RoPE
        k = M.lin(lp + "attn.k_proj", u).reshape(B, T, Hkv, dh)
        v = M.lin(lp + "attn.v_proj", u).reshape(B, T, Hkv, dh)
        close(p + "attn.hook_q", q)
        close(p + "attn.hook_k", k)
        close(p + "attn.hook_v", v)
        vh = np.repeat(v.transpose(0, 2, 1, 3), H // Hkv, axis=1)    # (B, H, T, dh)
        z = (ref["attention"][i] @ vh).transpose(0, 2, 1, 3)         # (B, T, H, dh)
        close(p + "attn.hook_z", z)
        um = M.norm(lp + "mlp_norm", mid) if pre else mid
        if rcfg.activation == "swiglu":
            post = R.silu(M.lin(lp + "mlp.gate_proj", um)) * M.lin(lp + "mlp.up_proj", um)
        else:
            post = {"gelu": R.gelu, "relu": R.relu}[rcfg.activation](M.lin(lp + "mlp.up_proj", um))
        close(p + "mlp.hook_post", post)
        # and the MLP's output is down_proj of it: the chain is complete
        close(p + "hook_mlp_out", M.lin(lp + "mlp.down_proj", post))
    close("ln_final.hook_normalized", ref["final_hidden"])
    np.testing.assert_allclose(logits, ref["logits"], atol=2e-4)


# ------------------------------------------------------------------------------------------
# against the torch mirror, every wiring (pre-norm): module hooks see the same activations
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wiring", list(WIRINGS_AND_MODA))
def test_against_torch_mirror(wiring):
    torch = pytest.importorskip("torch")
    from stackformer.torch import TorchModel
    cfg = small_config(n_layers=3, n_kv_heads=2, pos="rope", **WIRINGS_AND_MODA[wiring])
    m = perturbed(cfg, seed=2)
    x = toks(seed=5)
    _, cache = m.run_with_cache(x)
    tm = TorchModel(cfg).double()
    tm.load_state_dict({k: v.astype(np.float64) for k, v in m.state_dict().items()})
    seen = {}

    def grab(name, what):
        def hook(mod, inp, out):
            seen[name] = (inp[0] if what == "in" else out).detach().numpy()
        return hook

    H, Hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads
    for i, blk in enumerate(tm.layers):
        p = f"blocks.{i}."
        blk.attn_norm.register_forward_hook(grab(p + "hook_resid_pre", "in"))
        blk.mlp_norm.register_forward_hook(grab(p + "hook_resid_mid", "in"))
        blk.attn.q_proj.register_forward_hook(grab(p + "attn.hook_q", "out"))
        blk.attn.k_proj.register_forward_hook(grab(p + "attn.hook_k", "out"))
        blk.attn.v_proj.register_forward_hook(grab(p + "attn.hook_v", "out"))
        blk.attn.o_proj.register_forward_hook(grab(p + "attn.hook_z", "in"))
        blk.attn.o_proj.register_forward_hook(grab(p + "hook_attn_out", "out"))
        blk.mlp.down_proj.register_forward_hook(grab(p + "mlp.hook_post", "in"))
        blk.mlp.down_proj.register_forward_hook(grab(p + "hook_mlp_out", "out"))
    tm.final_norm.register_forward_hook(grab("ln_final.hook_normalized", "out"))
    with torch.no_grad():
        tm(torch.as_tensor(x))
    assert len(seen) == 9 * cfg.n_layers + 1
    for name, want in seen.items():
        got = cache[name].astype(np.float64)
        want = want.reshape(got.shape)
        err = np.abs(got - want).max()
        assert err <= 2e-4 * max(1.0, np.abs(want).max()), f"{wiring}: {name}: max abs error {err:.2e}"


# ------------------------------------------------------------------------------------------
# residual identities: which hold where (docs/API.md "Hooks"), and the others really fail
# ------------------------------------------------------------------------------------------

# per wiring (pre-norm): does resid_mid = resid_pre + attn_out hold, resid_post = resid_mid +
# mlp_out, and is every read a weighted sum of the sources named in source_hooks?
IDENTITIES = {
    "plain": (True, True, False),
    "attnres_full": (False, False, True),
    "attnres_block": (False, False, True),
    "denseformer": (True, False, True),
    "denseformer_dilated": (True, "some", True),  # period 2: block 0 has no DWA
    "hyper_connections": (False, False, False),
    "hyper_connections_static": (False, False, False),
    "hyper_connections_dynamic": (False, False, False),
    "mhc": (False, False, False),
    "moda": (True, True, False),
    "attnres_block+moda": (False, False, True),
    "denseformer+moda": (True, False, True),
    "hyper_connections+moda": (False, False, False),
    "mhc+moda": (False, False, False),
}


def _rel_err(got, want):
    return float(np.abs(got.astype(np.float64) - want).max() / max(1.0, np.abs(want).max()))


def _mixed(cache, weights_name):
    """sum_s w[..., s] * source_s, each source the sum of its hooks (float64)."""
    w = cache[weights_name].astype(np.float64)
    out = 0.0
    for s, hooks in enumerate(cache.source_hooks(weights_name)):
        src = sum(cache[h].astype(np.float64) for h in hooks)
        out = out + w[..., s:s + 1] * src
    return out


def test_identity_table_covers_every_wiring():
    assert set(IDENTITIES) == set(WIRINGS_AND_MODA)


@pytest.mark.parametrize("wiring", list(WIRINGS_AND_MODA))
def test_residual_identities(wiring):
    mid_sum, post_sum, mix = IDENTITIES[wiring]
    cfg = small_config(n_layers=3, **WIRINGS_AND_MODA[wiring])
    m = perturbed(cfg, seed=1)
    _, c = m.run_with_cache(toks(seed=2))
    n = cfg.n_layers
    mid_err = [_rel_err(c[f"blocks.{i}.hook_resid_mid"],
                        c[f"blocks.{i}.hook_resid_pre"].astype(np.float64) + c[f"blocks.{i}.hook_attn_out"])
               for i in range(n)]
    post_err = [_rel_err(c[f"blocks.{i}.hook_resid_post"],
                         c[f"blocks.{i}.hook_resid_mid"].astype(np.float64) + c[f"blocks.{i}.hook_mlp_out"])
                for i in range(n)]
    for errs, holds, what in ((mid_err, mid_sum, "resid_mid = resid_pre + attn_out"),
                              (post_err, post_sum, "resid_post = resid_mid + mlp_out")):
        if holds is True:
            assert max(errs) < 1e-6, (what, errs)
        elif holds == "some":
            assert min(errs) < 1e-6 and max(errs) > 1e-2, (what, errs)
        else:
            assert min(errs) > 1e-2, (what, errs)   # fails clearly in every block
    if cfg.residual == "plain":  # bitwise: the C core adds in float32 exactly like NumPy
        for i in range(n):
            p = f"blocks.{i}."
            np.testing.assert_array_equal(c[p + "hook_resid_mid"], c[p + "hook_resid_pre"] + c[p + "hook_attn_out"])
            np.testing.assert_array_equal(c[p + "hook_resid_post"], c[p + "hook_resid_mid"] + c[p + "hook_mlp_out"])
        np.testing.assert_array_equal(c["blocks.0.hook_resid_pre"], c["hook_embed"])
    # reads as weighted sums of their named sources
    reads = []
    for i in range(n):
        reads.append((f"blocks.{i}.attn_res.hook_weights", f"blocks.{i}.hook_resid_pre"))
        if not cfg.residual.startswith("denseformer"):
            reads.append((f"blocks.{i}.mlp_res.hook_weights", f"blocks.{i}.hook_resid_mid"))
    reads.append(("output_res.hook_weights", f"blocks.{n - 1}.hook_resid_post"))
    if mix:
        for wname, stream in reads:
            assert _rel_err(c[stream], _mixed(c, wname)) < 1e-5, (wname, stream)
        # and not as the plain sum of those sources (the weights matter)
        wname, stream = reads[-1]
        plain = sum(sum(c[h].astype(np.float64) for h in hooks) for hooks in c.source_hooks(wname))
        assert _rel_err(c[stream], plain) > 1e-2
    elif cfg.residual in ("hyper_connections", "mhc"):
        assert all(s is None for s in c.source_hooks(reads[0][0]))  # the copies are not recorded


@pytest.mark.parametrize("wiring", ["hyper_connections", "mhc", "denseformer"])
def test_competitors_are_plain_at_init(wiring):
    """At init HC/mHC keep equal copies (mHC: H_pre = 1/n, H_res uniform, H_post = 1) and
    DenseFormer's DWA is the identity: the plain identities hold there (to rounding), which is
    why test_residual_identities perturbs the weights first. HC's last resid_post is the head's
    input, the sum of the n copies: n times the plain stream at init."""
    cfg = small_config(n_layers=3, **WIRINGS_AND_MODA[wiring])
    _, c = sf.Model(cfg, seed=0).run_with_cache(toks())
    n = cfg.n_layers
    for i in range(n):
        p = f"blocks.{i}."
        mid = c[p + "hook_resid_pre"].astype(np.float64) + c[p + "hook_attn_out"]
        post = c[p + "hook_resid_mid"].astype(np.float64) + c[p + "hook_mlp_out"]
        assert _rel_err(c[p + "hook_resid_mid"], mid) < 1e-5
        if i == n - 1 and wiring != "denseformer":
            post = cfg.hc_expansion * post
        assert _rel_err(c[p + "hook_resid_post"], post) < 1e-5


@pytest.mark.parametrize("wiring", ["plain", "attnres_full"])
def test_post_norm_breaks_the_sums(wiring):
    cfg = small_config(n_layers=2, norm_position="post", **WIRINGS_AND_MODA[wiring])
    _, c = perturbed(cfg).run_with_cache(toks())
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        assert _rel_err(c[p + "hook_resid_mid"], c[p + "hook_resid_pre"].astype(np.float64) + c[p + "hook_attn_out"]) > 1e-2
    if wiring == "attnres_full":  # the reads still mix the (normed) outputs the cache records
        assert _rel_err(c["blocks.1.hook_resid_mid"], _mixed(c, "blocks.1.mlp_res.hook_weights")) < 1e-5


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def test_errors():
    m = sf.Model(small_config(), seed=0)
    _, c = m.run_with_cache(toks())
    with pytest.raises(KeyError, match=r"blocks\.1\.attn\.hook_pattern"):
        c["blocks.1.attn.hook_patern"]
    with pytest.raises(KeyError, match="nearest: blocks.0.hook_resid_pre"):
        c["blocks.0.hook_resid_pr"]
    with pytest.raises(KeyError, match="no hook 'blocks.7.hook_resid_pre'"):
        c["resid_pre", 7]
    with pytest.raises(KeyError, match="hook names are str"):
        c[3]
    with pytest.raises(KeyError, match="not a depth-weights hook"):
        c.source_hooks("hook_embed")
    assert "blocks.0.hook_resid_pr" not in c and 3 not in c
    # the model's own input checks
    with pytest.raises(ValueError, match="shape"):
        m.run_with_cache(np.zeros((1, 2, 3), dtype=np.int64))
    with pytest.raises(IndexError, match="outside"):
        m.run_with_cache(np.array([[1, 2, 99]]))
    with pytest.raises(TypeError, match="byte-level"):
        m.run_with_cache("abc")
    with pytest.raises(IndexError, match="block 2 is outside"):
        m.run_with_cache(toks(), layers=[0, 2])
    with pytest.raises(TypeError, match="layers"):
        m.run_with_cache(toks(), layers="01")
    # 1-D tokens are a batch of one, as in model(x)
    lg, c1 = m.run_with_cache(np.array([1, 2, 3]))
    assert lg.shape == (1, 3, 50) and c1["blocks.0.attn.hook_q"].shape[:2] == (1, 3)


def test_trace_activations_kind():
    """The recordings behind the cache are a trace kind of their own, off under trace=True."""
    cfg = small_config(pos="rope")
    m = sf.Model(cfg, seed=0)
    x = toks()
    full = m(x, trace=True).trace
    assert full.q is None and full.embed is None and full.mlp_post is None
    tr = m(x, trace=["activations"]).trace
    assert tr.attention is None and tr.hidden is None
    assert tr.embed.shape == (B, T, cfg.d_model) and len(tr.q) == cfg.n_layers
    assert tr.mlp_post[1].shape == (B, T, cfg.d_ff) and tr.hidden_mid[0].shape == (B, T, cfg.d_model)
    _, cache = m.run_with_cache(x)
    np.testing.assert_array_equal(tr.q[1], cache["blocks.1.attn.hook_q"])
    assert sf.TraceOptions().activations is False
    tr = m(x, trace=sf.TraceOptions(activations=True, layers=[1])).trace
    assert tr.q[0] is None and tr.q[1] is not None
