"""Threads that cannot start (issue #24): libgomp ends the process ("libgomp: Thread creation
failed", exit 1) when a team's threads cannot be created. stackformer checks, before the first
team of a new size, that its threads can exist at once and otherwise caps teams at what could
start; results are the same bits (they do not depend on the thread count). Each scenario runs
in its own interpreter under a limit on its address space, so the 8 MiB stack of a new thread
cannot be mapped."""
import subprocess
import sys
import textwrap

from conftest import subprocess_env

SCENARIO = """
import resource, numpy as np, stackformer as sf
sf.set_num_threads(1)
m = sf.Model(sf.Config(vocab_size=256, d_model=128, n_heads=4, n_layers=2, max_seq_len=64), seed=0)
x = np.random.default_rng(0).integers(0, 256, (4, 64))
ref = m(x).logits.copy()                      # one thread: no team, the workspace is kept
tg = np.random.default_rng(1).integers(0, 256, (4, 64))
m2 = sf.Model(m.config, seed=0)
loss1 = m2.forward_backward(x, tg)
assert sf.threads_capped() is None
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (6 << 20), resource.RLIM_INFINITY))
sf.set_num_threads(2)
out = m(x).logits                             # a team of 2 is asked for: its thread cannot start
assert np.array_equal(out, ref), "different logits"
print("capped:", sf.threads_capped(), "threads:", sf.get_num_threads())
assert sf.threads_capped() is not None and sf.get_num_threads() == 1
assert m2.forward_backward(x, tg) is not None  # training runs too
print("SCENARIO OK")
"""


def test_a_thread_that_cannot_start_caps_the_team_instead_of_ending_the_process():
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(SCENARIO)], env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "SCENARIO OK" in r.stdout, (r.returncode, r.stdout + r.stderr)
    assert "could start only 1 of 2 threads" in r.stdout


def test_no_cap_where_threads_start():
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import numpy as np, stackformer as sf
        sf.set_num_threads(2)
        m = sf.Model(sf.Config(vocab_size=256, d_model=128, n_heads=4, n_layers=2, max_seq_len=64), seed=0)
        m(np.zeros((4, 64), np.int64))
        assert sf.threads_capped() is None and sf.get_num_threads() == 2
        print("SCENARIO OK")
    """)], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert "SCENARIO OK" in r.stdout, r.stdout + r.stderr
