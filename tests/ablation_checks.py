"""Checks the knob test files share (AttnRes Table 4, MoDA Table 3, RoPE on depth keys,
interventions): a model loaded with the float64 reference's parameters, its gradients against
central differences of the reference's loss, and the bits of cached decoding, checkpointing
and thread counts."""
import numpy as np

import reference as R
import stackformer as sf


def build_from_reference(base, seed=0, **kw):
    """(model, reference config, float32 parameters): sf.Model(base + kw) holding
    reference.init_params (non-trivial everywhere, unlike the papers' zero inits)."""
    kw = {**base, **kw}
    cfg, rcfg = sf.Config(**kw), R.Config(**kw)
    params = {k: v.astype(np.float32) for k, v in R.init_params(rcfg, np.random.default_rng(seed)).items()}
    model = sf.Model(cfg, seed=0)
    model.load_state_dict(params)
    return model, rcfg, params


def assert_probes_match_fd(rcfg, p64, grads, probes, x, y, h=1e-5, rtol=2e-4, floor=1.0):
    """Each (name, index) of probes: the C gradient vs a central difference of the reference's
    loss in float64, within rtol * max(floor, |fd|) (p64 is modified and restored)."""
    for name, idx in probes:
        old = p64[name][idx]
        p64[name][idx] = old + h
        lp = R.loss(rcfg, p64, x, y)
        p64[name][idx] = old - h
        lm = R.loss(rcfg, p64, x, y)
        p64[name][idx] = old
        fd = (lp - lm) / (2 * h)
        got = float(grads[name][idx])
        assert abs(got - fd) <= rtol * max(floor, abs(fd)), f"{name}{idx}: C {got:.6g} vs FD {fd:.6g}"


def assert_cache_checkpoint_threads_bits(model, x, y, prefill):
    """Cached decoding (a prefill of `prefill` positions, then one at a time) gives the full
    forward's logits; checkpointing and 1/2 threads give the same loss and gradient bits."""
    B, T = x.shape
    full = model(x).logits
    cache = model._c.new_cache(B, T)
    parts = [model._c.forward(x[:, :prefill], cache=cache)[0]]
    for t in range(prefill, T):
        parts.append(model._c.forward(x[:, t:t + 1], cache=cache)[0])
    assert np.array_equal(np.concatenate(parts, axis=1), full)
    l1 = model.forward_backward(x, y, n_threads=1)
    g1 = {n: g.copy() for n, g in model.grads.items()}
    for kw in (dict(checkpoint=True, n_threads=1), dict(n_threads=2), dict(checkpoint=True, n_threads=2)):
        assert model.forward_backward(x, y, **kw) == l1, kw
        for n, g in model.grads.items():
            assert np.array_equal(g, g1[n]), (kw, n)
