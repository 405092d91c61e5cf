"""stackformer.torch (the PyTorch mirror) against the C core.

For a matrix of wiring modes and knobs: float32 logits agree, weights round-trip exactly, the
C backward pass (model.forward_backward -> model.grads) matches torch autograd in float64, a few
AdamW steps in torch track stackformer's optimizer_step, and the C gradients match central finite
differences of the C loss.
"""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stackformer as sf  # noqa: E402
from stackformer.torch import TorchModel, from_torch, to_torch  # noqa: E402

V, B, T = 50, 2, 9
# The C calls below use n_threads=1: results are bitwise identical for any thread count, and for
# models this small OpenMP's thread wake-ups cost more than they save (a lot, on a busy machine).
BASE = dict(vocab_size=V, d_model=32, n_heads=4, n_layers=3, max_seq_len=16)

# (id, Config overrides, padding): padding None, "right" (encoder style: trailing pads and one
# leading pad) or "left" (causal model with leading pads: those queries see no key at all).
CASES = [
    ("plain-pre", {}, None),
    ("plain-rope-gqa-swiglu-rms", dict(pos="rope", n_kv_heads=2, activation="swiglu", norm="rmsnorm", bias=False), None),
    ("plain-post-relu-sin-untied", dict(norm_position="post", activation="relu", pos="sinusoidal",
                                        tie_embeddings=False, final_norm=False), None),
    ("plain-encoder-pad-gelu_tanh", dict(causal=False, activation="gelu_tanh", pos="none", d_model=48), "right"),
    ("plain-causal-leftpad-gqa1", dict(n_kv_heads=1, n_layers=2), "left"),
    ("attnres_full-pre", dict(residual="attnres_full"), None),
    ("attnres_full-post-rms", dict(residual="attnres_full", norm_position="post", norm="rmsnorm"), None),
    ("attnres_block1", dict(residual="attnres_block", attnres_block_size=1, pos="rope"), None),
    ("attnres_block2-post", dict(residual="attnres_block", attnres_block_size=2, norm_position="post"), None),
    ("attnres_block3-encoder-pad", dict(residual="attnres_block", attnres_block_size=3, causal=False,
                                        activation="swiglu", n_kv_heads=2), "right"),
    ("moda-chunk1", dict(moda=True), None),
    ("moda-chunk2-rope-gqa", dict(moda=True, moda_chunk=2, pos="rope", n_kv_heads=2), None),
    ("moda-chunk3-encoder-pad", dict(moda=True, moda_chunk=3, causal=False), "right"),
    ("moda-depth_only-chunk1", dict(moda=True, moda_depth_only=True), None),
    ("moda-depth_only-chunk2-encoder-pad", dict(moda=True, moda_depth_only=True, moda_chunk=2, causal=False), "right"),
    ("moda-post-leftpad", dict(moda=True, norm_position="post", moda_chunk=2), "left"),
    ("moda+attnres_full", dict(moda=True, residual="attnres_full", d_model=64, n_layers=2), None),
    ("moda+attnres_block2-post-rope", dict(moda=True, residual="attnres_block", attnres_block_size=2,
                                           norm_position="post", pos="rope", n_kv_heads=1), None),
    ("moda2+attnres_block3-encoder-pad", dict(moda=True, moda_chunk=2, residual="attnres_block",
                                              attnres_block_size=3, causal=False, tie_embeddings=False), "right"),
    # the competitor wirings (issue #19): C and mirror share names, order and numbers
    ("denseformer", dict(residual="denseformer"), None),
    ("denseformer-k2p2-post-moda", dict(residual="denseformer", denseformer_dilation=2, denseformer_period=2,
                                        norm_position="post", moda=True), None),
    ("hc-static-n2", dict(residual="hyper_connections", hc_expansion=2), None),
    ("hc-dynamic-n4-rms-encoder-pad", dict(residual="hyper_connections", hc_dynamic=True, norm="rmsnorm",
                                           causal=False), "right"),
    ("mhc-n4", dict(residual="mhc"), None),
    ("mhc-n2-it5-post-moda-rope", dict(residual="mhc", hc_expansion=2, mhc_sinkhorn_iters=5,
                                       norm_position="post", moda=True, pos="rope"), None),
]
IDS = [c[0] for c in CASES]


