"""turbo-harness command line (Click). Thin: parses options, calls the engine, maps errors to exit codes.

Exit codes: 0 no FAIL and no ERROR; 1 a FAIL (or a PARTIAL with --strict); 2 an ERROR or bad usage;
130 / 143 interrupted by SIGINT / SIGTERM (the partial report is marked INTERRUPTED).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from harness import __version__
from harness.errors import HarnessError
from harness.fork import backends, build as fb
from harness.turbo_types import TURBO_TYPES
from harness.cli_rpc import RPC_OPTIONS, RpcOptions
from harness.cli_types import (AtLeast, BackendName, BuildName, CommaList, ModelArg, OneLineUsage, ReportDir, Sha256,
                               existing_dir, existing_file, out_dir)

REPORTS = Path(os.environ.get("TURBO_REPORTS", fb.REPO_ROOT / "reports"))


# commands that live in their own modules, loaded when named (Click's lazy group pattern): no import side effect
LAZY_COMMANDS = {"sweep": ("harness.cli_sweep", "sweep"), "doctor": ("harness.cli_doctor", "doctor"),
                 "sweep-compare": ("harness.cli_sweep", "sweep_compare"), "replay": ("harness.cli_replay", "replay"),
                 "catalogue": ("harness.cli_catalogue", "catalogue"), "bisect": ("harness.cli_replay", "bisect"),
                 "bisect-oracle": ("harness.cli_replay", "bisect_oracle"),
                 "replay-export": ("harness.cli_catalogue", "replay_export"),
                 "diff": ("harness.cli_compare", "diff"), "scorecard": ("harness.cli_compare", "scorecard")}


class Group(click.Group):
    """Turns HarnessError into a one-line message and exit code 2 (a stray KeyboardInterrupt: one line, 130); loads the commands of LAZY_COMMANDS when named."""

    def list_commands(self, ctx):
        """Every command name, the lazily loaded ones included (for --help)."""
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        """The command called ``name``, importing its module first when it is one of LAZY_COMMANDS."""
        if name in LAZY_COMMANDS and name not in self.commands:
            import importlib
            mod, attr = LAZY_COMMANDS[name]
            return getattr(importlib.import_module(mod), attr)
        return super().get_command(ctx, name)

    def make_context(self, info_name, args, parent=None, **extra):
        """The group's own options parsed; a usage error is one line (:class:`harness.cli_types.OneLineUsage`)."""
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise OneLineUsage(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a command's bad option or argument: one line, exit 2
            raise OneLineUsage(e) from None
        except HarnessError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:  # Ctrl-C outside a run's own handling: one line and 130, never Click's 'Aborted!' (1)
            click.echo("interrupted by SIGINT", err=True)
            sys.exit(130)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="turbo-harness")
def cli():
    """Verify a llama.cpp fork's TurboQuant KV-cache types against an independent NumPy/SciPy reference."""


