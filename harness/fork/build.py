"""Finding a fork checkout, building it with CMake (only what a command needs), and recording what was built.

Build folders live under ``build/`` of the harness checkout (or ``$TURBO_BUILD_ROOT``). The first fork built for a
backend gets ``build/<backend>``; another checkout gets ``build/<backend>-<folder name>-<path hash>``
(:func:`build_dir`), so a second fork never rebuilds the first and switching back reuses it. Each folder holds ``turbo-harness-build.json`` with the fork commit, dirty
state, CMake options and compiler (:mod:`harness.fork.provenance`).

What is built: ``verify`` needs ggml, ``test-backend-ops`` and the probe (:data:`CORE_TARGETS`); the llama tools
(``llama-perplexity``, ``llama-bench``, libllama) and ``rpc-server`` are built the first time a command asks for
them (:func:`ensure_built`, called by :func:`binary`). New folders use Ninja when installed and ccache when
installed (``TURBO_CCACHE=0`` turns it off); a build prints progress at least every 30 s
(:mod:`harness.fork.progress`).
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
from harness.fork.cmake_util import (ccache_env, cmake_error, compiler_version, read_cmake_cache,  # noqa: F401
                                     tail_errors, launcher_options)
from harness.fork.provenance import (BUILD_META, build_identity, check_provenance, git_state, has_turbo_types,  # noqa: F401
                                     head_commit, provenance_mismatch, public_url, read_build_meta, require_turbo,
                                     source_label)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FORK = REPO_ROOT / "vendor" / "llama.cpp"

# What each harness feature needs; a command builds only its own (issue 23: verify does not wait for llama-bench).
CORE_TARGETS = ["ggml", "test-backend-ops"]  # verify: the probe links ggml; COMPAT runs test-backend-ops
TARGETS = {
    "checks": ["ggml"],
    "compat": ["test-backend-ops"],
    "sweep": ["llama-perplexity", "llama-bench"],
    "llama": ["llama"],  # libllama: the K/V capture and greedy-decode tools link it
}
ALL_TARGETS = sorted({t for ts in TARGETS.values() for t in ts})
# Added by the --rpc build option: ggml's RPC backend (in libggml) and the fork's own server for it.
RPC_CMAKE = ["-DGGML_RPC=ON"]
RPC_TARGETS = ["rpc-server"]


def fork_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The fork checkout to use: the argument, else $FORK_DIR, else a vendor/llama.cpp checkout, else the unpacked
    snapshot remembered in .cache/fork-dir, else a snapshot in ../shared/forks (hash checked, unpacked once):
    :func:`harness.fork.locate.locate`, the one discovery every command, the Makefile, doctor and CI use.

    Raises:
        HarnessError: the folder given is not a ggml/llama.cpp checkout, or nothing is found, with what works.
    """
    from harness.fork.locate import locate
    return locate(explicit).path


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


def machine_can_build(backend: str) -> bool:
    """Whether this machine can build and run ``backend`` (as :func:`detect_backend` decides it): the CPU and Vulkan
    anywhere (Mesa's lavapipe is a software Vulkan device the build installs), CUDA where nvcc exists and
    nvidia-smi lists a GPU, Metal on macOS, HIP where ROCm's hipcc is installed."""
    if backend in ("cpu", "vulkan"):
        return True
    if backend == "cuda":
        return bool(shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()) and _nvidia_gpu_present()
    if backend == "metal":
        return sys.platform == "darwin"
    if backend == "hip":
        return bool(shutil.which("hipcc") or Path("/opt/rocm/bin/hipcc").exists())
    return False


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


def source_key(fork: Path) -> str:
    """'llama.cpp-3fa2c1': the checkout folder's name and a hash of its resolved path: names the build folder of a
    checkout that is not the backend's first (:func:`build_dir`)."""
    fork = Path(fork).resolve()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", fork.name)[:40] or "fork"
    return f"{name}-{hashlib.sha256(str(fork).encode()).hexdigest()[:6]}"


