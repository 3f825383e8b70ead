"""Driving the model-level sweep: one f16-KV baseline, then per K/V pair one ``llama-perplexity
--kl-divergence`` run and one ``llama-bench`` run, each cached on disk as soon as it finishes.

Cache layout (``$TURBO_SWEEP_CACHE`` or ``<repo>/.cache/sweep``)::

    jobs/<key>.json        one finished job (kind, pair, parsed numbers, evidence file names)
    ev/<key>/...           the job's command line, stdout and stderr (evidence)
    base/<key>.kld         the f16 logits baseline (``--kl-divergence-base``), shared by all pairs

``key`` is the SHA-256 of (fork commit + dirty diff, build options and binary identity, model SHA-256,
corpus SHA-256, ctx, chunks, pair, environment, batch layout, threads, offload, bench settings), so a
rerun reuses finished jobs, an interrupted sweep resumes, and ``fresh=True`` ignores (and overwrites)
them. Failed jobs are never cached: a rerun retries them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from harness.errors import HarnessError
from harness.fork.build import REPO_ROOT, binary, git_state, read_build_meta
from harness.interrupt import Interrupted, raise_if_pending
from harness.runners.ggml_types import type_traits
from harness.runners.inputs import ModelInfo, check_corpus, read_model_info, sha256_file
from harness.runners.llama_logs import (kld_chunks_done, last_bench_progress, parse_bench_json, parse_bench_json_partial,
                                        parse_final_ppl, parse_kld_stats, parse_kv_log, parse_kv_logs)
from harness.runners.tools import ToolResult, error_line, run_tool

PINNED_ENV = {"TURBO_AUTO_ASYMMETRIC": "0", "TURBO_LAYER_ADAPTIVE": "0", "TURBO_SPARSE_V": "0"}

DEFAULT_PAIRS = ("f16/f16,q8_0/q8_0,q4_0/q4_0,q4_0/q4_0+rot,turbo4/turbo4,turbo3/turbo3,turbo2/turbo2,"
                 "q8_0/turbo4,q8_0/turbo3,turbo4/q8_0")

# Defaults sized so the whole default sweep takes ~10-15 min on a 2-core CPU (turbo KV on CPU is
# 3-25x slower than f16), and a GPU sweep gets enough tokens for tight paired statistics.
CPU_DEFAULTS = {"ctx": 256, "chunks": 8, "depths": (0, 256), "reps": 3, "n_prompt": 64, "n_gen": 16, "timeout": 900}
GPU_DEFAULTS = {"ctx": 512, "chunks": 64, "depths": (0, 2048, 8192), "reps": 5, "n_prompt": 512, "n_gen": 128,
                "timeout": 1800}


# The pairs the sweep's rules need (spec "Model-level sweeps"): f16/f16 calibrates the KLD noise floor against the
# f16 baseline, q8_0/q8_0 is what every pair's PPL and prefill speed are judged against.
BASELINE_PAIRS = (("f16", "f16"), ("q8_0", "q8_0"))


def with_baselines(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """The pairs with the missing :data:`BASELINE_PAIRS` put in front, and the labels of those added.

    Without q8_0/q8_0 no pair can be judged (the rules compare with q8_0) and the sweep would be SKIP
    ("nothing judged"); without f16/f16 KLD has no noise floor. ``--no-baselines`` skips this.
    """
    missing = [p for p in BASELINE_PAIRS if p not in pairs]
    return missing + [p for p in pairs], [pair_label(k, v) for k, v in missing]


def parse_pairs(spec: str) -> list[tuple[str, str]]:
    """'f16/f16,q8_0,q8_0/turbo3' -> [('f16','f16'), ('q8_0','q8_0'), ('q8_0','turbo3')].

    A single name means a symmetric pair. Raises HarnessError on an empty spec or an empty name.
    """
    out: list[tuple[str, str]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        rot = item.endswith(ROT_SUFFIX)
        parts = [p.strip() for p in item.removesuffix(ROT_SUFFIX).split("/")]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or not all(parts) or any(ROT_SUFFIX in p for p in parts):
            raise HarnessError(f"bad K/V pair {item!r}: write K/V, e.g. q8_0/turbo3 (or one name for K=V; "
                               f"append {ROT_SUFFIX} for the attention rotation, e.g. q4_0/q4_0{ROT_SUFFIX})")
        if rot:
            parts[1] += ROT_SUFFIX
        if (parts[0], parts[1]) not in out:
            out.append((parts[0], parts[1]))
    if not out:
        raise HarnessError("no K/V pairs given: e.g. --pairs f16/f16,q8_0/q8_0,turbo3/turbo3")
    return out


def pair_label(k: str, v: str) -> str:
    return f"{k}/{v}"


# A pair written with this suffix (``q4_0/q4_0+rot``) runs with the Hadamard attention rotation that upstream
# llama.cpp switches on by default for quantised caches and this fork family switches off; the fork's switches
# are LLAMA_ATTN_ROT_{K,V}_OVERRIDE (src/llama-kv-cache.cpp), and its log line ``attn_rot_k = 1`` proves it.
ROT_SUFFIX = "+rot"
ROT_ENV = {"LLAMA_ATTN_ROT_K_OVERRIDE": "1", "LLAMA_ATTN_ROT_V_OVERRIDE": "1"}


def split_pair(k: str, v: str) -> tuple[str, str, bool]:
    """(K cache type, V cache type, rotation on) of a pair as :func:`parse_pairs` stores it ('q4_0', 'q4_0+rot')."""
    rot = k.endswith(ROT_SUFFIX) or v.endswith(ROT_SUFFIX)
    return k.removesuffix(ROT_SUFFIX), v.removesuffix(ROT_SUFFIX), rot


def rotation_problem(stderr: str) -> str:
    """'' when the log shows the attention rotation on for K and V (``attn_rot_k = 1``, ``attn_rot_v = 1``), else
    the reason the run does not measure what the '+rot' pair names."""
    import re
    got = {side: m.group(1) for side, m in ((s, re.search(rf"attn_rot_{s} = (\d+)", stderr)) for s in ("k", "v")) if m}
    if got.get("k") == "1" and got.get("v") == "1":
        return ""
    if not got:
        return "the log has no 'attn_rot_k = ...' line: this build cannot switch the attention rotation on"
    return (f"attention rotation asked for ({', '.join(f'{k}=1' for k in ROT_ENV)}) but the log says "
            f"attn_rot_k = {got.get('k', '?')}, attn_rot_v = {got.get('v', '?')}: the override did not take effect")


def rpc_unreached(endpoints, stderr: str) -> str:
    """'' when the tool reached every ``--rpc`` server, else why its run does not measure the remote devices.

    The fork's tools print 'Failed to connect to HOST:PORT' (ggml-rpc.cpp) for a server they cannot reach, then
    carry on with the local devices only and exit 0: such a run measured this machine, not the remote one."""
    missed = [ep for ep in endpoints or () if f"Failed to connect to {ep}" in stderr]
    if not missed:
        return ""
    return (f"the tool could not reach the rpc-server at {', '.join(missed)} ('Failed to connect to {missed[0]}' in "
            f"its log) and ran on this machine's devices only: nothing was measured remotely; start the server "
            f"(README 'Remote devices') and rerun")


def pair_slug(k: str, v: str) -> str:
    return f"{k}-{v}".replace("/", "_")


@dataclass
class SweepConfig:
    """Everything that defines a sweep (all sizes in tokens; timeout in seconds per tool call)."""

    model: Path
    corpus: Path
    pairs: list[tuple[str, str]]
    bdir: Path
    backend: str = "cpu"
    ctx: int = CPU_DEFAULTS["ctx"]
    chunks: int = CPU_DEFAULTS["chunks"]
    depths: tuple[int, ...] = CPU_DEFAULTS["depths"]
    reps: int = CPU_DEFAULTS["reps"]
    n_prompt: int = CPU_DEFAULTS["n_prompt"]
    n_gen: int = CPU_DEFAULTS["n_gen"]
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    ngl: int = 0
    batch: int = 0     # 0 = ctx (one sequence per pass, the same layout for every cell)
    ubatch: int = 0    # 0 = min(batch, 512)
    fresh: bool = False
    fork_defaults: bool = False
    timeout: float = CPU_DEFAULTS["timeout"]
    cache_dir: Path = field(default_factory=lambda: Path(os.environ.get("TURBO_SWEEP_CACHE") or REPO_ROOT / ".cache" / "sweep"))
    bench: bool = True
    no_baselines: bool = False                                  # --no-baselines: run only the pairs asked for
    baselines_added: list[str] = field(default_factory=list)    # labels added by with_baselines (for the report)
    rpc: list[str] = field(default_factory=list)                # --rpc endpoints passed to the tools (remote devices)
    # decode agreement (harness/runners/decode.py): greedy decode of decode_n_gen tokens after decode_n_prompt prompt
    # tokens, for decode_prompts corpus prompts (0 = off), with the f16 cache and with each pair
    decode_prompts: int = 0
    decode_n_prompt: int = 64
    decode_n_gen: int = 32
    # depth (harness/runners/depth.py): KLD of depth_pairs at each context length in kld_depths (() = off), all on
    # the same depth_tokens tokens of the corpus
    kld_depths: tuple[int, ...] = ()
    depth_pairs: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.batch = self.batch or self.ctx
        self.ubatch = self.ubatch or min(self.batch, 512)

    def env(self) -> dict[str, str]:
        """Variables set for every tool call (none under --fork-defaults, which also unsets PINNED_ENV)."""
        return {} if self.fork_defaults else dict(PINNED_ENV)

    def env_unset(self) -> tuple[str, ...]:
        return tuple(PINNED_ENV) if self.fork_defaults else ()

    def pinned(self) -> dict:
        """The settings that change the numbers, as recorded in the report."""
        return {"ctx": self.ctx, "chunks": self.chunks, "batch": self.batch, "ubatch": self.ubatch,
                "threads": self.threads, "ngl": self.ngl, "flash_attn": "on", "fit": "off",
                "depths": list(self.depths), "reps": self.reps, "n_prompt": self.n_prompt, "n_gen": self.n_gen,
                "env": self.env(), "env_unset": list(self.env_unset()), "fork_defaults": self.fork_defaults,
                "backend": self.backend, "timeout_s": self.timeout, **({"rpc": list(self.rpc)} if self.rpc else {})}


@dataclass
class JobRecord:
    """One finished (or failed) job. ``data`` holds parsed numbers; ``evidence`` maps names to files
    (absolute, in the cache) holding the raw output they were parsed from."""

    kind: str                    # 'base' | 'ppl' | 'bench'
    pair: str
    ok: bool
    error: str = ""
    data: dict = field(default_factory=dict)
    evidence: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False
    key: str = ""
    fault: str = ""              # failed jobs: 'fork' (FAIL), 'refused' (SKIP), 'harness' (ERROR); see classify_failure
    phase: str = ""              # failed jobs: the phase that died, e.g. 'decode (tg16 at depth 0)'

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SweepResult:
    """The outcome of :func:`run_sweep`: inputs, identity of build/model/corpus, and every job record."""

    config: SweepConfig
    meta: dict
    model_info: ModelInfo | None
    base: JobRecord | None
    ppl: dict[str, JobRecord] = field(default_factory=dict)
    bench: dict[str, JobRecord] = field(default_factory=dict)
    error: str = ""              # a sweep-wide problem (corrupt model, empty corpus) -> every cell ERROR
    seconds: float = 0.0
    jobs_run: int = 0
    jobs_cached: int = 0
    traits: dict = field(default_factory=dict)  # {type name: TypeTrait} measured from the build
    interrupted: dict | None = None  # {'signal', 'exit_code', 'in_progress', 'not_run'} when a signal stopped it
    decode: dict[str, JobRecord] = field(default_factory=dict)         # pair label -> greedy-decode job
    depth: dict[tuple[int, str], JobRecord] = field(default_factory=dict)  # (ctx, pair label) -> KLD job at that depth
    depth_base: dict[int, JobRecord] = field(default_factory=dict)     # ctx -> f16 baseline at that depth


def _binary_identity(bdir: Path, names: list[str]) -> dict:
    out = {}
    for n in names:
        for p in [Path(bdir) / "bin" / n]:
            if p.exists():
                st = p.stat()
                out[n] = [st.st_size, int(st.st_mtime)]
    for lib in sorted((Path(bdir) / "bin").glob("libggml*.so")) + sorted((Path(bdir) / "bin").glob("libllama*.so")):
        st = lib.stat()
        out[lib.name] = [st.st_size, int(st.st_mtime)]
    return out


def _fork_identity(bdir: Path) -> dict:
    """What the build was built from, for labels and cache keys: the build's own record
    (turbo-harness-build.json; spec "Integrity of a verdict" / Provenance), never a checkout that may
    have moved since. A build without a record falls back to its source folder's state now, and says so."""
    meta = read_build_meta(bdir)
    fork = Path(meta.get("fork_dir") or (REPO_ROOT / "vendor" / "llama.cpp"))
    if meta.get("fork_commit"):
        st = {"commit": meta["fork_commit"], "describe": meta.get("fork_describe", ""), "dirty": meta.get("fork_dirty")}
        diff_sha = meta.get("fork_diff_sha256") or ""
    else:
        st = git_state(fork) if fork.is_dir() else {"commit": "unknown", "describe": "", "dirty": None}
        st["describe"] = (st.get("describe", "") + " (not recorded by the build: the source folder's state now)").strip()
        diff_sha = st.get("diff_sha256") or ""
    cmake = meta.get("cmake_options")
    if cmake is None:
        cache = Path(bdir) / "CMakeCache.txt"
        cmake = hashlib.sha256(cache.read_bytes()).hexdigest() if cache.is_file() else "unknown"
    return {"fork_dir": str(fork), "fork_commit": st["commit"], "fork_describe": st.get("describe", ""),
            "fork_dirty": st.get("dirty"), "fork_diff_sha256": diff_sha, "cmake_options": cmake,
            "compiler": meta.get("cxx_compiler", "")}


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