def _types(value: str) -> list[str]:
    """The --type list, validated (one-line HarnessError naming the choices)."""
    ts = list(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
    if not ts:
        raise HarnessError(f"--type {value!r} names no turbo type: choose from {', '.join(TURBO_TYPES)}")
    bad = [t for t in ts if t not in TURBO_TYPES]
    if bad:
        raise HarnessError(f"--type: unknown turbo type {', '.join(bad)}: choose from {', '.join(TURBO_TYPES)}")
    return ts


def registry():
    """The check registry the commands read: the one passed as the group's ``obj`` (tests with a toy check:
    ``CliRunner().invoke(cli, args, obj=REGISTRY.with_check(toy))``), else :data:`harness.checks.registry.REGISTRY`."""
    from harness.checks.contract import Registry
    from harness.checks.registry import REGISTRY
    ctx = click.get_current_context(silent=True)
    reg = ctx.find_object(Registry) if ctx is not None else None
    return reg if reg is not None else REGISTRY


def _check_ids(value: str | None) -> list[str]:
    """The --checks list (default every check but the opt-in ones), validated before anything is opened."""
    return registry().parse_ids(value)


def _numpy_target(spec: str):
    """A NumPy target for tests of the pipeline (hidden --numpy-target): 'FAULT,FAULT' (may be empty);
    the pseudo-fault 'slow' makes every target call sleep 50 ms so that a run can be interrupted, 'slowclose'
    makes closing the target (the teardown) take 3 s."""
    import time as _time

    from harness.targets.numpy_target import NumpyTarget
    faults = [f for f in spec.split(",") if f.strip() and f.strip() not in ("slow", "slowclose")]
    target = NumpyTarget(faults=faults)
    if "slowclose" in spec.split(","):  # teardown takes 3 s and says when it starts (tests of a signal in teardown)
        close = target.close
        target.close = lambda: (click.echo("(test) closing the target", err=True), _time.sleep(3.0), close())[2]
    if "slow" in spec.split(","):
        for name in ("quantize", "decode", "wht", "flash_attn"):
            fn = getattr(target, name)
            setattr(target, name, lambda *a, _fn=fn, **k: (_time.sleep(0.05), _fn(*a, **k))[1])
    return target, {"target_kind": "numpy", "build_dir": f"numpy:{spec}"}


def _print_headline(run) -> None:
    """The verdict and one line per finding (the same lines summary.md and report.html start with)."""
    from harness.report.findings import headline
    for ln in headline(run):
        click.echo(ln)


def _run_and_exit(check_ids, types, target_backend, backends, fork_dir, build_backend, out, strict, known_file=None,
                  numpy_target=None, options=None, rpc=None):
    """verify / check through the pipeline (harness.pipeline): run folder, target, checks, reports, exit code.

    ``rpc`` (:class:`harness.cli_rpc.RpcOptions`) adds remote devices and their type handshake."""
    from harness import pipeline, usage
    from harness.interrupt import Interrupted, interruptible
    from harness.verify import new_run_id
    target_backend = usage.backend_name(target_backend, "--target")
    backends = [usage.backend_name(b, "--backend") for b in backends]
    if rpc is not None:
        rpc.validate(numpy_target is not None)
    known = None
    if known_file:
        from harness.known import load_known
        known = load_known(known_file)
    if build_backend is None and target_backend and numpy_target is None and fb.build_dir(target_backend).joinpath("bin").is_dir():
        build_backend = target_backend  # --target vulkan measures the vulkan build when there is one
    run_dir, previous = pipeline.prepare_run_dir(Path(out) if out else REPORTS / new_run_id(), "checks")
    if numpy_target is not None:
        target, meta = _numpy_target(numpy_target)
    elif rpc is not None and rpc.active:
        target, meta = pipeline.open_target(fork_dir, build_backend, rpc)
    else:
        target, meta = pipeline.open_target(fork_dir, build_backend)
    try:
        pipeline.check_backends(target, target_backend, backends)
        if rpc is not None and rpc.active:  # both sides agree on the types before anything is measured
            meta.update(rpc.handshake(target, types, click.echo))
    except HarnessError:
        target.close()
        if rpc is not None:
            rpc.close()
        raise
    try:
        if previous is not None:
            pipeline.refuse_other_build(previous, meta, target.name, run_dir)
        what = (f"fork {fb.source_label(meta.get('fork_commit'), meta.get('fork_dirty'), meta.get('fork_diff_sha256'))}"
                if "fork_commit" in meta else f"target {target.name}")
        click.echo(f"{what} build {meta.get('build_dir')} -> report {run_dir}" + (" (adding to the checks already there)" if previous else ""))
        if meta.get("fork_commit") == "unknown" and meta.get("provenance_note"):
            click.echo(f"warning: {meta['provenance_note']}", err=True)
        if meta.get("provenance_warning"):
            click.echo(f"warning: {meta['provenance_warning']}", err=True)
        with interruptible():
            run = pipeline.run_verify(target, meta, check_ids, types, run_dir, previous, target_backend=target_backend,
                                      backends=backends, registry=registry(), options=options, log=click.echo,
                                      finish_later=True)
    except Interrupted as e:
        click.echo(f"interrupted by {e.name}: partial report marked INTERRUPTED in {run_dir / 'summary.md'}", err=True)
        target.close()
        if rpc is not None:
            rpc.close()
        sys.exit(e.exit_code)
    except BaseException:
        target.close()
        if rpc is not None:
            rpc.close()
        raise
    _teardown_and_exit(run, run_dir, target, rpc, known, known_file, strict)


def _teardown_and_exit(run, run_dir: Path, target, rpc, known, known_file, strict) -> None:
    """After the last check: close the target, write the final report, print it and exit, with SIGINT/SIGTERM
    deferred (harness.interrupt.deferred) so that exit code and report agree: a signal before the final report is
    written marks it INTERRUPTED (exit 130/143); one after it is ignored (the report and its code stand)."""
    from harness import pipeline
    from harness.interrupt import deferred, hold_until_exit
    with deferred() as st:
        try:
            if rpc is not None and rpc.active:  # what happened to the remote servers during the run goes into the report
                rpc.record_events(run, target, run_dir)
        finally:
            target.close()
            if rpc is not None:
                rpc.close()
        if st["pending"] is not None:
            import signal as _signal
            name = _signal.Signals(st["pending"]).name
            run.interrupted = {"signal": name, "exit_code": 128 + st["pending"], "in_progress": None, "not_run": [],
                               "during": "teardown, after every check had finished"}
            click.echo(f"interrupted by {name} during teardown: report marked INTERRUPTED in {run_dir / 'summary.md'}",
                       err=True)
        code = pipeline.finish(run, run_dir, known, known_file, strict, written=st["pending"] is None)
        hold_until_exit()
        _print_headline(run)
        click.echo(f"report: {run_dir / 'summary.md'} ({run_dir / 'report.html'})")
        sys.exit(code)


common = [
    click.option("--type", "types", default=",".join(TURBO_TYPES), show_default=True, help="turbo types, comma separated",
                 type=CommaList("turbo type", choices=lambda: TURBO_TYPES)),
    click.option("--target", "target_backend", default=None, type=BackendName(),
                 help="production backend (default: first GPU found, else cpu)"),
    click.option("--backend", "backends", multiple=True, type=BackendName(),
                 help="only these backends (repeatable); default all in the build"),
    click.option("--fork-dir", default=None, type=existing_dir(), help="fork checkout (default $FORK_DIR or vendor/llama.cpp)"),
    click.option("--build", "build_backend", default=None, type=BuildName(),
                 help="the backend whose build folder ($TURBO_BUILD_ROOT/<backend>) to use (default: this machine's backend)"),
    click.option("--out", default=None, type=ReportDir(), help="report folder (default reports/<run-id>)"),
    click.option("--strict", is_flag=True, help="exit 1 on PARTIAL too"),
    click.option("--numpy-target", "numpy_target", default=None, hidden=True,
                 help="(tests) run on the NumPy emulation with these faults instead of a fork build"),
    click.option("--known", "known_file", default=None, type=existing_file(),
                 help="known-findings file (e.g. checks/known-findings.toml): accepted findings are XFAIL, "
                      "anything else non-PASS fails the gate (README 'Known findings')"),
    *RPC_OPTIONS,
]


def with_common(f):
    for opt in reversed(common):
        f = opt(f)
    return f


@cli.command()
@click.argument("check_id")
@click.option("--model", default=None, type=ModelArg(),
              help="KVREAL only: smollm2 | gemma3 | PATH.gguf (same as $TURBO_MODEL; default smollm2)")
@with_common
def check(check_id, model, types, target_backend, backends, fork_dir, build_backend, out, strict, numpy_target, known_file,
          rpc, rpc_local, rpc_timeout):
    """Run one check (PQ1..PQ6, COMPAT, and the opt-in MODEL, KVREAL) and write its report."""
    cid = registry().runnable(check_id.upper()).id
    if model is not None and cid != "KVREAL":  # an option that does not apply is refused, never silently ignored
        raise HarnessError(f"--model applies to KVREAL only (the check that reads K/V from a model); {cid} reads no "
                           f"model: leave --model out")
    spec = model or os.environ.get("TURBO_MODEL")
    if cid == "KVREAL" and spec and numpy_target is None:  # read now, as sweep does: a file that is not a GGUF stops here
        from harness.runners.inputs import read_model_info
        from harness.runners.models import resolve_model
        try:
            read_model_info(resolve_model(spec))
        except HarnessError as e:
            raise HarnessError(f"{'--model' if model else '$TURBO_MODEL'}: {e}") from None
    _run_and_exit([cid], _types(types), target_backend, list(backends), fork_dir, build_backend, out, strict, known_file,
                  numpy_target, options={"KVREAL": {"model": model}} if model else None,
                  rpc=RpcOptions(rpc, rpc_local, rpc_timeout))


@cli.command()
@click.option("--checks", "check_list", default=None, type=CommaList("check id", check=lambda v: registry().parse_ids(v)),
              help="comma-separated check ids (default: every check but the opt-in ones, which `list` marks)")
@with_common
def verify(check_list, types, target_backend, backends, fork_dir, build_backend, out, strict, numpy_target, known_file,
           rpc, rpc_local, rpc_timeout):
    """Run the default checks (PQ1-PQ6 and the cross-backend matrix; the opt-in ones, e.g. MODEL and KVREAL, with
    --checks) and write the report."""
    ids = _check_ids(check_list)
    _run_and_exit(ids, _types(types), target_backend, list(backends), fork_dir, build_backend, out, strict, known_file,
                  numpy_target, rpc=RpcOptions(rpc, rpc_local, rpc_timeout))


@cli.command()
@click.option("--backend", default=None, type=BackendName(), help=f"{backends.choices()} (default: detect)")
@click.option("--targets", default=None, type=CommaList("CMake target"),
              help="CMake targets, comma separated (default: what verify needs: ggml, test-backend-ops; 'all': also "
                   "llama-perplexity, llama-bench and libllama, which other commands otherwise build on first use)")
@click.option("--fork-dir", default=None, type=existing_dir())
@click.option("--jobs", "-j", type=AtLeast(1, "parallel compile jobs"), default=None, help="parallel compile jobs (at least 1)")
@click.option("--rpc", is_flag=True, help="also build ggml's RPC backend and rpc-server (GGML_RPC=ON), for --rpc HOST:PORT")
def build(backend, targets, fork_dir, jobs, rpc):
    """Build the fork (what verify needs, or --targets) and the native probe, printing progress every 30 s."""
    from harness.fork.locate import locate
    from harness.fork.probe import build_probe
    from harness.interrupt import Interrupted, interruptible
    found = locate(fork_dir)
    fork = found.path
    click.echo(f"fork: {found.describe()}")
    backend = backend or fb.detect_backend()
    bdir = fb.build_dir(backend, fork=fork)
    try:
        with interruptible():  # Ctrl-C / SIGTERM: the build tool is stopped (harness.fork.progress), one line, 130/143
            res = fb.build(backend, targets.split(",") if targets else None, fork=fork, bdir=bdir, jobs=jobs,
                           log=click.echo, rpc=rpc)
            lib = build_probe(res.dir, fork, force=rpc)
    except Interrupted as e:
        click.echo(f"interrupted by {e.name}: the build stopped; {bdir} is kept and the next `turbo-harness build` "
                   f"goes on from where it stopped", err=True)
        sys.exit(e.exit_code)
    click.echo(f"built {res.backend} in {res.dir} (fork {res.meta.get('fork_commit', '?')[:12]}"
               f"{' dirty' if res.meta.get('fork_dirty') else ''}{', with RPC' if res.meta.get('rpc') else ''}); probe {lib}")


@cli.command("unpack-fork")
@click.argument("snapshot", type=existing_file())
@click.option("--dest", default=".cache/fork", show_default=True, type=out_dir(),
              help="folder to unpack into (reused when already unpacked)")
@click.option("--sha256", default=None, type=Sha256(), help="expected SHA-256 (default: the one stated in the README beside the file)")
def unpack_fork(snapshot, dest, sha256):
    """Unpack a fork source snapshot (.tar.xz, hash checked) and print its folder (no network needed). The folder is
    remembered in .cache/fork-dir: later commands use it without FORK_DIR (unless FORK_DIR or vendor/llama.cpp is set)."""
    from harness.fork.locate import remember
    from harness.fork.snapshot import unpack
    tree = unpack(snapshot, dest, sha256)
    remember(tree)
    click.echo(tree)


@cli.command("list")
def list_checks():
    """List the checks (what each needs, whether verify runs it) and their thresholds (with the reason for each)."""
    from harness.checks.common import load_thresholds
    for c in registry():
        how = ("" if c.in_verify else "; opt-in: not in the default verify") if c.command == "verify" else \
            f"; run by `turbo-harness {c.command}`"
        click.echo(f"{c.id}  {c.title}  [needs {', '.join(c.needs) or 'nothing'}{how}]")
        th = load_thresholds(c.rules_file) if c.rules_file else load_thresholds()
        for sec in ([c.rules] if c.rules else list(th)):
            for k, v in th.get(sec, {}).items():
                if not k.endswith("_reason"):
                    click.echo(f"    {'' if c.rules else sec + '.'}{k} = {v}    # {th[sec][k + '_reason']}")


@cli.command()
@click.argument("run_dir", type=existing_dir())
@click.option("--known", "known_file", default=None, type=existing_file(),
              help="judge the stored run against a known-findings file and exit with the gate's code")
@click.option("--no-known", "no_known", is_flag=True,
              help="drop the known-findings gate stored in the folder by an earlier --known (judge the run alone)")
@click.option("--strict", is_flag=True, help="with no --known: exit 1 on PARTIAL too")
def report(run_dir, known_file, no_known, strict):
    """Re-judge a run from its run.json (each cell from its value, threshold and op), re-render its
    Markdown/JUnit/HTML and exit as verify would (with --known: and gate it; a gate stored by an earlier --known
    applies again, judged on the re-judged cells, until --no-known drops it)."""
    from harness.known import apply_known, clear_known, gate_exit_code, load_known, stored_known
    from harness.report.render import write_all
    from harness.pipeline import load_run
    from harness import runlock
    cannot_write = (f"cannot write the reports into {run_dir} ({{}}): copy the folder somewhere writable and run "
                    f"`turbo-harness report` on the copy")
    if known_file and no_known:
        raise HarnessError("--known and --no-known together: give --known FILE to gate the run, or --no-known to drop "
                           "the gate stored in it")
    known = load_known(known_file) if known_file else None
    try:
        runlock.acquire(Path(run_dir), "RUN_DIR")  # not while a run writes it; read-modify-write under the lock
    except runlock.Locked:
        raise
    except HarnessError:
        raise HarnessError(cannot_write.format("its lock file cannot be created")) from None
    run = load_run(Path(run_dir), log=lambda line: click.echo(line, err=True))  # re-judged from its evidence
    if no_known:
        clear_known(run)
    elif known is None and stored_known(run) is not None:  # the gate stored by an earlier --known: judged again on
        known, known_file = stored_known(run)             # the re-judged cells, never taken as it was stored
        click.echo(f"applying the known-findings gate stored in run.json (from --known {known_file}); "
                   f"`turbo-harness report {run_dir} --no-known` drops it", err=True)
    if known is not None:
        apply_known(run, known, known_file)
    try:
        for f in write_all(run, Path(run_dir)):
            click.echo(f"wrote {f}")
    except OSError as e:
        raise HarnessError(cannot_write.format(e.strerror or e)) from None
    _print_headline(run)
    sys.exit(gate_exit_code(run, strict))


def main():
    from harness.interrupt import STANDALONE
    STANDALONE["on"] = True  # the console program: signals after the final report are ignored to the exit
    cli()


if __name__ == "__main__":
    main()
