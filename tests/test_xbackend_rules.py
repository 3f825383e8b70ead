"""Issue 20's remaining "what to build" items, each with a test that fails when the item breaks: the cross-backend
figures beside each other (KLD, top-1, PPL ratio, each backend's own KLD), a pair refused on one backend, sweep-compare
on sweeps of another corpus or model file, and speed verdicts that carry llama-bench's spread and the machine load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.checks.sweeps import judge_sweep
from harness.report.model import Verdict
from harness.runners.sweep import JobRecord, SweepConfig, SweepResult, parse_pairs
from tests.test_sweep_parsers import TRAITS
from tests.test_xbackend import _cells, xb  # noqa: F401  (xb: the fixture of fake builds)

ROOT = Path(__file__).resolve().parents[1]


def test_each_pair_gets_cross_kld_top1_and_ppl_ratio_beside_each_backends_own_kld(xb):  # noqa: F811
    res, cr, sec = xb.run(xb.make(b={"shift": {"turbo3": 0.05}}))
    row = next(r for r in sec["rows"] if r["pair"] == "turbo3/turbo3")
    # the fake: KLD = |pos_B - pos_A|, top-1 = 100 - 100 KLD, PPL = 10 (1 + pos); own KLD = the pair's pos
    assert row["kld"] == pytest.approx(0.05, abs=2e-6) and row["top1_pct"] == pytest.approx(95.0, abs=1e-3)
    assert row["ppl_ratio"] == pytest.approx(1.08 / 1.03, rel=1e-4)
    assert row["own_kld_ref"] == pytest.approx(0.03, abs=2e-6) and row["own_kld"] == pytest.approx(0.08, abs=2e-6)
    md = sec["markdown"]
    assert "| turbo3/turbo3 | 0.05 " in md and "| 95.00 |" in md and "cuda" in md


def test_a_pair_refused_on_b_only_is_its_own_cell_never_pass(xb):  # noqa: F811
    res, cr, sec = xb.run(xb.make(b={"refuse": ["turbo3"]}))
    c = _cells(cr, "cross_compared")["turbo3/turbo3"]
    assert c.verdict not in (Verdict.PASS, Verdict.FAIL) and "ran on cpu only" in c.caveat
    assert "failed to initialize the context" in c.caveat, c.caveat
    assert "turbo3/turbo3" not in _cells(cr, "cross_kld_vs_floor")
    assert _cells(cr, "cross_kld_vs_floor")["q8_0/q8_0"].verdict == Verdict.PASS  # the rest is still compared


def _copy_sweep(src: Path, dst: Path, **meta) -> Path:
    shutil.copytree(src, dst)
    d = json.loads((dst / "run.json").read_text())
    d["meta"].update(meta)
    (dst / "run.json").write_text(json.dumps(d))
    return dst


def test_sweep_compare_warns_on_another_corpus_or_model_file(tmp_path):
    from click.testing import CliRunner

    from harness.cli import cli
    from harness.report.compare import compare_warnings
    src = ROOT / "reports" / "samples" / "sweep-cpu-smollm2"
    a = _copy_sweep(src, tmp_path / "a")
    corpus = _copy_sweep(src, tmp_path / "corpus", corpus_sha256="0" * 64)
    weights = _copy_sweep(src, tmp_path / "weights", model_sha256="f" * 64)
    assert compare_warnings([a, a]) == []
    assert any(w.startswith("the sweeps differ in corpus") for w in compare_warnings([a, corpus]))
    w = compare_warnings([a, weights])
    assert any("used different model files" in x and "ffffffffffff" in x for x in w), w
    r = CliRunner().invoke(cli, ["sweep-compare", str(a), str(weights), "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0 and "warning: the sweeps of" in r.output, r.output
    assert "not directly comparable" in (tmp_path / "cmp" / "compare.md").read_text()


def _bench(pair: str, samples: list[float]) -> JobRecord:
    n = len(samples)
    m = sum(samples) / n
    sd = (sum((x - m) ** 2 for x in samples) / max(n - 1, 1)) ** 0.5
    return JobRecord("bench", pair, True, data={"rows": [{"test": "pp", "n_tokens": 64, "depth": 0, "avg_ts": m,
                                                          "stddev_ts": sd, "samples_ts": samples}], "kv": []})


@pytest.mark.parametrize("q8,turbo,want", [
    ([100.0, 100.0, 100.0], [80.0, 80.0, 80.0], Verdict.FAIL),     # 0.8x, no spread: a FAIL
    ([100.0, 60.0, 100.0], [80.0, 80.0, 80.0], Verdict.PARTIAL),   # 0.92x, within 2 se of the repetitions
    ([100.0] * 9 + [84.0], [85.0] * 10, Verdict.PARTIAL),           # 0.86x, 5 se off, but the range reaches 1.01x
])
def test_speed_verdict_carries_the_spread_and_the_load(tmp_path, q8, turbo, want):
    cfg = SweepConfig(model=tmp_path / "m", corpus=tmp_path / "c", pairs=parse_pairs("q8_0/q8_0,turbo3/turbo3"),
                      bdir=tmp_path, ctx=64)
    meta = {"load_start": {"load_1min": 1.5, "cpus": 2}, "load_end": {"load_1min": 1.9, "cpus": 2}}
    res = SweepResult(cfg, meta, None, None)
    res.bench = {"q8_0/q8_0": _bench("q8_0/q8_0", q8), "turbo3/turbo3": _bench("turbo3/turbo3", turbo)}
    cr, sec = judge_sweep(res, traits=TRAITS)
    c = next(c for c in cr.cells if c.metric == "prefill_ratio_vs_q8_0" and c.type == "turbo3/turbo3")
    assert c.verdict == want, c.caveat
    if want == Verdict.PARTIAL:
        assert ("within 2 se of the repetitions' spread" if q8[1] == 60.0 else "covers the limit: not a FAIL") in c.caveat
    assert sec["load"] == {"load_start": meta["load_start"], "load_end": meta["load_end"]}
    # the same figures measured at load 8.0 / 7.5 on 2 CPUs: not judged (tests/test_speed_judged.py), the load named
    res.meta = {"load_start": {"load_1min": 8.0, "cpus": 2}, "load_end": {"load_1min": 7.5, "cpus": 2}}
    cr, sec = judge_sweep(res, traits=TRAITS)
    c = next(c for c in cr.cells if c.metric == "prefill_ratio_vs_q8_0" and c.type == "turbo3/turbo3")
    assert c.verdict == Verdict.PARTIAL and c.caveat.startswith("not judged: measured with the machine overloaded")
    assert "1-min load 8.0 / 7.5 at the sweep's start / end on 2 CPUs" in c.caveat, c.caveat
    assert any(n.startswith("speed measured at load 8.0 (start) / 7.5 (end) on 2 CPUs") for n in cr.notes), cr.notes
