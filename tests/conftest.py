import os

import numpy as np
import pytest

import stackformer as sf

# Every depth wiring the Config accepts, as Config overrides, with the knobs that change its
# code path; tests that must cover all wirings loop over this one list. A new residual name
# fails test_every_wiring_is_listed until it is added here.
WIRINGS = {
    "plain": {},
    "attnres_full": dict(residual="attnres_full"),
    "attnres_block": dict(residual="attnres_block", attnres_block_size=2),
    "denseformer": dict(residual="denseformer"),
    "denseformer_dilated": dict(residual="denseformer", denseformer_dilation=2, denseformer_period=2),
    "hyper_connections": dict(residual="hyper_connections"),
    "hyper_connections_static": dict(residual="hyper_connections", hc_dynamic=False, hc_expansion=2),
    "hyper_connections_dynamic": dict(residual="hyper_connections", hc_dynamic=True),
    "mhc": dict(residual="mhc"),
}
# MoDA is an attention feature that combines with any wiring
WIRINGS_AND_MODA = {**WIRINGS, "moda": dict(moda=True),
                    "attnres_block+moda": dict(residual="attnres_block", attnres_block_size=3, moda=True),
                    "denseformer+moda": dict(residual="denseformer", moda=True),
                    "hyper_connections+moda": dict(residual="hyper_connections", moda=True),
                    "mhc+moda": dict(residual="mhc", moda=True)}


def subprocess_env(**extra):
    """os.environ for a child Python that must import the stackformer this test run imported:
    an installed package or an in-place build (the checkout's python/ holds no compiled
    extension after a plain `pip install .`, so pointing PYTHONPATH there breaks in CI)."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(sf.__file__)))
    path = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def small_config(**kw):
    c = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=2, max_seq_len=16)
    c.update(kw)
    return sf.Config(**c)


def perturbed(cfg, seed=0, scale=0.1, rng_seed=None):
    """A model whose every parameter is moved off its init by N(0, scale) noise (AttnRes
    queries non-zero, DenseFormer's DWA not the identity, HC/mHC copies no longer equal), so
    identities that hold only at init cannot pass by accident. rng_seed: the noise's seed
    (default seed + 100)."""
    m = sf.Model(cfg, seed=seed)
    rng = np.random.default_rng(seed + 100 if rng_seed is None else rng_seed)
    for p in m.named_parameters().values():
        p += rng.normal(0.0, scale, p.shape).astype(np.float32)
    return m


@pytest.fixture
def model():
    return sf.Model(small_config(), seed=1)


@pytest.fixture
def tokens():
    return np.random.default_rng(0).integers(0, 50, size=(2, 7))
