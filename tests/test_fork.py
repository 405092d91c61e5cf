"""Process pools: a forked child can use every call after its parent ran threads, and a model
pickled into a `spawn` worker computes the same bits.

GNU OpenMP's thread pool does not survive fork(): before the pthread_atfork handler
(csrc/sf_threads.c) the child's first threaded call waited forever for workers that exist only
in the parent. Each scenario runs in its own interpreter under a timeout, and every forked
child arms an alarm, so a regression fails instead of hanging the suite. Results are compared
with the parent's bit for bit (the child runs on one thread; results do not depend on the
thread count, tests/test_threads_training.py)."""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import subprocess_env


PRELUDE = """
import copy, os, pickle, signal, sys, threading, time
import numpy as np
import stackformer as sf

sf.set_num_threads(2)
CFG = dict(vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=64)
X = np.random.default_rng(0).integers(0, 256, (4, 64))
Y = np.random.default_rng(1).integers(0, 256, (4, 64))


def reference(m):
    # the parent's results, on 2 threads: logits, one train step's loss and weights
    t = copy.deepcopy(m)
    loss = t.train_step(X, Y, lr=1e-2)
    return m(X).logits, loss, t.state_dict()


def child_results(m):
    t = copy.deepcopy(m)
    loss = t.train_step(X, Y, lr=1e-2)
    toks = m.generate(X[:1, :8], 4, temperature=0.0)
    return dict(nt=sf.get_num_threads(), logits=m(X).logits, loss=loss, w=t.state_dict(),
                toks=toks)


def check(ref, got, toks_ref):
    assert got["nt"] == 1, got["nt"]
    assert np.array_equal(ref[0], got["logits"]), "logits differ"
    assert ref[1] == got["loss"], (ref[1], got["loss"])
    for k, v in ref[2].items():
        assert np.array_equal(v, got["w"][k]), k
    assert np.array_equal(toks_ref, got["toks"])
"""


def _run(tmp_path, body, timeout=120):
    script = tmp_path / "scenario.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    # the scenario imports the stackformer this test imported (see conftest.subprocess_env)
    env = subprocess_env()
    try:
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=str(tmp_path))
    except subprocess.TimeoutExpired:
        pytest.fail("the scenario hung (timeout)")
    assert r.returncode == 0 and "SCENARIO OK" in r.stdout, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("wiring", [{}, dict(residual="attnres_block", attnres_block_size=2, moda=True)],
                         ids=["plain", "attnres_block+moda"])
def test_os_fork_after_threaded_forward(tmp_path, wiring):
    _run(tmp_path, f"""
    m = sf.Model(sf.Config(**CFG, **{wiring!r}), seed=0)
    ref = reference(m)
    toks_ref = m.generate(X[:1, :8], 4, temperature=0.0)
    out = "child.pkl"
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)  # a hung child dies instead of outliving the test
        try:
            with open(out, "wb") as f:
                pickle.dump(child_results(m), f)
            m.save("child.safetensors", optimizer=True)
            assert np.array_equal(sf.Model.load("child.safetensors")(X).logits, ref[0])
        except BaseException as e:
            print("child failed:", repr(e), flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    with open(out, "rb") as f:
        check(ref, pickle.load(f), toks_ref)
    # the parent keeps its threads and its bits
    assert sf.get_num_threads() == 2 and np.array_equal(m(X).logits, ref[0])
    print("SCENARIO OK")
    """)


def test_fork_while_another_thread_is_inside_a_forward(tmp_path):
    """The child inherits the parent's running-forward count; nobody in the child will release
    it, so before the fix the child's train step waited forever."""
    _run(tmp_path, """
    m = sf.Model(sf.Config(**CFG), seed=0)
    ref = reference(m)
    toks_ref = m.generate(X[:1, :8], 4, temperature=0.0)
    big = np.random.default_rng(2).integers(0, 256, (32, 64))
    stop = threading.Event(); started = threading.Event()
    def loop():
        while not stop.is_set():
            started.set()
            m(big)
    th = threading.Thread(target=loop); th.start()
    started.wait(); time.sleep(0.05)
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)
        try:
            with open("child.pkl", "wb") as f:
                pickle.dump(child_results(m), f)
            m.optimizer_step(1e-3)   # the write guard is free in the child
        except BaseException as e:
            print("child failed:", repr(e), flush=True)
            os._exit(1)
        os._exit(0)
    stop.set(); th.join()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    with open("child.pkl", "rb") as f:
        check(ref, pickle.load(f), toks_ref)
    print("SCENARIO OK")
    """)


def test_fork_pool_of_two_workers(tmp_path):
    _run(tmp_path, """
    import multiprocessing as mp
    M = sf.Model(sf.Config(**CFG, residual="attnres_full"), seed=0)
    REF = reference(M)
    TOKS = M.generate(X[:1, :8], 4, temperature=0.0)

    def work(i):
        signal.alarm(60)
        return child_results(M)

    if __name__ == "__main__":
        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map_async(work, range(4)).get(timeout=60)
        for g in got:
            check(REF, g, TOKS)
        print("SCENARIO OK")
    """)


def test_spawn_pool_receives_a_pickled_model(tmp_path):
    """Spawned workers start fresh (their own threads): a model goes to them by pickling."""
    _run(tmp_path, """
    import multiprocessing as mp

    def work(blob):
        m = pickle.loads(blob)
        r = child_results(m)
        r["nt"] = 1  # a spawned worker keeps its threads; the bits must not care
        return r

    if __name__ == "__main__":
        m = sf.Model(sf.Config(**CFG, residual="mhc"), seed=0)
        m.train_step(X, Y, lr=1e-2)  # optimizer state travels too
        ref = reference(m)
        toks = m.generate(X[:1, :8], 4, temperature=0.0)
        with mp.get_context("spawn").Pool(2) as pool:
            got = pool.map_async(work, [pickle.dumps(m)] * 2).get(timeout=90)
        for g in got:
            check(ref, g, toks)
        print("SCENARIO OK")
    """)


def test_child_of_a_process_without_threads_keeps_its_thread_count(tmp_path):
    """Only a parent that ran a team of threads makes its children single-threaded."""
    _run(tmp_path, """
    m = sf.Model(sf.Config(**CFG), seed=0)
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)
        ok = sf.get_num_threads() == 2 and m(X).logits.shape == (4, 64, 256)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    print("SCENARIO OK")
    """)
