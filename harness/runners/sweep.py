"""Driving the model-level sweep: one f16-KV baseline, then per K/V pair one ``llama-perplexity
--kl-divergence`` run and one ``llama-bench`` run, each cached on disk as soon as it finishes.

Cache layout (``$TURBO_SWEEP_CACHE`` or ``<repo>/.cache/sweep``)::

    jobs/<key>.json        one finished job (kind, pair, parsed numbers, evidence file names)
    ev/<key>/...           the job's command line, stdout and stderr (evidence)
    base/<key>.kld         the f16 logits baseline (``--kl-divergence-base``), shared by all pairs

``key`` is the SHA-256 of (fork commit + dirty diff, build options and binary identity, model SHA-256,
corpus SHA-256, ctx, chunks, pair, environment, batch layout, threads, offload, bench settings), so a
rerun reuses finished jobs, an interrupted sweep resumes, and ``fresh=True`` ignores (and overwrites)
them. Failed jobs are never cached: a rerun retries them.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

from harness.errors import HarnessError
from harness.fork.build import REPO_ROOT, binary  # noqa: F401  (REPO_ROOT: re-exported for the decode runner)
from harness.interrupt import Interrupted, raise_if_pending
from harness.runners.ggml_types import type_traits
from harness.runners.inputs import check_corpus, read_model_info, sha256_file
from harness.runners.llama_logs import (parse_bench_json, parse_bench_json_partial, parse_final_ppl, parse_kld_stats,
                                        parse_kv_log, parse_kv_logs)
from harness.runners.sweep_config import (BASELINE_PAIRS, CPU_DEFAULTS, DEFAULT_PAIRS, GPU_DEFAULTS,  # noqa: F401
                                          PINNED_ENV, ROT_ENV, ROT_SUFFIX, JobRecord, SweepConfig, SweepResult,
                                          pair_label, pair_slug, parse_pairs, rotation_problem, rpc_unreached, run_problem,
                                          split_pair, with_baselines, kld_scored_tokens, check_kld_size, fewer_chunks)
from harness.runners.sweep_jobs import (_after_last_context, _bench_tests, _binary_identity, _Cache,  # noqa: F401
                                        _common_args, _evidence, _failed, _fork_identity, _key, _phase, _reparse_kv,
                                        _unknown_type_error, classify_failure, job_ident)
from harness.runners.tools import run_tool


def _problem(cfg: SweepConfig, stderr: str, cmd: str = "") -> str:
    """Why a finished job's log says it did not measure what was asked: :func:`run_problem`, and for a run given
    ``--chunks`` (its command line ``cmd``) :func:`fewer_chunks`."""
    import re
    asked = re.search(r"--chunks (\d+)", cmd)
    return run_problem(cfg, stderr) or (fewer_chunks(int(asked.group(1)), stderr) if asked else "")


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def cached_run(cfg: SweepConfig, cache: _Cache, key: str) -> JobRecord | None:
    """The cached record of a job, or None when there is none or its tool's log shows it did not measure where or what
    it was asked (:func:`_problem`): cached by a harness that did not look (a local run filed as a remote one, a CPU run
    filed as a GPU one, fewer chunks than its --chunks), it runs again."""
    rec = cache.get(key)
    if rec is not None and rec.ok and any(_problem(cfg, _text(Path(p)), _text(Path(p).with_suffix(".cmd")))
                                          for n, p in rec.evidence.items() if n.endswith(".stderr") and Path(p).is_file()):
        return None
    return rec


def _run_base(cfg: SweepConfig, tool: Path, cache: _Cache, key: str, k: str = "f16", v: str = "f16",
              kind: str = "base") -> JobRecord:
    """One plain ``llama-perplexity`` run that saves its logits (``--kl-divergence-base``): the f16 baseline of a
    sweep, or (with ``k``, ``v`` and kind 'ppl') a pair's run that saves its logits (:func:`_run_saved`).
    ``data``: ppl, ppl_se (the fork's 'Final estimate'), kv, base_file (the logits, kept in the cache); evidence
    ``<kind>.cmd/.stdout/.stderr/.kld``."""
    ev = cache.ev(key)
    kt, vt, rot = split_pair(k, v)
    base_file = cache.root / "base" / f"{key}.kld"
    base_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = base_file.with_suffix(".partial")
    cmd = [str(tool), "-m", str(cfg.model), "-f", str(cfg.corpus), "-c", str(cfg.ctx), "--chunks", str(cfg.chunks),
           *_common_args(cfg), "-fa", "on", "-fit", "off", "-ctk", kt, "-ctv", vt,
           "--kl-divergence-base", str(tmp_file)]
    res = run_tool(cmd, {**cfg.env(), **(ROT_ENV if rot else {})}, cfg.timeout, ev / kind, cfg.env_unset())
    rec = _failed(JobRecord(kind, pair_label(k, v), res.ok, res.failure(), evidence=_evidence(ev / kind),
                            seconds=res.seconds, key=key), res, cfg)
    text = res.stdout + "\n" + res.stderr
    if res.ok and _problem(cfg, res.stderr, " ".join(cmd)):
        rec.ok, rec.error = False, _problem(cfg, res.stderr, " ".join(cmd))
    elif res.ok:
        fin = parse_final_ppl(text)
        kv = parse_kv_log(res.stderr)
        if fin is None or not tmp_file.is_file() or tmp_file.stat().st_size == 0:
            import re
            cause = "; ".join(m.strip() for m in re.findall(r"[^\n]*(?:you need at least|tokenizes to only)[^\n]*", text))
            rec.ok, rec.error = False, (f"{'baseline' if kind == 'base' else 'logits-saving'} run printed no final "
                                        f"PPL or wrote no logits file{' (' + cause[:300] + ')' if cause else ''}; "
                                        f"see {ev / (kind + '.stderr')}")
        elif "tokens" in res.stderr and "you need at least" in res.stderr:
            rec.ok, rec.error = False, "corpus too short for ctx x chunks"
        elif rot and rotation_problem(res.stderr):
            rec.ok, rec.error = False, f"{rotation_problem(res.stderr)}; see {ev / (kind + '.stderr')}"
        elif kind != "base" and kv is None:
            rec.ok, rec.error = False, f"no 'llama_kv_cache: size' line in the log; see {ev / (kind + '.stderr')}"
        else:
            os.replace(tmp_file, base_file)
            rec.data = {"ppl": fin[0], "ppl_se": fin[1], "kv": kv.to_dict() if kv else None, "base_file": str(base_file)}
            rec.evidence[f"{kind}.kld"] = str(base_file)
    return rec


def _run_saved(cfg: SweepConfig, tool: Path, cache: _Cache, key: str, k: str, v: str, base: JobRecord) -> JobRecord:
    """A pair's one pass on the reference side of a cross-backend sweep (``cfg.save_pair_logits``): llama-perplexity
    saves the pair's logits (other backends' runs of the pair are scored against them) and prints its PPL; the KLD,
    top-1 agreement, Δp and the ln(PPL) ratio's uncertainty against this backend's own f16 baseline are computed by
    the harness from the two saved files (:func:`harness.runners.logit_files.kld_between_files`). The ln(PPL) ratio
    itself is ln(PPL_pair / PPL_f16) of the two runs' own 'Final estimate' lines (the fork's, from exact logits).

    Returns a 'ppl' JobRecord whose data has 'stats' (the keys of parse_kld_stats), 'kv', 'ppl', 'base_file' and
    'measured_by' ({statistic: 'llama-perplexity' | 'harness'}). Errors: as :func:`_run_base`; unreadable files or
    fewer than 100 scored tokens (the fork prints no statistics for so few) fail the job (fault 'harness')."""
    from harness.runners.logit_files import kld_between_files
    rec = _run_base(cfg, tool, cache, key, k, v, kind="ppl")
    if not rec.ok:
        return rec
    try:
        st = kld_between_files(base.data["base_file"], rec.data["base_file"])
    except HarnessError as e:
        rec.ok, rec.error, rec.fault = False, f"cannot compare the saved logits with the f16 baseline's: {e}", "harness"
        return rec
    if st["count"] < 100:
        rec.ok, rec.error, rec.fault = False, (f"only {st['count']:.0f} scored tokens: llama-perplexity prints no KL-"
                                               f"divergence statistics for fewer than 100, nor does the harness; give a "
                                               f"larger --ctx or --chunks"), "harness"
        return rec
    import math
    st.update(ppl=rec.data["ppl"], ppl_se=rec.data["ppl_se"], ppl_base=base.data["ppl"],
              ln_ppl_ratio=math.log(rec.data["ppl"] / base.data["ppl"]))
    rec.data["stats"] = st
    rec.data["measured_by"] = {"ppl": "llama-perplexity", "ppl_base": "llama-perplexity",
                               "ln_ppl_ratio": "llama-perplexity (ln of the two runs' PPL)",
                               **{s: "harness (logit files)" for s in st if s not in ("ppl", "ppl_se", "ppl_base",
                                                                                     "ln_ppl_ratio")}}
    return rec


def _run_ppl(cfg: SweepConfig, tool: Path, cache: _Cache, key: str, k: str, v: str, base_file: str) -> JobRecord:
    ev = cache.ev(key)
    kt, vt, rot = split_pair(k, v)
    cmd = [str(tool), "-m", str(cfg.model), "-c", str(cfg.ctx), *_common_args(cfg), "-fa", "on", "-fit", "off",
           "-ctk", kt, "-ctv", vt, "--kl-divergence-base", base_file, "--kl-divergence"]
    res = run_tool(cmd, {**cfg.env(), **(ROT_ENV if rot else {})}, cfg.timeout, ev / "ppl", cfg.env_unset())
    rec = _failed(JobRecord("ppl", pair_label(k, v), res.ok, res.failure(), evidence=_evidence(ev / "ppl"),
                            seconds=res.seconds, key=key), res, cfg)
    if not res.ok:
        kv = parse_kv_log(res.stderr)
        rec.data = {"kv": kv.to_dict() if kv else None}  # placement is known even when the run died later
    if res.ok:
        stats = parse_kld_stats(res.stdout)
        kv = parse_kv_log(res.stderr)
        if run_problem(cfg, res.stderr):
            rec.ok, rec.error = False, run_problem(cfg, res.stderr)
        elif "ppl" not in stats or "kld" not in stats:
            scored = kld_scored_tokens(cfg.ctx, cfg.chunks)  # it scores the second half of each chunk
            few = (f": ctx {cfg.ctx} x {cfg.chunks} chunks scores only {scored} tokens and it prints statistics for "
                   f"100 or more (tools/perplexity: 'kld.count < 100'); give a larger --ctx or --chunks" if scored < 100
                   else f" (it prints them only for 2+ chunks, and this run had {cfg.chunks})" if cfg.chunks < 2
                   else "")  # with enough tokens and chunks the cause is in its output, not a rule of ours
            rec.ok, rec.error = False, f"llama-perplexity printed no KL-divergence statistics{few}; see {ev / 'ppl.stdout'}"
        elif kv is None:
            rec.ok, rec.error = False, f"no 'llama_kv_cache: size' line in the log; see {ev / 'ppl.stderr'}"
        elif rot and rotation_problem(res.stderr):
            rec.ok, rec.error = False, f"{rotation_problem(res.stderr)}; see {ev / 'ppl.stderr'}"
        else:
            rec.data = {"stats": stats, "kv": kv.to_dict()}
    return rec


def _run_bench(cfg: SweepConfig, tool: Path, cache: _Cache, key: str, k: str, v: str) -> JobRecord:
    """One llama-bench run of pair k/v; its record's data holds 'load' {'before', 'after'}: :func:`machine_load` just
    before and after the run (kept in the job cache with the figures), so the judge knows what the speed shared."""
    before = machine_load()
    rec = _bench_once(cfg, tool, cache, key, k, v)
    rec.data = {**(rec.data or {}), "load": {"before": before, "after": machine_load()}}
    return rec


def _bench_once(cfg: SweepConfig, tool: Path, cache: _Cache, key: str, k: str, v: str) -> JobRecord:
    ev = cache.ev(key)
    kt, vt, rot = split_pair(k, v)
    cmd = [str(tool), "-m", str(cfg.model), *_common_args(cfg), "-fa", "1", "-ctk", kt, "-ctv", vt,
           "-p", str(cfg.n_prompt), "-n", str(cfg.n_gen), "-d", ",".join(str(d) for d in cfg.depths),
           "-r", str(cfg.reps), "-o", "json", "-v", "--progress"]
    res = run_tool(cmd, {**cfg.env(), **(ROT_ENV if rot else {})}, cfg.timeout, ev / "bench", cfg.env_unset())
    rec = _failed(JobRecord("bench", pair_label(k, v), res.ok, res.failure(), evidence=_evidence(ev / "bench"),
                            seconds=res.seconds, key=key), res, cfg)
    if not res.ok:  # keep what the tool measured before it died (llama-bench prints prefill before decode)
        rows, _ = parse_bench_json_partial(res.stdout)
        rec.data = {"rows": [r.to_dict() for r in rows], "kv": [x.to_dict() for x in parse_kv_logs(res.stderr)]}
    if res.ok and run_problem(cfg, res.stderr):
        rec.ok, rec.error = False, run_problem(cfg, res.stderr)
        return rec
    if res.ok:
        try:
            rows = parse_bench_json(res.stdout)
        except ValueError as e:
            rec.ok, rec.error = False, f"{e}; see {ev / 'bench.stdout'}"
            return rec
        kvs = parse_kv_logs(res.stderr)
        rec.data = {"rows": [r.to_dict() for r in rows], "kv": [x.to_dict() for x in kvs]}
        if not rows:
            rec.ok, rec.error = False, "llama-bench returned no tests"
    return rec



def usable_cpus() -> int | None:
    """CPUs this process may run on: its affinity set (os.sched_getaffinity, else os.cpu_count()), capped by a cgroup v2
    CPU quota (/sys/fs/cgroup/cpu.max 'QUOTA PERIOD', rounded up); None when neither is known."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max" and n:
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return n


