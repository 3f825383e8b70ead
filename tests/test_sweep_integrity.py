"""Verdict integrity of the model-level sweep (issue 10, spec "Verdicts, reports, exit codes", "Who is at
fault decides FAIL or ERROR", "Integrity of a verdict"), with fake fork tools (shell scripts replaying the
fork's real log formats; see tests/fixtures/sweep):

- nothing judged (no q8_0 pair) is SKIP, never PASS; the CLI adds the baseline pairs unless --no-baselines;
- a fork crash in a phase is a FAIL naming the phase and keeping the figures measured before; a clean
  refusal at start-up is SKIP 'refused';
- a pair whose graph splits are above the f16 baseline's is a placement finding in summary.md, junit.xml,
  the console and its speed cells;
- SIGINT / SIGTERM during a sweep writes the partial report marked INTERRUPTED, exit 130 / 143;
- the report names the GPU and driver (nvidia-smi) and the backend run.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.checks.sweeps import judge_sweep
from harness.report.model import Verdict
from harness.runners import sweep as S
from harness.runners.ggml_types import predict_kv_bytes
from harness.runners.sweep import SweepConfig, parse_pairs, run_sweep
from tests.test_sweep_parsers import FIX, TRAITS
from tests.test_sweep_runner import _write_tiny_gguf

MIB = 2.0 ** 20

# A fake llama-perplexity / llama-bench: the pair's own snippet ($d/<tool>_<K>_<V>.sh) is sourced when it
# exists (it may crash, refuse or print other logs); otherwise a normal run whose KV log names the pair asked
# for, with the pair's graph splits from $d/splits_<K>_<V> (default 1, as the CPU fixtures show).
PPL = r"""#!/bin/sh
ctk=f16; ctv=f16; base=""; kld=0
while [ $# -gt 0 ]; do
  case "$1" in -ctk) ctk="$2"; shift;; -ctv) ctv="$2"; shift;; --kl-divergence-base) base="$2"; shift;; --chunks) chunks="$2"; shift;;
               --kl-divergence) kld=1;; esac
  shift
done
d="{d}"
echo "ppl $ctk/$ctv" >> "$d/calls"
echo "llama_model_load_from_file_impl: using device CUDA0 (fake) - 1000 MiB free" >&2  # where -ngl 99 put the model
[ $kld = 0 ] && [ -f "$d/base.sh" ] && . "$d/base.sh"  # the f16 baseline's own snippet (it may signal the harness)
if [ $kld = 0 ]; then echo logits > "$base"; sed "s/over [0-9]* chunks/over ${{chunks:-3}} chunks/" "{fix}/base_f16.stderr" >&2; exit 0; fi
[ -f "$d/ppl_${{ctk}}_${{ctv}}.sh" ] && . "$d/ppl_${{ctk}}_${{ctv}}.sh"
[ -f "$d/sleep_${{ctk}}_${{ctv}}" ] && sleep 30
cat "$d/kv_${{ctk}}_${{ctv}}.log" >&2
echo "sched_reserve: graph splits = $(cat "$d/splits_${{ctk}}_${{ctv}}" 2>/dev/null || echo 1)" >&2
if [ -f "$d/stdout_${{ctk}}_${{ctv}}" ]; then cat "$d/stdout_${{ctk}}_${{ctv}}"; else cat "{fix}/kld_turbo3.stdout"; fi
"""
BENCH = r"""#!/bin/sh
ctk=f16; ctv=f16
while [ $# -gt 0 ]; do
  case "$1" in -ctk) ctk="$2"; shift;; -ctv) ctv="$2"; shift;; esac
  shift
done
d="{d}"
echo "bench $ctk/$ctv" >> "$d/calls"
echo "llama_model_load_from_file_impl: using device CUDA0 (fake) - 1000 MiB free" >&2
cat "$d/kv_${{ctk}}_${{ctv}}.log" >&2
echo "sched_reserve: graph splits = $(cat "$d/splits_${{ctk}}_${{ctv}}" 2>/dev/null || echo 1)" >&2
[ -f "$d/bench_${{ctk}}_${{ctv}}.sh" ] && . "$d/bench_${{ctk}}_${{ctv}}.sh"
cat "{fix}/bench_turbo3.json"
"""
PAIRS = [("f16", "f16"), ("q8_0", "q8_0"), ("turbo3", "turbo3"), ("q8_0", "turbo4"), ("f16", "q8_0"),
         ("turbo2", "turbo2"), ("q4_0", "q4_0")]


def _exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _kv_line(k: str, v: str) -> str:
    """The fork's KV size line for the tiny model (30 layers, 3 KV heads of 64, 256 cells), sizes from the traits."""
    pk = predict_kv_bytes(TRAITS[k], 256, 1, 30, 3, 64) / MIB
    pv = predict_kv_bytes(TRAITS[v], 256, 1, 30, 3, 64) / MIB
    return (f"llama_kv_cache: size = {pk + pv:7.2f} MiB (   256 cells,  30 layers,  1/1 seqs), "
            f"K ({k}): {pk:7.2f} MiB, V ({v}): {pv:7.2f} MiB\n")


