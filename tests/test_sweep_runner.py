"""Sweep engine with fake tools (small shell scripts replaying real captured output): crash, hang,
unknown type, silent type switch, bad inputs, result cache and resume after an interruption."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from harness.checks.sweeps import judge_sweep
from harness.report.model import Verdict
from harness.runners import sweep as S
from harness.runners.sweep import SweepConfig, parse_pairs, run_sweep
from tests.test_sweep_parsers import FIX, TRAITS

# fake llama-perplexity: behaviour chosen by -ctk
#   q4_0 -> GGML_ASSERT then SIGABRT; turbo4 -> hangs; turbo2 -> real log of the fork's silent layer-adaptive
#   switch; f16/f16 base -> writes the logits file; anything else -> real turbo3 KLD run output
PPL = r"""#!/bin/sh
echo "$@" >> "{calls}"
ctk=""; base=""; kld=0
while [ $# -gt 0 ]; do
  case "$1" in -ctk) ctk="$2"; shift;; --kl-divergence-base) base="$2"; shift;; --chunks) chunks="$2"; shift;; --kl-divergence) kld=1;; esac
  shift
done
case "$ctk" in
  q4_0) echo "/src/ggml-cpu.c:123: GGML_ASSERT(ne00 % 32 == 0) failed" >&2; kill -ABRT $$;;
  turbo4) sleep 60;;
esac
if [ $kld = 0 ]; then echo logits > "$base"; sed "s/over [0-9]* chunks/over ${{FAKE_CHUNKS:-${{chunks:-3}}}} chunks/" "{fix}/base_f16.stderr" >&2; exit 0; fi
cat "{fix}/kld_turbo3.stdout"
if [ "$ctk" = turbo2 ]; then cat "{fix}/layer_adaptive_default_turbo2.stderr" >&2; else cat "{fix}/kld_turbo3.stderr" >&2; fi
"""
BENCH = r"""#!/bin/sh
echo "bench $@" >> "{calls}"
cat "{fix}/bench_turbo3.json"
cat "{fix}/bench_verbose_turbo4.stderr" >&2
"""


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def fake_tools(tmp_path: Path) -> tuple[Path, Path]:
    """A build folder ``tmp_path/build`` whose llama-perplexity and llama-bench are the fake scripts PPL and BENCH,
    each appending its command line to ``tmp_path/calls.log``; returns (build folder, calls log)."""
    bdir = tmp_path / "build"
    (bdir / "bin").mkdir(parents=True)
    calls = tmp_path / "calls.log"
    calls.write_text("")
    _script(bdir / "bin" / "llama-perplexity", PPL.format(calls=calls, fix=FIX))
    _script(bdir / "bin" / "llama-bench", BENCH.format(calls=calls, fix=FIX))
    return bdir, calls


@pytest.fixture
def fake(tmp_path):
    bdir, calls = fake_tools(tmp_path)
    model = tmp_path / "model.gguf"
    _write_tiny_gguf(model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 50)

    def cfg(pairs="turbo3/turbo3", **kw):
        base = dict(model=model, corpus=corpus, pairs=parse_pairs(pairs), bdir=bdir, ctx=256, chunks=3,
                    depths=(0, 256), reps=3, threads=2, timeout=20, cache_dir=tmp_path / "cache")
        base.update(kw)
        return SweepConfig(**base)

    def ncalls():
        return len([ln for ln in calls.read_text().splitlines() if ln.strip()])

    return type("Fake", (), {"cfg": staticmethod(cfg), "ncalls": staticmethod(ncalls), "calls": calls, "tmp": tmp_path})


def _write_tiny_gguf(path: Path) -> None:
    """A valid GGUF header with SmolLM2's attention shape (read by harness.runners.inputs.read_model_info)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(30)
    w.add_embedding_length(576)
    w.add_head_count(9)
    w.add_head_count_kv(3)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run(cfg):
    return run_sweep(cfg, progress=False, log=lambda s: None, traits=TRAITS)


