"""Check SWEEP: judging a model-level sweep (perplexity/KLD/speed/KV memory per K/V pair).

Input: a :class:`harness.runners.sweep.SweepResult` (numbers parsed from the fork's own tools) and the
rules in ``checks/sweeps.toml``. Output: a CheckResult 'SWEEP' with one cell per (pair, metric) and the
table that goes into ``run.sections['sweep']``.

Rules (spec "Model-level sweeps"): PPL of a pair vs q8_0 judged on the paired mean
ln(PPL(Q)/PPL(f16)) difference; FAIL only when the excess over the limit is larger than
``paired_se`` standard errors, else PARTIAL. KLD is reported above the f16-vs-f16 noise floor.
Prefill tokens/s ratio to q8_0 at each depth >= ``prefill_ratio_min``. A K/V type the fork used that
differs from the one asked for (type in the size line, a type-change log line, or a KV size that the
type traits do not predict) is an ERROR cell quoting the log line, unless ``fork_defaults``.

Integrity (spec "Verdicts", "Who is at fault", "Integrity of a verdict"): a sweep in which no rule was
applied (no q8_0/q8_0 pair, say) gets a SKIP cell "nothing judged" with the reason, never PASS; a tool
that crashed on a pair the fork accepted is a FAIL naming the phase (the figures printed before stay in
the speed table), a clean refusal at start-up is SKIP "refused"; a pair whose graph splits exceed the f16
baseline's is a PARTIAL placement cell, and its speed cells name that cause; jobs not run because the
sweep was interrupted are SKIP "not run".
"""
from __future__ import annotations

import math
from pathlib import Path

from harness.checks.contract import Check
from harness.checks.sweep_rules import (MIB, _speed_table, _status, failed_job_cell, kv_type_problem,  # noqa: F401
                                       load_note, ratio_text, speed_not_judged, vs_q4_0_cells)
from harness.report.model import Cell, CheckResult, Verdict

ID, TITLE = "SWEEP", "Model-level sweep: PPL, KL divergence, top-1, speed and KV memory per K/V pair"
SWEEPS_TOML = Path(__file__).resolve().parents[2] / "checks" / "sweeps.toml"


def load_rules(path: Path | None = None) -> dict:
    """Rules as {section: {key: value}} plus {section: {key + '_reason': text}}.

    Raises:
        HarnessError: file missing, bad TOML, or an entry without value and reason.
    """
    from harness.checks.common import load_thresholds
    return load_thresholds(Path(path or SWEEPS_TOML), what="sweep rules file")


JUDGED_METRICS = ("ppl_vs_q8_0", "prefill_ratio_vs_q8_0")


