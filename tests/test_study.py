"""Studies (stackformer.study): interval arithmetic against hand-computed cases and a t table,
parameter counts against the C parameter table, a tiny study end to end (store, report with
and without matplotlib, resume), resume after SIGKILL / Ctrl-C mid-study, bad specs."""
import builtins
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import stackformer as sf
from stackformer import study
from stackformer.study import budget, presets, report, stats
from stackformer.study.runner import StudyProgress
from stackformer.study.spec import StudySpec, Wiring

# -- statistics ------------------------------------------------------------------------------------

# Student t quantiles from a printed table (two-sided 95% = the 0.975 quantile, etc.)
T_TABLE = [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776),
           (0.975, 5, 2.571), (0.975, 9, 2.262), (0.975, 10, 2.228), (0.975, 30, 2.042),
           (0.975, 120, 1.980), (0.95, 5, 2.015), (0.95, 1, 6.314), (0.995, 10, 3.169),
           (0.9, 20, 1.325), (0.99, 3, 4.541)]


@pytest.mark.parametrize("p,df,expected", T_TABLE)
def test_t_quantile_matches_table(p, df, expected):
    assert stats.t_quantile(p, df) == pytest.approx(expected, abs=6e-4)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-expected, abs=6e-4)
    assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)


def test_t_quantile_large_df_tends_to_normal():
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)
    assert stats.t_cdf(0.0, 7) == 0.5
    with pytest.raises(ValueError, match="p must be"):
        stats.t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df"):
        stats.t_quantile(0.9, 0)


def test_mean_interval_hand_case():
    # 1..5: mean 3; s^2 = (4+1+0+1+4)/4 = 2.5, s = 1.58114; s/sqrt(5) = 0.707107;
    # t(0.975, 4) = 2.776 (table) -> half width 1.96293 -> [1.03707, 4.96293]
    ci = stats.mean_ci([1, 2, 3, 4, 5])
    assert ci.n == 5 and ci.mean == pytest.approx(3.0)
    assert ci.sd == pytest.approx(1.58114, abs=1e-5)
    assert ci.lo == pytest.approx(1.03707, abs=5e-4) and ci.hi == pytest.approx(4.96293, abs=5e-4)


def test_paired_difference_hand_case():
    base = {0: 2.50, 1: 2.40, 2: 2.60, 3: 2.50, 4: 2.45}
    # differences by seed -0.1, -0.2, -0.3, -0.2, -0.2: mean -0.2; deviations 0.1, 0, -0.1, 0, 0
    # -> s^2 = 0.02/4 = 0.005, s = 0.0707107, s/sqrt(5) = 0.0316228; t(0.975, 4) = 2.776
    # -> half width 0.0877848 -> [-0.287785, -0.112215]: excludes 0, lower loss: "better"
    wiring = {0: 2.40, 1: 2.20, 2: 2.30, 3: 2.30, 4: 2.25, 9: 0.0}   # seed 9 has no pair: left out
    d = stats.paired_diff(wiring, base)
    assert d.n == 5 and d.mean == pytest.approx(-0.2)
    assert d.lo == pytest.approx(-0.287785, abs=1e-4) and d.hi == pytest.approx(-0.112215, abs=1e-4)
    assert stats.verdict(d) == "better"
    assert stats.verdict(stats.paired_diff(base, wiring)) == "worse"
    # differences -0.1, +0.1, 0: mean 0, the interval contains 0
    same = stats.paired_diff({0: 1.9, 1: 2.1, 2: 2.0}, {0: 2.0, 1: 2.0, 2: 2.0})
    assert same.lo < 0 < same.hi and stats.verdict(same) == "no difference shown"
    one = stats.paired_diff({0: 1.0}, {0: 2.0})
    assert one.n == 1 and stats.verdict(one).startswith("n/a")
    # a diverged run (NaN) drops its pair
    assert stats.paired_diff({0: 1.0, 1: float("nan"), 2: 1.0}, {0: 2.0, 1: 2.0, 2: 2.0}).n == 2


