"""Check XBACKEND: do two backends agree at model level? (spec "Backends agree at model level")

Input: a :class:`harness.runners.xbackend.XResult` (per backend its own sweep; per K/V pair backend B's run scored
by the fork's ``llama-perplexity --kl-divergence`` against backend A's logits of the same pair) and the rules
``[xbackend]`` (and ``[decode]``, ``[significance]``) of ``checks/sweeps.toml``.

The noise floor is measured: f16/f16 on B scored against f16/f16 on A. A pair is beyond the floor when its
cross-backend KLD exceeds ``max(floor_multiple x floor, kld_min)`` by more than ``paired_se`` standard errors (the
absolute minimum makes a floor of zero safe: nothing is divided by it). Beyond the floor, the finding names the
backend that moved further from its own f16 (its own KLD larger by more than ``paired_se`` combined standard errors):
FAIL when that is the target backend, PARTIAL otherwise (the reference moved, or neither clearly did).

A pair that ran on one backend only (refused, crashed, no logits, or placed on the CPU) gets its own cell saying so
and is never PASS; a pair whose scoring or logits run used other K/V types than it names (the log says so) is an
ERROR cell, not compared; a comparison in which nothing was compared is SKIP "nothing compared". Decode agreement across
backends: the same greedy prompts on A and B, first divergence per prompt, with the decode check's near-tie handling
(A's top-1 margin at the divergence; the probability of so few agreeing tokens given the pair's cross-backend top-1
agreement).
"""
from __future__ import annotations

import math

from harness.checks.contract import Check
from harness.checks.sweep_rules import failed_job_cell, kv_type_problem
from harness.checks.sweeps import SWEEPS_TOML
from harness.report.model import Cell, CheckResult, Verdict

ID, TITLE = "XBACKEND", "Backends agree at model level: cross-backend KLD of each K/V pair against the measured floor"
REF = "f16/f16"
JUDGED = ("cross_kld_vs_floor",)


def _fmt(v, spec: str) -> str:
    return "-" if not isinstance(v, (int, float)) else format(v, spec)


def _kld(v, spec: str) -> str:
    """A KLD for the tables: -1e-6 (an exact 0 as llama-perplexity prints it) as 0 (harness.report.render.kld_shown)."""
    from harness.runners.llama_logs import kld_shown
    return _fmt(kld_shown(v), spec)


def moved_further(a: dict, b: dict, name_a: str, name_b: str, k_sig: float) -> str:
    """The backend whose own KLD (vs its own f16) is larger by more than ``k_sig`` combined standard errors, or ''.

    Args:
        a, b: the two sides' sweep rows of the pair ('kld', 'kld_se'; nats per token).
    """
    ka, kb = a.get("kld"), b.get("kld")
    if ka is None or kb is None:
        return ""
    se = math.hypot(a.get("kld_se") or 0.0, b.get("kld_se") or 0.0)
    if kb - ka > k_sig * se:
        return name_b
    if ka - kb > k_sig * se:
        return name_a
    return ""