class _Cache:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> JobRecord | None:
        f = self.root / "jobs" / f"{key}.json"
        try:
            d = json.loads(f.read_text())
            rec = JobRecord(**d)
        except (OSError, ValueError, TypeError):
            return None
        if not all(Path(p).exists() for p in rec.evidence.values()):
            return None
        rec.cached = True
        _reparse_kv(rec)
        return rec

    def put(self, rec: JobRecord) -> None:
        f = self.root / "jobs" / f"{rec.key}.json"
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec.to_dict(), indent=1))
        os.replace(tmp, f)  # atomic: an interrupted write never leaves a half record

    def ev(self, key: str) -> Path:
        p = self.root / "ev" / key
        p.mkdir(parents=True, exist_ok=True)
        return p


def _reparse_kv(rec: JobRecord) -> None:
    """Re-read a cached job's KV-cache log lines from its evidence with the current parser, so that a parser
    improvement (e.g. the SWA cache of Gemma 3 counted with the non-SWA one) reaches results cached before it."""
    name = {"base": "base.stderr", "ppl": "ppl.stderr", "bench": "bench.stderr"}.get(rec.kind)
    if not name or name not in rec.evidence or not rec.ok:
        return
    try:
        text = Path(rec.evidence[name]).read_text(errors="replace")
    except OSError:
        return
    if rec.kind == "bench":
        rec.data["kv"] = [x.to_dict() for x in parse_kv_logs(text)]
    else:
        kv = parse_kv_log(text)
        if kv is not None:
            rec.data["kv"] = kv.to_dict()