# -- budgets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(residual="attnres_full"),
                                dict(residual="attnres_block", attnres_block_size=3), dict(moda=True),
                                dict(moda=True, activation="swiglu", bias=False, norm="rmsnorm",
                                     pos="rope", n_kv_heads=2, tie_embeddings=False),
                                dict(residual="denseformer"),
                                dict(residual="denseformer", denseformer_dilation=2, denseformer_period=2),
                                dict(residual="hyper_connections"),
                                dict(residual="hyper_connections", hc_dynamic=True, hc_expansion=3),
                                dict(residual="hyper_connections", hc_dynamic=True, norm="rmsnorm"),
                                dict(residual="mhc"), dict(residual="mhc", hc_expansion=2, moda=True)])
def test_param_count_and_matching(kw):
    cfg = sf.Config(vocab_size=256, d_model=32, n_heads=4, n_layers=3, max_seq_len=16, **kw)
    assert budget.analytic_params(cfg) == sf.Model(cfg).num_params == budget.num_params(cfg)
    target = budget.num_params(sf.Config(vocab_size=256, d_model=32, n_heads=4, n_layers=3, max_seq_len=16))
    f = budget.match_d_ff(cfg, target)
    per_unit = budget.num_params(sf.Config(**dict(cfg.to_dict(), d_ff=f + 1))) - \
        budget.num_params(sf.Config(**dict(cfg.to_dict(), d_ff=f)))
    assert abs(budget.num_params(sf.Config(**dict(cfg.to_dict(), d_ff=f))) - target) <= per_unit / 2


def test_flops_count_attention_and_depth_reads():
    c = dict(vocab_size=256, d_model=32, n_heads=2, n_layers=2, max_seq_len=8, d_ff=64)
    plain, _ = budget.forward_flops(sf.Config(**c), 8)
    # by hand, T=8 d=32 F=64 V=256 n=2: projections 2*8*32*96 + 2*8*32*32 = 65536; scores+PV
    # 4*32*36 = 4608; MLP 2*2*8*32*64 = 65536; residual adds 2*8*32 = 512 per block;
    # head 2*8*32*256 = 131072 -> 2*(65536+4608+65536) + 2*512 + 131072 = 403456
    assert plain == 403456
    full, exact = budget.forward_flops(sf.Config(**c, residual="attnres_full"), 8)
    # AttnRes reads 1+2+3+4+5 = 15 sources per token instead of the adds: 6*32*8*15 = 23040
    assert exact and full == 403456 - 1024 + 23040
    assert budget.depth_reads(sf.Config(**c, residual="attnres_full")) == 15
    assert budget.depth_reads(sf.Config(**c, moda=True)) == 2   # block 1 sees 2 depth slots
    assert budget.train_flops(sf.Config(**c), 8, 4, 10)[0] == 3 * 403456 * 4 * 10


def test_flops_of_the_competitor_wirings_by_hand():
    c = dict(vocab_size=256, d_model=32, n_heads=2, n_layers=2, max_seq_len=8, d_ff=64)
    core = 403456 - 1024  # the plain count above without its residual adds
    # DenseFormer: the adds, plus the DWA after block 0 (sources X0, X1) and block 1 (X0..X2):
    # 2*32*8*(2+3) = 2560
    df, exact = budget.forward_flops(sf.Config(**c, residual="denseformer"), 8)
    assert exact and df == 403456 + 2560
    # Hyper-Connections, static, n=2, per sublayer and token: read 2*2*32 + mixing 2*4*32 +
    # write 2*2*32 = 512; 4 sublayers, 8 tokens, plus the head's sum 2*32 per token: 8*(4*512+64)
    hc, _ = budget.forward_flops(sf.Config(**c, residual="hyper_connections", hc_expansion=2), 8)
    assert hc == core + 8 * (4 * 512 + 64)
    # dynamic adds 2*2*32*(2+2) = 512 per sublayer and token
    hd, _ = budget.forward_flops(sf.Config(**c, residual="hyper_connections", hc_expansion=2, hc_dynamic=True), 8)
    assert hd == hc + 8 * 4 * 512
    # mHC n=2, 3 Sinkhorn iterations: + projection 2*2*32*(4+4) = 1024 and Sinkhorn 4*4*3 = 48
    mh, _ = budget.forward_flops(sf.Config(**c, residual="mhc", hc_expansion=2, mhc_sinkhorn_iters=3), 8)
    assert mh == hc + 8 * 4 * (1024 + 48)


