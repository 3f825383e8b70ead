"""Replay the checks on any fork commit, and bisect a verdict change with ``git bisect run``.

Sources of a commit are exported from the fork's git, or unpacked from a folder of exported tarballs on a machine
without git (:mod:`harness.replay_src`; no checkout of the user's tree is touched), into ``<cache>/<commit>/src``;
builds go to ``<cache>/<commit>/build[-cuda][-clang][-addrsan]`` and are reused when the build recorded there is of
that commit; only the targets the replayed checks need are built, through ccache when it is installed (or, with
``one_tree``, in one source tree per flavour that is synced from commit to commit). The cache is
``$TURBO_REPLAY_CACHE`` or ``.cache/replay`` in the harness checkout. A commit that does not build
with the default compiler is retried with clang when it is installed; a build that still fails is
an error naming the compiler's message, and no other cached build is touched.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

from harness.errors import HarnessError
from harness.fork import build as fb
from harness import replay_src as rs
from harness.replay_src import git_dir_of, git_subject, history_dir, resolve  # noqa: F401 (the replay API)

CATALOGUE = fb.REPO_ROOT / "checks" / "replays.toml"


def cache_root() -> Path:
    """Replay cache: $TURBO_REPLAY_CACHE, else .cache/replay of the harness checkout (src/ and build/ per commit)."""
    return Path(os.environ.get("TURBO_REPLAY_CACHE") or (fb.REPO_ROOT / ".cache" / "replay"))


def commit_root(commit: str, root: Path | None = None) -> Path:
    """Folder of one commit in the replay cache: ``<cache>/<commit>`` holding ``src/`` and ``build-<flavour>/``.

    Source and builds sit side by side so that, with ``CCACHE_BASEDIR=<cache>``, every commit compiles its files
    under the same relative paths (``../../src/...``) and ccache reuses the objects of files two commits share.
    """
    return (root or cache_root()) / commit


def export_source(fork: Path, commit: str, root: Path | None = None) -> Path:
    """Write the commit's tree (minus large model blobs) to <cache>/<commit>/src once; returns the folder. The tree
    comes from the fork's git history or from a sources folder (:mod:`harness.replay_src`)."""
    return rs.export_source(fork, commit, commit_root(commit, root) / "src")


# CMake targets each check needs at a replayed commit (ggml alone for the probe checks).
MODEL_TARGETS = ("llama-perplexity", "llama-save-load-state")
SANITIZERS = {"address": "-DGGML_SANITIZE_ADDRESS=ON"}
# configure options of a replay build: a unit-level replay (the probe checks) configures ggml and libllama's folder
# only, without the tests, examples, tools and common library (less to configure; the target built is ggml, i.e.
# ggml-base + ggml-cpu [+ the GPU backend]); a model-level one (MODEL) adds what its tools need. The flags ggml is
# compiled with are the same either way, so a folder configured for one is reused by the other.
UNIT_CMAKE = ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
              "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF"]
MODEL_CMAKE = ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TOOLS=ON",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=ON"]


def targets_for(checks, options: dict | None = None) -> tuple[str, ...]:
    """The CMake targets a replay of these checks must build: ggml for the probe checks, plus, for the model-level
    check MODEL, libllama's tools: llama-save-load-state unless its options say ``state = false`` and
    llama-perplexity unless ``ppl = false`` (``options``: {check id: {option: value}}, a catalogue entry's)."""
    out = ["ggml"]
    if any(str(c).upper() == "MODEL" for c in checks):
        o = (options or {}).get("MODEL", {})
        out += [t for t, key in zip(MODEL_TARGETS, ("ppl", "state")) if o.get(key, True) is not False]
    return tuple(out)


def build_env(root: Path) -> dict:
    """Environment for a replay build. ccache (when installed) with CCACHE_BASEDIR at the cache root, so that the
    objects of files two commits share are reused (every commit compiles them under the same relative paths). Git
    is kept from seeing any repository around the exported tree (GIT_CEILING_DIRECTORIES at the cache root, no
    GIT_DIR of a bisection): the fork's CMake would otherwise stamp the enclosing repository's commit into ggml
    (GGML_COMMIT), which differs from the replayed commit and changes with every commit of that repository."""
    env = rs.git_env()
    env["GIT_CEILING_DIRECTORIES"] = str(Path(root).resolve())
    if shutil.which("ccache"):
        env.update(CCACHE_BASEDIR=str(Path(root).resolve()), CCACHE_NOHASHDIR="1")
    return env


def _flavour(compiler: str, sanitize: str | None, backend: str = "cpu") -> str:
    return ("build" + ("" if backend == "cpu" else f"-{backend}") + ("" if compiler == "default" else f"-{compiler}")
            + (f"-{sanitize[:4]}san" if sanitize else ""))


