#!/usr/bin/env python3
"""Does bf16 compute train as well as fp32? (issue #22: a 1,000-step S run in bf16 ends within
1% of the fp32 run's validation loss.)

    python benchmarks/bf16_convergence.py                 # S config, 1000 steps, ~10-20 min on 2 cores
    python benchmarks/bf16_convergence.py --steps 200 --out /tmp/bf16

Trains the benchmark's S config (d_model 128, 4 heads, 8 blocks, T 128, batch 16) twice from
the same weights on the same batches of the default corpus -- once with compute_dtype float32,
once bfloat16 -- with sf.train's defaults (AdamW, warm-up + cosine, lr 3e-3), validating every
50 steps on the same held-out batches. Writes bf16_convergence.json (both curves, the final
losses and their relative gap) and bf16_convergence.png (when matplotlib is installed) to --out.
Loss values do not depend on the machine's load or thread count (the results are
deterministic), only the time does.
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import stackformer as sf  # noqa: E402
from sfbench.matrix import CONFIGS  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--out", default=str(HERE))
    a = ap.parse_args(argv)
    spec = CONFIGS["S"]
    corpus = sf.default_corpus()
    runs = {}
    for dtype in ("float32", "bfloat16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the emulated-kernel warning: this measures losses, not speed
            cfg = sf.Config(vocab_size=spec["vocab_size"], d_model=spec["d_model"], n_heads=spec["n_heads"],
                            n_layers=spec["n_layers"], max_seq_len=spec["T"], compute_dtype=dtype)
            model = sf.Model(cfg, seed=0)
        t0 = time.perf_counter()
        h = sf.train(model, corpus, steps=a.steps, batch_size=spec["B"], seq_len=spec["T"],
                     eval_every=a.eval_every, seed=0, progress=False)
        runs[dtype] = {"val_step": list(map(int, h.val_step)), "val_loss": list(map(float, h.val_loss)),
                       "train_loss": list(map(float, h.loss)), "seconds": time.perf_counter() - t0}
        print(f"{dtype:<9} final validation loss {h.val_loss[-1]:.4f} nats/byte ({runs[dtype]['seconds']:.0f} s)",
              flush=True)
    f32, b16 = runs["float32"]["val_loss"][-1], runs["bfloat16"]["val_loss"][-1]
    gap = (b16 - f32) / f32
    verdict = "within 1%" if abs(gap) <= 0.01 else "NOT within 1%"
    print(f"bf16 vs fp32: {gap:+.2%} ({verdict}); bf16 kernel: {sf.bf16_kernel()}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bf16_convergence.json").write_text(json.dumps(
        {"config": "S", "steps": a.steps, "runs": runs, "final_gap": gap, "within_1pct": abs(gap) <= 0.01,
         "bf16_kernel": sf.bf16_kernel()}, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for dtype, r in runs.items():
            ax.plot(r["val_step"], r["val_loss"], label=f"{dtype} (final {r['val_loss'][-1]:.4f})")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(f"S config, {a.steps} steps: bf16 vs fp32 ({gap:+.2%})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "bf16_convergence.png", dpi=120)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
