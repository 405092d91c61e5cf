"""The readable table of a results JSON."""
from typing import Any, Dict, List, Optional

from .matmul import openblas_ratio_linear
from .targets import PCT_TARGETS
from .env import pick  # noqa: E402
from .matrix import CONFIGS, LONG_SHORT_T  # noqa: E402

# ---------------------------------------------------------------------------------------------
# report

def fmt_tok(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:,.1f}M"


def report(R: Dict[str, Any]) -> str:
    L: List[str] = []
    m = R["meta"]
    pk = R.get("peak", {})
    L.append("=" * 110)
    L.append(f"stackformer benchmark  {m['started']}  ({'quick' if m['quick'] else 'full'}, {m.get('duration_s', 0):.0f} s)")
    L.append(f"machine: {m['cpu_model']}, {m['affinity_cpus']} cores used ({m['logical_cpus']} logical), flags {' '.join(m['cpu_flags'])}; "
             f"threads {m['threads']}; matmul tile {m.get('matmul_kernel', '?')}")
    L.append(f"software: python {m['python']}, numpy {m['numpy']}, torch {m['torch']}, stackformer {m['stackformer']} "
             f"(git {m['git']['commit']}{'+dirty' if m['git']['dirty'] else ''}), stackformer.torch: {'yes' if m['stackformer_torch_available'] else 'no'}")
    if "omp_wait_policy" in m:
        sc = m.get("gomp_spincount")
        L.append(f"OMP_WAIT_POLICY: stackformer {m['omp_wait_policy']['stackformer']}, PyTorch {m['omp_wait_policy']['torch']}"
                 + (f"; GOMP_SPINCOUNT: stackformer {sc['stackformer']}, PyTorch {sc['torch']}" if sc else ""))
    L.append(f"load average start {m['loadavg_start']} end {m.get('loadavg_end')}"
             + (f"; OTHER PROCESSES BUSY at start: {sum(b['cpu'] for b in m['busy_processes_start']):.1f} cores" if m["busy_processes_start"] else ""))
    if "peak_1t" in pk:
        extra = (f" (AVX2 1 thread {pk['avx2_1t']:.0f}, AVX-512 1 thread {pk['avx512_1t']:.0f})"
                 if "avx512_1t" in pk and "avx2_1t" in pk else "")
        isa = {"avx512": "AVX-512", "avx2": "AVX2"}.get(pk.get("peak_isa", "avx2"), "AVX2")
        L.append(f"fp32 peak ({isa} FMA probe, the wider of AVX2/AVX-512, best of many 2 ms runs): 1 thread {pk['peak_1t']:.0f} GFLOP/s, {pk['threads']} threads measured "
                 f"{pk['peak_all_measured']:.0f}; reference for % of peak: {pk['peak_all']:.0f} GFLOP/s{extra}")
        if "bf16_peak_all" in pk:
            L.append(f"bf16 peak (vdpbf16ps probe, fp32 accumulation): 1 thread {pk['bf16_peak_1t']:.0f} GFLOP/s, "
                     f"reference {pk['bf16_peak_all']:.0f} GFLOP/s ({pk['bf16_peak_all'] / pk['peak_all']:.2f}x the fp32 peak)")
        elif "bf16_note" in pk:
            L.append(f"bf16 peak: {pk['bf16_note']}")
    elif pk:
        L.append(f"fp32 peak: {pk.get('error')}")
    L.append("")
    # main matrix
    L.append(f"Throughput (tokens/s, {m.get('stat', 'median')} of repetitions; ratio = stackformer / PyTorch time; "
             f"GF/s = analytic matmul FLOPs incl. attention / time; mem = peak RSS delta of one step)")
    peers = (("sdpa", "sdpa"), ("to_torch", "to_t"), ("compile", "compile"), ("autocast", "bf16 ac"))
    ph = "".join(f"{'vs ' + short:>11}" for _, short in peers)
    hdr = f"{'config':<6}{'mode':<18}{'fwd tok/s':>11}{'GF/s':>7}{'%pk':>5}{ph}" \
          f"{'train tok/s':>12}{'GF/s':>7}{'%pk':>5}{ph}{'mem fwd':>10}{'mem train':>11}"
    L.append(hdr)
    L.append("-" * len(hdr))
    mem = {(r["config"], r["mode"], r["impl"], r["what"], r["T"], r.get("checkpoint", False)): r for r in R.get("memory", [])}

    def memv(c, impl, what):
        r = mem.get((c["config"], c["mode"], impl, what, c["T"], False))
        return fmt_bytes(r.get("delta_bytes")) if r else "-"

    def ratio(c, impl, key):
        t = c["torch"].get(impl, {})
        if f"{key}_ratio" in t:
            return f"{pick(t, key + '_ratio'):.2f}x"
        if "skipped" in t:
            return "skip"
        if t.get("info") and not t["info"].get("ok"):
            return "err"
        return "-"
    for c in R["cases"]:
        f, t = c["sf"]["forward"], c["sf"]["train"]
        L.append(f"{c['config']:<6}{c['mode']:<18}{fmt_tok(pick(f, 'tok_s')):>11}{pick(f, 'gflops'):>7.1f}{(pick(f, 'peak_frac') or 0) * 100:>4.0f}%"
                 + "".join(f"{ratio(c, impl, 'forward'):>11}" for impl, _ in peers)
                 + f"{fmt_tok(pick(t, 'tok_s')):>12}{pick(t, 'gflops'):>7.1f}{(pick(t, 'peak_frac') or 0) * 100:>4.0f}%"
                 + "".join(f"{ratio(c, impl, 'train'):>11}" for impl, _ in peers) +
                 f"{memv(c, 'sf', 'forward'):>10}{memv(c, 'sf', 'train'):>11}")
    # torch absolute
    L.append("")
    L.append("PyTorch (same weights; sdpa = benchmarks/torch_mirror.py with F.scaled_dot_product_attention, "
             "to_t = stackformer.torch.to_torch; compile = torch.compile (inductor) of the best eager module; "
             "bf16 ac = eager under torch.autocast('cpu', bfloat16); AdamW fused)")
    hdr = f"{'config':<6}{'mode':<18}{'impl':<10}{'fwd tok/s':>11}{'train tok/s':>12}{'mem fwd':>10}{'mem train':>11}  check (max|dlogits|, loss sf/torch)"
    L.append(hdr)
    L.append("-" * len(hdr))
    for c in R["cases"]:
        for impl, t in c["torch"].items():
            if "skipped" in t:
                L.append(f"{c['config']:<6}{c['mode']:<18}{impl:<10}  skipped: {t['skipped']}")
                continue
            info = t.get("info", {})
            if not info.get("ok"):
                L.append(f"{c['config']:<6}{c['mode']:<18}{impl:<10}  error: {info.get('error', '?')[:80]}")
                continue
            chk = ""
            if "max_abs_diff_logits" in info:
                chk = f"{info['max_abs_diff_logits']:.1e}, {info['loss_sf']:.4f}/{info['loss_torch']:.4f}"
            L.append(f"{c['config']:<6}{c['mode']:<18}{impl:<10}{fmt_tok(pick(t['forward'], 'tok_s')):>11}{fmt_tok(pick(t['train'], 'tok_s')):>12}"
                     f"{memv(c, impl, 'forward'):>10}{memv(c, impl, 'train'):>11}  {chk}")
    # matmul
    mm = R.get("matmul")
    if mm:
        L.append("")
        L.append(f"Isolated C matmul (sf_gemm via ctypes, incl. packing W) at {mm['config']}'s shapes; {mm['threads']} threads vs reference peak, "
                 f"1 thread vs 1-thread peak; torch = F.linear / mm")
        hdr = f"{'product':<6}{'layer':<14}{'N x K x M':>18}{'sf GF/s':>9}{'%pk':>5}{'sf 1t':>8}{'%pk1':>6}{'torch':>8}{'sf/torch':>9}"
        L.append(hdr)
        L.append("-" * len(hdr))
        for r in mm["rows"]:
            s = r["sf"]
            one = r.get("sf_1t")
            tg = pick(r["torch"], "gflops") if "torch" in r else None
            L.append(f"{r['kind']:<6}{r['name']:<14}{r['N']:>6}x{r['K']:>5}x{r['M']:>5}{pick(s, 'gflops'):>9.1f}{pick(s, 'peak_frac') * 100:>4.0f}%"
                     + (f"{pick(one, 'gflops'):>8.1f}{pick(one, 'peak_frac') * 100:>5.0f}%" if one else f"{'-':>8}{'-':>6}")
                     + (f"{tg:>8.1f}{pick(s, 'gflops') / tg:>8.2f}x" if tg else f"{'-':>8}{'-':>9}"))
        for k, a in mm["aggregate"].items():
            tg = pick(a, "torch_gflops")
            a1 = mm.get("aggregate_1t", {}).get(k)
            L.append(f"  weighted {k:<18} {pick(a, 'gflops'):7.1f} GF/s = {pick(a, 'peak_frac') * 100:4.0f}% of peak"
                     + (f"; 1 thread {pick(a1, 'gflops'):.1f} GF/s = {pick(a1, 'peak_frac') * 100:.0f}% of 1-thread peak" if a1 and mm['threads'] > 1 else "")
                     + (f"; torch {tg:.1f} GF/s" if tg else ""))
        ob = mm.get("openblas", {})
        if "error" in ob:
            L.append(f"  OpenBLAS yardstick: {ob['error']}")
        elif "linear" in ob:
            lib = ob.get("library", {})
            L.append("")
            L.append(f"sf_gemm vs OpenBLAS ({lib.get('config', lib.get('path', '?'))}; cblas_sgemm in its own process, same threads)")
            hdr = f"{'product':<6}{'layer':<14}{'N x K x M':>18}{'sf GF/s':>9}{'BLAS':>8}{'sf/BLAS':>9}"
            L.append(hdr)
            L.append("-" * len(hdr))
            for r in ob["linear"]:
                sg, bg = pick(r["sf"], "gflops"), pick(r["blas"], "gflops")
                L.append(f"{r['kind']:<6}{r['name']:<14}{r['N']:>6}x{r['K']:>5}x{r['M']:>5}{sg:>9.1f}{bg:>8.1f}{sg / bg:>8.2f}x")
            for k in ("fwd", "dW", "dX"):
                v = openblas_ratio_linear(mm, (k,))
                L.append(f"  weighted {k:<4} sf / BLAS {v:.2f}x" if v else f"  weighted {k}: -")
            v = openblas_ratio_linear(mm, ("fwd", "dW", "dX"))
            L.append(f"  weighted fwd+dW+dX sf / BLAS {v:.2f}x" if v else "")
            hdr = f"{'per head':<6}{'':<8}{'heads x (N x K x M)':>24}{'thr':>4}{'sf GF/s':>9}{'BLAS':>8}{'sf/BLAS':>9}{'sf us/call':>11}{'BLAS':>7}"
            L.append(hdr)
            L.append("-" * len(hdr))
            for r in ob["perhead"]:
                sg, bg = pick(r["sf"], "gflops"), pick(r["blas"], "gflops")
                L.append(f"{r['config']:<6}{r['name']:<8}{r['heads']:>6} x ({r['N']:>4}x{r['K']:>4}x{r['M']:>4}){r['threads']:>4}{sg:>9.1f}{bg:>8.1f}"
                         f"{sg / bg:>8.2f}x{pick(r['sf'], 'median_s') / r['heads'] * 1e6:>11.1f}{pick(r['blas'], 'median_s') / r['heads'] * 1e6:>7.1f}")
    # extras
    ex = R.get("extras", {})
    if ex.get("threads_M_train") or ex.get("checkpoint_Deep") or ex.get("blas_backend") or R.get("generation"):
        L.append("")
        L.append("Extra rows")
    th = ex.get("threads_M_train")
    if th:
        L.append(f"  M plain train step: 1 thread {pick(th['1t'], 'tok_s'):.0f} tok/s, {th['threads']} threads {pick(th['all'], 'tok_s'):.0f} tok/s "
                 f"-> {pick(th, 'speedup'):.2f}x")
    for mode, r in ex.get("checkpoint_Deep", {}).items():
        s = f"  Deep {mode:<14} checkpointing: activations {fmt_bytes(r['act_bytes'])} -> {fmt_bytes(r['act_bytes_ckpt'])} ({r['mem_cut']:.1f}x less)"
        if "time_overhead" in r:
            s += f", step {pick(r['no_ckpt'], 'median_s') * 1e3:.0f} -> {pick(r['ckpt'], 'median_s') * 1e3:.0f} ms ({pick(r, 'time_overhead'):+.0%})"
        rr = mem.get(("Deep", mode, "sf", "train", CONFIGS["Deep"]["T"], True))
        r0 = mem.get(("Deep", mode, "sf", "train", CONFIGS["Deep"]["T"], False))
        if rr and r0 and "delta_bytes" in rr and "delta_bytes" in r0:
            s += f"; measured RSS delta {fmt_bytes(r0['delta_bytes'])} -> {fmt_bytes(rr['delta_bytes'])}"
        L.append(s)
    bb = ex.get("blas_backend")
    if bb and bb.get("rows"):
        L.append(f"  BLAS backend (stackformer.use_blas: {bb['library']}):")
        for r in bb["rows"]:
            L.append(f"    {r['config']} plain {r['what']:<8} tiles {pick(r['tiles'], 'median_s') * 1e3:7.1f} ms, "
                     f"BLAS {pick(r['blas'], 'median_s') * 1e3:7.1f} ms -> BLAS speed "
                     f"{pick(r['tiles'], 'median_s') / pick(r['blas'], 'median_s'):.2f}x the tiles'")
    for key, label in (("overhead_M_train", "M"), ("overhead_M_gqa_train", "M-GQA (2 kv heads)")):
        ov = ex.get(key)
        if ov:
            parts = [f"{mode} {pick(v, 'overhead'):+.1%} (paired {v['overhead_paired_median']:+.1%}; FLOPs {v.get('flop_overhead', 0):+.1%})"
                     for mode, v in ov.items() if mode not in ("modes", "config")]
            L.append(f"  Train step overhead vs plain at {label}, modes interleaved:")
            for i in range(0, len(parts), 3):
                L.append("    " + "; ".join(parts[i:i + 3]))
    b16 = ex.get("bf16")
    if b16:
        if "error" in b16:
            L.append(f"  bf16: {b16['error']}")
        else:
            L.append(f"  stackformer bf16 (kernel: {b16.get('kernel')}) vs torch bf16 autocast, plain, taking turns:")
            for name in ("S", "M"):
                for what in ("forward", "train"):
                    r = b16.get(name, {}).get(what)
                    if r:
                        L.append(f"    {name} {what:<8} sf bf16 {fmt_tok(pick(r['sf_bf16'], 'tok_s'))} tok/s"
                                 + (f", autocast {fmt_tok(pick(r['autocast'], 'tok_s'))} tok/s -> {pick(r, 'ratio'):.2f}x" if "ratio" in r else ""))
    p = {c["mode"]: c for c in R["cases"] if c["config"] == "M"}
    if "plain" in p:
        parts = []
        for mode in ("attnres_full", "attnres_block", "moda", "denseformer", "hyper_connections", "mhc"):
            if mode in p:
                tr = pick(p[mode]["sf"]["train"], "median_s") / pick(p["plain"]["sf"]["train"], "median_s") - 1
                fw = pick(p[mode]["sf"]["forward"], "median_s") / pick(p["plain"]["sf"]["forward"], "median_s") - 1
                parts.append(f"{mode} train {tr:+.1%} / fwd {fw:+.1%}")
        if parts:
            L.append("  Overhead vs plain at M from the matrix (measured minutes apart): " + "; ".join(parts))
    lm = [r for r in R.get("memory", []) if r["config"] == "Long" and r["impl"] in ("sf", "sdpa", "to_torch") and "delta_bytes" in r]
    if lm:
        by = {}
        for r in lm:
            by.setdefault((r["mode"], r["impl"], r["what"]), {})[r["T"]] = r["delta_bytes"]
        parts = []
        for (mode, impl, what), d in sorted(by.items()):
            if 2048 in d and LONG_SHORT_T in d and d[LONG_SHORT_T]:
                parts.append(f"{mode}/{impl}/{what} {fmt_bytes(d[LONG_SHORT_T])}->{fmt_bytes(d[2048])} ({d[2048] / d[LONG_SHORT_T]:.2f}x)")
        if parts:
            L.append("  Long peak memory T=1024 -> 2048 (RSS delta of one step):")
            for i in range(0, len(parts), 3):
                L.append("    " + "; ".join(parts[i:i + 3]))
    for g in R.get("generation", []):
        L.append(f"  generate {g['config']}/{g['mode']}: {g['new_tokens']} new tokens after {g['prompt']}, batch 1: cached "
                 f"{pick(g['cached'], 'tok_s'):.0f} tok/s vs re-run {pick(g['rerun'], 'tok_s'):.1f} tok/s -> {pick(g, 'speedup'):.1f}x "
                 f"(greedy agreement {g['greedy_agreement']:.0%}, re-run reps {g['rerun']['reps']})"
                 + (f"; cached on 1 thread {pick(g['cached_1thread'], 'tok_s'):.0f} tok/s" if g.get("cached_1thread") else ""))
    # profile
    pr = R.get("profile")
    if pr:
        L.append("")
        L.append(f"Phase breakdown at {pr['config']}, 1 thread (CPU ms per step = share x CPU time; C core: perf samples, PyTorch: torch.profiler self time)")
        keys = [k for k in pr if "/" in k and isinstance(pr[k], dict) and "share" in pr[k]]
        phases = []
        for k in keys:
            for ph in pr[k]["share"]:
                if ph not in phases:
                    phases.append(ph)
        order = ["matmul", "attention", "attnres", "norm", "activation", "loss", "optimizer", "embed", "embed/copies",
                 "libm exp/log", "OpenMP wait/sync", "kernel (page faults, scheduling)", "python/numpy", "other"]
        phases.sort(key=lambda p: order.index(p) if p in order else 99)
        short = {k: k.replace("torch:", "t:").replace("/plain", "").replace("forward", "fwd") for k in keys}
        hdr = f"{'phase':<34}" + "".join(f"{short[k][:16]:>17}" for k in keys)
        L.append(hdr)
        L.append("-" * len(hdr))
        for ph in phases:
            row = f"{ph:<34}"
            for k in keys:
                sh = pr[k]["share"].get(ph)
                row += f"{'':>17}" if sh is None else f"{sh * pr[k]['cpu_per_step_s'] * 1e3:>10.0f} ({sh * 100:>2.0f}%)"
            L.append(row)
        L.append(f"{'total CPU ms / step':<34}" + "".join(f"{pr[k]['cpu_per_step_s'] * 1e3:>17.0f}" for k in keys))
        for k in keys:
            if "error" in pr.get(k, {}):
                L.append(f"  {k}: {pr[k]['error']}")
    # targets
    L.append("")
    L.append("Targets")
    hdr = f"{'':<3}{'target':<26}{'value':>10}  {'goal':<8} {'description':<70} note"
    L.append(hdr)
    L.append("-" * 110)
    for t in R.get("targets", []):
        v = t["value"]
        if v is None:
            vs, mark = "-", " ? "
        else:
            pct = t["name"].startswith(PCT_TARGETS)
            vs = f"{v * 100:.1f}%" if pct else f"{v:.2f}x"
            mark = "OK " if t["met"] else "NO "
        thr = t["threshold"]
        goal = f"{t['op']}{thr * 100:.0f}%" if t["name"].startswith(PCT_TARGETS) else f"{t['op']}{thr}x"
        L.append(f"{mark:<3}{t['name']:<26}{vs:>10}  {goal:<8} {t['description'][:70]:<70} {t['note']}")
    for e in R.get("errors", []):
        L.append(f"ERROR in {e['stage']}: {e['error'].strip().splitlines()[-1][:150]}")
    met = sum(1 for t in R.get("targets", []) if t["met"])
    known = sum(1 for t in R.get("targets", []) if t["met"] is not None)
    L.append(f"{met}/{known} measured targets met")
    if m.get("busy_processes_start"):
        L.append("NOTE: other processes were using the CPU when the run started (see meta.busy_processes_start): "
                 "absolute numbers are pessimistic and noisy; ratios are interleaved and more robust.")
    L.append("=" * 110)
    return "\n".join(L)


