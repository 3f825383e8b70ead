"""The two sides of a diff (harness/report/diff.py): what each run was made with, and the notes that say where
they are not like for like (other rules, sizes, model, corpus, types, backends, an interrupted run)."""
from __future__ import annotations

from harness.report.model import Run

# Rules that set how much is measured (rows, keys, tokens, context): runs that differ in them measure other samples.
SIZE_KEYS = ("rows", "random_rows", "n_kv", "tokens", "ctx", "chunks", "batch", "ubatch", "depths", "reps",
             "n_prompt", "n_gen", "outlier_scale")


# Sweep settings recorded in the pinned sizes since tryout 28; a report from before has them only in its decode and
# depth sections (harness/checks/decode.py 'settings', harness/checks/depth.py 'depths'), read by :func:`settings`.
DECODE_DEPTH_KEYS = ("decode_prompts", "decode_prompt_tokens", "decode_tokens", "kld_depths")
# pinned entries that say where a side ran from, not what it measured
NOT_MEASURED = ("build_dir",)


def _decode_depth(pinned: dict, sections: dict) -> dict:
    """The decode-agreement and depth settings of a sweep: from its pinned sizes when recorded there, else from its
    decode and depth sections (no decode section: decode off, 0 prompts; no depth section: no depths). The decode
    token counts are left out when decode is off (they then change nothing)."""
    if all(k in pinned for k in DECODE_DEPTH_KEYS):
        out = {k: pinned[k] for k in DECODE_DEPTH_KEYS}
    else:
        dec_sec, dep = (sections.get(k) if isinstance(sections.get(k), dict) else {} for k in ("decode", "depth"))
        dec = dec_sec.get("settings") or {}
        out = {"decode_prompts": dec.get("prompts") or 0, "decode_prompt_tokens": dec.get("prompt_tokens"),
               "decode_tokens": dec.get("generated_tokens"), "kld_depths": list(dep.get("depths") or [])}
    out["kld_depths"] = list(out["kld_depths"] or [])
    if not out["decode_prompts"]:
        out = {"decode_prompts": 0, "kld_depths": out["kld_depths"]}
    return out


def settings(run: Run) -> dict | None:
    """Every setting that changes what a sweep's cells measure: its pinned sizes (ctx, chunks, batch, ubatch, reps,
    bench depths, threads, environment ...) with the decode-agreement and depth settings (:func:`_decode_depth`);
    for a cross-backend sweep (``meta.sides``) each side's, as ``<backend>.<key>``. None for a verify/check report."""
    m = run.meta
    sweep = run.sections.get("sweep") if isinstance(run.sections.get("sweep"), dict) else {}
    pinned = sweep.get("pinned") or m.get("pinned")
    if pinned:
        rest = {k: v for k, v in pinned.items() if k not in DECODE_DEPTH_KEYS and k not in NOT_MEASURED}
        return {**rest, **_decode_depth(pinned, run.sections)}
    sides = m.get("sides")
    if isinstance(sides, dict) and sides:
        return {b: {k: v for k, v in (side or {}).items() if k not in NOT_MEASURED} for b, side in sides.items()}
    return None


def side(run: Run, run_dir: str) -> dict:
    """What a diff says about one run: folder, id, verdict, fork build, rules and sizes it was made with."""
    m = run.meta
    sweep = run.sections.get("sweep") if isinstance(run.sections.get("sweep"), dict) else {}
    return {"dir": run_dir, "run_id": run.run_id, "verdict": run.headline, "fork_commit": m.get("fork_commit"),
            "fork_dirty": m.get("fork_dirty"), "fork_describe": m.get("fork_describe"),
            "build_dir": m.get("build_dir"), "target_backend": m.get("target_backend"), "types": m.get("types"),
            "backends_run": m.get("backends_run"), "started": m.get("started"),
            "rules": m.get("rules") or sweep.get("rules"), "sizes": settings(run),
            "model_sha256": m.get("model_sha256"), "corpus_sha256": m.get("corpus_sha256")}


def _flat(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not str(k).endswith("_reason"):
            out[f"{prefix}{k}"] = v
    return out


def comparability(base: Run, new: Run) -> tuple[list[str], bool]:
    """Notes on what differs in how the two runs were made (rules, sizes, model, corpus, types, backends) and
    whether they are like for like (same rules and sizes). A run that did not record its rules (written before
    ``meta['rules']``) is said so; its cells' own limits are still compared one by one."""
    notes, ok = [], True
    a, b = side(base, ""), side(new, "")
    if a["rules"] is None or b["rules"] is None:
        both = a["rules"] is None and b["rules"] is None
        which = "BASE and NEW" if both else ("BASE" if a["rules"] is None else "NEW")
        notes.append(f"{which} did not record {'their' if both else 'its'} rules (a report from before rules were "
                     f"stored): limits are compared cell by cell only")
    else:
        fa, fb = _flat(a["rules"]), _flat(b["rules"])
        diff = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
        sizes = [k for k in diff if k.rsplit(".", 1)[-1] in SIZE_KEYS]
        limits = [k for k in diff if k not in sizes]
        if sizes:
            ok = False
            notes.append("OTHER SIZES: " + "; ".join(f"{k} {fa.get(k, 'unset')} -> {fb.get(k, 'unset')}" for k in sizes)
                         + ": the runs measured other samples, so values and their noise are not like for like")
        if limits:
            ok = False
            notes.append("OTHER RULES: " + "; ".join(f"{k} {fa.get(k, 'unset')} -> {fb.get(k, 'unset')}" for k in limits)
                         + ": verdicts of cells judged by these limits are not compared (RULE CHANGED)")
    sa, sb = _flat(a["sizes"]), _flat(b["sizes"])
    sdiff = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
    if sdiff:
        ok = False
        notes.append("OTHER SWEEP SETTINGS: " + "; ".join(f"{k} {sa.get(k, 'unset')} -> {sb.get(k, 'unset')}" for k in sdiff))
    for key, what in (("model_sha256", "model"), ("corpus_sha256", "corpus")):
        if a[key] != b[key] and (a[key] or b[key]):
            ok = False
            notes.append(f"OTHER {what.upper()}: sha256 {str(a[key])[:12]} -> {str(b[key])[:12]}: values are not like for like")
    for key, what in (("types", "types"), ("backends_run", "backends run"), ("target_backend", "target backend")):
        if a[key] != b[key]:
            show = lambda v: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else (v or "-")
            notes.append(f"other {what}: BASE {show(a[key])}, NEW {show(b[key])} (cells of the others appear or disappear)")
    for name, run in (("BASE", base), ("NEW", new)):
        if run.interrupted:
            notes.append(f"{name} was INTERRUPTED (not run: {', '.join(run.interrupted.get('not_run') or []) or 'none'}): "
                         f"its missing checks show as disappeared or appeared")
    return notes, ok


