"""stackformer.torch past one process: DistributedDataParallel and FSDP2 (`fully_shard`) on
the CPU with the gloo backend, 2 ranks on localhost.

FSDP2 unshards a group's parameters in that module's forward hooks, so its units must be
modules the model calls: the mirror runs a block as its sublayers (the wiring decides what each
reads, and AttnRes/HC read a block's norms and connection weights around them), so the units
are each block's `attn` and `mlp` (all of a block's Linear weights); norms, connection weights
and embeddings stay in the root group.

Each rank is a fresh `python` process (a script written to tmp_path, the environment a
launcher such as torchrun sets: MASTER_ADDR/PORT, RANK, WORLD_SIZE), with a timeout, so a
hang fails the test instead of CI. Both ranks start from the weights of the same
`sf.Model(cfg, seed=0)` and take half of a fixed global batch; the reference is one process
training the same module on the whole batch. Data parallelism averages the ranks' gradients,
which for equal halves is the gradient of the whole batch's mean loss: after a few SGD
(momentum) steps the weights must agree within 1e-5. (Not AdamW: tensors whose true gradient is
0, such as the key biases under softmax, get pure rounding noise as gradient, and Adam's
normalisation turns that noise into full-size steps that differ between summation orders.) The distributed run's state dict then loads back into an
`sf.Model`, whose logits must equal the trained torch module's.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed")

import stackformer as sf  # noqa: E402
from stackformer.torch import from_torch, to_torch  # noqa: E402

from conftest import WIRINGS  # noqa: E402

STEPS, B, T = 3, 4, 16
CFG = dict(vocab_size=61, d_model=32, n_heads=4, n_layers=2, max_seq_len=T)

RANK_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    import stackformer as sf
    from stackformer.torch import to_torch

    spec = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    module = to_torch(sf.Model(sf.Config(**spec["config"]), seed=0))
    if spec["mode"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(module)
    else:  # FSDP2: each block's attention and MLP its own shard group, then the root
        from torch.distributed.fsdp import fully_shard
        for block in module.layers:
            fully_shard(block.attn)
            fully_shard(block.mlp)
        wrapped = fully_shard(module)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.5, momentum=0.9)
    data = np.load(spec["data"])
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    per = x.shape[0] // world
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    for _ in range(spec["steps"]):
        logits = wrapped(xs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if spec["mode"] == "ddp":
        sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sd = {k: v.detach().numpy() for k, v in full.items()}
    if rank == 0:
        np.savez(spec["out"], **sd)
    dist.barrier()
    dist.destroy_process_group()
    # leave without running C++ static destructors: under load a gloo worker thread still
    # joinable at exit made libstdc++ abort ("terminate called without an active exception",
    # rank 1 of fsdp2, once in a full-suite run) after all the work had been done and saved
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(tmp_path, mode: str, cfg: dict, world: int = 2, timeout: float = 240):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    tok = np.random.default_rng(0).integers(0, cfg["vocab_size"], (B, T + 1))
    np.savez(tmp_path / "data.npz", x=tok[:, :-1].astype(np.int64), y=tok[:, 1:].astype(np.int64))
    out = tmp_path / f"{mode}.npz"
    spec = json.dumps({"config": cfg, "mode": mode, "steps": STEPS, "data": str(tmp_path / "data.npz"),
                       "out": str(out)})
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(r), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), spec], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{mode}: a rank did not finish within {timeout} s (hang?)")
    for r, (p, o) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"{mode} rank {r} failed:\n{o[-3000:]}"
    data = np.load(tmp_path / "data.npz")
    return dict(np.load(out)), torch.from_numpy(data["x"]), torch.from_numpy(data["y"])


def _single_process(cfg: dict, x, y):
    torch.manual_seed(0)
    module = to_torch(sf.Model(sf.Config(**cfg), seed=0))
    opt = torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.9)
    for _ in range(STEPS):
        logits = module(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return module


def _check(tmp_path, mode, cfg):
    dist_sd, x, y = _run_ranks(tmp_path, mode, cfg)
    ref = _single_process(cfg, x, y)
    ref_sd = ref.state_dict()
    assert set(dist_sd) == set(ref_sd)
    moved = 0.0
    init = to_torch(sf.Model(sf.Config(**cfg), seed=0)).state_dict()
    for k, v in ref_sd.items():
        np.testing.assert_allclose(dist_sd[k], v.numpy(), atol=1e-5, rtol=0, err_msg=f"{mode}: {k}")
        moved = max(moved, float(np.abs(v.numpy() - init[k].numpy()).max()))
    assert moved > 1e-3, "training did not move the weights: the comparison would prove nothing"
    # the distributed run's checkpoint is an sf.Model again, with the trained module's logits
    model = sf.Model(sf.Config(**cfg), seed=1)
    model.load_state_dict({k: np.ascontiguousarray(v) for k, v in dist_sd.items()})
    trained = to_torch(sf.Model(sf.Config(**cfg), seed=2))
    trained.load_state_dict({k: torch.from_numpy(v) for k, v in dist_sd.items()})
    with torch.no_grad():
        want = trained(x).numpy()
    got = model(x.numpy()).logits
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(from_torch(trained)(x.numpy()).logits, got)


@pytest.mark.parametrize("wiring", ["plain", "attnres_block", "hyper_connections", "mhc"])
def test_ddp_two_ranks_equal_one_process(tmp_path, wiring):
    _check(tmp_path, "ddp", dict(CFG, **WIRINGS[wiring]))


def test_ddp_with_moda(tmp_path):
    _check(tmp_path, "ddp", dict(CFG, moda=True, residual="attnres_full"))


def test_fsdp2_two_ranks_equal_one_process(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    _check(tmp_path, "fsdp2", dict(CFG, residual="attnres_full"))