@pytest.fixture
def fake(tmp_path):
    d = tmp_path / "fake"
    bdir = tmp_path / "build"
    (bdir / "bin").mkdir(parents=True)
    d.mkdir()
    (d / "calls").write_text("")
    for k, v in PAIRS:
        (d / f"kv_{k}_{v}.log").write_text(_kv_line(k, v))
    # f16 reproduces its baseline and q8_0 stays close to it (mean ln PPL ratio 0 / 0.001, KLD 1e-5 / 0.002);
    # the other pairs print the real turbo3 run (0.251, +28.5% PPL, KLD 0.273)
    real = (FIX / "kld_turbo3.stdout").read_text()
    for (k, v), ln, kld in ((("f16", "f16"), "0.000000", "0.000010"), (("q8_0", "q8_0"), "0.001000", "0.002000")):
        (d / f"stdout_{k}_{v}").write_text(real.replace("0.251081 ±   0.052169", f"{ln} ±   0.002000")
                                           .replace("Mean    KLD:   0.273270", f"Mean    KLD:   {kld}"))
    _exe(bdir / "bin" / "llama-perplexity", PPL.format(d=d, fix=FIX))
    _exe(bdir / "bin" / "llama-bench", BENCH.format(d=d, fix=FIX))
    model = tmp_path / "model.gguf"
    _write_tiny_gguf(model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 50)

    def cfg(pairs, **kw):
        base = dict(model=model, corpus=corpus, pairs=parse_pairs(pairs), bdir=bdir, ctx=256, chunks=3,
                    depths=(0,), reps=3, n_prompt=64, n_gen=16, threads=2, timeout=60, cache_dir=tmp_path / "cache")
        base.update(kw)
        return SweepConfig(**base)

    def cli_args(pairs, *extra):
        bench = [] if "--no-bench" in extra else ["--depths", "0", "--reps", "3"]  # refused with --no-bench
        return ["sweep", "--pairs", pairs, "--build-dir", str(bdir), "--model", str(model), "--corpus", str(corpus),
                "--backend", "cpu", "--ctx", "256", "--chunks", "3", *bench, "--threads", "2",
                "--out", str(tmp_path / "reports"), "--no-progress", "--decode-prompts", "0", "--kld-depths", "none", *extra]

    return type("Fake", (), {"d": d, "bdir": bdir, "tmp": tmp_path, "cfg": staticmethod(cfg),
                             "cli_args": staticmethod(cli_args)})


def run(cfg):
    return run_sweep(cfg, progress=False, log=lambda s: None, traits=TRAITS)


def _one_report(tmp: Path) -> Path:
    """The report folder: `sweep --out DIR` writes the report into DIR itself (as verify does)."""
    out = tmp / "reports"
    assert (out / "run.json").is_file() and (out / "summary.md").is_file()
    return out


@pytest.fixture
def cli(monkeypatch, fake):
    """Invoke the sweep CLI in-process, with the type traits of this fork (the fake build has no libggml)."""
    monkeypatch.setattr(S, "type_traits", lambda bdir: TRAITS)
    monkeypatch.setenv("TURBO_SWEEP_CACHE", str(fake.tmp / "cache"))
    from harness.cli import cli as group

    def invoke(args):
        return CliRunner().invoke(group, args, catch_exceptions=False)
    return invoke


# ---------------------------------------------------------------- 1. nothing judged
def test_sweep_without_q8_0_is_skip_nothing_judged_never_pass(fake):
    res = run(fake.cfg("f16/f16,turbo3/turbo3"))
    cr, sec = judge_sweep(res, traits=TRAITS)
    assert cr.verdict == Verdict.SKIP
    assert any(n.startswith("nothing judged") and "q8_0/q8_0" in n for n in cr.notes)
    t3 = [c for c in cr.cells if c.type == "turbo3/turbo3" and c.metric == "ppl_vs_q8_0"]
    assert len(t3) == 1 and t3[0].verdict == Verdict.SKIP and "no q8_0/q8_0 pair" in t3[0].caveat
    # with q8_0 the same turbo3 run is judged (+28.5% PPL vs the +2.5% rule: a FAIL, not a silent pass)
    res = run(fake.cfg("f16/f16,q8_0/q8_0,turbo3/turbo3"))
    cr, _ = judge_sweep(res, traits=TRAITS)
    assert not any(n.startswith("nothing judged") for n in cr.notes)
    assert cr.verdict != Verdict.PASS