def _reusable(bdir: Path, commit: str, targets) -> dict | None:
    """The build metadata of ``bdir`` when it is a build of ``commit`` holding every target (provenance: the commit
    recorded with the build, not the folder's name), else None."""
    meta = fb.read_build_meta(bdir)
    if not meta or meta.get("fork_commit") != commit or not set(targets) <= set(meta.get("targets", [])):
        return None
    return meta if any((bdir / "bin").glob("libggml-base.*")) else None


def build_commit(fork: Path, commit: str, targets=("ggml",), log=print, root: Path | None = None,
                 sanitize: str | None = None, prefer: str | None = None, backend: str = "cpu",
                 one_tree: bool = False) -> tuple[Path, Path, dict]:
    """Export and build one commit (reusing a build of the same commit, flavour and compiler), only the given targets.

    A commit that does not build with the default compiler is retried with clang (never edited); the
    working compiler is remembered per commit. ``sanitize='address'`` builds an AddressSanitizer flavour in
    its own folder; ``backend='cuda'`` builds the CUDA backend (``CUDA_ARCH``, e.g. 90, limits the GPU
    architectures compiled) in ``build-cuda``; ``prefer='clang'`` tries clang first (a commit known not to build
    with gcc). ``one_tree``: build every commit in one source folder and one build folder per flavour
    (``<cache>/tree-<flavour>/src`` and ``build``), synced to the commit file by file, so that the build tool recompiles only the files that
    differ from the commit built there before (for machines without ccache; a switch back rebuilds those files).

    Returns (source dir, build dir, build metadata, with ``reused``: True when nothing was compiled, and for a
    new build ``build_seconds`` (wall) and ``build_cpu_seconds`` (user + system time of the compilers: what the
    build costs on an idle machine, whatever the load)). Raises HarnessError when it does not build with any
    available compiler; the message quotes the first compiler error.
    """
    import resource
    import time
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
    def dirs(name):  # (source, build) of one compiler's flavour
        if not one_tree:
            return src, croot / _flavour(name, sanitize, backend)
        base = root / ("tree-" + _flavour(name, sanitize, backend))
        return base / "src", base / "build"

    def holds(tree: Path) -> bool:
        return (tree / ".fork-commit").is_file() and (tree / ".fork-commit").read_text().strip() == commit
    for name, _ in attempts:
        s, b = dirs(name)
        meta = _reusable(b, commit, targets)
        if meta and holds(s):
            return s, b, dict(meta, reused=True)
    model = any(t in MODEL_TARGETS for t in targets)
    errors = []
    for name, cc in attempts:
        s, b = dirs(name)
        if one_tree:
            s.mkdir(parents=True, exist_ok=True)
            st = rs.sync_tree(src, s)
            if st["added"] or st["removed"]:  # files appeared or went: CMake's globs must be evaluated again
                (s / "CMakeLists.txt").touch()
            log(f"one tree: {s} now {commit[:12]}: {st['changed']} files changed, {st['added']} added, "
                f"{st['removed']} removed")
        prev = fb.read_build_meta(b).get("configured_with", [])
        extra = (MODEL_CMAKE if model or "-DLLAMA_BUILD_TOOLS=ON" in prev else UNIT_CMAKE) + \
            ([SANITIZERS[sanitize]] if sanitize else [])
        env = dict(build_env(root), **(cc or {}))
        r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
        try:
            res = fb.build(backend, list(targets), fork=s, bdir=b, log=log, env=env, extra_cmake=extra)
        except HarnessError as e:
            errors.append(f"{name}: {e}")
            log(f"build of {commit[:12]} with the {name} compiler failed")
            continue
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(name)
        meta = dict(res.meta, replay_compiler=name, sanitize=sanitize, ccache=bool(shutil.which("ccache")),
                    one_tree=one_tree, build_seconds=round(time.time() - t0, 1),
                    build_cpu_seconds=round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1))
        if one_tree:  # what this build made for this commit: tools built for another commit are stale now
            meta["targets"] = sorted(set(targets))
        (b / fb.BUILD_META).write_text(json.dumps(meta, indent=2))
        return s, b, dict(meta, reused=False)
    raise HarnessError(f"{commit[:12]} does not build: " + " | ".join(errors))


def load_catalogue(path: Path | None = None) -> list[dict]:
    """Replay catalogue entries from checks/replays.toml (each: id, fix, parent, check, types, expectations)."""
    p = Path(path or CATALOGUE)
    if not p.is_file():
        raise HarnessError(f"replay catalogue {p} not found")
    return tomllib.loads(p.read_text()).get("replay", [])


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
