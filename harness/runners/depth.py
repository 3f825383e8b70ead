"""Depth: KL divergence of a few K/V pairs at several context lengths on the same text.

For each context length ``d`` of ``--kld-depths`` the sweep runs ``llama-perplexity`` with ``-c d`` over the same
``2 x max(depths)`` corpus tokens (``tokens / d`` chunks): an f16-cache baseline (``--kl-divergence-base``) and then
each pair of ``--depth-pairs`` against it. llama-perplexity scores the second half of every chunk, so the KLD at
context ``d`` is the mean over tokens that see between ``d/2`` and ``d - 1`` earlier tokens in the cache; a loss
that grows as the cache fills shows as KLD rising with ``d``. A depth equal to the main sweep's ``--ctx`` (with
the same number of tokens) is the main run itself, taken from the cache.

Runs are the sweep's own perplexity jobs (:func:`harness.runners.sweep._run_base`, ``_run_ppl``) on a copy of the
sweep configuration with the context, chunks and batch of that depth; judging is in :mod:`harness.checks.depth`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from harness.errors import HarnessError

# CPU: 256 is the main sweep's context (cached) and 1024 goes past Gemma 3's 512-token sliding window, on the
# same 2048 tokens as the main sweep (about 1-3 min per pair on 2 cores); GPU: the spec's 512 and 4096.
CPU_DEPTHS = (256, 1024)
GPU_DEPTHS = (512, 4096)
DEPTH_PAIRS = "f16/f16,q8_0/q8_0,q4_0/q4_0,turbo4/turbo4,turbo3/turbo3"


def depth_tokens(depths: tuple[int, ...]) -> int:
    """Corpus tokens every depth is measured on: two chunks of the longest context (llama-perplexity prints KLD
    statistics only for two or more chunks)."""
    return 2 * max(depths)


# The shortest context length measured: the sweep's own smallest --ctx (harness/cli_sweep.py, AtLeast(16)).
MIN_DEPTH = 16


def check_depth_values(values: tuple[int, ...]) -> None:
    """The checks of --kld-depths that need neither the model nor the other lengths' arithmetic (made while the
    command line is parsed): a length given twice, 0 (use 'none' to turn depth off), a length below
    :data:`MIN_DEPTH`, fewer than two lengths.

    Args:
        values: the --kld-depths lengths in tokens, as given (any order, repeats possible).
    Raises:
        HarnessError: one line naming the problem and the fix.
    """
    spec = ",".join(map(str, values))
    twice = next((d for i, d in enumerate(values) if d in values[:i]), None)
    if twice is not None:  # a repeat is its own mistake: dropping it silently could leave one length (no depth)
        raise HarnessError(f"--kld-depths {spec}: {twice} is given twice: give each context length once, e.g. "
                           f"256,1024 (or --kld-depths none)")
    depths = tuple(sorted(values))
    if 0 in depths:
        raise HarnessError(f"--kld-depths {spec}: 0 is not a context length: give two or more lengths of {MIN_DEPTH} "
                           f"tokens or more, e.g. 256,1024, or --kld-depths none to turn KLD vs depth off")
    low = [d for d in depths if d < MIN_DEPTH]
    if low:
        raise HarnessError(f"--kld-depths {spec}: {low[0]} is below the minimum context length of {MIN_DEPTH} tokens: "
                           f"give two or more lengths of {MIN_DEPTH} or more, e.g. 256,1024 (or --kld-depths none)")
    if len(depths) < 2:
        raise HarnessError(f"--kld-depths {spec}: give two or more context lengths, e.g. 256,1024 "
                           f"(or --kld-depths none)")


def check_depths(depths: tuple[int, ...]) -> None:
    """Refuse depths that cannot be measured on the same tokens: those of :func:`check_depth_values`, a length that
    does not divide ``depth_tokens(depths)``, or a length whose chunks give llama-perplexity fewer than 100 scored
    tokens (it then prints no KLD statistics: :func:`harness.runners.sweep_config.check_kld_size`,
    tools/perplexity/perplexity.cpp 'kld.count < 100'). A length beyond the model's context is checked before this
    (harness/sweep_inputs.py check_inputs): it is the problem to name first.

    Args:
        depths: the --kld-depths lengths in tokens, sorted ascending without repeats.
    Raises:
        HarnessError: one line naming the bad depth, what is allowed and the fix.
    """
    from harness.runners.sweep_config import KLD_MIN_SCORED, kld_scored_tokens
    check_depth_values(depths)
    spec = ",".join(map(str, depths))
    total = depth_tokens(depths)
    for d in depths:
        if total % d:
            raise HarnessError(f"--kld-depths: {d} does not divide the {total} tokens of two {max(depths)}-token chunks: "
                               f"give lengths that divide the longest one's double, e.g. 512,4096")
    for d in depths:
        got = kld_scored_tokens(d, total // d)
        if got < KLD_MIN_SCORED:
            per = d - 1 - d // 2
            need = -(-d * -(-KLD_MIN_SCORED // per) // 2)  # the longest length whose double gives d enough chunks
            raise HarnessError(f"--kld-depths {spec}: at {d} tokens the {total} tokens are {total // d} chunks and "
                               f"llama-perplexity scores only {got} of them (the second half of each chunk); it prints "
                               f"KLD statistics only for {KLD_MIN_SCORED} or more (tools/perplexity/perplexity.cpp: "
                               f"'kld.count < 100'): give a longest length of {need} or more, or a larger shortest one")


def depth_config(cfg, d: int):
    """A copy of the sweep configuration that measures context ``d`` over :func:`depth_tokens` tokens
    (batch = d, micro-batch min(d, 512), as the main sweep's default layout); decode and depth switched off."""
    return dataclasses.replace(cfg, ctx=d, chunks=depth_tokens(cfg.kld_depths) // d, batch=0, ubatch=0,
                               kld_depths=(), decode_prompts=0, depth_pairs=[])


def _as_depth(rec, d: int, kind: str):
    """A relabelled copy of a perplexity job record for the depth table (the cache keeps the original)."""
    ev = {f"depth{d}-{n}": p for n, p in rec.evidence.items()}
    return dataclasses.replace(rec, kind=kind, evidence=ev, data={**rec.data, "ctx": d})


def plan_depth(cfg, result, ident: dict, cache, ppl_tool: Path):
    """The sweep's depth jobs: per context length an f16 baseline, then each of ``cfg.depth_pairs``.

    Args:
        cfg: SweepConfig (``kld_depths`` () means no jobs). result: the SweepResult the jobs fill
            (``result.depth_base[d]``, ``result.depth[(d, label)]``). ident: the main sweep's job identity.
        cache: the sweep's job cache. ppl_tool: the llama-perplexity binary.
    Returns:
        [((kind, k, v, key), run() -> JobRecord, store(JobRecord))]; the keys are the main sweep's perplexity keys
        for that context, so a depth equal to the main ``--ctx`` reuses the main runs.
    """
    from harness.runners.sweep import JobRecord, _key, _run_base, _run_ppl, _run_saved, pair_label
    if not cfg.kld_depths or not cfg.depth_pairs:
        return []
    out = []
    for d in cfg.kld_depths:
        cd = depth_config(cfg, d)
        ident_d = {**ident, "ctx": cd.ctx, "chunks": cd.chunks, "b": cd.batch, "ub": cd.ubatch}
        base_key = _key({**ident_d, "job": "base", "v": 1})

        def run_base(cd=cd, key=base_key):
            return _run_base(cd, ppl_tool, cache, key)

        def store_base(rec, d=d):
            result.depth_base[d] = _as_depth(rec, d, "depth_base")
        out.append((("depth_base", "f16", "f16", base_key), run_base, store_base))
        for k, v in cfg.depth_pairs:
            # the reference side of a cross-backend sweep saves each pass's logits, as its main runs do (same keys)
            key = _key({**ident_d, "job": "ppl-saved" if cd.save_pair_logits else "ppl", "pair": [k, v],
                        "base": base_key, "v": 1})
            label = pair_label(k, v)

            def run(cd=cd, key=key, k=k, v=v, label=label, d=d):
                b = result.depth_base.get(d)
                if b is None or not b.ok:
                    return JobRecord("ppl", label, False, f"no f16 baseline: {b.error if b else 'not run'}", key=key)
                if cd.save_pair_logits:
                    return _run_saved(cd, ppl_tool, cache, key, k, v, b)
                return _run_ppl(cd, ppl_tool, cache, key, k, v, b.data["base_file"])

            def store(rec, d=d, label=label):
                result.depth[(d, label)] = _as_depth(rec, d, "depth")
            out.append((("depth", k, v, key), run, store))
    return out
