"""``turbo-harness sweep``: model-level PPL/KLD/speed/KV-memory sweep over K/V cache-type pairs.

Loaded by harness/cli.py when named (``LAZY_COMMANDS``); the run goes through :mod:`harness.pipeline`. Exit codes: 0 no FAIL/ERROR, 1 a FAIL
(or PARTIAL with --strict), 2 an ERROR or bad usage, 130 / 143 interrupted by SIGINT / SIGTERM (the
partial report is written, marked INTERRUPTED with the jobs not run; finished jobs stay cached).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import click

from harness.cli_types import AtLeast, BackendName, CommaList, ModelArg, OutputDir, ReportDir, Seconds
from harness.errors import HarnessError
from harness.fork import backends
from harness.sweep_inputs import ints as _ints


def _pairs(s: str):
    """--pairs / --depth-pairs checked while parsing (harness.runners.sweep.parse_pairs)."""
    from harness.runners.sweep import parse_pairs
    return parse_pairs(s)


def _endpoints(s: str):
    """--rpc checked while parsing: HOST:PORT entries, no server named twice (harness.fork.rpc.parse_endpoints)."""
    from harness.fork import rpc as R
    return R.parse_endpoints(s)


def _backends(s: str):
    """--backends checked while parsing (names, repeats); whether rpcN has its --rpc server is checked in the command."""
    from harness.runners.xbackend import parse_backends
    return parse_backends(s, n_rpc=1 << 30)


def _kld_depths(s: str):
    """--kld-depths checked while parsing: non-negative integers, each once, that the depth runner accepts whatever
    the model (harness.runners.depth.check_depth_values); the rest is checked with the model (sweep_inputs)."""
    from harness.runners.depth import check_depth_values
    from harness.sweep_inputs import KLD_DEPTHS_EXAMPLE
    check_depth_values(_ints(s, "--kld-depths", KLD_DEPTHS_EXAMPLE))


def _default_depth_pairs() -> str:
    """The default --depth-pairs, for the help text (read from harness/runners/depth.py, not a placeholder)."""
    try:
        from harness.runners.depth import DEPTH_PAIRS
        return str(DEPTH_PAIRS)
    except ImportError:
        return "see README"


def build_run(result, run_id: str, argv: list[str]):
    """Turn a SweepResult into a :class:`harness.report.model.Run` with check 'SWEEP' and
    ``sections['sweep']`` (evidence copied into the run folder is added by :func:`write_reports`).

    The metadata names the GPU and driver (nvidia-smi / rocm-smi, as verify does), the backend the tools
    ran on (the build's backend when layers are offloaded, else cpu), the build's CMake options and
    compiler from its record; an interrupted result gives an interrupted Run (exit 130 / 143)."""
    from harness import __version__
    from harness.checks.sweeps import judge_sweep
    from harness.fork.build import read_build_meta
    from harness.report.model import Run
    from harness.runners.offload import backends_run
    from harness.verify import gpu_info

    cr, section = judge_sweep(result)
    cfg = result.config
    bmeta = read_build_meta(cfg.bdir)
    cmake = result.meta.get("cmake_options", bmeta.get("cmake_options"))
    meta = {**result.meta, "harness_version": __version__, "command_line": " ".join(argv),
            "python": platform.python_version(), "host": platform.node(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "jobs_run": result.jobs_run, "jobs_cached": result.jobs_cached,
            "jobs_failed": result.jobs_failed,
            "sweep_seconds": round(result.seconds, 1), "target_backend": cfg.backend,
            "backends_run": backends_run(cfg, bmeta.get("backend")),
            "gpu": gpu_info(), "cxx_compiler": bmeta.get("cxx_compiler") or result.meta.get("compiler") or None,
            "cuda_compiler": bmeta.get("cuda_compiler"),
            "cmake_options": cmake if isinstance(cmake, list) else [f"(not recorded; CMakeCache.txt sha256 {cmake})"],
            "baselines_added": list(cfg.baselines_added), "no_baselines": cfg.no_baselines}
    if cfg.device_facts:  # the Vulkan line of the report's facts, as verify --target vulkan writes it
        meta["target"] = {"vulkan": {k: cfg.device_facts[k] for k in ("driver", "visible_devices") if cfg.device_facts.get(k)}}
        if bmeta.get("vulkan"):
            meta["vulkan"] = bmeta["vulkan"]
    run = Run(run_id=run_id, meta=meta, interrupted=result.interrupted)
    run.checks.append(cr)
    for name in ("decode", "depth"):  # sections of their own: rendered from their 'markdown' by every renderer
        if name in section:
            run.sections[name] = section.pop(name)
    run.sections["sweep"] = section
    return run


def write_reports(run, result, run_dir: Path) -> dict[str, Path]:
    """Copy evidence, write sweep.csv, speed.csv, report.html (with plots/*.png) and run.json (plus
    summary.md/junit.xml through harness.report.render.write_all when it is present)."""
    import pandas as pd

    from harness.report.html import write_html
    from harness.runners.sweep import copy_evidence

    run_dir.mkdir(parents=True, exist_ok=True)
    ev = copy_evidence(result, run_dir)
    run.sections["sweep"]["evidence"] = ev
    # point cells at the copies inside the run folder
    for cell in run.checks[0].cells:
        if cell.path.endswith((":decode", ":perplexity-depth")):  # decode / depth jobs: every run of that pair
            kind = "decode" if cell.path.endswith(":decode") else "depth"
            cell.evidence = [p for key, ps in ev.items() if key.split(":", 1)[0] == kind
                             and key.split(":", 1)[1].split("@")[0] == cell.type for p in ps] or cell.evidence
            continue
        kind = "bench" if cell.path.endswith(":bench") else "ppl"
        cell.evidence = ev.get(f"{kind}:{cell.type}", cell.evidence)
    if "depth" in run.sections:
        from harness.checks.depth import depth_plot
        depth_plot(run.sections["depth"], run_dir / "plots")
    out = {}
    rows = run.sections["sweep"]["rows"]
    pd.DataFrame(rows).to_csv(run_dir / "sweep.csv", index=False)
    out["csv"] = run_dir / "sweep.csv"
    if run.sections["sweep"]["speed"]:
        pd.DataFrame(run.sections["sweep"]["speed"]).to_csv(run_dir / "speed.csv", index=False)
    try:
        from harness.report.render import write_all
    except ImportError:
        write_all = None
    if write_all is not None:
        for p in write_all(run, run_dir):
            out[p.name] = p
    if "report.html" not in out:
        out["report.html"] = write_html(run, run_dir)
    if not (run_dir / "run.json").is_file():
        (run_dir / "run.json").write_text(json.dumps(run.to_dict(), indent=1, default=str))
    out["run.json"] = run_dir / "run.json"
    return out


@click.command("sweep")
@click.option("--model", default=None, type=ModelArg(),
              help="smollm2 | gemma3 (known models, checks/models.toml) or a GGUF path (default: smollm2).")
@click.option("--corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Plain-text corpus (default: $TURBO_CORPUS, else ../shared/data/wikitext-2-raw/wiki.test.raw).")
@click.option("--ctx", type=AtLeast(16, "tokens per perplexity chunk"), default=None, help="Context per perplexity chunk (CPU 256, GPU 512).")
@click.option("--chunks", type=AtLeast(2, "llama-perplexity prints KLD statistics only for 2+ chunks"), default=None,
              help="Chunks of the corpus (CPU 8, GPU 64; at least 2: llama-perplexity prints KLD only for 2+).")
@click.option("--pairs", default=None, type=CommaList("K/V pair", check=_pairs), help="Comma-separated K/V pairs, e.g. f16/f16,q8_0/turbo3 (one name = K=V).")
@click.option("--ngl", type=AtLeast(0, "layers offloaded"), default=None, help="Layers offloaded to the GPU (CPU backend 0, else 99).")
@click.option("--depths", default=None, type=CommaList("depth", check=_ints), help="llama-bench depths, comma-separated (CPU 0,256; GPU 0,2048,8192).")
@click.option("--threads", type=AtLeast(1, "CPU threads"), default=None, help="CPU threads (default: all cores).")
@click.option("--reps", type=AtLeast(1, "llama-bench repetitions"), default=None, help="llama-bench repetitions (CPU 3, GPU 5).")
@click.option("--batch", type=AtLeast(1, "-b, tokens per batch"), default=None, help="-b (default: ctx, one sequence per pass).")
@click.option("--ubatch", type=AtLeast(1, "-ub, tokens per micro-batch"), default=None, help="-ub (default: min(batch, 512)).")
@click.option("--fresh", is_flag=True, help="Ignore cached results and rerun every job.")
@click.option("--fork-defaults", is_flag=True,
              help="Leave TURBO_AUTO_ASYMMETRIC/TURBO_LAYER_ADAPTIVE/TURBO_SPARSE_V unset (the fork may change types).")
@click.option("--backend", default=None, type=BackendName(), help=f"Build folder backend: {backends.choices(', ')} (default: detected).")
@click.option("--build-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Build folder holding bin/llama-perplexity (default: build/<backend>).")
@click.option("--out", "out_dir", type=ReportDir(path_type=Path), default=None,
              help="Report folder, as for verify (default: reports/<run-id>).")
@click.option("--known", "known_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Known-findings file: accepted findings are XFAIL, anything else non-PASS fails (README 'Known findings').")
@click.option("--timeout", type=Seconds(1.0, open_=False), default=None, help="Seconds per tool call before it is killed (CPU 900).")
@click.option("--no-bench", is_flag=True, help="Skip llama-bench (quality and memory only).")
@click.option("--no-baselines", is_flag=True,
              help="Run only the pairs given: do not add f16/f16 and q8_0/q8_0 (without q8_0 nothing is judged: SKIP).")
@click.option("--strict", is_flag=True, help="Exit 1 on PARTIAL too.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--rpc", "rpc", default=None, metavar="HOST:PORT[,...]", type=CommaList("HOST:PORT", check=_endpoints),
              help="Offload to the devices of these rpc-servers (the fork's own --rpc of llama-perplexity and "
                   "llama-bench; the build needs RPC: make build RPC=1); README 'Remote devices'.")
@click.option("--decode-prompts", type=AtLeast(0, "0 = no decode"), default=None,
              help="Corpus prompts for the greedy-decode agreement per pair (default 3; 0 = no decode).")
@click.option("--decode-tokens", type=AtLeast(1, "tokens generated per prompt"), default=None, help="Tokens generated per decode prompt (default 32).")
@click.option("--decode-prompt-tokens", type=AtLeast(1, "prompt tokens per prompt"), default=None, help="Prompt tokens per decode prompt (default 64).")
@click.option("--kld-depths", default=None, type=CommaList("context length", check=_kld_depths, none_words=("none", "off")),
              help="Context lengths for KLD vs depth, comma-separated, on the same 2 x longest tokens "
                   "(CPU 256,1024; GPU 512,4096; 'none' = off).")
@click.option("--depth-pairs", default=None, type=CommaList("K/V pair", check=_pairs),
              help=f"Pairs measured at every --kld-depths length (default {_default_depth_pairs()}).")
@click.option("--backends", "backends_spec", default=None, metavar="A,B[,...]", type=CommaList("backend", check=_backends),
              help=f"Cross-backend sweep: the same pairs on each backend ({backends.choices(', ')}, rpcN = the N-th "
                   f"--rpc server), each scored against the first one's logits of the pair; noise floor f16/f16 A vs B.")
@click.option("--target", "target", default=None, type=BackendName(),
              help="With --backends: the backend under test (default the second).")
def sweep(model, corpus, ctx, chunks, pairs, ngl, depths, threads, reps, batch, ubatch, fresh, fork_defaults, backend,
          build_dir, out_dir, known_file, timeout, no_bench, no_baselines, strict, no_progress, rpc, decode_prompts,
          decode_tokens, decode_prompt_tokens, kld_depths, depth_pairs, backends_spec, target):
    """Model-level sweep: PPL ± se, KL divergence vs an f16-cache baseline, top-1 agreement, KV memory
    and prefill/decode speed ratio to q8_0 for K/V cache-type pairs, with the fork's own tools."""
    from harness.fork.build import build_dir as default_build_dir, detect_backend, has_rpc as fb_has_rpc
    from harness.runners.inputs import default_corpus
    from harness.runners.models import resolve_model
    from harness.interrupt import Interrupted, acknowledge, interruptible
    from harness.runners.sweep import (CPU_DEFAULTS, DEFAULT_PAIRS, GPU_DEFAULTS, SweepConfig, parse_pairs, run_sweep,
                                       with_baselines)

    from harness import pipeline, usage
    from harness.known import load_known

    marked = None  # the --out folder whose earlier report this sweep marked RUNNING (harness.unfinished)
    try:
        from harness.fork import rpc as R
        endpoints = R.parse_endpoints(rpc)
        from harness.cli_xbackend import cross_names, rpc_build_dir
        names, backend = cross_names(backends_spec, backend, target, endpoints)
        backend = usage.backend_name(backend, "--backend") or detect_backend()
        warn = R.security_warning(endpoints)
        if warn:
            click.echo(f"warning: {warn}", err=True)
        ngl = ngl if ngl is not None else (0 if backend == "cpu" and not endpoints else 99)
        dflt = CPU_DEFAULTS if ngl == 0 else GPU_DEFAULTS
        from harness.sweep_inputs import check_option_combinations
        check_option_combinations(dict(batch=batch, ubatch=ubatch, reps=reps, depths=depths, no_bench=no_bench,
                                       decode_prompts=decode_prompts, decode_tokens=decode_tokens,
                                       decode_prompt_tokens=decode_prompt_tokens, kld_depths=kld_depths,
                                       depth_pairs=depth_pairs), dflt["ctx"] if ctx is None else ctx)
        bdir = build_dir or default_build_dir(backend)
        bdir = rpc_build_dir(names, endpoints, build_dir) or bdir  # --backends with rpcN: the build with ggml RPC
        if build_dir is None and not (bdir / "bin" / "llama-perplexity").is_file() and backend != detect_backend():
            raise HarnessError(f"--backend {backend}: no {backend} build in {bdir}; {usage.backend_fix(backend)}")
        if ngl and backend == "cpu" and not endpoints and not names:  # GPU defaults for a build that cannot use them
            from harness.runners.offload import build_gpu_backends
            if not build_gpu_backends(bdir):
                gpus = "|".join(b.name for b in backends.TABLE if b.name != "cpu")
                raise HarnessError(f"--ngl {ngl}: the cpu build {bdir} has no GPU backend to offload layers to (every "
                                   f"layer would run on the CPU, sized by the GPU defaults): drop --ngl, or give "
                                   f"--backend {gpus} with a build of it (`BACKEND=<name> make build` on a machine with "
                                   f"that GPU), or offload to an rpc-server with --rpc HOST:PORT")
        if endpoints and not fb_has_rpc(bdir):
            raise HarnessError(f"--rpc needs a build with ggml's RPC backend, and {bdir} has none: rebuild it with "
                               f"`turbo-harness build --rpc` (or `make build RPC=1`)")
        from harness.runners.rpc_server import reachable
        for ep in endpoints:  # the fork's tools carry on without an unreachable server: the sweep would run locally
            if not reachable(ep):
                raise HarnessError(f"--rpc {ep}: nothing accepts connections there: start the fork's rpc-server "
                                   f"there (README 'Remote devices') or fix the address")
        known = load_known(known_file) if known_file else None
        cfg = SweepConfig(
            model=resolve_model(model),
            corpus=Path(corpus) if corpus else default_corpus(),
            pairs=parse_pairs(DEFAULT_PAIRS if pairs is None else pairs), bdir=bdir, backend=backend,
            no_baselines=no_baselines,
            ctx=dflt["ctx"] if ctx is None else ctx, chunks=dflt["chunks"] if chunks is None else chunks,
            depths=_ints(depths) if depths is not None else dflt["depths"], reps=dflt["reps"] if reps is None else reps,
            n_prompt=dflt["n_prompt"], n_gen=dflt["n_gen"], threads=threads or (os.cpu_count() or 1), ngl=ngl,
            batch=batch or 0, ubatch=ubatch or 0, fresh=fresh, fork_defaults=fork_defaults,
            timeout=dflt["timeout"] if timeout is None else timeout, bench=not no_bench, rpc=endpoints)
        from harness.sweep_inputs import check_inputs, decode_depth_options
        decode_depth_options(cfg, decode_prompts, decode_tokens, decode_prompt_tokens, kld_depths, depth_pairs)
        check_inputs(cfg, given=tuple(o for o, v in (("--depths", depths), ("--kld-depths", kld_depths)) if v is not None))
        run_id = time.strftime("sweep-%Y%m%d-%H%M%S")
        from harness.cli import REPORTS  # TURBO_REPORTS, else the checkout's reports/ (as verify's)
        run_dir, _ = pipeline.prepare_run_dir(Path(out_dir) if out_dir else REPORTS / run_id, "sweep")
        from harness.sweep_inputs import keep_earlier_pairs
        kept = keep_earlier_pairs(run_dir, cfg, names)  # the earlier sweep's pairs stay in the report (same settings)
        if kept:
            click.echo(f"note: {run_dir} holds a sweep of the same model, corpus, ctx, chunks and backend: its pairs "
                       f"{', '.join(kept)} stay in the report (from the job cache; measured again where it lacks them)",
                       err=True)
        from harness.unfinished import mark_folder_running, unmark_folder
        if mark_folder_running(run_dir):  # the report is written at the end: until then the folder's says RUNNING
            marked = run_dir
        if not no_baselines:
            cfg.pairs, cfg.baselines_added = with_baselines(cfg.pairs)
            if cfg.baselines_added:
                from harness.runners.sweep_config import baselines_note
                click.echo(f"note: {baselines_note(cfg.baselines_added)}", err=True)
        if names:
            from harness.cli_xbackend import CrossOptions, run_cross
            sys.exit(run_cross(cfg, CrossOptions(names, endpoints, target, build_dir, run_dir, strict, not no_progress,
                                                 known, known_file), sys.argv))
        resume = ("rerun without --fresh to resume (with --fresh every job runs again)" if fresh
                  else "rerun the same command to resume")
        with interruptible():  # SIGINT / SIGTERM: kill the tool, keep the cache, write the partial report
            try:
                result = run_sweep(cfg, progress=not no_progress, log=lambda s: click.echo(s, err=True))
            except (Interrupted, KeyboardInterrupt) as e:
                acknowledge()
                result = getattr(e, "sweep_result", None)
                code = getattr(e, "exit_code", 130)
                if result is None:
                    if marked is not None:  # nothing ran: the folder's earlier report stands as it was
                        unmark_folder(marked)
                    click.echo(f"interrupted by {getattr(e, 'name', 'SIGINT')} before any job ran; {resume}", err=True)
                    sys.exit(code)
                run = build_run(result, run_dir.name, sys.argv)
                paths = {}
                code = pipeline.finish(run, run_dir, strict=strict,
                                       write=lambda r, d: paths.update(write_reports(r, result, d)))
                i = result.interrupted
                click.echo(f"SWEEP INTERRUPTED by {i['signal']}: {len(i['not_run'])} jobs not run "
                           f"({', '.join(i['not_run'])}); the jobs that finished are cached: {resume}; "
                           f"partial report {paths['summary.md'] if 'summary.md' in paths else paths['report.html']}", err=True)
                sys.exit(code)
            acknowledge()  # every job ran: a signal now would only cut the report short (about a second)
            run = build_run(result, run_dir.name, sys.argv)
            paths = {}
            code = pipeline.finish(run, run_dir, known, known_file, strict,
                                   write=lambda r, d: paths.update(write_reports(r, result, d)))
    except HarnessError as e:
        if marked is not None:  # the sweep wrote nothing of its own: the folder's earlier report stands as it was
            from harness.unfinished import unmark_folder
            unmark_folder(marked)
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    from harness.interrupt import hold_until_exit
    hold_until_exit()  # the report is written and its exit code decided: a late signal must not contradict them
    from harness.report.findings import headline
    from harness.report.facts import sweep_setup_line
    sec = run.sections["sweep"]
    for ln in headline(run):  # the answer first: the verdict and one line per finding
        click.echo(ln)
    click.echo(sweep_setup_line(run))
    from harness.report.render import sweep_table_text
    click.echo(sweep_table_text(sec))
    from harness.runners.sweep_config import baselines_note
    said = {baselines_note(result.config.baselines_added)} if result.config.baselines_added else set()
    for n in sec.get("notes", []):
        if n not in said:  # said when the sweep started
            click.echo(f"note: {n}")
    for name in ("decode", "depth"):  # their tables as summary.md has them
        if isinstance(run.sections.get(name), dict) and run.sections[name].get("markdown"):
            click.echo("\n" + run.sections[name]["markdown"])
    failed = f" ({result.jobs_failed} failed: never cached, a rerun runs them again)" if result.jobs_failed else ""
    from harness.report.findings import gate_summary  # with --known, the gate's word as the exit code gives it
    click.echo(f"SWEEP {gate_summary(run)}: {result.jobs_run} jobs run{failed}, {result.jobs_cached} cached, "
               f"{result.seconds:.1f} s; report {paths['report.html']}")
    sys.exit(code)


# what sweep-compare writes (harness/report/compare.py write_compare): an --out folder may hold these and nothing else
COMPARE_FILES = ("compare.md", "kld_vs_bits_models.png")


@click.command("sweep-compare")
@click.argument("run_dirs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=OutputDir(COMPARE_FILES, "sweep-compare", path_type=Path), default=None,
              help="Folder for compare.md and kld_vs_bits_models.png: new, empty, or holding only an earlier "
                   "sweep-compare's (default: reports/compare-<time>).")
def sweep_compare(run_dirs, out_dir):
    """Sweeps of several models side by side: one table per model (PPL, KLD, top-1, bits per real value, vs-q4_0
    verdicts, decode agreement) and KLD vs bits per real value with every pair, one line per model. Reads the
    run.json of each sweep report folder (e.g. reports/samples/sweep-cpu-smollm2 reports/samples/sweep-cpu-gemma3)."""
    from harness.report.compare import compare_warnings, write_compare
    try:
        from harness.cli_compare import comparison_dir
        from harness.cli_types import distinct_folders
        distinct_folders(run_dirs, "sweep report folder")  # the same sweep twice compares nothing
        out = comparison_dir(out_dir, time.strftime("compare-%Y%m%d-%H%M%S"), COMPARE_FILES, "sweep-compare")
        md, png = write_compare(list(run_dirs), out)
        warns = compare_warnings(list(run_dirs))
    except HarnessError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    for w in warns:
        click.echo(f"warning: {w}", err=True)
    click.echo(md.read_text())
    click.echo(f"wrote {md} and {png}")
