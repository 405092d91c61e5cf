"""Memory, reference counts, concurrency rules, crash-safe saving and exact resumption."""
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import stackformer as sf
from conftest import small_config


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_no_leak_over_10000_calls():
    """10 000 forward / traced / train / generate calls: resident memory stays flat."""
    m = sf.Model(small_config(residual="attnres_block", attnres_block_size=3, moda=True), seed=0)
    x = np.random.default_rng(0).integers(0, 50, size=(2, 8))

    def burst(n):
        for i in range(n):
            k = i % 4
            if k == 0:
                m(x)
            elif k == 1:
                m(x, trace=True)
            elif k == 2:
                m.train_step(x, x, lr=1e-4)
            else:
                m.generate(x[0, :3], 2, temperature=0)

    burst(400)  # warm up allocator pools
    gc.collect()
    before = rss_bytes()
    burst(10000)
    gc.collect()
    grown = rss_bytes() - before
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 10 000 calls"


def test_reference_counts_unchanged(model, tokens):
    x = np.ascontiguousarray(tokens, dtype=np.int64)
    mask = np.ones(tokens.shape, dtype=bool)
    before = (sys.getrefcount(x), sys.getrefcount(mask), sys.getrefcount(model._c))
    for _ in range(50):
        model(x, key_padding_mask=mask, trace=True)
        model.forward_backward(x, x)
    try:
        model(x[:, :0])
    except ValueError:
        pass
    assert (sys.getrefcount(x), sys.getrefcount(mask), sys.getrefcount(model._c)) == before


def test_views_keep_model_alive_and_cannot_be_resized():
    m = sf.Model(small_config(), seed=0)
    c = m._c
    base = sys.getrefcount(c)
    w = m.layers[0].attn.q_proj.weight
    views = [m._c.params for _ in range(10)]
    assert sys.getrefcount(c) > base
    del views
    with pytest.raises(ValueError):
        w.resize((5,))
    expected = w.copy()
    del m, c
    gc.collect()
    np.testing.assert_array_equal(w, expected)


def test_cache_keeps_model_alive():
    m = sf.Model(small_config(), seed=0)
    cache = m._c.new_cache(1, 8)
    out1 = m._c.forward(np.array([[1, 2]]), cache=cache)[0]
    c = m._c
    del m
    gc.collect()
    out2 = c.forward(np.array([[3]]), cache=cache)[0]
    assert out1.shape == (1, 2, 50) and out2.shape == (1, 1, 50)
    other = sf.Model(small_config(), seed=0)
    with pytest.raises(TypeError, match="created by this model"):
        other._c.forward(np.array([[1]]), cache=cache)
    with pytest.raises(ValueError, match="no room"):
        c.forward(np.arange(6)[None], cache=cache)


def test_train_step_is_exclusive():
    """Train steps while three threads hammer forward: a train step waits for in-flight
    forward calls and runs alone; forward calls made meanwhile raise RuntimeError naming the
    conflict. Nothing crashes and the weights end exactly as a serial run leaves them."""
    cfg = small_config(d_model=128, n_layers=4, max_seq_len=128)
    m = sf.Model(cfg, seed=0)
    ref = sf.Model(cfg, seed=0)
    x = np.random.default_rng(0).integers(0, 50, size=(8, 128))
    errors, busy = [], []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                m(x[:1, :16])
            except RuntimeError as e:
                busy.append(str(e))
            except Exception as e:  # anything else is a bug
                errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(6):
        m.train_step(x, x, lr=1e-3)
    stop.set()
    for t in threads:
        t.join()
    for _ in range(6):
        ref.train_step(x, x, lr=1e-3)
    assert not errors
    assert busy and all("being trained" in s for s in busy)
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(m.state_dict()[k], v)