def test_cli_adds_the_baseline_pairs_unless_told_not_to(fake, cli):
    r = cli(fake.cli_args("turbo3/turbo3", "--no-bench"))
    out = _one_report(fake.tmp)
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["meta"]["pairs"] == ["f16/f16", "q8_0/q8_0", "turbo3/turbo3"]
    assert run_json["meta"]["baselines_added"] == ["f16/f16", "q8_0/q8_0"]
    assert "ppl q8_0/q8_0" in (fake.d / "calls").read_text()
    assert "added the baseline pairs f16/f16, q8_0/q8_0" in r.output
    # turbo3 is now judged against q8_0: not SKIP, and (28.5% > 2.5%) not PASS
    cells = {(c["type"], c["metric"]): c for c in run_json["checks"][0]["cells"]}
    assert cells[("turbo3/turbo3", "ppl_vs_q8_0")]["verdict"] in ("FAIL", "PARTIAL")
    assert r.exit_code != 0


def test_no_baselines_runs_only_the_pairs_given_and_says_nothing_was_judged(fake, cli):
    r = cli(fake.cli_args("f16/f16,turbo3/turbo3", "--no-bench", "--no-baselines"))
    out = _one_report(fake.tmp)
    assert "q8_0" not in (fake.d / "calls").read_text()
    summary = (out / "summary.md").read_text()
    assert "**SKIP**" in summary and "nothing judged" in summary and "--no-baselines" in summary
    assert "SWEEP SKIP" in r.output and "nothing judged" in r.output
    assert r.exit_code == 0  # SKIP is not a failure, but never reads as PASS


# ---------------------------------------------------------------- 2. a crash in a phase
def _pp_row_then_abort(fake, k: str, v: str, progress: bool) -> dict:
    """The pair's llama-bench prints its prefill row (flushed), then aborts in fattn.cu (as the CUDA build
    does on f16/q8_0); returns the prefill row."""
    rows = json.loads((FIX / "bench_turbo3.json").read_text())
    pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_depth"] == 0)
    (fake.d / "pp.json").write_text("[\n  " + json.dumps(pp, indent=4))
    lines = ['echo "llama-bench: benchmark 1/2: warmup prompt run" >&2' if progress else ":",
             'echo "llama-bench: benchmark 1/2: prompt run 1/3" >&2' if progress else ":",
             f'cat "{fake.d}/pp.json"',
             'echo "llama-bench: benchmark 2/2: warmup generation run" >&2' if progress else ":",
             'echo "/llama.cpp/ggml/src/ggml-cuda/fattn.cu:348: GGML_ASSERT(K->type == V->type) failed" >&2',
             'kill -ABRT $$']
    (fake.d / f"bench_{k}_{v}.sh").write_text("\n".join(lines) + "\n")
    return pp


@pytest.mark.parametrize("progress", [True, False], ids=["with-progress-lines", "from-printed-rows"])
def test_decode_abort_is_a_fail_naming_the_phase_and_keeping_the_prefill_figure(fake, progress):
    pp = _pp_row_then_abort(fake, "f16", "q8_0", progress)
    res = run(fake.cfg("f16/f16,q8_0/q8_0,f16/q8_0"))
    rec = res.bench["f16/q8_0"]
    assert not rec.ok and rec.fault == "fork" and "decode" in rec.phase and "tg16 at depth 0" in rec.phase
    cr, sec = judge_sweep(res, traits=TRAITS)
    cell = next(c for c in cr.cells if c.type == "f16/q8_0" and c.path.endswith(":bench"))
    assert cell.verdict == Verdict.FAIL
    assert "decode" in cell.caveat and "SIGABRT" in cell.caveat and "fattn.cu:348: GGML_ASSERT" in cell.caveat
    assert "pp64@d0" in cell.caveat  # says which figures were kept
    row = next(r for r in sec["rows"] if r["pair"] == "f16/q8_0")
    assert row["status"] == "FAIL"
    assert row["pp_tps_d0"] == pytest.approx(pp["avg_ts"])           # the prefill figure is kept ...
    assert row["pp_ratio_d0"] == pytest.approx(1.0)                  # ... and compared with q8_0's
    assert "tg_tps_d0" not in row                                    # decode never finished: no figure
    assert any(s["pair"] == "f16/q8_0" and s["test"] == "pp" for s in sec["speed"])
    assert cr.verdict == Verdict.FAIL  # the fork's fault, not the harness's