def _built_from(bdir: Path) -> str | None:
    """The source folder a build folder was configured from: its record, else its CMakeCache (a build that has not
    finished yet has no record); None for an empty folder."""
    meta = read_build_meta(bdir)
    if meta.get("fork_dir"):
        return str(Path(meta["fork_dir"]).resolve())
    home = read_cmake_cache(bdir).get("CMAKE_HOME_DIRECTORY")
    return str(Path(home).resolve()) if home else None


def build_dir(backend: str, root: Path | None = None, fork: Path | None = None) -> Path:
    """The build folder of one backend for one fork checkout; not created here.

    ``<root>/<backend>`` (the historical name) when it is empty or was built from this checkout folder; else
    ``<root>/<backend>-<source_key>`` (:func:`source_key`): a second fork (another checkout) never rebuilds the first,
    while one checkout that moves to another commit or carries edits rebuilds its own folder incrementally (the build
    records what it was built from; a command whose checkout differs from that record rebuilds or stops).
    Without ``fork`` the checkout is found as every command finds it (:mod:`harness.fork.locate`, without unpacking a
    snapshot); when there is none, ``<root>/<backend>``.

    Args:
        backend: 'cpu' | 'cuda' | ...; root: default :func:`build_root`; fork: the checkout.
    """
    root = Path(root or build_root())
    legacy = root / backend
    if fork is None:
        from harness.fork.locate import locate
        try:
            fork = locate(unpack=False).path
        except HarnessError:
            return legacy
    fork = Path(fork).resolve()
    src = _built_from(legacy)
    if src is None or src == str(fork):
        return legacy
    return root / f"{backend}-{source_key(fork)}"


def cmake_options(backend: str, extra: list[str] | None = None) -> list[str]:
    """CMake options for a harness build of one backend (shared libs, no server, no curl); these are recorded with
    the build (the compiler launcher, which does not change what is built, is added by :func:`build` apart)."""
    spec = backends.find(backend)
    if spec is None:
        raise HarnessError(f"unknown backend {backend!r}: use one of {backends.choices(', ')}")
    opts = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_OPENSSL=OFF"] + list(spec.cmake)
    if backend == "cuda" and os.environ.get("CUDA_ARCH"):
        opts.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CUDA_ARCH']}")
    return opts + list(extra or [])


@dataclass
class BuildResult:
    backend: str
    dir: Path
    meta: dict


