"""Leftovers of the new-user tryouts and reviews: each is refused up front with one line (exit 2), or measured and
shown as it should be. Fake tools replay real captured output (no fork build needed)."""
from __future__ import annotations

import pytest

from harness.errors import HarnessError
from tests.test_new_user import one_error_line, sw  # noqa: F401  (sw: the fixture)
from tests.test_xbackend import xb  # noqa: F401  (the fixture)


# ------------------------------------------------------------------ 1. a context too small for KLD statistics

def test_sweep_ctx_too_small_for_kld_is_refused_before_any_tool(sw):  # noqa: F811
    """`sweep --ctx 16 --chunks 2` scores 14 tokens: llama-perplexity prints no KLD then (it needs 100), so every
    cell would end in ERROR after the tools ran. Refused up front, with the smallest --ctx that works."""
    code, out = sw.run("--ctx", "16", "--chunks", "2", "--pairs", "turbo3", "--out", str(sw.tmp / "out"))
    line = one_error_line(out)
    assert code == 2 and "--ctx 16 with --chunks 2" in line and "--ctx 101 or more" in line and "kld.count < 100" in line
    assert sw.ncalls() == 0


def test_kld_size_minimum_is_the_smallest_that_the_tool_accepts():
    """The minimum the message names is exact: per chunk llama-perplexity scores n_ctx - 1 - n_ctx/2 tokens
    (tools/perplexity/perplexity.cpp kl_divergence), and it needs 100 in all; ctx 101 x 2 works, 100 x 2 does not."""
    from harness.runners.sweep_config import check_kld_size, kld_scored_tokens
    assert kld_scored_tokens(16, 2) == 14 and kld_scored_tokens(101, 2) == 100 and kld_scored_tokens(100, 2) == 98
    for chunks in (2, 3, 7, 8, 14):  # 16 x 14 scores 98
        with pytest.raises(HarnessError) as e:
            check_kld_size(16, chunks)
        named = int(str(e.value).split("give --ctx ")[1].split()[0])
        assert kld_scored_tokens(named, chunks) >= 100 and kld_scored_tokens(named - 1, chunks) < 100
        check_kld_size(named, chunks)  # no error
        with pytest.raises(HarnessError):
            check_kld_size(named - 1, chunks)


# ------------------------------------------------------------------ 2. --kld-depths 0 and a depth below the minimum

@pytest.mark.parametrize("value, words", [
    ("0", ["0 is not a context length", "--kld-depths none"]),          # was silently taken as 'off'
    ("8", ["8 is below the minimum context length of 16"]),             # was 'give two or more context lengths'
    ("8,1024", ["8 is below the minimum context length of 16"]),
    ("16,32", ["scores only 28", "longest length of 120 or more"]),     # was accepted: no KLD at 16 tokens (4 x 7)
])
def test_kld_depths_bad_values_say_what_is_allowed(sw, value, words):  # noqa: F811
    code, out = sw.run("--pairs", "turbo3", "--kld-depths", value, "--out", str(sw.tmp / "out"))
    line = one_error_line(out)
    assert code == 2 and all(w in line for w in words), line
    assert sw.ncalls() == 0


def test_kld_depths_none_and_off_still_turn_depth_off():
    """'none' and 'off' are the words for off (the CLI option's none_words); '0' is not one of them any more."""
    from harness.cli_sweep import sweep
    opt = next(p for p in sweep.params if p.name == "kld_depths")
    assert set(opt.type.none_words) == {"none", "off"}


# ------------------------------------------------------------------ 3. --target outside --backends