def test_perplexity_crash_after_the_context_is_fail_naming_the_chunk(fake):
    (fake.d / "ppl_turbo2_turbo2.sh").write_text(
        f'cat "{fake.d}/kv_turbo2_turbo2.log" >&2\necho "sched_reserve: graph splits = 1" >&2\n'
        f'head -4 "{FIX}/kld_turbo3.stdout"\n'
        'echo "/src/ggml-cpu/ops.cpp:7001: GGML_ASSERT(ne11 % 128 == 0) failed" >&2\nkill -SEGV $$\n')
    res = run(fake.cfg("f16/f16,q8_0/q8_0,turbo2/turbo2", bench=False))
    cr, sec = judge_sweep(res, traits=TRAITS)
    c = next(c for c in cr.cells if c.type == "turbo2/turbo2")
    assert c.verdict == Verdict.FAIL and "evaluation of chunk 2 of 3" in c.caveat and "SIGSEGV" in c.caveat
    assert "GGML_ASSERT(ne11 % 128 == 0)" in c.caveat
    assert next(r for r in sec["rows"] if r["pair"] == "turbo2/turbo2")["status"] == "FAIL"


def test_clean_refusal_at_start_up_is_skip_refused_with_the_forks_message(fake):
    (fake.d / "ppl_q4_0_q4_0.sh").write_text(
        'echo "llama_init_from_model: failed to initialize the context: V cache type q4_0 needs flash attention" >&2\n'
        'echo "main: failed to create context" >&2\nexit 1\n')
    res = run(fake.cfg("f16/f16,q8_0/q8_0,q4_0/q4_0", bench=False))
    assert res.ppl["q4_0/q4_0"].fault == "refused"
    cr, sec = judge_sweep(res, traits=TRAITS)
    c = next(c for c in cr.cells if c.type == "q4_0/q4_0")
    assert c.verdict == Verdict.SKIP and c.caveat.startswith("refused") and "failed to initialize the context" in c.caveat
    assert next(r for r in sec["rows"] if r["pair"] == "q4_0/q4_0")["status"] == "refused"


# ---------------------------------------------------------------- 3. placement
@pytest.mark.parametrize("load", [None, 9.0])
def test_graph_splits_above_the_baseline_are_a_finding_in_summary_junit_console_and_speed(fake, cli, monkeypatch, load):
    """load 9.0 on 2 CPUs: an overloaded machine makes a speed ratio 'not judged', but not a CPU fallback's 0.004x:
    that is the cause named by the placement, not noise, and stays FAIL (review 28b)."""
    if load is not None:
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
    (fake.d / "splits_q8_0_turbo4").write_text("62\n")
    fast = json.loads((FIX / "bench_turbo3.json").read_text())
    slow = [dict(r, avg_ts=r["avg_ts"] * 0.004, samples_ts=[x * 0.004 for x in r["samples_ts"]],
                 stddev_ts=r["stddev_ts"] * 0.004) for r in fast]
    (fake.d / "slow.json").write_text(json.dumps(slow))
    (fake.d / "bench_q8_0_turbo4.sh").write_text(f'cat "{fake.d}/slow.json"\nexit 0\n')
    args = fake.cli_args("f16/f16,q8_0/q8_0,q8_0/turbo4")
    args[args.index("--backend") + 1] = "cuda"  # a CUDA sweep whose mixed pair's attention ran on the CPU
    r = cli(args + ["--ngl", "99"])
    out = _one_report(fake.tmp)
    summary = (out / "summary.md").read_text()
    junit = (out / "junit.xml").read_text()
    finding = "graph splits 62 vs 1 for the f16 baseline: attention ran on the CPU, not on cuda"
    assert finding in summary and finding in junit and finding in r.output
    # JUnit carries it on the pair's own test case
    case = [tc for tc in ET.fromstring(junit).iter("testcase") if tc.get("classname") == "SWEEP.q8_0/turbo4"
            and "graph_splits" in tc.get("name")]
    assert case and finding in ET.tostring(case[0], encoding="unicode")
    # the speed cell names the cause and prints the ratio, not a bare 0.00x
    speed = json.loads((out / "run.json").read_text())["checks"][0]["cells"]
    pp = next(c for c in speed if c["type"] == "q8_0/turbo4" and c["metric"] == "prefill_ratio_vs_q8_0")
    assert pp["verdict"] == "FAIL" and "0.004x" in pp["caveat"] and "cause: graph splits 62" in pp["caveat"]
    assert "0.00x" not in summary and "0.00x" not in r.output
    # pairs that stayed on the backend carry no finding
    assert "f16/f16" not in [c["type"] for c in speed if c["metric"] == "graph_splits_vs_f16_baseline"]


