"""Finding a fork checkout, building it with CMake, and recording what was built.

Build folders live under ``build/<backend>`` of the harness checkout (or ``$TURBO_BUILD_ROOT``), one
per backend, so reruns are incremental. Each holds ``turbo-harness-build.json`` with the fork commit,
dirty state, CMake options and compiler.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.fork import backends

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FORK = REPO_ROOT / "vendor" / "llama.cpp"
BUILD_META = "turbo-harness-build.json"

# Targets each harness feature needs; only these are built.
TARGETS = {
    "checks": ["ggml"],
    "sweep": ["llama-perplexity", "llama-bench"],
    "compat": ["test-backend-ops"],
}
# Added by the --rpc build option: ggml's RPC backend (in libggml) and the fork's own server for it.
RPC_CMAKE = ["-DGGML_RPC=ON"]
RPC_TARGETS = ["rpc-server"]


def fork_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The fork checkout to use: the argument, else $FORK_DIR, else vendor/llama.cpp.

    Raises:
        HarnessError: the folder is missing or is not a ggml/llama.cpp checkout, with the fix.
    """
    given = explicit or os.environ.get("FORK_DIR")
    p = Path(given or DEFAULT_FORK).resolve()
    if not (p / "ggml" / "include" / "ggml.h").is_file():
        if given:
            raise HarnessError(f"no fork checkout at {p} (from {'--fork-dir' if explicit else 'FORK_DIR'}): "
                               f"point it at a llama.cpp fork checkout (a folder holding ggml/include/ggml.h)")
        raise HarnessError(
            f"no fork checkout at {p}: run `git submodule update --init vendor/llama.cpp` "
            f"(or see README 'Getting the fork') or set FORK_DIR to a llama.cpp fork checkout")
    return p


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
        A copy without .git has no 'branch'/'remote' keys.
    """
    def g(*args):
        r = subprocess.run(["git", "-C", str(fork), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    commit = g("rev-parse", "HEAD") if (Path(fork) / ".git").exists() else ""
    marker = Path(fork) / ".fork-commit"  # a copy without .git (e.g. carried to another machine) names its commit here
    if not commit and marker.is_file():
        return {"commit": marker.read_text().strip(), "describe": "copy without .git (commit from .fork-commit)",
                "dirty": None, "diff_sha256": None}
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


def detect_backend() -> str:
    """Backend to build for this machine: $BACKEND, else metal on macOS, cuda where nvcc exists and
    nvidia-smi lists a GPU, else cpu."""
    if os.environ.get("BACKEND"):
        return os.environ["BACKEND"].lower()
    if sys.platform == "darwin":
        return "metal"
    if (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()) and _nvidia_gpu_present():
        return "cuda"
    return "cpu"


def _nvidia_gpu_present() -> bool:
    """nvcc alone (a toolkit on a machine without a GPU) is not enough to pick CUDA: ask nvidia-smi."""
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return r.returncode == 0 and "GPU" in r.stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


def build_root() -> Path:
    """Folder holding one build folder per backend: $TURBO_BUILD_ROOT, else build/ of the harness checkout."""
    return Path(os.environ.get("TURBO_BUILD_ROOT") or (REPO_ROOT / "build"))


def build_dir(backend: str, root: Path | None = None) -> Path:
    """The build folder of one backend (``<build_root>/<backend>``); not created here."""
    return (root or build_root()) / backend


def cmake_options(backend: str, extra: list[str] | None = None) -> list[str]:
    """CMake options for a harness build of one backend (shared libs, no server, no curl)."""
    spec = backends.find(backend)
    if spec is None:
        raise HarnessError(f"unknown backend {backend!r}: use one of {backends.choices(', ')}")
    opts = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_OPENSSL=OFF"] + list(spec.cmake)
    if backend == "cuda" and os.environ.get("CUDA_ARCH"):
        opts.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CUDA_ARCH']}")
    return opts + list(extra or [])


def _compiler_version(cc: str) -> str:
    try:
        r = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=20)
        return r.stdout.splitlines()[0] if r.stdout else cc
    except (OSError, subprocess.TimeoutExpired):
        return cc


@dataclass
class BuildResult:
    backend: str
    dir: Path
    meta: dict


def build(backend: str | None = None, targets: list[str] | None = None, fork: Path | None = None,
          bdir: Path | None = None, jobs: int | None = None, extra_cmake: list[str] | None = None,
          log=print, env: dict | None = None, rpc: bool = False) -> BuildResult:
    """Configure (once) and build the given targets of the fork for one backend.

    Args:
        backend: 'cpu' | 'cuda' | 'metal' | 'vulkan' | 'hip'; default :func:`detect_backend`.
        targets: CMake targets; default all of :data:`TARGETS`.
        fork: fork checkout; default :func:`fork_dir`.
        bdir: build folder; default ``build/<backend>``.
        rpc: also build ggml's RPC backend and ``rpc-server`` (CMake ``-DGGML_RPC=ON``, :data:`RPC_CMAKE`), so
            that remote devices can be checked (``--rpc HOST:PORT``). Whether a build has it is recorded as
            ``rpc`` in the metadata, read from the build's CMakeCache.txt (a folder configured with RPC earlier
            keeps it).

    Returns:
        BuildResult with the metadata written to ``<bdir>/turbo-harness-build.json``.

    Raises:
        HarnessError: missing cmake, configure or build failure (message names the log file).
    """
    backend = backend or detect_backend()
    fork = fork or fork_dir()
    require_turbo(fork)
    bdir = Path(bdir or build_dir(backend))
    bdir.mkdir(parents=True, exist_ok=True)
    if not shutil.which("cmake"):
        raise HarnessError("cmake not found: install it (apt-get install cmake, or pip install cmake)")
    targets = targets or sorted({t for ts in TARGETS.values() for t in ts})
    if rpc:
        targets = list(dict.fromkeys([*targets, *RPC_TARGETS]))
    opts = cmake_options(backend, [*(RPC_CMAKE if rpc else []), *(extra_cmake or [])])
    jobs = jobs or os.cpu_count() or 2
    logf = bdir / "turbo-harness-build.log"
    source = git_state(fork)  # what is compiled: the checkout as the build starts (recorded for provenance)
    t0 = time.time()
    with open(logf, "a") as lf:
        lf.write(f"\n=== {time.ctime()} configure {backend} {opts}\n")
        lf.flush()
        r = subprocess.run(["cmake", "-S", str(fork), "-B", str(bdir), *opts], stdout=lf, stderr=subprocess.STDOUT, env=env)
        if r.returncode != 0:
            raise HarnessError(f"CMake configure of {fork} for {backend} failed: {_cmake_error(logf)} (full log: {logf})")
        for tgt in targets:
            log(f"building {tgt} ({backend}) ...")
            lf.write(f"\n=== build {tgt}\n")
            lf.flush()
            r = subprocess.run(["cmake", "--build", str(bdir), "-j", str(jobs), "--target", tgt],
                               stdout=lf, stderr=subprocess.STDOUT, env=env)
            if r.returncode != 0:
                tail = _tail_errors(logf)
                raise HarnessError(f"building {tgt} for {backend} failed: {tail} (full log: {logf})")
    cache = _read_cmake_cache(bdir)
    meta = {
        "backend": backend,
        "fork_dir": str(fork),
        **{f"fork_{k}": v for k, v in source.items()},
        "cmake_options": opts,
        "c_compiler": _compiler_version(cache.get("CMAKE_C_COMPILER", "cc")),
        "cxx_compiler": _compiler_version(cache.get("CMAKE_CXX_COMPILER", "c++")),
        "cuda_compiler": _compiler_version(cache["CMAKE_CUDA_COMPILER"]) if cache.get("CMAKE_CUDA_COMPILER") else None,
        "targets": sorted(set(targets) | set(read_build_meta(bdir).get("targets", []))),
        "rpc": cache.get("GGML_RPC", "OFF").upper() in ("ON", "1", "TRUE", "YES"),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.time() - t0, 1),
        "machine": platform.machine(),
    }
    (bdir / BUILD_META).write_text(json.dumps(meta, indent=2))
    return BuildResult(backend, bdir, meta)


def _cmake_error(logf: Path) -> str:
    """The first 'CMake Error' message of the last configure in a log, with its next line."""
    lines = logf.read_text(errors="replace").split("=== ")[-1].splitlines()
    for i, ln in enumerate(lines):
        if "CMake Error" in ln:
            nxt = next((x.strip() for x in lines[i + 1:i + 4] if x.strip()), "")
            return f"{ln.strip()} {nxt}"[:300]
    return "see the log"


def _tail_errors(logf: Path) -> str:
    lines = logf.read_text(errors="replace").splitlines()
    errs = [ln.strip() for ln in lines if "error" in ln.lower()]
    return (errs[0] if errs else (lines[-1] if lines else "no output"))[:300]


def _read_cmake_cache(bdir: Path) -> dict:
    out = {}
    f = bdir / "CMakeCache.txt"
    if f.is_file():
        for ln in f.read_text(errors="replace").splitlines():
            m = re.match(r"^([A-Za-z0-9_]+):[A-Z]+=(.*)$", ln)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def read_build_meta(bdir: Path) -> dict:
    """The metadata of a build folder ({} when it was not built by the harness)."""
    f = Path(bdir) / BUILD_META
    return json.loads(f.read_text()) if f.is_file() else {}


def binary(bdir: Path, name: str) -> Path:
    """Path of a built tool. Raises HarnessError naming the make target when it is missing."""
    p = Path(bdir) / "bin" / name
    if not p.is_file():
        raise HarnessError(f"{name} is not built in {bdir}: run `make build` (or `turbo-harness build --targets {name}`)")
    return p


def has_rpc(bdir: Path) -> bool:
    """True when a build folder was configured with ggml's RPC backend (GGML_RPC=ON in its CMakeCache.txt)."""
    return _read_cmake_cache(Path(bdir)).get("GGML_RPC", "OFF").upper() in ("ON", "1", "TRUE", "YES")


def find_build(backend: str | None = None) -> Path:
    """The build folder for a backend that holds the ggml shared libraries.

    Raises:
        HarnessError: nothing built yet, with the command that builds it.
    """
    backend = backend or detect_backend()
    bdir = build_dir(backend)
    if not any((bdir / "bin").glob("libggml-base.*")):
        raise HarnessError(f"the fork is not built for {backend} in {bdir}: run `make build` (BACKEND={backend})")
    return bdir