def _evidence(prefix: Path) -> dict[str, str]:
    return {f"{prefix.name}.{ext}": str(prefix.with_name(f"{prefix.name}.{ext}")) for ext in ("cmd", "stdout", "stderr")}


def _common_args(cfg: SweepConfig) -> list[str]:
    """Arguments every tool call gets; with remote devices, the fork's own ``--rpc HOST:PORT,...`` (both
    llama-perplexity and llama-bench take it) so layers are offloaded to the rpc-servers."""
    rpc = ["--rpc", ",".join(cfg.rpc)] if cfg.rpc else []
    return ["-t", str(cfg.threads), "-b", str(cfg.batch), "-ub", str(cfg.ubatch), "-ngl", str(cfg.ngl), *rpc]


def _bench_tests(cfg: SweepConfig) -> list[tuple[str, int, int]]:
    """The tests llama-bench runs, in its order: for each depth, the prefill test then the decode test
    ((test 'pp'|'tg', tokens, depth); llama-bench's instance loop: depth outermost, prompts before gens)."""
    out = []
    for d in cfg.depths:
        if cfg.n_prompt > 0:
            out.append(("pp", cfg.n_prompt, d))
        if cfg.n_gen > 0:
            out.append(("tg", cfg.n_gen, d))
    return out


def _after_last_context(stderr: str) -> tuple[bool, str]:
    """(a KV cache was created, the log after the last one): where the last context got to."""
    i = stderr.rfind("llama_kv_cache: size")
    return (i >= 0, stderr[i:] if i >= 0 else "")


