"""Checkpoint files under faults (issue #24): loading checks the 8-byte header, the metadata
and the tensor list against the file's size before it reads tensors or builds a model, and
reads only regular files; saving writes through symlinks, gives new files the umask's mode,
cleans up temporaries of killed saves, keeps the previous checkpoint whole when a write fails
(file-size limit), and refuses a missing directory before serializing anything."""
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import stackformer as sf
from stackformer import checkpoint as ck
from conftest import subprocess_env

CFG = dict(vocab_size=64, d_model=32, n_heads=4, n_layers=2, max_seq_len=16)
X = np.random.default_rng(0).integers(0, 64, (2, 8))


@pytest.fixture
def m():
    return sf.Model(sf.Config(**CFG), seed=0)


def _junk_with_header(path, header_len, size):
    with open(path, "wb") as f:
        f.write(header_len.to_bytes(8, "little"))
        f.truncate(size)  # sparse: no disk used


def test_load_checks_the_header_before_reading_a_huge_file(tmp_path, monkeypatch):
    """A 4 GiB junk file (sparse) is refused from its first 8 bytes: nothing else is read."""
    p = tmp_path / "junk.safetensors"
    _junk_with_header(p, 2**40, 4 * 2**30)
    reads = []
    real_read = ck.os.fdopen

    def spy(*a, **kw):
        f = real_read(*a, **kw)
        orig = f.read
        f.read = lambda n=-1: (reads.append(n), orig(n))[1]
        return f

    monkeypatch.setattr(ck.os, "fdopen", spy)
    with pytest.raises(ValueError, match="header"):
        sf.Model.load(str(p))
    assert reads and all(0 <= n <= 8 for n in reads), reads
    # a plausible header of junk: refused after reading it, not the rest
    reads.clear()
    _junk_with_header(p, 100, 4 * 2**30)
    with pytest.raises(ValueError):
        sf.Model.load(str(p))
    assert all(0 <= n <= 100 for n in reads), reads


def test_load_checks_the_tensor_list_before_building_the_model(tmp_path, monkeypatch):
    """A tiny file whose config asks for 600M parameters is refused without building them."""
    big = dict(vocab_size=50000, d_model=4096, n_heads=32, n_layers=3, max_seq_len=1024)
    cfg = sf.Config(**big)
    header = {"__metadata__": {"format": "stackformer/1", "config": cfg.to_json()},
              "tok_emb.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
    blob = json.dumps(header).encode()
    p = tmp_path / "forged.safetensors"
    p.write_bytes(len(blob).to_bytes(8, "little") + blob + b"\0" * 64)
    built = []
    monkeypatch.setattr(sf.Model, "__init__", lambda self, *a, **k: built.append(1))
    with pytest.raises(ValueError, match="missing tensor|shape"):
        sf.Model.load(str(p))
    assert not built


@pytest.mark.parametrize("corrupt", ["dtype", "shape", "offsets", "extra", "missing"])
def test_load_names_a_bad_tensor_entry(m, tmp_path, corrupt):
    p = tmp_path / "c.safetensors"
    m.save(str(p))
    tensors = load_file(str(p))
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    name = "layers.0.attn.q_proj.weight"
    if corrupt == "dtype":
        tensors[name] = tensors[name].astype(np.float64)
    elif corrupt == "shape":
        tensors[name] = tensors[name].reshape(-1)
    elif corrupt == "extra":
        tensors["bogus"] = np.zeros(3, np.float32)
    elif corrupt == "missing":
        del tensors[name]
    save_file(tensors, str(p), metadata=meta)
    if corrupt == "offsets":
        data = bytearray(p.read_bytes())
        hl = int.from_bytes(data[:8], "little")
        h = json.loads(data[8:8 + hl])
        h[name]["data_offsets"][1] += 10**9
        blob = json.dumps(h).encode()
        data = len(blob).to_bytes(8, "little") + blob + bytes(data[8 + hl:])
        p.write_bytes(data)
    with pytest.raises(ValueError, match="bogus" if corrupt == "extra" else "q_proj"):
        sf.Model.load(str(p))


def test_load_refuses_a_fifo_and_dev_zero_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    result = []
    th = threading.Thread(target=lambda: result.append(_load_error(str(fifo))), daemon=True)
    th.start()
    th.join(20)
    assert not th.is_alive(), "loading a FIFO blocked"
    assert "regular file" in result[0]
    assert "regular file" in _load_error("/dev/zero")
    assert "regular file" in _load_error(str(tmp_path))  or "directory" in _load_error(str(tmp_path)).lower()


def _load_error(path):
    try:
        sf.Model.load(path)
    except (ValueError, OSError) as e:
        return str(e)
    return "loaded"


def test_save_writes_through_a_symlink(m, tmp_path):
    real = tmp_path / "real.safetensors"
    link = tmp_path / "latest.safetensors"
    m.save(str(real))
    link.symlink_to(real)
    m.train_step(X, X, lr=1e-2)
    m.save(str(link))
    assert link.is_symlink() and os.readlink(link) == str(real)
    np.testing.assert_array_equal(sf.Model.load(str(real)).flat_params, m.flat_params)


def test_save_respects_the_umask_and_keeps_an_existing_mode(m, tmp_path):
    old = os.umask(0o027)
    try:
        p = tmp_path / "a.safetensors"
        m.save(str(p))
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    finally:
        os.umask(old)
    os.chmod(p, 0o604)
    m.save(str(p))
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o604


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(m, tmp_path):
    target = tmp_path / "c.safetensors"
    m.save(str(target))
    script = textwrap.dedent(f"""
        import os, signal, stackformer as sf
        from stackformer import checkpoint as ck
        def die(fd):
            os.kill(os.getpid(), signal.SIGKILL)
        ck.os.fsync = die
        m = sf.Model(sf.Config(**{CFG!r}), seed=1)
        m.save({str(target)!r})
    """)
    env = subprocess_env()
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
        assert r.returncode == -signal.SIGKILL
    # the second killed save already removed the first one's temporary
    stale = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert len(stale) == 1
    # a live process's temporary (ours: a save in flight in another thread) and files not
    # of our naming stay
    live = f".tmp-c.safetensors.{os.getpid()}.0123abcd.part"
    (tmp_path / live).write_bytes(b"x")
    (tmp_path / ".tmp-unrelated.part").write_bytes(b"x")
    np.testing.assert_array_equal(sf.Model.load(str(target)).flat_params, m.flat_params)
    m.save(str(target))
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith(".tmp-"))
    assert left == sorted([live, ".tmp-unrelated.part"])


