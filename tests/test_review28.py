"""Review 28: a run gated with --known that measured nothing (every cell SKIP, or only accepted ERRORs) was titled
'PASS (known-findings gate; no findings)' in summary.md, report.html and the scorecard row, and its headline led
with 'known-findings gate PASS' (the gate's exit code is 0, but nothing was measured: spec, nothing measured is
never PASS). It now leads with the run's own verdict: 'SKIP (nothing judged; known-findings gate PASS)'."""
from __future__ import annotations

import json

from click.testing import CliRunner

from harness.cli import cli
from harness.report.model import Cell, CheckResult, Run, Verdict
from tests.test_known_findings import _gate


def _unmeasured(verdict: Verdict) -> Run:
    run = Run(run_id="r")
    for check, metric in (("PQ2", "distortion_ratio_vs_lloyd_max"), ("PQ5", "nmse_over_lloyd_max")):
        run.checks.append(CheckResult(check, check, [Cell(check, "turbo4", "cpu:set_rows", metric, None, 1.0, verdict,
                                                          caveat="not measured here")]))
    return run


def test_a_gated_run_that_measured_nothing_is_never_titled_pass(tmp_path):
    code, out, d = _gate(tmp_path / "skip", _unmeasured(Verdict.SKIP))
    assert code == 1  # a gate over nothing judged is SKIP and exits 1 (tests/test_unmeasured_gate.py)
    first = next(ln for ln in out.splitlines() if not ln.startswith("wrote "))
    assert first.startswith("SKIP: nothing was judged (known-findings gate SKIP)"), first
    title = (d / "summary.md").read_text().splitlines()[0]
    assert "PASS" not in title and title.endswith("**SKIP (known-findings gate; nothing judged)**"), title
    assert ": SKIP (known-findings gate; nothing judged)</title>" in (d / "report.html").read_text()
    r = CliRunner().invoke(cli, ["scorecard", str(d), "--out", str(tmp_path / "sc")])
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "sc" / "scorecard.json").read_text())["rows"][0]
    assert not row["verdict"].startswith("PASS"), row["verdict"]


def test_a_gated_run_of_accepted_errors_only_is_never_titled_pass(tmp_path):
    known = tmp_path / "k.toml"
    known.write_text("".join(f'[[finding]]\ncheck = "{c}"\ntype = "turbo4"\npaths = ["cpu:set_rows"]\nmetric = "{m}"\n'
                             f'verdict = "ERROR"\nreason = "accepted: not measurable here"\n\n'
                             for c, m in (("PQ2", "distortion_ratio_vs_lloyd_max"), ("PQ5", "nmse_over_lloyd_max"))))
    code, out, d = _gate(tmp_path / "err", _unmeasured(Verdict.ERROR), known)
    assert code == 0, out
    first = next(ln for ln in out.splitlines() if not ln.startswith("wrote "))
    assert first.startswith("ERROR: nothing was judged (2 known findings"), first
    title = (d / "summary.md").read_text().splitlines()[0]
    assert "PASS (" not in title and "ERROR (nothing judged; known-findings gate PASS; 2 known findings)" in title


def test_a_one_token_graph_fallback_is_not_hidden_by_the_f16_prompt_graphs_count(tmp_path, monkeypatch):
    """decode_placement compared the largest count of either graph: f16 'graph splits = 40 (with bs=64), 2 (with
    bs=1)' against a pair's '2 (with bs=64), 34 (with bs=1)' read as 34 <= 40, PASS, though the pair's one-token
    (decode) graph fell back (34 splits vs 2). Each graph is now compared with the same graph of the f16 decode."""
    from harness.report.model import Verdict
    from tests.test_decode_placement import _run
    def edit(pair, err):
        if pair == "f16/f16":
            return err.replace("graph splits = 2", "graph splits = 40 (with bs=64), 2 (with bs=1)")
        if pair == "turbo3/turbo3":
            return err.replace("graph splits = 2", "graph splits = 2 (with bs=64), 34 (with bs=1)")
        return err
    by, _ = _run(tmp_path, monkeypatch, edit)
    c = by[("turbo3/turbo3", "decode_prefix_vs_batched")]
    assert c.verdict == Verdict.PARTIAL and "graph splits 34 vs 2 for its f16 decode (one-token graph)" in c.caveat, c.caveat
    # a pair placed like f16 in both graphs keeps its verdict
    assert by[("q4_0/q4_0", "decode_prefix_vs_batched")].verdict == Verdict.PASS


def test_a_run_of_passed_and_skipped_cells_does_not_say_nothing_was_judged():
    """A run whose cells passed beside skipped ones is SKIP (not everything was examined), but its headline said
    'SKIP: nothing was judged', which is false: it names the passed and the skipped cells now; an all-SKIP run keeps
    'nothing was judged'."""
    from harness.report.findings import verdict_line
    run = Run(run_id="r")
    run.checks.append(CheckResult("PQ1", "PQ1", [
        Cell("PQ1", "turbo3", "cpu:set_rows", "max_abs_err", 1e-6, 1e-4, Verdict.PASS, op="<="),
        Cell("PQ1", "turbo3", "cuda:set_rows", "max_abs_err", None, 1e-4, Verdict.SKIP, caveat="backend absent")]))
    line = verdict_line(run)
    assert line.startswith("SKIP: every judged cell passed, 1 cell skipped"), line
    assert "nothing was judged" not in line
    assert verdict_line(_unmeasured(Verdict.SKIP)).startswith("SKIP: nothing was judged"), verdict_line(_unmeasured(Verdict.SKIP))
