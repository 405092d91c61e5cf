"""Presets: the shapes of the papers' tables at CPU scale on the embedded corpus.

Each preset lists its rows as Config overrides. Rows whose wiring or knob Config does not
accept yet (DenseFormer, mHC, the ablation knobs of issues #19/#20) are left out of the grid
and listed in `spec.skipped`, so they join the preset by themselves once Config accepts them.
`scale` multiplies the training steps (and so the runtime).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

from . import budget
from .spec import StudySpec, Wiring, unavailable_reason

__all__ = ["PRESETS", "preset", "preset_names", "estimate_seconds"]

FULL = {"residual": "attnres_full"}
BLOCK4 = {"residual": "attnres_block", "attnres_block_size": 4}
# competitor wirings of issue #19, by the names that issue fixes
COMPETITORS = [
    ("denseformer", {"residual": "denseformer"}),
    ("hyper_connections", {"residual": "hyper_connections"}),
    ("mhc", {"residual": "mhc"}),
]

# Single-core training throughput this estimate assumes (FLOP/s, measured roughly on the
# project's 2-core VM at d_model 64: 38-48 GFLOP/s for one run alone on one core, less with two side by side), and the fixed
# cost of a run (model build, evaluation, traces, storing).
_FLOPS_PER_CORE = 35e9
_RUN_OVERHEAD_S = 1.0


def _rows(rows: List[Tuple[str, Dict]], base: Dict) -> Tuple[List[Wiring], List[Tuple[str, str]]]:
    keep, skipped = [], []
    for name, over in rows:
        over = dict(over)
        extra = over.pop("extra_layers", 0)
        match = over.pop("match_params", True)
        why = unavailable_reason(over, base)
        if why is None:
            keep.append(Wiring(name, over, extra, match))
        else:
            skipped.append((name, why))
    return keep, skipped


def _spec(name: str, rows, scale: float, description: str, **kw) -> StudySpec:
    base = kw.pop("base", {})
    wirings, skipped = _rows(rows, base)
    steps = max(10, int(round(kw.pop("steps", 300) * scale)))
    spec = StudySpec(name=name, wirings=wirings, skipped=skipped, steps=steps, base=base,
                     description=description, **kw)
    spec.expected_runtime = (f"about {_fmt_s(estimate_seconds(spec))} on 2 cores "
                             f"(approximate: estimated from FLOPs at ~{_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s "
                             f"per core; a shared machine runs slower)")
    return spec


def estimate_seconds(spec: StudySpec, cores: int = 2) -> float:
    """Rough wall time of a study on `cores` cores (each run on one core)."""
    total = 0.0
    for cell in spec.cells():
        f, _ = budget.train_flops(cell.config, spec.seq_len, spec.batch_size, cell.steps)
        ev = budget.forward_flops(cell.config, spec.seq_len)[0] * spec.batch_size * (
            spec.final_eval_batches + spec.eval_batches * 11)
        total += (f + ev) / _FLOPS_PER_CORE + _RUN_OVERHEAD_S
    return total / max(1, cores)


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min"


def main_rows(block_size: int = 4) -> List[Tuple[str, str, Dict]]:
    """(stack name, row label, Config overrides) of the main job's wirings, in order."""
    return [("plain", "plain", {}), ("attnres_full", "attnres_full", FULL),
            ("attnres_block", f"attnres_block(S={block_size})",
             {"residual": "attnres_block", "attnres_block_size": block_size}),
            ("moda", "moda", {"moda": True})] + [(n, n, o) for n, o in COMPETITORS]


def quick_version(spec: StudySpec) -> StudySpec:
    """The same grid (wirings, depths, lrs) at smoke-test sizes: width 32, 20 steps of 4 x 32
    tokens, 2 seeds, a 200 KB corpus. Seconds, and the numbers mean nothing."""
    import dataclasses
    q = dataclasses.replace(spec, widths=(32,), head_dim=16, steps=20, batch_size=4, seq_len=32,
                            seeds=2, eval_batches=2, final_eval_batches=2, eval_every=10,
                            corpus_max_bytes=200_000, name=spec.name + "-quick")
    q.expected_runtime = f"about {_fmt_s(estimate_seconds(q))} on 2 cores (approximate)"
    return q


def main_job(scale: float = 1.0) -> StudySpec:
    """`python -m stackformer`: plain vs Full/Block AttnRes vs MoDA (and the competitor wirings
    once Config has them), parameter-matched, 4 seeds."""
    rows = [("plain", {}), ("attnres_full", FULL), ("attnres_block(S=4)", BLOCK4),
            ("moda", {"moda": True})] + COMPETITORS
    return _spec("main", rows, scale, "the main job: does a depth wiring beat the plain residual "
                 "stack at equal parameters, data and steps?", depths=(6,), widths=(64,), seeds=4,
                 steps=250, batch_size=16, seq_len=64, corpus_max_bytes=2_000_000)


