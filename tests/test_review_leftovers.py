"""Leftovers of a later review, each shown as a user expects: a sweep into an earlier sweep's folder keeps its
pairs (or refuses in one line), and the messages, counts and verdicts below name what really happened. Fake tools
replay real captured output (no fork build needed)."""
from __future__ import annotations

import json

from tests.test_new_user import one_error_line, sw  # noqa: F401  (sw: the fixture)
from tests.test_sweep_integrity import fake  # noqa: F401  (the fixture: fake tools with a script per pair)


def _pairs(out_dir) -> list[str]:
    return json.loads((out_dir / "run.json").read_text())["meta"]["pairs"]


# ------------------------------------------------------------------ 1. a sweep into an earlier sweep's folder

def test_sweep_into_an_earlier_sweep_keeps_its_pairs_or_refuses_in_one_line(sw):  # noqa: F811
    """The second sweep into one --out replaced the first one's pairs without a word (they stayed in the job cache
    only). With the same settings the report now holds the union, the earlier pairs from the cache (no tool run for
    them); with other settings it is refused in one line, exit 2, the earlier report untouched."""
    out = sw.tmp / "rep"
    code, _ = sw.run("--pairs", "turbo3/turbo3", "--no-bench", "--out", str(out))
    assert _pairs(out) == ["f16/f16", "q8_0/q8_0", "turbo3/turbo3"]
    n = sw.ncalls()
    code, text = sw.run("--pairs", "q8_0/turbo3", "--no-bench", "--out", str(out))
    assert _pairs(out) == ["f16/f16", "q8_0/q8_0", "turbo3/turbo3", "q8_0/turbo3"], text
    assert sw.ncalls() - n == 1  # only the new pair ran: the earlier ones came from the job cache
    assert "its pairs f16/f16, q8_0/q8_0, turbo3/turbo3 stay in the report" in text
    rows = {r["pair"] for r in json.loads((out / "run.json").read_text())["sections"]["sweep"]["rows"]}
    assert {"turbo3/turbo3", "q8_0/turbo3"} <= rows
    before = (out / "run.json").read_bytes()
    n = sw.ncalls()
    code, text = sw.run("--pairs", "turbo3/turbo3", "--no-bench", "--ctx", "128", "--out", str(out))
    line = one_error_line(text)
    assert code == 2 and f"--out {out} holds a sweep of other settings (ctx 256 there, 128 here)" in line
    assert "give another --out folder, or the same settings" in line
    assert (out / "run.json").read_bytes() == before and sw.ncalls() == n  # nothing ran, nothing was lost
    other = sw.tmp / "other.txt"
    other.write_text("A different corpus with enough words to be read as plain text here.\n" * 40)
    code, text = sw.run("--pairs", "turbo3/turbo3", "--no-bench", "--out", str(out), corpus_=other)
    assert code == 2 and "corpus corpus.txt there, other.txt here" in one_error_line(text)


# ------------------------------------------------------------------ 2. the probe of a shared build root

def test_the_probe_digest_holds_content_not_the_checkouts_paths(tmp_path, monkeypatch):
    """Two checkouts of the harness sharing a build root recompiled the probe in turn: its digest held the absolute
    paths of the sources and of the fork's headers. It is now of content (sources, headers, flags, compiler, the
    build's provenance): another folder with the same content reuses it; other content rebuilds it."""
    import shutil

    from harness.fork import probe as P
    from tests.test_provenance import A, B, fake_build, fake_fork
    bdir = fake_build(tmp_path / "root", A)
    built = []

    def fake_compile(what, fork_, libdir, out, args):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("lib")
        built.append(args)
        return out
    monkeypatch.setattr(P, "compile_c", fake_compile)
    checkouts = []
    for name in ("one", "two"):  # the same harness version in two folders, each with its own fork snapshot
        src = tmp_path / name / "harness" / "fork"
        src.mkdir(parents=True)
        for p in P.PROBE_SOURCES:
            shutil.copyfile(p, src / p.name)
        checkouts.append(([src / p.name for p in P.PROBE_SOURCES], fake_fork(tmp_path / name / "fork", commit=A)))
    for sources, fork in checkouts + checkouts:
        monkeypatch.setattr(P, "PROBE_SOURCES", sources)
        P.build_probe(bdir, fork)
    assert len(built) == 1, [a for a in built]  # compiled once, reused by the other checkout and on each return
    sources, fork = checkouts[1]
    (fork / "ggml" / "include" / "ggml.h").write_text("enum ggml_type { GGML_TYPE_TURBO3_0 = 40 };\n")  # other headers
    P.build_probe(bdir, fork)
    assert len(built) == 2
    sources[0].write_text(sources[0].read_text() + "\n/* changed */\n")  # other probe sources
    P.build_probe(bdir, fork)
    assert len(built) == 3
    fake_build(tmp_path / "root", B)  # the build recorded another fork commit: its libraries are another fork's
    P.build_probe(bdir, fork)
    assert len(built) == 4