def _phase(kind: str, res: ToolResult, cfg: SweepConfig) -> str:
    created, tail = _after_last_context(res.stderr)
    if kind == "bench":
        tests = _bench_tests(cfg)
        prog = last_bench_progress(res.stderr)
        if prog is not None:
            n, word = prog
        else:  # no --progress lines: the test after the last one printed
            if not created:
                return "start-up (model load, before the KV cache was created)"
            rows, _ = parse_bench_json_partial(res.stdout)
            n = len(rows) + 1
            word = "prefill" if n - 1 < len(tests) and tests[n - 1][0] == "pp" else "decode"
        if 0 < n <= len(tests):
            t, ntok, d = tests[n - 1]
            return f"{word} ({t}{ntok} at depth {d})"
        return word
    if not created:
        return "start-up (model load, before the KV cache was created)"
    if "graph splits" not in tail:
        return "context creation (graph reserve, after the KV cache was created)"
    done = kld_chunks_done(res.stdout)
    return f"evaluation of chunk {done + 1} of {cfg.chunks} (batched prefill)"


def classify_failure(kind: str, res: ToolResult, cfg: SweepConfig) -> tuple[str, str, str]:
    """Who is at fault for a failed tool call (spec "Who is at fault decides FAIL or ERROR").

    Args:
        kind: 'base' | 'ppl' (llama-perplexity) or 'bench' (llama-bench, run with --progress).
        res: the failed call (``res.ok`` is False).
        cfg: the sweep (chunks, bench tests, to name the phase).

    Returns:
        (fault, phase, message): fault 'harness' for a timeout or a binary that cannot run (ERROR);
        'refused' for a clean non-zero exit before the fork computed anything (its message is quoted;
        SKIP); 'fork' for a crash (signal) anywhere, or an error exit after computing began (FAIL).
        phase names where it died, e.g. 'decode (tg16 at depth 0)', 'evaluation of chunk 3 of 8 (batched
        prefill)', 'start-up (...)'. message is one line naming the tool, the phase, the signal or exit
        status and the tool's most telling line (GGML_ASSERT ...).
    """
    tool = Path(res.cmd[0]).name
    if res.timed_out or res.rc is None or (res.rc == 127 and "cannot execute" in res.stderr):
        return "harness", "", res.failure()
    quote = error_line(res.stderr + "\n" + res.stdout)
    phase = _phase(kind, res, cfg)
    if res.rc < 0:
        try:
            sig = f"signal {-res.rc} ({signal.Signals(-res.rc).name})"
        except ValueError:
            sig = f"signal {-res.rc}"
        return "fork", phase, f"{tool} crashed in {phase}: killed by {sig}: {quote}"
    created, tail = _after_last_context(res.stderr)
    computing = created and "graph splits" in tail
    if not computing:
        return "refused", "start-up", f"{tool} refused the configuration at start-up (exit {res.rc}): {quote}"
    return "fork", phase, f"{tool} failed in {phase} (exit {res.rc}): {quote}"


