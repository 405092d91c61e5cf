"""The competitor wirings -- DenseFormer, Hyper-Connections (static, dynamic) and mHC -- in the
float64 reference (tests/reference.py) and the PyTorch mirror (stackformer.torch), before the C
core has them (docs/WIRINGS.md has the equations, names and choices).

(a) at the papers' init each wiring is the plain pre-norm stack (exactly; for the E-copy wirings
    up to the final norm's eps, which is checked exactly too);
(b) with perturbed parameters the float64 torch mirror equals the float64 reference;
(c) torch autograd gradients of every tensor equal central finite differences of the reference
    loss;
(d) mHC's Sinkhorn-Knopp projection is doubly stochastic after the paper's 20 iterations and
    its gradient is the one through the iterations (finite differences through the loop);
(e) DenseFormer's dilation / period patterns, written out by hand from the paper.

Configs are reference.Config dataclasses (stackformer.Config does not accept the new names yet);
torch tests skip when torch is missing.
"""
import dataclasses
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as R  # noqa: E402
import wiring_params as WP  # noqa: E402

B, T = 2, 5


def toks(cfg, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))


def targets(cfg, seed=2):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))


# (id, config overrides): pre-norm unless said, a spread of norms / sizes / attention features.
HC_CASES = [
    ("hc-static", dict(residual="hyper_connections")),
    ("hc-static-E1-rms", dict(residual="hyper_connections", hc_expansion=1, norm="rmsnorm", bias=False)),
    ("hc-static-E3-swiglu-rope", dict(residual="hyper_connections", hc_expansion=3, activation="swiglu",
                                      pos="rope", n_layers=3)),
    ("hc-dynamic", dict(residual="hyper_connections", hc_dynamic=True)),
    ("hc-dynamic-rms-gqa", dict(residual="hyper_connections", hc_dynamic=True, norm="rmsnorm", bias=False,
                                n_heads=4, n_kv_heads=2)),
    ("hc-dynamic-E2-d24-moda", dict(residual="hyper_connections", hc_dynamic=True, hc_expansion=2,
                                    d_model=24, n_layers=3, moda=True)),
]
MHC_CASES = [
    ("mhc", dict(residual="mhc")),
    ("mhc-it1-rms", dict(residual="mhc", mhc_sinkhorn_iters=1, norm="rmsnorm", bias=False)),
    ("mhc-it3-E2-rope", dict(residual="mhc", mhc_sinkhorn_iters=3, hc_expansion=2, pos="rope")),
    ("mhc-it7-E3-d24-swiglu", dict(residual="mhc", mhc_sinkhorn_iters=7, hc_expansion=3, d_model=24,
                                   n_layers=3, activation="swiglu")),
]
DF_CASES = [
    ("df", dict(residual="denseformer", n_layers=3)),
    ("df-k2-rms", dict(residual="denseformer", n_layers=4, denseformer_dilation=2, norm="rmsnorm", bias=False)),
    ("df-p2-rope-moda", dict(residual="denseformer", n_layers=4, denseformer_period=2, pos="rope", moda=True)),
    ("df-k2p2-d24-untied", dict(residual="denseformer", n_layers=5, denseformer_dilation=2,
                                denseformer_period=2, d_model=24, tie_embeddings=False)),
    ("df-k3-post-gelu_tanh", dict(residual="denseformer", n_layers=4, denseformer_dilation=3,
                                  norm_position="post", activation="gelu_tanh")),
]
ALL_CASES = DF_CASES + HC_CASES + MHC_CASES
IDS = [c[0] for c in ALL_CASES]


# ------------------------------------------------------------------------------------------
# (a) identity at init
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kw", [c for c in ALL_CASES if c[1].get("norm_position", "pre") == "pre"],
                         ids=[c[0] for c in ALL_CASES if c[1].get("norm_position", "pre") == "pre"])
