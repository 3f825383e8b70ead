"""The sweep's job machinery: identity and cache keys of a job, the on-disk job cache, the arguments every tool
call gets, and who is at fault when a tool call fails (:func:`classify_failure`).

Split out of :mod:`harness.runners.sweep` (which re-exports these names); the tool runs themselves stay there.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from pathlib import Path

from harness.fork.build import REPO_ROOT, git_state, read_build_meta
from harness.runners.llama_logs import (kld_chunks_done, last_bench_progress, parse_bench_json_partial, parse_kv_log,
                                        parse_kv_logs)
from harness.runners.sweep_config import JobRecord, SweepConfig, split_pair
from harness.runners.tools import ToolResult, error_line

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
    dev = ["-dev", cfg.devices] if cfg.devices else []
    return ["-t", str(cfg.threads), "-b", str(cfg.batch), "-ub", str(cfg.ubatch), "-ngl", str(cfg.ngl), *rpc, *dev]


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
        (fault, phase, message): fault 'harness' for a timeout, a binary that cannot run or an ``--rpc`` server it
        could not reach or lost mid-run (:func:`rpc_lost`: the harness's server, not the fork's result) (ERROR);
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
    created, tail = _after_last_context(res.stderr)
    computing = created and "graph splits" in tail
    lost = rpc_lost(res.stderr, cfg.rpc)
    if lost is not None:  # the harness's rpc-server is gone: nothing measured, never the fork's result (FAIL/SKIP)
        return "harness", phase if lost[0] == "lost" else "start-up", rpc_lost_message(tool, lost, res.rc, phase)
    if res.rc < 0:
        try:
            sig = f"signal {-res.rc} ({signal.Signals(-res.rc).name})"
        except ValueError:
            sig = f"signal {-res.rc}"
        return "fork", phase, f"{tool} crashed in {phase}: killed by {sig}: {quote}"
    if not computing:
        return "refused", "start-up", f"{tool} refused the configuration at start-up (exit {res.rc}): {quote}"
    return "fork", phase, f"{tool} failed in {phase} (exit {res.rc}): {quote}"


RPC_CRASH = "Remote RPC server crashed or returned malformed response"  # ggml-rpc.cpp RPC_STATUS_ASSERT (then abort)


def rpc_lost(stderr: str, endpoints) -> tuple[str, list[str]] | None:
    """Whether a tool run with ``--rpc endpoints`` lost its rpc-server(s), from its stderr (ggml-rpc.cpp's messages).

    Returns:
        ('lost', endpoints): a send/receive to a server failed mid-run (RPC_STATUS_ASSERT: 'Remote RPC server crashed
        or returned malformed response', then SIGABRT); ('unreached', the endpoints named): 'Failed to connect to
        HOST:PORT' (with '-dev RPC0' the tool then stops at 'invalid device: RPC0'), or 'invalid device: RPCn' alone;
        None: no endpoints, or no such message. The client cannot tell which of several servers broke: all are named.
    """
    eps = list(endpoints or ())
    if not eps:
        return None
    missed = [ep for ep in eps if f"Failed to connect to {ep}" in stderr]
    if missed:
        return "unreached", missed
    if RPC_CRASH in stderr:
        return "lost", eps
    if re.search(r"invalid device: RPC\d+", stderr):
        return "unreached", eps
    return None


def rpc_lost_message(tool: str, lost: tuple[str, list[str]], rc: int | None, phase: str = "") -> str:
    """The ERROR line for :func:`rpc_lost`'s answer: the endpoint(s), what the tool said, that nothing was measured."""
    how, eps = lost
    where = ", ".join(eps)
    if how == "lost":
        at = f" in {phase}" if phase else ""
        return (f"{tool} lost the rpc-server at {where}{at} ('{RPC_CRASH}', exit {rc}): the server stopped, crashed or "
                f"the connection broke, so nothing was measured (not judged as the fork's result; the server's own log "
                f"says why); restart it (README 'Remote devices') and rerun")
    return (f"{tool} could not reach the rpc-server at {where} ('Failed to connect to {eps[0]}') and stopped at start-up "
            f"(exit {rc}): nothing was measured; start the server (README 'Remote devices') and rerun")


def _failed(rec: JobRecord, res: ToolResult, cfg: SweepConfig) -> JobRecord:
    if not res.ok:
        rec.fault, rec.phase, rec.error = classify_failure(rec.kind, res, cfg)
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
            "inherit": meta["turbo_env_inherited"], **({"rpc": list(cfg.rpc)} if cfg.rpc else {}),
            **({"devices": cfg.devices} if cfg.devices else {})}
