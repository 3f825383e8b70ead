"""Replay the checks on any fork commit, and bisect a verdict change with ``git bisect run``.

Sources of a commit are exported from the fork's git (no checkout of the user's tree is touched)
into ``<cache>/<commit>/src``; builds go to ``<cache>/<commit>/build[-cuda][-clang][-addrsan]`` and are reused; only the
targets the replayed checks need are built, through ccache when it is installed. The cache is
``$TURBO_REPLAY_CACHE`` or ``.cache/replay`` in the harness checkout. A commit that does not build
with the default compiler is retried with clang when it is installed; a build that still fails is
an error naming the compiler's message, and no other cached build is touched.
"""
from __future__ import annotations

import json
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
    def rev_parse(*args):
        r = subprocess.run(["git", "-C", str(fork), "rev-parse", *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    gdir = rev_parse("--absolute-git-dir")
    # a folder without history of its own inside another repository (e.g. a source snapshot unpacked under the
    # harness checkout) must not borrow that repository's history
    top = rev_parse("--show-toplevel") if gdir and rev_parse("--is-bare-repository") != "true" else None
    own = bool(gdir) and (top is None or Path(top).resolve() == Path(fork).resolve())
    out = [gdir or ""]
    if not own:
        raise HarnessError(f"{fork} is not a git checkout of the fork: replay needs the fork's history (set FORK_DIR to "
                           f"a clone, bare or not)")
    return Path(out[0].strip())


def history_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The fork's history for replay: --fork-dir, else $FORK_DIR, else vendor/llama.cpp; a checkout or a bare
    repository (replay exports each commit's tree itself, so no work tree is needed).

    Raises:
        HarnessError: the folder holds no git history, with the fix.
    """
    given = explicit or os.environ.get("FORK_DIR")
    p = Path(given or fb.DEFAULT_FORK).resolve()
    if not p.exists():
        raise HarnessError(f"no fork history at {p}: set FORK_DIR (or --fork-dir) to a clone of the fork, bare or not")
    git_dir_of(p)
    return p


def resolve(fork: Path, rev: str) -> str:
    """Full hash of a commit. Raises HarnessError when the fork's history has no such commit."""
    r = subprocess.run(["git", "--git-dir", str(git_dir_of(fork)), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                       capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise HarnessError(f"commit {rev!r} is not in the fork's history at {fork}: give a hash or ref that "
                           f"`git -C {fork} log` shows")
    return r.stdout.strip()


def commit_root(commit: str, root: Path | None = None) -> Path:
    """Folder of one commit in the replay cache: ``<cache>/<commit>`` holding ``src/`` and ``build-<flavour>/``.

    Source and builds sit side by side so that, with ``CCACHE_BASEDIR=<cache>``, every commit compiles its files
    under the same relative paths (``../../src/...``) and ccache reuses the objects of files two commits share.
    """
    return (root or cache_root()) / commit


def export_source(fork: Path, commit: str, root: Path | None = None) -> Path:
    """Write the commit's tree (minus large model blobs) to <cache>/<commit>/src once; returns the folder."""
    dest = commit_root(commit, root) / "src"
    if (dest / ".fork-commit").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="src-tmp-", dir=dest.parent))
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


# CMake targets each check needs at a replayed commit (ggml alone for the probe checks).
MODEL_TARGETS = ("llama-perplexity", "llama-save-load-state")
SANITIZERS = {"address": "-DGGML_SANITIZE_ADDRESS=ON"}


def targets_for(checks) -> tuple[str, ...]:
    """The CMake targets a replay of these checks must build: ggml for the probe checks, plus the llama
    tools (libllama, llama-perplexity, llama-save-load-state) when the model-level check MODEL is among them."""
    out = ["ggml"]
    if any(str(c).upper() == "MODEL" for c in checks):
        out += list(MODEL_TARGETS)
    return tuple(out)


def ccache_env(root: Path) -> dict:
    """Environment for a replay build: ccache (when installed) with CCACHE_BASEDIR at the cache root, so the
    objects of unchanged files are shared between commits; {} without ccache."""
    if not shutil.which("ccache"):
        return {}
    return {"CCACHE_BASEDIR": str(Path(root).resolve()), "CCACHE_NOHASHDIR": "1"}


def _flavour(compiler: str, sanitize: str | None, backend: str = "cpu") -> str:
    return ("build" + ("" if backend == "cpu" else f"-{backend}") + ("" if compiler == "default" else f"-{compiler}")
            + (f"-{sanitize[:4]}san" if sanitize else ""))


def build_commit(fork: Path, commit: str, targets=("ggml",), log=print, root: Path | None = None,
                 sanitize: str | None = None, prefer: str | None = None, backend: str = "cpu") -> tuple[Path, Path, dict]:
    """Export and build one commit for the CPU (reusing its cached build), only the given targets.

    A commit that does not build with the default compiler is retried with clang (never edited); the
    working compiler is remembered per commit. ``sanitize='address'`` builds an AddressSanitizer flavour in
    its own folder; ``backend='cuda'`` builds the CUDA backend (``CUDA_ARCH``, e.g. 90, limits the GPU
    architectures compiled) in ``build-cuda``; ``prefer='clang'`` tries clang first (a commit known not to build with gcc). Returns (source dir, build dir, build metadata, with ``reused``: True when nothing was
    compiled). Raises HarnessError when it does not build with any available compiler; the message quotes
    the first compiler error.
    """
    root = root or cache_root()
    if sanitize and sanitize not in SANITIZERS:
        raise HarnessError(f"unknown sanitizer {sanitize!r}: use one of {', '.join(SANITIZERS)}")
    src = export_source(fork, commit, root)
    fb.require_turbo(src)
    croot = commit_root(commit, root)
    marker = croot / ("USE" + (f"-{backend}" if backend != "cpu" else "") + (f"-{sanitize}" if sanitize else ""))
    attempts = [("default", None)]
    if shutil.which("clang") and shutil.which("clang++"):
        attempts.append(("clang", {"CC": "clang", "CXX": "clang++"}))
    first = marker.read_text().strip() if marker.is_file() else prefer
    if first:  # a commit that needed the other compiler builds with it from then on
        attempts.sort(key=lambda a: a[0] != first)
    for name, _ in attempts:
        cand = croot / _flavour(name, sanitize, backend)
        meta = fb.read_build_meta(cand)
        if meta and set(targets) <= set(meta.get("targets", [])) and any((cand / "bin").glob("libggml-base.*")):
            return src, cand, dict(meta, reused=True)
    extra = ["-DLLAMA_BUILD_EXAMPLES=ON"] + ([SANITIZERS[sanitize]] if sanitize else [])
    if shutil.which("ccache"):
        extra += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    errors = []
    for name, cc in attempts:
        b = croot / _flavour(name, sanitize, backend)
        env = dict(os.environ, **ccache_env(root), **(cc or {}))
        try:
            res = fb.build(backend, list(targets), fork=src, bdir=b, log=log, env=env, extra_cmake=extra)
            marker.write_text(name)
            meta = dict(res.meta, replay_compiler=name, sanitize=sanitize, ccache=bool(shutil.which("ccache")))
            (b / fb.BUILD_META).write_text(json.dumps(meta, indent=2))
            return src, b, dict(meta, reused=False)
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


def git_subject(fork: Path, commit: str) -> str:
    """'<short hash> <subject>' of a commit of the fork's history ('' when git cannot say)."""
    return subprocess.run(["git", "--git-dir", str(git_dir_of(fork)), "log", "-1", "--format=%h %s", commit],
                          capture_output=True, text=True).stdout.strip()


def bisect_head() -> str:
    """The commit ``git bisect run`` asks its oracle about (BISECT_HEAD of the repository in $GIT_DIR)."""
    return subprocess.run(["git", "rev-parse", "BISECT_HEAD"], capture_output=True, text=True).stdout.strip()


def run_bisect(fork: Path, good: str, bad: str, oracle_for, fixed: bool = False, work: Path | None = None) -> dict:
    """Drive ``git bisect run`` between two commits of the fork with an oracle command, in a bare clone of the
    fork's history (``<cache>/bisect/repo.git``; the fork's own repository is not touched).

    Args:
        good, bad: commits (full hashes); with ``fixed`` the terms are broken (good) / fixed (bad).
        oracle_for: ``oracle_for(log_path) -> argv``: the oracle command, which appends one JSON line per commit
            it evaluates to ``log_path`` and exits as git-bisect-run expects; run again with ``--commit <parent>``
            for evidence at the parent of the first changed commit.
        work: folder for the clone and the oracle log (default ``<cache>/bisect``).
    Returns:
        {'first': first bad (or fixed) commit, 'parent': its parent, 'subject': '<hash> <subject>' of first,
        'steps': {commit: oracle record}, 'evaluated': records in order, 'log': oracle log path, 'seconds': float}.
    Raises:
        HarnessError: ``git bisect start`` failed, or the bisection did not converge (quotes git's last lines).
    """
    import time
    gd = git_dir_of(fork)
    work = Path(work or cache_root() / "bisect")
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "repo.git"
    if not repo.is_dir():
        subprocess.run(["git", "clone", "-q", "--bare", "--shared", str(gd), str(repo)], check=True)
    env = dict(os.environ, GIT_DIR=str(repo), FORK_DIR=str(fork), PYTHONPATH=str(fb.REPO_ROOT))
    logf = work / f"oracle-{int(time.time())}.jsonl"
    git = ["git", "--git-dir", str(repo)]
    subprocess.run(git + ["bisect", "reset"], capture_output=True, env=env)
    terms = ["--term-old=broken", "--term-new=fixed"] if fixed else []
    r = subprocess.run(git + ["bisect", "start", "--no-checkout", *terms, bad, good], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        raise HarnessError(f"git bisect start failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.stdout}")
    oracle = list(oracle_for(logf))
    t0 = time.time()
    r = subprocess.run(git + ["bisect", "run", *oracle], capture_output=True, text=True, env=env)
    out = r.stdout + r.stderr
    subprocess.run(git + ["bisect", "reset"], capture_output=True, env=env)
    word = "fixed" if fixed else "bad"
    first = next((ln.split()[0] for ln in out.splitlines() if f"is the first {word} commit" in ln), None)

    def records():
        return [json.loads(ln) for ln in logf.read_text().splitlines()] if logf.is_file() else []
    if not first:
        tail = [ln for ln in out.splitlines() if ln.strip()][-3:]
        raise HarnessError(f"bisect did not converge: {' / '.join(tail)} (oracle log {logf})")
    steps = records()
    parent = subprocess.run(["git", "--git-dir", str(gd), "rev-parse", f"{first}^"], capture_output=True,
                            text=True).stdout.strip()
    if parent not in {s["commit"] for s in steps}:  # evidence at the parent too
        subprocess.run([*oracle, "--commit", parent], capture_output=True, text=True, env=env)
        steps = records()
    return {"first": first, "parent": parent, "subject": git_subject(fork, first), "steps": {s["commit"]: s for s in steps},
            "evaluated": steps, "log": logf, "seconds": time.time() - t0}
