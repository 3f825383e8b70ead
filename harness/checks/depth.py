"""Judging depth (part of SWEEP): does a pair's KL divergence grow with the context it is evaluated at?

Input: the sweep's depth jobs (:mod:`harness.runners.depth`: per context length an f16 baseline and a
``llama-perplexity --kl-divergence`` run per pair, all on the same corpus tokens) and ``[depth]`` of
checks/sweeps.toml. For each pair, the KLD at the longest context is compared with the KLD at the shortest:
growth = KLD(long) - KLD(short), its uncertainty the two runs' standard errors combined as independent (the runs
score different positions of the same text, so this is conservative).

Verdict per pair: PARTIAL ("KLD grows with depth") when the growth exceeds ``paired_se`` standard errors *and*
``rel_growth_min`` of the short-context KLD; PASS otherwise; a pair not measured at two depths is SKIP/ERROR/FAIL
by who is at fault, and so is a pair's run at a depth between them (its own cell) and a depth's f16 baseline run.
The f16/f16 pair is the noise floor (0 on a deterministic backend) and is listed, not judged.
For a model with sliding-window attention the report says which layers see the deeper context.
"""
from __future__ import annotations

import math
from pathlib import Path

from harness.report.model import Cell, Verdict
from harness.runners.llama_logs import KLD_PRINT_RESOLUTION, kld_shown




