"""The product end to end on the real fork build, as a user runs it: `turbo-harness verify` against the committed
CPU sample, and a small `turbo-harness sweep` on the real model that resumes from its cache.

These need the fork built in build/cpu (and the SmolLM2 model for the sweep). They skip with the reason when
those are absent, and fail instead under TURBO_REQUIRE_FORK=1 (CI with the fork snapshot, see .ci/run).
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fork_build_or_skip, skip_or_fail

pytestmark = pytest.mark.fork

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "reports" / "samples" / "cpu-verify" / "run.json"


def _cli(args: list[str], env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the CLI the way a user does (`python -m harness.cli`, i.e. the turbo-harness script) in the repo root."""
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _cells(run: dict) -> dict[tuple, dict]:
    """{(check, type, path, metric): cell} of a run.json; keys repeat for some cells, so a repeat gets an index."""
    out: dict[tuple, dict] = {}
    for chk in run["checks"]:
        for c in chk["cells"]:
            key = (c["check"], c["type"], c["path"], c["metric"])
            n = 0
            while key + (n,) in out:
                n += 1
            out[key + (n,)] = c
    return out


def _exit_code_for(run: dict) -> int:
    vs = {c["verdict"] for c in run["checks"]}
    return 2 if "ERROR" in vs else 1 if "FAIL" in vs else 0


@pytest.mark.slow
def test_verify_on_the_fork_reproduces_the_committed_sample(tmp_path):
    """`verify` on the fork: same exit code, report files, check verdicts and cell verdicts/values as the sample.

    The sample was produced by the CLI on this fork commit; a change of behaviour (a check that stops detecting
    turbo4's codebook, a binding that reads the wrong bytes) shows here as a changed verdict or value.
    """
    fork_build_or_skip()
    sample = json.loads(SAMPLE.read_text())
    out = tmp_path / "run"
    r = _cli(["verify", "--out", str(out), "--type", ",".join(sample["meta"]["types"])])
    assert r.returncode == _exit_code_for(sample), r.stdout + r.stderr
    for name in ("summary.md", "run.json", "junit.xml", "report.html"):
        assert (out / name).is_file(), name
    fresh = json.loads((out / "run.json").read_text())
    assert fresh["meta"]["fork_commit"] == sample["meta"]["fork_commit"]
    assert {c["id"]: c["verdict"] for c in fresh["checks"]} == {c["id"]: c["verdict"] for c in sample["checks"]}
    a, b = _cells(fresh), _cells(sample)
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for k, cs in b.items():
        cf = a[k]
        assert cf["verdict"] == cs["verdict"], (k, cf["caveat"], cs["caveat"])
        if isinstance(cs["value"], (int, float)) and cs["value"] is not None and math.isfinite(cs["value"]):
            assert cf["value"] == pytest.approx(cs["value"], rel=0.05, abs=1e-6), k
    def notes(run):  # a note may name the fork folder it read (AUDIT): the same notes wherever the fork is unpacked
        dirs = sorted({run["meta"].get(k) for k in ("checkout_dir", "fork_dir") if run["meta"].get(k)}, key=len)[::-1]
        def norm(n):
            for d in dirs:
                n = n.replace(d, "<fork>")
            return n
        return {c["id"]: [norm(n) for n in c["notes"]] for c in run["checks"]}
    assert notes(fresh) == notes(sample)
    # COMPAT's coverage and test-backend-ops are the same too (a sample of schema 1.0 keeps them as sections)
    def table(run, tid):
        return next((t for c in run["checks"] for t in c.get("tables", []) if t["id"] == tid), None)

    def coverage(run):
        t = table(run, "coverage")
        rows = ([[r[k] for k in ("backend", "type", "role", "partner", "head_dim", "status")]
                 for r in run["sections"]["coverage"]["rows"]] if t is None else t["rows"])
        status = t["columns"].index("status") if t is not None else 5  # a 'mode' column may follow it
        return [r for r in rows if not str(r[status]).startswith("not covered: backend not available")]

    def backend_ops(run):
        t = table(run, "backend_ops")
        if t is None:
            sec = run["sections"]["backend_ops"]
            return [[r["backend"], r["op"], r["params"], r["status"]] for r in sec["results"]], sec["note"]
        return [r[:4] for r in t["rows"]], t["caption"][0].split("` - ", 1)[-1]
    assert coverage(sample) and coverage(fresh) == coverage(sample)
    assert backend_ops(sample)[1] and backend_ops(fresh) == backend_ops(sample)
    # the evidence each cell names is in the fresh run folder
    missing = [e for c in a.values() for e in c.get("evidence", []) if not (out / e).exists()]
    assert not missing, missing[:5]