def _failed(rec: JobRecord, res: ToolResult, cfg: SweepConfig) -> JobRecord:
    if not res.ok:
        rec.fault, rec.phase, rec.error = classify_failure(rec.kind, res, cfg)
    return rec


def _run_base(cfg: SweepConfig, tool: Path, cache: _Cache, key: str) -> JobRecord:
    ev = cache.ev(key)
    base_file = cache.root / "base" / f"{key}.kld"
    base_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = base_file.with_suffix(".partial")
    cmd = [str(tool), "-m", str(cfg.model), "-f", str(cfg.corpus), "-c", str(cfg.ctx), "--chunks", str(cfg.chunks),
           *_common_args(cfg), "-fa", "on", "-fit", "off", "-ctk", "f16", "-ctv", "f16",
           "--kl-divergence-base", str(tmp_file)]
    res = run_tool(cmd, cfg.env(), cfg.timeout, ev / "base", cfg.env_unset())
    rec = _failed(JobRecord("base", "f16/f16", res.ok, res.failure(), evidence=_evidence(ev / "base"), seconds=res.seconds,
                            key=key), res, cfg)
    text = res.stdout + "\n" + res.stderr
    if res.ok and rpc_unreached(cfg.rpc, res.stderr):
        rec.ok, rec.error = False, rpc_unreached(cfg.rpc, res.stderr)
    elif res.ok:
        fin = parse_final_ppl(text)
        kv = parse_kv_log(res.stderr)
        if fin is None or not tmp_file.is_file() or tmp_file.stat().st_size == 0:
            import re
            cause = "; ".join(m.strip() for m in re.findall(r"[^\n]*(?:you need at least|tokenizes to only)[^\n]*", text))
            rec.ok, rec.error = False, (f"baseline run printed no final PPL or wrote no logits file"
                                        f"{' (' + cause[:300] + ')' if cause else ''}; see {ev / 'base.stderr'}")
        elif "tokens" in res.stderr and "you need at least" in res.stderr:
            rec.ok, rec.error = False, "corpus too short for ctx x chunks"
        else:
            os.replace(tmp_file, base_file)
            rec.data = {"ppl": fin[0], "ppl_se": fin[1], "kv": kv.to_dict() if kv else None, "base_file": str(base_file)}
            rec.evidence["base.kld"] = str(base_file)
    return rec