# -- specs ------------------------------------------------------------------------------------------

def tiny_spec(**kw):
    d = dict(name="tiny", wirings={"plain": {}, "full": {"residual": "attnres_full"}, "moda": {"moda": True}},
             depths=(2,), widths=(32,), lrs=(3e-3, 1e-2), seeds=2, steps=6, batch_size=2, seq_len=16,
             eval_batches=1, eval_every=3, final_eval_batches=2, corpus_max_bytes=60_000)
    d.update(kw)
    return StudySpec(**d)


@pytest.mark.parametrize("kw,match", [
    (dict(wirings={"x": {"not_a_field": 1}}), "unknown Config field.*not_a_field"),
    (dict(wirings={"plain": {}, "bad": {"residual": "bogus"}}), r"wiring 'bad'.*Config.residual"),
    (dict(wirings={"w": {"n_heads": 5}}), r"wiring 'w', depth 2, width 32.*divisible"),
    (dict(wirings={"w": {"n_layers": 3}}), "n_layers"),
    (dict(wirings=[Wiring("a"), Wiring("a")]), "duplicate"),
    (dict(baseline="nope"), "baseline 'nope'"),
    (dict(seeds=0), "seeds"),
    (dict(lrs=(-1.0,)), "lrs"),
    (dict(depths=()), "depths"),
    (dict(equal="joules"), "equal"),
    (dict(steps=0), "steps"),
    (dict(wirings={}), "wirings is empty"),
])
def test_bad_specs_raise_naming_the_problem(tmp_path, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        study.run(tiny_spec(**kw), str(tmp_path / "s"), verbose=False, print_report=False)
    assert not (tmp_path / "s").exists()   # nothing written


def test_keys_are_stable_and_depend_on_the_run():
    a, b = tiny_spec().cells("sig"), tiny_spec().cells("sig")
    assert [c.key for c in a] == [c.key for c in b] and len({c.key for c in a}) == len(a) == 12
    assert tiny_spec(steps=7).cells("sig")[0].key != a[0].key
    assert tiny_spec().cells("other data")[0].key != a[0].key
    # matched parameters: full and moda get plain's count by a smaller d_ff
    byw = {c.wiring: c.config for c in a}
    assert byw["plain"].d_ff == 128 and byw["moda"].d_ff < 128
    assert abs(budget.num_params(byw["moda"]) - budget.num_params(byw["plain"])) < 2 * 32 + 64
    assert {c.config.d_ff for c in tiny_spec(match_params=False).cells()} == {128}
    eq = {c.wiring: c.steps for c in tiny_spec(equal="flops", steps=100, match_params=False).cells()}
    assert eq["plain"] == 100 and eq["moda"] < 100


def test_presets_skip_rows_config_lacks():
    for name in presets.preset_names():
        s = presets.preset(name, 0.5)
        s.validate()
        assert s.expected_runtime and s.cells()
        for row, why in s.skipped:
            assert why
    t4 = presets.preset("attnres-table4")
    names = [w.name for w in t4.wiring_list()] + [n for n, _ in t4.skipped]
    assert "DenseFormer" in names and "Full w/ sigmoid" in names and "Block AttnRes (S=4)" in names
    moda = presets.preset("moda-table3")
    deeper = next(w for w in moda.wiring_list() if w.extra_layers == 2)
    assert not deeper.match_params
    with pytest.raises(ValueError, match="unknown preset"):
        presets.preset("nope")


# -- a tiny study end to end -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("study") / "tiny")
    res = study.run(tiny_spec(), path, workers=1, progress=False, png=False, verbose=False, print_report=False)
    return path, res


def test_tiny_study_end_to_end(tiny_study):
    path, res = tiny_study
    assert res.ran == res.total == 12
    rows = study.load(path)
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    assert len(rows) == 12 and len({r["key"] for r in rows}) == 12
    assert {(r["wiring"], r["lr"], r["seed"]) for r in rows} == {
        (w, lr, s) for w in ("plain", "full", "moda") for lr in (3e-3, 1e-2) for s in (0, 1)}
    assert all(np.isfinite(r["final_val_loss"]) and r["tokens"] == 6 * 2 * 16 for r in rows)
    full = study.load(path, full=True)
    full = full.to_dict("records") if hasattr(full, "to_dict") else full
    for r in full:
        assert len(r["history"]["loss"]) == 6 and r["history"]["val_step"] == [0, 3, 6]
        tr = r["traces"]
        assert len(tr["block_out_rms"]) == len(tr["grad_norm"]) == 2
        assert ("alpha_matrix" in tr) == (r["wiring"] == "full")
        assert ("depth_mass" in tr) == (r["wiring"] == "moda")
        assert sf.Config.from_dict(r["config"]).n_layers == 2
    text = open(res.report_path).read()
    for s in ("final val loss (mean ± 95% CI)", "paired diff vs baseline", "Best learning rate",
              "`moda`", "PNG figures were not written"):
        assert s in text
    assert "better" in res.summary or "worse" in res.summary or "no difference shown" in res.summary


def test_same_seed_same_data_and_rerun_is_instant(tiny_study):
    path, res = tiny_study
    full = study.load(path, full=True)
    full = full.to_dict("records") if hasattr(full, "to_dict") else full
    # plain seed 0 at two lrs: same batches, so the loss before any update (step 1) is equal
    first = {(r["wiring"], r["seed"], r["lr"]): r["history"]["loss"][0] for r in full}
    assert first[("plain", 0, 3e-3)] == first[("plain", 0, 1e-2)]
    assert first[("plain", 0, 3e-3)] != first[("plain", 1, 3e-3)]
    again = study.run(tiny_spec(), path, workers=1, progress=False, png=False, verbose=False, print_report=False)
    assert again.ran == 0 and again.summary == res.summary


def test_report_with_and_without_matplotlib(tiny_study, monkeypatch):
    path, _ = tiny_study
    spec = tiny_spec()
    with study.Store(os.path.join(path, "study.sqlite")) as st:
        cells = spec.cells(st.get_meta("data")["signature"])
        if report.have_matplotlib():
            _, rp = report.write(st, spec, cells, path, png=True)
            for f in ("compare.png", "loss_curves.png", "final_loss.png", "diagnostics.png",
                      "depth_mixing.png", "moda_depth_mass.png"):
                assert os.path.getsize(os.path.join(path, f)) > 1000
            assert "![compare.png](compare.png)" in open(rp).read()
            for f in os.listdir(path):
                if f.endswith(".png"):
                    os.remove(os.path.join(path, f))
        real = builtins.__import__

        def no_mpl(name, *a, **k):
            if name.split(".")[0] == "matplotlib":
                raise ImportError("no matplotlib here")
            return real(name, *a, **k)

        monkeypatch.setattr(builtins, "__import__", no_mpl)
        summary, rp = report.write(st, spec, cells, path, png=True)
    text = open(rp).read()
    assert "matplotlib is not installed" in text and "| `full` |" in text
    assert not [f for f in os.listdir(path) if f.endswith(".png")]
    assert "unigram baseline" in summary


def test_diverged_runs_are_stored_and_left_out_of_intervals(tmp_path):
    spec = tiny_spec(wirings={"plain": {}, "full": {"residual": "attnres_full"}}, lrs=(3e-3, 1e3), steps=8,
                     eval_every=None, final_eval_batches=1)
    res = study.run(spec, str(tmp_path / "d"), workers=1, progress=False, png=report.have_matplotlib(),
                    verbose=False, print_report=False)
    rows = study.load(str(tmp_path / "d"))
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    bad = [r for r in rows if r["lr"] == 1e3]
    assert len(bad) == 4 and any(r["diverged"] == 1 for r in bad)
    assert all(r["final_val_loss"] is None or not np.isfinite(r["final_val_loss"]) for r in rows if r["diverged"])
    assert all(r["diverged"] == 0 and np.isfinite(r["final_val_loss"]) for r in rows if r["lr"] == 3e-3)
    assert "diverged)" in res.summary and "best lr per wiring" in res.summary
    assert "lr 0.003" in res.summary.split("best lr per wiring")[1]   # the finite lr wins


def test_progress_bar(capsys):
    bar = StudyProgress("s", 4, 1, {"a": 1.0, "b": 1.0, "c": 1.0}, enabled=True)
    bar.step(0, "a", "plain s0", 5, 10, 2.5)
    bar.finish(0, "a")
    bar.close()
    err = capsys.readouterr().err
    assert "2/4 runs" in err and "ETA" in err and "loss 2.500" in err
    off = StudyProgress("s", 4, 1, {"a": 1.0}, enabled=False)
    off.step(0, "a", "x", 1, 2, 1.0)
    off.close()
    assert capsys.readouterr().err == ""


# -- killed studies resume ---------------------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import sys
    import stackformer as sf
    from stackformer.study import StudySpec
    spec = StudySpec(name="kill", wirings={"plain": {}, "full": {"residual": "attnres_full"}},
                     depths=(2,), widths=(32,), seeds=6, steps=int(sys.argv[3]), batch_size=4,
                     seq_len=32, eval_batches=1, final_eval_batches=1, corpus_max_bytes=60_000)
    res = sf.study.run(spec, sys.argv[1], workers=int(sys.argv[2]), progress=False, png=False,
                       print_report=False)
    print("RAN", res.ran, "TOTAL", res.total)
""")


def _count(db):
    if not os.path.exists(db):
        return 0
    try:
        con = sqlite3.connect(db, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


def _start_and_stop(script, path, workers, sig, steps):
    db = os.path.join(path, "study.sqlite")
    p = subprocess.Popen([sys.executable, script, path, str(workers), str(steps)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _count(db) < 2 and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    return p.returncode, out, err, db


def _stored(db):
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT key, finished_at FROM runs").fetchall())
    finally:
        con.close()


@pytest.mark.parametrize("sig,workers", [(signal.SIGKILL, 2), (signal.SIGINT, 2)])
def test_killed_study_resumes_without_losing_or_repeating_runs(tmp_path, sig, workers):
    script = str(tmp_path / "s.py")
    open(script, "w").write(SCRIPT)
    path = str(tmp_path / "study")
    rc, out, err, db = _start_and_stop(script, path, workers, sig, steps=100)
    before = _stored(db)
    if rc == 0:   # the machine was fast enough to finish first: nothing to resume
        pytest.skip("study finished before the signal arrived")
    assert "RAN" not in out and 1 <= len(before) < 12
    if sig == signal.SIGINT:
        assert "interrupted" in err and "KeyboardInterrupt" in err
    time.sleep(0.3)
    assert _stored(db) == before        # no worker outlived the study and wrote afterwards
    r = subprocess.run([sys.executable, script, path, "1", "100"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"RAN {12 - len(before)} TOTAL 12" in r.stdout   # only the missing runs ran
    after = _stored(db)
    assert len(after) == 12 and all(after[k] == v for k, v in before.items())   # none lost, none redone
    r = subprocess.run([sys.executable, script, path, "1", "100"], capture_output=True, text=True, timeout=60)
    assert "RAN 0 TOTAL 12" in r.stdout


# -- the command line ---------------------------------------------------------------------------------

def test_cli_study_preset_and_main_job(tmp_path, capsys):
    from stackformer.__main__ import main
    p = str(tmp_path / "q")
    assert main(["study", "--preset", "moda-norm", "--quick", "--seeds", "2", "--path", p,
                 "--no-png", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "MoDA post-norm" in out and "95% CI" in out and os.path.exists(os.path.join(p, "report.md"))
    assert main(["study", "--preset", "moda-norm", "--quick", "--seeds", "2", "--path", p,
                 "--no-png", "--no-progress"]) == 0   # finished: report at once
    assert "8/8 runs stored" in capsys.readouterr().out
    assert main(["--quick", "--stacks", "plain,moda", "--lr", "3e-3,1e-2", "--no-png", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "best lr per wiring" in out and "attnres_full" not in out
    assert main(["study", "--list"]) == 0
    assert "depth-sweep" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["study", "--preset", "nope"])
    with pytest.raises(SystemExit):
        main(["--quick", "--seeds", "0"])