def test_crash_is_fail_hang_and_unknown_type_are_error_cells_and_the_sweep_completes(fake):
    cfg = fake.cfg("turbo3/turbo3,q4_0/q4_0,turbo4/turbo4,foo/f16,q8_0/q8_0", timeout=2, bench=False)
    t0 = time.time()
    res = run(cfg)
    assert time.time() - t0 < 15  # the hanging tool was killed at the 2 s timeout, with its process group
    assert res.base.ok and res.ppl["turbo3/turbo3"].ok and res.ppl["q8_0/q8_0"].ok
    crash = res.ppl["q4_0/q4_0"]
    assert not crash.ok and "killed by signal 6" in crash.error and "GGML_ASSERT(ne00 % 32 == 0) failed" in crash.error
    hang = res.ppl["turbo4/turbo4"]
    assert not hang.ok and "timed out after 2 s" in hang.error
    unk = res.ppl["foo/f16"]
    assert not unk.ok and "unknown cache type 'foo'" in unk.error and "turbo3" in unk.error
    cr, sec = judge_sweep(res, traits=TRAITS)
    by = {(c.type, c.metric): c for c in cr.cells}
    # the fork aborted (SIGABRT) on a type it accepted: the fork's fault (FAIL), naming where it died
    assert by[("q4_0/q4_0", "ppl_vs_q8_0")].verdict == Verdict.FAIL
    assert "GGML_ASSERT" in by[("q4_0/q4_0", "ppl_vs_q8_0")].caveat
    assert "start-up" in by[("q4_0/q4_0", "ppl_vs_q8_0")].caveat and "SIGABRT" in by[("q4_0/q4_0", "ppl_vs_q8_0")].caveat
    assert by[("turbo4/turbo4", "ppl_vs_q8_0")].verdict == Verdict.ERROR
    assert by[("foo/f16", "ppl_vs_q8_0")].verdict == Verdict.ERROR
    assert cr.verdict == Verdict.ERROR
    rows = {r["pair"]: r for r in sec["rows"]}
    assert rows["turbo3/turbo3"]["status"] == "ok" and rows["turbo3/turbo3"]["kld"] == pytest.approx(0.27327)
    # failed jobs are not cached: a rerun retries exactly those three (two with the tool, foo is refused)
    n = fake.ncalls()
    res2 = run(cfg)
    assert res2.jobs_cached == 3 and fake.ncalls() - n == 2


def test_silent_type_switch_is_an_error_cell_quoting_the_log_unless_fork_defaults(fake):
    res = run(fake.cfg("f16/f16,turbo2/turbo2", bench=False))
    cr, sec = judge_sweep(res, traits=TRAITS)
    by = {(c.type, c.metric): c for c in cr.cells}
    sw = by[("turbo2/turbo2", "kv_types")]
    assert sw.verdict == Verdict.ERROR and "Boundary V mode 7: first2+last2 V=q8_0" in sw.caveat
    # the fake prints a turbo3 log for f16: the size line contradicts the request
    f16 = by[("f16/f16", "kv_types")]
    assert f16.verdict == Verdict.ERROR and "K (turbo3)" in f16.caveat
    res = run(fake.cfg("turbo2/turbo2", bench=False, fork_defaults=True))
    cr, sec = judge_sweep(res, traits=TRAITS)
    assert not [c for c in cr.cells if c.metric == "kv_types"]
    assert "fork defaults" in sec["rows"][0]["caveat"] and "Boundary V" in sec["rows"][0]["caveat"]


def test_a_baseline_over_fewer_chunks_than_asked_is_an_error_and_is_not_taken_from_the_cache(fake, monkeypatch):
    """The corpus held too few tokens: llama-perplexity computed over 1 chunk of the 3 asked. Nothing is judged on
    it (ERROR naming the fix), and a run cached that way by an older harness runs again."""
    monkeypatch.setenv("FAKE_CHUNKS", "1")
    res = run(fake.cfg("turbo3/turbo3", bench=False))
    assert not res.base.ok and "computed over 1 chunks, not the 3 asked" in res.base.error
    cr, _ = judge_sweep(res, traits=TRAITS)
    assert cr.cells and all(c.verdict == Verdict.ERROR for c in cr.cells if c.type == "turbo3/turbo3")
    monkeypatch.setenv("FAKE_CHUNKS", "3")
    assert run(fake.cfg("turbo3/turbo3", bench=False)).base.ok
    from harness.runners.sweep import _Cache, cached_run
    cache = _Cache(fake.tmp / "cache")
    key = next(p.stem for p in (fake.tmp / "cache").rglob("*.json") if '"kind": "base"' in p.read_text())
    assert cached_run(fake.cfg("turbo3/turbo3", bench=False), cache, key) is not None  # a good run is reused
    stderr = next((fake.tmp / "cache").rglob("base.stderr"))
    stderr.write_text(stderr.read_text().replace("over 3 chunks", "over 1 chunks"))
    assert cached_run(fake.cfg("turbo3/turbo3", bench=False), cache, key) is None


