"""``turbo-harness sweep``: model-level PPL/KLD/speed/KV-memory sweep over K/V cache-type pairs.

Registered by harness/cli.py with ``cli.add_command(sweep)``. Exit codes: 0 no FAIL/ERROR, 1 a FAIL
(or PARTIAL with --strict), 2 an ERROR or bad usage, 130 interrupted (finished jobs stay cached).
"""
from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import click

from harness.errors import HarnessError


def _ints(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{s!r}: give comma-separated integers, e.g. 0,256") from None
    if not vals or min(vals) < 0:
        raise click.BadParameter(f"{s!r}: give comma-separated non-negative integers")
    return vals


def build_run(result, run_id: str, argv: list[str]):
    """Turn a SweepResult into a :class:`harness.report.model.Run` with check 'SWEEP' and
    ``sections['sweep']`` (evidence copied into the run folder is added by :func:`write_reports`)."""
    from harness import __version__
    from harness.checks.sweeps import judge_sweep
    from harness.report.model import Run

    cr, section = judge_sweep(result)
    meta = {**result.meta, "harness_version": __version__, "command_line": " ".join(argv),
            "python": platform.python_version(), "host": platform.node(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "jobs_run": result.jobs_run, "jobs_cached": result.jobs_cached,
            "sweep_seconds": round(result.seconds, 1), "target_backend": result.config.backend}
    run = Run(run_id=run_id, meta=meta)
    run.checks.append(cr)
    run.sections["sweep"] = section
    return run


def write_reports(run, result, run_dir: Path) -> dict[str, Path]:
    """Copy evidence, write sweep.csv, speed.csv, report.html (with plots/*.png) and run.json (plus
    summary.md/junit.xml through harness.report.render.write_all when it is present)."""
    import pandas as pd

    from harness.report.html import write_html
    from harness.runners.sweep import copy_evidence

    run_dir.mkdir(parents=True, exist_ok=True)
    ev = copy_evidence(result, run_dir)
    run.sections["sweep"]["evidence"] = ev
    # point cells at the copies inside the run folder
    for cell in run.checks[0].cells:
        kind = "bench" if cell.path.endswith(":bench") else "ppl"
        cell.evidence = ev.get(f"{kind}:{cell.type}", cell.evidence)
    out = {}
    rows = run.sections["sweep"]["rows"]
    pd.DataFrame(rows).to_csv(run_dir / "sweep.csv", index=False)
    out["csv"] = run_dir / "sweep.csv"
    if run.sections["sweep"]["speed"]:
        pd.DataFrame(run.sections["sweep"]["speed"]).to_csv(run_dir / "speed.csv", index=False)
    try:
        from harness.report.render import write_all
    except ImportError:
        write_all = None
    if write_all is not None:
        for p in write_all(run, run_dir):
            out[p.name] = p
    if "report.html" not in out:
        out["report.html"] = write_html(run, run_dir)
    if not (run_dir / "run.json").is_file():
        (run_dir / "run.json").write_text(json.dumps(run.to_dict(), indent=1, default=str))
    out["run.json"] = run_dir / "run.json"
    return out


def _table_text(section: dict) -> str:
    ratio_cols = sorted({c for r in section["rows"] for c in r if c.startswith(("pp_ratio_d", "tg_ratio_d"))},
                        key=lambda c: (c[:2], int(c.split("_d")[-1])))
    head = f"{'pair':<15}{'PPL ± se':>18}{'vs q8':>8}{'KLD':>9}{'top1%':>7}{'KV MiB':>8}{'bits':>6}" + \
        "".join(f"{c.replace('_ratio_d', '@'):>8}" for c in ratio_cols) + "  status"
    lines = [head]
    for r in section["rows"]:
        def f(key, fmt):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        ppl = f"{f('ppl', '.3f')} ± {f('ppl_se', '.3f')}" if r.get("ppl") is not None else "-"
        vs = f"{r['ppl_vs_q8_pct']:+.2f}%" if r.get("ppl_vs_q8_pct") is not None else "-"
        lines.append(f"{r['pair']:<15}{ppl:>18}{vs:>8}{f('kld', '.4f'):>9}{f('same_top_p_pct', '.1f'):>7}"
                     f"{f('kv_mib', '.2f'):>8}{f('bits_per_value', '.2f'):>6}"
                     + "".join(f"{f(c, '.2f'):>8}" for c in ratio_cols)
                     + f"  {r.get('status')}{(': ' + r['error'][:100]) if r.get('error') else ''}")
    return "\n".join(lines)


@click.command("sweep")
@click.option("--model", default=None,
              help="smollm2 | gemma3 (known models, checks/models.toml) or a GGUF path (default: smollm2).")
@click.option("--corpus", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Plain-text corpus (default: $TURBO_CORPUS, else ../shared/data/wikitext-2-raw/wiki.test.raw).")
@click.option("--ctx", type=int, default=None, help="Context per perplexity chunk (CPU 256, GPU 512).")
@click.option("--chunks", type=int, default=None, help="Chunks of the corpus (CPU 8, GPU 64).")
@click.option("--pairs", default=None, help="Comma-separated K/V pairs, e.g. f16/f16,q8_0/turbo3 (one name = K=V).")
@click.option("--ngl", type=int, default=None, help="Layers offloaded to the GPU (CPU backend 0, else 99).")
@click.option("--depths", default=None, help="llama-bench depths, comma-separated (CPU 0,256; GPU 0,2048,8192).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("--reps", type=int, default=None, help="llama-bench repetitions (CPU 3, GPU 5).")
@click.option("--batch", type=int, default=0, help="-b (default: ctx, one sequence per pass).")
@click.option("--ubatch", type=int, default=0, help="-ub (default: min(batch, 512)).")
@click.option("--fresh", is_flag=True, help="Ignore cached results and rerun every job.")
@click.option("--fork-defaults", is_flag=True,
              help="Leave TURBO_AUTO_ASYMMETRIC/TURBO_LAYER_ADAPTIVE/TURBO_SPARSE_V unset (the fork may change types).")
@click.option("--backend", default=None, help="Build folder backend: cpu, cuda, metal, vulkan, hip (default: detected).")
@click.option("--build-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Build folder holding bin/llama-perplexity (default: build/<backend>).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Reports folder; the run goes to <out>/<run-id>/ (default: reports/).")
@click.option("--timeout", type=float, default=None, help="Seconds per tool call before it is killed (CPU 900).")
@click.option("--no-bench", is_flag=True, help="Skip llama-bench (quality and memory only).")
@click.option("--strict", is_flag=True, help="Exit 1 on PARTIAL too.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def sweep(model, corpus, ctx, chunks, pairs, ngl, depths, threads, reps, batch, ubatch, fresh, fork_defaults, backend,
          build_dir, out_dir, timeout, no_bench, strict, no_progress):
    """Model-level sweep: PPL ± se, KL divergence vs an f16-cache baseline, top-1 agreement, KV memory
    and prefill/decode speed ratio to q8_0 for K/V cache-type pairs, with the fork's own tools."""
    from harness.fork.build import REPO_ROOT, build_dir as default_build_dir, detect_backend
    from harness.runners.inputs import default_corpus
    from harness.runners.models import resolve_model
    from harness.runners.sweep import CPU_DEFAULTS, DEFAULT_PAIRS, GPU_DEFAULTS, SweepConfig, parse_pairs, run_sweep

    try:
        backend = (backend or detect_backend()).lower()
        ngl = ngl if ngl is not None else (0 if backend == "cpu" else 99)
        dflt = CPU_DEFAULTS if ngl == 0 else GPU_DEFAULTS
        bdir = build_dir or default_build_dir(backend)
        cfg = SweepConfig(
            model=resolve_model(model),
            corpus=Path(corpus) if corpus else default_corpus(),
            pairs=parse_pairs(pairs or DEFAULT_PAIRS), bdir=bdir, backend=backend,
            ctx=ctx or dflt["ctx"], chunks=chunks or dflt["chunks"],
            depths=_ints(depths) if depths else dflt["depths"], reps=reps or dflt["reps"],
            n_prompt=dflt["n_prompt"], n_gen=dflt["n_gen"], threads=threads or (os.cpu_count() or 1), ngl=ngl,
            batch=batch, ubatch=ubatch, fresh=fresh, fork_defaults=fork_defaults,
            timeout=timeout or dflt["timeout"], bench=not no_bench)
        if cfg.ctx < 16 or cfg.chunks < 2:
            raise HarnessError("--ctx must be >= 16 and --chunks >= 2 (llama-perplexity prints KLD statistics only for 2+ chunks)")
        run_id = time.strftime("sweep-%Y%m%d-%H%M%S")
        run_dir = Path(out_dir or (REPO_ROOT / "reports")) / run_id
        def _term(signum, frame):  # `kill` / CI cancellation: stop like Ctrl-C (kill the tool, keep the cache)
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, _term)
        try:
            result = run_sweep(cfg, progress=not no_progress, log=lambda s: click.echo(s, err=True))
        except KeyboardInterrupt:
            click.echo("interrupted: finished jobs are cached; rerun the same command to resume", err=True)
            sys.exit(130)
        run = build_run(result, run_id, sys.argv)
        paths = write_reports(run, result, run_dir)
    except HarnessError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    sec = run.sections["sweep"]
    click.echo(_table_text(sec))
    for n in sec.get("notes", []):
        click.echo(f"note: {n}")
    cr = run.checks[0]
    if cr.error:
        click.echo(f"ERROR: {cr.error}")
    bad = [c for c in cr.cells if c.verdict.value in ("FAIL", "ERROR", "PARTIAL")]
    for c in bad:
        click.echo(f"{c.verdict.value:<8}{c.type:<15}{c.metric:<22}{c.caveat}")
    click.echo(f"SWEEP {cr.verdict.value}: {result.jobs_run} jobs run, {result.jobs_cached} cached, "
               f"{result.seconds:.1f} s; report {paths['report.html']}")
    sys.exit(run.exit_code(strict=strict))
