"""Fuzz the checkpoint loading path: bytes -> stackformer.checkpoint.parse_checkpoint -> Model.

Every input must either load into a model or raise ValueError/KeyError/TypeError naming the
problem; any other exception, a crash, a hang or a runaway allocation is a finding.

    python fuzz/fuzz_checkpoint.py -atheris_runs=1000000     # coverage-guided, needs atheris
    python fuzz/fuzz_checkpoint.py --mutate 200000           # built-in mutation fuzzer, no deps
"""
import os
import random
import sys
import tempfile

import numpy as np

import stackformer as sf
from stackformer.checkpoint import parse_checkpoint

ACCEPTED = (ValueError, KeyError, TypeError)


def seeds():
    """Valid checkpoints of a few small configs (their bytes seed the corpus)."""
    out = []
    with tempfile.TemporaryDirectory() as d:
        for i, kw in enumerate([dict(), dict(residual="attnres_block", attnres_block_size=2, moda=True),
                                dict(tie_embeddings=False, pos="rope", activation="swiglu")]):
            m = sf.Model(sf.Config(vocab_size=11, d_model=8, n_heads=2, n_layers=1, max_seq_len=4, **kw), seed=i)
            p = os.path.join(d, f"{i}.safetensors")
            m.save(p, optimizer=(i == 1))
            with open(p, "rb") as f:
                out.append(f.read())
    return out


def one_input(data: bytes) -> None:
    try:
        config, tensors, meta = parse_checkpoint(data)
    except ACCEPTED:
        return
    if config.n_layers * config.d_model * config.vocab_size > 10**6:
        return  # a valid header for a huge model: building it is not the parser's business
    try:
        model = sf.Model(config)  # the C core may still refuse it, with a clear ValueError
        model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("optimizer.")})
    except ACCEPTED:
        return


def mutate(rng: random.Random, data: bytes, pool) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if op == 0 and b:      # flip a byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1:          # truncate
            b = b[: rng.randrange(len(b) + 1)]
        elif op == 2:          # lie about the header length
            n = rng.choice([0, 1, 7, len(b), len(b) - 8, 2**32, 2**63 - 1, rng.randrange(2**64)])
            b[:8] = int(n % 2**64).to_bytes(8, "little")
        elif op == 3 and b:    # splice from another seed
            other = rng.choice(pool)
            i, j = rng.randrange(len(b)), rng.randrange(len(other))
            b = b[:i] + other[j: j + rng.randint(1, 64)] + b[i:]
        elif op == 4:          # digits in the JSON header: shapes, offsets, config sizes
            digits = [i for i in range(8, min(len(b), 8 + 4096)) if 48 <= b[i] <= 57]
            if digits:
                b[rng.choice(digits)] = rng.choice(b"0123456789-")
        elif op == 5:          # duplicate a region
            if b:
                i = rng.randrange(len(b))
                b = b[:i] + b[i: i + rng.randint(1, 256)] + b[i:]
        else:                  # random tail
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    return bytes(b)


def run_mutation(n: int, seed: int = 0) -> None:
    pool = seeds()
    rng = random.Random(seed)
    for i in range(n):
        one_input(mutate(rng, rng.choice(pool), pool))
    print(f"{n} executions, no findings")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--mutate":
        run_mutation(int(sys.argv[2]))
        return
    import atheris
    pool = seeds()

    def test_one(data: bytes) -> None:
        one_input(data)

    corpus_dir = tempfile.mkdtemp(prefix="sf-fuzz-")
    for i, s in enumerate(pool):
        with open(os.path.join(corpus_dir, f"seed{i}"), "wb") as f:
            f.write(s)
    atheris.instrument_all() if hasattr(atheris, "instrument_all") else None
    atheris.Setup(sys.argv + [corpus_dir], test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