def _model_or_fail():
    from harness.errors import HarnessError
    from harness.runners.inputs import default_corpus, default_model
    try:
        return default_model(), default_corpus()
    except HarnessError as e:
        skip_or_fail(f"default model/corpus unavailable: {e}")


def _find_run(out: Path) -> dict:
    runs = sorted(out.rglob("run.json"))
    assert runs, f"no run.json under {out}"
    return json.loads(runs[-1].read_text())


@pytest.mark.slow
def test_small_sweep_on_the_real_model_parses_sane_numbers_and_resumes(tmp_path):
    """Three pairs at ctx 128 x 2 chunks with llama-bench at depth 0: parsed numbers are physically sane, the
    CSV carries them, and the same command again runs nothing (everything from the cache)."""
    bdir, _ = fork_build_or_skip()
    for tool in ("llama-perplexity", "llama-bench"):
        if not (bdir / "bin" / tool).is_file():
            skip_or_fail(f"{tool} not built in {bdir}: run `make test-ready` (make test does)")
    _model_or_fail()
    env = {"TURBO_SWEEP_CACHE": str(tmp_path / "cache")}
    args = ["sweep", "--pairs", "f16/f16,q8_0/q8_0,turbo3/turbo3", "--ctx", "128", "--chunks", "2", "--depths", "0",
            "--reps", "1", "--threads", str(min(2, os.cpu_count() or 1)), "--no-progress", "--backend", "cpu",
            "--decode-prompts", "0", "--kld-depths", "none"]  # decode and depth on the fork: tests/test_decode_depth.py
    r1 = _cli(args + ["--out", str(tmp_path / "a")], env)
    assert r1.returncode in (0, 1), r1.stdout + r1.stderr  # PASS/PARTIAL or a rule FAIL; never ERROR
    run = _find_run(tmp_path / "a")
    rows = {r["pair"]: r for r in run["sections"]["sweep"]["rows"]}
    assert {"f16/f16", "q8_0/q8_0", "turbo3/turbo3"} <= set(rows)
    for pair, row in rows.items():
        assert row["status"] == "ok", (pair, row.get("error"))
        assert 1.0 < row["ppl"] < 1000.0 and row["ppl_se"] > 0, (pair, row["ppl"])
        assert row["kv_mib"] > 0 and row["kv_mib"] == pytest.approx(row["kv_pred_mib"], abs=0.02), pair
    assert rows["f16/f16"]["kld"] == pytest.approx(0.0, abs=1e-3)
    assert rows["turbo3/turbo3"]["kld"] > rows["q8_0/q8_0"]["kld"] > 0
    assert rows["q8_0/q8_0"]["bits_per_value"] == pytest.approx(8.5, abs=0.05)
    speed = run["sections"]["sweep"]["speed"]
    assert speed and all(s["tps"] > 0 for s in speed) and {s["test"] for s in speed} == {"pp", "tg"}
    csv_rows = list(csv.DictReader(next((tmp_path / "a").rglob("sweep.csv")).open()))
    assert {r["pair"] for r in csv_rows} == set(rows)
    # the same command again: every job from the cache, the same numbers
    r2 = _cli(args + ["--out", str(tmp_path / "b")], env)
    assert r2.returncode == r1.returncode, r2.stdout + r2.stderr
    run2 = _find_run(tmp_path / "b")
    assert run2["meta"]["jobs_run"] == 0 and run2["meta"]["jobs_cached"] == run["meta"]["jobs_run"] + run["meta"]["jobs_cached"]
    assert {r["pair"]: r["ppl"] for r in run2["sections"]["sweep"]["rows"]} == {p: r["ppl"] for p, r in rows.items()}
