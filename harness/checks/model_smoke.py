"""MODEL: a model-level smoke check with the fork's own tools, per K/V pair of a small matrix.

For every pair: context creation, warm-up, a short prefill, a few decode steps, a full-state save and
restore, and a sequence-state copy (``llama-save-load-state``, which compares the generations itself);
then ``llama-perplexity`` on a few small chunks with ``--kl-divergence`` against an f16-cache run of the
same build. Judged on:

- how the tool ended (spec "Who is at fault decides FAIL or ERROR"): a crash, abort or sanitizer report
  after the fork accepted the configuration is FAIL naming the phase that died and quoting the message
  (what earlier phases measured stays); a run killed by the timeout is ERROR (hang, or a timeout too
  short); a configuration the fork declines at start-up with a message is SKIP quoting it, unless the
  options name it ``must_accept`` (the fork documents it as supported: turbo heads are zero-padded, turbo
  caches switch flash attention on), then FAIL;
- the KV types the log reports (must be the ones asked for; a silent change is ERROR, as in the sweep);
- the switches asked for in the environment (``LLAMA_ATTN_ROT_K_OVERRIDE=1`` must show ``attn_rot_k = 1``
  in the log for a quantised K cache);
- PPL finite and KL divergence against the f16 run within ``[MODEL] kld_max`` (a smoke bound per cache type).

Options (``Context.options['MODEL']``, e.g. from a replay catalogue entry): ``pairs`` (list of 'K/V'),
``env`` ({name: value}), ``flash_attn`` ('on' | 'off' | 'auto'), ``model`` (name or path), ``must_accept``
(True), ``state`` / ``ppl`` (False to leave a tool out), ``kld`` (False: judge the perplexity runs on their exit
and a finite PPL only, for a commit whose cache quality is known bad for another reason than the one replayed).
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

from harness.checks.contract import Check, Outcome
from harness.checks.common import Context
from harness.errors import HarnessError
from harness.report.model import Cell, Verdict
from harness.runners import model_smoke as ms
from harness.runners.sweep import PINNED_ENV, parse_pairs

ID, TITLE = "MODEL", "Model-level smoke: context, prefill, decode, state save/restore, KLD vs f16"
DEFAULT_PAIRS = "f16/f16,q8_0/q8_0,turbo4/turbo4,turbo3/turbo3,turbo2/turbo2,q8_0/turbo3,turbo3/q8_0"
UNQUANTISED = ("f16", "f32", "bf16")
# environment switch -> (log key, meaning); the log key must read 1 when the switch is set for a quantised side
SWITCHES = {
    "LLAMA_ATTN_ROT_K_OVERRIDE": ("attn_rot_k", "K"),
    "LLAMA_ATTN_ROT_V_OVERRIDE": ("attn_rot_v", "V"),
}


def kld_bound(bounds: dict, k: str, v: str) -> float:
    """The KLD smoke bound of a K/V pair: the looser of its two sides' bounds ([MODEL] kld_max, 'other' for
    types it does not name)."""
    return max(float(bounds.get(t, bounds["other"])) for t in (k, v))


def _pairs(ctx: Context, opts: dict) -> list[tuple[str, str]]:
    if opts.get("pairs"):
        return parse_pairs(",".join(opts["pairs"]) if isinstance(opts["pairs"], list) else opts["pairs"])
    turbo = set(ctx.th("general", "turbo_types"))
    return [(k, v) for k, v in parse_pairs(DEFAULT_PAIRS)
            if all(t in ctx.types or t not in turbo for t in (k, v))]


def _cell(ctx: Context, pair: str, path: str, metric: str, value, threshold, verdict: Verdict, caveat: str = "",
          op: str = ">=", evidence=None, details=None) -> Cell:
    return Cell(check=ID, type=pair, path=f"{ctx.target_backend}:{path}", metric=metric,
                value=None if value is None else float(value), threshold=None if threshold is None else float(threshold),
                verdict=verdict, op=op, caveat=caveat, target=True, evidence=list(evidence or []), details=details or {})


def _evidence(ctx: Context, name: str) -> tuple[Path | None, list[str]]:
    if ctx.evidence_dir is None:
        return None, []
    d = Path(ctx.evidence_dir) / ID
    d.mkdir(parents=True, exist_ok=True)
    return d / name, [f"evidence/{ID}/{name}.{ext}" for ext in ("cmd", "stdout", "stderr")]


def judge_exit(ctx: Context, run: ms.SmokeRun, path: str, n_phases: int, must_accept: bool, ev: list[str],
               device: str = "") -> Cell:
    """The exit cell of one tool run: PASS (all phases), FAIL (crash after acceptance, or a failure after the
    context existed), ERROR (hang, or the tool could not run, or it finished on another device than the target's:
    ``device``, ggml's name of the one the layers were sent to, e.g. 'RPC0', must be in a 'using device' line; such a
    cell has ``details['elsewhere']`` and no other cell is judged from that run),
    SKIP/FAIL (a clean refusal)."""
    done = len(run.phases_done)
    details = {"phases_done": run.phases_done, "died_in": run.died_in, "rc": run.result.rc,
               "seconds": round(run.result.seconds, 2)}
    kept = f" (finished: {', '.join(run.phases_done)})" if run.phases_done else ""
    if run.crash:
        v = Verdict.FAIL if run.crash.fork_fault else Verdict.ERROR
        where = run.died_in or "exit"
        cav = f"{where} died: {run.crash.describe()}{kept}"
        if not run.crash.fork_fault:
            cav += "; a hang of the fork, or a timeout too short for this machine: raise [MODEL] timeout_s to tell"
        return _cell(ctx, run.pair, path, "phases_finished", done, n_phases, v, cav, evidence=ev, details=details)
    if run.refused:
        if must_accept:
            return _cell(ctx, run.pair, path, "phases_finished", done, n_phases, Verdict.FAIL,
                         f"refused a configuration the fork documents as supported: {run.refused}", evidence=ev,
                         details=details)
        return _cell(ctx, run.pair, path, "phases_finished", None, None, Verdict.SKIP, f"refused by the fork: {run.refused}",
                     evidence=ev, details=details)
    if not run.result.ok:
        if not run.phases_done:  # nothing started: a bad argument, a missing library - the harness could not run it
            return _cell(ctx, run.pair, path, "phases_finished", done, n_phases, Verdict.ERROR,
                         f"could not run {run.tool}: {run.failure()}", evidence=ev, details=details)
        return _cell(ctx, run.pair, path, "phases_finished", done, n_phases, Verdict.FAIL,
                     f"{run.died_in or 'exit'} failed: {run.failure()}{kept}", evidence=ev, details=details)
    if done < n_phases:
        return _cell(ctx, run.pair, path, "phases_finished", done, n_phases, Verdict.ERROR,
                     f"{run.tool} exited 0 without finishing {run.died_in}: output format not understood", evidence=ev,
                     details=details)
    if device and not re.search(rf"using device {re.escape(device)}\b", run.text):
        # -dev named it (harness.runners.offload): a run that loaded the model elsewhere (a local GPU instead of the
        # remote device) measured something else than the cells' path says
        return _cell(ctx, run.pair, path, "phases_finished", done, n_phases, Verdict.ERROR,
                     f"{run.tool} finished but did not use {device} (no 'using device {device}' line in its log): "
                     f"nothing was measured on {ctx.target_backend}", evidence=ev, details={**details, "elsewhere": True})
    used = re.search(r"using device (\S+)", run.result.stderr)  # llama.cpp logs on stderr; stdout has generated text
    if ctx.target_backend == "cpu" and used:
        # with -dev none (harness.runners.offload.model_offload) llama.cpp loads the model on no device: one named means
        # the layers went to a GPU, and the cells would be filed as the CPU's
        return _cell(ctx, run.pair, path, "phases_finished", done, n_phases, Verdict.ERROR,
                     f"{run.tool} finished but loaded the model on {used.group(1)} ('using device {used.group(1)}' in "
                     f"its log), not on the CPU: nothing was measured on cpu", evidence=ev, details={**details, "elsewhere": True})
    if ctx.target_backend != "cpu" and not used:
        # llama.cpp names every device it loads the model with ('using device Vulkan0 ...'); none: the tool saw no
        # device and ran on the CPU (a Vulkan build seeing only lavapipe, hidden GPUs): its cells are not the target's
        return _cell(ctx, run.pair, path, "phases_finished", done, n_phases, Verdict.ERROR,
                     f"{run.tool} finished but used no {ctx.target_backend} device (no 'using device' line in its log: "
                     f"it ran on the CPU): nothing was measured on {ctx.target_backend}", evidence=ev, details={**details, "elsewhere": True})
    return _cell(ctx, run.pair, path, "phases_finished", done, n_phases, Verdict.PASS, evidence=ev, details=details)


def judge_log(ctx: Context, run: ms.SmokeRun, k: str, v: str, env: dict, path: str, ev: list[str]) -> list[Cell]:
    """KV types the log reports, and the effect of each known environment switch, for a run whose context
    was created (no cells otherwise)."""
    if not run.phases_done:
        return []
    cells = []
    if run.kv is None:
        cells.append(_cell(ctx, run.pair, path, "kv_types_as_asked", None, None, Verdict.ERROR,
                           "the log has no 'llama_kv_cache: size' line: cannot tell which KV types ran", evidence=ev))
    else:
        ok = (run.kv.k_type, run.kv.v_type) == (k, v)
        cells.append(_cell(ctx, run.pair, path, "kv_types_as_asked", 1.0 if ok else 0.0, 1.0,
                           Verdict.PASS if ok else Verdict.ERROR,
                           "" if ok else f"asked K={k} V={v}, the log reports K={run.kv.k_type} V={run.kv.v_type} "
                                         f"({run.kv.size_line}): the run measured other types", evidence=ev,
                           details={"size_line": run.kv.size_line, "changes": run.kv.changes}))
    for name, val in env.items():
        if name not in SWITCHES:
            continue
        key, side = SWITCHES[name]
        typ = k if side == "K" else v
        want = 1 if str(val).strip() not in ("", "0") and typ not in UNQUANTISED else 0
        got = run.switches.get(key)
        if got is None:
            cells.append(_cell(ctx, run.pair, path, f"{key}_logged", None, want, Verdict.SKIP,
                               f"{name}={val} set, but this build does not log {key}", evidence=ev))
            continue
        ok = got == want
        cells.append(_cell(ctx, run.pair, path, key, got, want, Verdict.PASS if ok else Verdict.FAIL,
                           "" if ok else f"{name}={val} with a {typ} {side} cache: the log says {key} = {got}, expected "
                                         f"{want} (the switch was {'ignored' if want else 'applied where it must not be'})",
                           op="==", evidence=ev))
    return cells


def run(ctx: Context) -> Outcome:
    """Cells per K/V pair: state round trip (exit/phases, KV types, switches), then PPL / KLD vs f16."""
    from harness.runners.inputs import default_corpus
    from harness.runners.models import resolve_model
    opts = dict(ctx.options.get(ID, {})) if getattr(ctx, "options", None) else {}
    tools = ctx.target.model_tools(ctx.target_backend)  # the target's build runs the tools (its layers on the target
    # backend's device: harness.runners.offload.model_offload); this check judges their results
    if tools is None:
        return [_cell(ctx, "-", "model", "-", None, None, Verdict.SKIP,
                      f"{ctx.target.name} is not a fork build: MODEL runs the fork's own llama tools")]
    model = resolve_model(opts.get("model"))
    th = {key: ctx.th(ID, key) for key in ("kld_max", "ctx", "chunks", "n_predict", "timeout_s")}
    env = {**PINNED_ENV, "GGML_NO_BACKTRACE": "1", **{k: str(v) for k, v in opts.get("env", {}).items()}}
    fa = str(opts.get("flash_attn", "on"))
    must = bool(opts.get("must_accept", False))
    threads = os.cpu_count() or 1
    pairs = _pairs(ctx, opts)
    want_state, want_ppl = opts.get("state", True), opts.get("ppl", True)
    have_state, have_ppl = tools.has("llama-save-load-state"), tools.has("llama-perplexity")
    cells = Outcome()
    notes = cells.notes
    notes.append(f"model {model.name}; flash attention {fa}; env {env}; ctx {th['ctx']}, {th['chunks']} chunks, "
                 f"{th['n_predict']} decode steps")
    notes += list(getattr(tools.offload, "notes", ()))
    with tempfile.TemporaryDirectory(prefix="turbo-model-") as work:
        work = Path(work)
        for k, v in pairs if want_state else []:
            label = f"{k}/{v}"
            if not have_state:
                cells.append(_cell(ctx, label, "state_roundtrip", "-", None, None, Verdict.SKIP,
                                   f"llama-save-load-state is not built in {tools.bdir}: `turbo-harness build --targets "
                                   f"llama-save-load-state` with -DLLAMA_BUILD_EXAMPLES=ON (replay builds have it)"))
                continue
            prefix, ev = _evidence(ctx, f"{k}-{v}.state")
            r = tools.state_roundtrip(model, k, v, fa=fa, ctx=int(th["ctx"]), n_predict=int(th["n_predict"]),
                                   threads=threads, env=env, timeout=float(th["timeout_s"]), evidence=prefix, workdir=work)
            ex = judge_exit(ctx, r, "state_roundtrip", len(ms.STATE_PHASES), must, ev, tools.device)
            cells.append(ex)
            if not ex.details.get("elsewhere"):  # a run on another device than the target's: nothing else judged
                cells += judge_log(ctx, r, k, v, env, "state_roundtrip", ev)
        if not want_ppl:
            return cells
        if not have_ppl:
            cells.append(_cell(ctx, "-", "perplexity", "-", None, None, Verdict.SKIP,
                               f"llama-perplexity is not built in {tools.bdir}: `turbo-harness build --targets llama-perplexity`"))
            return cells
        try:
            corpus = default_corpus()
        except HarnessError as e:
            cells.append(_cell(ctx, "-", "perplexity", "-", None, None, Verdict.SKIP, f"no corpus for the KLD runs: {e}"))
            return cells
        cells += _perplexity(ctx, tools, model, corpus, pairs, fa, env, th, threads, must, work, opts.get("kld", True))
    return cells


def _perplexity(ctx, tools, model, corpus, pairs, fa, env, th, threads, must, work, judge_kld=True) -> list[Cell]:
    cells = []
    base = work / "f16.kld"
    kw = dict(fa=fa, ctx=int(th["ctx"]), chunks=int(th["chunks"]), threads=threads, env=env,
              timeout=float(th["timeout_s"]), base_file=base)
    prefix, ev = _evidence(ctx, "f16-f16.ppl")
    r = tools.perplexity(model, corpus, "f16", "f16", evidence=prefix, write_base=True, **kw)
    c = judge_exit(ctx, r, "perplexity", len(ms.PPL_PHASES), must, ev, tools.device)
    ppl = r.stats.get("ppl")
    if c.verdict == Verdict.PASS:
        ok = ppl is not None and math.isfinite(ppl)
        c = _cell(ctx, "f16/f16", "perplexity", "ppl", ppl, None, Verdict.PASS if ok else Verdict.FAIL,
                  "" if ok else f"f16 cache gives PPL {ppl}: the model or the build is broken", evidence=ev)
    cells.append(c)
    base_ok = c.verdict == Verdict.PASS and base.is_file()
    for k, v in pairs:
        if (k, v) == ("f16", "f16"):
            continue
        label = f"{k}/{v}"
        if not base_ok:
            cells.append(_cell(ctx, label, "perplexity", "kld_vs_f16", None, None, Verdict.SKIP,
                               "no f16 baseline: the f16 run did not finish (see its cell)"))
            continue
        prefix, ev = _evidence(ctx, f"{k}-{v}.ppl")
        r = tools.perplexity(model, corpus, k, v, evidence=prefix, write_base=False, **kw)
        c = judge_exit(ctx, r, "perplexity", len(ms.PPL_PHASES), must, ev, tools.device)
        if c.verdict == Verdict.PASS:
            kld, ppl = r.stats.get("kld"), r.stats.get("ppl")
            bound = kld_bound(th["kld_max"], k, v)
            if not judge_kld:
                ok = ppl is not None and math.isfinite(ppl)
                c = _cell(ctx, label, "perplexity", "ppl", ppl, None, Verdict.PASS if ok else Verdict.FAIL,
                          f"KLD {kld} not judged (kld = false for this run)" if ok else f"PPL {ppl} is not finite",
                          evidence=ev, details={k2: r.stats[k2] for k2 in ("ppl", "ppl_base", "kld") if k2 in r.stats})
            elif kld is None or ppl is None:
                c = _cell(ctx, label, "perplexity", "kld_vs_f16", None, bound, Verdict.ERROR,
                          "no KLD statistics in the llama-perplexity output", op="<=", evidence=ev)
            else:
                ok = math.isfinite(kld) and math.isfinite(ppl) and kld <= bound
                c = _cell(ctx, label, "perplexity", "kld_vs_f16", kld, bound, Verdict.PASS if ok else Verdict.FAIL,
                          "" if ok else f"mean KLD {kld:.4g} vs the f16 cache of the same build (PPL {ppl:.4g} vs "
                                        f"{r.stats.get('ppl_base', float('nan')):.4g}): the cache corrupts the logits",
                          op="<=", evidence=ev, details={k2: r.stats[k2] for k2 in ("ppl", "ppl_base", "kld", "kld_se",
                                                                                   "same_top_p_pct") if k2 in r.stats})
        cells.append(c)
        cells += judge_log(ctx, r, k, v, {}, "perplexity", ev)
    return cells


CHECK = Check(ID, TITLE, run, order=80, rules="MODEL", in_verify=False, needs=("llama-save-load-state", "llama-perplexity", "model", "corpus"))
