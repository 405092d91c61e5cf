"""The optional BLAS backend (stackformer.use_blas).

Two kinds of BLAS stand in here:
- a cblas_sgemm written below in NumPy (float64) and handed to the C core as a ctypes
  callback: it runs on every machine, so CI always covers the routing (operand layouts, bias,
  accumulation, the activation epilogue, the weight gradient's transposed A);
- a real library when one is on the machine: the system's OpenBLAS / BLIS / ..., else the
  OpenBLAS inside NumPy's wheel (64-bit integers), used by these tests only.
Each test puts the built-in tiles back afterwards.
"""
import ctypes
import ctypes.util
import glob
import os

import numpy as np
import pytest

import stackformer as sf
from stackformer import _core

from conftest import small_config

ROW_MAJOR, NO_TRANS = 101, 111
F = ctypes.c_float
P = ctypes.c_void_p
CBLAS32 = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int32, ctypes.c_int32,
                           ctypes.c_int32, F, P, ctypes.c_int32, P, ctypes.c_int32, F, P, ctypes.c_int32)


def _view(addr, rows, cols, ld):
    """rows x cols float32 matrix at addr with row stride ld (a view of C memory)."""
    n = (rows - 1) * ld + cols
    flat = np.ctypeslib.as_array(ctypes.cast(addr, ctypes.POINTER(ctypes.c_float)), shape=(n,))
    return np.lib.stride_tricks.as_strided(flat, shape=(rows, cols), strides=(4 * ld, 4))


class NumpyBlas:
    """A row-major cblas_sgemm in float64 NumPy, as a C function pointer; counts its calls."""

    def __init__(self, wrong=False):
        self.calls = 0
        self.wrong = wrong
        self.fn = CBLAS32(self._sgemm)  # kept alive as long as this object
        self.addr = ctypes.cast(self.fn, ctypes.c_void_p).value

    def _sgemm(self, order, ta, tb, R, C, K, alpha, A, lda, B, ldb, beta, Y, ldc):
        self.calls += 1
        assert order == ROW_MAJOR
        a = _view(A, R, K, lda) if ta == NO_TRANS else _view(A, K, R, lda).T
        b = _view(B, K, C, ldb) if tb == NO_TRANS else _view(B, C, K, ldb).T
        y = _view(Y, R, C, ldc)
        out = alpha * (a.astype(np.float64) @ b.astype(np.float64))
        if beta != 0:
            out += beta * y
        if self.wrong:
            out += 1.0
        y[...] = out


@pytest.fixture
def tiles_after():
    yield
    sf.use_builtin_matmul()
    assert sf.matmul_kernel() != "blas"


def _configs():
    return [small_config(),
            small_config(residual="attnres_full", n_layers=3),
            small_config(residual="attnres_block", attnres_block_size=2, n_layers=3, bias=False),
            small_config(moda=True, n_layers=3, n_kv_heads=2, pos="rope"),
            small_config(activation="swiglu", norm="rmsnorm", tie_embeddings=False)]


def _tokens(c, B=3, T=11, seed=0):
    r = np.random.default_rng(seed)
    return r.integers(0, c.vocab_size, size=(B, T)), r.integers(0, c.vocab_size, size=(B, T))


def _forward_and_grads(m, x, y):
    logits = m(x).logits.copy()
    loss = m.forward_backward(x, y)
    return logits, loss, {k: g.copy() for k, g in m.grads.items()}


def _check_close(m, x, y, set_blas):
    """Logits, loss and every gradient through the BLAS against the tiles."""
    want = _forward_and_grads(m, x, y)
    set_blas()
    assert sf.matmul_kernel() == "blas"
    got = _forward_and_grads(m, x, y)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert abs(got[1] - want[1]) <= 1e-5 * abs(want[1])
    for k in want[2]:
        scale = float(np.abs(want[2][k]).max()) + 1e-6
        np.testing.assert_allclose(got[2][k], want[2][k], rtol=0, atol=1e-4 * scale, err_msg=k)
    return got


@pytest.mark.parametrize("ci", range(5))
def test_numpy_blas_matches_tiles(ci, tiles_after):
    c = _configs()[ci]
    m = sf.Model(c, seed=3)
    x, y = _tokens(c)
    nb = NumpyBlas()
    _check_close(m, x, y, lambda: _core.set_blas_sgemm(nb.addr, False))
    # every Linear product went there: per layer q/k/v/o, up (two for SwiGLU), down, and the
    # head, forward and backward (input and weight gradients; the first layer's input too)
    assert nb.calls >= 3 * c.n_layers * 6
    sf.use_builtin_matmul()
    before = nb.calls
    m(x)
    assert nb.calls == before, "the tiles are back: no call may reach the BLAS"


