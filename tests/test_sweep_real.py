"""Against the real fork build and the default model: type traits, a tiny sweep, a pair the build's
tools refuse, and the fork's silent layer-adaptive switch. Skipped when the build or model is absent."""
from __future__ import annotations


import pytest
from conftest import skip_or_fail

from harness.checks.sweeps import judge_sweep
from harness.errors import HarnessError
from harness.fork.build import build_dir
from harness.report.model import Verdict
from harness.runners.sweep import SweepConfig, parse_pairs, run_sweep

BDIR = build_dir("cpu")
pytestmark = pytest.mark.fork


def _need():
    if not (BDIR / "bin" / "llama-perplexity").is_file() or not (BDIR / "bin" / "llama-bench").is_file():
        skip_or_fail(f"fork tools not built in {BDIR} (run `make test-ready`; make test does)")
    try:
        from harness.runners.inputs import default_corpus, default_model
        return default_model(), default_corpus()
    except HarnessError as e:
        skip_or_fail(f"default model/corpus unavailable: {e}")


def test_type_traits_measured_from_build():
    _need()
    from harness.runners.ggml_types import type_traits
    t = type_traits(str(BDIR))
    assert all(t[n].blck == 128 for n in ("turbo2", "turbo3", "turbo4"))
    # bytes per 128-value block: packed indices (2/3/4 bits x 128) plus a norm
    assert (t["turbo2"].size, t["turbo3"].size, t["turbo4"].size) == (34, 50, 68)
    assert (t["q8_0"].blck, t["q8_0"].size) == (32, 34)


@pytest.mark.slow
def test_real_tiny_sweep(tmp_path):
    model, corpus = _need()
    cfg = SweepConfig(model=model, corpus=corpus, bdir=BDIR, pairs=parse_pairs("f16,q8_0,turbo3,q2_K"),
                      ctx=128, chunks=2, depths=(0,), reps=1, threads=2, timeout=300, cache_dir=tmp_path / "c",
                      bench=False)
    res = run_sweep(cfg, progress=False, log=lambda s: None)
    assert res.base.ok and res.model_info.head_dim_k == 64 and res.model_info.n_head_kv == 3
    # a type ggml knows but llama-perplexity does not accept for the cache: the tool's own message
    q2 = res.ppl["q2_K/q2_K"]
    assert not q2.ok and "Unsupported cache type: q2_K" in q2.error
    cr, sec = judge_sweep(res)
    rows = {r["pair"]: r for r in sec["rows"]}
    assert rows["f16/f16"]["kld"] == pytest.approx(0.0, abs=1e-4)  # CPU f16 vs its own baseline
    t3 = rows["turbo3/turbo3"]
    assert t3["status"] == "ok" and t3["k_used"] == "turbo3" and t3["kv_mib"] == pytest.approx(t3["kv_pred_mib"], abs=0.02)
    assert t3["bits_per_value"] == pytest.approx(6.25, abs=0.05)  # padded 64 -> 128
    assert t3["kld"] > rows["q8_0/q8_0"]["kld"] > 0
    assert 0 < t3["same_top_p_pct"] < 100
    assert {(c.type, c.verdict) for c in cr.cells if c.metric == "kld_noise_floor"} == {("f16/f16", Verdict.PASS)}
    # refused cleanly at start-up (argument parsing, exit 1): SKIP 'refused' with the fork's message (spec "Who is at fault")
    assert any(c.type == "q2_K/q2_K" and c.verdict == Verdict.SKIP and c.caveat.startswith("refused")
               and "Unsupported cache type: q2_K" in c.caveat for c in cr.cells)
    assert rows["q2_K/q2_K"]["status"] == "refused"


@pytest.mark.slow
def test_real_fork_default_switch_detected(tmp_path):
    model, corpus = _need()
    kw = dict(model=model, corpus=corpus, bdir=BDIR, pairs=parse_pairs("turbo2"), ctx=128, chunks=2, depths=(0,),
              reps=1, threads=2, timeout=300, bench=False)
    res = run_sweep(SweepConfig(**kw, cache_dir=tmp_path / "a"), progress=False, log=lambda s: None)
    cr, sec = judge_sweep(res)
    assert not [c for c in cr.cells if c.metric == "kv_types"]  # pinned env: turbo2 really used
    res = run_sweep(SweepConfig(**kw, cache_dir=tmp_path / "b", fork_defaults=True), progress=False, log=lambda s: None)
    cr, sec = judge_sweep(res)
    cav = sec["rows"][0]["caveat"]
    # with -fit off the fork logs its static auto-enable line first: "Boundary V auto-enabled for turbo2-V"
    assert "fork defaults" in cav and "Boundary V auto-enabled for turbo2-V" in cav