@pytest.mark.parametrize("extra", [["--rpc", "127.0.0.1:50999"], []])
def test_target_not_among_backends_names_the_conflict_and_fix(tmp_path, monkeypatch, extra):
    """`--target cuda --backends cpu,rpc0` said something about a missing RPC build (or rpc0's server) instead of
    the conflict; now the one line names it and the two fixes, before any build or server is looked at."""
    from tests.test_new_user import invoke
    monkeypatch.setenv("FORK_DIR", str(tmp_path / "no-fork"))
    monkeypatch.setenv("TURBO_BUILD_ROOT", str(tmp_path / "no-builds"))
    code, out = invoke(["sweep", "--backends", "cpu,rpc0", *extra, "--target", "cuda", "--out", str(tmp_path / "o")])
    line = one_error_line(out)
    assert code == 2 and "--target cuda is not one of --backends cpu,rpc0" in line, line
    assert "give --target rpc0" in line and "add cuda to --backends" in line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 4. scorecard of a sweep report

@pytest.mark.parametrize("sample, words", [("sweep-cpu-smollm2", "is a sweep report (its run.json holds check SWEEP)"),
                                           ("xbackend-cuda-h100-gemma3",
                                            "is a cross-backend sweep report (its run.json holds check XBACKEND)")])
def test_scorecard_refuses_a_sweep_report(tmp_path, sample, words):
    """`scorecard <sweep report>` made a one-row scorecard of K/V-pair cells; it needs verify reports."""
    from tests.test_new_user import invoke
    code, out = invoke(["scorecard", "reports/samples/cpu-verify", f"reports/samples/{sample}", "--out", str(tmp_path / "sc")])
    line = one_error_line(out)
    assert code == 2 and f"reports/samples/{sample} {words}" in line and "needs verify reports" in line, line
    assert not (tmp_path / "sc").exists()


# ------------------------------------------------------------------ 5. KLD printed as -0.000001 (an exact 0)

def test_kld_printed_as_minus_1e6_is_shown_as_0_and_kept_raw(tmp_path):
    """The committed Gemma sweep's f16/f16 row has KLD -1e-06 (llama-perplexity's %10.6lf of an exact 0): every table
    showed a negative KLD. Shown as 0 now; run.json keeps -1e-06 and no verdict changes."""
    import json

    from harness.checks.depth import depth_markdown
    from harness.checks.sweeps import load_rules
    from harness.pipeline import load_run
    from harness.report.html import _sweep_html
    from harness.report.render import markdown, sweep_table_text, write_json
    run = load_run(__import__("pathlib").Path("reports/samples/sweep-cpu-gemma3"))
    sec = run.sections["sweep"]
    f16 = next(r for r in sec["rows"] if r["pair"] == "f16/f16")
    assert f16["kld"] == -1e-06  # the sample as measured
    before = [(c.type, c.metric, c.verdict) for c in run.checks[0].cells]
    console = next(ln for ln in sweep_table_text(sec).splitlines() if ln.startswith("f16/f16"))
    md = next(ln for ln in markdown(run).splitlines() if ln.startswith("| f16/f16 |"))
    html = next(ln for ln in _sweep_html(sec).splitlines() if ln.startswith("<tr") and ">f16/f16<" in ln)
    depth = [ln for ln in depth_markdown(run.sections["depth"], load_rules()).splitlines() if ln.startswith("| f16/f16 |")]
    assert " 0.0000 " in console and "-0.0000" not in console, console
    assert md.split(" | ")[3] == "0", md
    assert "<td>0</td>" in html and "-1e-06" not in html, html
    assert depth and all("-0.0000" not in ln and "0.0000 ± 0.0000" in ln for ln in depth), depth
    assert [(c.type, c.metric, c.verdict) for c in run.checks[0].cells] == before
    write_json(run, tmp_path)
    rows = json.loads((tmp_path / "run.json").read_text())["sections"]["sweep"]["rows"]
    assert next(r for r in rows if r["pair"] == "f16/f16")["kld"] == -1e-06
    from harness.checks.xbackend import _kld  # the cross-backend tables (own KLD of each side)
    assert _kld(-1e-06, ".4g") == "0" and _kld(-5e-06, ".4g") == "-5e-06"  # beyond the resolution: shown as it is


