"""Issue 21, `turbo-harness diff`: two runs compared cell by cell. Fixture runs are the committed CPU verify sample
(made by the CLI on fork 69d8e4be4) and copies with known changes, so every listed change is one the test made."""
from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.report.diff import cell_se, diff_runs
from harness.report.model import Cell, Run, Verdict
from harness.report.render import write_json

SAMPLES = Path(__file__).resolve().parents[1] / "reports" / "samples"


def sample(name="cpu-verify") -> dict:
    return json.loads((SAMPLES / name / "run.json").read_text())


def cell(d: dict, check: str, type_: str, path: str, metric: str) -> dict:
    return next(x for c in d["checks"] if c["id"] == check for x in c["cells"]
                if (x["type"], x["path"], x["metric"]) == (type_, path, metric))


def write(tmp: Path, name: str, d: dict) -> Path:
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    write_json(Run.from_dict(d), out)
    return out


def invoke(*args):
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.output


PQ5_T4 = ("PQ5", "turbo4", "cpu:set_rows", "nmse_over_lloyd_max")
PQ5_T3 = ("PQ5", "turbo3", "cpu:set_rows", "nmse_over_lloyd_max")
PQ2_T4 = ("PQ2", "turbo4", "cpu:set_rows", "distortion_ratio_vs_lloyd_max")


@pytest.fixture
def four_changes(tmp_path):
    """BASE: the CPU verify sample, PQ5 cells with their own se (as a run over several seeds records it).
    NEW: PQ5 turbo4 worse by 5 se, PQ5 turbo3 moved by half an se (noise: not a change), PQ2 turbo4 better,
    one new FAIL cell in PQ6, COMPAT missing."""
    base = sample()
    for key in (PQ5_T4, PQ5_T3):
        cell(base, *key)["details"]["se"] = 0.02
    new = copy.deepcopy(base)
    cell(new, *PQ5_T4)["value"] += 5 * 0.02 * 2 ** 0.5 * 2  # 5 x the combined 2 se noise... well beyond it
    cell(new, *PQ5_T3)["value"] += 0.01
    cell(new, *PQ2_T4)["value"] = 1.5  # still PARTIAL (limit 1.01) but much better
    pq6 = next(c for c in new["checks"] if c["id"] == "PQ6")
    extra = copy.deepcopy(pq6["cells"][0])
    extra.update(type="turbo3/turbo3", path="cpu:flash_attn[turbo3/turbo3 D=256 nq=4 h=8/2]", value=0.2, verdict="FAIL",
                 caveat="attention output 20% off the reference")
    pq6["cells"].append(extra)
    new["checks"] = [c for c in new["checks"] if c["id"] != "COMPAT"]
    new["run_id"] = "new-run"
    return write(tmp_path, "base", base), write(tmp_path, "new", new)


