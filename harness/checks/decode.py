"""Judging decode agreement (part of SWEEP): does greedy decode with a K/V pair follow the f16 cache's tokens?

Input: the sweep's decode jobs (:mod:`harness.runners.decode`: per pair and prompt the generated token ids) and
the sweep rows (the pair's batched top-1 agreement from llama-perplexity). Rules: ``[decode]`` in
checks/sweeps.toml.

The batched top-1 agreement ``p`` (share of corpus tokens where the pair's most likely token is the f16 cache's)
predicts how long greedy decode should follow the f16 tokens: while both runs have the same prefix, each step
agrees with probability about ``p``, so the number of agreeing tokens before the first divergence is geometric,
``P(L >= m) = p^m`` (capped at the tokens generated). A decode-only bug (the decode kernels wrong, the batched ones
right) makes decode diverge far earlier than that: the cell's value is the probability, under that model, of
agreeing prefixes as short as observed or shorter (summed over the prompts). The model's own continuation is
usually more predictable than corpus text, so ``p`` under-states the expected agreement and the test errs on the
side of not flagging.

Verdicts per pair (f16/f16 is the reference itself):
- FAIL: most prompts diverge at or before token ``early_position`` and that is less likely than ``alpha`` given the
  batched top-1 agreement: the signature of a decode-only bug.
- PARTIAL: most prompts diverge that early but the batched figures predict it (a lossy pair, the loss is not
  decode-only); or decode agrees less than ``alpha`` predicts without the early-divergence pattern; or a turbo
  pair's agreeing prefixes are shorter than a cache as good as q4_0/q4_0 (the rule's ``vs_q4_0`` pair; its batched
  top-1) would give with probability ``alpha`` (cell ``decode_prefix_vs_q4_0``).
- ERROR when a run gave fewer prompts or tokens than asked (nothing, or less than asked, was compared).
- PASS otherwise. A decode run that crashed after its context was created is FAIL (the phase named), a clean
  refusal SKIP, a harness problem ERROR.
- Placement (spec "Integrity of a verdict"): on a side that offloads its layers (path ``<backend>:decode``, not
  ``cpu:decode``), a cell is PASS only when the pair's decode log shows no more graph splits than the side's own
  f16 decode (:func:`decode_placement`); more splits (its attention or K/V cache ops fell back to the CPU) or no split
  count in either log make a PASS PARTIAL naming why, and a worse verdict names it in its caveat.
"""
from __future__ import annotations


import numpy as np

from harness.report.model import Cell, Verdict

REF = "f16/f16"


def prefix_pvalue(prefixes: list[int], n_gen: int, p: float) -> float:
    """P(sum of agreeing prefixes <= observed) when each prompt's prefix is geometric with agreement ``p``.

    Args:
        prefixes: per prompt, the tokens that agree before the first divergence (0..n_gen; n_gen = never diverged).
        n_gen: tokens generated per prompt (the cap). p: per-token agreement probability in [0, 1].
    Returns:
        The lower-tail probability in [0, 1] (exact: the capped geometric law convolved over the prompts).
        1.0 when no prompt was compared.
    """
    if not prefixes:
        return 1.0
    p = min(max(float(p), 0.0), 1.0)
    m = np.arange(n_gen + 1)
    pmf = np.where(m < n_gen, p ** m * (1.0 - p), p ** n_gen)
    tot = np.array([1.0])
    for _ in prefixes:
        tot = np.convolve(tot, pmf)
    s = int(sum(min(int(x), n_gen) for x in prefixes))
    return float(min(1.0, tot[: s + 1].sum()))


def decode_splits(rec) -> tuple[int, int] | None:
    """The most graph splits any context of a decode run reserved, per graph: (prompt-size graph, one-token graph),
    from its parsed KV log lines ('graph splits = N', or 'graph splits = N (with bs=B), M (with bs=1)' where llama
    printed the two apart; the one-token count is N when it did not). None when the log had no split count."""
    pp, tg = [], []
    for x in ((getattr(rec, "data", None) or {}).get("kv") or []):
        if x.get("graph_splits") is not None:
            pp.append(x["graph_splits"])
            tg.append(x["graph_splits_tg"] if x.get("graph_splits_tg") is not None else x["graph_splits"])
        elif x.get("graph_splits_tg") is not None:
            tg.append(x["graph_splits_tg"])
    if not pp and not tg:
        return None
    return (max(pp) if pp else 0, max(tg) if tg else 0)


