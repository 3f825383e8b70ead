"""The sweep's inputs checked before any tool runs (``turbo-harness sweep``, harness/cli_sweep.py): the decode and
depth options turned into the configuration, the model, corpus, cache types and lengths checked against each
other, and an earlier sweep report in the --out folder kept (:func:`keep_earlier_pairs`). Every problem is a
:class:`~harness.errors.HarnessError` with one line naming it and the fix (exit 2)."""
from __future__ import annotations

import json
from pathlib import Path

from harness.errors import HarnessError


def ints(s: str, opt: str = "--depths", example: str = "0,256") -> tuple[int, ...]:
    """Comma-separated non-negative integers of option ``opt`` ('0,256' -> (0, 256)); ``example`` is the value the
    message suggests, one the option accepts (--kld-depths refuses 0: :data:`KLD_DEPTHS_EXAMPLE`).
    Raises HarnessError (one line)."""
    try:
        vals = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise HarnessError(f"{opt} {s!r}: give comma-separated integers, e.g. {example}") from None
    if not vals or min(vals) < 0:
        raise HarnessError(f"{opt} {s!r}: give comma-separated non-negative integers, e.g. {example}")
    return vals


# what a bad --kld-depths is told to give: lengths the depth runner accepts (not 0: harness/runners/depth.py
# check_depth_values), and the word that turns it off, alone
KLD_DEPTHS_EXAMPLE = "256,1024 (or 'none' alone to turn KLD vs depth off)"


def check_option_combinations(opts: dict, ctx: int) -> None:
    """Options that contradict each other or do nothing with the others, refused before anything runs (README "Every
    command checks its input"; an option that does not apply is refused, as ``check PQ3 --model`` is).

    Args:
        opts: the sweep's options as given on the command line (None = not given): 'batch', 'ubatch', 'reps',
            'depths', 'no_bench', 'decode_prompts', 'decode_tokens', 'decode_prompt_tokens', 'kld_depths',
            'depth_pairs'.
        ctx: the context (given or default): the batch when --batch is not given.
    Raises:
        HarnessError: one line naming the options and the fix:
        - --ubatch above the batch: llama caps the micro-batch at the batch (src/llama-context.cpp
          ``n_ubatch = min(n_batch, n_ubatch)``), so the recorded -ub would not be what ran;
        - --depth-pairs with --kld-depths none; --decode-tokens / --decode-prompt-tokens with --decode-prompts 0;
          --reps / --depths with --no-bench: they would be accepted and do nothing.
    """
    batch = opts.get("batch") or ctx
    if opts.get("ubatch") and opts["ubatch"] > batch:
        src = f"--batch {batch}" if opts.get("batch") else f"the batch (--batch, default --ctx {ctx})"
        raise HarnessError(f"--ubatch {opts['ubatch']} is above {src}: llama requires ubatch <= batch (it would cap "
                           f"the micro-batch at {batch}); give --ubatch {batch} or less, or a larger --batch")
    kd = opts.get("kld_depths")
    idle = []
    if opts.get("depth_pairs") is not None and kd is not None and kd.strip().lower() in ("none", "off"):
        idle.append(("--depth-pairs", f"--kld-depths {kd.strip()}", "give --kld-depths lengths or drop --depth-pairs"))
    if opts.get("decode_prompts") == 0:
        for o in ("decode_tokens", "decode_prompt_tokens"):
            if opts.get(o) is not None:
                idle.append((f"--{o.replace('_', '-')}", "--decode-prompts 0", "drop one of them"))
    if opts.get("no_bench"):
        for o in ("reps", "depths"):
            if opts.get(o) is not None:
                idle.append((f"--{o}", "--no-bench", f"drop --{o} (llama-bench options) or --no-bench"))
    if idle:
        opt, other, fix = idle[0]
        raise HarnessError(f"{opt} does nothing with {other} (it turns that part off): {fix}")


