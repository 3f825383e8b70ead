"""The parts of SWEEP's judgement that other sweep judges share (decode, depth, cross-backend): the K/V type check
of a tool log, the speed table with its repetitions' spread, the cell of a job that gave no figures (by who is at
fault), the vs-q4_0 claim at equal memory, and the machine-load note of speed verdicts.

Split out of :mod:`harness.checks.sweeps` (which re-exports these names); no check is registered here.
"""
from __future__ import annotations

import math

from harness.report.model import Cell, Verdict

MIB = 1024.0 * 1024.0


def kv_type_problem(kv: dict | None, want_k: str, want_v: str, model_info, traits: dict, tol_mib: float) -> str:
    """'' when the KV log shows the asked types, else one line quoting the log line that shows otherwise.

    Args:
        kv: a parsed :class:`~harness.runners.llama_logs.KvLog` as dict (None: no size line).
        model_info: ModelInfo (n_head_kv, head_dim_k/v) for the size prediction.
        traits: {type name: TypeTrait} measured from the build.
        tol_mib: allowed gap between printed and predicted K or V MiB.
    """
    from harness.runners.ggml_types import predict_kv_bytes

    if kv is None:
        return "no 'llama_kv_cache: size' line in the tool log: cannot tell which K/V types were used"
    if kv["changes"]:
        return f"the fork changed the K/V types: \"{kv['changes'][0]}\""
    if kv["k_type"] != want_k or kv["v_type"] != want_v:
        return f"asked K={want_k} V={want_v} but the log says: \"{kv['size_line']}\""
    if model_info is not None and want_k in traits and want_v in traits:
        from harness.runners.llama_logs import kv_dims
        pk = predict_kv_bytes(traits[want_k], *kv_dims(kv), model_info.n_head_kv, model_info.head_dim_k) / MIB
        pv = predict_kv_bytes(traits[want_v], *kv_dims(kv), model_info.n_head_kv, model_info.head_dim_v) / MIB
        tol_mib *= max(1, len(kv.get("parts") or []))  # each cache's size line is rounded on its own
        if abs(pk - kv["k_mib"]) > tol_mib or abs(pv - kv["v_mib"]) > tol_mib:
            return (f"KV size differs from the {want_k}/{want_v} type traits (predicted K {pk:.2f} V {pv:.2f} MiB), "
                    f"so some layers use other types: \"{kv['size_line']}\"")
    return ""


def _speed_table(bench_recs: dict, ref: str = "q8_0/q8_0") -> list[dict]:
    """Rows (pair, test, depth, tokens/s, sd, n, ratio to q8_0 and its standard error).

    A job that died part-way keeps the tests it printed before dying (llama-bench prints prefill before
    decode), so its prefill rows are here even when its decode crashed."""
    refrows = {}
    if ref in bench_recs:
        refrows = {(r["test"], r["depth"]): r for r in bench_recs[ref].data.get("rows", [])}
    out = []
    for label, rec in bench_recs.items():
        for r in rec.data.get("rows", []):
            n = max(len(r["samples_ts"]), 1)
            row = {"pair": label, "test": r["test"], "n_tokens": r["n_tokens"], "depth": r["depth"],
                   "tps": r["avg_ts"], "tps_sd": r["stddev_ts"], "reps": n, "ratio": None, "ratio_se": None}
            q = refrows.get((r["test"], r["depth"]))
            if q and q["avg_ts"] > 0 and r["avg_ts"] > 0:
                ratio = r["avg_ts"] / q["avg_ts"]
                nq = max(len(q["samples_ts"]), 1)
                row["ref_reps"] = nq
                rel = math.sqrt((r["stddev_ts"] / r["avg_ts"]) ** 2 / n + (q["stddev_ts"] / q["avg_ts"]) ** 2 / nq)
                row["ratio"], row["ratio_se"] = ratio, ratio * rel
                # the repetitions' spread: slowest pair run over fastest q8_0 run .. fastest over slowest
                rs, qs = [x for x in r["samples_ts"] if x > 0], [x for x in q["samples_ts"] if x > 0]
                if rs and qs:
                    row["ratio_lo"], row["ratio_hi"] = min(rs) / max(qs), max(rs) / min(qs)
            out.append(row)
    return out


# Cells that judge a pair against a rule; a sweep none of whose cells of these metrics has a PASS, PARTIAL or
# FAIL verdict judged nothing (spec "Verdicts": its verdict is SKIP, "nothing judged", never PASS).
JUDGED_METRICS = ("ppl_vs_q8_0", "prefill_ratio_vs_q8_0")


