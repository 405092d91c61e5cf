"""Hostile input for the wiring knobs (issue #19): bad values and combinations are ValueErrors
naming the field, random valid configs of every wiring build, run and train without crashing
(the sanitizer run of this suite, .ci/sanitize, covers them under ASan/UBSan), and a checkpoint
whose wiring metadata is forged is refused with the model untouched."""
import numpy as np
import pytest

import stackformer as sf
from conftest import WIRINGS_AND_MODA
from stackformer.config import FIELDS

SMALL = dict(vocab_size=31, d_model=16, n_heads=2, n_layers=2, max_seq_len=12)

BAD = [
    (dict(residual="mhc", hc_expansion=1), "hc_expansion"),
    (dict(residual="hyper_connections", hc_expansion=0), "hc_expansion"),
    (dict(residual="hyper_connections", hc_expansion=17), "hc_expansion"),
    (dict(residual="mhc", mhc_sinkhorn_iters=0), "mhc_sinkhorn_iters"),
    (dict(residual="mhc", mhc_sinkhorn_iters=-3), "mhc_sinkhorn_iters"),
    (dict(residual="denseformer", denseformer_dilation=0), "denseformer_dilation"),
    (dict(residual="denseformer", denseformer_period=0), "denseformer_period"),
    (dict(residual="hyperconnections"), "residual"),
    (dict(residual="mhc", hc_expansion=2.5), "hc_expansion"),
]


@pytest.mark.parametrize("kw,field", BAD, ids=[f"{f}={kw}" for kw, f in BAD])
def test_bad_knobs_name_the_field(kw, field):
    with pytest.raises((ValueError, TypeError), match=field):
        sf.Config(**SMALL, **kw)


def test_every_ranged_wiring_knob_refuses_values_outside_its_range():
    """Each integer knob of a wiring, one past each end of its documented range."""
    knobs = [f for f in FIELDS if f[0].startswith(("hc_", "mhc_", "denseformer_")) and f[2] == "int"]
    assert {f[0] for f in knobs} >= {"hc_expansion", "mhc_sinkhorn_iters", "denseformer_dilation",
                                     "denseformer_period"}
    residual = {"hc": "hyper_connections", "mhc": "mhc", "denseformer": "denseformer"}
    for name, _, _, _, lo, hi, _, _ in knobs:
        r = residual[name.split("_")[0]]
        for bad in (int(lo) - 1, int(hi) + 1):
            with pytest.raises(ValueError, match=name):
                sf.Config(**SMALL, residual=r, **{name: bad})


def random_config(rng):
    kw = dict(rng.choice(list(WIRINGS_AND_MODA.values())))
    r = kw.get("residual", "plain")
    if r in ("hyper_connections", "mhc"):
        kw["hc_expansion"] = int(rng.integers(2, 6))
        kw["hc_dynamic"] = bool(rng.integers(0, 2))
        kw["mhc_sinkhorn_iters"] = int(rng.integers(1, 8))
    if r == "denseformer":
        kw["denseformer_dilation"] = int(rng.integers(1, 4))
        kw["denseformer_period"] = int(rng.integers(1, 3))
    kw.update(n_layers=int(rng.integers(1, 4)), norm_position=str(rng.choice(["pre", "post"])),
              norm=str(rng.choice(["layernorm", "rmsnorm"])), causal=bool(rng.integers(0, 2)),
              pos=str(rng.choice(["learned", "rope", "none"])), n_kv_heads=int(rng.choice([1, 2])),
              activation=str(rng.choice(["gelu", "swiglu", "relu"])), bias=bool(rng.integers(0, 2)))
    return sf.Config(**{**SMALL, **kw})


def test_random_configs_of_every_wiring_run_and_train():
    rng = np.random.default_rng(19)
    for trial in range(30):
        cfg = random_config(rng)
        m = sf.Model(cfg, seed=trial)
        B, T = int(rng.integers(1, 3)), int(rng.integers(1, 13))
        x = rng.integers(0, cfg.vocab_size, (B, T))
        out = m(x, trace=True)
        assert np.isfinite(out.logits).all(), cfg
        loss = m.forward_backward(x, x, checkpoint=bool(rng.integers(0, 2)))
        assert np.isfinite(loss), cfg
        assert all(np.isfinite(g).all() for g in m.grads.values()), cfg


@pytest.mark.parametrize("wiring", ["denseformer", "hyper_connections", "mhc"])
def test_forged_wiring_metadata_is_refused_and_the_model_untouched(tmp_path, wiring):
    m = sf.Model(sf.Config(**SMALL, residual=wiring), seed=1)
    p = tmp_path / "m.safetensors"
    m.save(str(p))
    raw = p.read_bytes()
    key = b'\\"hc_expansion\\": 4' if wiring != "denseformer" else b'\\"denseformer_dilation\\": 1'
    if key not in raw:
        key = key.replace(b": ", b":")
    assert key in raw, "the checkpoint's JSON header changed format; update this test"
    forged = raw.replace(key, key[:-1] + (b"3" if wiring != "denseformer" else b"2"))
    q = tmp_path / "forged.safetensors"
    q.write_bytes(forged)
    with pytest.raises(ValueError):
        sf.Model.load(str(q))
    other = sf.Model(sf.Config(**SMALL, residual=wiring), seed=2)
    before = {k: v.copy() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError):
        other.load_state_dict(sf.Model(sf.Config(**{**SMALL, "d_model": 32}, residual=wiring)).state_dict())
    assert all(np.array_equal(before[k], v) for k, v in other.state_dict().items())
