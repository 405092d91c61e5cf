"""The results store: one SQLite file (Python's sqlite3, WAL journal) per study.

Tables
  meta(key, value)      JSON values: the spec, the calibration, the report's run count
  runs(key, ...)        one row per finished run, written in one transaction, keyed by the
                        run's stable hash (config, seed, lr, budget, data): a run is stored
                        once or not at all, so a study killed at any point (Ctrl-C, SIGKILL,
                        power loss) resumes with no finished run lost or repeated.
Only the parent process writes; worker processes hand results back.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from typing import Any, Dict, Iterable, List, Optional

__all__ = ["Store", "STORE_NAME"]

STORE_NAME = "study.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    wiring TEXT NOT NULL, depth INTEGER NOT NULL, width INTEGER NOT NULL,
    lr REAL NOT NULL, seed INTEGER NOT NULL, n_layers INTEGER NOT NULL, d_ff INTEGER NOT NULL,
    steps INTEGER NOT NULL, tokens INTEGER NOT NULL, params INTEGER NOT NULL,
    train_flops REAL NOT NULL, flops_exact INTEGER NOT NULL, depth_reads INTEGER NOT NULL,
    final_val_loss REAL, final_train_loss REAL, diverged INTEGER NOT NULL,
    wall_s REAL NOT NULL, threads INTEGER NOT NULL, finished_at REAL NOT NULL,
    config TEXT NOT NULL, budget TEXT NOT NULL, history TEXT NOT NULL, traces TEXT NOT NULL
);
"""

SCALAR_COLUMNS = ["key", "wiring", "depth", "width", "lr", "seed", "n_layers", "d_ff", "steps",
                  "tokens", "params", "train_flops", "flops_exact", "depth_reads",
                  "final_val_loss", "final_train_loss", "diverged", "wall_s", "threads", "finished_at"]
JSON_COLUMNS = ["config", "budget", "history", "traces"]


def _json(v: Any) -> str:
    return json.dumps(_clean(v), sort_keys=True, allow_nan=False)


def _clean(v: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars/arrays -> Python."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "tolist"):
        return _clean(v.tolist())
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return v


class Store:
    """A study's SQLite file. `path` is the file; its directory is created."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- meta --------------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, _json(value)))

    # -- runs ----------------------------------------------------------------------------------------
    def keys(self) -> set:
        return {r[0] for r in self.db.execute("SELECT key FROM runs")}

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def add_run(self, rec: Dict[str, Any]) -> bool:
        """Store one finished run in one transaction; False if its key is already stored (a
        run is never stored twice)."""
        cols = SCALAR_COLUMNS + JSON_COLUMNS
        vals = []
        for c in SCALAR_COLUMNS:
            v = rec.get(c, time.time() if c == "finished_at" else None)
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            vals.append(v.item() if hasattr(v, "item") else v)
        vals += [_json(rec.get(c, {})) for c in JSON_COLUMNS]
        sql = f"INSERT OR IGNORE INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        with self.db:  # BEGIN ... COMMIT
            cur = self.db.execute(sql, vals)
        return cur.rowcount == 1

    def runs(self, keys: Optional[Iterable[str]] = None, full: bool = True) -> List[Dict[str, Any]]:
        """Stored runs as dicts (JSON columns decoded when full), in finishing order."""
        cols = SCALAR_COLUMNS + (JSON_COLUMNS if full else [])
        rows = self.db.execute(f"SELECT {', '.join(cols)} FROM runs ORDER BY finished_at, key").fetchall()
        want = None if keys is None else set(keys)
        out = []
        for r in rows:
            d = dict(zip(cols, r))
            if want is not None and d["key"] not in want:
                continue
            for c in JSON_COLUMNS:
                if c in d:
                    d[c] = json.loads(d[c])
            out.append(d)
        return out
