#!/usr/bin/env python3
"""Same speed before and after a refactor, measured in one run.

    python benchmarks/before_after.py --before /path/to/old/python --after python
    python benchmarks/before_after.py --before ../old/python --configs S,M --modes plain,moda

Each side is a directory that holds an importable `stackformer` package with its built
extension (a checkout's `python/` after `python setup.py build_ext --inplace`). One worker
process per side imports its own package; the two take turns within every repetition (before,
after, after, before, ...), so a change of machine load hits both alike. Reported per case:
median time of each side and the median of the per-round ratios after / before (< 1: the
refactor is faster), with the spread of those ratios. Also checks that both sides compute the
same logits bit for bit (a refactor that keeps results must).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sfbench.matrix import CONFIGS, LR, MODES, make_batch  # noqa: E402


def worker() -> None:
    """JSON lines on stdin: setup / run / logits_hash / quit."""
    import hashlib
    import stackformer as sf
    out = sys.stdout
    sys.stdout = sys.stderr
    state = {}
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg["op"]
        if op == "quit":
            break
        if op == "setup":
            sf.set_num_threads(msg["threads"])
            cfg = sf.Config(**msg["config"])
            state["m"] = sf.Model(cfg, seed=0)
            state["x"], state["y"] = make_batch(cfg.vocab_size, msg["B"], msg["T"])
            r = {"file": sf.__file__}
        elif op == "hash":
            r = {"sha": hashlib.sha256(state["m"](state["x"]).logits.tobytes()).hexdigest()[:16]}
        else:
            m, x, y = state["m"], state["x"], state["y"]
            fn = (lambda: m(x)) if msg["what"] == "forward" else (lambda: m.train_step(x, y, lr=LR))
            t0 = time.perf_counter()
            fn()
            r = {"t": time.perf_counter() - t0}
        out.write(json.dumps(r) + "\n")
        out.flush()


class Side:
    def __init__(self, path: str, threads: int):
        env = dict(os.environ, PYTHONPATH=str(Path(path).resolve()))
        self.p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
        self.threads = threads

    def call(self, **msg):
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited ({self.p.poll()})")
        return json.loads(line)

    def close(self):
        try:
            self.call(op="quit")
        except Exception:
            pass
        self.p.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="directory holding the old stackformer package")
    ap.add_argument("--after", default=str(HERE.parent / "python"), help="directory holding the new one")
    ap.add_argument("--configs", default="S,M")
    ap.add_argument("--modes", default="plain,attnres_full,attnres_block,moda")
    ap.add_argument("--what", default="forward,train")
    ap.add_argument("--reps", type=int, default=9, help="rounds per case (each round times both sides twice)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", default=None, help="JSON results path")
    a = ap.parse_args(argv)
    rows = []
    print(f"before: {a.before}\nafter:  {a.after}\nthreads {a.threads}, {a.reps} rounds (B A A B) per case")
    print(f"{'case':<28}{'before ms':>11}{'after ms':>10}{'after/before':>14}{'ratio IQR':>18}  logits")
    for cname in a.configs.split(","):
        spec = CONFIGS[cname]
        for mode in a.modes.split(","):
            cfg = dict(vocab_size=spec["vocab_size"], d_model=spec["d_model"], n_heads=spec["n_heads"],
                       n_layers=spec["n_layers"], max_seq_len=spec["T"], **MODES[mode])
            sides = [Side(a.before, a.threads), Side(a.after, a.threads)]
            try:
                for s in sides:
                    s.call(op="setup", config=cfg, B=spec["B"], T=spec["T"], threads=a.threads)
                same = sides[0].call(op="hash")["sha"] == sides[1].call(op="hash")["sha"]
                for what in a.what.split(","):
                    for s in sides:  # warm-up
                        s.call(op="run", what=what)
                        s.call(op="run", what=what)
                    tb, ta = [], []
                    for _ in range(a.reps):
                        b1 = sides[0].call(op="run", what=what)["t"]
                        a1 = sides[1].call(op="run", what=what)["t"]
                        a2 = sides[1].call(op="run", what=what)["t"]
                        b2 = sides[0].call(op="run", what=what)["t"]
                        tb.append((b1 + b2) / 2)
                        ta.append((a1 + a2) / 2)
                    ratios = sorted(x / y for x, y in zip(ta, tb))
                    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [ratios[0], 0, ratios[-1]]
                    row = {"config": cname, "mode": mode, "what": what, "before_s": statistics.median(tb),
                           "after_s": statistics.median(ta), "ratio_median": statistics.median(ratios),
                           "ratio_q1": q[0], "ratio_q3": q[2], "same_logits": same}
                    rows.append(row)
                    print(f"{cname + '/' + mode + ' ' + what:<28}{row['before_s'] * 1e3:>11.1f}{row['after_s'] * 1e3:>10.1f}"
                          f"{row['ratio_median']:>13.3f}x{'[' + format(q[0], '.3f') + ', ' + format(q[2], '.3f') + ']':>18}"
                          f"  {'same bits' if same else 'DIFFERENT'}", flush=True)
            finally:
                for s in sides:
                    s.close()
    if a.out:
        Path(a.out).write_text(json.dumps({"before": a.before, "after": a.after, "threads": a.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--_worker"]:
        worker()
        sys.exit(0)
    sys.exit(main())