def test_pinned_environment_and_flags_are_passed(fake, monkeypatch):
    monkeypatch.setenv("TURBO_LAYER_ADAPTIVE", "7")
    seen = []
    real = S.run_tool

    def spy(cmd, env_set, timeout, prefix=None, env_unset=()):
        seen.append((cmd, dict(env_set), tuple(env_unset)))
        return real(cmd, env_set, timeout, prefix, env_unset)

    monkeypatch.setattr(S, "run_tool", spy)
    run(fake.cfg("turbo3/turbo3"))
    for cmd, env, _ in seen:
        assert env == {"TURBO_AUTO_ASYMMETRIC": "0", "TURBO_LAYER_ADAPTIVE": "0", "TURBO_SPARSE_V": "0"}
        assert "-fa" in cmd and cmd[cmd.index("-fa") + 1] in ("on", "1")
        assert cmd[cmd.index("-b") + 1] == "256" and cmd[cmd.index("-ub") + 1] == "256" and cmd[cmd.index("-t") + 1] == "2"
    bench = [c for c, _, _ in seen if c[0].endswith("llama-bench")][0]
    assert bench[bench.index("-d") + 1] == "0,256" and "json" in bench and bench[bench.index("-r") + 1] == "3"
    seen.clear()
    run(fake.cfg("turbo3/turbo3", fork_defaults=True, fresh=True))
    assert all(env == {} and "TURBO_LAYER_ADAPTIVE" in unset for _, env, unset in seen)


def test_cache_reuse_resume_after_interrupt_and_fresh(fake, monkeypatch):
    cfg = fake.cfg("f16/f16,q8_0/q8_0,turbo3/turbo3")
    real = S.run_tool
    count = {"n": 0}

    def interrupting(*a, **k):
        count["n"] += 1
        if count["n"] == 4:  # base, ppl f16, ppl q8_0 finish; Ctrl-C during ppl turbo3
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "run_tool", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(S, "run_tool", real)
    assert len(list((cfg.cache_dir / "jobs").glob("*.json"))) == 3
    n0 = fake.ncalls()
    res = run(cfg)  # resume: only ppl turbo3 and the three bench jobs run
    assert res.jobs_cached == 3 and res.jobs_run == 4 and fake.ncalls() - n0 == 4
    n1 = fake.ncalls()
    res = run(cfg)  # complete rerun: nothing runs
    assert res.jobs_cached == 7 and res.jobs_run == 0 and fake.ncalls() == n1
    assert res.ppl["turbo3/turbo3"].data["stats"]["kld"] == pytest.approx(0.27327)
    # a different ctx is a different key
    res = run(fake.cfg("f16/f16", ctx=128, bench=False))
    assert res.jobs_cached == 0
    n2 = fake.ncalls()
    res = run(fake.cfg("f16/f16,q8_0/q8_0,turbo3/turbo3", fresh=True))
    assert res.jobs_cached == 0 and fake.ncalls() - n2 == 7


def test_corrupt_model_and_empty_corpus_give_error_cells(fake, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(64))
    res = run(fake.cfg("f16/f16,turbo3/turbo3", model=bad))
    assert "not a valid GGUF" in res.error and fake.ncalls() == 0
    cr, sec = judge_sweep(res, traits=TRAITS)
    assert cr.verdict == Verdict.ERROR and len(cr.cells) == 2
    assert all(c.verdict == Verdict.ERROR and "not a valid GGUF" in c.caveat for c in cr.cells)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    res = run(fake.cfg("f16/f16", corpus=empty))
    assert "is empty" in res.error
    res = run(fake.cfg("f16/f16", corpus=tmp_path / "missing.txt"))
    assert "does not exist" in res.error


def test_parse_pairs():
    assert parse_pairs("f16, q8_0/turbo3,turbo4") == [("f16", "f16"), ("q8_0", "turbo3"), ("turbo4", "turbo4")]
    from harness.errors import HarnessError
    with pytest.raises(HarnessError):
        parse_pairs("a/b/c")
    with pytest.raises(HarnessError):
        parse_pairs(" , ")