def test_two_train_steps_at_once_one_is_refused():
    m = sf.Model(small_config(d_model=128, n_layers=4, max_seq_len=128), seed=0)
    x = np.random.default_rng(0).integers(0, 50, size=(8, 128))
    refused, done = [], []

    def trainer():
        for _ in range(5):
            try:
                m.train_step(x, x, lr=1e-3)
                done.append(1)
            except RuntimeError as e:
                refused.append(str(e))

    ts = [threading.Thread(target=trainer) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(done) + len(refused) == 10 and done
    assert all("in use by another thread" in s for s in refused)


def test_optimizer_rejects_bad_hyperparameters(model, tokens):
    model.forward_backward(tokens, tokens)
    before = model.state_dict()
    for kw in [dict(lr=float("nan")), dict(lr=-1.0), dict(lr=1e-3, betas=(1.0, 0.9)),
               dict(lr=1e-3, eps=0.0), dict(lr=1e-3, weight_decay=-0.1)]:
        with pytest.raises(ValueError):
            model.optimizer_step(**kw)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_nonfinite_gradient_skips_step(model, tokens):
    model.tok_emb.weight[3, 0] = np.inf
    x = np.full_like(tokens, 3)
    with pytest.raises(FloatingPointError, match="loss is not finite|NaN"):
        model.forward_backward(x, x)
    model.tok_emb.weight[3, 0] = 0.0


def test_bad_training_inputs(model, tokens):
    before = model.state_dict()
    cases = [
        (tokens, tokens[:, :3], ValueError, "targets must have shape"),
        (tokens, tokens.astype(np.float32), TypeError, "targets must be an integer"),
        (tokens, np.full_like(tokens, 50), IndexError, "target 50"),
        (tokens, np.full_like(tokens, -100), ValueError, "nothing to learn"),
        (tokens.astype(bool), tokens, TypeError, "integer token ids"),
        (np.full((2, 7, 32), np.nan, np.float32), tokens, ValueError, "NaN or inf"),
        (np.zeros((2, 17), np.int64), np.zeros((2, 17), np.int64), ValueError, "max_seq_len"),
    ]
    for x, y, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            model.forward_backward(x, y)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_memory_errors_before_allocating():
    m = sf.Model(sf.Config(vocab_size=50000, d_model=32, n_heads=4, n_layers=1, max_seq_len=4096))
    with pytest.raises(MemoryError, match="GiB"):
        m(np.zeros((40000, 4096), np.int8))
    with pytest.raises(MemoryError, match="GiB"):
        m.forward_backward(np.zeros((4000, 4096), np.int8), np.zeros((4000, 4096), np.int8))
    with pytest.raises((MemoryError, ValueError)):
        sf.Model(sf.Config(vocab_size=2**24, d_model=2**16, n_heads=1, n_layers=1, d_ff=1))


def test_resume_is_bitwise_identical(tmp_path):
    cfg = small_config(residual="attnres_full", moda=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 50, size=(40, 2, 9))

    def steps(model, batches):
        return [model.train_step(b[:, :-1], b[:, 1:], lr=3e-3, weight_decay=0.1) for b in batches]

    a = sf.Model(cfg, seed=1)
    steps(a, data[:20])
    a.save(str(tmp_path / "mid.safetensors"), optimizer=True, extra={"next_batch": 20})
    rest_a = steps(a, data[20:])
    b = sf.Model.load(str(tmp_path / "mid.safetensors"))
    assert b.step == 20 and b.checkpoint_extra == {"next_batch": 20}
    rest_b = steps(b, data[b.checkpoint_extra["next_batch"]:])
    assert rest_a == rest_b
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v)


SAVER = textwrap.dedent("""
    import sys, numpy as np, stackformer as sf
    path = sys.argv[1]
    m = sf.Model(sf.Config(vocab_size=256, d_model=256, n_heads=4, n_layers=6), seed=0)
    i = 0
    while True:
        m.tok_emb.weight[0, 0] = float(i)
        m.save(path)
        print(i, flush=True)
        i += 1
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_kill_mid_save_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "m.safetensors"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    for delay in (0.3, 0.45, 0.6, 0.75):
        p = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # at least one complete save
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        m = sf.Model.load(str(path))  # never truncated: the rename is atomic
        assert m.tok_emb.weight[0, 0] >= 0
        leftovers = [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
        for f in leftovers:  # a killed writer may leave its temp file, never a broken target
            os.unlink(tmp_path / f)