def test_file_size_limit_during_save_keeps_the_previous_checkpoint(tmp_path):
    """RLIMIT_FSIZE: the write fails with OSError (EFBIG; Python ignores SIGXFSZ), the old
    file is untouched and no temporary is left. A full disk takes the same path (ENOSPC)."""
    target = tmp_path / "c.safetensors"
    script = textwrap.dedent(f"""
        import os, resource, numpy as np, stackformer as sf
        m = sf.Model(sf.Config(**{CFG!r}), seed=0)
        m.save({str(target)!r})
        before = open({str(target)!r}, "rb").read()
        big = sf.Model(sf.Config(**dict({CFG!r}, vocab_size=4096)), seed=1)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 1000, resource.RLIM_INFINITY))
        try:
            big.save({str(target)!r})
        except OSError as e:
            print("OSError", e.errno)
        else:
            raise SystemExit("save did not fail")
        assert open({str(target)!r}, "rb").read() == before
        assert not [n for n in os.listdir({str(tmp_path)!r}) if n.startswith(".tmp-")]
        np.testing.assert_array_equal(sf.Model.load({str(target)!r}).flat_params, m.flat_params)
        print("SCENARIO OK")
    """)
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-c", script], env=env, timeout=120, capture_output=True, text=True)
    assert r.returncode == 0 and "SCENARIO OK" in r.stdout, r.stdout + r.stderr
    assert "OSError 27" in r.stdout  # EFBIG


def test_saving_into_a_missing_directory_fails_before_serializing(m, tmp_path, monkeypatch):
    import safetensors.numpy as stn
    calls = []
    monkeypatch.setattr(stn, "save", lambda *a, **k: calls.append(1) or b"")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        m.save(str(tmp_path / "nope" / "c.safetensors"))
    with pytest.raises(IsADirectoryError):
        m.save(str(tmp_path))
    assert not calls


def test_a_directory_without_write_access_fails_before_serializing(m, tmp_path, monkeypatch):
    """(As root every directory is writable, so access() is what the check asks.)"""
    import safetensors.numpy as stn
    calls = []
    monkeypatch.setattr(stn, "save", lambda *a, **k: calls.append(1) or b"")
    monkeypatch.setattr(ck.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="not writable"):
        m.save(str(tmp_path / "c.safetensors"))
    assert not calls and os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_saving_into_a_read_only_directory_fails_before_writing(m, tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(d, 0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            m.save(str(d / "c.safetensors"))
        assert os.listdir(d) == []
    finally:
        os.chmod(d, 0o700)


@pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged case runs in the test above")
def test_saving_into_a_read_only_directory_fails_before_writing_as_another_user(tmp_path):
    """Run as root (as CI is), the real check runs in a child that imports as root, then drops
    to user nobody (root writes into any directory; nobody may not run the interpreter)."""
    opened = [(p, os.stat(p).st_mode) for p in [tmp_path, *tmp_path.parents][:3]]
    for p, mode in opened:  # pytest's base directory is 0700: open the way (restored below)
        os.chmod(p, mode | 0o055)
    try:
        _save_as_nobody(tmp_path)
    finally:
        for p, mode in opened:
            os.chmod(p, mode)


def _save_as_nobody(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    script = textwrap.dedent(f"""
        import os, stackformer as sf, safetensors.numpy
        from stackformer import checkpoint
        m = sf.Model(sf.Config(**{CFG!r}), seed=0)
        os.setgid(65534)
        os.setuid(65534)
        try:
            m.save({str(ro / "c.safetensors")!r})
        except PermissionError as e:
            assert "not writable" in str(e), e
            print("SCENARIO OK")
    """)
    r = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), cwd="/",
                       capture_output=True, text=True, timeout=120)
    assert "SCENARIO OK" in r.stdout, r.stdout + r.stderr
    assert os.listdir(ro) == []
    # a directory behind one it may not search is named as such, not as missing
    os.chmod(tmp_path, 0o700)
    r = subprocess.run([sys.executable, "-c", script.replace('"not writable"', '"cannot be reached"')],
                       env=subprocess_env(), cwd="/", capture_output=True, text=True, timeout=120)
    assert "SCENARIO OK" in r.stdout, r.stdout + r.stderr
