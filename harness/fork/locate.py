"""Finding the fork checkout: the one place ``make verify``, ``make test``, ``doctor``, ``.ci/run`` and every command
ask which fork to build and measure.

Order (first found wins):

1. ``--fork-dir`` (the ``explicit`` argument), else ``$FORK_DIR``: used as given, an error when it is not a fork;
2. a ``vendor/llama.cpp`` checkout (the git submodule, when it has been fetched);
3. the snapshot unpacked earlier, remembered in ``.cache/fork-dir`` (so a new shell needs no ``export``);
4. a source snapshot ``llama-cpp-turboquant-*.tar.xz`` in ``shared/forks/`` beside the repository (``../shared``,
   or a folder above it; ``$TURBO_FORKS_DIR`` names another folder), SHA-256 checked against the README beside it
   (:mod:`harness.fork.snapshot`), unpacked into ``.cache/fork/`` and remembered.

``python -m harness.fork.locate`` prints the folder (what the Makefile and ``.ci/run`` call); with ``--fetch`` it
tries ``git submodule update --init vendor/llama.cpp`` as the last resort (that needs network).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError

REPO_ROOT = Path(__file__).resolve().parents[2]
VENDOR = REPO_ROOT / "vendor" / "llama.cpp"
SNAPSHOT_GLOB = "llama-cpp-turboquant-*.tar.xz"


def cache_root() -> Path:
    """``$TURBO_CACHE``, else ``.cache/`` of the harness checkout (ignored by git)."""
    return Path(os.environ.get("TURBO_CACHE") or (REPO_ROOT / ".cache"))


def memo_file() -> Path:
    """The small file naming the unpacked snapshot folder (``.cache/fork-dir``)."""
    return cache_root() / "fork-dir"


def is_fork(p: Path) -> bool:
    """True when ``p`` holds a ggml/llama.cpp tree (``ggml/include/ggml.h``)."""
    return (Path(p) / "ggml" / "include" / "ggml.h").is_file()


@dataclass(frozen=True)
class Found:
    """A fork checkout and where it came from ('--fork-dir', 'FORK_DIR', 'vendor', 'remembered', 'snapshot')."""

    path: Path
    source: str
    snapshot: Path | None = None

    def describe(self) -> str:
        """'<path> (from FORK_DIR)' etc., for doctor and the build's first line."""
        how = {"--fork-dir": "from --fork-dir", "FORK_DIR": "from FORK_DIR", "vendor": "the vendor/llama.cpp checkout",
               "remembered": f"the unpacked snapshot remembered in {memo_file()}",
               "snapshot": f"unpacked from {self.snapshot}"}[self.source]
        return f"{self.path} ({how})"


def snapshots() -> list[Path]:
    """Fork source snapshots found: in ``$TURBO_FORKS_DIR``, else in ``shared/forks/`` of the repository's parent
    folder or of one of the two folders above it (a git worktree sits deeper). Newest name last."""
    if os.environ.get("TURBO_FORKS_DIR"):
        dirs = [Path(os.environ["TURBO_FORKS_DIR"])]
    else:
        dirs = [p / "shared" / "forks" for p in list(REPO_ROOT.parents)[:3]]
    for d in dirs:
        found = sorted(d.glob(SNAPSHOT_GLOB)) if d.is_dir() else []
        if found:
            return found
    return []


def remembered() -> Path | None:
    """The unpacked snapshot folder named in ``.cache/fork-dir``, when it still holds a fork tree."""
    f = memo_file()
    if not f.is_file():
        return None
    p = Path(f.read_text().strip())
    return p if p.is_absolute() and is_fork(p) else None


def remember(path: Path) -> None:
    """Write ``path`` into ``.cache/fork-dir`` (later commands and new shells find it without ``export``)."""
    f = memo_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(f"{Path(path).resolve()}\n")