def judge_sweep(result, rules: dict | None = None, traits: dict | None = None) -> tuple[CheckResult, dict]:
    """Judge a sweep.

    Args:
        result: SweepResult from :func:`harness.runners.sweep.run_sweep`.
        rules: from :func:`load_rules` (default: checks/sweeps.toml).
        traits: {name: TypeTrait} of the build (default: read from result.config.bdir).

    Returns:
        (CheckResult 'SWEEP', section dict with 'rows' (one per pair), 'speed' (one per pair/test/depth),
        'noise_floor', 'pinned', 'notes', 'rules').
    """
    from harness.runners.ggml_types import bits_per_real_value, type_traits

    rules = rules or load_rules()
    cfg = result.config
    backend = cfg.backend
    traits = traits if traits is not None else (result.traits or type_traits(str(cfg.bdir)))
    k_sig = float(rules["significance"]["paired_se"])
    tol = float(rules["memory"]["tolerance_mib"])
    cr = CheckResult(ID, TITLE)
    cr.duration_s = result.seconds
    mi = result.model_info
    labels = [f"{k}/{v}" for k, v in cfg.pairs]
    section: dict = {"pinned": cfg.pinned(), "rows": [], "speed": [], "noise_floor": None, "notes": [],
                     "rules": {k: v for k, v in rules.items()}, "model": mi.to_dict() if mi else None,
                     "base": None}

    if result.error:
        cr.error = result.error
        for lab in labels:
            cr.cells.append(Cell("SWEEP", lab, f"{backend}:perplexity", "ppl_vs_q8_0", None, None, Verdict.ERROR,
                                 caveat=result.error))
        section["rows"] = [{"pair": lab, "status": "ERROR", "error": result.error} for lab in labels]
        return cr, section

    if cfg.save_pair_logits:  # the reference side of a cross-backend sweep (harness/runners/xbackend.py)
        cr.notes.append("each pair's llama-perplexity pass saved its logits for the other backends; its KLD, top-1 "
                        "agreement, Δp and ln-PPL-ratio standard error vs the f16 baseline are computed by the harness "
                        "from the two saved logit files (harness/runners/logit_files.py); PPL and the ln PPL ratio are "
                        "llama-perplexity's")
    dev = cfg.device_facts or {}
    if dev.get("software") or dev.get("visible_devices"):  # harness/runners/offload.py: what the device is, what was set
        cr.notes.append("; ".join(x for x in (f"ran on {dev.get('label') or backend}", dev.get("visible_devices")) if x))
    # notes beside the rules
    if mi is not None:
        if mi.n_embd < rules["notes"]["tiny_model_n_embd"]:
            cr.notes.append(f"{mi.name} is a tiny model (n_embd {mi.n_embd}, {mi.n_layer} layers): the default rules "
                            f"are for a real model on real text; expect larger PPL losses than on a production model")
        if mi.head_dim_k % 128 or mi.head_dim_v % 128:
            from harness.runners.ggml_types import padded_head
            ph = padded_head(mi.head_dim_k, "turbo3")
            cr.notes.append(f"head_dim {mi.head_dim_k} is zero-padded to {ph} for turbo types, so turbo stores "
                            f"{ph / mi.head_dim_k:g}x the values and loses its memory advantage: compare bits per real value")
        else:
            cr.notes.append(f"head_dim {mi.head_dim_k} is {mi.head_dim_k // 128} whole 128-value turbo group"
                            f"{'s' if mi.head_dim_k > 128 else ''}: no padding, turbo keeps its memory advantage")
        if mi.sliding_window:
            w = mi.sliding_window
            cr.notes.append(f"{mi.name} has interleaved sliding-window attention (window {w}): the KV size counts its SWA "
                            f"and full-attention caches together; at ctx {cfg.ctx} "
                            + (f"the window covers the whole chunk, so every layer attends to every earlier token "
                               f"(see the depth table for contexts beyond {w})" if cfg.ctx <= w else
                               f"the SWA layers attend only to the last {w} tokens"))
    if result.base is not None and result.base.ok:
        section["base"] = {"ppl": result.base.data["ppl"], "ppl_se": result.base.data["ppl_se"],
                           "evidence": list(result.base.evidence)}
    elif result.base is not None:
        cr.notes.append(f"f16 baseline failed: {result.base.error}")
        if result.base.fault in ("fork", "refused"):
            cr.cells.append(failed_job_cell(result.base, "f16/f16", f"{backend}:perplexity", "f16_baseline_run",
                                            list(result.base.evidence)))
    interrupted = result.interrupted is not None
    base_crashed = result.base is not None and not result.base.ok and result.base.fault in ("fork", "refused")
    # placement: the f16 baseline run's graph splits are what every pair's are compared with
    base_splits = None
    if result.base is not None and (result.base.data.get("kv") or {}).get("graph_splits"):
        base_splits = result.base.data["kv"]["graph_splits"]
    elif "f16/f16" in result.ppl:
        base_splits = ((result.ppl["f16/f16"].data or {}).get("kv") or {}).get("graph_splits")

    speed = _speed_table(result.bench)
    section["speed"] = speed
    q8 = result.ppl.get("q8_0/q8_0")
    q8s = q8.data["stats"] if q8 is not None and q8.ok else None
    f16 = result.ppl.get("f16/f16")
    floor = f16.data["stats"]["kld"] if f16 is not None and f16.ok else None
    section["noise_floor"] = floor
    if floor is None:
        cr.notes.append("the f16/f16 pair failed: KLD is not calibrated against a noise floor" if f16 is not None else
                        "no f16/f16 pair in the sweep: KLD is not calibrated against a noise floor")
    turbo_rule_types = set(rules["speed"]["speed_rule_types"])
    busy = load_note(getattr(result, "meta", {}) or {})
    section["load"] = {k: (result.meta or {}).get(k) for k in ("load_start", "load_end")}
    if busy and cfg.bench:
        cr.notes.append(f"speed {busy}")
    speed_unjudged: list[str] = []  # pairs whose prefill ratio was not judged (speed_not_judged)

    def no_q8_why(what: str) -> str:
        if "q8_0/q8_0" not in labels:
            return ("no q8_0/q8_0 pair in this sweep (--no-baselines): the rules judge every pair against q8_0"
                    if cfg.no_baselines else "no q8_0/q8_0 pair in this sweep: the rules judge every pair against q8_0")
        return f"the q8_0/q8_0 {what} run gave no figures to compare with"

    from harness.runners.sweep import split_pair
    for k, v in cfg.pairs:
        lab = f"{k}/{v}"
        k, v, rot = split_pair(k, v)  # 'q4_0/q4_0+rot': the cache types, and the attention rotation switched on
        row: dict = {"pair": lab, "k": k, "v": v, "rotation": rot, "status": "ok", "error": "", "caveat": ""}
        caveats: list[str] = []
        prec = result.ppl.get(lab)
        brec = result.bench.get(lab)
        ev = list(prec.evidence) if prec else []
        # -------- placement (from whatever log the pair's runs left, even a run that died later)
        splits = ((prec.data if prec else {}).get("kv") or {}).get("graph_splits")
        if splits is None and brec is not None:
            splits = max((x.get("graph_splits") or 0 for x in brec.data.get("kv", [])), default=0) or None
        placement = ""
        if splits is not None and base_splits is not None and splits > base_splits:
            where = "on the CPU" if backend != "cpu" else "split across backends"
            placement = (f"graph splits {splits} vs {base_splits} for the f16 baseline: attention ran {where}, "
                         f"not on {backend} as asked")
            row["placement"] = placement
            cr.cells.append(Cell("SWEEP", lab, f"{backend}:placement", "graph_splits_vs_f16_baseline", float(splits),
                                 float(base_splits), Verdict.PARTIAL,
                                 caveat=f"placement: {placement}; its speed is the fallback's, not {backend}'s",
                                 evidence=ev, details={"graph_splits": splits, "baseline_graph_splits": base_splits}))
        # -------- perplexity / KLD
        if prec is None or not prec.ok:
            if prec is not None and base_crashed and prec.error.startswith("no f16 baseline"):
                c = Cell("SWEEP", lab, f"{backend}:perplexity", "ppl_vs_q8_0", None, None, Verdict.SKIP,
                         caveat="not measured: the f16 baseline run did not complete (see its cell)", evidence=ev)
            else:
                c = failed_job_cell(prec, lab, f"{backend}:perplexity", "ppl_vs_q8_0", ev, interrupted)
            row.update(status=_status(c), error=c.caveat, phase=(prec.phase if prec else ""))
            cr.cells.append(c)
        else:
            s = prec.data["stats"]
            kv = prec.data["kv"]
            row.update(ppl=s["ppl"], ppl_se=s.get("ppl_se"), ln_ppl_ratio_vs_f16=s.get("ln_ppl_ratio"),
                       ln_ppl_ratio_se=s.get("ln_ppl_ratio_se"), kld=s["kld"], kld_se=s.get("kld_se"),
                       kld_above_floor=(s["kld"] - floor) if floor is not None else None,
                       kld_p99=s.get("kld_p99"), same_top_p_pct=s.get("same_top_p_pct"),
                       same_top_p_se=s.get("same_top_p_pct_se"), dp_mean_pct=s.get("dp_mean_pct"),
                       dp_rms_pct=s.get("dp_rms_pct"), chunks=s.get("chunks"),
                       kv_mib=kv["size_mib"], k_mib=kv["k_mib"], v_mib=kv["v_mib"],
                       kv_cells=kv["cells"], graph_splits=kv.get("graph_splits"),
                       k_used=kv["k_type"], v_used=kv["v_type"], kv_log=kv["size_line"])
            if mi is not None:
                from harness.runners.ggml_types import predict_kv_bytes
                from harness.runners.llama_logs import kv_dims
                dims = (*kv_dims(kv), mi.n_head_kv)
                k_bytes, v_bytes = kv["k_mib"] * MIB, kv["v_mib"] * MIB  # as printed (2 decimals)
                if k in traits and v in traits:
                    pk = predict_kv_bytes(traits[k], *dims, mi.head_dim_k)
                    pv = predict_kv_bytes(traits[v], *dims, mi.head_dim_v)
                    row["kv_pred_mib"] = (pk + pv) / MIB
                    row["bits_nominal"] = (traits[k].bits_per_value + traits[v].bits_per_value) / 2
                    tol_kv = tol * max(1, len(kv.get("parts") or []))  # each cache's size line is rounded on its own
                    if abs(pk / MIB - kv["k_mib"]) <= tol_kv and abs(pv / MIB - kv["v_mib"]) <= tol_kv:
                        k_bytes, v_bytes = pk, pv  # the log confirms the prediction: use exact bytes
                row["k_bits_real"] = bits_per_real_value(k_bytes, *dims, mi.head_dim_k)
                row["v_bits_real"] = bits_per_real_value(v_bytes, *dims, mi.head_dim_v)
                row["bits_per_value"] = (row["k_bits_real"] + row["v_bits_real"]) / 2
            if kv.get("padding"):
                caveats.append("padded " + ", ".join(f"{x} {a}->{b}" for x, (a, b) in sorted(kv["padding"].items())))
            prob = kv_type_problem(kv, k, v, mi, traits, tol)
            if prob and not cfg.fork_defaults:
                row.update(status="ERROR", error=prob)
                cr.cells.append(Cell("SWEEP", lab, f"{backend}:perplexity", "kv_types", None, None, Verdict.ERROR,
                                     caveat=prob, evidence=ev))
            elif prob:
                caveats.append(f"fork defaults: {prob}")
            if placement:
                caveats.append(placement)
            # paired judgement against q8_0
            if q8s is None and lab in rules["ppl_vs_q8_0"] and row["status"] != "ERROR":
                cr.cells.append(Cell("SWEEP", lab, f"{backend}:perplexity", "ppl_vs_q8_0", None,
                                     rules["ppl_vs_q8_0"][lab], Verdict.SKIP, caveat=f"not judged: {no_q8_why('perplexity')}",
                                     evidence=ev))
            if q8s is not None and "ln_ppl_ratio" in s and lab != "q8_0/q8_0":
                d = s["ln_ppl_ratio"] - q8s["ln_ppl_ratio"]
                se = math.hypot(s.get("ln_ppl_ratio_se", 0.0), q8s.get("ln_ppl_ratio_se", 0.0))
                row.update(ppl_vs_q8_pct=100 * math.expm1(d), d_ln_vs_q8=d, d_ln_vs_q8_se=se)
                limit = rules["ppl_vs_q8_0"].get(lab)
                if row["status"] == "ERROR":
                    pass
                elif limit is None:
                    cr.cells.append(Cell("SWEEP", lab, f"{backend}:perplexity", "ppl_vs_q8_0", math.expm1(d), None,
                                         Verdict.SKIP, caveat="no default rule for this pair: measured only",
                                         evidence=ev, details={"d_ln": d, "d_ln_se": se}))
                else:
                    excess = d - math.log1p(limit)
                    if excess <= 0:
                        vd, cav = Verdict.PASS, ""
                    elif excess <= k_sig * se:
                        vd, cav = Verdict.PARTIAL, (f"over the +{100 * limit:g}% limit by less than {k_sig:g} paired "
                                                    f"standard errors ({excess:.4f} <= {k_sig:g} x {se:.4f}): not significant")
                    else:
                        vd, cav = Verdict.FAIL, (f"PPL +{100 * math.expm1(d):.2f}% vs q8_0 (limit +{100 * limit:g}%), "
                                                 f"{excess / se if se else float('inf'):.1f} paired se over")
                    cr.cells.append(Cell("SWEEP", lab, f"{backend}:perplexity", "ppl_vs_q8_0", math.expm1(d), limit,
                                         vd, caveat=cav, evidence=ev,
                                         details={"d_ln": d, "d_ln_se": se, "reason": rules["ppl_vs_q8_0"][lab + "_reason"]}))
            if lab == "f16/f16":
                fmax = rules["noise"]["kld_floor_max"]
                vd = Verdict.PASS if s["kld"] <= fmax else Verdict.PARTIAL
                cr.cells.append(Cell("SWEEP", lab, f"{backend}:perplexity", "kld_noise_floor", s["kld"], fmax, vd,
                                     caveat="" if vd == Verdict.PASS else "f16 vs its own baseline is not reproducible: "
                                     "KLD of other pairs includes this noise", evidence=ev))
        # -------- speed
        if cfg.bench:
            bev = list(brec.evidence) if brec else []
            if brec is None or not brec.ok:
                c = failed_job_cell(brec, lab, f"{backend}:bench", "bench_run", bev, interrupted)
                if brec is not None and brec.fault == "fork" and brec.data.get("rows"):
                    kept = ", ".join(f"{r['test']}{r['n_tokens']}@d{r['depth']}" for r in brec.data["rows"])
                    c.caveat += f" (kept the figures measured before: {kept})"
                row.setdefault("bench_error", c.caveat)
                row.setdefault("bench_phase", brec.phase if brec else "")
                cr.cells.append(c)
                if row["status"] not in ("ERROR", "FAIL") and _status(c) != "not run":
                    row.update(status=_status(c), error=c.caveat)
            if brec is not None and brec.data.get("rows"):
                for kvb in brec.data.get("kv", []):
                    prob = kv_type_problem(kvb, k, v, None, traits, tol)
                    if prob and not cfg.fork_defaults:
                        cr.cells.append(Cell("SWEEP", lab, f"{backend}:bench", "kv_types", None, None, Verdict.ERROR,
                                             caveat=prob, evidence=bev))
                        row.update(status="ERROR", error=row["error"] or prob)
                        break
                mine = [r for r in speed if r["pair"] == lab]
                for r in mine:
                    row[f"{r['test']}_ratio_d{r['depth']}"] = r["ratio"]
                    row[f"{r['test']}_tps_d{r['depth']}"] = r["tps"]
                pp = [r for r in mine if r["test"] == "pp" and r["ratio"] is not None]
                if not pp and ({k, v} & turbo_rule_types) and [r for r in mine if r["test"] == "pp"]:
                    cr.cells.append(Cell("SWEEP", lab, f"{backend}:bench", "prefill_ratio_vs_q8_0", None,
                                         rules["speed"]["prefill_ratio_min"], Verdict.SKIP, op=">=",
                                         caveat=f"not judged: {no_q8_why('bench')}", evidence=bev))
                if pp and ({k, v} & turbo_rule_types):
                    worst_r = min(pp, key=lambda r: r["ratio"])
                    thr = rules["speed"]["prefill_ratio_min"]
                    not_judged = speed_not_judged(worst_r, result.bench, getattr(result, "meta", {}) or {},
                                                  own_threads=cfg.threads)
                    if not_judged and placement and worst_r["ratio"] < thr:  # a CPU fallback, not noise: FAIL stays
                        not_judged = ""
                    if not_judged:  # one repetition or an overloaded machine: neither PASS nor FAIL
                        vd, cav = Verdict.PARTIAL, f"{not_judged} (prefill {ratio_text(worst_r['ratio'])} q8_0)"
                        speed_unjudged.append(lab)
                    elif worst_r["ratio"] >= thr:
                        vd, cav = Verdict.PASS, ""
                    elif thr - worst_r["ratio"] <= k_sig * (worst_r["ratio_se"] or 0):
                        vd, cav = Verdict.PARTIAL, f"below {thr} within {k_sig:g} se of the repetitions' spread"
                    elif (worst_r.get("ratio_hi") or 0) >= thr:
                        vd, cav = Verdict.PARTIAL, (f"below {thr}, but the repetitions' spread "
                                                    f"{ratio_text(worst_r['ratio_lo'])}..{ratio_text(worst_r['ratio_hi'])} "
                                                    f"covers the limit: not a FAIL")
                    else:
                        vd, cav = Verdict.FAIL, (f"prefill {ratio_text(worst_r['ratio'])} q8_0 at depth "
                                                 f"{worst_r['depth']} (limit {thr})")
                    if placement and vd != Verdict.PASS:
                        cav += f"; cause: {placement}"
                    if busy and not not_judged:
                        cav = f"{cav}; {busy}" if cav else busy
                    cr.cells.append(Cell("SWEEP", lab, f"{backend}:bench", "prefill_ratio_vs_q8_0", worst_r["ratio"], thr,
                                         vd, op=">=", caveat=cav, evidence=bev,
                                         details={"depth": worst_r["depth"], "ratio_se": worst_r["ratio_se"],
                                                  "not_judged": not_judged,
                                                  "reason": rules["speed"]["prefill_ratio_min_reason"]}))
        row["caveat"] = "; ".join(caveats)
        section["rows"].append(row)
    if speed_unjudged:
        cr.notes.append(f"speed of {', '.join(speed_unjudged)} not judged (PARTIAL): one llama-bench repetition or an "
                        f"overloaded machine; rerun with --reps 3 or more on a quiet machine")
    cr.cells += vs_q4_0_cells(section["rows"], rules, backend, mi.name if mi is not None else "the model")
    from harness.checks.decode import decode_cells
    from harness.checks.depth import depth_cells
    for name, (cells, sub) in (("decode", decode_cells(result, section["rows"], rules, backend)),
                               ("depth", depth_cells(result, rules, backend))):
        cr.cells += cells
        if sub is not None:
            section[name] = sub  # build_run moves it to run.sections[name] (rendered from its 'markdown')
    if cfg.baselines_added:
        from harness.runners.sweep_config import baselines_note
        cr.notes.append(baselines_note(cfg.baselines_added))
    # a rule applied (PASS/PARTIAL/FAIL), or a fork failure found: anything else judged nothing
    judged = [c for c in cr.cells if c.verdict == Verdict.FAIL
              or (c.metric in JUDGED_METRICS and c.verdict in (Verdict.PASS, Verdict.PARTIAL))]
    if not judged and not result.error:
        reasons = sorted({c.caveat for c in cr.cells if c.metric in JUDGED_METRICS and c.verdict == Verdict.SKIP})
        ruled = sorted(x for x in rules["ppl_vs_q8_0"] if not x.endswith("_reason"))
        why = "; ".join(reasons) or f"no pair with a rule ({', '.join(ruled)}) or a turbo speed rule was measured"
        cr.notes.insert(0, f"nothing judged: {why}")
        cr.cells.append(Cell("SWEEP", "all", f"{backend}:sweep", "pairs_judged", 0.0, 1.0, Verdict.SKIP, op=">=",
                             caveat=f"nothing judged: {why}", details={"rule": {"breach": "SKIP"}}))  # nothing judged
    section["notes"] = list(cr.notes)
    return cr, section


def _not_from_verify(ctx):
    """SWEEP is judged from the sweep's own tool runs (:func:`judge_sweep`), never by verify."""
    from harness.errors import HarnessError
    raise HarnessError("SWEEP runs through `turbo-harness sweep`")


CHECK = Check(ID, TITLE, _not_from_verify, order=100, rules="", rules_file=SWEEPS_TOML, in_verify=False,
              command="sweep", needs=("llama-perplexity", "llama-bench", "model", "corpus"))
