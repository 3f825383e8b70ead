"""Several sweeps side by side (``turbo-harness sweep-compare RUN_DIR RUN_DIR ...``): one table per model and a
plot of KL divergence vs bits per real cached value with every pair of every sweep, one line per model.

Input: sweep report folders (their ``run.json``, as ``turbo-harness sweep --out DIR`` writes it); nothing is
measured again. Output: ``compare.md`` and ``kld_vs_bits_models.png`` in the output folder.
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.errors import HarnessError
from harness.report.sweep_shape import check_sweep_section

BASELINES = ("q4_0/q4_0", "q4_0/q4_0+rot")


def load_sweep(run_dir: Path) -> dict:
    """The parts of a sweep report the comparison needs.

    Returns:
        {'dir', 'model' (name), 'model_file', 'shape' (head_dim, n_head/n_head_kv, sliding window), 'rows' (the
        sweep rows), 'vs_q4_0' {(pair, baseline): verdict}, 'decode' {pair: row} , 'pinned'}.
    Raises:
        HarnessError: no run.json, not JSON, or not a sweep report (one line naming the folder and the fix).
    """
    f = Path(run_dir) / "run.json"
    try:
        d = json.loads(f.read_text())
    except OSError:
        raise HarnessError(f"{run_dir} holds no run.json: give folders written by `turbo-harness sweep --out DIR`") from None
    except ValueError as e:
        raise HarnessError(f"{f} is not valid JSON ({e}): rerun the sweep into that folder") from None
    try:  # the shape every reader relies on (a damaged or hand-edited run.json is one line, not a traceback)
        if not isinstance(d, dict) or not isinstance(d.get("sections") or {}, dict):
            raise ValueError("the file or its 'sections' is not a JSON object")
        if "sweep" in (d.get("sections") or {}):
            check_sweep_section(d["sections"]["sweep"])
    except ValueError as e:
        raise HarnessError(f"{f} is not a readable turbo-harness run report ({e}): rerun the sweep into that "
                           f"folder") from None
    sec = (d.get("sections") or {}).get("sweep")
    if not isinstance(sec, dict) or not sec.get("rows"):
        # a cross-backend sweep's top folder: its per-backend sweeps are the subfolders <dir>/<backend>
        subs = sorted(p.parent.name for p in Path(run_dir).glob("*/run.json"))
        hint = (f": this looks like a cross-backend sweep; give its per-backend sweeps, e.g. "
                f"{' '.join(str(Path(run_dir) / s) for s in subs[:2])}") if subs else ": give sweep report folders"
        raise HarnessError(f"{run_dir} is not a sweep report (no sweep table in run.json){hint}")
    mi = sec.get("model") or {}
    vs = {}
    for c in d.get("checks", []):
        for cell in c.get("cells", []):
            if cell.get("metric", "").startswith("kld_vs_"):
                vs[(cell["type"], cell["metric"][len("kld_vs_"):])] = cell["verdict"]
    dec = {r["pair"]: r for r in ((d.get("sections") or {}).get("decode") or {}).get("rows", [])}
    shape = ""
    if mi:
        shape = (f"head_dim {mi.get('head_dim_k')}, {mi.get('n_head')}/{mi.get('n_head_kv')} heads, {mi.get('n_layer')} layers"
                 + (f", SWA window {mi['sliding_window']}" if mi.get("sliding_window") else ""))
    meta = d.get("meta", {})
    pinned = sec.get("pinned") or {}
    model = mi.get("name") or Path(meta.get("model", "?")).name
    backend = pinned.get("backend") or meta.get("target_backend") or "?"
    return {"dir": str(run_dir), "model": model, "model_file": meta.get("model", ""), "shape": shape, "rows": sec["rows"],
            "vs_q4_0": vs, "decode": dec, "pinned": pinned, "backend": backend, "label": f"{model} on {backend}",
            "model_sha256": meta.get("model_sha256"), "corpus_sha256": meta.get("corpus_sha256"),
            "corpus": meta.get("corpus", ""), "unfinished": unfinished(d)}


def unfinished(d: dict) -> str:
    """Why the sweep report ``d`` (its run.json) is not a finished, judged sweep, or '' when it is: 'INTERRUPTED by
    SIGINT (jobs not run: ...)' for a partial run, 'judged nothing (...)' when no cell is PASS, PARTIAL or FAIL (a
    sweep without q8_0/q8_0, or whose every job failed). Its figures are shown, but never as a finished comparison."""
    i = d.get("interrupted")
    if isinstance(i, dict) or d.get("verdict") == "INTERRUPTED":
        i = i if isinstance(i, dict) else {}
        not_run = [str(x) for x in i.get("not_run") or []]
        return (f"INTERRUPTED by {i.get('signal', 'a signal')} (jobs not run: "
                f"{', '.join(not_run[:4]) + (f' and {len(not_run) - 4} more' if len(not_run) > 4 else '') or 'none listed'})")
    cells = [c for ch in d.get("checks") or [] if isinstance(ch, dict) for c in ch.get("cells") or [] if isinstance(c, dict)]
    if not any(c.get("verdict") in ("PASS", "PARTIAL", "FAIL") for c in cells):
        why = next((str(c.get("caveat")) for c in cells if c.get("caveat")), "") or f"verdict {d.get('checks_verdict', '?')}"
        return f"judged nothing ({why[:160]})"
    return ""


def sweep_mismatches(sweeps: list[dict]) -> list[str]:
    """Why the sweeps' figures are not directly comparable, one line each ([] when they are).

    Sweeps differing in ctx or chunks (KLD and PPL depend on both), in the corpus (SHA-256; its file name when no hash
    was recorded), or of the same model name but different model files (SHA-256) are named; different models are what
    the comparison is for and are not a mismatch."""
    out = []
    for what, get in (("ctx", lambda s: s["pinned"].get("ctx")), ("chunks", lambda s: s["pinned"].get("chunks")),
                      ("corpus", lambda s: (s["corpus_sha256"] or "")[:12] or Path(s["corpus"] or "?").name)):
        vals = {s["label"] + f" ({s['dir']})": get(s) for s in sweeps}
        if len(set(map(str, vals.values()))) > 1:
            out.append(f"the sweeps differ in {what}: " + "; ".join(f"{k}: {v}" for k, v in vals.items()))
    out += [f"the sweep {s['label']} ({s['dir']}) is not finished: {s['unfinished']}; its figures are partial and its "
            f"verdicts are not a finished comparison: finish it (rerun its sweep command) and compare again"
            for s in sweeps if s["unfinished"]]
    by_model: dict[str, set] = {}
    for s in sweeps:
        by_model.setdefault(s["model"], set()).add(s["model_sha256"] or "?")
    for m, hashes in by_model.items():
        if len(hashes) > 1:
            out.append(f"the sweeps of {m} used different model files (sha256 {', '.join(sorted(h[:12] for h in hashes))}): "
                       f"not the same weights")
    return out


def compare_markdown(sweeps: list[dict]) -> str:
    """One table per model: PPL ± se, KLD ± se, top-1, bits per real value, the vs-q4_0 verdicts and decode agreement."""
    from harness.runners.llama_logs import kld_shown
    def f(v, fmt):
        return "-" if not isinstance(v, (int, float)) else format(v, fmt)
    lines = ["# Sweeps side by side", ""]
    bad = sweep_mismatches(sweeps)
    if bad:
        lines += [f"**Warning: these sweeps are not directly comparable"
                  f"{', or not finished' if any(s['unfinished'] for s in sweeps) else ''}.**", ""] + [f"- {b}" for b in bad] + [""]
    for s in sweeps:
        p = s["pinned"]
        lines += [f"## {s['label']} ({s['shape']})" + (" (NOT FINISHED)" if s["unfinished"] else ""), "",
                  f"From `{s['dir']}`: ctx {p.get('ctx')} x {p.get('chunks')} chunks, backend {p.get('backend')}."
                  + (f" **This sweep {s['unfinished']}**: its verdicts are marked, none is a finished PASS." if s["unfinished"]
                     else ""), "",
                  "| pair | PPL ± se | KLD ± se | top-1 % | bits / real value | vs q4_0 | vs q4_0+rot | decode agree % | first divergence |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            dec = s["decode"].get(r["pair"], {})
            fd = ", ".join("none" if x is None else str(x) for x in dec.get("first_divergence", [])) or "-"
            lines.append(f"| {r['pair']} | {f(r.get('ppl'), '.2f')} ± {f(r.get('ppl_se'), '.2f')} | "
                         f"{f(kld_shown(r.get('kld')), '.4f')} ± {f(r.get('kld_se'), '.4f')} | {f(r.get('same_top_p_pct'), '.1f')} | "
                         f"{f(r.get('bits_per_value'), '.3f')} | " + " | ".join(
                             s["vs_q4_0"].get((r["pair"], b), "-") + (" (unfinished sweep)" if s["unfinished"] and
                                                                      (r["pair"], b) in s["vs_q4_0"] else "")
                             for b in BASELINES)
                         + f" | {f(dec.get('agree_pct'), '.0f')} | {fd} |")
        lines.append("")
    lines += ["vs q4_0: PASS = the turbo pair is not worse in KLD (2 se) at the same or fewer bits per real value; "
              "PARTIAL = the claim does not hold or is not shown at equal memory.", "",
              "![KLD vs bits per real value](kld_vs_bits_models.png)", ""]
    return "\n".join(lines)


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats at equal or lower memory: sorted by bits per real value, each kept only when its
    KLD is lower than every row with fewer or equal bits before it (the best quality a model reaches per bit budget)."""
    out: list[dict] = []
    for r in sorted(rows, key=lambda r: (r["bits_per_value"], r["kld"])):
        if not out or r["kld"] < out[-1]["kld"]:
            out.append(r)
    return out