def test_doctor_says_built_from_this_checkout_only_for_a_build_of_this_folder(tmp_path):
    """A build of another folder at the same commit (a shared build root) was called 'built from this checkout'."""
    import json

    from harness.fork import build as fb
    from tests.test_provenance import A, fake_build, fake_fork, invoke
    mine, other = fake_fork(tmp_path / "mine", commit=A), fake_fork(tmp_path / "other", commit=A)
    bdir = fake_build(tmp_path / "build", A)
    meta = json.loads((bdir / fb.BUILD_META).read_text())
    for fork_dir, words in ((other, f"built from {other} ("),
                            (mine, "built from this fork checkout (")):
        (bdir / fb.BUILD_META).write_text(json.dumps(dict(meta, fork_dir=str(fork_dir))))
        _, out = invoke(["doctor"], {"FORK_DIR": str(mine), "TURBO_BUILD_ROOT": str(tmp_path / "build")})
        [ln] = [ln for ln in out.splitlines() if "provenance" in ln]
        assert words in ln, ln
        assert ("this fork checkout, not this folder" in ln) == (fork_dir == other), ln


# ------------------------------------------------------------------ 3. sweep-compare: the same folder, unfinished sweeps

def _sweep_copy(tmp_path, name, **edit):
    import shutil
    from pathlib import Path
    src = Path(__file__).resolve().parents[1] / "reports" / "samples" / "sweep-cpu-smollm2" / "run.json"
    d = tmp_path / name
    d.mkdir()
    data = json.loads(src.read_text())
    data.update(edit)
    (d / "run.json").write_text(json.dumps(data))
    return d


