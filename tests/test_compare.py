"""`python -m stackformer`: the depth-wiring comparison (run at --quick sizes)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from stackformer import compare
from stackformer.__main__ import main
from stackformer.data import default_corpus
from stackformer.plotting import have_matplotlib


def test_quick_comparison_end_to_end(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for label in ("plain", "attnres_full", "attnres_block(S=4)", "moda", "unigram baseline"):
        assert label in out
    assert "val loss" in out and "grad spread" in out
    assert os.path.exists(tmp_path / "compare.png") == have_matplotlib()


def test_options_select_stacks_and_sizes(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    assert main(["compare", "--quick", "--stacks", "plain,moda", "--layers", "3", "--steps", "5",
                 "--corpus", str(text), "--no-png", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3 blocks" in out and "5 steps" in out and "corpus.txt" in out
    assert "moda" in out and "attnres_full" not in out


@pytest.mark.parametrize("argv", [["--stacks", "plain,bogus"], ["--steps", "0"],
                                  ["--d-model", "30", "--heads", "4"]])
def test_bad_options_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--no-png", *argv])
    assert e.value.code == 2 and "usage" in capsys.readouterr().err


def test_run_stack_measures_depth():
    corpus = default_corpus(max_bytes=100_000)
    r = compare.run_stack("attnres_block", corpus, n_layers=3, d_model=32, n_heads=2, seq_len=16,
                          batch_size=2, steps=4, block_size=2, eval_batches=1, progress=False)
    assert r.label == "attnres_block(S=2)" and r.num_params > 0
    assert r.block_out_rms.shape == r.block_in_rms.shape == r.grad_norms.shape == (3,)
    assert r.rms_growth == pytest.approx(r.block_out_rms[-1] / r.block_out_rms[0])
    assert r.grad_spread >= 1.0 and np.isfinite(r.val_loss)
    table = compare.format_table([r], corpus.unigram_loss("val"))
    assert "attnres_block(S=2)" in table and f"{r.val_loss:.4f}" in table


def test_corpus_too_small_is_an_error(tmp_path, capsys):
    f = tmp_path / "tiny.txt"
    f.write_text("x" * 50)
    with pytest.raises(SystemExit):
        main(["--quick", "--corpus", str(f), "--no-png"])
    assert "too small" in capsys.readouterr().err


def test_help_mentions_demo():
    r = subprocess.run([sys.executable, "-m", "stackformer", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout and "--quick" in r.stdout