def decode_placement(rec, ref, where: str) -> tuple[str, str]:
    """Did a pair's greedy decode on an offloading side run on ``where``, as far as its log shows?

    The evidence is llama's scheduler count of graph splits (spec "Placement": splits above the f16 run's mean ops
    assigned to another backend; a K/V type whose flash attention or cache write ``where`` declines runs on the CPU),
    compared graph by graph (the prompt-size graph's with the f16 decode's, the one-token graph's with its one-token
    graph's), so that a larger count of one graph in the f16 log never hides a fallback in the other.
    Args:
        rec: the pair's decode JobRecord (``data['kv']``: parsed KV logs). ref: the same side's f16/f16 decode record
            (None when absent). where: the backend the cell names ('cuda', 'rpc0').
    Returns:
        ('', '') when the pair's splits are no more than the f16 decode's in both graphs; ('moved', why) when they
        are more in either; ('unknown', why) when either log has no split count (nothing shows that ``where`` ran the
        pair's attention).
    """
    s, s0 = decode_splits(rec), decode_splits(ref) if ref is not None else None
    if s is None or s0 is None:
        which = " and ".join(n for n, x in (("the pair's", s), ("the f16 reference's", s0)) if x is None)
        return "unknown", (f"placement unknown: no 'graph splits' line in {which} decode log, so nothing shows that "
                           f"{where} ran its attention and K/V cache ops")
    for i, graph in ((1, " (one-token graph)"), (0, " (prompt-size graph)")):
        if s[i] > s0[i]:
            return "moved", (f"graph splits {s[i]} vs {s0[i]} for its f16 decode{graph if s[0] != s[1] or s0[0] != s0[1] else ''}: "
                             f"attention or the K/V cache ops ran elsewhere than on {where} (a CPU fallback)")
    return "", ""