def judge_xbackend(res, sections: dict[str, dict], rules: dict) -> tuple[CheckResult, dict]:
    """Judge a cross-backend sweep.

    Args:
        res: XResult. sections: backend -> the section of :func:`harness.checks.sweeps.judge_sweep` for its own sweep
            (its 'rows': own KLD, placement, status). rules: :func:`harness.checks.sweeps.load_rules`.
    Returns:
        (CheckResult 'XBACKEND', section {'rows', 'floor' {backend: {...}}, 'decode', 'markdown', 'rules', 'load',
        'passes', 'target'}).
    """
    x = rules["xbackend"]
    k_sig = float(rules["significance"]["paired_se"])
    mult, kmin, fmax = float(x["floor_multiple"]), float(x["kld_min"]), float(x["floor_max"])
    cfg = res.config
    a_name, target = cfg.ref.backend, cfg.target
    cr = CheckResult(ID, TITLE)
    cr.duration_s = res.seconds
    rows_out: list[dict] = []
    floors: dict[str, dict] = {}
    interrupted = res.interrupted is not None
    labels = [f"{k}/{v}" for k, v in cfg.ref.pairs]
    rows_a = {r["pair"]: r for r in sections.get(a_name, {}).get("rows", [])}
    for side in cfg.sides[1:]:
        b_name = side.backend
        rows_b = {r["pair"]: r for r in sections.get(b_name, {}).get("rows", [])}
        path = f"{b_name}:vs-{a_name}"
        fl = res.cross.get((b_name, REF))
        fl_bad = fl is not None and fl.ok and _kv_problem(fl, res.logits.get(REF), REF, a_name, b_name,
                                                          cfg.ref.fork_defaults) is not None
        floor = fl.data["stats"]["kld"] if fl is not None and fl.ok and not fl_bad else None
        floor_se = (fl.data["stats"].get("kld_se") or 0.0) if floor is not None else None
        limit = max(mult * floor, kmin) if floor is not None else None
        floors[b_name] = {"kld": floor, "kld_se": floor_se, "limit": limit}
        for lab in labels:
            rec = res.cross.get((b_name, lab))
            ra, rb = rows_a.get(lab, {}), rows_b.get(lab, {})
            row = {"backend": b_name, "ref": a_name, "pair": lab, "own_kld_ref": ra.get("kld"),
                   "own_kld_ref_se": ra.get("kld_se"), "own_kld": rb.get("kld"), "own_kld_se": rb.get("kld_se")}
            one = _one_side_only(rec, res, lab, a_name, b_name, rb, path, interrupted)
            if one is not None:
                cr.cells.append(one)
                row.update(status=one.verdict.value, note=one.caveat)
                rows_out.append(row)
                continue
            kv_bad = _kv_problem(rec, res.logits.get(lab), lab, a_name, b_name, cfg.ref.fork_defaults)
            if kv_bad is not None:  # the runs did not use the asked K/V types: no comparison of this pair
                who, prob = kv_bad
                c = Cell(ID, lab, f"{who}:vs-{a_name if who == b_name else b_name}", "cross_compared", None, None,
                         Verdict.ERROR, evidence=list(rec.evidence), target=who == target,
                         caveat=f"not compared: {who}'s run of {lab} did not use the asked K/V types: {prob}")
                cr.cells.append(c)
                row.update(status="ERROR", note=c.caveat)
                rows_out.append(row)
                continue
            s = rec.data["stats"]
            # PPL of B's run over the reference's own run of the pair (both from full-precision logits): the fork's
            # ln(PPL(Q)/PPL(base)) reads the base's uint16-compressed log-probs and carries their rounding (~0.4%)
            a_ppl = (res.logits.get(lab).data or {}).get("ppl") if res.logits.get(lab) is not None else None
            ratio = s["ppl"] / a_ppl if a_ppl else None
            row.update(kld=s["kld"], kld_se=s.get("kld_se"), top1_pct=s.get("same_top_p_pct"), ppl_ratio=ratio,
                       floor=floor, limit=limit, x_floor=(s["kld"] / floor if floor else None))
            ev = list(rec.evidence)
            if lab == REF:
                vd = Verdict.PASS if s["kld"] <= fmax else Verdict.PARTIAL
                cav = (f"noise floor {b_name} vs {a_name} with the f16 cache: KLD {s['kld']:.3g} ± {floor_se:.2g}"
                       + (" (bit-identical logits)" if s["kld"] == 0 else "")
                       + ("" if vd == Verdict.PASS else f"; above {fmax:g}: the backends compute the model differently "
                                                         f"even with the exact cache, and every pair inherits it"))
                cr.cells.append(Cell(ID, lab, path, "noise_floor", s["kld"], fmax, vd, caveat=cav, evidence=ev,
                                     target=b_name == target, details={"reason": x["floor_max_reason"]}))
                row.update(status=vd.value, note=cav)
                rows_out.append(row)
                continue
            placement = rb.get("placement") or ra.get("placement")
            if placement:  # one side's attention ran elsewhere: the runs do not compare the two backends
                who = b_name if rb.get("placement") else a_name
                c = Cell(ID, lab, path, "cross_compared", s["kld"], None, Verdict.PARTIAL, evidence=ev, target=who == target,
                         caveat=f"not compared on {who}: its run of {lab} was placed elsewhere ({placement}); the KLD "
                                f"{s['kld']:.4g} measured does not compare {b_name} with {a_name}")
                cr.cells.append(c)
                row.update(status="PARTIAL", note=c.caveat)
                rows_out.append(row)
                continue
            if floor is None:
                why = ("its runs did not use the f16 cache" if fl_bad else fl.error) if fl is not None else "not run"
                c = Cell(ID, lab, path, "cross_kld_vs_floor", s["kld"], None, Verdict.SKIP, evidence=ev,
                         caveat=f"not judged: no measured noise floor (f16/f16 {b_name} vs {a_name}: {why})")
                cr.cells.append(c)
                row.update(status="SKIP", note=c.caveat)
                rows_out.append(row)
                continue
            over = s["kld"] - limit
            se = s.get("kld_se") or 0.0
            facts = (f"KLD {b_name} vs {a_name} {s['kld']:.4g} ± {se:.2g} (floor {floor:.3g}"
                     + (f", {s['kld'] / floor:.1f}x" if floor > 0 else ", bit-identical with f16")
                     + f"; limit {limit:.3g}), top-1 {_fmt(s.get('same_top_p_pct'), '.2f')}%, PPL {b_name}/{a_name} "
                     f"{_fmt(ratio, '.4f')}")
            who = moved_further(ra, rb, a_name, b_name, k_sig)
            row["moved_further"] = who
            if over <= 0:
                vd, cav = Verdict.PASS, f"agrees within the floor rule: {facts}"
            elif over <= k_sig * se:
                vd, cav = Verdict.PARTIAL, f"above the limit by less than {k_sig:g} se: {facts}"
            else:
                own = (f"own KLD vs its own f16: {a_name} {_fmt(ra.get('kld'), '.4g')}, {b_name} {_fmt(rb.get('kld'), '.4g')}")
                if who:
                    vd = Verdict.FAIL if who == target else Verdict.PARTIAL
                    cav = f"backends disagree: {who} moved further from its own f16 ({own}); {facts}"
                else:
                    vd = Verdict.PARTIAL
                    cav = f"backends disagree, and neither moved clearly further from its own f16 ({own}); {facts}"
            cr.cells.append(Cell(ID, lab, path, "cross_kld_vs_floor", s["kld"], limit, vd, caveat=cav, evidence=ev,
                                 target=(who or b_name) == target,
                                 details={"floor": floor, "floor_se": floor_se, "kld_se": se, "moved_further": who,
                                          "own_kld": {a_name: ra.get("kld"), b_name: rb.get("kld")},
                                          "top1_pct": s.get("same_top_p_pct"), "ppl_ratio": ratio,
                                          "reason": f"{x['floor_multiple_reason']}; {x['kld_min_reason']}"}))
            row.update(status=vd.value, note=cav)
            rows_out.append(row)
    from harness.checks.xdecode import xdecode_cells
    dcells, drows = xdecode_cells(res, rows_out, rules)
    cr.cells += dcells
    judged = [c for c in cr.cells if c.metric in JUDGED and c.verdict in (Verdict.PASS, Verdict.PARTIAL, Verdict.FAIL)]
    if not judged:
        cr.notes.insert(0, "nothing compared: no pair was measured on both backends against a noise floor")
        cr.cells.append(Cell(ID, "all", f"{target}:vs-{a_name}", "pairs_compared", 0.0, 1.0, Verdict.SKIP, op=">=",
                             caveat="nothing compared: no pair was measured on both backends against a noise floor",
                             details={"rule": {"breach": "SKIP"}}))  # nothing compared is SKIP, never judged by number
    sec = {"rows": rows_out, "floor": floors, "decode": drows, "target": target, "reference": a_name,
           "rules": dict(x), "load": {"start": res.load_start, "end": res.load_end}, "passes": res.passes}
    sec["markdown"] = xbackend_markdown(sec)
    return cr, sec