def compare_plot(sweeps: list[dict], out: Path) -> Path:
    """KLD (log) vs bits per real cached value: a colour per model, every pair as a marker (the same marker for a pair
    in every model) and one line per model through its Pareto front (:func:`pareto_front`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    pairs = list(dict.fromkeys(r["pair"] for s in sweeps for r in s["rows"]))
    markers = {p: "osD^vP*Xph<>H8"[i % 14] for i, p in enumerate(pairs)}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, s in enumerate(sweeps):
        pts = sorted((r for r in s["rows"] if isinstance(r.get("kld"), (int, float)) and r.get("bits_per_value")
                      and r.get("pair") != "f16/f16"), key=lambda r: (r["bits_per_value"], r["kld"]))
        if not pts:
            continue
        col = f"C{i % 10}"
        front = pareto_front(pts)  # the model's line: the lowest KLD reachable at that many bits or fewer
        ax.plot([r["bits_per_value"] for r in front], [max(r["kld"], 1e-5) for r in front], "-", color=col, lw=1.2,
                alpha=0.7, label=f"{s['label']}, ctx {s['pinned'].get('ctx')} x {s['pinned'].get('chunks')} ({s['shape']})"
                + (" NOT FINISHED" if s["unfinished"] else ""))
        for r in pts:
            ax.errorbar(r["bits_per_value"], max(r["kld"], 1e-5), yerr=r.get("kld_se") or 0, fmt=markers[r["pair"]],
                        color=col, capsize=2, ms=7, mfc="none" if r["pair"].endswith("+rot") else col)
    ax.set_yscale("log")
    ax.set(xlabel="bits per real cached value (K,V mean; padding counted)", ylabel="mean KLD vs the f16 cache (± se)",
           title="KL divergence vs KV memory, every pair (line: each model's best KLD at that many bits or fewer)")
    ax.grid(lw=0.3, which="both")
    model_legend = ax.legend(loc="upper right", fontsize=8)
    ax.add_artist(model_legend)
    handles = [Line2D([], [], marker=markers[p], ls="", color="k", mfc="none" if p.endswith("+rot") else "k", label=p)
               for p in pairs if p != "f16/f16"]
    ax.legend(handles=handles, loc="lower left", fontsize=7, ncol=2, title="pair", title_fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_compare(run_dirs: list[Path], out_dir: Path) -> tuple[Path, Path]:
    """Read the sweeps, write ``compare.md`` and ``kld_vs_bits_models.png`` into ``out_dir``; returns their paths.

    Raises:
        HarnessError: fewer than one folder, or a folder that is not a sweep report.
    """
    if not run_dirs:
        raise HarnessError("give one or more sweep report folders, e.g. reports/samples/sweep-cpu-smollm2")
    sweeps = [load_sweep(Path(d)) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = compare_plot(sweeps, out_dir / "kld_vs_bits_models.png")
    md = out_dir / "compare.md"
    md.write_text(compare_markdown(sweeps))
    return md, png


def compare_warnings(run_dirs: list[Path]) -> list[str]:
    """:func:`sweep_mismatches` of the sweep report folders (for the command line's stderr)."""
    return sweep_mismatches([load_sweep(Path(d)) for d in run_dirs])
