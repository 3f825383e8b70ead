"""Build and verify several fork checkouts in turn, then score them side by side (``make scorecard FORKS="dir1 dir2"``).

Each checkout gets its own build folder, named by what it is built from: ``<root>/<commit[:12]>`` (plus
``-dirty-<diff sha256[:8]>`` for uncommitted changes), root ``$TURBO_FORKS_BUILD_ROOT`` or ``build/forks`` of the
harness checkout. A folder whose recorded provenance (turbo-harness-build.json) matches the checkout and that holds
the targets and the probe is reused; anything else is built. Each fork is then verified into
``<reports>/forks/<label>`` (a fresh report) and ``turbo-harness scorecard`` reads them all.

Usage: ``python -m harness.fork.forks [--out DIR] [--backend cpu] FORK_DIR...`` (the Makefile's ``scorecard`` target).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from harness.errors import HarnessError
from harness.fork import build as fb

# What `verify` needs built: ggml (the probe links it) and test-backend-ops (COMPAT runs the fork's own op tests).
SCORECARD_TARGETS = fb.TARGETS["checks"] + fb.TARGETS["compat"]


def targets_for(backend: str) -> list[str]:
    """The targets to build for ``backend``: :data:`SCORECARD_TARGETS`, but ggml alone on the CPU, where
    test-backend-ops has nothing to compare (it compares other backends with the CPU; COMPAT then says "not run:
    the binary is not built") and building it costs libllama and common, several times ggml's build."""
    return fb.TARGETS["checks"] if backend == "cpu" else SCORECARD_TARGETS


def label(state: dict) -> str:
    """'<commit[:12]>' or '<commit[:12]>-dirty-<diff[:8]>' for a checkout's :func:`harness.fork.build.git_state`.

    Raises:
        HarnessError: the checkout names no commit (no .git, no .fork-commit): its build could not be reused safely.
    """
    c = str(state.get("commit") or "unknown")
    if c == "unknown":
        raise HarnessError("a fork checkout without a commit (no .git, no .fork-commit) cannot be scored: its builds "
                           "could not be told apart; write its commit into .fork-commit")
    if state.get("dirty"):
        return f"{c[:12]}-dirty-{str(state.get('diff_sha256') or 'nodiff')[:8]}"
    return c[:12]


def forks_root() -> Path:
    """Where the per-fork build folders go: $TURBO_FORKS_BUILD_ROOT, else build/forks of the harness checkout."""
    return Path(os.environ.get("TURBO_FORKS_BUILD_ROOT") or (fb.REPO_ROOT / "build" / "forks"))


def reusable(bdir: Path, fork: Path, state: dict, targets: list[str]) -> str | None:
    """None when ``bdir`` can be reused for ``fork`` as it is; else why not (one phrase).

    Reused only when the build recorded its provenance, it matches the checkout (same commit, dirty state and diff:
    :func:`harness.fork.build.provenance_mismatch`), it was built from a known commit, it holds every target of
    ``targets`` and the native probe."""
    meta = fb.read_build_meta(bdir)
    if not meta:
        return "no build recorded there"
    if str(meta.get("fork_commit") or "unknown") == "unknown":
        return "the build names no commit"
    why = fb.provenance_mismatch(meta, state)
    if why:
        return f"built from {fb.source_label(meta.get('fork_commit'), meta.get('fork_dirty'))} ({why})"
    if meta.get("fork_dirty") != state.get("dirty"):
        return "dirty state unknown on one side"
    missing = [t for t in targets if t not in (meta.get("targets") or [])]
    if missing:
        return f"targets {', '.join(missing)} not built"
    if not (bdir / "turbo-probe" / "libturbo_probe.so").is_file() and not list((bdir / "turbo-probe").glob("libturbo_probe.*")):
        return "no probe built"
    return None


def run(cmd: list[str], env: dict) -> int:
    """Run one harness command, its output passed through; its exit code."""
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) and verify each fork, then write the scorecard. Exit 0 when every fork was measured (whatever
    its verdict), 2 on bad input or a fork that could not be built (the others are still scored)."""
    ap = argparse.ArgumentParser(prog="python -m harness.fork.forks", description=__doc__.split("\n\n")[0])
    ap.add_argument("forks", nargs="*", help="fork checkouts (FORK_DIR of each)")
    ap.add_argument("--out", default=str(fb.REPO_ROOT / "reports"), help="reports folder (forks/<label>, scorecard/)")
    ap.add_argument("--backend", default=None, help="backend to build and verify (default: this machine's)")
    a = ap.parse_args(argv)
    if not a.forks:
        print('error: no fork checkouts: give them as FORKS="dir1 dir2 ..." (make scorecard) or as arguments', file=sys.stderr)
        return 2
    th = str(Path(sys.executable).parent / "turbo-harness")
    th = th if Path(th).is_file() else shutil.which("turbo-harness") or th
    backend = a.backend or fb.detect_backend()
    reports, failed = [], []
    for d in a.forks:
        try:
            fork = fb.fork_dir(d)
            fb.require_turbo(fork)
            lab = label(fb.git_state(fork))
        except HarnessError as e:
            print(f"error: {d}: {e}", file=sys.stderr)
            failed.append(d)
            continue
        root = forks_root() / lab
        env = dict(os.environ, TURBO_BUILD_ROOT=str(root), FORK_DIR=str(fork))
        targets = targets_for(backend)
        why = reusable(fb.build_dir(backend, root), fork, fb.git_state(fork), targets)
        if why is None:
            print(f"{fork}: reusing the build in {fb.build_dir(backend, root)} (same commit, dirty state and diff)")
        else:
            print(f"{fork}: building into {fb.build_dir(backend, root)} ({why})")
            if run([th, "build", "--backend", backend, "--fork-dir", str(fork), "--targets", ",".join(targets)], env):
                failed.append(d)
                continue
        out = Path(a.out) / "forks" / lab
        if out.exists() and not (out / "run.json").is_file() and (not out.is_dir() or any(out.iterdir())):
            print(f"error: {out} holds no turbo-harness report: it is left as it is; move it away or give another "
                  f"OUT=DIR", file=sys.stderr)  # never remove what the harness did not write
            failed.append(d)
            continue
        if out.exists():
            shutil.rmtree(out)  # a fresh report of this build: never merged with an older one
        rc = run([th, "verify", "--fork-dir", str(fork), "--build", backend, "--out", str(out)], env)
        if rc in (0, 1) or (out / "run.json").is_file():
            reports.append(str(out))
        else:
            failed.append(d)
    if reports:
        run([th, "scorecard", *reports, "--out", str(Path(a.out) / "scorecard")], dict(os.environ))
    if failed:
        print(f"not scored: {', '.join(failed)} (see the messages above)", file=sys.stderr)
    return 2 if failed or not reports else 0


if __name__ == "__main__":
    sys.exit(main())