def test_sweep_compare_refuses_a_folder_given_twice_and_marks_unfinished_sweeps(tmp_path):
    """sweep-compare accepted the same folder twice (two identical tables, one model drawn twice) and showed an
    interrupted sweep's or an unjudged sweep's vs-q4_0 PASS like a finished one's, with no word."""
    from click.testing import CliRunner

    from harness.cli import cli
    a = _sweep_copy(tmp_path, "a")
    for twice in ([str(a), str(a)], [str(a), str(a) + "/."]):
        r = CliRunner().invoke(cli, ["sweep-compare", *twice, "--out", str(tmp_path / "c")])
        line = one_error_line(r.output)
        assert r.exit_code == 2 and "is given twice" in line and "give each sweep report folder once" in line
    assert not (tmp_path / "c").exists()
    stopped = _sweep_copy(tmp_path, "stopped", verdict="INTERRUPTED",
                          interrupted={"signal": "SIGINT", "exit_code": 130, "in_progress": "ppl turbo2/turbo2",
                                       "not_run": ["ppl turbo2/turbo2", "bench turbo2/turbo2"]})
    data = json.loads((a / "run.json").read_text())
    for c in data["checks"][0]["cells"]:
        c["verdict"], c["caveat"] = "SKIP", "nothing judged: no q8_0/q8_0 run"
    data["checks_verdict"] = data["verdict"] = "SKIP"
    unjudged = _sweep_copy(tmp_path, "unjudged", **data)
    r = CliRunner().invoke(cli, ["sweep-compare", str(a), str(stopped), str(unjudged), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.output.splitlines() if ln.startswith("warning: ") and "is not finished" in ln]
    assert len(warn) == 2 and "INTERRUPTED by SIGINT (jobs not run: ppl turbo2/turbo2, bench turbo2/turbo2)" in warn[0]
    assert "judged nothing (nothing judged: no q8_0/q8_0 run)" in warn[1]
    md = (tmp_path / "c" / "compare.md").read_text()
    tables = md.split("\n## ")[1:]
    assert "NOT FINISHED" not in tables[0] and "(unfinished sweep)" not in tables[0]
    assert "(NOT FINISHED)" in tables[1] and "This sweep INTERRUPTED by SIGINT" in tables[1]
    for row in (ln for ln in tables[1].splitlines() if ln.startswith("| turbo")):  # no bare PASS from a partial run
        assert "| PASS |" not in row and "| PARTIAL |" not in row, row
    assert "| PASS (unfinished sweep) |" in tables[1] or "| PARTIAL (unfinished sweep) |" in tables[1]
    assert "(NOT FINISHED)" in tables[2] and "judged nothing" in tables[2]


# ------------------------------------------------------------------ 4. --ngl 99 on a CPU-only build

def test_ngl_on_a_cpu_only_build_names_the_offload_not_depths_never_asked_for(sw):  # noqa: F811
    """`sweep --ngl 99` on a CPU-only build took the GPU defaults and stopped on '--depths 8192 plus the 512-token
    bench test is beyond ...': an option the user never gave. The real problem (nothing to offload to) is named."""
    code, out = sw.run("--pairs", "turbo3", "--ngl", "99", "--out", str(sw.tmp / "o"))
    line = one_error_line(out)
    assert code == 2 and "--ngl 99: the cpu build" in line and "no GPU backend to offload layers to" in line, line
    assert "--depths" not in line and "drop --ngl" in line and "--rpc HOST:PORT" in line
    # a GPU sweep whose default bench depths pass the model's context: named as the default, with the fix
    code, out = sw.run("--pairs", "turbo3", "--backend", "cuda", "--out", str(sw.tmp / "o"))
    line = one_error_line(out)
    assert code == 2 and "the default bench depth 8192 (of 0,2048,8192, for offloaded layers)" in line, line
    assert "give --depths up to 7680 or --no-bench" in line
    code, out = sw.run("--pairs", "turbo3", "--depths", "0,9000", "--out", str(sw.tmp / "o"))
    assert "--depths 9000 plus" in one_error_line(out)  # given: named as given
    assert sw.ncalls() == 0


# ------------------------------------------------------------------ 5. --kld-depths: each message names its own problem

def test_kld_depths_beyond_the_model_and_a_repeated_length_are_named_as_such(sw):  # noqa: F811
    """A length beyond the model's context was reported as 'does not divide' (the arithmetic ran before the model was
    read), and a repeated length as 'give two or more context lengths' (or dropped without a word)."""
    code, out = sw.run("--pairs", "turbo3", "--kld-depths", "256,9000", "--out", str(sw.tmp / "o"))
    line = one_error_line(out)
    assert code == 2 and "--kld-depths 9000 is beyond the 8192 tokens" in line and "divide" not in line, line
    for value, twice in (("1024,1024", 1024), ("256,256,1024", 256), ("1024,256,1024", 1024)):
        code, out = sw.run("--pairs", "turbo3", "--kld-depths", value, "--out", str(sw.tmp / "o"))
        line = one_error_line(out)
        assert code == 2 and "--kld-depths" in line and f"{value}: {twice} is given twice: give each context length once" in line, line
    code, out = sw.run("--pairs", "turbo3", "--kld-depths", "300,1024", "--out", str(sw.tmp / "o"))
    assert "300 does not divide the 2048 tokens" in one_error_line(out)  # within the model: the arithmetic still speaks
    assert sw.ncalls() == 0


# ------------------------------------------------------------------ 6. failed jobs that ran are counted

def test_failed_jobs_that_ran_again_are_counted_in_the_sweep_header(sw):  # noqa: F811
    """A rerun whose failed job ran again said '0 jobs run, 4 cached': a job that ran and failed was not counted."""
    args = ("--pairs", "turbo3/turbo3,q4_0/q4_0", "--no-bench", "--out", str(sw.tmp / "o"))
    sw.run(*args)  # q4_0/q4_0's llama-perplexity aborts (the fake): failed, never cached
    n = sw.ncalls()
    code, out = sw.run(*args)
    assert sw.ncalls() - n == 1  # only the failed job ran again
    [line] = [ln for ln in out.splitlines() if ln.startswith("SWEEP ")]
    assert "1 jobs run (1 failed: never cached, a rerun runs them again), 4 cached" in line, line
    meta = json.loads((sw.tmp / "o" / "run.json").read_text())["meta"]
    assert meta["jobs_run"] == 1 and meta["jobs_failed"] == 1 and meta["jobs_cached"] == 4


# ------------------------------------------------------------------ 7. the '2+ chunks' hint only where it applies

def test_the_two_chunks_hint_is_given_only_for_fewer_than_two_chunks(fake):  # noqa: F811
    """A pair whose llama-perplexity printed no KLD statistics said '(it prints them only for 2+ chunks)' even when the
    run had 2 or more chunks and enough scored tokens: a hint that did not apply."""
    from harness.runners.sweep import run_sweep
    from tests.test_sweep_integrity import TRAITS
    fk = fake
    (fk.d / "stdout_turbo3_turbo3").write_text("Final estimate: PPL = 33.0470 +/- 5.94341\n")  # no KLD block
    for chunks in (2, 3):
        res = run_sweep(fk.cfg("f16/f16,turbo3/turbo3", chunks=chunks, bench=False), progress=False,
                        log=lambda s: None, traits=TRAITS)
        err = res.ppl["turbo3/turbo3"].error
        assert err.startswith("llama-perplexity printed no KL-divergence statistics; see "), err
        assert "2+ chunks" not in err
    res = run_sweep(fk.cfg("f16/f16,turbo3/turbo3", chunks=1, ctx=512, bench=False), progress=False,
                    log=lambda s: None, traits=TRAITS)
    assert "(it prints them only for 2+ chunks, and this run had 1)" in res.ppl["turbo3/turbo3"].error


# ------------------------------------------------------------------ 10. the gate leads a gated run's headline

def test_a_gated_run_that_passes_reads_as_a_pass_with_its_known_findings_named(tmp_path):
    """'FAIL: 3 expected (known) findings; known-findings gate PASS' (exit 0) read as a failure. The gate's result
    leads the headline and the title, the known findings and the verdicts accepted are named; run.json keeps the
    checks' verdict beside the gate, and JUnit still marks the accepted findings xfail."""
    import xml.etree.ElementTree as ET

    from tests.test_known_findings import _gate, _run
    code, out, d = _gate(tmp_path, _run())
    assert code == 0
    first = next(ln for ln in out.splitlines() if not ln.startswith("wrote "))
    assert first.startswith("known-findings gate PASS: 3 known findings (their FAIL and PARTIAL verdicts accepted by "
                            "--known known-findings.toml)"), first
    assert not first.startswith("FAIL")
    md = (d / "summary.md").read_text()
    assert md.splitlines()[0].endswith("**PASS (known-findings gate; 3 known findings)**"), md.splitlines()[0]
    assert ": PASS (known-findings gate; 3 known findings)</title>" in (d / "report.html").read_text()
    data = json.loads((d / "run.json").read_text())
    assert data["verdict"] == data["checks_verdict"] == "FAIL" and data["sections"]["known"]["gate"] == "PASS"
    assert len(ET.parse(d / "junit.xml").getroot().findall(".//skipped[@type='xfail']")) == 4
    code, out, _ = _gate(tmp_path, _run(pq5=2.2))  # grown: the gate fails, and says so first
    first = next(ln for ln in out.splitlines() if not ln.startswith("wrote "))
    assert code == 1 and first.startswith("known-findings gate FAIL: 2 grown beyond accepted, 1 known finding (its "
                                    "PARTIAL verdict accepted by --known known-findings.toml)"), first


# ------------------------------------------------------------------ 8. scorecard: a gated run as its command exited

def test_scorecard_shows_a_gated_run_as_its_gate_exited_with_its_known_findings(tmp_path):
    """A `verify --known` run whose gate passed (exit 0) was a FAIL row in the scorecard."""
    from click.testing import CliRunner

    from harness.cli import cli
    from tests.test_known_findings import _gate, _run
    code, _, d = _gate(tmp_path / "pass", _run())
    assert code == 0
    code, _, grown = _gate(tmp_path / "grown", _run(pq5=2.2))
    assert code == 1
    r = CliRunner().invoke(cli, ["scorecard", str(d), str(grown), "--out", str(tmp_path / "sc")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "sc" / "scorecard.json").read_text())["rows"]
    assert rows[0]["verdict"] == "PASS (known-findings gate; 3 known findings)", rows[0]["verdict"]
    assert rows[1]["verdict"] == "FAIL (known-findings gate; 2 grown, 1 known finding)", rows[1]["verdict"]
    assert "**PASS (known-findings gate; 3 known findings)**" in (tmp_path / "sc" / "scorecard.md").read_text()
    from harness.report.html import _LABEL_COLORS
    page = (tmp_path / "sc" / "scorecard.html").read_text()  # the badge in PASS's colour, not the unknown label's grey
    assert f"background:{_LABEL_COLORS['PASS']}'>PASS (known-findings gate; 3 known findings)</span>" in page
    assert r.output.splitlines()[0].startswith("PASS (known-findings gate; 3 known findings)")


# ------------------------------------------------------------------ 9. an interrupted verify into a full folder

def test_an_interrupted_run_marks_the_earlier_verdicts_of_checks_it_did_not_run(tmp_path, monkeypatch):
    """verify into a folder with an earlier report, interrupted before PQ3: the report showed the earlier run's PQ3
    verdict (PASS) in its Verdicts table, its check section, the HTML overview and JUnit like this run's own. They
    are kept (nothing is lost) and marked as the earlier run's everywhere; JUnit has no passing case of them."""
    import signal
    import xml.etree.ElementTree as ET

    import pytest

    from harness import verify as V
    from harness.interrupt import Interrupted
    from harness.targets.numpy_target import NumpyTarget
    out = tmp_path / "r"
    V.run_checks(NumpyTarget(), ["PQ4", "PQ3"], ["turbo3"], out, log=lambda s: None)
    was = {c["id"]: c["verdict"] for c in json.loads((out / "run.json").read_text())["checks"]}
    assert was["PQ3"] == "PASS"
    calls = []

    def stop_before_pq3():
        calls.append(1)
        if len(calls) == 3:  # the loop's check before PQ3 (PQ4 started, PQ4 measured, PQ3 next)
            raise Interrupted(signal.SIGINT)
    monkeypatch.setattr(V, "raise_if_pending", stop_before_pq3)
    from harness.pipeline import load_run
    logged = []
    with pytest.raises(Interrupted):
        V.run_checks(NumpyTarget(), ["PQ4", "PQ3"], ["turbo3"], out, log=logged.append, run=load_run(out))
    data = json.loads((out / "run.json").read_text())
    assert data["interrupted"]["not_run"] == ["PQ3"] and data["interrupted"]["earlier"] == {"PQ3": "PASS"}
    assert sorted(c["id"] for c in data["checks"]) == ["PQ3", "PQ4"]  # kept, not lost
    assert "it still shows the earlier run's PQ3, marked as earlier" in logged[-1]
    md = (out / "summary.md").read_text()
    assert "| **PASS (earlier run, not this one)** |" in md and "## PQ3 " in md
    assert [ln for ln in md.splitlines() if ln.startswith("## PQ3 ")][0].endswith(": PASS (earlier run, not this one)")
    assert "- shown from the earlier run in this folder, not this one (marked \"earlier run\"): PQ3 (PASS)" in md
    assert "INTERRUPTED (partial run, not run: PQ3; PQ3 shown from the earlier run); what ran: " in md  # the headline
    page = (out / "report.html").read_text()
    assert ">PASS (earlier run, not this one)</span>" in page and "shown from the earlier run in this folder" in page
    junit = ET.parse(out / "junit.xml").getroot()
    pq3 = next(s for s in junit.iter("testsuite") if s.get("name") == "PQ3")
    props = {p.get("name"): p.get("value") for p in pq3.iter("property")}
    assert props["verdict"] == "PASS (earlier run, not this one)" and "earlier_run" in props
    cases = list(pq3.iter("testcase"))
    assert cases and all(len(list(tc)) == 1 for tc in cases)  # every case skipped/failed, none passes as this run's
    assert all("earlier run's" in (list(tc)[0].get("message") or "") for tc in cases)


def test_findings_of_an_earlier_run_are_marked_in_the_headline():
    from harness.report.findings import headline
    from tests.test_known_findings import _run
    run = _run()
    run.interrupted = {"signal": "SIGINT", "exit_code": 130, "in_progress": None, "not_run": ["PQ5"],
                       "earlier": {"PQ5": "FAIL"}}
    lines = headline(run)
    pq5 = [ln for ln in lines[1:] if " PQ5 " in ln]
    assert pq5 and all(" PQ5 (earlier run, not this one) turbo4 on " in ln for ln in pq5), pq5
    assert all("earlier run" not in ln for ln in lines[1:] if " PQ2 " in ln)