def machine_load() -> dict:
    """The machine's load now: {'load_1min', 'load_5min', 'load_15min' (os.getloadavg: runnable processes averaged over
    1/5/15 minutes), 'cpus' (os.cpu_count()), 'usable_cpus' (:func:`usable_cpus`)}; loads None where the OS has no load
    average. A speed figure measured while other work took over half the CPUs is not judged
    (harness.checks.sweep_rules.speed_not_judged)."""
    try:
        l1, l5, l15 = (round(x, 2) for x in os.getloadavg())
    except (OSError, AttributeError):
        l1 = l5 = l15 = None
    return {"load_1min": l1, "load_5min": l5, "load_15min": l15, "cpus": os.cpu_count(), "usable_cpus": usable_cpus()}


def run_sweep(cfg: SweepConfig, progress: bool = True, log: Callable[[str], None] = print,
              traits: dict | None = None) -> SweepResult:
    """Run (or resume) a sweep. Never raises for a failing tool or pair: those become failed job records.

    Args:
        cfg: the sweep configuration (a CPU side of a GPU build gets -dev none, a side offloading to Vulkan the device
            variable it needs, first:
            :func:`harness.runners.offload.sweep_device_env`; the result's ``config`` is the one run).
        progress: show a tqdm bar of jobs done and time left (on stderr).
        log: where one-line notes go.
        traits: {type name: TypeTrait}; default measured from the build's libggml-base (tests inject them).

    Returns:
        SweepResult; ``error`` is set (and no job runs) when the model or corpus cannot be used.

    Raises:
        HarnessError: the tools are not built (with the build command).
        KeyboardInterrupt or harness.interrupt.Interrupted: after killing the running tool; finished jobs
            stay cached. The exception carries the partial result as ``e.sweep_result`` (its
            ``interrupted`` names the signal, the job that was running and the jobs not run), so the
            caller can write the partial report.
    """
    t0 = time.time()
    from harness.runners.offload import sweep_device_env
    cfg = sweep_device_env(cfg)  # a CPU sweep of a GPU build: -dev none; Vulkan with only software devices: name them
    ppl_tool = binary(cfg.bdir, "llama-perplexity")
    bench_tool = binary(cfg.bdir, "llama-bench") if cfg.bench else None
    traits = traits if traits is not None else type_traits(str(cfg.bdir))
    fork = _fork_identity(cfg.bdir)
    meta = {**fork, "build_dir": str(cfg.bdir), "model": str(cfg.model), "corpus": str(cfg.corpus),
            "pinned": cfg.pinned(), "pairs": [pair_label(k, v) for k, v in cfg.pairs],
            "turbo_env_inherited": {k: v for k, v in os.environ.items() if k.startswith("TURBO_")},
            "type_traits": {n: [t.blck, t.size] for n, t in traits.items()
                            if n in {x for p in cfg.pairs for x in split_pair(*p)[:2]} | {"f16", "q8_0"}}}
    if cfg.device_facts:
        meta["device"] = cfg.device_facts
    meta["load_start"] = machine_load()
    result = SweepResult(cfg, meta, None, None, traits=traits)
    try:
        result.model_info = read_model_info(cfg.model)
        check_corpus(cfg.corpus, cfg.ctx, cfg.chunks)
        meta["model_sha256"] = sha256_file(cfg.model)
        meta["corpus_sha256"] = sha256_file(cfg.corpus)
    except HarnessError as e:
        result.error = str(e)
        result.seconds = time.time() - t0
        return result
    meta["model_info"] = result.model_info.to_dict()

    cache = _Cache(cfg.cache_dir)
    ident = job_ident(cfg, fork, meta)
    base_key = _key({**ident, "job": "base", "v": 1})
    bench_ident = {k: v for k, v in ident.items() if k not in ("corpus", "chunks", "ctx")}
    jobs: list[tuple[str, str, str, str]] = [("base", "f16", "f16", base_key)]
    for k, v in cfg.pairs:
        job = "ppl-saved" if cfg.save_pair_logits else "ppl"  # saved: the pair's logits kept, KLD from the files
        jobs.append(("ppl", k, v, _key({**ident, "job": job, "pair": [k, v], "base": base_key, "v": 1})))
    if cfg.bench:
        for k, v in cfg.pairs:
            jobs.append(("bench", k, v, _key({**bench_ident, "job": "bench", "pair": [k, v], "depths": list(cfg.depths),
                                              "reps": cfg.reps, "p": cfg.n_prompt, "n": cfg.n_gen, "v": 1})))
    # decode agreement and depth jobs (their own modules): (kind, key) -> (run() -> JobRecord, store(JobRecord))
    from harness.runners.decode import plan_decode
    from harness.runners.depth import plan_depth
    extra: dict[tuple[str, str], tuple[Callable[[], JobRecord], Callable[[JobRecord], None]]] = {}
    for plan in (plan_depth, plan_decode):
        for job, run, store in plan(cfg, result, ident, cache, ppl_tool):
            jobs.append(job)
            extra[(job[0], job[3])] = (run, store)  # by kind too: a depth job may share a main job's key
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), unit="job", desc="sweep", dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} jobs [{elapsed}<{remaining}] {postfix}")
    done = 0
    try:
        for kind, k, v, key in jobs:
            raise_if_pending()
            label = pair_label(k, v)
            if bar is not None:
                bar.set_postfix_str(f"{kind} {label}")
            rec = None if cfg.fresh else cached_run(cfg, cache, key)
            if rec is None:
                err = _unknown_type_error(k, v, set(traits))
                if err:
                    rec = JobRecord(kind, label, False, err, key=key)
                elif (kind, key) in extra:
                    rec = extra[(kind, key)][0]()
                elif kind == "base":
                    rec = _run_base(cfg, ppl_tool, cache, key)
                elif kind == "ppl":
                    if result.base is None or not result.base.ok:
                        why = result.base.error if result.base else "not run"
                        rec = JobRecord(kind, label, False, f"no f16 baseline: {why}", key=key)
                    elif cfg.save_pair_logits:
                        rec = _run_saved(cfg, ppl_tool, cache, key, k, v, result.base)
                    else:
                        rec = _run_ppl(cfg, ppl_tool, cache, key, k, v, result.base.data["base_file"])
                else:
                    rec = _run_bench(cfg, bench_tool, cache, key, k, v)
                ran = bool(rec.ok or rec.seconds > 0 or rec.evidence)  # a tool ran (not refused before one could)
                result.jobs_run += ran
                result.jobs_failed += ran and not rec.ok
                if rec.ok:
                    cache.put(rec)
                elif log and not (kind in ("ppl", "depth") and rec.error.startswith("no f16 baseline")):
                    word = {"fork": "FAIL", "refused": "refused"}.get(rec.fault, "ERROR")
                    (bar.write if bar is not None else log)(f"{word} {kind} {label}: {rec.error}")
            else:
                result.jobs_cached += 1
            if (kind, key) in extra:
                extra[(kind, key)][1](rec)
            elif kind == "base":
                result.base = rec
            elif kind == "ppl":
                result.ppl[label] = rec
            else:
                result.bench[label] = rec
            done += 1
            if bar is not None:
                bar.update(1)
    except (KeyboardInterrupt, Interrupted) as e:
        name = getattr(e, "name", "SIGINT")
        result.interrupted = {"signal": name, "exit_code": getattr(e, "exit_code", 130), "units": "jobs",
                              "in_progress": f"{jobs[done][0]} {pair_label(*jobs[done][1:3])}" if done < len(jobs) else None,
                              "not_run": [f"{kd} {pair_label(k, v)}" for kd, k, v, _ in jobs[done:]]}
        e.sweep_result = result
        raise
    finally:
        if bar is not None:
            bar.close()
        result.seconds = time.time() - t0
        meta["load_end"] = machine_load()
    return result


def copy_evidence(result: SweepResult, run_dir: Path) -> dict[str, list[str]]:
    """Copy every job's evidence files (except the large logits baseline) into ``run_dir/evidence/<pair>/``.

    Returns {'<kind>:<pair>': [run-folder-relative paths]}.
    """
    out: dict[str, list[str]] = {}
    recs = ([result.base] if result.base else []) + list(result.ppl.values()) + list(result.bench.values())
    recs += list(result.decode.values()) + list(result.depth_base.values()) + list(result.depth.values())
    for rec in recs:
        k, v = rec.pair.split("/")
        dst = Path(run_dir) / "evidence" / pair_slug(k, v)
        dst.mkdir(parents=True, exist_ok=True)
        rels = []
        for name, src in rec.evidence.items():
            if name.endswith(".kld"):
                rels.append(str(src))  # ~100 MB of logits: referenced in place, not copied
                continue
            if Path(src).is_file():
                shutil.copyfile(src, dst / name)
                rels.append(str((dst / name).relative_to(run_dir)))
        out[f"{rec.kind}:{rec.pair}" + (f"@{rec.data.get('ctx')}" if rec.kind.startswith("depth") else "")] = rels
    return out