def decode_depth_options(cfg, prompts, tokens, prompt_tokens, kld_depths, depth_pairs) -> None:
    """Set the decode-agreement and depth settings of ``cfg`` from the options (defaults: harness/runners/decode.py
    DECODE_DEFAULTS, harness/runners/depth.py CPU_DEPTHS/GPU_DEPTHS/DEPTH_PAIRS); the numbers' minima were checked
    while parsing (harness.cli_types.AtLeast). Raises HarnessError for bad depths."""
    from harness.runners.decode import DECODE_DEFAULTS
    from harness.runners.depth import CPU_DEPTHS, DEPTH_PAIRS, GPU_DEPTHS, check_depth_values
    from harness.runners.sweep import parse_pairs
    cfg.decode_prompts = DECODE_DEFAULTS["prompts"] if prompts is None else prompts
    cfg.decode_n_gen = DECODE_DEFAULTS["n_gen"] if tokens is None else tokens
    cfg.decode_n_prompt = DECODE_DEFAULTS["n_prompt"] if prompt_tokens is None else prompt_tokens
    if kld_depths is not None and kld_depths.strip().lower() in ("none", "off"):
        cfg.kld_depths = ()
    else:
        given = ints(kld_depths, "--kld-depths", KLD_DEPTHS_EXAMPLE) if kld_depths is not None else None
        if given is not None:
            check_depth_values(given)  # a repeat is refused, never dropped; the lengths' arithmetic: check_inputs
        cfg.kld_depths = tuple(sorted(given)) if given is not None else (CPU_DEPTHS if cfg.ngl == 0 else GPU_DEPTHS)
    cfg.depth_pairs = parse_pairs(depth_pairs or DEPTH_PAIRS) if cfg.kld_depths else []


def check_inputs(cfg, given: tuple[str, ...] = ("--depths", "--kld-depths")) -> None:
    """Before any tool runs: the context fits the model's trained length (bench depths too) and the corpus
    is UTF-8 text long enough for ctx x chunks, the model is a readable GGUF, the cache types exist, and ctx x chunks
    gives llama-perplexity the 100 scored tokens it needs to print KLD (harness.runners.sweep_config.check_kld_size).
    ``given``: which of --depths and --kld-depths were on the command line (a default length beyond the model is named
    as the default)."""
    from harness.runners import sweep as sweep_runner
    sweep_runner.check_kld_size(cfg.ctx, cfg.chunks)
    from harness.runners.inputs import check_corpus, read_model_info
    from harness.runners.kv_cache_types import kv_cache_types
    kv, where = kv_cache_types(cfg.bdir)  # what -ctk/-ctv accept, from the build's llama-perplexity or its source
    try:
        known = set(kv) or set(sweep_runner.type_traits(str(cfg.bdir)))
    except HarnessError:
        known = set()  # the build cannot be read here: the sweep reports it
    for opt, pairs in (("--pairs", cfg.pairs), ("--depth-pairs", cfg.depth_pairs)):
        bad = [t for k, v in pairs for t in sweep_runner.split_pair(k, v)[:2] if known and t not in known]
        if bad and kv:
            raise HarnessError(f"{opt}: {bad[0]!r} is not a K/V cache type of this build: -ctk/-ctv accept "
                               f"{', '.join(kv)} ({where})")
        if bad:
            shown = ", ".join(t for t in sorted(known) if t.startswith(("f1", "bf", "q4", "q5", "q8", "iq4", "turbo")))
            raise HarnessError(f"{opt}: unknown cache type {bad[0]!r}: this build knows {shown}")
    info = read_model_info(cfg.model)  # a missing or non-GGUF model: one line, before anything runs
    if info.n_ctx_train:
        if cfg.ctx > info.n_ctx_train:
            raise HarnessError(f"--ctx {cfg.ctx} is beyond the {info.n_ctx_train} tokens {info.name} was trained for "
                               f"({info.arch}.context_length in {Path(cfg.model).name}): give --ctx {info.n_ctx_train} or less")
        deepest = max(cfg.depths) + max(cfg.n_prompt, cfg.n_gen)
        if cfg.bench and deepest > info.n_ctx_train:
            what = (f"--depths {max(cfg.depths)}" if "--depths" in given else
                    f"the default bench depth {max(cfg.depths)} (of {','.join(map(str, cfg.depths))}, for "
                    f"{'offloaded layers' if cfg.ngl else 'the CPU'})")
            raise HarnessError(f"{what} plus the {max(cfg.n_prompt, cfg.n_gen)}-token bench test is beyond the "
                               f"{info.n_ctx_train} tokens {info.name} was trained for: give --depths up to "
                               f"{max(0, info.n_ctx_train - max(cfg.n_prompt, cfg.n_gen))} or --no-bench")
        if cfg.kld_depths and max(cfg.kld_depths) > info.n_ctx_train:
            what = "--kld-depths" if "--kld-depths" in given else "the default --kld-depths length"
            raise HarnessError(f"{what} {max(cfg.kld_depths)} is beyond the {info.n_ctx_train} tokens {info.name} was "
                               f"trained for: give lengths up to {info.n_ctx_train} (or --kld-depths none)")
        if cfg.decode_prompts and cfg.decode_n_prompt + cfg.decode_n_gen > info.n_ctx_train:
            raise HarnessError(f"--decode-prompt-tokens {cfg.decode_n_prompt} + --decode-tokens {cfg.decode_n_gen} is beyond "
                               f"the {info.n_ctx_train} tokens {info.name} was trained for: give fewer tokens")
    if cfg.kld_depths:  # after the model's context: a length beyond it is named before any arithmetic of the lengths
        from harness.runners.depth import check_depths
        check_depths(cfg.kld_depths)
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