def test_kld_noise_floor_cell_and_depth_caveat_show_0_not_minus_1e6():
    """The per-cell table of summary.md and the depth caveat showed the same -1e-06 / -0.0000 for f16/f16."""
    from pathlib import Path

    from harness.pipeline import load_run
    from harness.report.render import markdown
    run = load_run(Path("reports/samples/sweep-cpu-gemma3"))
    cell = next(ln for ln in markdown(run).splitlines() if ln.startswith("| f16/f16 | `cpu:perplexity` | kld_noise_floor"))
    assert cell.split(" | ")[3] == "0", cell
    assert next(c for c in run.checks[0].cells if c.metric == "kld_noise_floor").value == -1e-06  # kept as measured
    from harness.checks.depth import depth_cells
    from harness.checks.sweeps import load_rules
    from tests.test_decode_depth import _depth_result
    res = _depth_result({(256, "f16/f16"): (-1e-06, 0.0), (1024, "f16/f16"): (-1e-06, 0.0)})
    (c,), sec = depth_cells(res, load_rules(), "cpu")
    assert "KLD 0.0000 ± 0.0000 at ctx 256 -> 0.0000 ± 0.0000 at ctx 1024" in c.caveat, c.caveat
    assert "| f16/f16 | 0.0000 ± 0.0000 | 0.0000 ± 0.0000 |" in sec["markdown"]


# ------------------------------------------------------------------ 6. sweep --backend cpu on a GPU build

@pytest.mark.parametrize("gpu", ["cmake", "lib", None])
def test_cpu_sweep_of_a_gpu_build_runs_the_tools_on_the_cpu_only(sw, gpu):  # noqa: F811
    """`sweep --backend cpu` with a build that has CUDA in it passed only -ngl 0: the tools could still put work on
    the GPU, and the 'cpu' numbers be the GPU's. Now every tool call gets -dev none -ngl 0 and CUDA_VISIBLE_DEVICES=''
    (as MODEL on the CPU and the CPU side of sweep --backends do); a CPU-only build's command lines are unchanged."""
    import json
    bdir = sw.tmp / "build"
    if gpu == "cmake":
        (bdir / "CMakeCache.txt").write_text("GGML_CUDA:BOOL=ON\nGGML_VULKAN:BOOL=OFF\n")
    elif gpu == "lib":
        (bdir / "bin" / "libggml-vulkan.so").write_text("")  # a GGML_BACKEND_DL build
    out = sw.tmp / "out"
    code, text = sw.run("--pairs", "q8_0/q8_0", "--no-baselines", "--no-bench", "--out", str(out))
    calls = [ln.split() for ln in (sw.tmp / "calls.log").read_text().splitlines() if ln.strip()]
    assert calls, text
    for argv in calls:
        assert argv[argv.index("-ngl") + 1] == "0"
        assert (argv[argv.index("-dev") + 1] == "none") if gpu else ("-dev" not in argv), argv
    pinned = json.loads((out / "run.json").read_text())["meta"]["pinned"]
    assert (pinned.get("devices"), pinned["env"].get("CUDA_VISIBLE_DEVICES")) == (("none", "") if gpu else (None, None))


# ------------------------------------------------------------------ 7. sweep --backends with --known