def _run_ppl(cfg: SweepConfig, tool: Path, cache: _Cache, key: str, k: str, v: str, base_file: str) -> JobRecord:
    ev = cache.ev(key)
    kt, vt, rot = split_pair(k, v)
    cmd = [str(tool), "-m", str(cfg.model), "-c", str(cfg.ctx), *_common_args(cfg), "-fa", "on", "-fit", "off",
           "-ctk", kt, "-ctv", vt, "--kl-divergence-base", base_file, "--kl-divergence"]
    res = run_tool(cmd, {**cfg.env(), **(ROT_ENV if rot else {})}, cfg.timeout, ev / "ppl", cfg.env_unset())
    rec = _failed(JobRecord("ppl", pair_label(k, v), res.ok, res.failure(), evidence=_evidence(ev / "ppl"),
                            seconds=res.seconds, key=key), res, cfg)
    if not res.ok:
        kv = parse_kv_log(res.stderr)
        rec.data = {"kv": kv.to_dict() if kv else None}  # placement is known even when the run died later
    if res.ok:
        stats = parse_kld_stats(res.stdout)
        kv = parse_kv_log(res.stderr)
        if rpc_unreached(cfg.rpc, res.stderr):
            rec.ok, rec.error = False, rpc_unreached(cfg.rpc, res.stderr)
        elif "ppl" not in stats or "kld" not in stats:
            rec.ok, rec.error = False, (f"llama-perplexity printed no KL-divergence statistics (it prints them only for 2+ "
                                        f"chunks); see {ev / 'ppl.stdout'}")
        elif kv is None:
            rec.ok, rec.error = False, f"no 'llama_kv_cache: size' line in the log; see {ev / 'ppl.stderr'}"
        elif rot and rotation_problem(res.stderr):
            rec.ok, rec.error = False, f"{rotation_problem(res.stderr)}; see {ev / 'ppl.stderr'}"
        else:
            rec.data = {"stats": stats, "kv": kv.to_dict()}
    return rec


def _run_bench(cfg: SweepConfig, tool: Path, cache: _Cache, key: str, k: str, v: str) -> JobRecord:
    ev = cache.ev(key)
    kt, vt, rot = split_pair(k, v)
    cmd = [str(tool), "-m", str(cfg.model), *_common_args(cfg), "-fa", "1", "-ctk", kt, "-ctv", vt,
           "-p", str(cfg.n_prompt), "-n", str(cfg.n_gen), "-d", ",".join(str(d) for d in cfg.depths),
           "-r", str(cfg.reps), "-o", "json", "-v", "--progress"]
    res = run_tool(cmd, {**cfg.env(), **(ROT_ENV if rot else {})}, cfg.timeout, ev / "bench", cfg.env_unset())
    rec = _failed(JobRecord("bench", pair_label(k, v), res.ok, res.failure(), evidence=_evidence(ev / "bench"),
                            seconds=res.seconds, key=key), res, cfg)
    if not res.ok:  # keep what the tool measured before it died (llama-bench prints prefill before decode)
        rows, _ = parse_bench_json_partial(res.stdout)
        rec.data = {"rows": [r.to_dict() for r in rows], "kv": [x.to_dict() for x in parse_kv_logs(res.stderr)]}
    if res.ok and rpc_unreached(cfg.rpc, res.stderr):
        rec.ok, rec.error = False, rpc_unreached(cfg.rpc, res.stderr)
        return rec
    if res.ok:
        try:
            rows = parse_bench_json(res.stdout)
        except ValueError as e:
            rec.ok, rec.error = False, f"{e}; see {ev / 'bench.stdout'}"
            return rec
        kvs = parse_kv_logs(res.stderr)
        rec.data = {"rows": [r.to_dict() for r in rows], "kv": [x.to_dict() for x in kvs]}
        if not rows:
            rec.ok, rec.error = False, "llama-bench returned no tests"
    return rec


