"""Decode agreement: greedy decode with the f16 cache and with each K/V pair, through the fork's own API.

Batched perplexity evaluates every token of a chunk in one pass (the prefill kernels); a bug that only the
one-token decode path has (a known CUDA turbo4-V bug of this fork family garbled decode from the first
token while batched PPL looked fine) is invisible there. Here ``decode.c`` (compiled against the build's
``libllama``) evaluates the first ``n_prompt`` tokens of a few corpus prompts in one batch, then generates
``n_gen`` tokens one at a time, always the most likely one. The same prompts are decoded with the f16 cache
(the reference) and with each pair; per prompt the harness compares the two token sequences.

Everything here runs or parses the tool; judging is in :mod:`harness.checks.decode`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError

SRC = Path(__file__).resolve().parents[1] / "fork" / "decode.c"
EXE = "turbo-decode"

# Small CPU defaults (about 10-30 s per pair on 2 cores: the output layer over Gemma 3's 262k vocabulary dominates);
# `turbo-harness sweep --decode-prompts/--decode-tokens` change them, --decode-prompts 0 switches decode off.
DECODE_DEFAULTS = {"prompts": 3, "n_prompt": 64, "n_gen": 32}
# a prompt line needs this many characters per prompt token, so that it tokenizes to at least n_prompt tokens
# (English BPE/SentencePiece tokens average ~4-5 characters; 8 leaves room)
CHARS_PER_TOKEN = 8


def build_decode_tool(bdir: Path, fork: Path, force: bool = False) -> Path:
    """Compile ``decode.c`` against the fork's headers and the build's libllama/libggml.

    Args:
        bdir: a fork build folder holding ``bin/libllama.so`` (or .dylib). fork: the checkout (headers).
        force: rebuild even when the executable is newer than the source and the libraries.
    Returns:
        Path of ``<bdir>/turbo-probe/turbo-decode``.
    Raises:
        HarnessError: libllama not built, no C compiler, or the compile failed (first error quoted).
    """
    from harness.fork.probe import build_llama_tool
    return build_llama_tool("the greedy-decode tool", SRC, EXE, bdir, fork, force)


def corpus_prompts(corpus: Path, n: int, n_prompt: int) -> list[str]:
    """``n`` prompts from a plain-text corpus: paragraphs (lines that are not wikitext headings) long enough to give
    ``n_prompt`` tokens, taken evenly spaced through the file so that they cover different topics.

    Args:
        corpus: UTF-8 text file. n: number of prompts (>= 1). n_prompt: tokens each prompt must give.
    Returns:
        ``n`` single-line strings (whitespace runs collapsed to one space).
    Raises:
        HarnessError: fewer than ``n`` paragraphs of at least ``n_prompt * CHARS_PER_TOKEN`` characters.
    """
    need = n_prompt * CHARS_PER_TOKEN
    text = Path(corpus).read_text(encoding="utf-8", errors="replace")
    paras = [" ".join(ln.split()) for ln in text.splitlines()]
    paras = [p for p in paras if len(p) >= need and not p.startswith("=")]
    if len(paras) < n:
        raise HarnessError(f"corpus {corpus} has only {len(paras)} paragraphs of {need}+ characters, {n} needed for "
                           f"--decode-prompts {n} x --decode-prompt-tokens {n_prompt}: give a longer text or fewer/shorter prompts")
    return [paras[i * len(paras) // n] for i in range(n)]


@dataclass
class DecodeOutput:
    """What one run of the tool printed: per prompt the generated token ids, the top-1 minus top-2 logit gap at
    each step (how close the choice was) and the generated text."""

    tokens: list[list[int]]
    gaps: list[list[float]]
    texts: list[str]
    complete: bool      # the tool printed its final 'done' line

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "gaps": self.gaps, "texts": self.texts, "complete": self.complete}


def parse_decode_output(stdout: str) -> DecodeOutput:
    """Parse the tool's stdout (one JSON object per prompt, then ``{"done": true, ...}``).

    Lines that are not JSON objects are ignored (a crash may cut the last line short); prompts stay in order.
    """
    toks, gaps, texts, done = [], [], [], False
    for ln in stdout.splitlines():
        ln = ln.strip()
        if not ln.startswith("{"):
            continue
        try:
            d = json.loads(ln)
        except ValueError:
            continue
        if d.get("done"):
            done = True
        elif "tokens" in d:
            toks.append([int(t) for t in d["tokens"]])
            gaps.append([float(g) for g in d.get("gap", [])])
            texts.append(str(d.get("text", "")))
    return DecodeOutput(toks, gaps, texts, done)


def decode_phase(stderr: str) -> str:
    """The phase a failed run was in, from the tool's last ``turbo-decode: phase ...`` line:
    'prefill of prompt 1', 'decode of prompt 0, token 3', or 'start-up (...)' when no phase started."""
    hits = re.findall(r"turbo-decode: phase (prefill|decode) prompt (\d+)(?: token (\d+))?", stderr)
    if not hits:
        return "start-up (model load or context creation)"
    word, p, t = hits[-1]
    return f"prefill of prompt {p}" if word == "prefill" else f"decode of prompt {p}, token {t}"


def compare_tokens(ref: list[int], got: list[int]) -> dict:
    """Agreement of a pair's greedy tokens with the f16 reference's for one prompt.

    Args:
        ref, got: token ids generated from the same prompt (compared position by position up to the shorter).
    Returns:
        {'n': positions compared, 'same': positions with the same token, 'agreement': same / n (0..1),
         'first_divergence': index of the first different token (0 = the very first generated token), or None
         when all n agree, 'prefix': tokens that agree before the first divergence (n when none)}.
    """
    n = min(len(ref), len(got))
    same = sum(1 for a, b in zip(ref[:n], got[:n]) if a == b)
    first = next((i for i in range(n) if ref[i] != got[i]), None)
    return {"n": n, "same": same, "agreement": same / n if n else float("nan"), "first_divergence": first,
            "prefix": n if first is None else first}


def decode_job(cfg, exe: Path, prompts_file: Path, cache, key: str, k: str, v: str):
    """Run the tool for one K/V pair (``k``, ``v`` as :func:`harness.runners.sweep.parse_pairs` stores them;
    '+rot' switches the attention rotation on) and return a :class:`~harness.runners.sweep.JobRecord` of kind
    'decode' whose ``data`` holds the :class:`DecodeOutput` and the parsed KV log.

    Faults (spec "Who is at fault"): a crash (signal) or a llama_decode failure after the context was created
    (exit 4) is the fork's ('fork', FAIL, naming the phase); a context or model the fork refused at start-up
    (exit 3) is 'refused' (SKIP); bad input (exit 2), a timeout, a missing binary or an ``--rpc`` server lost or
    never reached (:func:`harness.runners.sweep_jobs.rpc_lost`) is the harness's (ERROR).
    A run whose log shows other K/V types than asked, or no rotation for a '+rot' pair, is not kept (ERROR).
    """
    from harness.runners.llama_logs import parse_kv_logs
    from harness.runners.sweep import ROT_ENV, JobRecord, _evidence, pair_label, rotation_problem, split_pair
    from harness.runners.sweep_config import run_problem
    from harness.runners.tools import error_line, run_tool

    ev = cache.ev(key)
    kt, vt, rot = split_pair(k, v)
    cmd = [str(exe), str(cfg.model), str(prompts_file), str(cfg.decode_n_prompt), str(cfg.decode_n_gen), kt, vt,
           str(cfg.threads), str(cfg.ngl), cfg.devices or "-", ",".join(cfg.rpc) or "-"]  # -dev and --rpc, as the
    # sweep's other tools get them (harness/runners/sweep_jobs.py _common_args): an rpcN side decodes on its server
    res = run_tool(cmd, {**cfg.env(), **(ROT_ENV if rot else {})}, cfg.timeout, ev / "decode", cfg.env_unset())
    rec = JobRecord("decode", pair_label(k, v), res.ok, res.failure(), evidence=_evidence(ev / "decode"),
                    seconds=res.seconds, key=key)
    out = parse_decode_output(res.stdout)
    kvs = parse_kv_logs(res.stderr)
    rec.data = {"out": out.to_dict(), "kv": [x.to_dict() for x in kvs]}
    if not res.ok:
        quote = error_line(res.stderr + "\n" + res.stdout)
        from harness.runners.sweep_jobs import rpc_lost, rpc_lost_message
        lost = None if res.timed_out or res.rc is None else rpc_lost(res.stderr, cfg.rpc)
        if lost is not None:  # the rpc-server went away (or was never there): nothing measured, not the fork's result
            rec.fault, rec.phase = "harness", decode_phase(res.stderr) if lost[0] == "lost" else "start-up"
            rec.error = rpc_lost_message("greedy decode", lost, res.rc, rec.phase)
        elif res.timed_out or res.rc is None or res.rc in (2, 127):
            rec.fault = "harness"
        elif res.rc < 0 or res.rc == 4:
            rec.fault, rec.phase = "fork", decode_phase(res.stderr)
            how = f"killed by signal {-res.rc}" if res.rc < 0 else "llama_decode failed"
            rec.error = f"greedy decode {how} in {rec.phase}: {quote}"
        else:
            rec.fault, rec.phase = "refused", "start-up"
            rec.error = f"greedy decode refused the configuration at start-up (exit {res.rc}): {quote}"
        return rec
    if not out.complete or len(out.tokens) != cfg.decode_prompts:
        rec.ok, rec.fault = False, "harness"
        rec.error = f"the decode tool printed {len(out.tokens)} of {cfg.decode_prompts} prompts; see {ev / 'decode.stdout'}"
    elif any(len(t) != cfg.decode_n_gen for t in out.tokens):
        rec.ok, rec.fault = False, "harness"
        rec.error = (f"the decode tool printed {', '.join(str(len(t)) for t in out.tokens)} tokens per prompt, "
                     f"{cfg.decode_n_gen} asked; see {ev / 'decode.stdout'}")
    elif not kvs:
        rec.ok, rec.fault = False, "harness"
        rec.error = f"no 'llama_kv_cache: size' line in the decode log; see {ev / 'decode.stderr'}"
    elif any((x.k_type, x.v_type) != (kt, vt) or x.changes for x in kvs):
        bad = next(x for x in kvs if (x.k_type, x.v_type) != (kt, vt) or x.changes)
        rec.ok, rec.fault = False, "harness"
        rec.error = f"asked K={kt} V={vt} but the decode log says: \"{bad.changes[0] if bad.changes else bad.size_line}\""
    elif rot and rotation_problem(res.stderr):
        rec.ok, rec.fault = False, "harness"
        rec.error = f"{rotation_problem(res.stderr)}; see {ev / 'decode.stderr'}"
    elif run_problem(cfg, res.stderr):
        rec.ok, rec.fault = False, "harness"
        rec.error = run_problem(cfg, res.stderr)
    return rec


REF_PAIR = ("f16", "f16")


def plan_decode(cfg, result, ident: dict, cache, ppl_tool: Path):
    """The sweep's decode jobs: the f16/f16 reference first, then every other pair of ``cfg.pairs``.

    Args:
        cfg: SweepConfig (``decode_prompts`` 0 means no jobs). result: the SweepResult the jobs fill
            (``result.decode[label]``). ident: the sweep's job identity (build, model, environment, threads).
        cache: the sweep's job cache. ppl_tool: unused (the plan signature is shared with the depth plan).
    Returns:
        [((kind, k, v, key), run() -> JobRecord, store(JobRecord))].
    Raises:
        HarnessError: the corpus has too few long paragraphs for the prompts (before any job runs).
    """
    import hashlib

    from harness.runners.sweep import JobRecord, _key, pair_label
    if cfg.decode_prompts <= 0:
        return []
    prompts = corpus_prompts(cfg.corpus, cfg.decode_prompts, cfg.decode_n_prompt)
    text = "\n".join(prompts) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    pfile = cache.root / "decode" / f"prompts-{digest[:16]}.txt"
    pfile.parent.mkdir(parents=True, exist_ok=True)
    if not pfile.is_file():
        pfile.write_text(text)
    src = hashlib.sha256(SRC.read_bytes()).hexdigest()
    base = {k: v for k, v in ident.items() if k not in ("ctx", "chunks", "b", "ub", "fa", "fit")}
    base.update(job="decode", tool=src, prompts=digest, p=cfg.decode_n_prompt, n=cfg.decode_n_gen, v=1)
    exe: list[Path] = []

    def tool() -> Path:
        if not exe:
            from harness.fork.build import read_build_meta
            from harness.runners.sweep import REPO_ROOT
            fork = Path(read_build_meta(cfg.bdir).get("fork_dir") or (REPO_ROOT / "vendor" / "llama.cpp"))
            exe.append(build_decode_tool(cfg.bdir, fork))
        return exe[0]

    out = []
    for k, v in [REF_PAIR] + [p for p in cfg.pairs if p != REF_PAIR]:
        key = _key({**base, "pair": [k, v]})
        label = pair_label(k, v)

        def run(k=k, v=v, key=key, label=label):
            try:
                return decode_job(cfg, tool(), pfile, cache, key, k, v)
            except HarnessError as e:  # the tool could not be built: the harness's fault
                return JobRecord("decode", label, False, str(e), key=key, fault="harness")

        def store(rec, label=label):
            result.decode[label] = rec
        out.append((("decode", k, v, key), run, store))
    return out