def build(overrides, seed=0, res_std=0.5):
    """A stackformer model at its own random init, then made non-trivial: AttnRes pseudo-queries
    N(0, res_std^2) (their init 0 would hide the depth softmax), norm gains/biases and linear
    biases perturbed, embeddings and head N(0, 1/d) (logits ~ N(0, 1)) and Linear weights
    N(0, 0.25/fan_in) so attention is far from uniform and the MLPs leave their linear regime;
    DenseFormer/HC/mHC tensors get N(0, 0.04) added to their init."""
    cfg = sf.Config(**{**BASE, **overrides})
    model = sf.Model(cfg, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name, p in model.named_parameters().items():
        z = rng.standard_normal(p.shape)
        if name.endswith("_res_proj.weight"):
            p[...] = res_std * z
        elif any(t in name for t in ("_hc.", "_mhc.", ".dwa.")):
            # competitor wirings: moved off their identity-like init, keeping its structure
            p[...] = p + 0.2 * z
        elif "norm" in name:
            p[...] = (1.0 + 0.1 * z) if name.endswith(".weight") else 0.1 * z
        elif name.endswith(".bias"):
            p[...] = 0.1 * z
        elif name in ("tok_emb.weight", "pos_emb.weight", "lm_head.weight"):
            p[...] = z / math.sqrt(cfg.d_model)  # logits ~ N(0, 1)
        else:
            p[...] = 0.5 * z / math.sqrt(p.shape[1])
    return model


def inputs(cfg, padding, seed=1):
    """(tokens, key_padding_mask or None, targets with ignore_index entries)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, size=(B, T))
    y = rng.integers(0, cfg.vocab_size, size=(B, T))
    y[0, 2] = y[1, 5] = -100  # ignore_index
    kpm = None
    if padding:
        kpm = np.ones((B, T), dtype=np.uint8)
        if padding == "right":
            kpm[0, 0] = 0
            kpm[1, T - 3:] = 0
        else:
            kpm[1, :3] = 0
        y[kpm == 0] = -100  # no loss on padding
    return x, kpm, y


def torch_logits(tm, x, kpm):
    with torch.no_grad():
        return tm(torch.from_numpy(x), None if kpm is None else torch.from_numpy(kpm)).double().numpy()


# ------------------------------------------------------------------------------------------------
# structure, forward and round trip
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_names_shapes_and_order(case):
    _, overrides, _ = case
    model = build(overrides)
    tm = TorchModel(model.config)
    want = {k: v.shape for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    assert list(got) == list(want)  # same names, same (table) order
    assert got == want
    for name in want:
        assert tm.no_decay(name) == model.no_decay(name), name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_logits_match_float32(case):
    """Float32 vs float32, max abs error <= 1e-5 on logits of size ~4. Pseudo-queries N(0, 0.25^2)
    here: at N(0, 0.5^2) the depth softmax is sharp enough to amplify float32 rounding, and the
    two float32 implementations differ by up to 2.3e-5 (worst of 6 seeds; each is about as far
    from float64); at 0.25 the worst of 6 seeds is 5.5e-6. The gradient tests use 0.5."""
    _, overrides, padding = case
    model = build(overrides, res_std=0.25)
    x, kpm, _ = inputs(model.config, padding)
    want = model(x, key_padding_mask=kpm, n_threads=1).logits
    got = torch_logits(to_torch(model), x, kpm)
    assert np.abs(want).max() > 1.0  # non-trivial
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_round_trip_exact(case):
    _, overrides, _ = case
    model = build(overrides)
    tm = to_torch(model)
    for k, v in model.state_dict().items():
        assert np.array_equal(tm.state_dict()[k].numpy(), v), k
    back = from_torch(tm)
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert np.array_equal(back.state_dict()[k], v), k
    # a float64 TorchModel comes back rounded to float32, i.e. exactly again
    back64 = from_torch(to_torch(model, dtype=torch.float64))
    assert np.array_equal(back64.flat_params, model.flat_params)
    # TorchModel.load_state_dict takes stackformer's NumPy state_dict unchanged
    tm2 = TorchModel(model.config)
    tm2.load_state_dict(model.state_dict())
    assert all(torch.equal(tm2.state_dict()[k], v) for k, v in tm.state_dict().items())


def test_float_embeddings_input_and_1d_tokens():
    model = build(dict(pos="sinusoidal", residual="attnres_block", attnres_block_size=2, moda=True))
    tm = to_torch(model)
    emb = np.random.default_rng(3).standard_normal((B, T, model.config.d_model)).astype(np.float32)
    assert np.abs(torch_logits(tm, emb, None) - model(emb, n_threads=1).logits).max() <= 1e-5
    tok = np.arange(T) % V
    with torch.no_grad():
        got = tm(torch.from_numpy(tok)).numpy()
    assert got.shape == (1, T, V)
    assert np.abs(got - model(tok, n_threads=1).logits).max() <= 1e-5


def test_fresh_torch_model_goes_to_stackformer():
    cfg = sf.Config(**{**BASE, "residual": "attnres_full", "moda": True})
    torch.manual_seed(0)
    tm = TorchModel(cfg)
    sd = tm.state_dict()
    assert torch.all(sd["layers.0.attn_res_proj.weight"] == 0) and torch.all(sd["layers.0.attn_res_norm.weight"] == 1)
    assert 0.015 < sd["tok_emb.weight"].std() < 0.025
    model = from_torch(tm)
    x, _, _ = inputs(cfg, None)
    assert np.abs(torch_logits(tm, x, None) - model(x, n_threads=1).logits).max() <= 1e-5


# ------------------------------------------------------------------------------------------------
# gradients: C backward vs torch autograd in float64
# ------------------------------------------------------------------------------------------------

GRAD_RTOL = 1e-3


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_match_autograd(case):
    _, overrides, padding = case
    model = build(overrides)
    x, kpm, y = inputs(model.config, padding)
    loss = model.forward_backward(x, y, key_padding_mask=kpm, n_threads=1)
    grads = model.grads

    tm = to_torch(model, dtype=torch.float64)
    ref = tm.loss(torch.from_numpy(x), torch.from_numpy(y), None if kpm is None else torch.from_numpy(kpm))
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    want = {n: p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape)) for n, p in tm.named_parameters()}
    top = max(np.abs(g).max() for g in want.values())
    for name, w in want.items():
        got = grads[name].astype(np.float64)
        scale, err = np.abs(w).max(), np.abs(got - w).max()
        if scale <= 1e-9 * top:
            # zero by symmetry: k_proj.bias (softmax ignores a per-query constant), the last
            # block's k/v under depth_only (nobody reads them); float32 leaves rounding there
            assert np.abs(got).max() <= 1e-6 * top, f"{name}: expected ~0, got {np.abs(got).max():.2e}"
        else:
            assert err <= GRAD_RTOL * scale, f"{name}: max err {err:.2e} vs max |grad| {scale:.2e}"


# ------------------------------------------------------------------------------------------------
# training: AdamW steps in torch track stackformer's optimizer
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [c for c in CASES if c[0] in (
    "plain-pre", "attnres_block2-post", "moda-chunk2-rope-gqa", "moda2+attnres_block3-encoder-pad")],
    ids=lambda c: c[0])
def test_adamw_training_matches(case):
    """stackformer's train_step (float32) and torch.optim.AdamW on a float64 TorchModel, from the
    same weights, with stackformer's decay groups and global-norm clipping: same losses, and
    after 4 steps weights within a small fraction of lr."""
    _, overrides, padding = case
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    model = build(overrides)
    tm = to_torch(model, dtype=torch.float64)
    opt = torch.optim.AdamW(tm.param_groups(hp["weight_decay"]), lr=hp["lr"], betas=hp["betas"], eps=hp["eps"])
    params = dict(tm.named_parameters())
    for step in range(4):
        x, kpm, y = inputs(model.config, padding, seed=10 + step)
        loss_sf = model.train_step(x, y, key_padding_mask=kpm, n_threads=1, **hp)
        opt.zero_grad()
        loss_t = tm.loss(torch.from_numpy(x), torch.from_numpy(y), None if kpm is None else torch.from_numpy(kpm))
        loss_t.backward()
        if step == 0:  # gradients 0 by symmetry: k_proj.bias (without RoPE/MoDA), sublayer 0's
            # pseudo-query and key gain (a softmax over its single source)
            top = max(p.grad.abs().max().item() for p in params.values())
            symmetric = [n for n, p in params.items() if p.grad.abs().max().item() <= 1e-9 * top]
        # stackformer clips by the global norm: g *= clip / norm when norm > clip
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params.values()))
        if norm > hp["clip_norm"]:
            for p in params.values():
                p.grad.mul_(hp["clip_norm"] / norm)
        opt.step()
        assert abs(loss_sf - loss_t.item()) <= 1e-6 * loss_t.item(), step
        assert abs(model.last_grad_norm - norm.item()) <= 1e-5 * norm.item(), step
    assert model.step == 4
    # Adam divides by sqrt(v): an entry with a tiny gradient moves by ~lr whatever its rounding,
    # so compare quantiles; tensors whose gradient is 0 by symmetry only carry float32 noise in
    # the C gradient, which Adam turns into steps of up to lr (harmless: the loss ignores them).
    lr, sd = hp["lr"], model.state_dict()
    diffs = np.concatenate([np.abs(sd[n] - p.detach().numpy()).ravel()
                            for n, p in params.items() if n not in symmetric])
    assert diffs.max() <= 5e-2 * lr
    assert np.quantile(diffs, 0.999) <= 5e-4 * lr
    assert np.median(diffs) <= 1e-5 * lr
    for n in symmetric:
        assert n.endswith("attn.k_proj.bias") or n.startswith("layers.0.attn_res_"), n
        assert np.abs(sd[n] - params[n].detach().numpy()).max() <= 4 * lr


# ------------------------------------------------------------------------------------------------
# finite differences of the C loss vs the C gradient
# ------------------------------------------------------------------------------------------------

FD_CASES = {
    "plain": (dict(), ["layers.0.attn.q_proj.weight", "layers.1.mlp.up_proj.bias", "tok_emb.weight"]),
    "attnres_full": (dict(residual="attnres_full"), ["layers.0.mlp_res_proj.weight", "layers.1.mlp_res_norm.weight",
                                                     "output_res_proj.weight", "layers.0.attn.k_proj.weight"]),
    "attnres_block": (dict(residual="attnres_block", attnres_block_size=2, norm_position="post"),
                      ["layers.1.attn_res_proj.weight", "layers.2.mlp_norm.weight", "layers.0.mlp.down_proj.weight"]),
    "moda": (dict(moda=True, moda_chunk=2, causal=False), ["layers.0.mlp.depth_k_proj.weight",
                                                           "layers.1.mlp.depth_v_proj.weight", "layers.0.attn.v_proj.weight"]),
    "moda+attnres": (dict(moda=True, residual="attnres_block", attnres_block_size=3, pos="rope"),
                     ["layers.0.mlp.depth_v_proj.weight", "layers.2.attn_res_proj.weight", "layers.1.attn.q_proj.weight"]),
}


@pytest.mark.parametrize("mode", list(FD_CASES))
def test_finite_differences(mode):
    """Central differences (L(p+e) - L(p-e)) / 2e with e = 1e-2 of the float32 C loss vs the C
    gradient. Error budget: each loss evaluation is off by a few 1e-7 (float32 logits, loss ~4;
    measured against float64 torch), i.e. ~2e-5 after dividing by 2e; the truncation error
    e^2/6 * L''' is ~2e-5 * L''' with L''' = O(1) for these O(1)-scaled weights. Hence
    |fd - g| <= 3e-4 + 5e-3 |g| (measured worst: 5e-5). The activation is gelu: relu's kinks
    would break the Taylor expansion at e this large."""
    overrides, names = FD_CASES[mode]
    padding = "right" if overrides.get("causal") is False else None
    model = build(overrides)
    x, kpm, y = inputs(model.config, padding)
    model.forward_backward(x, y, key_padding_mask=kpm, n_threads=1)
    grads = {k: v.copy() for k, v in model.grads.items()}
    params = model.named_parameters()
    rng = np.random.default_rng(7)
    eps = 1e-2
    for name in names:
        p, g = params[name].reshape(-1), grads[name].reshape(-1)
        assert np.abs(g).max() > 0, name
        for j in [int(np.argmax(np.abs(g)))] + list(rng.integers(0, p.size, 3)):
            old = p[j]
            p[j] = old + eps
            lp = model.forward_backward(x, y, key_padding_mask=kpm, n_threads=1)
            p[j] = old - eps
            lm = model.forward_backward(x, y, key_padding_mask=kpm, n_threads=1)
            p[j] = old
            fd = (lp - lm) / (2 * eps)
            assert abs(fd - g[j]) <= 3e-4 + 5e-3 * abs(g[j]), (name, j, fd, g[j])