def _earlier_settings(d: dict, run_dir: Path) -> tuple[dict, list[str]]:
    """The settings and pair labels of the sweep report ``d`` (a run.json read from ``run_dir``): a one-backend sweep
    (check SWEEP: ``meta.pinned``, ``meta.pairs``) or a cross-backend one (check XBACKEND: ``meta.sides``,
    ``meta.backends`` and the pairs of its first backend's own report, else of its rows)."""
    meta = d.get("meta") or {}
    if "XBACKEND" in [c.get("id") for c in d.get("checks") or []]:
        names = [str(b) for b in meta.get("backends") or []]
        side = (meta.get("sides") or {}).get(names[0] if names else "", {})
        pairs: list[str] = []
        try:
            pairs = list(json.loads((run_dir / names[0] / "run.json").read_text())["meta"]["pairs"])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            rows = ((d.get("sections") or {}).get("xbackend") or {}).get("rows") or []
            pairs = list(dict.fromkeys(str(r["pair"]) for r in rows if isinstance(r, dict) and r.get("pair")))
        return {"ctx": side.get("ctx"), "chunks": side.get("chunks"), "backend": ",".join(names)}, pairs
    pinned = meta.get("pinned") or {}
    return ({"ctx": pinned.get("ctx"), "chunks": pinned.get("chunks"), "backend": meta.get("target_backend")},
            [str(p) for p in meta.get("pairs") or []])


def keep_earlier_pairs(run_dir: Path, cfg, names: list[str] | None = None) -> list[str]:
    """A sweep into a folder that holds an earlier sweep report keeps that report's pairs: they are added to
    ``cfg.pairs`` (the earlier ones first, in their order, then the new ones), so the new report holds the union; a
    pair measured before comes from the job cache (harness/runners/sweep.py), or is measured again where the cache
    lacks it. Only an earlier sweep of the same model and corpus (SHA-256), ctx, chunks and backend(s) is added to:
    another one is refused, and nothing is written.

    Args:
        run_dir: the --out folder (prepared and locked: :func:`harness.pipeline.prepare_run_dir`).
        cfg: the new sweep's :class:`harness.runners.sweep_config.SweepConfig` (``pairs`` is extended in place).
        names: the backends of a cross-backend sweep (``--backends``), else None.
    Returns:
        The labels of the earlier pairs this run did not ask for (added to ``cfg.pairs``); [] when there is no
        earlier sweep report.
    Raises:
        HarnessError: the earlier sweep was made with other settings (one line naming them and the fix).
    """
    from harness.runners.inputs import sha256_file
    from harness.runners.sweep import pair_label, parse_pairs
    p = Path(run_dir) / "run.json"
    if not p.is_file():
        return []
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return []  # prepare_run_dir refused an unreadable one already
    if not isinstance(d, dict) or not {"SWEEP", "XBACKEND"} & {c.get("id") for c in d.get("checks") or []}:
        return []
    old, pairs = _earlier_settings(d, Path(run_dir))
    meta = d.get("meta") or {}
    new = {"ctx": cfg.ctx, "chunks": cfg.chunks, "backend": ",".join(names) if names else cfg.backend}
    differ = [f"{k} {old[k]} there, {new[k]} here" for k in ("ctx", "chunks", "backend") if old[k] != new[k]]
    for what, path in (("model", cfg.model), ("corpus", cfg.corpus)):
        there = meta.get(f"{what}_sha256")
        try:
            same = sha256_file(Path(path)) == there if there else str(meta.get(what)) == str(path)
        except OSError:
            same = False
        if not same:
            differ.append(f"{what} {Path(str(meta.get(what) or '?')).name} there, {Path(path).name} here"
                          + (" (other contents)" if Path(str(meta.get(what) or "")).name == Path(path).name else ""))
    if differ:
        raise HarnessError(f"--out {run_dir} holds a sweep of other settings ({'; '.join(differ)}): a sweep there "
                           f"would replace its pairs; give another --out folder, or the same settings to add pairs to it")
    asked = [pair_label(k, v) for k, v in cfg.pairs]
    kept = [x for x in dict.fromkeys(pairs) if x not in asked]
    if kept:
        cfg.pairs = parse_pairs(",".join(list(dict.fromkeys(pairs)) + [x for x in asked if x not in pairs]))
    return kept