def _unknown_type_error(k: str, v: str, known: set[str]) -> str:
    bad = [t for t in split_pair(k, v)[:2] if t not in known]
    if not bad:
        return ""
    return (f"unknown cache type {bad[0]!r}: this build's ggml knows "
            f"{', '.join(t for t in sorted(known) if t.startswith(('f', 'b', 'q', 'iq4', 'turbo')))}")


def job_ident(cfg: SweepConfig, fork: dict, meta: dict) -> dict:
    """What a perplexity job's cache key is made of (build, model, corpus, environment, sizes, layout)."""
    return {"fork": fork, "bins": _binary_identity(cfg.bdir, ["llama-perplexity", "llama-bench"]),
            "model": meta["model_sha256"], "corpus": meta["corpus_sha256"], "env": cfg.env(),
            "env_unset": cfg.env_unset(), "ctx": cfg.ctx, "chunks": cfg.chunks, "b": cfg.batch, "ub": cfg.ubatch,
            "t": cfg.threads, "ngl": cfg.ngl, "fa": "on", "fit": "off", "backend": cfg.backend,
            "inherit": meta["turbo_env_inherited"], **({"rpc": list(cfg.rpc)} if cfg.rpc else {})}


def run_sweep(cfg: SweepConfig, progress: bool = True, log: Callable[[str], None] = print,
              traits: dict | None = None) -> SweepResult:
    """Run (or resume) a sweep. Never raises for a failing tool or pair: those become failed job records.

    Args:
        cfg: the sweep configuration.
        progress: show a tqdm bar of jobs done and time left (on stderr).
        log: where one-line notes go.
        traits: {type name: TypeTrait}; default measured from the build's libggml-base (tests inject them).

    Returns:
        SweepResult; ``error`` is set (and no job runs) when the model or corpus cannot be used.

    Raises:
        HarnessError: the tools are not built (with the build command).
        KeyboardInterrupt or harness.interrupt.Interrupted: after killing the running tool; finished jobs
            stay cached. The exception carries the partial result as ``e.sweep_result`` (its
            ``interrupted`` names the signal, the job that was running and the jobs not run), so the
            caller can write the partial report.
    """
    t0 = time.time()
    ppl_tool = binary(cfg.bdir, "llama-perplexity")
    bench_tool = binary(cfg.bdir, "llama-bench") if cfg.bench else None
    traits = traits if traits is not None else type_traits(str(cfg.bdir))
    fork = _fork_identity(cfg.bdir)
    meta = {**fork, "build_dir": str(cfg.bdir), "model": str(cfg.model), "corpus": str(cfg.corpus),
            "pinned": cfg.pinned(), "pairs": [pair_label(k, v) for k, v in cfg.pairs],
            "turbo_env_inherited": {k: v for k, v in os.environ.items() if k.startswith("TURBO_")},
            "type_traits": {n: [t.blck, t.size] for n, t in traits.items()
                            if n in {x for p in cfg.pairs for x in split_pair(*p)[:2]} | {"f16", "q8_0"}}}
    result = SweepResult(cfg, meta, None, None, traits=traits)
    try:
        result.model_info = read_model_info(cfg.model)
        check_corpus(cfg.corpus, cfg.ctx, cfg.chunks)
        meta["model_sha256"] = sha256_file(cfg.model)
        meta["corpus_sha256"] = sha256_file(cfg.corpus)
    except HarnessError as e:
        result.error = str(e)
        result.seconds = time.time() - t0
        return result
    meta["model_info"] = result.model_info.to_dict()

    cache = _Cache(cfg.cache_dir)
    ident = job_ident(cfg, fork, meta)
    base_key = _key({**ident, "job": "base", "v": 1})
    bench_ident = {k: v for k, v in ident.items() if k not in ("corpus", "chunks", "ctx")}
    jobs: list[tuple[str, str, str, str]] = [("base", "f16", "f16", base_key)]
    for k, v in cfg.pairs:
        jobs.append(("ppl", k, v, _key({**ident, "job": "ppl", "pair": [k, v], "base": base_key, "v": 1})))
    if cfg.bench:
        for k, v in cfg.pairs:
            jobs.append(("bench", k, v, _key({**bench_ident, "job": "bench", "pair": [k, v], "depths": list(cfg.depths),
                                              "reps": cfg.reps, "p": cfg.n_prompt, "n": cfg.n_gen, "v": 1})))
    # decode agreement and depth jobs (their own modules): (kind, key) -> (run() -> JobRecord, store(JobRecord))
    from harness.runners.decode import plan_decode
    from harness.runners.depth import plan_depth
    extra: dict[tuple[str, str], tuple[Callable[[], JobRecord], Callable[[JobRecord], None]]] = {}
    for plan in (plan_depth, plan_decode):
        for job, run, store in plan(cfg, result, ident, cache, ppl_tool):
            jobs.append(job)
            extra[(job[0], job[3])] = (run, store)  # by kind too: a depth job may share a main job's key
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), unit="job", desc="sweep", dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} jobs [{elapsed}<{remaining}] {postfix}")
    done = 0
    try:
        for kind, k, v, key in jobs:
            raise_if_pending()
            label = pair_label(k, v)
            if bar is not None:
                bar.set_postfix_str(f"{kind} {label}")
            rec = None if cfg.fresh else cache.get(key)
            if rec is not None and cfg.rpc and any(
                    rpc_unreached(cfg.rpc, Path(p).read_text(errors="replace"))
                    for n, p in rec.evidence.items() if n.endswith(".stderr")):
                rec = None  # cached by a harness that did not look: a local run filed as a remote one; run it again
            if rec is None:
                err = _unknown_type_error(k, v, set(traits))
                if err:
                    rec = JobRecord(kind, label, False, err, key=key)
                elif (kind, key) in extra:
                    rec = extra[(kind, key)][0]()
                elif kind == "base":
                    rec = _run_base(cfg, ppl_tool, cache, key)
                elif kind == "ppl":
                    if result.base is None or not result.base.ok:
                        why = result.base.error if result.base else "not run"
                        rec = JobRecord(kind, label, False, f"no f16 baseline: {why}", key=key)
                    else:
                        rec = _run_ppl(cfg, ppl_tool, cache, key, k, v, result.base.data["base_file"])
                else:
                    rec = _run_bench(cfg, bench_tool, cache, key, k, v)
                if rec.ok:
                    cache.put(rec)
                    result.jobs_run += 1
                elif log and not (kind in ("ppl", "depth") and rec.error.startswith("no f16 baseline")):
                    word = {"fork": "FAIL", "refused": "refused"}.get(rec.fault, "ERROR")
                    (bar.write if bar is not None else log)(f"{word} {kind} {label}: {rec.error}")
            else:
                result.jobs_cached += 1
            if (kind, key) in extra:
                extra[(kind, key)][1](rec)
            elif kind == "base":
                result.base = rec
            elif kind == "ppl":
                result.ppl[label] = rec
            else:
                result.bench[label] = rec
            done += 1
            if bar is not None:
                bar.update(1)
    except (KeyboardInterrupt, Interrupted) as e:
        name = getattr(e, "name", "SIGINT")
        result.interrupted = {"signal": name, "exit_code": getattr(e, "exit_code", 130), "units": "jobs",
                              "in_progress": f"{jobs[done][0]} {pair_label(*jobs[done][1:3])}" if done < len(jobs) else None,
                              "not_run": [f"{kd} {pair_label(k, v)}" for kd, k, v, _ in jobs[done:]]}
        e.sweep_result = result
        raise
    finally:
        if bar is not None:
            bar.close()
        result.seconds = time.time() - t0
    return result


def copy_evidence(result: SweepResult, run_dir: Path) -> dict[str, list[str]]:
    """Copy every job's evidence files (except the large logits baseline) into ``run_dir/evidence/<pair>/``.

    Returns {'<kind>:<pair>': [run-folder-relative paths]}.
    """
    out: dict[str, list[str]] = {}
    recs = ([result.base] if result.base else []) + list(result.ppl.values()) + list(result.bench.values())
    recs += list(result.decode.values()) + list(result.depth_base.values()) + list(result.depth.values())
    for rec in recs:
        k, v = rec.pair.split("/")
        dst = Path(run_dir) / "evidence" / pair_slug(k, v)
        dst.mkdir(parents=True, exist_ok=True)
        rels = []
        for name, src in rec.evidence.items():
            if name.endswith(".kld"):
                rels.append(str(src))  # ~100 MB of logits: referenced in place, not copied
                continue
            if Path(src).is_file():
                shutil.copyfile(src, dst / name)
                rels.append(str((dst / name).relative_to(run_dir)))
        out[f"{rec.kind}:{rec.pair}" + (f"@{rec.data.get('ctx')}" if rec.kind.startswith("depth") else "")] = rels
    return out