def failed_job_cell(rec, lab: str, path: str, metric: str, evidence: list[str], interrupted: bool = False) -> Cell:
    """The cell of a job that did not produce its numbers, by who is at fault (spec "Who is at fault"):
    the fork crashed or failed after computing began -> FAIL naming the phase; the fork refused the
    configuration cleanly at start-up -> SKIP 'refused' with its message; not run because the sweep was
    interrupted -> SKIP; anything else (timeout, harness problem) -> ERROR."""
    if rec is None:
        why = "not run: the sweep was interrupted" if interrupted else "not run"
        return Cell("SWEEP", lab, path, metric, None, None, Verdict.SKIP if interrupted else Verdict.ERROR, caveat=why,
                    evidence=evidence)
    details = {"fault": rec.fault or "harness", "phase": rec.phase}
    if rec.fault == "fork":
        return Cell("SWEEP", lab, path, metric, None, None, Verdict.FAIL, caveat=f"fork failure: {rec.error}",
                    evidence=evidence, details=details)
    if rec.fault == "refused":
        return Cell("SWEEP", lab, path, metric, None, None, Verdict.SKIP, caveat=f"refused: {rec.error}",
                    evidence=evidence, details=details)
    return Cell("SWEEP", lab, path, metric, None, None, Verdict.ERROR, caveat=rec.error, evidence=evidence,
                details=details)


def _status(cell: Cell) -> str:
    """The row status word of a failed job's cell: FAIL, refused, not run, ERROR."""
    if cell.verdict == Verdict.SKIP:
        return "refused" if cell.caveat.startswith("refused") else "not run"
    return cell.verdict.value



def vs_q4_0_cells(rows: list[dict], rules: dict, backend: str, model: str) -> list[Cell]:
    """The fork's headline claim at equal memory: does each turbo pair beat each q4_0 baseline at the same or
    fewer bits per real value? One cell per (turbo pair, baseline) with the KLD difference and its uncertainty.

    Args:
        rows: the sweep rows of :func:`judge_sweep` (need 'kld', 'kld_se', 'bits_per_value', 'ln_ppl_ratio_vs_f16',
            'ln_ppl_ratio_se'); rows without them are passed over.
        rules: the [vs_q4_0] section of checks/sweeps.toml: 'baselines' (pair labels, e.g. q4_0/q4_0 and
            q4_0/q4_0+rot, the latter being what upstream llama.cpp does by default) and 'bits_tolerance'.
        backend: for the cell path; model: named in the caveats.

    Returns:
        Cells with metric 'kld_vs_<baseline>' (value = turbo KLD - baseline KLD, nats/token; threshold 0):
        PASS when turbo is not worse (within ``paired_se`` standard errors) at <= the baseline's bits per real value;
        PARTIAL ("claim does not hold") when it is worse at equal or fewer bits, or spends more bits than the baseline.
        The KLD standard errors of the two runs are combined as independent (the runs share the tokens, so this
        over-states the uncertainty: a conservative test).
    """
    r = rules.get("vs_q4_0") or {}
    k_sig = float(rules["significance"]["paired_se"])
    tol = float(r.get("bits_tolerance", 0.05))
    by = {row["pair"]: row for row in rows}
    out: list[Cell] = []
    turbo = [row for row in rows if "turbo" in f"{row.get('k')}{row.get('v')}" and row.get("kld") is not None
             and row.get("bits_per_value") is not None and row.get("status") == "ok"]
    for base_lab in r.get("baselines", []):
        b = by.get(base_lab)
        if b is None or b.get("kld") is None or b.get("bits_per_value") is None or b.get("status") != "ok":
            for t in turbo:
                out.append(Cell("SWEEP", t["pair"], f"{backend}:perplexity", f"kld_vs_{base_lab}", None, 0.0, Verdict.SKIP,
                                caveat=f"not compared: no measured {base_lab} pair in this sweep"))
            continue
        for t in turbo:
            d = t["kld"] - b["kld"]
            se = math.hypot(t.get("kld_se") or 0.0, b.get("kld_se") or 0.0)
            dppl = None
            if t.get("ln_ppl_ratio_vs_f16") is not None and b.get("ln_ppl_ratio_vs_f16") is not None:
                dppl = 100 * math.expm1(t["ln_ppl_ratio_vs_f16"] - b["ln_ppl_ratio_vs_f16"])
            bits_t, bits_b = t["bits_per_value"], b["bits_per_value"]
            facts = (f"{t['pair']} KLD {t['kld']:.4f} at {bits_t:.2f} bits/real value vs {base_lab} {b['kld']:.4f} at "
                     f"{bits_b:.2f} (difference {d:+.4f} ± {se:.4f}"
                     + (f", PPL {dppl:+.2f}%" if dppl is not None else "") + f") on {model}")
            if bits_t > bits_b + tol:
                vd, cav = Verdict.PARTIAL, (f"claim not shown at equal memory: turbo spends {bits_t - bits_b:.2f} more bits "
                                            f"per real value than {base_lab}; {facts}")
            elif d > k_sig * se:
                vd, cav = Verdict.PARTIAL, f"claim does not hold: turbo is worse than {base_lab} at the same or fewer bits; {facts}"
            else:
                vd, cav = Verdict.PASS, f"claim holds: {facts}"
            out.append(Cell("SWEEP", t["pair"], f"{backend}:perplexity", f"kld_vs_{base_lab}", d, 0.0, vd, caveat=cav,
                            details={"kld": t["kld"], "kld_se": t.get("kld_se"), "base_kld": b["kld"],
                                     "base_kld_se": b.get("kld_se"), "bits": bits_t, "base_bits": bits_b,
                                     "ppl_diff_pct": dppl, "d_kld_se": se, "reason": r.get("baselines_reason", ""),
                                     "rule": {"limit": k_sig * se, "breach": "PARTIAL"}}))
    return out


