"""The sweep's inputs checked before any tool runs (``turbo-harness sweep``, harness/cli_sweep.py): the decode and
depth options turned into the configuration, and the model, corpus, cache types and lengths checked against each
other. Every problem is a :class:`~harness.errors.HarnessError` with one line naming it and the fix (exit 2)."""
from __future__ import annotations

from pathlib import Path

from harness.errors import HarnessError


def ints(s: str, opt: str = "--depths") -> tuple[int, ...]:
    """Comma-separated non-negative integers of option ``opt`` ('0,256' -> (0, 256)). Raises HarnessError (one line)."""
    try:
        vals = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise HarnessError(f"{opt} {s!r}: give comma-separated integers, e.g. 0,256") from None
    if not vals or min(vals) < 0:
        raise HarnessError(f"{opt} {s!r}: give comma-separated non-negative integers, e.g. 0,256")
    return vals


def decode_depth_options(cfg, prompts, tokens, prompt_tokens, kld_depths, depth_pairs) -> None:
    """Set the decode-agreement and depth settings of ``cfg`` from the options (defaults: harness/runners/decode.py
    DECODE_DEFAULTS, harness/runners/depth.py CPU_DEPTHS/GPU_DEPTHS/DEPTH_PAIRS); the numbers' minima were checked
    while parsing (harness.cli_types.AtLeast). Raises HarnessError for bad depths."""
    from harness.runners.decode import DECODE_DEFAULTS
    from harness.runners.depth import CPU_DEPTHS, DEPTH_PAIRS, GPU_DEPTHS, check_depths
    from harness.runners.sweep import parse_pairs
    cfg.decode_prompts = DECODE_DEFAULTS["prompts"] if prompts is None else prompts
    cfg.decode_n_gen = DECODE_DEFAULTS["n_gen"] if tokens is None else tokens
    cfg.decode_n_prompt = DECODE_DEFAULTS["n_prompt"] if prompt_tokens is None else prompt_tokens
    if kld_depths is not None and kld_depths.strip().lower() in ("none", "off"):
        cfg.kld_depths = ()
    else:
        cfg.kld_depths = (tuple(sorted(set(ints(kld_depths, "--kld-depths")))) if kld_depths is not None
                          else (CPU_DEPTHS if cfg.ngl == 0 else GPU_DEPTHS))
        check_depths(cfg.kld_depths)
    cfg.depth_pairs = parse_pairs(depth_pairs or DEPTH_PAIRS) if cfg.kld_depths else []


def check_inputs(cfg) -> None:
    """Before any tool runs: the context fits the model's trained length (bench depths too) and the corpus
    is UTF-8 text long enough for ctx x chunks, the model is a readable GGUF, the cache types exist, and ctx x chunks
    gives llama-perplexity the 100 scored tokens it needs to print KLD (harness.runners.sweep_config.check_kld_size)."""
    from harness.runners import sweep as sweep_runner
    sweep_runner.check_kld_size(cfg.ctx, cfg.chunks)
    from harness.runners.inputs import check_corpus, read_model_info
    try:
        known = set(sweep_runner.type_traits(str(cfg.bdir)))
    except HarnessError:
        known = set()  # the build cannot be read here: the sweep reports it
    bad = [t for k, v in cfg.pairs for t in sweep_runner.split_pair(k, v)[:2] if known and t not in known]
    bad_d = [t for k, v in cfg.depth_pairs for t in sweep_runner.split_pair(k, v)[:2] if known and t not in known]
    if bad or bad_d:
        raise HarnessError(f"{'--pairs' if bad else '--depth-pairs'}: unknown cache type {(bad or bad_d)[0]!r}: this build knows "
                           f"{', '.join(t for t in sorted(known) if t.startswith(('f1', 'bf', 'q4', 'q5', 'q8', 'iq4', 'turbo')))}")
    info = read_model_info(cfg.model)  # a missing or non-GGUF model: one line, before anything runs
    if info.n_ctx_train:
        if cfg.ctx > info.n_ctx_train:
            raise HarnessError(f"--ctx {cfg.ctx} is beyond the {info.n_ctx_train} tokens {info.name} was trained for "
                               f"({info.arch}.context_length in {Path(cfg.model).name}): give --ctx {info.n_ctx_train} or less")
        deepest = max(cfg.depths) + max(cfg.n_prompt, cfg.n_gen)
        if cfg.bench and deepest > info.n_ctx_train:
            raise HarnessError(f"--depths {max(cfg.depths)} plus the {max(cfg.n_prompt, cfg.n_gen)}-token bench test is beyond the "
                               f"{info.n_ctx_train} tokens {info.name} was trained for: give smaller --depths or --no-bench")
        if cfg.kld_depths and max(cfg.kld_depths) > info.n_ctx_train:
            raise HarnessError(f"--kld-depths {max(cfg.kld_depths)} is beyond the {info.n_ctx_train} tokens {info.name} was "
                               f"trained for: give lengths up to {info.n_ctx_train} (or --kld-depths none)")
        if cfg.decode_prompts and cfg.decode_n_prompt + cfg.decode_n_gen > info.n_ctx_train:
            raise HarnessError(f"--decode-prompt-tokens {cfg.decode_n_prompt} + --decode-tokens {cfg.decode_n_gen} is beyond "
                               f"the {info.n_ctx_train} tokens {info.name} was trained for: give fewer tokens")
    check_corpus(cfg.corpus, cfg.ctx, cfg.chunks)
    if cfg.kld_depths:
        from harness.runners.depth import depth_tokens
        try:
            check_corpus(cfg.corpus, max(cfg.kld_depths), depth_tokens(cfg.kld_depths) // max(cfg.kld_depths))
        except HarnessError as e:
            raise HarnessError(f"{e} (for --kld-depths {','.join(map(str, cfg.kld_depths))}; or --kld-depths none)") from None
    if cfg.decode_prompts:
        from harness.runners.decode import corpus_prompts
        corpus_prompts(cfg.corpus, cfg.decode_prompts, cfg.decode_n_prompt)
