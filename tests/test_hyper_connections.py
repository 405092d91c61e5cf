"""Hyper-Connections (Zhu et al., arXiv 2409.19606) in the C core against an independent float64
reference written here from the paper's equations (1)-(4) (static) and (6)-(8) (dynamic), and
its initialisation (eq. 14), on top of the float64 reference's sublayers (tests/reference.py):

    per sublayer k (each attention and each MLP), stream H (n copies per token):
      alpha = static_alpha [+ s_alpha tanh(Norm(H) W_alpha)]      (n, n+1) per token
      beta  = static_beta  [+ s_beta  tanh(Norm(H) W_beta)]       (n,)
      h_0   = sum_j alpha[j, 0] H_j
      H'_i  = beta_i T(h_0) + sum_j alpha[j, 1+i] H_j
    H^0 = the embedding n times; the head reads sum_i H_i (through the final norm).
T(h) = F(Norm_k(h)) under pre-norm, Norm_k(F(h)) under post-norm (stackformer's convention)."""
import numpy as np
import pytest

import reference as R
import stackformer as sf

BASE = dict(vocab_size=40, d_model=16, n_heads=2, n_layers=2, max_seq_len=12)


def build(seed=0, n=3, dyn=True, **kw):
    kw = {**BASE, **kw}
    cfg = sf.Config(**kw, residual="hyper_connections", hc_expansion=n, hc_dynamic=dyn)
    rcfg = R.Config(**kw)
    rng = np.random.default_rng(seed)
    params = {k: v.astype(np.float32) for k, v in R.init_params(rcfg, rng).items()}
    model = sf.Model(cfg, seed=0)
    sd = model.state_dict()
    hc = {}
    for name, v in sd.items():
        if "_hc." in name:  # the paper's init, perturbed so every path is exercised
            scale = 0.3 if name.endswith(("alpha.weight", "beta.weight", "proj.weight")) else 0.1
            hc[name] = (v + scale * rng.standard_normal(v.shape)).astype(np.float32)
            if name.endswith("scale.weight"):
                hc[name] = (0.5 + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
    model.load_state_dict({**params, **hc})
    return model, rcfg, params, hc, n, dyn


def _norm(rcfg, x, w, b):
    if rcfg.norm == "layernorm":
        return R.layer_norm(x, w, b, rcfg.norm_eps)
    return R.rms_norm(x, w, rcfg.norm_eps)


def reference_forward(rcfg, params, hc, n, dyn, tokens):
    M = R._Model(rcfg, params)
    pre = rcfg.norm_position == "pre"
    x0 = M.embed(tokens, None)
    H = np.repeat(x0[:, :, None, :], n, axis=2)  # (B, T, n, d)
    depth = []
    for k in range(2 * rcfg.n_layers):
        i, s = k // 2, k % 2
        p = f"layers.{i}.{'attn' if s == 0 else 'mlp'}_hc."
        alpha = np.broadcast_to(hc[p + "alpha.weight"].astype(np.float64), H.shape[:2] + (n, n + 1))
        beta = np.broadcast_to(hc[p + "beta.weight"].astype(np.float64), H.shape[:2] + (n,))
        if dyn:
            # proj.weight rows: W_alpha's n+1 columns, then W_beta; scale.weight = (s_alpha, s_beta)
            Hn = _norm(rcfg, H, hc[p + "norm.weight"].astype(np.float64),
                       hc.get(p + "norm.bias", None) if p + "norm.bias" in hc else None)
            W = hc[p + "proj.weight"].astype(np.float64)
            sc = hc[p + "scale.weight"].astype(np.float64)
            alpha = alpha + sc[0] * np.tanh(Hn @ W[:n + 1].T)
            beta = beta + sc[1] * np.tanh(Hn @ W[n + 1])
        h0 = np.einsum("btj,btjd->btd", alpha[..., 0], H)
        norm_name = f"layers.{i}.{'attn' if s == 0 else 'mlp'}_norm"
        u = M.norm(norm_name, h0) if pre else h0
        if s == 0:
            out, _, slot = M.attention(i, u, depth, None)
        else:
            out, slot = M.mlp(i, u)
        depth.append(slot)
        v = out if pre else M.norm(norm_name, out)
        H = beta[..., :, None] * v[:, :, None, :] + np.einsum("btji,btjd->btid", alpha[..., 1:], H)
    x = H.sum(axis=2)
    fin = M.norm("final_norm", x) if rcfg.final_norm else x
    return M.head(fin)


def reference_loss(rcfg, params, hc, n, dyn, tokens, targets):
    logits = reference_forward(rcfg, params, hc, n, dyn, tokens)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1).mean()


CASES = [
    dict(dyn=False),
    dict(),
    dict(n=1),
    dict(n=4, norm="rmsnorm"),
    dict(norm_position="post"),
    dict(moda=True, n_kv_heads=1, pos="rope"),
    dict(causal=False, activation="swiglu", bias=False),
    dict(tie_embeddings=False, final_norm=False),
]


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
def test_logits_match_float64_reference(kw):
    model, rcfg, params, hc, n, dyn = build(**kw)
    x = np.random.default_rng(3).integers(0, BASE["vocab_size"], (2, 9))
    want = reference_forward(rcfg, params, hc, n, dyn, x)
    got = model(x).logits
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("kw", [dict(dyn=False), dict(), dict(norm="rmsnorm", norm_position="post", n=2)],
                         ids=["static", "dynamic", "dynamic-rms-post"])