# ---------------------------------------------------------------- 4. interruption
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_sweep_writes_a_partial_report_marked_interrupted(fake, cli, sig, code):
    # the turbo3 perplexity job sends the signal to the harness (its parent) and hangs until killed
    (fake.d / "ppl_turbo3_turbo3.sh").write_text(f"kill -{sig.name[3:]} $PPID\nsleep 30\n")
    r = cli(fake.cli_args("f16/f16,q8_0/q8_0,turbo3/turbo3"))
    assert r.exit_code == code
    out = _one_report(fake.tmp)
    summary = (out / "summary.md").read_text()
    assert "**INTERRUPTED**" in summary and sig.name in summary
    assert "jobs not run: ppl turbo3/turbo3, bench f16/f16, bench q8_0/q8_0, bench turbo3/turbo3" in summary
    d = json.loads((out / "run.json").read_text())
    assert d["verdict"] == "INTERRUPTED" and d["interrupted"]["in_progress"] == "ppl turbo3/turbo3"
    rows = {r["pair"]: r for r in d["sections"]["sweep"]["rows"]}
    assert rows["q8_0/q8_0"]["status"] == "ok" and rows["turbo3/turbo3"]["status"] == "not run"
    junit = ET.fromstring((out / "junit.xml").read_text())
    assert any(s.get("name") == "INTERRUPTED" and int(s.get("errors")) == 4 for s in junit.iter("testsuite"))
    assert "SWEEP INTERRUPTED" in r.output


def test_a_sweep_interrupted_during_its_f16_baseline_leaves_a_readable_report(fake, cli):
    """tryout 28b: a Ctrl-C/SIGTERM while 'base f16/f16' ran left run.json with sections.sweep.base = null, which the
    shape check refused ('is NoneType, not an object'): report, diff, sweep-compare and the rerun itself all exited 2,
    so the folder could be neither read nor resumed. It now reads INTERRUPTED (exit 130) and the rerun finishes it."""
    (fake.d / "base.sh").write_text("kill -INT $PPID\nsleep 30\n")
    r = cli(fake.cli_args("f16/f16,q8_0/q8_0,turbo3/turbo3"))
    assert r.exit_code == 130, r.output
    out = _one_report(fake.tmp)
    assert json.loads((out / "run.json").read_text())["sections"]["sweep"]["base"] is None
    rep = CliRunner().invoke(cli_group(), ["report", str(out)])
    assert rep.exit_code == 130 and "INTERRUPTED" in rep.output, rep.output
    (fake.d / "base.sh").unlink()
    again = cli(fake.cli_args("f16/f16,q8_0/q8_0,turbo3/turbo3"))
    assert again.exit_code in (0, 1) and "INTERRUPTED" not in again.output, again.output
    assert json.loads((out / "run.json").read_text())["interrupted"] is None


def cli_group():
    from harness.cli import cli as group
    return group


# ---------------------------------------------------------------- 5. metadata on a GPU
def test_gpu_sweep_report_names_the_gpu_driver_and_backend(fake, cli, monkeypatch):
    bindir = fake.tmp / "path"
    bindir.mkdir()
    _exe(bindir / "nvidia-smi", "#!/bin/sh\necho 'NVIDIA H200, 580.159.04, 143771 MiB'\n")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    (fake.bdir / "turbo-harness-build.json").write_text(json.dumps(
        {"backend": "cuda", "cmake_options": ["-DGGML_CUDA=ON"], "cxx_compiler": "c++ 12.2.0"}))
    args = fake.cli_args("f16/f16,q8_0/q8_0", "--no-bench")
    args[args.index("--backend") + 1] = "cuda"
    cli(args + ["--ngl", "99"])
    summary = (_one_report(fake.tmp) / "summary.md").read_text()
    assert "**GPU / driver**: NVIDIA H200, 580.159.04, 143771 MiB" in summary
    assert "**backends run**: cuda" in summary
    assert "-DGGML_CUDA=ON" in summary and "c++ 12.2.0" in summary
