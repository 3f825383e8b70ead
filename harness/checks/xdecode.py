"""Decode agreement across backends (part of XBACKEND): the same greedy prompts decoded with the same K/V pair on
the reference backend A and on backend B (each side's own sweep ran :mod:`harness.runners.decode`), compared token by
token, with the near-tie handling of :mod:`harness.checks.decode`: A's top-1 minus top-2 logit at the first divergence
is reported (a small margin is a near-tie that any rounding flips), and the verdict asks how likely so few agreeing
tokens are given the pair's cross-backend batched top-1 agreement (``prefix_pvalue``).

Verdicts per (B, pair): FAIL when most prompts diverge at or before ``early_position`` and that is less likely than
``alpha`` and the backend whose decode strays further from its own f16 decode is the target; PARTIAL for the same
pattern otherwise, or for an agreement below what ``alpha`` allows; PASS otherwise. A pair whose decode did not run
on both backends is SKIP "not compared" (the failing side's own sweep has the failure cell); one whose decode on a side
had more graph splits than that side's f16 decode (attention fell back to the CPU) is PARTIAL "not compared"; on a side
that offloads its layers, a decode log without a split count (its own or its f16 decode's) makes a PASS PARTIAL and
is named in a worse verdict's caveat.
"""
from __future__ import annotations

from harness.checks.decode import decode_placement
from harness.report.model import Cell, Verdict

ID = "XBACKEND"


def _prefix_sum(rec, ref) -> int | None:
    """Tokens a side's decode of a pair agrees with its own f16 decode before the first divergence, summed over prompts."""
    from harness.runners.decode import compare_tokens
    if rec is None or ref is None or not rec.ok or not ref.ok:
        return None
    return sum(compare_tokens(a, b)["prefix"] for a, b in zip(ref.data["out"]["tokens"], rec.data["out"]["tokens"]))


def _placement(rec, ref, side_res, backend: str) -> tuple[str, str]:
    """:func:`harness.checks.decode.decode_placement` of a side's decode of a pair against its own f16 decode:
    ('moved', why) when it had more graph splits (attention fell back to another backend, as
    :func:`harness.checks.sweeps.judge_sweep` says of the batched runs), ('unknown', why) when a side that offloads
    its layers has no split count in either log, else ('', '')."""
    kind, why = decode_placement(rec, ref, backend)
    if kind == "unknown" and getattr(side_res.config, "ngl", 0) <= 0:  # every layer on the CPU: nothing to fall back
        return "", ""
    return kind, why