def build(backend: str | None = None, targets: list[str] | None = None, fork: Path | None = None,
          bdir: Path | None = None, jobs: int | None = None, extra_cmake: list[str] | None = None,
          log=print, env: dict | None = None, rpc: bool = False) -> BuildResult:
    """Configure and build the given targets of the fork for one backend (incremental in an existing folder).

    Args:
        backend: 'cpu' | 'cuda' | 'metal' | 'vulkan' | 'hip'; default :func:`detect_backend`.
        targets: CMake targets; default :data:`CORE_TARGETS` (what ``verify`` needs); ``['all']``: every target the
            harness uses (:data:`ALL_TARGETS`).
        fork: fork checkout; default :func:`fork_dir`.
        bdir: build folder; default :func:`build_dir` of this backend and checkout.
        rpc: also build ggml's RPC backend and ``rpc-server`` (CMake ``-DGGML_RPC=ON``, :data:`RPC_CMAKE`), so
            that remote devices can be checked (``--rpc HOST:PORT``). Whether a build has it is recorded as
            ``rpc`` in the metadata, read from the build's CMakeCache.txt (a folder configured with RPC earlier
            keeps it).
        log: called with one line per target and a progress line at least every 30 s.

    Returns:
        BuildResult with the metadata written to ``<bdir>/turbo-harness-build.json``.

    Raises:
        HarnessError: missing cmake, configure or build failure (message names the log file).
    """
    backend = backend or detect_backend()
    fork = Path(fork or fork_dir())
    require_turbo(fork)
    bdir = Path(bdir or build_dir(backend, fork=fork))
    bdir.mkdir(parents=True, exist_ok=True)
    if not shutil.which("cmake"):
        raise HarnessError("cmake not found: install it (apt-get install cmake, or pip install cmake)")
    targets = ALL_TARGETS if targets in (["all"], ("all",)) else list(targets or CORE_TARGETS)
    if rpc:
        targets = list(dict.fromkeys([*targets, *RPC_TARGETS]))
    opts = cmake_options(backend, [*(RPC_CMAKE if rpc else []), *(extra_cmake or [])])
    extra_meta = {}
    if backend == "vulkan":  # packages, and headers new enough for the fork (fetched into .cache/ when the system's are old)
        from harness.fork import vulkan
        vk_cmake, vk_env, extra_meta["vulkan"] = vulkan.prepare_build(log, fork=fork, bdir=bdir)
        opts += vk_cmake
        env = {**(env or os.environ), **vk_env}
    existing = read_cmake_cache(bdir)
    # ccache and Ninja for a new folder; a folder configured before keeps its generator (CMake cannot change it) and
    # gets no launcher it did not have (a changed compile command would make Ninja recompile everything)
    launch = launcher_options(backend, opts) if not existing or existing.get("CMAKE_C_COMPILER_LAUNCHER") else []
    gen = ["-G", "Ninja"] if shutil.which("ninja") and not existing else []
    env = ccache_env(dict(env or os.environ), fork, bdir) if launch else env
    logf = bdir / "turbo-harness-build.log"
    source = git_state(fork)  # what is compiled: the checkout as the build starts (recorded for provenance)
    t0 = time.time()
    configure = [*opts, *launch]
    prev = read_build_meta(bdir)
    # configured before with the same options from the same folder: the build tool re-runs CMake itself when a
    # CMakeLists.txt changes, so only a new folder or new options need the (10-20 s) configure step
    if not ((bdir / "CMakeCache.txt").is_file() and prev.get("configured_with") == configure
            and prev.get("fork_dir") == str(fork)):
        with open(logf, "a") as lf:
            lf.write(f"\n=== {time.ctime()} configure {backend} {configure}\n")
            lf.flush()
            r = subprocess.run(["cmake", "-S", str(fork), "-B", str(bdir), *gen, *configure], stdout=lf,
                               stderr=subprocess.STDOUT, env=env)
            if r.returncode != 0:
                raise HarnessError(f"CMake configure of {fork} for {backend} failed: {cmake_error(logf)} "
                                   f"(full log: {logf})")
    again = _stale_targets(prev, source, fork, configure, targets)
    if again:
        log(f"{bdir} holds {', '.join(again)} built from {source_label(prev.get('fork_commit'), prev.get('fork_dirty'), prev.get('fork_diff_sha256'))}"
            f" or with other options: rebuilt too (the build's record names one source for all its tools)")
    _build_targets(bdir, fork, backend, targets + again, jobs, env, log)
    if backend == "vulkan":  # what was compiled, from the generated header (the record says which sets were left out)
        from harness.fork.vulkan_shaders import shader_variants
        extra_meta["vulkan"]["shaders"]["variants"] = shader_variants(bdir)
    cache = read_cmake_cache(bdir)
    meta = {
        "backend": backend,
        "fork_dir": str(fork),
        **{f"fork_{k}": v for k, v in source.items()},
        "cmake_options": opts,
        "configured_with": configure,
        "c_compiler": compiler_version(cache.get("CMAKE_C_COMPILER", "cc")),
        "cxx_compiler": compiler_version(cache.get("CMAKE_CXX_COMPILER", "c++")),
        "cuda_compiler": compiler_version(cache["CMAKE_CUDA_COMPILER"]) if cache.get("CMAKE_CUDA_COMPILER") else None,
        "targets": sorted(set(targets) | set(again) | set(read_build_meta(bdir).get("targets", []))),
        "rpc": cache.get("GGML_RPC", "OFF").upper() in ("ON", "1", "TRUE", "YES"),
        "ccache": bool(launch) or any("ccache" in o for o in opts),
        "generator": cache.get("CMAKE_GENERATOR"),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.time() - t0, 1),
        "machine": platform.machine(),
        **extra_meta,
    }
    (bdir / BUILD_META).write_text(json.dumps(meta, indent=2))
    return BuildResult(backend, bdir, meta)