def _cpus(*loads: dict):
    """The CPU count the recorded load averages are over: the machine's ('cpus', os.cpu_count()), never the CPUs this
    process may use ('usable_cpus': affinity, cgroup quota). /proc/loadavg counts every runnable task of the kernel
    (a container's host included), so a quota of 2 CPUs on a 16-CPU host would call a quarter-busy host overloaded
    and leave every speed figure unjudged (review 28b)."""
    return next((x.get("cpus") or x.get("usable_cpus") for x in loads if x.get("cpus") or x.get("usable_cpus")), None)


def load_note(meta: dict) -> str:
    """'' when the machine's load stayed at or below its CPU count (:func:`_cpus`) during the sweep (``meta['load_start']`` and
    ``['load_end']`` from :func:`harness.runners.sweep.machine_load`), else 'measured at load A (start) / B (end) on
    N CPUs: other work shared them'. Unrecorded loads give ''."""
    a, b = meta.get("load_start") or {}, meta.get("load_end") or {}
    cpus = _cpus(a, b)
    loads = [x.get("load_1min") for x in (a, b) if x.get("load_1min") is not None]
    if not cpus or not loads or max(loads) <= cpus:
        return ""
    return (f"measured at load {a.get('load_1min', '?')} (start) / {b.get('load_1min', '?')} (end) on {cpus} CPUs: "
            f"other work shared them")


def speed_not_judged(row: dict, bench_recs: dict, meta: dict, ref: str = "q8_0/q8_0", own_threads: int = 0) -> str:
    """Why a speed ratio cannot carry a PASS or FAIL, '' when it can. A careful benchmark judges only figures with a
    measured spread taken on a machine that ran nothing else:

    - one repetition (``row['reps']`` or ``row['ref_reps']`` < 2, rows of :func:`_speed_table`): llama-bench gives no
      standard deviation, so neither the ratio's standard error nor the repetitions' range exists (ratio_se is 0);
    - overload: other work took more than half the machine's CPUs (:func:`_cpus`) just before or after the
      llama-bench run of the pair or of ``ref`` (``bench_recs[label].data['load']`` {'before', 'after'}, recorded by
      harness.runners.sweep._run_bench; a record made before those existed falls back to the sweep's
      ``meta['load_start'/'load_end']``): tokens/s then measure the other work as much as the cache type. The 1-min
      load average counts the sweep's own tools too (llama-bench and llama-perplexity run ``own_threads`` threads,
      at most the CPU count), so other work is the load above those: overloaded when load_1min - min(own_threads,
      cpus) > cpus / 2. A quiet 2-core machine running the sweep's 2 threads (load about 2-2.5) is judged; the
      tryout's load 3.4-4.1 there is not. The 1-min average lags, so a run is judged overloaded when either end is.

    Returns 'not judged: <reasons>; <fixes>' (one line) or ''. Unrecorded loads are no reason."""
    why, fix = [], []
    if min(row.get("reps") or 1, row.get("ref_reps") or 1) < 2:
        why.append(f"{min(row.get('reps') or 1, row.get('ref_reps') or 1)} llama-bench repetition gives no spread "
                   f"(no standard error) to judge the ratio against")
        fix.append("with --reps 3 or more")
    busy = []
    for label in dict.fromkeys((row["pair"], ref)):
        rec = bench_recs.get(label)
        ld = ((rec.data if rec is not None else None) or {}).get("load") or {}
        a, b = (ld.get("before") or {}, ld.get("after") or {}) if ld else (meta.get("load_start") or {},
                                                                          meta.get("load_end") or {})
        cpus = _cpus(a, b)
        loads = [x.get("load_1min") for x in (a, b) if x.get("load_1min") is not None]
        if cpus and loads and max(loads) - min(max(own_threads, 0), cpus) > cpus / 2:
            when = "before / after its llama-bench run" if ld else "at the sweep's start / end"
            busy.append(f"{label} at 1-min load {a.get('load_1min', '?')} / {b.get('load_1min', '?')} {when} on {cpus} "
                        f"CPUs")
    if busy:
        why.append(f"measured with the machine overloaded ({'; '.join(busy)}; the sweep's own {own_threads} "
                   f"threads explain at most {min(max(own_threads, 0), cpus)}): other work took over half the CPUs")
        fix.append("on a quiet machine")
    return f"not judged: {'; '.join(why)}; rerun {' '.join(fix)}" if why else ""


def ratio_text(r: float | None) -> str:
    """A speed ratio as the report prints it: 3 significant digits and 'x' ('0.0412x', '0.97x'), so a
    fallback's tiny ratio never shows as a bare '0.00x'; '-' for None."""
    return "-" if r is None else f"{r:.3g}x"


