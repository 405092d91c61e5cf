"""Studies: does this depth wiring beat that one, here, by how much, and how sure are we?

A study trains a grid of wirings x depths x widths x learning rates x seeds on the same data in
the same order per seed with the same budget, stores every run in one SQLite file (a killed
study resumes where it stopped), and reports each wiring's final validation loss with a 95%
t-interval over seeds and its paired difference to the baseline by seed.

>>> import stackformer as sf
>>> spec = sf.study.StudySpec(wirings={"plain": {}, "full": {"residual": "attnres_full"}},
...                           depths=[4], seeds=3, steps=200)        # doctest: +SKIP
>>> sf.study.run(spec, "my-study")                                    # doctest: +SKIP
>>> df = sf.study.load("my-study")                                    # doctest: +SKIP

See docs/STUDY.md for the method and `python -m stackformer study --help` for the CLI.
"""
from __future__ import annotations

import os
from typing import Any, List

from . import budget, stats
from .presets import PRESETS, preset, preset_names
from .runner import StudyResult, resolve_paths, run
from .spec import Cell, StudySpec, Wiring
from .stats import mean_ci, paired_diff, t_quantile, verdict
from .store import Store

__all__ = ["run", "load", "StudySpec", "Wiring", "Cell", "StudyResult", "preset", "preset_names",
           "PRESETS", "t_quantile", "mean_ci", "paired_diff", "verdict", "budget", "stats", "Store"]


def load(path: str, full: bool = False) -> Any:
    """The stored runs of a study (its directory or its .sqlite file), one row per run: wiring,
    depth, width, lr, seed, params, train_flops, final_val_loss, ... and the run's config (a
    dict); with full=True also its per-step history and trace summaries. A pandas DataFrame when
    pandas is installed, else a list of dicts."""
    store_path, _ = resolve_paths(path)
    if not os.path.exists(store_path):
        raise FileNotFoundError(f"no study store at {store_path}")
    with Store(store_path) as st:
        rows: List[dict] = st.runs(full=True)
    if not full:
        for r in rows:
            r.pop("history", None)
            r.pop("traces", None)
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)
