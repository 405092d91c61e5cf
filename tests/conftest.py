import numpy as np
import pytest

import stackformer as sf


def small_config(**kw):
    c = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=2, max_seq_len=16)
    c.update(kw)
    return sf.Config(**c)


@pytest.fixture
def model():
    return sf.Model(small_config(), seed=1)


@pytest.fixture
def tokens():
    return np.random.default_rng(0).integers(0, 50, size=(2, 7))