def test_backends_sweep_judges_each_backend_sweep_with_known(xb, monkeypatch):  # noqa: F811
    """`sweep --backends cpu,cuda --known FILE` gated only the comparison: each backend's own sweep (in <out>/cpu,
    <out>/cuda) was judged without the file, so its accepted findings still failed the run (exit 1) and its report
    had no known-findings section. Now each is judged as `sweep --backend X --known FILE` judges it, and the
    comparison's own-sweep cell of a backend whose findings are all accepted is XFAIL."""
    import json
    cfg = xb.make()
    r, out = xb.cli(cfg, monkeypatch, "turbo3/turbo3")
    assert r.exit_code == 1, r.output  # the fake sweeps have findings of their own
    bad = [(side, c) for side in ("cpu", "cuda")
           for ch in json.loads((out / side / "run.json").read_text())["checks"] for c in ch["cells"]
           if c["verdict"] in ("PARTIAL", "FAIL", "ERROR")]
    assert bad
    entry = ('[[finding]]\ncheck = "SWEEP"\ntype = "{type}"\npath = "{path}"\nmetric = "{metric}"\n'
             'verdict = "{verdict}"\nreason = "the fake builds"\n')
    known = xb.tmp / "known.toml"
    known.write_text("".join(entry.format(**c) for _, c in bad))
    r, out = xb.cli(cfg, monkeypatch, "turbo3/turbo3", "--known", str(known))
    assert r.exit_code == 0, r.output
    for side in ("cpu", "cuda"):
        md = (out / side / "summary.md").read_text()
        assert "## Known findings" in md and "- XFAIL" in md, md[:2000]
        assert json.loads((out / side / "run.json").read_text())["sections"]["known"]["gate"] == "PASS"
    top = json.loads((out / "run.json").read_text())
    assert top["sections"]["known"]["gate"] == "PASS"
    own = [c for ch in top["checks"] for c in ch["cells"] if c["metric"] == "own_sweep_cells_not_passed"]
    assert {c["known"]["status"] for c in own} == {"xfail"}
    # a finding of cuda's own sweep not in the file: cuda's report and the comparison fail the gate
    known.write_text("".join(entry.format(**c) for side, c in bad if side == "cpu"))
    r, out = xb.cli(cfg, monkeypatch, "turbo3/turbo3", "--known", str(known))
    assert r.exit_code == 1, r.output
    assert json.loads((out / "cuda" / "run.json").read_text())["sections"]["known"]["gate"] == "FAIL"
    assert json.loads((out / "cpu" / "run.json").read_text())["sections"]["known"]["gate"] == "PASS"
    assert json.loads((out / "run.json").read_text())["sections"]["known"]["gate"] == "FAIL"


def test_a_one_backend_list_with_another_target_is_told_to_list_two_first():
    """`--backends cuda --target cpu` first needs two backends: advising `--target cuda` would fail next on that."""
    from harness.cli_xbackend import cross_names
    with pytest.raises(HarnessError, match="give two or more backends"):
        cross_names("cuda", None, "cpu", [])


def test_a_corpus_too_short_for_the_chunks_asked_is_a_run_problem_not_a_report_of_chunks_never_measured():
    """llama-perplexity takes min(--chunks, tokens / n_ctx) and says so on stderr; fewer than asked is an ERROR that
    names the fix (a sweep once reported 'ctx 128 x 8 chunks' over 4)."""
    import re
    from harness.runners.sweep_config import fewer_chunks
    from pathlib import Path
    FIXTURES = Path(__file__).resolve().parent / "fixtures"
    for name in ("sweep/base_f16.stderr", "gemma3/kld_f16.stderr"):
        err = (FIXTURES / name).read_text()
        n = int(re.search(r"over (\d+) chunks", err).group(1))
        assert fewer_chunks(n, err) == ""
        msg = fewer_chunks(n + 4, err)
        assert f"computed over {n} chunks, not the {n + 4} asked" in msg and f"--chunks {n} or fewer" in msg


def test_out_refuses_a_folder_of_other_files_and_accepts_new_empty_and_report_folders(tmp_path):
    """`--out` must never write a report over files it did not write (a tryout's own summary.md was overwritten;
    `--out .` wrote into the checkout): such a folder is refused in one line, exit 2; a new, an empty and a report
    folder (rerun into the same) are written."""
    import subprocess
    import sys

    def check(out):
        return subprocess.run([sys.executable, "-m", "harness.cli", "check", "PQ4", "--numpy-target=", "--out", str(out)],
                              capture_output=True, text=True, timeout=120)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "summary.md").write_text("mine")
    r = check(other)
    assert r.returncode == 2 and "not a turbo-harness report folder" in r.stderr and "summary.md" in r.stderr
    assert (other / "summary.md").read_text() == "mine" and not (other / "run.json").exists()
    one_error_line(r.stderr)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check(empty).returncode == 0 and (empty / "run.json").is_file()
    assert check(empty).returncode == 0  # a report folder: written again
    assert check(tmp_path / "new").returncode == 0