def _kv_problem(rec, ref, lab: str, a_name: str, b_name: str, fork_defaults: bool) -> tuple[str, str] | None:
    """(backend, the log line that shows it) when B's scoring run or A's logits run of the pair used other K/V types
    than the pair names (the fork changed them, or no size line tells), else None. As in the per-backend sweep
    (:func:`harness.checks.sweep_rules.kv_type_problem`), a run under the fork's own defaults (``--fork-defaults``)
    is not held to them."""
    from harness.runners.sweep_config import split_pair
    if fork_defaults:
        return None
    k, v = lab.split("/", 1)
    k, v, _ = split_pair(k, v)
    for who, r in ((b_name, rec), (a_name, ref)):
        if r is None:
            continue
        prob = kv_type_problem((r.data or {}).get("kv"), k, v, None, {}, 0.0)
        if prob:
            return who, prob
    return None


def _one_side_only(rec, res, lab: str, a_name: str, b_name: str, rb: dict, path: str, interrupted: bool):
    """The cell of a pair that was not compared (ran on one backend only, or not at all), else None."""
    if rec is not None and rec.ok:
        return None
    if rec is not None and rec.fault == "reference":  # A gave no logits: B may have run it alone
        ref = res.logits.get(lab)
        c = failed_job_cell(ref, lab, f"{a_name}:vs-{b_name}", "cross_compared", list(ref.evidence) if ref else [],
                            interrupted)
        c.check = ID
        only = f"ran on {b_name} only" if rb.get("status") == "ok" else "ran on neither backend"
        c.caveat = f"not compared, {only}: {a_name} gave no logits for {lab}: {c.caveat}"
        c.target = a_name == res.config.target
        if c.verdict == Verdict.PASS:
            c.verdict = Verdict.ERROR
        return c
    c = failed_job_cell(rec, lab, path, "cross_compared", list(rec.evidence) if rec else [], interrupted)
    c.check = ID
    c.caveat = f"not compared, ran on {a_name} only: {b_name}'s run of {lab} against {a_name}'s logits: {c.caveat}"
    c.target = b_name == res.config.target
    return c


