"""Replay the checks on any fork commit, and bisect a verdict change with ``git bisect run``.

Sources of a commit are exported from the fork's git (no checkout of the user's tree is touched)
into ``<cache>/src/<commit>``; builds go to ``<cache>/build/<commit>`` and are reused. The cache is
``$TURBO_REPLAY_CACHE`` or ``.cache/replay`` in the harness checkout. A commit that does not build
with the default compiler is retried with clang when it is installed; a build that still fails is
an error naming the compiler's message, and no other cached build is touched.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

from harness.errors import HarnessError
from harness.fork import build as fb

EXCLUDE = [":(exclude)models/ggml-vocab-*.gguf", ":(exclude)tools/server/public/bundle.js"]
CATALOGUE = fb.REPO_ROOT / "checks" / "replays.toml"


def cache_root() -> Path:
    """Replay cache: $TURBO_REPLAY_CACHE, else .cache/replay of the harness checkout (src/ and build/ per commit)."""
    return Path(os.environ.get("TURBO_REPLAY_CACHE") or (fb.REPO_ROOT / ".cache" / "replay"))


def git_dir_of(fork: Path) -> Path:
    """The git directory holding the fork's history (a checkout's .git, or a bare repository)."""
    r = subprocess.run(["git", "-C", str(fork), "rev-parse", "--absolute-git-dir"], capture_output=True, text=True)
    if r.returncode != 0:
        raise HarnessError(f"{fork} is not a git checkout: replay needs the fork's history (set FORK_DIR to a clone)")
    return Path(r.stdout.strip())


def resolve(fork: Path, rev: str) -> str:
    """Full hash of a commit. Raises HarnessError when the fork's history has no such commit."""
    r = subprocess.run(["git", "--git-dir", str(git_dir_of(fork)), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                       capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise HarnessError(f"commit {rev!r} is not in the fork's history at {fork}: give a hash or ref that "
                           f"`git -C {fork} log` shows")
    return r.stdout.strip()


def export_source(fork: Path, commit: str, root: Path | None = None) -> Path:
    """Write the commit's tree (minus large model blobs) to <cache>/src/<commit> once; returns the folder."""
    dest = (root or cache_root()) / "src" / commit
    if (dest / ".fork-commit").is_file():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=f"src-{commit[:8]}-", dir=dest.parent if dest.parent.exists() else None))
    dest.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GIT_INDEX_FILE=str(tmp / ".git-index"))
    r = subprocess.run(["git", "--git-dir", str(git_dir_of(fork)), "--work-tree", str(tmp), "checkout", commit, "--", ".",
                        *EXCLUDE], capture_output=True, text=True, env=env)
    if r.returncode != 0 and not (tmp / "ggml" / "include" / "ggml.h").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise HarnessError(f"could not export {commit[:12]}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'git failed'}")
    (tmp / ".git-index").unlink(missing_ok=True)
    (tmp / ".fork-commit").write_text(commit + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def build_commit(fork: Path, commit: str, targets=("ggml",), log=print, root: Path | None = None) -> tuple[Path, Path, dict]:
    """Export and build one commit for the CPU (reusing its cached build).

    Returns (source dir, build dir, build metadata). Raises HarnessError when it does not build with
    any available compiler; the message quotes the first compiler error.
    """
    root = root or cache_root()
    src = export_source(fork, commit, root)
    fb.require_turbo(src)
    bdir = root / "build" / commit
    for cand in ([Path((bdir / "USE").read_text().strip())] if (bdir / "USE").is_file() else []) + [bdir]:
        meta = fb.read_build_meta(cand)  # a commit that needed the other compiler points at that build
        if meta and set(targets) <= set(meta.get("targets", [])) and any((cand / "bin").glob("libggml-base.*")):
            return src, cand, meta
    attempts = [("default", None)]
    if shutil.which("clang") and shutil.which("clang++"):
        attempts.append(("clang", {"CC": "clang", "CXX": "clang++"}))
    errors = []
    for name, cc in attempts:
        b = bdir if name == "default" else root / "build" / f"{commit}-clang"
        env = dict(os.environ, **cc) if cc else None
        try:
            res = fb.build("cpu", list(targets), fork=src, bdir=b, log=log, env=env)
            if b != bdir:  # remember which folder holds this commit's working build
                bdir.mkdir(parents=True, exist_ok=True)
                (bdir / "USE").write_text(str(b))
            return src, b, res.meta
        except HarnessError as e:
            errors.append(f"{name}: {e}")
            log(f"build of {commit[:12]} with the {name} compiler failed")
    raise HarnessError(f"{commit[:12]} does not build: " + " | ".join(errors))


def load_catalogue(path: Path | None = None) -> list[dict]:
    """Replay catalogue entries from checks/replays.toml (each: id, fix, parent, check, types, expectations)."""
    p = Path(path or CATALOGUE)
    if not p.is_file():
        raise HarnessError(f"replay catalogue {p} not found")
    return tomllib.loads(p.read_text()).get("replay", [])