def _stale_targets(prev: dict, source: dict, fork: Path, configure: list[str], targets: list[str]) -> list[str]:
    """Targets an earlier build of the folder made (``prev['targets']``) that this build does not ask for, when the
    folder's record is about to name another source: another checkout folder, commit, dirty state or diff, an unknown
    commit (nothing tells it is the same), or other configure options. Left as they were, a tool built from the old
    source (``llama-perplexity``, libllama) would be measured under the new record's name."""
    rest = [t for t in prev.get("targets", []) if t not in targets]
    if not rest:
        return []
    same = (prev.get("fork_dir") == str(fork) and prev.get("configured_with") == configure
            and all(str(prev.get(f"fork_{k}")) == str(source.get(k)) for k in ("commit", "dirty", "diff_sha256"))
            and str(source.get("commit") or "unknown") != "unknown")
    return [] if same else rest


def _build_targets(bdir: Path, fork: Path, backend: str, targets: list[str], jobs: int | None, env: dict | None,
                   log) -> None:
    """Build the targets: test-backend-ops compiled against ggml alone when its source allows
    (:mod:`harness.fork.standalone`; ``TURBO_BACKEND_OPS_CMAKE=1`` uses the CMake target), the rest through CMake."""
    from harness.fork import standalone
    alone = ("test-backend-ops" in targets and os.environ.get("TURBO_BACKEND_OPS_CMAKE") != "1"
             and standalone.ggml_only(fork))
    cm = [t for t in targets if not (alone and t == "test-backend-ops")]
    if alone and "ggml" not in cm:
        cm.insert(0, "ggml")
    if alone:  # its object compiles beside the CMake build; the link follows it
        standalone.build_backend_ops(fork, bdir, log, env, cxx=read_cmake_cache(bdir).get("CMAKE_CXX_COMPILER"),
                                     during=lambda: _compile(bdir, backend, cm, jobs, env, log))
    else:
        _compile(bdir, backend, cm, jobs, env, log)


def _compile(bdir: Path, backend: str, targets: list[str], jobs: int | None, env: dict | None, log) -> None:
    """``cmake --build`` the targets in one call (the build tool then overlaps them: test-backend-ops' one large
    file compiles beside ggml's), with a progress line at least every 30 s; HarnessError on failure."""
    from harness.fork.progress import run_with_progress
    jobs = jobs or os.cpu_count() or 2
    logf = bdir / "turbo-harness-build.log"
    what = ", ".join(targets)
    with open(logf, "a") as lf:
        log(f"building {what} ({backend}) ...")
        lf.write(f"\n=== build {what}\n")
        lf.flush()
        cmd = ["cmake", "--build", str(bdir), "-j", str(jobs), *[a for t in targets for a in ("--target", t)]]
        rc, prog, secs = run_with_progress(cmd, what, lf, log, env=env)
        if rc != 0:
            raise HarnessError(f"building {what} for {backend} failed: {tail_errors(logf)} (full log: {logf})")
        if secs >= 30:
            log(f"  built {what} in {secs:.0f} s ({prog.describe()})")


# What needs a tool the first time (named in the one line that says it is being built).
NEEDED_BY = {"llama-perplexity": "sweep and MODEL", "llama-bench": "sweep", "llama": "the K/V capture and decode tools",
             "rpc-server": "--rpc-local", "test-backend-ops": "COMPAT"}


