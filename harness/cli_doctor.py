"""``turbo-harness doctor``: what the harness finds (fork and where it came from, builds, backends and how each is
examined, a Vulkan build's headers/driver/device visibility, binaries, model, corpus), each line with what works from
here when something is missing.

Loaded by harness/cli.py when named (``LAZY_COMMANDS``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from harness.cli_types import existing_dir
from harness.errors import HarnessError
from harness.fork import build as fb
from harness.fork.locate import locate


@click.command("doctor")
@click.option("--fork-dir", default=None, type=existing_dir())
def doctor(fork_dir):
    """Say what the harness finds: fork, commit, builds, backends, binaries, model, corpus."""
    ok = True
    fork_commit = None

    def line(k, v, good=True, counts=True):
        nonlocal ok
        ok = ok and (good or not counts)
        click.echo(f"{'ok ' if good else 'NO '} {k:14s} {v}")
    fork, st = None, None
    try:
        found = locate(fork_dir)  # unpacks a found snapshot once (offline), as make verify and CI would
        fork = found.path
        st = fb.git_state(fork)
        fork_commit = st["commit"]
        line("fork", _fork_line(fork, st))
        click.echo(f"--    {'found as':12s} {found.describe()}")
        line("turbo types", "present" if fb.has_turbo_types(fork) else "MISSING (not a TurboQuant fork)", fb.has_turbo_types(fork))
    except HarnessError as e:
        line("fork", str(e), False)
    backend = fb.detect_backend()
    line("backend", f"this machine builds for {backend}"
         + (f"; this fork's build folder: {fb.build_dir(backend, fork=fork)}" if fork is not None else ""))
    import shutil
    import subprocess
    if shutil.which("ccache"):
        ver = subprocess.run(["ccache", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
        line("ccache", f"installed ({ver[0] if ver else 'ccache'}): every build uses it (TURBO_CCACHE=0 turns it "
                       f"off): rebuilds, other clones and replayed commits reuse the objects of unchanged files")
    else:  # replay works without it, only slower: reported, not fatal
        click.echo(f"--  {'ccache':14s} not installed: every build and replayed commit compiles from scratch "
                   f"(apt-get install ccache makes rebuilds and replay/bisect builds several times faster)")
    my_bdir = fb.build_dir(backend, fork=fork) if fork is not None else None
    if my_bdir is not None and not any((my_bdir / "bin").glob("libggml-base.*")):
        click.echo(f"--  {'build':14s} none yet for this fork in {my_bdir}: `make verify` builds what verify needs "
                   f"(ggml, test-backend-ops, the probe); other tools are built the first time a command needs them")
    for bdir in sorted(fb.build_root().glob("*")) if fb.build_root().is_dir() else []:
        if not (bdir / "bin").is_dir():
            continue
        meta = fb.read_build_meta(bdir)
        bins = [b for b in ("test-backend-ops", "llama-perplexity", "llama-bench", "rpc-server") if (bdir / "bin" / b).is_file()]
        mine = bdir == my_bdir
        has_libs = any((bdir / "bin").glob("libggml-base.*"))
        bc = meta.get("fork_commit") or "unknown"
        built_from = ("the fork above" if fork_commit not in (None, "unknown") and bc == fork_commit
                      else f"fork {bc[:12]}" + (" (NOT the fork above)" if fork_commit not in (None, "unknown") else ""))
        line(f"build {bdir.name}", f"{bdir}, built from {built_from}; binaries: {', '.join(bins) or 'none'}"
             + ("" if has_libs else " (no ggml libraries: not built)"), has_libs or not mine)
        if not has_libs:
            continue
        if fork is not None:  # provenance: the checkout must be what this build was built from
            try:
                fb.check_provenance(bdir, fork, meta, st)
                if meta:
                    line("  provenance", _provenance_line(meta, fork))
                else:  # not a mismatch, but reports from it cannot name their commit: said, not fatal
                    click.echo(f"--    {'provenance':12s} not recorded ({fb.BUILD_META} missing): reports will name the fork "
                               f"commit as unknown; rebuild with `turbo-harness build` to record it")
            except HarnessError as e:
                line("  provenance", f"MISMATCH: {e}", False, counts=mine)
                continue  # its probe would be compiled against headers of another source
        rpc_note = ("" if (bdir / "bin" / "rpc-server").is_file()
                    else " (no rpc-server binary here: --rpc-local needs `turbo-harness build --rpc`)")
        click.echo(f"--    {'remote (RPC)':12s} " + (  # README 'Remote devices': not fatal either way
            f"yes: --rpc HOST:PORT and --rpc-local DEVICE work with this build{rpc_note}" if fb.has_rpc(bdir)
            else "no: --rpc needs a build with ggml RPC: `turbo-harness build --rpc` (or `make build RPC=1`)"))
        if fork is None:  # the probe compiles against the checkout's headers
            click.echo(f"--    {'probe':12s} not tried: no fork checkout to compile it against (see the fork line)")
            continue
        try:
            from harness.targets.fork import ForkTarget
            t = ForkTarget(bdir, fork)
            line("  backends", ", ".join(f"{b.name} ({b.device}, {b.kind}{', ' + b.mode_label if b.mode_note else ''})"
                                         for b in t.backends()))
            if t.vulkan is not None:  # a Vulkan build: headers it was built with, the driver, device visibility
                line("  vulkan", f"headers {meta.get('vulkan', {}).get('headers', '?')}; driver {t.vulkan['driver']}; "
                                 f"device visibility: {t.vulkan['visible_devices']}", "vulkan" in
                     [b.name for b in t.backends()], counts=mine)
            t.close()
        except HarnessError as e:
            line("  probe", str(e), not mine)
    from harness.runners import inputs, models
    for mname, m in models.known_models().items():
        try:  # needed by `sweep` only: reported, not fatal
            line(f"model {mname}", f"{models.model_path(m)} ({m.title})")
        except HarnessError as e:
            click.echo(f"--  {'model ' + mname:14s} not found (needed by sweep only): {e}")
    try:
        line("corpus", str(inputs.default_corpus()))
    except HarnessError as e:
        click.echo(f"--  {'corpus':14s} not found (needed by sweep only): {e}")
    sys.exit(0 if ok else 2)


def _provenance_line(meta: dict, fork: Path) -> str:
    """What a build whose provenance matches the checkout ``fork`` was built from, truly: 'built from this checkout'
    only when its record names this folder; a build of another folder at the same commit and diff (a second clone, a
    shared TURBO_BUILD_ROOT) names that folder."""
    label = fb.source_label(meta.get("fork_commit"), meta.get("fork_dirty"), meta.get("fork_diff_sha256"))
    built = meta.get("fork_dir")
    if built and Path(built).resolve() != Path(fork).resolve():
        return f"built from {built} ({label}): the same commit and diff as this fork checkout, not this folder"
    return f"built from this fork checkout ({label})" if built else f"built from fork {label}, the same as this checkout (no folder recorded)"


def _fork_line(fork: Path, st: dict) -> str:
    """'<dir> at <commit> [(dirty)] - <subject>', the commit named once; a copy without git history says so."""
    commit = st.get("commit") or "unknown"
    if commit == "unknown":
        return (f"{fork} (no git history, commit unknown: write the commit hash into {fork / '.fork-commit'} "
                f"so reports can name it)")
    dirty = {True: " (dirty)", False: "", None: ""}.get(st.get("dirty"), "")
    desc = str(st.get("describe") or "")
    first = desc.split(" ", 1)[0]
    subject = desc.split(" ", 1)[1] if first and commit.startswith(first) and " " in desc else ("" if commit.startswith(first) and first else desc)
    return f"{fork} at {commit[:12]}{dirty}" + (f" - {subject}" if subject else "")