def locate(explicit: str | os.PathLike | None = None, unpack: bool = True, fetch: bool = False, log=None) -> Found:
    """The fork checkout to use (order in the module docstring).

    Args:
        explicit: ``--fork-dir``; wins over everything.
        unpack: allow unpacking a snapshot (seconds to a minute once); without it a snapshot that is not yet
            unpacked counts as not found.
        fetch: try ``git submodule update --init vendor/llama.cpp`` when nothing else is found (needs network).
        log: called with one line when a snapshot is unpacked or the submodule fetched (default: stderr).
    Returns:
        :class:`Found`.
    Raises:
        HarnessError: ``--fork-dir``/``FORK_DIR`` names no fork tree, a snapshot fails its hash check, or no fork is
            found; the message names what works from here (a snapshot, ``FORK_DIR``, or the submodule with network).
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    given = explicit or os.environ.get("FORK_DIR")
    if given:
        p = Path(given).expanduser().resolve()
        if not is_fork(p):
            raise HarnessError(f"no fork checkout at {p} (from {'--fork-dir' if explicit else 'FORK_DIR'}): "
                               f"point it at a llama.cpp fork checkout (a folder holding ggml/include/ggml.h)")
        return Found(p, "--fork-dir" if explicit else "FORK_DIR")
    if is_fork(VENDOR):
        return Found(VENDOR.resolve(), "vendor")
    mem = remembered()
    if mem is not None:
        return Found(mem, "remembered")
    snaps = snapshots()
    if snaps and unpack:
        from harness.fork.snapshot import unpack as unpack_snapshot
        log(f"fork: unpacking {snaps[-1]} (SHA-256 checked) into {cache_root() / 'fork'} ...")
        tree = unpack_snapshot(snaps[-1], cache_root() / "fork")
        remember(tree)
        log(f"fork: {tree} (remembered in {memo_file()}: no FORK_DIR needed from now on)")
        return Found(tree, "snapshot", snaps[-1])
    if fetch and not snaps and (REPO_ROOT / ".gitmodules").is_file():
        log("fork: no FORK_DIR, no vendor/llama.cpp checkout, no snapshot: trying `git submodule update --init "
            "vendor/llama.cpp` (needs network) ...")
        try:
            subprocess.run(["git", "-C", str(REPO_ROOT), "submodule", "update", "--init", "vendor/llama.cpp"],
                           timeout=600, check=False, env=dict(os.environ, GIT_TERMINAL_PROMPT="0"))
        except (OSError, subprocess.TimeoutExpired):
            pass
        if is_fork(VENDOR):
            return Found(VENDOR.resolve(), "vendor")
    raise HarnessError(not_found_advice(snaps))


def not_found_advice(snaps: list[Path] | None = None) -> str:
    """One line: no fork found, and what works from here (offline first)."""
    snaps = snapshots() if snaps is None else snaps
    if snaps:
        return (f"no fork checkout unpacked yet: `turbo-harness unpack-fork {snaps[-1]}` (works offline; remembered "
                f"for later commands) or set FORK_DIR to a llama.cpp fork checkout")
    return ("no fork checkout found (no FORK_DIR, no vendor/llama.cpp checkout, no llama-cpp-turboquant-*.tar.xz "
            "snapshot in ../shared/forks): set FORK_DIR to a TurboQuant fork checkout, `turbo-harness unpack-fork "
            "FILE.tar.xz` a source snapshot (offline), or with network `git submodule update --init vendor/llama.cpp`")


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.fork.locate [--fetch] [--no-unpack]``: print the fork folder (exit 2 with the advice)."""
    import argparse
    ap = argparse.ArgumentParser(description="print the fork checkout the harness uses (README 'Getting the fork')")
    ap.add_argument("--fetch", action="store_true", help="try the git submodule (network) when nothing else is found")
    ap.add_argument("--no-unpack", action="store_true", help="do not unpack a snapshot")
    ap.add_argument("--describe", action="store_true", help="say where it came from")
    a = ap.parse_args(argv)
    try:
        f = locate(unpack=not a.no_unpack, fetch=a.fetch)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f.describe() if a.describe else f.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
