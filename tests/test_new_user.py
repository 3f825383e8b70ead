"""Issue 11, tried as a new user would: bad input is refused up front with one line naming the problem
and the fix (exit 2), nothing is silently changed, finished work is kept, and the reports and the
console start with the answer. Fake tools replay real captured output (no fork build needed)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.errors import HarnessError
from harness.runners import sweep as S
from harness.targets.numpy_target import NumpyTarget
from harness.verify import run_checks
from tests.test_sweep_parsers import TRAITS
from tests.test_sweep_runner import _script, fake_tools


def invoke(args, env=None):
    r = CliRunner().invoke(cli, args, env=env or {}, catch_exceptions=False)
    return r.exit_code, r.output


def one_error_line(out: str) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def _gguf(path: Path, n_ctx_train: int = 8192) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(30)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(576)
    w.add_head_count(9)
    w.add_head_count_kv(3)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def sw(tmp_path, monkeypatch):
    """`sweep` through the CLI with fake llama-perplexity/llama-bench; returns (invoke, number of tool calls)."""
    bdir, calls = fake_tools(tmp_path)
    model = tmp_path / "model.gguf"
    _gguf(model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 50)
    monkeypatch.setattr(S, "type_traits", lambda bdir: TRAITS)
    # a sweep without --out writes <REPORTS>/sweep-<time> (TURBO_REPORTS, read when harness.cli is imported):
    # here under tmp_path, not into the checkout
    import harness.cli as hc
    monkeypatch.setattr(hc, "REPORTS", tmp_path / "reports")
    env = {"TURBO_SWEEP_CACHE": str(tmp_path / "cache")}

    def run(*args, model_=model, corpus_=corpus):
        base = ["sweep", "--model", str(model_), "--corpus", str(corpus_), "--build-dir", str(bdir), "--backend", "cpu",
                "--ctx", "256", "--chunks", "3", "--threads", "2", "--no-progress", "--timeout", "20",
                "--decode-prompts", "0", "--kld-depths", "none"]  # decode and depth: tests/test_decode_depth.py
        # later options win in click: the test's own --ctx etc. override the defaults above
        return invoke(base + list(args), env=env)

    def ncalls():
        return len([ln for ln in calls.read_text().splitlines() if ln.strip()])
    return type("Sw", (), {"run": staticmethod(run), "ncalls": staticmethod(ncalls), "tmp": tmp_path, "model": model})


# ------------------------------------------------------------------ bad input and silent changes

@pytest.mark.parametrize("args, words", [
    (["--ctx", "0"], "'--ctx': 0 is too small"),
    (["--chunks", "0"], "'--chunks': 0 is too small"),
    (["--pairs", ""], "'--pairs': '' names no K/V pair"),
    (["--reps", "0"], "'--reps': 0 is too small"),
    (["--ctx", "99999999"], "beyond the 8192 tokens"),
    (["--depths", "0,9000"], "--depths 9000"),
    (["--backend", "bogus"], "'--backend': unknown backend 'bogus': choose from cpu, cuda"),
])
def test_sweep_refuses_bad_numbers_up_front(sw, args, words):
    code, out = sw.run(*args, "--pairs", "turbo3/turbo3") if args[0] != "--pairs" else sw.run(*args)
    assert code == 2
    assert words in one_error_line(out)
    assert sw.ncalls() == 0  # refused before any tool ran


def test_sweep_metal_on_linux_names_the_fix(sw, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    code, out = invoke(["sweep", "--backend", "metal", "--model", str(sw.model), "--no-progress"])
    line = one_error_line(out)
    assert code == 2 and "no metal build" in line and "only on macOS" in line


def test_tiny_and_binary_corpus_are_refused_with_the_cause(sw):
    tiny = sw.tmp / "tiny.txt"
    tiny.write_text("hello you\n")
    code, out = sw.run("--pairs", "turbo3", corpus_=tiny)
    line = one_error_line(out)
    assert code == 2 and "only 10 bytes" in line and "--ctx 256 x --chunks 3 needs 768" in line
    binary = sw.tmp / "random.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    code, out = sw.run("--pairs", "turbo3", corpus_=binary)
    line = one_error_line(out)
    assert code == 2 and "not UTF-8 text" in line and "plain-text" in line
    assert sw.ncalls() == 0


def test_unwritable_out_is_one_line_exit_2(sw, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out_dir in ("/proc/turbo-harness-x", str(blocker / "sub")):
        code, out = sw.run("--pairs", "turbo3", "--out", out_dir)
        assert code == 2 and "cannot be written" in one_error_line(out)
        code, out = invoke(["check", "PQ3", "--out", out_dir])
        assert code == 2 and "cannot be written" in one_error_line(out)
    assert sw.ncalls() == 0


def test_verify_target_and_backend_names_problem_and_fix(tmp_path, monkeypatch):
    code, out = invoke(["verify", "--target", "bogus"])
    line = one_error_line(out)
    assert code == 2 and "'--target': unknown backend 'bogus'" in line and "choose from cpu, cuda, metal" in line
    assert "make build" not in line
    monkeypatch.setattr(sys, "platform", "linux")
    with pytest.raises(HarnessError, match=r"--backend metal: this build has no metal backend .*only on macOS"):
        run_checks(NumpyTarget(), ["PQ4"], ["turbo3"], tmp_path / "r", backends=["metal"])
    with pytest.raises(HarnessError, match=r"--target hip: .*AMD GPU.*BACKEND=hip make build"):
        run_checks(NumpyTarget(), ["PQ4"], ["turbo3"], tmp_path / "r", target_backend="hip")


def test_check_one_type_into_an_existing_report_keeps_the_other_types(tmp_path):
    from harness.pipeline import load_run as _load_run
    d = tmp_path / "r"
    run_checks(NumpyTarget(), ["PQ5"], ["turbo2", "turbo3"], d, log=lambda s: None)
    before = {(c.type, c.path) for c in _load_run(d).checks[0].cells}
    assert {t for t, _ in before} == {"turbo2", "turbo3"}
    logs = []
    run = run_checks(NumpyTarget(faults=["uncorrected_norm"]), ["PQ5"], ["turbo2"], d, log=logs.append, run=_load_run(d))
    cells = run.checks[0].cells
    assert {(c.type, c.path) for c in cells} == before  # turbo3's cells are still there, turbo2's were redone
    assert any("kept the earlier cells of turbo3" in ln for ln in logs)
    assert any("kept from the earlier run" in n and "turbo3" in n for n in run.checks[0].notes)
    assert sorted(json.loads((d / "run.json").read_text())["meta"]["types"]) == ["turbo2", "turbo3"]


def test_interrupted_fresh_sweep_says_how_to_resume_and_resumes(sw, monkeypatch):
    real = S.run_tool
    count = {"n": 0}

    def interrupting(*a, **k):
        count["n"] += 1
        if count["n"] == 3:  # base and ppl f16 finish, Ctrl-C during ppl turbo3
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "run_tool", interrupting)
    code, out = sw.run("--pairs", "f16/f16,turbo3/turbo3", "--no-bench", "--no-baselines", "--fresh")
    assert code == 130 and "rerun without --fresh to resume" in out
    monkeypatch.setattr(S, "run_tool", real)
    n = sw.ncalls()
    code, out = sw.run("--pairs", "f16/f16,turbo3/turbo3", "--no-bench", "--no-baselines", "--out", str(sw.tmp / "rep"))
    assert "2 cached" in out and sw.ncalls() - n == 1  # only the interrupted job ran again


# ------------------------------------------------------------------ reports that start with the answer

def test_sweep_out_is_the_report_folder_and_the_summary_states_the_setup(sw):
    out_dir = sw.tmp / "my-sweep"
    code, out = sw.run("--pairs", "f16/f16,q8_0/q8_0,turbo3/turbo3", "--no-bench", "--out", str(out_dir))
    assert (out_dir / "report.html").is_file() and (out_dir / "summary.md").is_file() and (out_dir / "run.json").is_file()
    lines = out.strip().splitlines()
    assert re.match(r"^(PASS|PARTIAL|FAIL|ERROR|SKIP): ", lines[0])  # the console starts with the verdict
    bad = [c for c in json.loads((out_dir / "run.json").read_text())["checks"][0]["cells"]
           if c["verdict"] in ("FAIL", "PARTIAL", "ERROR")]
    assert bad and all(ln.split()[0] in ("FAIL", "PARTIAL", "ERROR") for ln in lines[1:1 + len({(c["verdict"], c["type"], c["metric"]) for c in bad})])
    md = (out_dir / "summary.md").read_text()
    assert md.index("**" + lines[0]) < md.index("|")  # verdict and findings before any table
    for words in ("ctx 256 tokens x 3 chunks", "corpus.txt", "model.gguf"):
        assert words in md, words
    # console table: no two columns run together (every value is followed by two spaces or the end)
    table = [ln for ln in lines if ln.startswith(("f16/f16", "q8_0/q8_0", "turbo3/turbo3"))]
    assert table and all(not re.search(r"\d[+-]\d", ln) for ln in table)
    assert all(re.search(r"\d  +[+-]\d", ln) for ln in table if "%" in ln)


def test_verify_summary_and_html_start_with_verdict_and_findings(tmp_path):
    d = tmp_path / "r"
    run_checks(NumpyTarget(faults=["perturbed_centroids"]), ["PQ2", "PQ5"], ["turbo4"], d, log=lambda s: None)
    md = (d / "summary.md").read_text()
    first_table = md.index("\n|")
    head = md[:first_table]
    assert "PARTIAL" in head.splitlines()[0] or "FAIL" in head.splitlines()[0]
    finding = [ln for ln in head.splitlines() if ln.startswith(("- PARTIAL", "- FAIL"))]
    assert finding and all(" on " in ln and "Means: " in ln and "limit" in ln for ln in finding)
    html = (d / "report.html").read_text()
    assert html.index("class=findings") < html.index("class=overview") < html.index("<h2 id='PQ2'>")
    for repr_ in ("['", "None<", ">False<", ">True<", "{'"):
        assert repr_ not in html, repr_


def test_pq5_table_shows_q4_0_and_q8_0_beside_every_turbo_row(tmp_path):
    d = tmp_path / "r"
    run_checks(NumpyTarget(), ["PQ5"], ["turbo3", "turbo4"], d, log=lambda s: None)
    md = (d / "summary.md").read_text()
    sec = md[md.index("## PQ5"):]
    header = next(ln for ln in sec.splitlines() if ln.startswith("| type | path | bits"))
    assert "q8_0 NMSE Gaussian" in header and "q4_0 NMSE Gaussian" in header
    rows = [ln for ln in sec.splitlines() if ln.startswith(("| turbo3 |", "| turbo4 |")) and "nmse_over" not in ln]
    assert len(rows) == 4  # two types x two quantise paths
    col_q8, col_q4 = header.split("|").index(" q8_0 NMSE Gaussian "), header.split("|").index(" q4_0 NMSE Gaussian ")
    for r in rows:
        cells = r.split("|")
        assert re.match(r" [0-9.e-]+ $", cells[col_q8]) and re.match(r" [0-9.e-]+ $", cells[col_q4]), r


def test_short_corpus_failure_quotes_the_tool_cause_and_f16_note_is_honest(sw, tmp_path):
    """A corpus long enough in bytes but too short in tokens passes the up-front check; the fork's own
    cause ('tokenizes to only N tokens') must then be in the error, not only in a log file."""
    from harness.checks.sweeps import judge_sweep
    from harness.runners.sweep import SweepConfig, parse_pairs, run_sweep
    short = tmp_path / "build2"
    (short / "bin").mkdir(parents=True)
    _script(short / "bin" / "llama-perplexity", "#!/bin/sh\n"
            "echo 'perplexity: you need at least 512 tokens to evaluate perplexity with a context of 256' >&2\n"
            "echo 'perplexity: the data file you provided tokenizes to only 140 tokens' >&2\nexit 0\n")
    cfg = SweepConfig(model=sw.model, corpus=sw.tmp / "corpus.txt", pairs=parse_pairs("f16/f16,turbo3/turbo3"), bdir=short,
                      ctx=256, chunks=2, threads=2, timeout=20, cache_dir=tmp_path / "c", bench=False)
    res = run_sweep(cfg, progress=False, log=lambda s: None, traits=S.type_traits(None))
    assert not res.base.ok and "tokenizes to only 140 tokens" in res.base.error and "at least 512" in res.base.error
    cr, sec = judge_sweep(res, traits=S.type_traits(None))
    assert "no f16/f16 pair in the sweep" not in " ".join(cr.notes)
    assert any("f16/f16 pair failed" in n for n in cr.notes)
    # and the headline line of the failing pair carries the cause
    from harness.report.findings import findings
    from harness.report.model import Run
    run = Run("r")
    run.checks.append(cr)
    assert any("tokenizes to only 140 tokens" in f.line() for f in findings(run))


def test_sweep_known_findings_file_gates_the_sweep(sw, tmp_path):
    """The fake tools print a turbo3 log for every pair: f16 and q8_0 get kv_types ERROR cells, f16's noise
    floor is PARTIAL, turbo3 passes. Accepting the first three and listing turbo3 gives XFAIL x3 + XPASS."""
    entry = ('[[finding]]\ncheck = "SWEEP"\ntype = "{t}"\npath = "cpu:*"\nmetric = "{m}"\nverdict = "{v}"\n'
             'reason = "the fake tools print a turbo3 log"\n')
    accepted = (entry.format(t="f16/f16", m="kv_types", v="ERROR") + entry.format(t="q8_0/q8_0", m="kv_types", v="ERROR")
                + entry.format(t="f16/f16", m="kld_noise_floor", v="PARTIAL"))
    known = tmp_path / "known.toml"
    known.write_text(accepted + entry.format(t="turbo3/turbo3", m="ppl_vs_q8_0", v="FAIL"))
    out_dir = tmp_path / "rep"
    args = ["--pairs", "f16/f16,q8_0/q8_0,turbo3/turbo3", "--no-bench", "--out", str(out_dir)]
    code, out = sw.run(*args)
    assert code == 2  # without the file: the ERROR cells make it exit 2
    code, out = sw.run(*args, "--known", str(known))
    assert code == 1 and "known-findings gate FAIL" in out.splitlines()[0]
    assert len([ln for ln in out.splitlines() if ln.startswith("XFAIL")]) == 3
    assert any(ln.startswith("XPASS   SWEEP turbo3/turbo3 on cpu:*") for ln in out.splitlines())
    known.write_text(accepted)  # the fixed finding is removed from the file: the gate is green
    code, out = sw.run(*args, "--known", str(known))
    assert code == 0 and "known-findings gate PASS" in out.splitlines()[0]
    last = [ln for ln in out.splitlines() if ln.startswith("SWEEP ")][-1]  # the closing line agrees with the gate
    assert last.startswith("SWEEP PASS (known-findings gate; 3 known findings)"), last
    md = (out_dir / "summary.md").read_text()
    assert md.count("- XFAIL") == 3 and "## Known findings" in md  # expected findings are shown, not hidden


# ------------------------------------------------------------------ found on a second try from a clean clone

@pytest.fixture
def numpy_cli(monkeypatch):
    """`check`/`verify` through the CLI on the NumPy fork (no fork build): pipeline.open_target is replaced."""
    import harness.pipeline as P
    monkeypatch.setattr(P, "open_target", lambda fork_dir, build_backend: (NumpyTarget(), {"fork_commit": "0" * 40}))
    return invoke


@pytest.mark.parametrize("args, words", [
    (["check", "PQ3", "--type", "turbo5"], "unknown turbo type turbo5: choose from turbo2, turbo3, turbo4"),
    (["verify", "--type", ""], "names no turbo type"),
    (["verify", "--checks", ""], "names no check"),
    (["verify", "--checks", "PQ1,PQ9"], "unknown check PQ9"),
    (["check", "PQ3", "--target", "metal"], "this build has no metal backend"),
    (["check", "PQ3", "--backend", "cuda"], "--backend cuda: this build has no cuda backend"),
])
def test_verify_usage_errors_are_one_line_before_anything_runs(numpy_cli, tmp_path, args, words):
    code, out = numpy_cli(args + ["--out", str(tmp_path / "r")])
    assert code == 2 and words in one_error_line(out)
    assert not (tmp_path / "r").exists()  # nothing measured, nothing written


def test_check_with_fewer_types_through_the_cli_keeps_the_rest_and_says_so(numpy_cli, tmp_path):
    d = tmp_path / "r"
    code, out = numpy_cli(["check", "PQ4", "--type", "turbo2,turbo3", "--out", str(d)])
    assert code == 0
    code, out = numpy_cli(["check", "PQ4", "--type", "turbo2", "--out", str(d)])
    assert code == 0 and "kept the earlier cells of turbo3" in out
    cells = json.loads((d / "run.json").read_text())["checks"][0]["cells"]
    assert {c["type"] for c in cells} == {"turbo2", "turbo3"}


@pytest.mark.parametrize("args, words", [
    (["--depths", "-1"], "'--depths': '-1': give comma-separated non-negative integers"),
    (["--depths", ""], "'--depths': '' names no depth: give a comma-separated list"),
    (["--pairs", "turbo9"], "unknown cache type 'turbo9'"),
])
def test_sweep_bad_depths_and_types_are_one_line(sw, args, words):
    code, out = sw.run(*args)
    assert code == 2 and words in one_error_line(out) and sw.ncalls() == 0


def test_corpus_that_is_not_a_file_is_named_so(sw):
    code, out = sw.run("--pairs", "turbo3", corpus_=Path("/dev/null"))
    assert code == 2 and "is not a regular file" in one_error_line(out)


def test_sweep_does_not_overwrite_a_verify_report(sw, tmp_path):
    d = tmp_path / "verify-report"
    run_checks(NumpyTarget(), ["PQ4"], ["turbo2"], d, log=lambda s: None)
    before = (d / "run.json").read_text()
    code, out = sw.run("--pairs", "turbo3", "--no-bench", "--out", str(d))
    assert code == 2 and "holds another report (PQ4)" in one_error_line(out)
    assert (d / "run.json").read_text() == before and sw.ncalls() == 0


def test_doctor_names_the_commit_once_and_explains_a_copy_without_git(tmp_path):
    import subprocess
    fork = tmp_path / "fork"
    (fork / "ggml" / "include").mkdir(parents=True)
    (fork / "ggml" / "include" / "ggml.h").write_text("GGML_TYPE_TURBO3_0\n")
    env = {"FORK_DIR": str(fork), "TURBO_BUILD_ROOT": str(tmp_path / "builds"), "TURBO_CORPUS": str(tmp_path / "c.txt")}
    code, out = invoke(["doctor"], env=env)
    line = next(ln for ln in out.splitlines() if ln[4:].startswith("fork"))
    assert "@ unknown" not in line and "no git history" in line and ".fork-commit" in line
    g = ["git", "-C", str(fork), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run(g + ["init", "-q"], check=True)
    subprocess.run(g + ["add", "-A"], check=True)
    subprocess.run(g + ["commit", "-qm", "turbo subject"], check=True)
    commit = subprocess.run(g + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    code, out = invoke(["doctor"], env=env)
    line = next(ln for ln in out.splitlines() if ln[4:].startswith("fork"))
    assert line.count(commit[:9]) == 1 and "turbo subject" in line


def test_a_later_check_without_known_is_not_gated_by_an_earlier_file(numpy_cli, tmp_path):
    d = tmp_path / "r"
    known = tmp_path / "k.toml"
    known.write_text('[[finding]]\ncheck = "PQ5"\ntype = "turbo3"\npath = "cpu:*"\nmetric = "nmse_over_lloyd_max"\n'
                     'reason = "r"\n')
    code, out = numpy_cli(["check", "PQ4", "--type", "turbo3", "--out", str(d), "--known", str(known)])
    assert code == 0 and "known-findings gate PASS" in out
    code, out = numpy_cli(["check", "PQ5", "--type", "turbo3", "--out", str(d)])
    assert code == 0 and "known-findings gate" not in out
    assert "known" not in json.loads((d / "run.json").read_text())["sections"]


def test_missing_or_invalid_model_is_one_line_up_front(sw, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    for model in (tmp_path / "nope.gguf", bad):
        code, out = invoke(["sweep", "--model", str(model), "--corpus", str(sw.tmp / "corpus.txt"), "--build-dir",
                            str(sw.tmp / "build"), "--backend", "cpu", "--no-progress", "--pairs", "turbo3"])
        line = one_error_line(out)
        assert code == 2 and ("does not exist" in line or "not a valid GGUF" in line)
    assert sw.ncalls() == 0


def test_checks_are_not_added_to_a_sweep_report(numpy_cli, sw):
    d = sw.tmp / "sweep-report"
    code, out = sw.run("--pairs", "turbo3", "--no-bench", "--out", str(d))
    assert (d / "run.json").is_file()
    code, out = numpy_cli(["check", "PQ4", "--out", str(d)])
    assert code == 2 and "holds a sweep report" in one_error_line(out)


def test_a_crash_finding_says_the_fork_crashed_not_what_the_rule_means():
    """A FAIL cell with no value (the fork's tool aborted, e.g. CUDA flash attention on f16/q8_0) must not borrow
    the rule's meaning ("loses more perplexity than allowed"): nothing was measured; the meaning is the crash."""
    from harness.report.findings import findings
    from harness.report.model import Cell, CheckResult, Run, Verdict
    crashed = Cell("SWEEP", "f16/q8_0", "cuda:perplexity", "ppl_vs_q8_0", None, 0.025, Verdict.FAIL,
                   caveat="not measured (fork failure: llama-perplexity crashed)")
    measured = Cell("SWEEP", "turbo3/turbo3", "cuda:perplexity", "ppl_vs_q8_0", 0.28, 0.025, Verdict.FAIL)
    run = Run("r", {}, [CheckResult("SWEEP", "Model-level sweep", [crashed, measured])])
    lines = {f.type: f.line() for f in findings(run)}
    assert "the fork crashed on this case" in lines["f16/q8_0"] and "perplexity against q8_0" not in lines["f16/q8_0"]
    assert "perplexity against q8_0" in lines["turbo3/turbo3"] and "crashed" not in lines["turbo3/turbo3"]