def test_identity_at_init(name, kw):
    """At the papers' init every wiring computes the plain pre-norm stack with the same weights.

    DenseFormer: Y_i = X_i, so logits equal exactly.  HC / mHC: every copy equals the plain stream
    entering each sublayer; the output is their sum, E x, so the final norm sees E x:
    Norm_eps(E x) = Norm_{eps/E^2}(x) exactly, and the logits equal the plain stack's with that
    one eps changed (with the same eps they differ by O(eps / var(x)), ~1e-5 here)."""
    cfg = WP.config(**kw)
    p = WP.params(cfg, seed=3)
    cp, pp = WP.plain_twin(cfg, p)
    tk = toks(cfg)
    got, want = R.forward(cfg, p, tk), R.forward(cp, pp, tk)
    for a, b in zip(got["attention"], want["attention"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    if cfg.residual == "denseformer":
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=0, atol=1e-12)
        for a, b in zip(got["hidden"], want["hidden"]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
        return
    E = cfg.hc_expansion
    for a, b in zip(got["hidden"], want["hidden"]):
        np.testing.assert_allclose(a / E, b, rtol=0, atol=1e-12)
    plain_in = [want["hidden"][k // 2] if k % 2 == 0 else None for k in range(2 * cfg.n_layers)]
    for k, H in enumerate(got["wiring"]["streams"][:-1]):
        if plain_in[k] is not None:  # every copy is the plain stream entering block k // 2
            np.testing.assert_allclose(H, np.repeat(plain_in[k][:, :, None], E, axis=2), rtol=0, atol=1e-12)
    M = R._Model(cp, pp)
    x = want["hidden"][-1]
    fn = (R.layer_norm(x, M.p["final_norm.weight"], M.get("final_norm.bias"), cfg.norm_eps / E ** 2)
          if cfg.norm == "layernorm" else R.rms_norm(x, M.p["final_norm.weight"], cfg.norm_eps / E ** 2))
    np.testing.assert_allclose(got["logits"], M.head(fn), rtol=0, atol=1e-12)
    if E > 1:  # the eps effect is real: the test above is not vacuous
        assert np.abs(got["logits"] - want["logits"]).max() > 1e-8


def test_hc_identity_without_final_norm_is_scaled():
    """Without a final norm the E copies' sum reaches the head: logits = E x plain (no identity)."""
    cfg = WP.config(residual="hyper_connections", hc_expansion=3, final_norm=False)
    p = WP.params(cfg)
    cp, pp = WP.plain_twin(cfg, p)
    np.testing.assert_allclose(R.forward(cfg, p, toks(cfg))["logits"],
                               3 * R.forward(cp, pp, toks(cfg))["logits"], rtol=0, atol=1e-12)


def test_mhc_init_maps_by_hand():
    """mHC at init: H_pre = 1/E each (sum 1), H_post = 1, H_res = the uniform 1/E matrix."""
    for E in (2, 3, 4):
        cfg = WP.config(residual="mhc", hc_expansion=E)
        out = R.forward(cfg, WP.params(cfg), toks(cfg))["wiring"]
        for pre, post, res in zip(out["pre"], out["post"], out["res"]):
            np.testing.assert_allclose(pre, 1.0 / E, rtol=0, atol=1e-15)
            np.testing.assert_allclose(post, 1.0, rtol=0, atol=1e-15)
            np.testing.assert_allclose(res, 1.0 / E, rtol=0, atol=1e-15)


def test_hc_init_weights_by_hand():
    """HC at init (Sec. 2.3): sublayer k reads copy k mod E (A_m = e_{k mod E}), A_r = I, B = 1."""
    cfg = WP.config(residual="hyper_connections", hc_expansion=3, n_layers=3, hc_dynamic=True)
    al = R.forward(cfg, WP.params(cfg), toks(cfg))["wiring"]["alpha"]
    for k, a in enumerate(al):
        want = np.zeros((3, 4))
        want[k % 3, 0] = 1.0
        want[[0, 1, 2], [1, 2, 3]] = 1.0
        np.testing.assert_allclose(a, np.broadcast_to(want, a.shape), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# torch helpers
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tmod():
    torch = pytest.importorskip("torch")
    import stackformer.torch as st

    class TestTorchModel(st.TorchModel):
        """TorchModel taking a reference.Config (stackformer.Config rejects the new names)."""

        @staticmethod
        def _check_config(config):
            assert isinstance(config, R.Config)

    return torch, st, TestTorchModel


def torch_model(tmod, cfg, p=None):
    torch, _, TM = tmod
    tm = TM(cfg).double()
    if p is not None:
        tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in p.items()})
    return tm


@pytest.mark.parametrize("name,kw", ALL_CASES, ids=IDS)
def test_torch_names_shapes_order_and_init(tmod, name, kw):
    """The mirror's state_dict has the reference's names, shapes and (proposed table) order, and
    its own reset_parameters gives the papers' init of every wiring tensor."""
    cfg = WP.config(**kw)
    _, _, TM = tmod
    sd = TM(cfg).state_dict()  # float32, as TorchModel builds it
    shapes = R.param_shapes(cfg)
    assert list(sd) == list(shapes)
    assert all(tuple(sd[k].shape) == tuple(s) for k, s in shapes.items())
    p0 = WP.params(cfg)
    for k in sd:
        if WP.is_wiring_tensor(k):
            np.testing.assert_array_equal(sd[k].numpy(), p0[k].astype(np.float32), err_msg=k)


def test_torch_weight_decay_groups(tmod):
    """HC / mHC connection tensors are never decayed; DenseFormer's (1, m) DWA weights are, as in
    the authors' code (nn.Linear weights in the decayed group)."""
    for kw in (dict(residual="hyper_connections", hc_dynamic=True), dict(residual="mhc"),
               dict(residual="denseformer")):
        tm = torch_model(tmod, WP.config(**kw))
        for n, _ in tm.named_parameters():
            if "_hc." in n or "_mhc." in n:
                assert tm.no_decay(n), n
            if ".dwa." in n:
                assert not tm.no_decay(n), n


# ------------------------------------------------------------------------------------------
# (b) torch mirror == reference, perturbed parameters
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kw", ALL_CASES, ids=IDS)
def test_torch_matches_reference_perturbed(tmod, name, kw):
    torch = tmod[0]
    cfg = WP.config(**kw)
    p = WP.params(cfg, seed=5, perturbed=True)
    tk = toks(cfg)
    kpm = np.ones((B, T), int)
    kpm[1, -2:] = 0
    for mask in (None, kpm):
        want = R.forward(cfg, p, tk, key_padding_mask=mask)["logits"]
        with torch.no_grad():
            got = torch_model(tmod, cfg, p)(torch.from_numpy(tk), key_padding_mask=mask).numpy()
        scale = max(1.0, np.abs(want).max())
        assert np.abs(got - want).max() <= 1e-10 * scale, (name, np.abs(got - want).max())
    # the perturbation matters: the wiring is not the plain stack any more
    cp, pp = WP.plain_twin(cfg, p)
    assert np.abs(want - R.forward(cp, pp, tk, key_padding_mask=kpm)["logits"]).max() > 1e-3


# ------------------------------------------------------------------------------------------
# (c) gradients of every tensor: torch autograd vs central finite differences of the reference
# ------------------------------------------------------------------------------------------

GRAD_CASES = [c for c in ALL_CASES if c[0] in (
    "df-k2p2-d24-untied", "df-k3-post-gelu_tanh", "hc-static-E3-swiglu-rope", "hc-dynamic-rms-gqa",
    "hc-dynamic-E2-d24-moda", "mhc", "mhc-it1-rms", "mhc-it3-E2-rope")] + [
    ("hc-dynamic-post", dict(residual="hyper_connections", hc_dynamic=True, norm_position="post")),
    ("mhc-post-it20", dict(residual="mhc", norm_position="post", hc_expansion=3)),
]


@pytest.mark.parametrize("name,kw", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_grads_match_finite_differences(tmod, name, kw):
    """For each tensor W and a random direction V: <dL/dW (torch autograd), V> equals the
    central difference (L(W + hV) - L(W - hV)) / 2h of the float64 reference loss (Richardson-
    extrapolated over h = 1e-4, 5e-5), to 1e-6 relative."""
    torch = tmod[0]
    cfg = WP.config(**kw)
    p = WP.params(cfg, seed=7, perturbed=True)
    tk, tg = toks(cfg), targets(cfg)
    tm = torch_model(tmod, cfg, p)
    tm.loss(torch.from_numpy(tk), torch.from_numpy(tg)).backward()
    grads = {n: q.grad.numpy() for n, q in tm.named_parameters()}
    assert set(grads) == set(p)
    rng = np.random.default_rng(11)

    def central(n, v, h):
        up, dn = dict(p), dict(p)
        up[n], dn[n] = p[n] + h * v, p[n] - h * v
        return (R.loss(cfg, up, tk, tg) - R.loss(cfg, dn, tk, tg)) / (2 * h)

    worst = 0.0
    for n, w in p.items():
        v = rng.standard_normal(w.shape)
        h = 1e-4  # Richardson: (4 D(h/2) - D(h)) / 3 has error O(h^4), roundoff ~1e-12
        fd = (4 * central(n, v, h / 2) - central(n, v, h)) / 3
        ad = float((grads[n] * v).sum())
        err = abs(fd - ad) / max(abs(fd), abs(ad), 1e-4)
        worst = max(worst, err)
        assert err < 1e-6, (name, n, fd, ad)
        if WP.is_wiring_tensor(n):
            assert abs(ad) > 1e-6, (name, n, "a wiring tensor without gradient tests nothing")
    assert worst < 1e-6


# ------------------------------------------------------------------------------------------
# (d) Sinkhorn-Knopp
# ------------------------------------------------------------------------------------------


def test_sinkhorn_doubly_stochastic_after_paper_iterations():
    """t_max = 20 (mHC Sec. 4.2) on N(0, 1) logits: entries > 0, rows sum to 1 exactly (T_r is
    the last step), columns to 1 within 1e-4 (20 iterations are not the limit: 40 do better)."""
    L = np.random.default_rng(0).standard_normal((500, 4, 4))
    M20, M40 = R.sinkhorn_knopp(L, 20), R.sinkhorn_knopp(L, 40)
    assert (M20 > 0).all()
    assert np.abs(M20.sum(-1) - 1).max() < 1e-14
    col20, col40 = np.abs(M20.sum(-2) - 1).max(), np.abs(M40.sum(-2) - 1).max()
    assert col20 < 1e-4 and col40 < col20 / 10
    # one iteration is far from doubly stochastic: the iteration count matters
    assert np.abs(R.sinkhorn_knopp(L, 1).sum(-2) - 1).max() > 0.1
    # hand case: a 2x2 whose limit is known, exp(L) = [[1, 2], [2, 1]] -> [[1/3, 2/3], [2/3, 1/3]]
    M = R.sinkhorn_knopp(np.log(np.array([[1.0, 2.0], [2.0, 1.0]])), 1)
    np.testing.assert_allclose(M, [[1 / 3, 2 / 3], [2 / 3, 1 / 3]], rtol=0, atol=1e-15)
    # What lets an implementation subtract a max before exp: a shift per column (or a global
    # one) scales columns of exp(L), which the first T_c removes exactly.  A shift per row does
    # not commute with T_c first: after finitely many iterations it changes the result.
    sh = np.random.default_rng(1).standard_normal((500, 1, 4))
    np.testing.assert_allclose(R.sinkhorn_knopp(L + sh + 5.0, 20), M20, rtol=0, atol=1e-12)
    rows = np.swapaxes(sh, -1, -2)
    assert np.abs(R.sinkhorn_knopp(L + rows, 20) - M20).max() > 1e-7


def test_mhc_res_in_model_is_doubly_stochastic():
    cfg = WP.config(residual="mhc")
    out = R.forward(cfg, WP.params(cfg, perturbed=True), toks(cfg))["wiring"]
    for res in out["res"]:
        assert (res > 0).all()
        assert np.abs(res.sum(-1) - 1).max() < 1e-14
        assert np.abs(res.sum(-2) - 1).max() < 1e-4
        assert np.abs(res - 0.25).max() > 0.05  # perturbed: not the uniform matrix


@pytest.mark.parametrize("iters", [1, 2, 5, 20])
def test_sinkhorn_gradient_through_the_iterations(tmod, iters):
    """d/dL of f = sum(C * SK(L)) by torch autograd through the loop equals central finite
    differences of the NumPy loop, element by element; a straight-through estimate (treating
    SK as the identity, or as the row softmax it starts with) does not."""
    torch, st, _ = tmod
    rng = np.random.default_rng(iters)
    L, C = rng.standard_normal((3, 4, 4)), rng.standard_normal((3, 4, 4))
    Lt = torch.tensor(L, requires_grad=True)
    (torch.tensor(C) * st.sinkhorn_knopp(Lt, iters)).sum().backward()
    g = Lt.grad.numpy()
    h, fd = 1e-6, np.zeros_like(L)
    for idx in np.ndindex(L.shape):
        up, dn = L.copy(), L.copy()
        up[idx] += h
        dn[idx] -= h
        fd[idx] = ((C * R.sinkhorn_knopp(up, iters)).sum() - (C * R.sinkhorn_knopp(dn, iters)).sum()) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
    assert np.abs(C - fd).max() > 1e-2  # straight-through (identity) would give C
    S = torch.tensor(L, requires_grad=True)
    (torch.tensor(C) * torch.softmax(S, -1)).sum().backward()
    assert np.abs(S.grad.numpy() - fd).max() > 1e-3


# ------------------------------------------------------------------------------------------
# (e) DenseFormer dilation / period by hand
# ------------------------------------------------------------------------------------------

# (n_layers, dilation k, period p) -> {block i: the X_j its DWA averages}, written out from the
# paper's definition (Sec. 3.2): a DWA after block i iff p divides i+1 (the paper's depth), over
# {X_j : j <= i+1, j = i+1 mod k}; X_0 is the embedding.  Blocks not listed have no DWA.
HAND = {
    (4, 1, 1): {0: [0, 1], 1: [0, 1, 2], 2: [0, 1, 2, 3], 3: [0, 1, 2, 3, 4]},
    (4, 2, 1): {0: [1], 1: [0, 2], 2: [1, 3], 3: [0, 2, 4]},
    (4, 1, 2): {1: [0, 1, 2], 3: [0, 1, 2, 3, 4]},
    (4, 2, 2): {1: [0, 2], 3: [0, 2, 4]},
    (5, 3, 1): {0: [1], 1: [2], 2: [0, 3], 3: [1, 4], 4: [2, 5]},
    (6, 2, 3): {2: [1, 3], 5: [0, 2, 4, 6]},
    (5, 4, 2): {1: [2], 3: [0, 4]},
}


@pytest.mark.parametrize("n,k,p", list(HAND), ids=[f"n{n}-k{k}-p{p}" for n, k, p in HAND])
def test_denseformer_pattern_by_hand(n, k, p):
    want = HAND[(n, k, p)]
    cfg = WP.config(residual="denseformer", n_layers=n, denseformer_dilation=k, denseformer_period=p)
    shapes = {name: s for name, s in R.param_shapes(cfg).items() if ".dwa." in name}
    assert shapes == {f"layers.{i}.dwa.weight": (1, len(js)) for i, js in want.items()}
    # distinct weights, then the trace matrix and the streams themselves, by hand
    prm = WP.params(cfg, seed=2)
    for i, js in want.items():
        prm[f"layers.{i}.dwa.weight"] = np.array([[0.5 + 0.1 * i + 0.01 * c for c in range(len(js))]])
    out = R.forward(cfg, prm, toks(cfg))
    Wm, X = out["wiring"]["dwa_matrix"], out["wiring"]["X"]
    hand = np.zeros((n, n + 1))
    for i in range(n):
        if i in want:
            for c, j in enumerate(want[i]):
                hand[i, j] = 0.5 + 0.1 * i + 0.01 * c
        else:
            hand[i, i + 1] = 1.0
    np.testing.assert_array_equal(Wm, hand)
    for i in range(n):  # Y_{i+1} (hidden[i+1]) = sum_j hand[i, j] X_j
        y = sum(hand[i, j] * X[j] for j in range(n + 1))
        np.testing.assert_allclose(out["hidden"][i + 1], y, rtol=0, atol=1e-13)


def test_denseformer_param_count():
    """Sec. 3.1: a depth-d DenseFormer (k = p = 1) adds d(d+3)/2 scalars."""
    for n in (1, 2, 5, 12):
        cfg = WP.config(residual="denseformer", n_layers=n)
        got = sum(math.prod(s) for name, s in R.param_shapes(cfg).items() if ".dwa." in name)
        assert got == n * (n + 3) // 2


def test_torch_dwa_sources_by_hand(tmod):
    st = tmod[1]
    for (n, k, p), want in HAND.items():
        for i, js in want.items():
            assert st.dwa_sources(i, k) == js


def test_reference_config_knob_defaults():
    """The knob defaults proposed for stackformer.Config (docs/WIRINGS.md)."""
    c = R.Config(vocab_size=5, d_model=4, n_heads=1, n_layers=1, max_seq_len=2)
    assert (c.denseformer_dilation, c.denseformer_period, c.hc_expansion, c.hc_dynamic,
            c.mhc_sinkhorn_iters) == (1, 1, 4, False, 20)
    with pytest.raises(AssertionError):
        dataclasses.replace(c, residual="mhc", hc_expansion=1)
