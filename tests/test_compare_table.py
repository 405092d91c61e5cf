"""The main job's table and compare.png read without the docstring, and the loss curve has
enough validation points to be a curve."""
import numpy as np
import pytest

from stackformer import compare
from stackformer.data import default_corpus


@pytest.fixture(scope="module")
def results():
    corpus = default_corpus(max_bytes=100_000)
    out = [compare.run_stack(name, corpus, n_layers=2, d_model=16, n_heads=2, seq_len=16,
                             batch_size=2, steps=40, eval_batches=1, progress=False)
           for name in ("plain", "moda")]
    return corpus, out


def test_validation_is_a_curve_by_default(results):
    _, rs = results
    for r in rs:
        h = r.history
        assert len(h.val_loss) >= compare.EVAL_POINTS + 1 >= 21
        assert h.val_step[0] == 0 and h.val_step[-1] == h.step[-1] == 40
        assert np.all(np.diff(h.val_step) > 0)


def test_table_headers_name_their_units(results):
    corpus, rs = results
    table = compare.format_table(rs, corpus.unigram_loss("val"))
    head1, head2 = table.splitlines()[:2]
    for words in ("val loss", "gain over", "train", "output RMS", "grad spread", "params"):
        assert words in head1
    for unit in ("(nats/B)", "unigram", "tok/s", "last/first", "max/min"):
        assert unit in head2
    legend = compare.table_legend()
    for words in ("val loss", "gain over unigram", "tok/s", "last/first", "max/min"):
        assert words in legend


def test_compare_png_renders(results, tmp_path):
    pytest.importorskip("matplotlib")
    corpus, rs = results
    path = tmp_path / "compare.png"
    compare.plot_comparison(rs, corpus.unigram_loss("val"), str(path))
    assert path.stat().st_size > 10_000
