"""``turbo-harness sweep --backends A,B[,...]``: the cross-backend sweep (:mod:`harness.runners.xbackend`), judged by
:mod:`harness.checks.xbackend`.

Writes, into the report folder: each backend's own sweep report in ``<folder>/<backend>/`` (as ``sweep --backend``
writes it) and the comparison (check XBACKEND: summary.md, report.html, run.json, xbackend.csv) at the top. Exit
code: the worst of the comparison's and the backends' own (0 / 1 FAIL, or PARTIAL with --strict / 2 ERROR);
130 / 143 when interrupted: the partial reports are written (each side that ran, and the comparison marked
INTERRUPTED with what did not run); finished jobs stay cached: rerun the same command to resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from harness.errors import HarnessError


@dataclass
class CrossOptions:
    """The cross-backend part of a ``sweep`` command line."""

    names: list[str]            # --backends, reference first
    endpoints: list[str]        # --rpc endpoints (rpcN is the N-th)
    target: str | None          # --target (default: the second backend)
    build_dir: Path | None      # --build-dir (every side uses it when given)
    run_dir: Path
    strict: bool = False
    progress: bool = True
    known: list | None = None
    known_file: str | None = None


def cross_names(spec: str | None, backend: str | None, target: str | None, endpoints: list[str]):
    """(the --backends names or None, the backend whose build and defaults the sweep template takes: the first GPU
    backend named, else cpu; or ``backend`` unchanged without --backends).

    Raises:
        HarnessError: --backend with --backends, --target without --backends or not among them (checked before the
            rest, so that the conflict is named rather than a missing build or server of a side), or a bad --backends
            list."""
    if spec is None:
        if target:
            raise HarnessError("--target needs --backends A,B (the backend under test among them)")
        return None, backend
    from harness.runners.xbackend import parse_backends
    if backend:
        raise HarnessError("--backend and --backends: give one (--backends A,B compares backends)")
    listed = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if target and target.lower() not in listed and len(listed) >= 2:  # a shorter list: parse_backends names that first
        others = " or ".join(n for n in listed[1:] + listed[:1])
        raise HarnessError(f"--target {target} is not one of --backends {','.join(listed)}: the backend under test must be "
                           f"one of those compared: give --target {others}, or add {target} to --backends "
                           f"(e.g. --backends {listed[0]},{target})")
    names = parse_backends(spec, len(endpoints))
    if target and target.lower() not in names:
        raise HarnessError(f"--target {target} is not one of --backends {','.join(names)}: give --target one of them, "
                           f"or add {target} to --backends")
    return names, next((n for n in names if n != "cpu" and not n.startswith("rpc")), "cpu")


def rpc_build_dir(names: list[str] | None, endpoints: list[str], build_dir: Path | None) -> Path | None:
    """The build of the rpcN sides (the one the sweep template checks for ggml RPC), or None when none is named."""
    if not names or build_dir is not None or not any(n.startswith("rpc") for n in names):
        return None
    return side_build_dir(next(n for n in names if n.startswith("rpc")), CrossOptions(names, endpoints, None, None, Path(".")))


def side_build_dir(name: str, opts: CrossOptions) -> Path:
    """The build folder a side's tools come from: --build-dir when given; rpcN: the CPU build (it needs ggml RPC); a
    GPU backend: build/<name>; cpu: build/cpu, else the build of another side (its GPU hidden: see side_config).

    Raises:
        HarnessError: no such build (with the command that makes it)."""
    from harness import usage
    from harness.fork.build import build_dir as default_build_dir, has_rpc
    if opts.build_dir is not None:
        return Path(opts.build_dir)
    have = lambda d: (d / "bin" / "llama-perplexity").is_file()  # noqa: E731
    if name.startswith("rpc"):
        d = default_build_dir("cpu")
        others = [default_build_dir(n) for n in opts.names if not n.startswith("rpc") and n != "cpu"]
        for cand in [d] + others:
            if have(cand) and has_rpc(cand):
                return cand
        raise HarnessError(f"--backends {name}: no build with ggml's RPC backend in {d}: build one with "
                           f"`turbo-harness build --rpc` (or `make build RPC=1`), or give --build-dir")
    d = default_build_dir(name)
    if have(d):
        return d
    if name == "cpu":
        for n in opts.names:
            if n != "cpu" and not n.startswith("rpc") and have(default_build_dir(n)):
                return default_build_dir(n)
    raise HarnessError(f"--backends {name}: no {name} build in {d}; {usage.backend_fix(name)}")


def run_cross(template, opts: CrossOptions, argv: list[str]) -> int:
    """Run, judge and write a cross-backend sweep; returns the exit code (prints the comparison table).

    Args:
        template: the SweepConfig the ``sweep`` options made (pairs, sizes, model, corpus, decode; its backend, build
            folder and offload are replaced per side). opts: the cross-backend options. argv: for the report.
    Raises:
        HarnessError: bad --backends/--target, a side without a build, sides that cannot be compared.
    """
    from harness.interrupt import Interrupted, acknowledge, interruptible
    from harness.runners.xbackend import XConfig, check_sides, run_xbackend, side_config

    sides = [side_config(n, template, side_build_dir(n, opts), opts.endpoints) for n in opts.names]
    xcfg = XConfig(sides, target=(opts.target or "").lower())
    check_sides(xcfg)
    log = lambda s: click.echo(s, err=True)  # noqa: E731
    with interruptible():
        try:
            res = run_xbackend(xcfg, progress=opts.progress, log=log)
        except (Interrupted, KeyboardInterrupt) as e:
            acknowledge()  # later signals wait: the partial report is written, marked INTERRUPTED (never PASS)
            res = getattr(e, "xbackend_result", None)
            code = getattr(e, "exit_code", 130)
            if res is None or not res.sweeps:
                click.echo(f"interrupted by {getattr(e, 'name', 'SIGINT')} before any job ran: the jobs that finished "
                           f"are cached; rerun the same command to resume", err=True)
                return code
            res.interrupted["not_run"] = not_run(res)
            _report(res, sides, opts, argv)
            click.echo(f"XBACKEND INTERRUPTED by {res.interrupted['signal']}: {len(res.interrupted['not_run'])} parts "
                       f"not run ({', '.join(res.interrupted['not_run'])}); the jobs that finished are cached: rerun "
                       f"the same command to resume; partial report {opts.run_dir / 'summary.md'}", err=True)
            return code
        acknowledge()
    return _report(res, sides, opts, argv)


def not_run(res) -> list[str]:
    """What an interrupted cross-backend sweep did not run: each side's unfinished own sweep ('sweep on rpc0', with
    its jobs not run when it started) and the scoring runs not done ('score rpc0 turbo3/turbo3 against cpu')."""
    from harness.runners.sweep_config import pair_label
    out = []
    cfg = res.config
    for side in cfg.sides:
        sres = res.sweeps.get(side.backend)
        if sres is None:
            out.append(f"sweep on {side.backend}")
        elif sres.interrupted:
            out.append(f"sweep on {side.backend} ({len(sres.interrupted.get('not_run') or [])} jobs)")
    for side in cfg.sides[1:]:
        for k, v in cfg.ref.pairs:
            lab = pair_label(k, v)
            if (side.backend, lab) not in res.cross:
                out.append(f"score {side.backend} {lab} against {cfg.ref.backend}")
    return out


def _report(res, sides, opts: CrossOptions, argv: list[str]) -> int:
    """Judge and write every report of a (possibly interrupted) cross-backend sweep: each side's own sweep that ran,
    then the comparison; print the headline; return the exit code (130 / 143 for an interrupted one)."""
    from harness import pipeline
    from harness.checks.sweeps import load_rules
    from harness.checks.xbackend import judge_xbackend
    from harness.cli_sweep import build_run, write_reports
    sides = [s for s in sides if s.backend in res.sweeps]
    rules = load_rules()
    codes, sections, runs = [], {}, {}
    for side in sides:
        sres = res.sweeps[side.backend]
        run = build_run(sres, f"{opts.run_dir.name}-{side.backend}", argv)
        sections[side.backend] = run.sections["sweep"]
        # judged against --known as `sweep --backend X --known FILE` judges the same sweep
        codes.append(pipeline.finish(run, opts.run_dir / side.backend, opts.known, opts.known_file, opts.strict,
                                     write=lambda r, d, sres=sres: write_reports(r, sres, d)))
        runs[side.backend] = run
    cr, sec = judge_xbackend(res, sections, rules)
    add_own_sweeps(cr, sec, runs)
    top = _top_run(res, cr, sec, opts, argv)
    top_known = None if opts.known is None else list(opts.known) + accepted_own_sweeps(runs, opts.known_file)
    codes.append(pipeline.finish(top, opts.run_dir, top_known, opts.known_file, opts.strict,
                                 write=lambda r, d: _write_top(r, res, d)))
    from harness.report.findings import headline
    for ln in headline(top):
        click.echo(ln)
    click.echo(sec["markdown"])
    for side in sides:
        click.echo(own_sweep_line(side.backend, runs[side.backend], opts.run_dir / side.backend / "summary.md"))
    failed = f" ({res.jobs_failed} failed)" if res.jobs_failed else ""
    click.echo(f"XBACKEND {cr.verdict.value}: {res.jobs_run} jobs run{failed}, {res.jobs_cached} cached, {res.seconds:.1f} s; "
               f"report {opts.run_dir / 'summary.md'}")
    return max(codes, key=lambda c: (c in (130, 143), c))


OWN_SWEEP_METRIC = "own_sweep_cells_not_passed"


def own_sweep_line(backend: str, run, report: Path | str) -> str:
    """"cpu's own sweep: SWEEP FAIL; report <report>" (INTERRUPTED for an interrupted one)."""
    return f"{backend}'s own sweep: SWEEP {run.headline}; report {report}"


def add_own_sweeps(cr, sec: dict, runs: dict) -> None:
    """Put each backend's own sweep verdict into the comparison, so that the top report's verdict, headline, run.json,
    junit and exit code are the worst of XBACKEND and every backend's own sweep (a FAIL in ``<out>/cpu`` is never a
    PASS at the top).

    Args:
        cr: the XBACKEND CheckResult (one cell per backend appended: metric :data:`OWN_SWEEP_METRIC`, value = how many
            of that sweep's cells are not PASS, limit <= 0, verdict = that sweep's own verdict, evidence its summary.md).
        sec: the 'xbackend' section (its 'markdown' gets one line per backend sweep first; 'own_sweeps' their verdicts).
        runs: backend -> that backend's sweep :class:`~harness.report.model.Run` as written in ``<out>/<backend>/``.
    """
    from harness.report.model import Cell, Verdict
    lines, own = [], {}
    for backend, run in runs.items():
        cells = [c for ch in run.checks for c in ch.cells]
        bad = sum(1 for c in cells if c.verdict != Verdict.PASS)
        v = run.verdict
        if run.interrupted and v == Verdict.PASS:  # a partial sweep is never a PASS
            v = Verdict.SKIP
        report = f"{backend}/summary.md"
        cr.cells.append(Cell(cr.id, f"{backend} sweep", f"{backend}:own-sweep", OWN_SWEEP_METRIC, float(bad), 0.0, v,
                             caveat=f"{own_sweep_line(backend, run, report)}", evidence=[report],
                             details={"rule": {"limit": 0.0, "breach": "none"}, "own_sweep_verdict": run.headline}))
        own[backend] = {"verdict": run.headline, "report": report, "cells_not_passed": bad}
        lines.append(f"- {own_sweep_line(backend, run, report)}")
    sec["own_sweeps"] = own
    sec["markdown"] = "Each backend's own sweep (counted in this report's verdict):\n\n" + "\n".join(lines) + \
        "\n\n" + sec.get("markdown", "")


def accepted_own_sweeps(runs: dict, known_file: str | None) -> list:
    """Known-findings entries for the comparison's own-sweep cells (:func:`add_own_sweeps`) of the backends whose own
    sweep passed the known-findings gate with findings (every one accepted in ``known_file``): such a cell is XFAIL at
    the top, as its findings are in ``<out>/<backend>``; a backend with a new, grown or fixed finding gets none (its
    own-sweep cell is a new finding at the top too). ``runs``: backend -> its judged sweep Run."""
    from harness.checks.xbackend import ID
    from harness.known import KnownFinding
    from harness.report.model import Verdict
    out = []
    for backend, run in runs.items():
        gate = (run.sections.get("known") or {}).get("gate")
        if gate == "PASS" and run.verdict in (Verdict.PARTIAL, Verdict.FAIL, Verdict.ERROR) and not run.interrupted:
            out.append(KnownFinding(ID, f"{backend} sweep", [f"{backend}:own-sweep"], OWN_SWEEP_METRIC,
                                    f"every finding of {backend}'s own sweep is accepted in {known_file} "
                                    f"(see {backend}/summary.md)", verdict=run.verdict))
    return out


def _top_run(res, cr, sec, opts: CrossOptions, argv: list[str]):
    """The comparison's :class:`~harness.report.model.Run`: check XBACKEND, section 'xbackend', and metadata naming
    every side (backend, build, offload, devices, environment) and the shared settings."""
    import platform

    from harness import __version__
    from harness.report.model import Run
    from harness.verify import gpu_info
    a = res.sweeps.get(res.config.ref.backend) or next(iter(res.sweeps.values()))  # interrupted: what ran
    meta = {"harness_version": __version__, "command_line": " ".join(argv), "host": platform.node(),
            "python": platform.python_version(), "gpu": gpu_info(), "model": str(res.config.ref.model),
            "model_sha256": a.meta.get("model_sha256"), "corpus": str(res.config.ref.corpus),
            "corpus_sha256": a.meta.get("corpus_sha256"), "fork_commit": a.meta.get("fork_commit"),
            "fork_describe": a.meta.get("fork_describe"), "fork_dirty": a.meta.get("fork_dirty"),
            "backends": [s.backend for s in res.config.sides], "target_backend": res.config.target,
            "sides": {s.backend: res.sweeps[s.backend].meta.get("pinned", s.pinned()) | {"build_dir": str(s.bdir)}
                      for s in res.config.sides if s.backend in res.sweeps},
            "load_start": res.load_start, "load_end": res.load_end, "model_passes": res.passes,
            "jobs_run": res.jobs_run, "jobs_cached": res.jobs_cached, "jobs_failed": res.jobs_failed, "sweep_seconds": round(res.seconds, 1)}
    run = Run(run_id=opts.run_dir.name, meta=meta, interrupted=res.interrupted)
    run.checks.append(cr)
    run.sections["xbackend"] = sec
    return run


def _write_top(run, res, run_dir: Path) -> None:
    """Evidence of the logits and scoring runs, xbackend.csv, and every renderer's report."""
    import pandas as pd

    from harness.report.render import write_all
    from harness.runners.xbackend import copy_cross_evidence
    from harness.runners.sweep import pair_slug
    ev = copy_cross_evidence(res, run_dir)
    a = res.config.ref.backend
    for c in run.checks[0].cells:
        if c.metric in ("cross_kld_vs_floor", "noise_floor", "cross_compared"):
            c.evidence = ev.get(f"cross:{c.path.split(':')[0]}:{c.type}", c.evidence) + ev.get(f"logits:{c.type}", [])
        elif c.metric == "cross_decode_prefix":  # the decode runs' evidence, in each side's own sweep report
            k, v = c.type.split("/")
            rel = [f"{side}/evidence/{pair_slug(k, v)}/{name}" for side in (a, c.path.split(":")[0])
                   for name in ("decode.cmd", "decode.stdout", "decode.stderr")]
            c.evidence = [r for r in rel if (Path(run_dir) / r).is_file()] or c.evidence
    pd.DataFrame(run.sections["xbackend"]["rows"]).to_csv(Path(run_dir) / "xbackend.csv", index=False)
    write_all(run, run_dir)