def decode_cells(result, rows: list[dict], rules: dict, backend: str) -> tuple[list[Cell], dict | None]:
    """Cells and a report section for the sweep's decode jobs.

    Args:
        result: SweepResult (``decode`` {label: JobRecord}, ``config.decode_*``, ``interrupted``).
        rows: the sweep rows of :func:`harness.checks.sweeps.judge_sweep` (read: 'same_top_p_pct'; written:
            'decode_agree_pct', 'decode_first_div').
        rules: the sweep rules (``decode`` and ``significance`` sections).
        backend: for the cell paths.
    Returns:
        (cells, section) where section is None when decode was not run, else {'rows': [...], 'texts': {...},
        'settings': {...}, 'markdown': str}.
    """
    from harness.checks.sweeps import failed_job_cell
    from harness.runners.decode import compare_tokens

    cfg = result.config
    if not result.decode and cfg.decode_prompts <= 0:
        return [], None
    r = rules.get("decode") or {}
    early, majority = int(r.get("early_position", 1)), float(r.get("early_majority", 0.5))
    alpha = float(r.get("alpha", 0.01))
    by_row = {row["pair"]: row for row in rows}
    interrupted = result.interrupted is not None
    # where the tool ran: with -ngl 0 every layer and its cache are on the CPU whatever the sweep's backend; turbo-decode
    # gets the side's --rpc servers and -dev list as the other tools do (harness/runners/decode.py decode_job)
    where = backend if getattr(cfg, "ngl", 0) > 0 else "cpu"
    path = f"{where}:decode"
    rpc = list(getattr(cfg, "rpc", None) or [])
    devs = [d for d in (getattr(cfg, "devices", "") or "").split(",") if d]
    remote_only = bool(devs) and all(d.startswith("RPC") for d in devs)
    local_note = (f" (with --rpc {','.join(rpc)}: the layers were spread over this machine's {where} and the "
                  f"rpc-server{'s' if len(rpc) > 1 else ''}, as in the sweep's other runs)"
                  if rpc and where != "cpu" and not remote_only else "")
    cells: list[Cell] = []
    drows: list[dict] = []
    ref = result.decode.get(REF)
    ref_ok = ref is not None and ref.ok
    if ref is not None and not ref.ok:
        cells.append(failed_job_cell(ref, REF, path, "decode_run", list(ref.evidence), interrupted))
    texts = {REF: (ref.data["out"]["texts"] if ref_ok else [])}
    labels = [f"{k}/{v}" for k, v in cfg.pairs]
    for lab in labels:
        if lab == REF:
            if ref_ok:
                drows.append({"pair": lab, "status": "reference", "agree_pct": 100.0,
                              "first_divergence": [None] * len(ref.data["out"]["tokens"])})
            continue
        rec = result.decode.get(lab)
        ev = list(rec.evidence) if rec else []
        row = by_row.get(lab, {})
        if rec is None or not rec.ok:
            c = failed_job_cell(rec, lab, path, "decode_run", ev, interrupted)
            cells.append(c)
            drows.append({"pair": lab, "status": c.verdict.value, "error": c.caveat})
            continue
        texts[lab] = rec.data["out"]["texts"]
        if not ref_ok:
            why = ref.error if ref is not None else "not run"
            cells.append(Cell("SWEEP", lab, path, "decode_prefix_vs_batched", None, alpha, Verdict.SKIP, op=">=",
                              caveat=f"not compared: the f16 reference decode did not complete ({why})", evidence=ev))
            drows.append({"pair": lab, "status": "SKIP", "error": "no f16 reference"})
            continue
        n_gen = cfg.decode_n_gen
        ref_t, got_t = ref.data["out"]["tokens"], rec.data["out"]["tokens"]
        cmp = [compare_tokens(a, b) for a, b in zip(ref_t, got_t)]
        short = [len(t) for t in ref_t + got_t if len(t) != n_gen]
        if not cmp or len(ref_t) != len(got_t) or short:
            # nothing (or less than asked) was compared: a p-value over missing tokens would read as agreement
            why = (f"the decode runs gave {len(got_t)} prompts (f16 reference: {len(ref_t)}) with "
                   f"{', '.join(map(str, short)) or n_gen} tokens where {n_gen} were asked: not compared")
            cells.append(Cell("SWEEP", lab, path, "decode_prefix_vs_batched", None, alpha, Verdict.ERROR, op=">=",
                              caveat=why, evidence=ev))
            drows.append({"pair": lab, "status": "ERROR", "error": why})
            continue
        agree = sum(c["same"] for c in cmp) / max(sum(c["n"] for c in cmp), 1)
        firsts = [c["first_divergence"] for c in cmp]
        prefixes = [c["prefix"] for c in cmp]
        n_early = sum(1 for f in firsts if f is not None and f <= early)
        is_early = n_early > majority * len(cmp)
        p_top = row.get("same_top_p_pct")
        ref_gaps = ref.data["out"].get("gaps") or []
        # how close the f16 cache's own choice was where the pair left it (a near-tie flips on any noise)
        margins = [ref_gaps[i][f] if f is not None and i < len(ref_gaps) and f < len(ref_gaps[i]) else None
                   for i, f in enumerate(firsts)]
        d = {"agree_pct": 100 * agree, "first_divergence": firsts, "prefixes": prefixes, "n_gen": n_gen,
             "early_prompts": n_early, "batched_top1_pct": p_top, "f16_margin_at_divergence": margins}
        firsts_txt = ", ".join("none" if f is None else str(f) for f in firsts)
        facts = (f"greedy decode agrees with the f16 cache on {100 * agree:.0f}% of {sum(c['n'] for c in cmp)} tokens; "
                 f"first divergence per prompt at token {firsts_txt} (of {n_gen})")
        if p_top is None:
            pval = None
            vd = Verdict.PARTIAL if is_early else Verdict.PASS
            cav = (f"{facts}; diverges at token <= {early} on {n_early} of {len(cmp)} prompts and no batched top-1 figure "
                   f"to tell a decode-only loss from a general one" if is_early else
                   f"{facts} (no batched top-1 figure to compare with)")
        else:
            pval = prefix_pvalue(prefixes, n_gen, p_top / 100.0)
            pred = (f"batched top-1 agreement {p_top:.1f}% predicts this few agreeing tokens with probability "
                    f"{pval:.2g}")
            if is_early and pval < alpha:
                vd, cav = Verdict.FAIL, (f"decode-only loss: {facts}; {pred} (< {alpha:g}): the one-token decode path "
                                         f"disagrees far more than batched evaluation")
            elif is_early:
                vd, cav = Verdict.PARTIAL, (f"garbled from the first tokens: {facts}; {pred}, so the loss is the pair's "
                                            f"general quality loss, not decode-only")
            elif pval < alpha:
                vd, cav = Verdict.PARTIAL, f"decode agrees less than batched evaluation predicts: {facts}; {pred} (< {alpha:g})"
            else:
                vd, cav = Verdict.PASS, f"{facts}; {pred}"
        if where != "cpu":  # offloaded: the numbers are where's only if its log shows the pair placed like f16's
            kind, why = decode_placement(rec, ref, where)
            vd, cav = _placed(vd, cav, kind, why, where)
            if kind:
                d["placement"] = {"kind": kind, "why": why}
        d["p_value"] = pval
        d["reason"] = r.get("alpha_reason", "")
        cells.append(Cell("SWEEP", lab, path, "decode_prefix_vs_batched", pval, alpha, vd, op=">=", caveat=cav,
                          evidence=ev, details=d))
        row["decode_agree_pct"] = 100 * agree
        row["decode_first_div"] = firsts_txt
        drows.append({"pair": lab, "status": vd.value, **d})
    # a turbo pair's decode beside q4_0 (the equal-memory baseline): would a cache as good as q4_0 (its batched top-1
    # agreement) give this few agreeing tokens? (q4_0's own 3-prompt decode is too noisy to compare with directly)
    q4_lab = str(r.get("vs_q4_0", "q4_0/q4_0"))  # the rule names the baseline pair
    q4_row = by_row.get(q4_lab, {})
    q4_top = q4_row.get("same_top_p_pct")
    q4_dec = next((x for x in drows if x["pair"] == q4_lab and "agree_pct" in x), None)
    for x in drows:
        if "turbo" not in x["pair"] or "prefixes" not in x:
            continue
        if q4_top is None:
            cells.append(Cell("SWEEP", x["pair"], path, "decode_prefix_vs_q4_0", None, alpha, Verdict.SKIP, op=">=",
                              caveat=f"not compared: no measured {q4_lab} pair in this sweep"))
            continue
        pv = prefix_pvalue(x["prefixes"], x["n_gen"], q4_top / 100.0)
        facts = (f"agreeing prefixes {', '.join(map(str, x['prefixes']))} of {x['n_gen']} tokens; a cache as good as "
                 f"{q4_lab} (batched top-1 {q4_top:.1f}%) gives this few with probability {pv:.2g}"
                 + (f" ({q4_lab}'s own decode: {q4_dec['agree_pct']:.0f}% of tokens agree)" if q4_dec else ""))
        vd = Verdict.PASS if pv >= alpha else Verdict.PARTIAL
        cav = facts if vd == Verdict.PASS else f"decode follows the f16 tokens far less than q4_0 would: {facts} (< {alpha:g})"
        if x.get("placement"):
            vd, cav = _placed(vd, cav, x["placement"]["kind"], x["placement"]["why"], where)
        cells.append(Cell("SWEEP", x["pair"], path, "decode_prefix_vs_q4_0", pv, alpha, vd, op=">=", caveat=cav,
                          details={"prefixes": x["prefixes"], "q4_0_top1_pct": q4_top,
                                   "q4_0_decode_agree_pct": q4_dec["agree_pct"] if q4_dec else None,
                                   "reason": r.get("vs_q4_0_reason", "")}))
    for c in cells:
        c.caveat += local_note
    settings = {"prompts": cfg.decode_prompts, "prompt_tokens": cfg.decode_n_prompt, "generated_tokens": cfg.decode_n_gen,
                "ran_on": where + local_note}
    sec = {"rows": drows, "texts": texts, "settings": settings}
    sec["markdown"] = decode_markdown(sec, rules)
    return cells, sec