def test_diff_lists_exactly_the_four_changes_and_fails_on_worse(four_changes, tmp_path):
    b, n = four_changes
    code, out = invoke("diff", str(b), str(n), "--out", str(tmp_path / "d"), "--fail-on", "worse")
    assert code == 1, out
    d = json.loads((tmp_path / "d" / "diff.json").read_text())
    got = sorted((c["label"], c["check"], c["type"], c["metric"]) for c in d["changes"])
    assert got == sorted([("WORSE", "PQ5", "turbo4", "nmse_over_lloyd_max"),
                          ("BETTER", "PQ2", "turbo4", "distortion_ratio_vs_lloyd_max"),
                          ("NEW FINDING", "PQ6", "turbo3/turbo3", "rel_err"),
                          ("DISAPPEARED", "COMPAT", "all", "*")]), got
    worse = next(c for c in d["changes"] if c["label"] == "WORSE")
    assert worse["noise_from"] == "se" and worse["delta"] > worse["noise"]
    assert d["unchanged"] > 50 and d["comparable"]
    md = (tmp_path / "d" / "diff.md").read_text()
    assert md.index("WORSE") < md.index("BETTER") and "69d8e4be4" in md  # worse first; the build of each side named
    suite = ET.parse(tmp_path / "d" / "junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == "3"  # worse, new finding, disappeared; better passes
    assert "WORSE" in (tmp_path / "d" / "diff.html").read_text()


def test_fail_on_modes(four_changes, tmp_path):
    b, n = four_changes
    assert invoke("diff", str(b), str(n), "--out", str(tmp_path / "x"), "--fail-on", "never")[0] == 0
    assert invoke("diff", str(b), str(n), "--out", str(tmp_path / "x"), "--fail-on", "changed")[0] == 1
    # only an improvement: not worse, but changed
    base = sample()
    new = copy.deepcopy(base)
    cell(new, *PQ2_T4)["value"] = 1.5
    b2, n2 = write(tmp_path, "b2", base), write(tmp_path, "n2", new)
    assert invoke("diff", str(b2), str(n2), "--out", str(tmp_path / "y"), "--fail-on", "worse")[0] == 0
    assert invoke("diff", str(b2), str(n2), "--out", str(tmp_path / "y"), "--fail-on", "changed")[0] == 1
    # the same run against itself: nothing, exit 0 whatever the mode
    code, out = invoke("diff", str(b2), str(b2), "--out", str(tmp_path / "z"), "--fail-on", "changed")
    assert code == 0 and "no change" in out


def test_verdict_change_without_value_move_is_listed(tmp_path):
    base = sample()
    new = copy.deepcopy(base)
    cell(new, *PQ5_T3)["verdict"] = "FAIL"
    d = diff_runs(Run.from_dict(base), Run.from_dict(new))
    assert [(c.label, c.type) for c in d.changes] == [("WORSE", "turbo3")] and "PASS -> FAIL" in d.changes[0].why
    # a finding that is no longer measured is never an improvement: FAIL -> SKIP is worse, SKIP -> PASS better
    from harness.report.diff import verdict_change
    assert verdict_change(Verdict.FAIL, Verdict.SKIP) == "worse" and verdict_change(Verdict.PASS, Verdict.ERROR) == "worse"
    assert verdict_change(Verdict.SKIP, Verdict.PASS) == "better" and verdict_change(Verdict.ERROR, Verdict.FAIL) == "worse"
    assert verdict_change(Verdict.FAIL, Verdict.PARTIAL) == "better"
    gone = copy.deepcopy(new)
    cell(gone, *PQ5_T3)["verdict"], cell(gone, *PQ5_T3)["value"] = "SKIP", None
    d = diff_runs(Run.from_dict(new), Run.from_dict(gone))
    assert [c.label for c in d.changes] == ["WORSE"] and d.exit_code("worse") == 1


def test_other_rules_or_sizes_are_said_not_compared_silently(tmp_path):
    base = sample()
    base["meta"]["rules"] = {"PQ5": {"nmse_vs_optimum": 1.05, "rows": 4096}, "COMPAT": {"rows": 8192}}
    new = copy.deepcopy(base)
    new["meta"]["rules"] = {"PQ5": {"nmse_vs_optimum": 1.10, "rows": 4096}, "COMPAT": {"rows": 1024}}
    cell(new, *PQ5_T4)["threshold"] = 1.10  # judged against the new limit
    b, n = write(tmp_path, "b", base), write(tmp_path, "n", new)
    code, out = invoke("diff", str(b), str(n), "--out", str(tmp_path / "d"), "--fail-on", "changed")
    assert code == 1
    first = out.splitlines()[:3]
    assert first[0].startswith("NOT LIKE FOR LIKE")
    assert any("OTHER SIZES: COMPAT.rows 8192 -> 1024" in ln for ln in first), first
    assert any("OTHER RULES: PQ5.nmse_vs_optimum 1.05 -> 1.1" in ln for ln in first), first
    d = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert [c["label"] for c in d["changes"]] == ["RULE CHANGED"] and not d["comparable"]
    md = (tmp_path / "d" / "diff.md").read_text()
    assert md.index("OTHER SIZES") < md.index("## Changes")  # at the top, before any change
    # a run that did not record its rules is said so
    bare = sample()
    bare["meta"].pop("rules", None)
    assert "did not record their rules" in diff_runs(Run.from_dict(bare), Run.from_dict(copy.deepcopy(bare))).notes[0]


def test_sweep_values_use_their_own_se(tmp_path):
    base = sample("sweep-cpu-smollm2")
    key = ("SWEEP", "turbo4/turbo4", "cpu:perplexity", "kld_vs_q4_0/q4_0")
    c = Cell(**{k: v for k, v in cell(base, *key).items() if k != "margin"} | {"verdict": Verdict.PARTIAL})
    se = cell_se(c)
    assert se == pytest.approx(c.details["d_kld_se"])
    for shift, listed in ((1.0 * se, False), (4.0 * se, True)):  # 2 combined se = 2.83 se: 1 se is noise, 4 se moved
        new = copy.deepcopy(base)
        cell(new, *key)["value"] += shift
        d = diff_runs(Run.from_dict(base), Run.from_dict(new))
        assert bool(d.changes) is listed, (shift, [x.why for x in d.changes])
    new = copy.deepcopy(base)
    new["sections"]["sweep"]["pinned"]["ctx"] = 512
    d = diff_runs(Run.from_dict(base), Run.from_dict(new))
    assert not d.comparable and any("OTHER SWEEP SETTINGS: ctx 256 -> 512" in x for x in d.notes)


def test_bad_input_is_one_line_exit_2(tmp_path):
    code, out = invoke("diff", str(tmp_path / "nope"), str(SAMPLES / "cpu-verify"))
    assert code == 2 and "'BASE_RUN'" in out and "does not exist" in out and len(out.strip().splitlines()) == 1
    code, out = invoke("diff", str(SAMPLES / "sweep-cpu-smollm2"), str(SAMPLES / "cpu-verify"), "--out", str(tmp_path / "o"))
    assert code == 2 and "not the same kind of report" in out


def test_two_cells_of_one_key_are_both_compared(tmp_path):
    """AUDIT holds several cells of one (check, type, path, metric) (e.g. CPU's CENTROIDS_4BIT at two lines of
    ggml-turbo-quant.c): a FAIL on the first of them must not be hidden behind the second, which still passes."""
    base = sample()
    audit = next(c for c in base["checks"] if c["id"] == "AUDIT")
    key = ("turbo4", "cpu:source", "centroids_max_abs_diff_vs_target_source")
    twins = [x for x in audit["cells"] if (x["type"], x["path"], x["metric"]) == key]
    assert len(twins) >= 2 and all(x["verdict"] == "PASS" for x in twins)
    new = copy.deepcopy(base)
    first = next(x for c in new["checks"] if c["id"] == "AUDIT" for x in c["cells"]
                 if (x["type"], x["path"], x["metric"]) == key)
    first["value"], first["verdict"] = 0.01, "FAIL"
    code, out = invoke("diff", str(write(tmp_path, "base", base)), str(write(tmp_path, "new", new)),
                       "--out", str(tmp_path / "d"), "--fail-on", "worse")
    assert code == 1, out
    assert "WORSE" in out and "centroids_max_abs_diff_vs_target_source" in out


def test_a_worse_verdict_under_a_changed_rule_still_fails_the_gate(tmp_path):
    """A cell judged PASS in BASE and FAIL in NEW against another limit is listed as RULE CHANGED, but a CI gate on
    'worse' must not let it through: the new run found a problem whatever limit found it."""
    base = sample()
    new = copy.deepcopy(base)
    c = cell(new, *PQ5_T3)
    assert cell(base, *PQ5_T3)["verdict"] == "PASS"
    c["threshold"], c["verdict"] = c["value"] / 2, "FAIL"
    bdir, ndir = write(tmp_path, "base", base), write(tmp_path, "new", new)
    code, out = invoke("diff", str(bdir), str(ndir), "--out", str(tmp_path / "d"), "--fail-on", "worse")
    assert code == 1, out
    assert "RULE CHANGED" in out
    # a rule loosened with the verdict unchanged or better is no failure
    c["threshold"], c["verdict"] = c["value"] * 2, "PASS"
    code, out = invoke("diff", str(bdir), str(write(tmp_path, "new2", new)), "--out", str(tmp_path / "d2"),
                       "--fail-on", "worse")
    assert code == 0, out


def test_a_cell_whose_detail_table_is_data_is_still_matched(tmp_path):
    """PQ2 cells carry their centroid values in details['table'] (a list); only a table's name (AUDIT: a string) is
    part of a cell's identity, so new centroid values do not turn the cell into 'disappeared' + 'appeared'."""
    base = sample()
    new = copy.deepcopy(base)
    c = next(x for ch in new["checks"] if ch["id"] == "PQ2" for x in ch["cells"] if isinstance(x["details"].get("table"), list))
    c["details"]["table"] = [v * 1.0001 for v in c["details"]["table"]]
    code, out = invoke("diff", str(write(tmp_path, "base", base)), str(write(tmp_path, "new", new)),
                       "--out", str(tmp_path / "d"))
    assert code == 0 and "no change" in out, out


def test_out_into_a_run_folder_is_refused(tmp_path):
    """diff writes junit.xml: given a run folder as --out (NEW's own), it replaced the run's junit.xml (the one CI
    publishes for the verify run). A folder holding a run.json is refused, one line, exit 2, nothing changed."""
    d = sample()
    base, new = write(tmp_path, "base", d), write(tmp_path, "new", copy.deepcopy(d))
    (new / "junit.xml").write_text("<testsuites name='the run'/>")
    r = CliRunner().invoke(cli, ["diff", str(base), str(new), "--out", str(new)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--out" in lines[0] and "run.json" in lines[0], r.stderr
    assert (new / "junit.xml").read_text() == "<testsuites name='the run'/>"
    assert not (new / "diff.json").exists()
