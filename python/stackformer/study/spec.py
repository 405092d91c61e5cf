"""What a study runs: a grid of wirings x depths x widths x learning rates x seeds, one budget.

A wiring is a name and a dict of Config overrides, so any field or knob Config accepts (today's
or one added later) can be a row. Every cell of the grid is validated through Config before
anything runs; a bad cell raises naming the cell and the field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..config import Config
from . import budget

__all__ = ["Wiring", "StudySpec", "Cell", "cell_key", "config_fields", "unavailable_reason"]

# Config fields a study sets itself from its axes (a wiring may not override them).
AXIS_FIELDS = ("n_layers", "d_model", "max_seq_len")


def config_fields() -> List[str]:
    """The fields of the Config dataclass (what a wiring may override)."""
    return [f.name for f in dataclasses.fields(Config)]


@dataclass
class Wiring:
    """One row of a study.

    name: its label in tables and figures.
    config: Config overrides (e.g. {"residual": "attnres_block", "attnres_block_size": 4}).
    extra_layers: blocks added to every depth of the grid (e.g. +2 for MoDA's deeper baseline).
    match_params: adjust d_ff so the run has the baseline's parameter count (when the study
        matches parameters); False keeps d_ff (a deeper baseline is meant to be bigger).
    """

    name: str
    config: Dict[str, Any] = field(default_factory=dict)
    extra_layers: int = 0
    match_params: bool = True

    @classmethod
    def coerce(cls, w: Any, name: Optional[str] = None) -> "Wiring":
        if isinstance(w, Wiring):
            return w
        if isinstance(w, dict):
            if name is None:
                raise TypeError("a wiring given as a dict needs a name: use {name: overrides}")
            w = dict(w)
            extra = w.pop("extra_layers", 0)
            match = w.pop("match_params", True)
            return cls(name=name, config=w, extra_layers=extra, match_params=match)
        raise TypeError(f"a wiring must be a Wiring or a dict of Config overrides, got {type(w).__name__}")


@dataclass
class Cell:
    """One run of the grid (the unit stored, keyed by `key`)."""

    wiring: str
    depth: int          # the grid's depth (the run has depth + extra_layers blocks)
    width: int
    lr: float
    seed: int
    config: Config
    steps: int
    key: str = ""

    @property
    def label(self) -> str:
        return f"{self.wiring} depth {self.depth} width {self.width} lr {self.lr:g} seed {self.seed}"


@dataclass
class StudySpec:
    """A study: the grid, the shared budget and how to compare.

    wirings: list of Wiring (or a dict name -> Config overrides); the first is the baseline
        unless `baseline` names another.
    depths (n_layers), widths (d_model), lrs (peak learning rates), seeds (an int n means
        0..n-1; each seed sets both the model's init and the batch order, so the same seed
        sees the same data in the same order under every wiring).
    base: Config fields shared by every cell (e.g. {"n_heads": 4}); n_heads defaults to
        width // head_dim.
    steps, batch_size, seq_len, warmup, weight_decay, clip_norm: the budget of each run (same
        tokens for every run unless equal="flops").
    equal: "tokens" (same steps for all) or "flops" (each wiring's steps scaled so its
        training FLOPs equal the baseline's at that depth and width).
    match_params: adjust d_ff of each wiring (not its width) to the baseline's parameter count.
    eval_every, eval_batches: validation curve during training (sf.train's, per-seed batches).
    final_eval_batches: the final metric: mean validation loss over this many fixed batches,
        the same batches for every run (seed-independent), after training.
    corpus_max_bytes / corpus_file: the data (default: the embedded standard-library corpus).
    skipped: rows a preset could not include (name, reason), listed in the report.
    """

    name: str = "study"
    wirings: Any = None
    baseline: Optional[str] = None
    depths: Sequence[int] = (4,)
    widths: Sequence[int] = (64,)
    lrs: Sequence[float] = (3e-3,)
    seeds: Union[int, Sequence[int]] = 3
    base: Dict[str, Any] = field(default_factory=dict)
    head_dim: int = 16
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    warmup: Optional[int] = None
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    equal: str = "tokens"
    match_params: bool = True
    eval_every: Optional[int] = None
    eval_batches: int = 4
    final_eval_batches: int = 16
    corpus_max_bytes: int = 2_000_000
    corpus_file: Optional[str] = None
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    description: str = ""
    expected_runtime: str = ""

    # -- normalisation and validation ---------------------------------------------------------
    def wiring_list(self) -> List[Wiring]:
        w = self.wirings
        if w is None:
            raise ValueError("StudySpec.wirings is empty: give at least one wiring")
        if isinstance(w, dict):
            out = [Wiring.coerce(v, k) for k, v in w.items()]
        elif isinstance(w, (list, tuple)):
            out = [Wiring.coerce(v) for v in w]
        else:
            raise TypeError(f"StudySpec.wirings must be a list of Wiring or a dict name -> overrides, "
                            f"got {type(w).__name__}")
        if not out:
            raise ValueError("StudySpec.wirings is empty: give at least one wiring")
        return out

    def seed_list(self) -> List[int]:
        s = self.seeds
        if _is_int(s):
            if s < 1:
                raise ValueError(f"StudySpec.seeds must be >= 1, got {s}")
            return list(range(int(s)))
        if not isinstance(s, (list, tuple)) or not s:
            raise ValueError(f"StudySpec.seeds must be an int >= 1 or a non-empty list of ints, got {s!r}")
        if not all(_is_int(v) and v >= 0 for v in s):
            raise ValueError(f"StudySpec.seeds must hold ints >= 0, got {list(s)!r}")
        if len(set(s)) != len(s):
            raise ValueError(f"StudySpec.seeds has duplicates: {list(s)!r}")
        return [int(v) for v in s]

    def baseline_name(self) -> str:
        ws = self.wiring_list()
        if self.baseline is None:
            return ws[0].name
        if self.baseline not in [w.name for w in ws]:
            raise ValueError(f"StudySpec.baseline {self.baseline!r} is not one of the wirings "
                             f"({', '.join(w.name for w in ws)})")
        return self.baseline

    def validate(self) -> None:
        """Check every field (each message names it); cells() also validates every cell."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("StudySpec.name must be a non-empty string")
        ws = self.wiring_list()
        names = [w.name for w in ws]
        for w in ws:
            if not isinstance(w.name, str) or not w.name:
                raise ValueError(f"every wiring needs a non-empty string name, got {w.name!r}")
            if not isinstance(w.config, dict):
                raise TypeError(f"wiring {w.name!r}: config must be a dict of Config overrides")
            bad = [k for k in w.config if k in AXIS_FIELDS]
            if bad:
                raise ValueError(f"wiring {w.name!r} sets {', '.join(bad)}: those come from the study's "
                                 f"axes (depths, widths, seq_len); use extra_layers for a deeper row")
            unknown = [k for k in w.config if k not in config_fields()]
            if unknown:
                raise ValueError(f"wiring {w.name!r}: unknown Config field(s) {', '.join(unknown)}")
            if not _is_int(w.extra_layers) or w.extra_layers < 0:
                raise ValueError(f"wiring {w.name!r}: extra_layers must be an int >= 0, got {w.extra_layers!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"StudySpec.wirings has duplicate names: {names}")
        self.baseline_name()
        for fname in ("depths", "widths"):
            v = getattr(self, fname)
            if not isinstance(v, (list, tuple)) or not v or not all(_is_int(x) and x >= 1 for x in v):
                raise ValueError(f"StudySpec.{fname} must be a non-empty list of ints >= 1, got {v!r}")
            if len(set(v)) != len(v):
                raise ValueError(f"StudySpec.{fname} has duplicates: {list(v)!r}")
        if not isinstance(self.lrs, (list, tuple)) or not self.lrs or not all(
                isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                for x in self.lrs):
            raise ValueError(f"StudySpec.lrs must be a non-empty list of positive numbers, got {self.lrs!r}")
        if len(set(float(x) for x in self.lrs)) != len(self.lrs):
            raise ValueError(f"StudySpec.lrs has duplicates: {list(self.lrs)!r}")
        self.seed_list()
        for fname in ("steps", "batch_size", "seq_len", "final_eval_batches", "head_dim"):
            v = getattr(self, fname)
            if not _is_int(v) or v < 1:
                raise ValueError(f"StudySpec.{fname} must be an int >= 1, got {v!r}")
        if not _is_int(self.eval_batches) or self.eval_batches < 0:
            raise ValueError(f"StudySpec.eval_batches must be an int >= 0, got {self.eval_batches!r}")
        for fname in ("warmup", "eval_every"):
            v = getattr(self, fname)
            if v is not None and (not _is_int(v) or v < 0):
                raise ValueError(f"StudySpec.{fname} must be None or an int >= 0, got {v!r}")
        if self.equal not in ("tokens", "flops"):
            raise ValueError(f"StudySpec.equal must be 'tokens' or 'flops', got {self.equal!r}")
        if not isinstance(self.base, dict):
            raise TypeError("StudySpec.base must be a dict of Config fields")
        unknown = [k for k in self.base if k not in config_fields()]
        if unknown:
            raise ValueError(f"StudySpec.base: unknown Config field(s) {', '.join(unknown)}")
        bad = [k for k in self.base if k in AXIS_FIELDS]
        if bad:
            raise ValueError(f"StudySpec.base sets {', '.join(bad)}: use depths / widths / seq_len")
        if not _is_int(self.corpus_max_bytes) or self.corpus_max_bytes < 1000:
            raise ValueError(f"StudySpec.corpus_max_bytes must be an int >= 1000, got {self.corpus_max_bytes!r}")
        if self.corpus_file is not None and not isinstance(self.corpus_file, str):
            raise TypeError("StudySpec.corpus_file must be None or a path")

    # -- the grid -------------------------------------------------------------------------------
    def _config(self, w: Wiring, depth: int, width: int, d_ff: Optional[int] = None) -> Config:
        c: Dict[str, Any] = dict(vocab_size=256)
        if "n_heads" not in self.base and "n_heads" not in w.config:
            c["n_heads"] = max(1, width // self.head_dim)
        c.update(self.base)
        c.update(w.config)
        c.update(n_layers=depth + w.extra_layers, d_model=width, max_seq_len=self.seq_len)
        if d_ff is not None:
            c["d_ff"] = d_ff
        where = f"study cell (wiring {w.name!r}, depth {depth}, width {width})"
        try:
            return Config.from_dict(c)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def cells(self, data_signature: str = "") -> List[Cell]:
        """Every run of the study, each validated through Config, in run order: seed by seed
        (so a stopped study has complete pairs), then depth, width, lr, wiring."""
        self.validate()
        ws = self.wiring_list()
        base_name = self.baseline_name()
        base_w = next(w for w in ws if w.name == base_name)
        configs: Dict[Tuple[str, int, int], Tuple[Config, int]] = {}
        for depth in self.depths:
            for width in self.widths:
                bcfg = self._config(base_w, depth, width)
                target = budget.num_params(bcfg)
                bflops, _ = budget.forward_flops(bcfg, self.seq_len)
                for w in ws:
                    cfg = self._config(w, depth, width)
                    if self.match_params and w.match_params and w.name != base_name:
                        cfg = self._config(w, depth, width, budget.match_d_ff(cfg, target))
                    steps = self.steps
                    if self.equal == "flops" and w.name != base_name:
                        f, _ = budget.forward_flops(cfg, self.seq_len)
                        steps = max(1, round(self.steps * bflops / f))
                    configs[(w.name, depth, width)] = (cfg, steps)
        out = []
        for seed in self.seed_list():
            for depth in self.depths:
                for width in self.widths:
                    for lr in self.lrs:
                        for w in ws:
                            cfg, steps = configs[(w.name, depth, width)]
                            cell = Cell(w.name, depth, width, float(lr), seed, cfg, steps)
                            cell.key = cell_key(cell, self, data_signature)
                            out.append(cell)
        return out

    def budget_dict(self, steps: int) -> Dict[str, Any]:
        """Everything besides config, seed and lr that decides a run's numbers."""
        return dict(steps=int(steps), batch_size=self.batch_size, seq_len=self.seq_len,
                    warmup=self.warmup, weight_decay=float(self.weight_decay),
                    clip_norm=float(self.clip_norm), eval_every=self.eval_every,
                    eval_batches=self.eval_batches, final_eval_batches=self.final_eval_batches,
                    corpus_max_bytes=self.corpus_max_bytes, corpus_file=self.corpus_file)

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["wirings"] = [dataclasses.asdict(w) for w in self.wiring_list()]
        d["skipped"] = [list(s) for s in self.skipped]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "StudySpec":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown StudySpec field(s): {', '.join(unknown)}")
        d["wirings"] = [Wiring(**w) if isinstance(w, dict) and "name" in w else w
                        for w in (d.get("wirings") or [])]
        d["skipped"] = [tuple(s) for s in d.get("skipped", [])]
        for k in ("depths", "widths", "lrs"):
            if k in d and isinstance(d[k], list):
                d[k] = tuple(d[k])
        return cls(**d)


def cell_key(cell: Cell, spec: StudySpec, data_signature: str = "") -> str:
    """Stable hash of (full config, seed, lr, budget, data): the same run always gets the same
    key, in any study, so a finished run is never repeated."""
    payload = dict(config=cell.config.to_dict(), seed=cell.seed, lr=float(cell.lr),
                   budget=spec.budget_dict(cell.steps), data=data_signature, version=1)
    s = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(s.encode()).hexdigest()[:24]


def unavailable_reason(overrides: Dict[str, Any], base: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """None if Config accepts these overrides (with a small base config), else why not: for
    presets, whose rows use wirings and knobs that may not exist yet."""
    unknown = [k for k in overrides if k not in config_fields()]
    if unknown:
        return f"Config has no field {', '.join(unknown)}"
    c = dict(vocab_size=256, d_model=64, n_heads=4, n_layers=4, max_seq_len=64)
    c.update(base or {})
    c.update(overrides)
    try:
        Config.from_dict(c)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