def _placed(vd: Verdict, cav: str, kind: str, why: str, where: str) -> tuple[Verdict, str]:
    """A decode cell's verdict and caveat given :func:`decode_placement`'s answer (``kind``, ``why``): a PASS whose
    run was placed elsewhere, or whose placement the log does not show, is PARTIAL naming why (its numbers are not
    shown to be ``where``'s); a worse verdict keeps its own and gains the placement in its caveat."""
    if not kind:
        return vd, cav
    if vd == Verdict.PASS:
        return Verdict.PARTIAL, f"not shown to be {where}'s decode: {why}; {cav}"
    return vd, f"{cav}; placement: {why}"


def decode_markdown(sec: dict, rules: dict) -> str:
    """The decode table for summary.md / report.html: per pair the token agreement, the first divergence per prompt
    and the f16 cache's top-1 minus top-2 logit there (a small margin is a near-tie that any noise flips), the batched
    top-1 agreement and the probability of so early a divergence given it; then the first prompt's continuation per
    pair (so garbling is visible)."""
    s = sec["settings"]
    r = rules.get("decode") or {}
    lines = [f"## Decode agreement (greedy, {s['prompts']} corpus prompts x {s['prompt_tokens']} tokens, "
             f"{s['generated_tokens']} tokens generated one at a time, vs the f16 cache; ran on "
             f"{s.get('ran_on', '?')})", "",
             f"Rule: {r.get('early_position_reason', '')}; {r.get('alpha_reason', '')}", "",
             "| pair | tokens agree % | first divergence per prompt | f16 top-1 margin there (logits) | batched top-1 % | "
             "P(so few agree given batched) | verdict |",
             "|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    for x in sec["rows"]:
        fd = ", ".join("none" if v is None else str(v) for v in x.get("first_divergence", [])) or "-"
        mg = ", ".join("-" if v is None else format(v, ".2f") for v in x.get("f16_margin_at_divergence", [])) or "-"
        lines.append(f"| {x['pair']} | {f(x.get('agree_pct'), '.0f')} | {fd} | {mg} | {f(x.get('batched_top1_pct'), '.1f')} | "
                     f"{f(x.get('p_value'), '.2g')} | {x['status']}{(': ' + x['error']) if x.get('error') else ''}"
                     f"{(' (' + x['placement']['why'] + ')') if x.get('placement') else ''} |")
    texts = sec.get("texts") or {}
    if texts.get(REF):
        lines += ["", "First prompt's continuation per pair:", ""]
        for lab, t in texts.items():
            if t:
                lines.append(f"- `{lab}`: {t[0][:160].replace('|', '/').strip()!r}")
    return "\n".join(lines)