def depth_cells(result, rules: dict, backend: str) -> tuple[list[Cell], dict | None]:
    """Cells and a report section for the sweep's depth jobs.

    Args:
        result: SweepResult (``depth`` {(ctx, label): JobRecord}, ``depth_base`` {ctx: JobRecord}, ``config``,
            ``model_info`` for the sliding-window note).
        rules: the sweep rules (``depth``, ``significance``).
        backend: for the cell paths.
    Returns:
        (cells, section): section None when no depth was run, else {'depths', 'tokens', 'rows' (one per pair and
        depth: kld, kld_se, ppl, same_top_p_pct), 'growth' (one per pair), 'notes', 'markdown'}.
    """
    from harness.checks.sweeps import failed_job_cell
    from harness.runners.depth import depth_tokens

    cfg = result.config
    if not cfg.kld_depths or not cfg.depth_pairs:
        return [], None
    r = rules.get("depth") or {}
    k_sig = float(rules["significance"]["paired_se"])
    rel_min = float(r.get("rel_growth_min", 0.2))
    depths = sorted(cfg.kld_depths)
    path = f"{backend}:perplexity-depth"
    interrupted = result.interrupted is not None
    cells: list[Cell] = []
    rows: list[dict] = []
    growth: list[dict] = []
    for d in depths:
        b = result.depth_base.get(d)
        if b is None or not b.ok:  # every fault: a baseline that timed out is the harness's ERROR, not its pairs' SKIP
            cells.append(failed_job_cell(b, "f16/f16", path, f"depth{d}_baseline_run", list(b.evidence) if b else [],
                                         interrupted))
    from harness.checks.sweeps import kv_type_problem
    from harness.runners.sweep import split_pair
    tol = float(rules["memory"]["tolerance_mib"])
    for k, v in cfg.depth_pairs:
        lab = f"{k}/{v}"
        got: dict[int, dict] = {}
        wrong = ""
        for d in depths:
            rec = result.depth.get((d, lab))
            prob = "" if rec is None or not rec.ok or cfg.fork_defaults else kv_type_problem(
                rec.data.get("kv"), *split_pair(k, v)[:2], result.model_info, result.traits or {}, tol)
            if prob:  # the fork used other K/V types than asked: not a measurement of this pair (as in the main table)
                wrong = wrong or f"ctx {d}: {prob}"
                rows.append({"pair": lab, "ctx": d, "error": prob})
            elif rec is not None and rec.ok:
                s = rec.data["stats"]
                got[d] = {"pair": lab, "ctx": d, "kld": s["kld"], "kld_se": s.get("kld_se") or 0.0, "ppl": s["ppl"],
                          "same_top_p_pct": s.get("same_top_p_pct"), "chunks": s.get("chunks"),
                          "evidence": list(rec.evidence)}
                rows.append(got[d])
            else:
                rows.append({"pair": lab, "ctx": d, "error": rec.error if rec else "not run"})
        lo, hi = depths[0], depths[-1]
        if wrong:
            cells.append(Cell("SWEEP", lab, path, "kld_growth_with_depth", None, None, Verdict.ERROR, caveat=wrong))
            continue
        for d in depths[1:-1]:  # a depth between the two judged ones that did not complete is its own cell
            if d not in got:
                rec = result.depth.get((d, lab))
                if rec is not None and not rec.ok and rec.error.startswith("no f16 baseline"):
                    continue  # the baseline's own cell says it
                cells.append(failed_job_cell(rec, lab, path, f"depth{d}_run", list(rec.evidence) if rec else [],
                                             interrupted))
        if lo not in got or hi not in got:
            missing = [d for d in (lo, hi) if d not in got]
            rec = result.depth.get((missing[0], lab))
            if rec is not None and not rec.ok and rec.error.startswith("no f16 baseline"):
                cells.append(Cell("SWEEP", lab, path, "kld_growth_with_depth", None, None, Verdict.SKIP,
                                  caveat=f"not measured at ctx {missing[0]}: the f16 baseline at that depth did not complete"))
            else:
                cells.append(failed_job_cell(rec, lab, path, "kld_growth_with_depth",
                                             list(rec.evidence) if rec else [], interrupted))
            continue
        a, z = got[lo], got[hi]
        g = z["kld"] - a["kld"]
        se = math.hypot(a["kld_se"], z["kld_se"])
        allow = max(k_sig * se, rel_min * a["kld"], KLD_PRINT_RESOLUTION)  # growth within the print is no growth
        facts = (f"KLD {kld_shown(a['kld']):.4f} ± {a['kld_se']:.4f} at ctx {lo} -> {kld_shown(z['kld']):.4f} ± "
                 f"{z['kld_se']:.4f} at ctx {hi} "
                 f"(growth {g:+.4f} ± {se:.4f})")
        gr = {"pair": lab, "short": lo, "long": hi, "growth": g, "growth_se": se, "allowed": allow}
        growth.append(gr)
        if lab == "f16/f16":  # the noise floor: small at the longest context, and not growing beyond its own noise
            floor_max = float(rules["noise"]["kld_floor_max"])
            ok = z["kld"] <= floor_max and g <= allow
            why = "" if ok else (f"; above the floor's limit {floor_max:g} at ctx {hi}" if z["kld"] > floor_max
                                 else "; the f16 cache's own KLD grows with depth beyond its noise")
            cells.append(Cell("SWEEP", lab, path, "kld_growth_with_depth", g, allow,
                              Verdict.PASS if ok else Verdict.PARTIAL, caveat=f"noise floor: {facts}{why}",
                              evidence=a["evidence"] + z["evidence"], details=gr))
            continue
        if g > allow:
            vd, cav = Verdict.PARTIAL, (f"KLD grows with depth beyond its noise: {facts}, more than {k_sig:g} se and "
                                        f"{100 * rel_min:g}% of the short-context KLD")
        else:
            vd, cav = Verdict.PASS, facts
        cells.append(Cell("SWEEP", lab, path, "kld_growth_with_depth", g, allow, vd, caveat=cav,
                          evidence=a["evidence"] + z["evidence"],
                          details={**gr, "reason": r.get("rel_growth_min_reason", "")}))
    notes = [f"context length d: llama-perplexity scores the second half of each d-token chunk, so each scored token "
             f"sees d/2 to d-1 earlier tokens in the KV cache; every depth covers the same {depth_tokens(cfg.kld_depths)} "
             f"corpus tokens"]
    mi = result.model_info
    if mi is not None and mi.sliding_window:
        w = mi.sliding_window
        deep = [d for d in depths if d > w]
        notes.append(f"{mi.name} has sliding-window attention (window {w}): its SWA layers attend to the last {w} tokens "
                     f"only, so beyond {w} tokens ({', '.join(map(str, deep)) or 'no depth measured here'}) only its "
                     f"full-attention layers read the deeper cache; a growth with depth there comes from those layers")
    sec = {"depths": depths, "tokens": depth_tokens(cfg.kld_depths), "rows": rows, "growth": growth, "notes": notes,
           "sliding_window": mi.sliding_window if mi is not None else None}
    sec["markdown"] = depth_markdown(sec, rules)
    return cells, sec


