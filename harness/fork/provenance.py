"""Provenance of a fork build: what a checkout is (commit, dirty state, diff hash), what a build folder recorded it
was built from, and whether the two agree (spec "Integrity of a verdict" / Provenance).

Re-exported by :mod:`harness.fork.build`, where callers have always found these names.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

from harness.errors import HarnessError

BUILD_META = "turbo-harness-build.json"


def has_turbo_types(fork: Path) -> bool:
    """True when the fork's ggml declares the turbo KV-cache types (GGML_TYPE_TURBO*)."""
    text = (fork / "ggml" / "include" / "ggml.h").read_text(errors="replace")
    return bool(re.search(r"GGML_TYPE_TURBO[234]_0", text))


def require_turbo(fork: Path) -> None:
    """Raise HarnessError when the checkout has no turbo types (e.g. upstream llama.cpp)."""
    if not has_turbo_types(fork):
        raise HarnessError(
            f"{fork} has no TurboQuant KV types (no GGML_TYPE_TURBO*_0 in ggml.h): point FORK_DIR at a "
            f"TurboQuant fork such as TheTom/llama-cpp-turboquant")


def git_state(fork: Path) -> dict:
    """Commit, short description, dirty flag and diff hash of a checkout.

    Returns:
        {'commit': full hash ('unknown' when not a git tree and no .fork-commit file), 'describe': str,
        'dirty': bool, or None when unknown (a copy without .git), 'diff_sha256': SHA-256 of
        ``git diff HEAD --binary`` (tracked changes) when dirty, else None, 'branch': the checked-out branch
        (None when detached or unknown), 'remote': origin's URL without credentials (None when unknown)}.
        A copy without .git has no 'branch' key, and a 'remote' only when it carries ``.fork-origin`` (written by
        :func:`harness.fork.snapshot.unpack` from the snapshot's README: e.g. 'TheTom/llama-cpp-turboquant').
    """
    def g(*args):
        r = subprocess.run(["git", "-C", str(fork), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    commit = g("rev-parse", "HEAD") if (Path(fork) / ".git").exists() else ""
    marker = Path(fork) / ".fork-commit"  # a copy without .git (e.g. carried to another machine) names its commit here
    if not commit and marker.is_file():
        out = {"commit": marker.read_text().strip(), "describe": "copy without .git (commit from .fork-commit)",
               "dirty": None, "diff_sha256": None}
        try:
            origin = (Path(fork) / ".fork-origin").read_text().splitlines()[:1]
        except OSError:
            origin = []
        if origin and origin[0].strip():
            out["remote"] = public_url(origin[0])
        return out
    commit = commit or "unknown"
    dirty = bool(g("status", "--porcelain", "--untracked-files=no", "--ignore-submodules")) if commit != "unknown" else None
    diff = None
    if dirty:
        r = subprocess.run(["git", "-C", str(fork), "diff", "HEAD", "--binary"], capture_output=True)
        diff = hashlib.sha256(r.stdout).hexdigest() if r.returncode == 0 else None
    return {"commit": commit, "describe": g("log", "-1", "--format=%h %s") or "", "dirty": dirty, "diff_sha256": diff,
            "branch": g("branch", "--show-current") or None if commit != "unknown" else None,
            "remote": public_url(g("config", "--get", "remote.origin.url")) if commit != "unknown" else None}


def public_url(url: str) -> str | None:
    """A remote URL as a report may name it: any user name or token before '@' in an http(s) URL removed;
    None for ''."""
    if not url:
        return None
    return re.sub(r"^(https?://)[^/@]*@", r"\1", url.strip())


def _known(commit) -> bool:
    return bool(commit) and str(commit) != "unknown"


def source_label(commit, dirty, diff_sha256=None) -> str:
    """'69d8e4be4712', '69d8e4be4712 (dirty, diff 1a2b3c4d)' or 'unknown commit' for messages and reports."""
    if not _known(commit):
        return "unknown commit"
    extra = " (dirty" + (f", diff {diff_sha256[:8]}" if diff_sha256 else "") + ")" if dirty else ""
    return f"{str(commit)[:12]}{extra}"


def provenance_mismatch(build_meta: dict, checkout: dict) -> str | None:
    """How a checkout differs from what a build folder recorded it was built from, or None.

    Args:
        build_meta: the build's metadata (:func:`read_build_meta`): fork_commit, fork_dirty, fork_diff_sha256.
        checkout: :func:`git_state` of the checkout a command points at.
    Returns:
        None when they agree or cannot be told apart (either side's commit unknown, or a copy without
        .git whose dirty state is unknown); else a phrase such as 'another commit' or 'another diff'.
    """
    b, c = build_meta.get("fork_commit"), checkout.get("commit")
    if not (_known(b) and _known(c)):
        return None
    b, c = str(b), str(c)
    if not (b.startswith(c) or c.startswith(b)):
        return "another commit"
    bd, cd = build_meta.get("fork_dirty"), checkout.get("dirty")
    if bd is None or cd is None:
        return None
    if bool(bd) != bool(cd):
        return "uncommitted changes in the checkout" if cd else "the build had uncommitted changes the checkout lacks"
    bh, ch = build_meta.get("fork_diff_sha256"), checkout.get("diff_sha256")
    if bd and bh and ch and bh != ch:
        return "another diff"
    return None


def check_provenance(bdir: Path, fork: Path, build_meta: dict | None = None, checkout: dict | None = None) -> None:
    """Stop when the fork checkout differs from what the build folder was built from.

    Spec "Integrity of a verdict" / Provenance: a command whose checkout differs from the build never
    measures one and labels the other. Raises HarnessError with one line naming both sources and the fix.
    """
    meta = read_build_meta(bdir) if build_meta is None else build_meta
    st = git_state(fork) if checkout is None else checkout
    why = provenance_mismatch(meta, st)
    if why:
        built = source_label(meta.get("fork_commit"), meta.get("fork_dirty"), meta.get("fork_diff_sha256"))
        here = source_label(st.get("commit"), st.get("dirty"), st.get("diff_sha256"))
        raise HarnessError(
            f"build {bdir} was built from fork {built} but the checkout {fork} is at {here} ({why}): rebuild it from "
            f"this checkout (`turbo-harness build --fork-dir {fork}`, or `make build`), or point FORK_DIR at the "
            f"checkout of {str(meta.get('fork_commit'))[:12]}")


def build_identity(meta: dict) -> dict:
    """What makes two reports come from the same build: fork commit, dirty state, diff hash, CMake
    options and build folder (from a run's metadata). Reports of different identities are never merged."""
    return {k: meta.get(k) for k in ("fork_commit", "fork_dirty", "fork_diff_sha256", "cmake_options", "build_dir")}


def read_build_meta(bdir: Path) -> dict:
    """The metadata of a build folder ({} when it was not built by the harness)."""
    f = Path(bdir) / BUILD_META
    return json.loads(f.read_text()) if f.is_file() else {}


def head_commit(fork: Path) -> str:
    """The checkout's commit, cheaply (``git rev-parse HEAD``, else ``.fork-commit``), or 'unknown'."""
    fork = Path(fork)
    if (fork / ".git").exists():
        r = subprocess.run(["git", "-C", str(fork), "rev-parse", "HEAD"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    marker = fork / ".fork-commit"
    return marker.read_text().strip() or "unknown" if marker.is_file() else "unknown"