def quick(scale: float = 1.0) -> StudySpec:
    """A seconds-long smoke study (CI, tests): tiny sizes, 2 seeds, 20 steps."""
    rows = [("plain", {}), ("attnres_full", FULL), ("attnres_block(S=4)", BLOCK4),
            ("moda", {"moda": True})] + COMPETITORS
    return _spec("quick", rows, scale, "smoke run: tiny sizes, numbers mean nothing",
                 depths=(2,), widths=(32,), seeds=2, steps=20, batch_size=4, seq_len=32,
                 eval_batches=2, final_eval_batches=2, eval_every=10, corpus_max_bytes=200_000)


def attnres_table4(scale: float = 1.0) -> StudySpec:
    """AttnRes paper Table 4: baseline, DenseFormer, mHC, Full AttnRes and its ablations,
    Block AttnRes (S=4) and its ablations; 8 blocks (16 sublayers), 5 seeds."""
    rows = [
        ("baseline (pre-norm)", {}),
        ("DenseFormer", {"residual": "denseformer"}),
        ("mHC", {"residual": "mhc"}),
        ("Full AttnRes", FULL),
        ("Full w/ input-dependent query", dict(FULL, attnres_query="input")),
        ("Full w/ input-independent mixing", dict(FULL, attnres_mixing="static", attnres_key_norm=False)),
        ("Full w/ sigmoid", dict(FULL, attnres_mixing="sigmoid")),
        ("Full w/o RMSNorm", dict(FULL, attnres_key_norm=False)),
        ("Full SWA (W=8)", dict(FULL, attnres_window=8)),
        ("Block AttnRes (S=4)", BLOCK4),
        ("Block w/ multihead (H=4)", dict(BLOCK4, attnres_heads=4)),
        ("Block w/o RMSNorm", dict(BLOCK4, attnres_key_norm=False)),
    ]
    return _spec("attnres-table4", rows, scale, "Attention Residuals Table 4 (ablations) at CPU scale",
                 depths=(8,), widths=(64,), seeds=5, steps=300)


def attnres_blocksize(scale: float = 1.0) -> StudySpec:
    """Block size sweep S = 2..32 at 16 blocks (32 sublayers), with plain and Full beside it."""
    rows = [("baseline (pre-norm)", {}), ("Full AttnRes (S=1)", FULL)] + [
        (f"Block S={S}", {"residual": "attnres_block", "attnres_block_size": S}) for S in (2, 4, 8, 16, 32)]
    return _spec("attnres-blocksize", rows, scale, "Block AttnRes block size sweep (S = 2..32 sublayers)",
                 depths=(16,), widths=(64,), seeds=3, steps=250)


def moda_table3(scale: float = 1.0) -> StudySpec:
    """MoDA Table 3 rows 1-5: the plain baseline, the same baseline 2 blocks deeper (not
    parameter-matched: it is the 'spend the extra compute on depth' control), and MoDA with depth
    K/V from attention only, attention + FFN (today's MoDA) and attention + FFN + extra projections."""
    rows = [
        ("1 baseline", {}),
        ("2 baseline +2 blocks", {"extra_layers": 2, "match_params": False}),
        ("3 MoDA depth KV: attn", {"moda": True, "moda_depth_kv": "attn"}),
        ("4 MoDA depth KV: attn+ffn", {"moda": True}),
        ("5 MoDA depth KV: attn+ffn+extra", {"moda": True, "moda_depth_kv": "attn+ffn+extra"}),
    ]
    return _spec("moda-table3", rows, scale, "MoDA Table 3 rows 1-5 at CPU scale",
                 depths=(6,), widths=(64,), seeds=5, steps=300)


def moda_norm(scale: float = 1.0) -> StudySpec:
    """Pre- vs post-norm, with and without MoDA's depth KV (MoDA's norm-placement table)."""
    rows = [
        ("plain pre-norm", {}),
        ("plain post-norm", {"norm_position": "post"}),
        ("MoDA pre-norm", {"moda": True}),
        ("MoDA post-norm", {"moda": True, "norm_position": "post"}),
    ]
    return _spec("moda-norm", rows, scale, "pre- vs post-norm with and without MoDA depth KV",
                 depths=(6,), widths=(64,), seeds=5, steps=300)


def depth_sweep(scale: float = 1.0) -> StudySpec:
    """Does the gap to plain grow with depth? 4, 8, 16, 32 blocks, 3 seeds."""
    rows = [("plain", {}), ("attnres_full", FULL), ("attnres_block(S=4)", BLOCK4),
            ("moda", {"moda": True})]
    return _spec("depth-sweep", rows, scale, "the wirings' gap to plain across depth (4..32 blocks)",
                 depths=(4, 8, 16, 32), widths=(64,), seeds=3, steps=200)


PRESETS: Dict[str, Callable[[float], StudySpec]] = {
    "main": main_job,
    "quick": quick,
    "attnres-table4": attnres_table4,
    "attnres-blocksize": attnres_blocksize,
    "moda-table3": moda_table3,
    "moda-norm": moda_norm,
    "depth-sweep": depth_sweep,
}


def preset_names() -> List[str]:
    return list(PRESETS)


def preset(name: str, scale: float = 1.0) -> StudySpec:
    """The StudySpec of a named preset, its steps multiplied by `scale` (> 0)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a number > 0, got {scale!r}")
    return PRESETS[name](float(scale))