def depth_markdown(sec: dict, rules: dict) -> str:
    """The depth table (KLD ± se per pair and context length, growth and verdict) and the plot link; a KLD printed as
    -0.000001 (an exact 0) is shown as 0 (harness.report.render.kld_shown; the rows keep the raw value)."""
    depths = sec["depths"]
    r = rules.get("depth") or {}
    lines = [f"## KL divergence vs depth (same {sec['tokens']} corpus tokens at each context length)", ""]
    lines += [f"- {n}" for n in sec["notes"]]
    lines += [f"- Rule: {r.get('rel_growth_min_reason', '')}", ""]
    lines += ["| pair | " + " | ".join(f"KLD @ctx {d}" for d in depths) + " | growth ± se | top-1 % @" + str(depths[-1]) + " |",
              "|---|" + "---|" * (len(depths) + 2)]
    pairs = list(dict.fromkeys(x["pair"] for x in sec["rows"]))
    gby = {g["pair"]: g for g in sec["growth"]}
    for p in pairs:
        by = {x["ctx"]: x for x in sec["rows"] if x["pair"] == p}
        cols = [f"{kld_shown(by[d]['kld']):.4f} ± {by[d]['kld_se']:.4f}" if "kld" in by.get(d, {}) else "error" for d in depths]
        g = gby.get(p)
        top = by.get(depths[-1], {}).get("same_top_p_pct")
        lines.append(f"| {p} | " + " | ".join(cols) + f" | {'-' if g is None else format(g['growth'], '+.4f') + ' ± ' + format(g['growth_se'], '.4f')}"
                     f" | {'-' if top is None else format(top, '.1f')} |")
    lines += ["", "![KLD vs depth](plots/kld_vs_depth.png)"]
    return "\n".join(lines)


def depth_plot(sec: dict, out_dir: Path) -> Path | None:
    """KLD (± se, log scale) vs context length, one line per pair; written to ``out_dir/kld_vs_depth.png``.
    None when no pair was measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [x for x in sec.get("rows", []) if "kld" in x]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    floor = []  # pairs at the noise floor (KLD ~0 at every depth, e.g. f16/f16 on a deterministic backend): named only
    for i, p in enumerate(dict.fromkeys(x["pair"] for x in ok)):
        pts = sorted((x for x in ok if x["pair"] == p), key=lambda x: x["ctx"])
        if all(x["kld"] <= 1e-5 for x in pts):
            floor.append(p)
            continue
        ax.errorbar([x["ctx"] for x in pts], [x["kld"] for x in pts], yerr=[x["kld_se"] for x in pts],
                    marker="osD^vP*X"[i % 8], capsize=3, label=p, color=f"C{i % 10}")
    if sec.get("sliding_window"):
        ax.axvline(sec["sliding_window"], color="grey", ls="--", lw=0.8,
                   label=f"sliding window {sec['sliding_window']} (SWA layers see no further)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sec["depths"], [str(d) for d in sec["depths"]])
    ax.set(xlabel="context length per chunk (scored tokens see d/2..d-1 cached tokens)", ylabel="mean KLD vs f16 (± se)",
           title=f"KL divergence vs depth (same {sec['tokens']} tokens)")
    ax.legend(fontsize=8, title=(f"KLD <= 1e-5 at every depth: {', '.join(floor)}" if floor else None), title_fontsize=7)
    ax.grid(lw=0.3)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    p = out_dir / "kld_vs_depth.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