def test_gradients_match_finite_differences_of_the_reference(kw):
    model, rcfg, params, hc, n, dyn = build(**kw)
    rng = np.random.default_rng(5)
    x = rng.integers(0, BASE["vocab_size"], (2, 7))
    y = rng.integers(0, BASE["vocab_size"], (2, 7))
    model.forward_backward(x, y)
    grads = model.grads
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    h64 = {k: v.astype(np.float64) for k, v in hc.items()}
    h = 1e-5
    probes = []
    for name, v in h64.items():  # a few entries of every hyper-connection tensor
        for _ in range(min(4, v.size)):
            probes.append((name, tuple(int(rng.integers(0, s)) for s in v.shape)))
    for name in ("layers.0.attn.q_proj.weight", "layers.1.mlp.up_proj.weight", "tok_emb.weight"):
        probes.append((name, tuple(int(rng.integers(0, s)) for s in p64[name].shape)))
    for name, idx in probes:
        table = h64 if name in h64 else p64
        old = table[name][idx]
        table[name][idx] = old + h
        lp = reference_loss(rcfg, p64, h64, n, dyn, x, y)
        table[name][idx] = old - h
        lm = reference_loss(rcfg, p64, h64, n, dyn, x, y)
        table[name][idx] = old
        fd = (lp - lm) / (2 * h)
        got = float(grads[name][idx])
        assert abs(got - fd) <= 3e-4 * max(0.1, abs(fd)), f"{name}{idx}: C {got:.6g} vs FD {fd:.6g}"


def test_init_is_the_pre_norm_residual_stack():
    """Eq. 14: alpha = [e_{k mod n}, I], beta = 1 (dynamic parts zero) carries the plain stream in
    every copy; the head reads n x the plain stream, which the final norm makes the same up to its
    eps (so a tiny eps here)."""
    for kw in (dict(hc_dynamic=False), dict(hc_dynamic=True), dict(hc_expansion=3, norm="rmsnorm", hc_dynamic=True)):
        cfg = sf.Config(**BASE, residual="hyper_connections", norm_eps=1e-10, **kw)
        hcm = sf.Model(cfg, seed=2)
        plain = sf.Model(sf.Config(**{**cfg.to_dict(), "residual": "plain"}), seed=2)
        x = np.random.default_rng(0).integers(0, 40, (2, 10))
        assert np.abs(hcm(x).logits - plain(x).logits).max() < 1e-5
    sd = sf.Model(sf.Config(**BASE, residual="hyper_connections", hc_expansion=3), seed=0).state_dict()
    # by hand: sublayer k = 2i+s reads copy k mod 3 and keeps every copy
    assert np.array_equal(sd["layers.1.attn_hc.alpha.weight"], [[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]])
    assert np.array_equal(sd["layers.1.mlp_hc.alpha.weight"], [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert np.array_equal(sd["layers.0.attn_hc.beta.weight"], [1, 1, 1])
    assert "layers.0.attn_hc.proj.weight" not in sd  # static by default
    sd = sf.Model(sf.Config(**BASE, residual="hyper_connections", hc_dynamic=True), seed=0).state_dict()
    assert np.array_equal(sd["layers.0.mlp_hc.scale.weight"], np.float32([0.01, 0.01]))
    assert sd["layers.0.mlp_hc.proj.weight"].shape == (6, 16) and not sd["layers.0.mlp_hc.proj.weight"].any()


def test_checkpointing_cache_and_threads_give_the_same_bits():
    model, *_ = build(n=4, moda=True)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 40, (3, 10))
    y = rng.integers(0, 40, (3, 10))
    l1 = model.forward_backward(x, y)
    g1 = {k: g.copy() for k, g in model.grads.items()}
    assert model.forward_backward(x, y, checkpoint=True) == l1
    for k, g in model.grads.items():
        assert np.array_equal(g, g1[k]), k
    for nt in (2, 3):
        assert model.forward_backward(x, y, n_threads=nt) == l1
        for k, g in model.grads.items():
            assert np.array_equal(g, g1[k]), (nt, k)
    ids = np.asarray(model.generate(x[0, :4], 5, temperature=0.0)).reshape(-1)
    logits = model(ids[:-1]).logits[0]
    assert np.array_equal(np.argmax(logits[3:], -1), ids[4:])


def test_trace_shows_the_read_weights():
    model, rcfg, params, hc, n, dyn = build(n=3, dyn=False)
    tr = model(np.arange(6), trace=["alpha"]).trace
    assert tr.alpha[2].shape == (1, 6, 3)
    assert np.allclose(tr.alpha[2][0, 0], hc["layers.1.attn_hc.alpha.weight"][:, 0])


def test_bad_knobs_are_named():
    for field, value in (("hc_expansion", 0), ("hc_expansion", 17)):
        with pytest.raises(ValueError, match=field):
            sf.Config(**BASE, residual="hyper_connections", **{field: value})