def xdecode_cells(res, rows: list[dict], rules: dict) -> tuple[list[Cell], list[dict]]:
    """Cells and table rows of the decode agreement across backends.

    Args:
        res: XResult (its sweeps' ``decode`` records). rows: the XBACKEND rows (read: 'top1_pct' of (backend, pair)).
        rules: the sweep rules ('decode': early_position, early_majority, alpha).
    Returns:
        (cells with metric 'cross_decode_prefix', rows {'backend', 'pair', 'agree_pct', 'first_divergence', 'margins',
        'p_value', 'status'}); ([], []) when decode was off.
    """
    from harness.checks.decode import prefix_pvalue
    from harness.runners.decode import compare_tokens

    cfg = res.config
    if cfg.ref.decode_prompts <= 0:
        return [], []
    r = rules.get("decode") or {}
    early, majority, alpha = int(r.get("early_position", 1)), float(r.get("early_majority", 0.5)), float(r.get("alpha", 0.01))
    a_name = cfg.ref.backend
    sa = res.sweeps.get(a_name)
    top1 = {(x["backend"], x["pair"]): x.get("top1_pct") for x in rows}
    cells: list[Cell] = []
    out: list[dict] = []
    for side in cfg.sides[1:]:
        b_name = side.backend
        sb = res.sweeps.get(b_name)
        path = f"{b_name}:decode-vs-{a_name}"
        for k, v in cfg.ref.pairs:
            lab = f"{k}/{v}"
            ra = sa.decode.get(lab) if sa else None
            rb = sb.decode.get(lab) if sb else None
            if ra is None or rb is None or not ra.ok or not rb.ok:
                miss = [n for n, x in ((a_name, ra), (b_name, rb)) if x is None or not x.ok]
                why = f"not compared: greedy decode of {lab} did not complete on {' and '.join(miss)} (see its sweep)"
                cells.append(Cell(ID, lab, path, "cross_decode_prefix", None, alpha, Verdict.SKIP, op=">=", caveat=why,
                                  target=b_name == cfg.target))
                out.append({"backend": b_name, "pair": lab, "status": "SKIP", "note": why})
                continue
            n_gen = cfg.ref.decode_n_gen
            ta, tb = ra.data["out"]["tokens"], rb.data["out"]["tokens"]
            cmp = [compare_tokens(x, y) for x, y in zip(ta, tb)]
            firsts = [c["first_divergence"] for c in cmp]
            prefixes = [c["prefix"] for c in cmp]
            gaps = ra.data["out"].get("gaps") or []
            margins = [gaps[i][f] if f is not None and i < len(gaps) and f < len(gaps[i]) else None
                       for i, f in enumerate(firsts)]
            agree = sum(c["same"] for c in cmp) / max(sum(c["n"] for c in cmp), 1)
            n_early = sum(1 for f in firsts if f is not None and f <= early)
            is_early = n_early > majority * len(cmp)
            p = top1.get((b_name, lab))
            pval = prefix_pvalue(prefixes, n_gen, p / 100.0) if p is not None else None
            firsts_txt = ", ".join("none" if f is None else str(f) for f in firsts)
            facts = (f"{b_name}'s greedy tokens agree with {a_name}'s on {100 * agree:.0f}%; first divergence per prompt "
                     f"at token {firsts_txt} (of {n_gen}); {a_name}'s top-1 margin there "
                     f"{', '.join('-' if m is None else format(m, '.2f') for m in margins)}"
                     + (f"; cross-backend top-1 {p:.1f}% predicts this few agreeing tokens with probability {pval:.2g}"
                        if pval is not None else "; no cross-backend top-1 figure to compare with"))
            own_a = _prefix_sum(ra, sa.decode.get("f16/f16"))
            own_b = _prefix_sum(rb, sb.decode.get("f16/f16"))
            who = "" if own_a is None or own_b is None or own_a == own_b else (b_name if own_b < own_a else a_name)
            place = [(n, *_placement(rec, side_res.decode.get("f16/f16"), side_res, n))
                     for n, rec, side_res in ((b_name, rb, sb), (a_name, ra, sa))]
            moved = [(n, why) for n, kind, why in place if kind == "moved"]
            unknown = [(n, why) for n, kind, why in place if kind == "unknown"]
            if moved:  # one side's decode did not run its own backend's attention: not a comparison of the backends
                n, why = moved[0]
                vd, cav = Verdict.PARTIAL, f"not compared on {n}: its decode of {lab} was placed elsewhere ({why}); {facts}"
            elif is_early and pval is not None and pval < alpha:
                vd = Verdict.FAIL if who == cfg.target else Verdict.PARTIAL
                cav = ("decode disagrees across backends from the first tokens"
                       + (f"; {who} strays further from its own f16 decode" if who else "") + f": {facts}")
            elif pval is not None and pval < alpha or (pval is None and is_early):
                vd, cav = Verdict.PARTIAL, f"decode agrees across backends less than batched evaluation predicts: {facts}"
            elif pval is None:  # tokens compared, but nothing to judge them against: never PASS
                vd, cav = Verdict.SKIP, f"not judged: {facts}"
            else:
                vd, cav = Verdict.PASS, facts
            if unknown and not moved:  # nothing shows a side ran its own backend's attention: never PASS
                n, why = unknown[0]
                vd, cav = ((Verdict.PARTIAL, f"not shown to compare {n}'s decode: {why}; {cav}") if vd == Verdict.PASS
                           else (vd, f"{cav}; {n}: {why}"))
            cells.append(Cell(ID, lab, path, "cross_decode_prefix", pval, alpha, vd, op=">=", caveat=cav,
                              evidence=list(ra.evidence) + list(rb.evidence), target=(who or b_name) == cfg.target,
                              details={"first_divergence": firsts, "prefixes": prefixes, "margins": margins,
                                       "agree_pct": 100 * agree, "moved_further": who,
                                       "reason": r.get("alpha_reason", "")}))
            out.append({"backend": b_name, "pair": lab, "agree_pct": 100 * agree, "first_divergence": firsts,
                        "margins": margins, "p_value": pval, "status": vd.value})
    return cells, out