def test_numpy_blas_decode_rows_and_generate(tiles_after):
    """Decoding (a few rows per product) also goes through the BLAS; greedy tokens agree with
    the tiles' wherever the tiles' top two logits are not within float noise of each other."""
    c = small_config(n_layers=3, max_seq_len=24)
    m = sf.Model(c, seed=5)
    prompt = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    want = m.generate(prompt, 12, temperature=0)
    nb = NumpyBlas()
    _core.set_blas_sgemm(nb.addr, False)
    got = m.generate(prompt, 12, temperature=0)
    assert nb.calls > 12 * 3 * 6
    sf.use_builtin_matmul()
    logits = m(want[:, :-1]).logits
    for b in range(2):
        for t in range(prompt.shape[1], want.shape[1]):
            top2 = np.sort(logits[b, t - 1])[-2:]
            if top2[1] - top2[0] > 1e-3:
                assert got[b, t] == want[b, t], (b, t)
            else:
                break  # past a near-tie the continuations may differ legitimately


def test_wrong_blas_is_refused_and_the_previous_backend_stays(tiles_after):
    kernel = sf.matmul_kernel()
    bad = NumpyBlas(wrong=True)
    with pytest.raises(ValueError, match="probe"):
        _core.set_blas_sgemm(bad.addr, False)
    assert sf.matmul_kernel() == kernel
    good = NumpyBlas()
    _core.set_blas_sgemm(good.addr, False)
    with pytest.raises(ValueError, match="probe"):
        _core.set_blas_sgemm(bad.addr, False)
    assert sf.matmul_kernel() == "blas"
    n = good.calls
    sf.Model(small_config(), seed=1)(np.zeros((1, 4), np.int64))
    assert good.calls > n, "the good BLAS stays in use after the bad one is refused"


def test_use_blas_errors_leave_the_tiles():
    kernel = sf.matmul_kernel()
    with pytest.raises(OSError, match="cannot load"):
        sf.use_blas("/nonexistent/libnothing.so")
    libm = ctypes.util.find_library("m")
    if libm:
        with pytest.raises(ValueError, match="no cblas_sgemm"):
            sf.use_blas(libm)
    with pytest.raises(TypeError):
        sf.use_blas(42)
    assert sf.matmul_kernel() == kernel and sf.blas_info() is None


def _real_blas():
    """A real BLAS on this machine: the system's, else the one inside NumPy's wheel."""
    for cand in sf.blas.find_blas():
        try:
            sf.blas._load(cand)
            return cand
        except (OSError, ValueError):
            continue
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas*"))
    return libs[0] if libs else None


REAL = _real_blas()


@pytest.mark.skipif(REAL is None, reason="no BLAS library on this machine")
@pytest.mark.parametrize("ci", [0, 1, 3])
def test_real_blas_matches_tiles(ci, tiles_after):
    c = _configs()[ci]
    m = sf.Model(c, seed=4)
    x, y = _tokens(c, B=4, T=16)
    info = []
    _check_close(m, x, y, lambda: info.append(sf.use_blas(REAL)))
    assert "cblas_sgemm" in info[0] and sf.blas_info() == info[0]


@pytest.mark.skipif(REAL is None, reason="no BLAS library on this machine")
def test_real_blas_larger_products_and_threads(tiles_after):
    """Shapes past the tiles' one-thread limit, on one and two BLAS threads."""
    c = small_config(d_model=96, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=300)
    m = sf.Model(c, seed=2)
    x, y = _tokens(c, B=4, T=64)
    for threads in (1, 2):
        sf.set_num_threads(threads)
        try:
            sf.use_builtin_matmul()
            _check_close(m, x, y, lambda: sf.use_blas(REAL))
        finally:
            sf.set_num_threads(0)


def test_use_blas_search_reports_what_it_tried(monkeypatch, tiles_after):
    """library=None walks find_blas(): $STACKFORMER_BLAS comes first, every failure is named,
    and an empty search is a FileNotFoundError; the tiles stay in all cases."""
    kernel = sf.matmul_kernel()
    monkeypatch.setenv("STACKFORMER_BLAS", "/nonexistent/libmyblas.so")
    assert sf.blas.find_blas()[0] == "/nonexistent/libmyblas.so"
    monkeypatch.setattr(sf.blas, "find_blas", lambda: ["/nonexistent/libmyblas.so"])
    with pytest.raises(ValueError, match="no usable BLAS.*libmyblas"):
        sf.use_blas()
    monkeypatch.setattr(sf.blas, "find_blas", lambda: [])
    with pytest.raises(FileNotFoundError, match="no BLAS library found"):
        sf.use_blas()
    assert sf.matmul_kernel() == kernel and sf.blas_info() is None
