"""Parameters for the competitor wirings (DenseFormer, Hyper-Connections, mHC) in tests.

stackformer.Config does not accept their names yet, so configs here are ``reference.Config``
dataclasses (same fields as stackformer.Config plus the new knobs, docs/WIRINGS.md):

    cfg = config(residual="mhc", hc_expansion=4, mhc_sinkhorn_iters=20)
    p = params(cfg, seed=0)                  # the papers' init for the wiring tensors
    q = params(cfg, seed=0, perturbed=True)  # every wiring tensor moved off its init
    base_cfg, base_p = plain_twin(cfg, p)    # the same model as a plain residual stack

In both variants the transformer's own tensors (attention, MLP, norms, embeddings) are
``reference.init_params``' random, non-trivial values, so a wiring at init must reproduce the
plain stack with exactly those weights. No torch here: the torch helpers live in the tests.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as R  # noqa: E402

SMALL = dict(vocab_size=23, d_model=16, n_heads=2, n_layers=2, max_seq_len=8)


def config(**kw) -> R.Config:
    """A small reference.Config; keyword arguments override SMALL and the defaults."""
    return R.Config(**{**SMALL, **kw})


def is_wiring_tensor(name: str) -> bool:
    """Whether ``name`` belongs to a competitor wiring (and not to the plain transformer)."""
    return any(s in name for s in (".dwa.", "_hc.", "_mhc."))


def params(cfg, seed: int = 0, perturbed: bool = False) -> dict:
    """name -> float64 array for every tensor of ``reference.param_shapes(cfg)``.

    perturbed=False: the wiring tensors at their papers' init (``reference.wiring_init``; the
    dynamic HC norm at weight 1, bias 0); perturbed=True: as ``reference.init_params`` draws
    them (init + 0.3 N / 0.5 N, projections N(0, 1/fan_in), gating scales 0.5 + 0.1 N, norms
    1 + 0.1 N), so that every connection weight changes the output."""
    p = R.init_params(cfg, np.random.default_rng(seed))
    if perturbed:
        return p
    for name, v in p.items():
        if not is_wiring_tensor(name):
            continue
        w0 = R.wiring_init(cfg, name, v.shape)
        if w0 is None:  # the dynamic HC norm
            w0 = np.ones(v.shape) if name.endswith(".weight") else np.zeros(v.shape)
        p[name] = np.asarray(w0, dtype=np.float64).reshape(v.shape)
    return p


def plain_twin(cfg, p: dict):
    """(plain cfg, params without the wiring tensors): the stack the wiring starts as."""
    base = dataclasses.replace(cfg, residual="plain")
    return base, {k: v for k, v in p.items() if not is_wiring_tensor(k)}