def xbackend_markdown(sec: dict) -> str:
    """The cross-backend table for summary.md / report.html: per compared backend the floor, then per pair the
    cross-backend KLD, its multiple of the floor, top-1 agreement, PPL ratio, each backend's own KLD, which moved
    further and the verdict; then the decode agreement across backends and the machine load."""
    a = sec["reference"]
    r = sec["rules"]
    lines = [f"## Backends agree at model level (reference {a}, target {sec['target']})", "",
             f"Rule: a pair is beyond the floor when its KLD vs {a} exceeds max({r['floor_multiple']:g} x floor, "
             f"{r['kld_min']:g}) by more than 2 se ({r['floor_multiple_reason']}; {r['kld_min_reason']}).", ""]
    for b, fl in sec["floor"].items():
        lines += [f"### {b} vs {a}: noise floor (f16/f16) KLD {_kld(fl['kld'], '.3g')} ± {_fmt(fl['kld_se'], '.2g')}, "
                  f"limit {_fmt(fl['limit'], '.3g')}", "",
                  f"| pair | KLD {b} vs {a} ± se | x floor | top-1 % | PPL {b}/{a} | own KLD {a} | own KLD {b} | "
                  f"moved further | verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for x in (x for x in sec["rows"] if x["backend"] == b):
            note = x.get("note", "") if x.get("status") not in ("PASS",) else ""
            lines.append(f"| {x['pair']} | {_kld(x.get('kld'), '.4g')} ± {_fmt(x.get('kld_se'), '.2g')} | "
                         f"{_fmt(x.get('x_floor'), '.1f')} | {_fmt(x.get('top1_pct'), '.2f')} | "
                         f"{_fmt(x.get('ppl_ratio'), '.4f')} | {_kld(x.get('own_kld_ref'), '.4g')} | "
                         f"{_kld(x.get('own_kld'), '.4g')} | {x.get('moved_further') or '-'} | "
                         f"{x.get('status')}{(': ' + note[:200].replace('|', '/')) if note else ''} |")
        lines.append("")
    if sec.get("decode"):
        lines += ["### Decode agreement across backends (same greedy prompts; first divergence per prompt; "
                  f"{a}'s top-1 margin there)", "",
                  "| backend | pair | tokens agree % | first divergence | margin there (logits) | P(so few agree) | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for d in sec["decode"]:
            fd = ", ".join("none" if v is None else str(v) for v in d.get("first_divergence", [])) or "-"
            mg = ", ".join("-" if v is None else format(v, ".2f") for v in d.get("margins", [])) or "-"
            lines.append(f"| {d['backend']} | {d['pair']} | {_fmt(d.get('agree_pct'), '.0f')} | {fd} | {mg} | "
                         f"{_fmt(d.get('p_value'), '.2g')} | {d['status']} |")
        lines.append("")
    ld = sec.get("load") or {}
    st, en = ld.get("start") or {}, ld.get("end") or {}
    p = sec.get("passes") or {}
    total = (p["sweeps"] + p["scoring"]) if "sweeps" in p and "scoring" in p else "?"
    lines += [f"Who measured what: every KLD, top-1 and PPL of a backend against {a}'s logits, and each compared "
              f"backend's own KLD vs its own f16, are llama-perplexity's; {a}'s own KLD, top-1 and Δp vs its own f16 "
              f"are the harness's, computed from the two logit files llama-perplexity saved (harness/runners/"
              f"logit_files.py; {a}'s PPL of each pair is llama-perplexity's).", "",
              f"Machine load (1 min): {st.get('load_1min', '?')} at start, {en.get('load_1min', '?')} at end, on "
              f"{st.get('cpus', '?')} CPUs. Model passes (llama-perplexity): {total} = {p.get('sweeps', '?')} in the "
              f"per-backend sweeps + {p.get('scoring', '?')} cross scoring runs (bound: the per-backend sweeps plus "
              f"one scoring pass per pair and backend = {p.get('bound', '?')})."]
    return "\n".join(lines)


def _not_from_verify(ctx):
    from harness.errors import HarnessError
    raise HarnessError("XBACKEND runs through `turbo-harness sweep --backends A,B`")


CHECK = Check(ID, TITLE, _not_from_verify, order=101, rules="xbackend", rules_file=SWEEPS_TOML, in_verify=False,
              command="sweep", needs=("llama-perplexity", "model", "corpus"))