def ensure_built(bdir: Path, names: list[str], log=None) -> None:
    """Build the targets among ``names`` that a harness build folder lacks, from the checkout it was built from, with
    the options it was configured with (a tool built the first time a command needs it; one line says so).

    ``names`` are binaries in ``bin/`` ('llama-perplexity'), or 'llama' for libllama. Nothing happens when all exist.

    Raises:
        HarnessError: the folder was not made by the harness (no record of its source), its source is gone or has
            moved to another commit or diff (a tool built from it would not be what the report names), a
            ``rpc-server`` is asked of a build without ggml RPC, or the build fails.
    """
    bdir = Path(bdir)
    missing = [n for n in names if not _has_output(bdir, n)]
    if not missing:
        return
    meta = read_build_meta(bdir)
    fork = Path(meta.get("fork_dir") or "/nonexistent")
    what = ", ".join(missing)
    if not meta or not (fork / "ggml" / "include" / "ggml.h").is_file():
        raise HarnessError(f"{what} is not built in {bdir}, and the folder does not record a fork checkout to build it "
                           f"from: run `turbo-harness build --targets {','.join(missing)}` (or `make build TARGETS=all`)")
    if any(n in RPC_TARGETS for n in missing) and not has_rpc(bdir):
        raise HarnessError(f"rpc-server needs a build with ggml's RPC backend, and {bdir} has none: rebuild it with "
                           f"`turbo-harness build --rpc` (or `make build RPC=1`)")
    check_provenance(bdir, fork, meta)
    log = log or (lambda s: print(s, file=sys.stderr))
    why = "; ".join(f"{n} for {NEEDED_BY[n]}" for n in missing if n in NEEDED_BY)
    log(f"building {what} in {bdir} the first time it is needed ({why or 'asked for'}; later runs reuse it) ...")
    env = ccache_env(dict(os.environ), fork, bdir) if meta.get("ccache") else None
    _build_targets(bdir, fork, meta.get("backend", "cpu"), missing, None, env, log)
    meta["targets"] = sorted(set(meta.get("targets", [])) | set(missing))
    (bdir / BUILD_META).write_text(json.dumps(meta, indent=2))


def _has_output(bdir: Path, name: str) -> bool:
    if name == "llama":
        return any((bdir / "bin").glob("libllama.*"))
    if name == "ggml":
        return any((bdir / "bin").glob("libggml-base.*"))
    return (bdir / "bin" / name).is_file()


def binary(bdir: Path, name: str, build_missing: bool = True) -> Path:
    """Path of a built tool, built first when missing and the folder records its fork checkout
    (:func:`ensure_built`). Raises HarnessError naming the command that builds it when it cannot be had."""
    p = Path(bdir) / "bin" / name
    if not p.is_file() and build_missing and read_build_meta(Path(bdir)):
        ensure_built(Path(bdir), [name])
    if not p.is_file():
        raise HarnessError(f"{name} is not built in {bdir}: run `make build TARGETS=all` (or `turbo-harness build "
                           f"--targets {name}`)")
    return p


def has_rpc(bdir: Path) -> bool:
    """True when a build folder was configured with ggml's RPC backend (GGML_RPC=ON in its CMakeCache.txt)."""
    return read_cmake_cache(Path(bdir)).get("GGML_RPC", "OFF").upper() in ("ON", "1", "TRUE", "YES")


def find_build(backend: str | None = None, fork: Path | None = None) -> Path:
    """The build folder for a backend and fork checkout (:func:`build_dir`) that holds the ggml shared libraries.

    Raises:
        HarnessError: nothing built yet, with the command that builds it.
    """
    backend = backend or detect_backend()
    bdir = build_dir(backend, fork=fork)
    if not any((bdir / "bin").glob("libggml-base.*")):
        if not machine_can_build(backend):  # as --target says it: what the backend needs, where to build it
            from harness.usage import backend_fix
            raise HarnessError(f"the fork is not built for {backend} in {bdir}, and this machine cannot build or run "
                               f"it: {backend_fix(backend)}")
        raise HarnessError(f"the fork is not built for {backend} in {bdir}: run `make build` (BACKEND={backend})")
    return bdir
