"""Copying state in and out while other threads compute: save(), state_dict(), pickling and
load_state_dict() take the model's reader/writer guard (csrc/sf_lifecycle.c
sf_model_snapshot / sf_model_restore), so they never see or leave half-updated weights;
release_memory() does not disturb running forward calls; a decoding cache refuses a second
concurrent user. Before, checkpoints saved while another thread trained held weights from two
different steps, and forwards during load_state_dict gave logits of neither weight set."""
import hashlib
import pickle
import threading

import numpy as np
import pytest

import stackformer as sf

# many parameters, little compute: a train step spends much of its time in AdamW's update,
# where an unguarded copy catches the weights half-way
CFG = dict(vocab_size=4096, d_model=128, n_heads=4, n_layers=2, max_seq_len=8)
X = np.random.default_rng(0).integers(0, 4096, (1, 4))
Y = np.random.default_rng(1).integers(0, 4096, (1, 4))


def _digest(flat):
    return hashlib.sha1(np.ascontiguousarray(flat).tobytes()).hexdigest()


def _train_in_background(m, steps):
    """Train for `steps` steps in a thread; records the digest of every state it passed."""
    seen = {_digest(m.flat_params)}
    done = threading.Event()

    def run():
        try:
            for _ in range(steps):
                m.train_step(X, Y, lr=1e-3)
                seen.add(_digest(m.flat_params))  # the only writer: a consistent read
        finally:
            done.set()

    th = threading.Thread(target=run)
    th.start()
    return th, done, seen


def test_state_dict_and_pickle_while_training_are_whole_states():
    m = sf.Model(sf.Config(**CFG), seed=0)
    names = list(m.state_dict())
    th, done, seen = _train_in_background(m, 60)
    copies = []
    while not done.is_set():
        sd = m.state_dict()
        copies.append(np.concatenate([sd[k].ravel() for k in names]))
        copies.append(pickle.loads(pickle.dumps(m)).flat_params.copy())
    th.join()
    assert len(copies) > 10
    torn = sum(_digest(c) not in seen for c in copies)
    assert torn == 0, f"{torn} of {len(copies)} copies mixed two steps' weights"


def test_save_while_training_writes_whole_checkpoints(tmp_path):
    m = sf.Model(sf.Config(**CFG), seed=0)
    th, done, seen = _train_in_background(m, 40)
    paths = []
    while not done.is_set() and len(paths) < 40:
        p = tmp_path / f"c{len(paths)}.safetensors"
        m.save(str(p), optimizer=True)
        paths.append(p)
    th.join()
    assert paths
    torn = sum(_digest(sf.Model.load(str(p)).flat_params) not in seen for p in paths)
    assert torn == 0, f"{torn} of {len(paths)} checkpoints held half-updated weights"


def test_load_state_dict_during_forwards_gives_one_weight_set_or_the_other():
    cfg = sf.Config(vocab_size=256, d_model=128, n_heads=4, n_layers=2, max_seq_len=64)
    a, b = sf.Model(cfg, seed=1), sf.Model(cfg, seed=2)
    x = np.random.default_rng(3).integers(0, 256, (2, 64))
    want = [a(x).logits, b(x).logits]
    sds = [a.state_dict(), b.state_dict()]
    m = sf.Model(cfg, seed=1)
    stop = threading.Event()
    bad, ran = [], [0]

    def forwards():
        while not stop.is_set():
            try:
                got = m(x).logits
            except RuntimeError:  # a forward that starts while the weights are written
                continue
            ran[0] += 1
            if not any(np.array_equal(got, w) for w in want):
                bad.append(1)

    threads = [threading.Thread(target=forwards) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for i in range(60):
            m.load_state_dict(sds[i % 2])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert ran[0] > 0
    assert not bad, f"{len(bad)} of {ran[0]} forwards saw a mix of two weight sets"


def test_release_memory_does_not_disturb_running_forwards():
    m = sf.Model(sf.Config(vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=64), seed=0)
    x = np.random.default_rng(3).integers(0, 256, (4, 64))
    want = m(x).logits
    stop = threading.Event()
    errors, ran = [], [0]

    def forwards():
        while not stop.is_set():
            try:
                got = m(x).logits
            except RuntimeError as e:
                errors.append(str(e))
                continue
            ran[0] += 1
            if not np.array_equal(got, want):
                errors.append("wrong logits")

    threads = [threading.Thread(target=forwards) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(300):
            m.release_memory()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert ran[0] > 0 and not errors, errors[:3]
    m.train_step(x, x, lr=1e-3)  # and the model still trains
    m.release_memory()


def test_a_cache_refuses_a_second_concurrent_user():
    """Two calls appending to one cache at once would both write position len; the second is
    refused, so each position is computed exactly once: the rows the successful calls return
    are the uncached pass's rows 0..T-1, each once."""
    T = 256
    cfg = sf.Config(vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=T)
    m = sf.Model(cfg, seed=0)
    full = m(np.full((1, T), 7)).logits[0]
    position = {full[t].tobytes(): t for t in range(T)}
    assert len(position) == T
    cache = m._c.new_cache(1, T)
    tok = np.full((1, 1), 7, dtype=np.int32)
    rows = [[], []]
    barrier = threading.Barrier(2)

    def append(i):
        barrier.wait()
        while True:
            try:
                rows[i].append(m._c.forward(tok, cache=cache)[0][0, -1].tobytes())
            except RuntimeError:  # the other thread holds the cache
                continue
            except ValueError:  # full
                return

    threads = [threading.Thread(target=append, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = sorted(position.get(r, -1) for r in rows[0] + rows[1])
    assert got == list(range(T)), "positions computed twice, skipped or wrong"
    assert cache.length == T
    cache.reset()
    assert cache.length == 0
