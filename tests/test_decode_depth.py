"""Issue 13: decode agreement and KLD vs depth in the sweep, and Gemma 3's two KV caches.

- pure math: token comparison, the geometric-prefix test that tells a decode-only loss from a lossy pair;
- decode judging on synthetic job records (a decode-only bug is FAIL, a lossy pair PARTIAL, a good pair PASS,
  a crash FAIL naming the phase, a missing reference SKIP);
- the sweep engine with a fake decode tool and fake llama-perplexity (no fork build): decode jobs, depth jobs that
  reuse the main context's runs, evidence and sections in the report;
- depth judging: growth beyond noise flagged, growth within noise not, the sliding-window note;
- Gemma 3's non-SWA + SWA KV size lines (captured from the fork) are one cache of 18 layers;
- bad input: depths beyond the trained length, depths that do not divide, a corpus without prompts: exit 2;
- on the real fork (skipped with the reason when absent): the compiled decode tool runs SmolLM2.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.checks.decode import decode_cells, prefix_pvalue
from harness.checks.depth import depth_cells, depth_plot
from harness.checks.sweeps import judge_sweep, kv_type_problem, load_rules
from harness.report.model import Verdict
from harness.runners.decode import compare_tokens, corpus_prompts, decode_phase, parse_decode_output
from harness.runners.inputs import ModelInfo
from harness.runners.llama_logs import kv_dims, parse_kld_stats, parse_kv_log, parse_kv_logs
from harness.runners.sweep import JobRecord, SweepConfig, SweepResult, parse_pairs, run_sweep
from tests.test_sweep_parsers import FIX, TRAITS
from tests.test_sweep_runner import _write_tiny_gguf

GEMMA_FIX = Path(__file__).parent / "fixtures" / "gemma3"
GEMMA = ModelInfo("gemma3.gguf", "gemma3", "Gemma3 270m", n_layer=18, n_head=4, n_head_kv=1, head_dim_k=256,
                  head_dim_v=256, n_embd=640, n_ctx_train=32768, sliding_window=512)


# ----------------------------------------------------------------------------- pure helpers

def test_compare_tokens_first_divergence_and_agreement():
    c = compare_tokens([1, 2, 3, 4], [1, 2, 9, 4])
    assert c == {"n": 4, "same": 3, "agreement": 0.75, "first_divergence": 2, "prefix": 2}
    assert compare_tokens([5, 6], [5, 6])["first_divergence"] is None and compare_tokens([5, 6], [5, 6])["prefix"] == 2
    assert compare_tokens([5, 6], [7, 6])["first_divergence"] == 0


def test_prefix_pvalue_is_the_capped_geometric_law():
    # n_gen 2, p 0.5: P(L=0)=0.5, P(L=1)=0.25, P(L=2)=0.25
    assert prefix_pvalue([0], 2, 0.5) == pytest.approx(0.5)
    assert prefix_pvalue([1], 2, 0.5) == pytest.approx(0.75)
    assert prefix_pvalue([2], 2, 0.5) == pytest.approx(1.0)
    # two prompts: P(S<=0) = 0.25, P(S<=1) = 0.25 + 2*0.5*0.25
    assert prefix_pvalue([0, 0], 2, 0.5) == pytest.approx(0.25)
    assert prefix_pvalue([1, 0], 2, 0.5) == pytest.approx(0.5)
    # a pair that agrees 95% of the time in batched evaluation diverging at token 0 on 3 prompts: 0.05^3
    assert prefix_pvalue([0, 0, 0], 32, 0.95) == pytest.approx(0.05 ** 3)
    # the same early divergence is ordinary for a pair that agrees 30% of the time
    assert prefix_pvalue([0, 1, 0], 32, 0.30) > 0.3


def test_parse_decode_output_keeps_prompts_before_a_crash_and_names_the_phase():
    out = ('{"prompt": 0, "n_prompt": 8, "tokens": [1, 2], "gap": [0.5, 1.0], "text": " a b"}\n'
           '{"prompt": 1, "n_prompt": 8, "tok')  # cut short by the crash
    d = parse_decode_output(out)
    assert d.tokens == [[1, 2]] and d.gaps == [[0.5, 1.0]] and d.texts == [" a b"] and not d.complete
    err = "load...\nturbo-decode: phase prefill prompt 1\nturbo-decode: phase decode prompt 1 token 3\n"
    assert decode_phase(err) == "decode of prompt 1, token 3"
    assert decode_phase("llama_model_load: error") .startswith("start-up")


def test_corpus_prompts_are_long_paragraphs_spread_over_the_file(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n".join([" = Heading = "] + [f"para {i} " + "word " * 200 for i in range(10)] + ["short"]))
    ps = corpus_prompts(f, 3, 64)
    assert [p.split()[1] for p in ps] == ["0", "3", "6"] and all("\n" not in p for p in ps)
    from harness.errors import HarnessError
    with pytest.raises(HarnessError, match="only 10 paragraphs"):
        corpus_prompts(f, 11, 64)


# ----------------------------------------------------------------------------- decode judging

def _result(pairs: str, decode: dict, rows_top1: dict, n_gen: int = 32, prompts: int = 3):
    cfg = SweepConfig(model=Path("m.gguf"), corpus=Path("c.txt"), pairs=parse_pairs(pairs), bdir=Path("b"),
                      decode_prompts=prompts, decode_n_gen=n_gen)
    res = SweepResult(cfg, {}, None, None)
    for lab, toks in decode.items():
        if isinstance(toks, JobRecord):
            res.decode[lab] = toks
        else:
            res.decode[lab] = JobRecord("decode", lab, True, data={"out": {"tokens": toks, "gaps": [
                [0.01 * (j + 1) for j in range(len(t))] for t in toks], "texts": [
                " ".join(map(str, t[:4])) for t in toks], "complete": True}}, evidence={"decode.stdout": "x"})
    rows = [{"pair": lab, "same_top_p_pct": p} for lab, p in rows_top1.items()]
    return res, rows


REF = [list(range(100, 132)), list(range(200, 232)), list(range(300, 332))]


def _diverge_at(positions):
    out = []
    for ref, pos in zip(REF, positions):
        t = list(ref)
        if pos is not None:
            t[pos:] = [9] * (len(t) - pos)
        out.append(t)
    return out


def test_decode_only_bug_is_fail_lossy_pair_partial_good_pair_pass():
    res, rows = _result("f16/f16,q8_0/q8_0,q4_0/q4_0,turbo4/turbo4,turbo3/turbo3,turbo2/turbo2", {
        "f16/f16": REF,
        "q8_0/q8_0": _diverge_at([None, 20, None]),
        "q4_0/q4_0": _diverge_at([10, 4, None]),
        # batched top-1 95% but decode diverges at token 0 on every prompt: the decode path is broken
        "turbo4/turbo4": _diverge_at([0, 0, 0]),
        # a lossy pair that still decodes like its batched figures and not far below q4_0
        "turbo3/turbo3": _diverge_at([3, 2, 3]),
        # batched top-1 28%: diverging at once is what this lossy pair does anyway
        "turbo2/turbo2": _diverge_at([0, 1, 0]),
    }, {"f16/f16": 100.0, "q8_0/q8_0": 95.0, "q4_0/q4_0": 80.0, "turbo4/turbo4": 95.0, "turbo3/turbo3": 64.0,
        "turbo2/turbo2": 28.0})
    cells, sec = decode_cells(res, rows, load_rules(), "cpu")
    by = {(c.type, c.metric): c for c in cells}
    bug = by[("turbo4/turbo4", "decode_prefix_vs_batched")]
    assert bug.verdict == Verdict.FAIL and "decode-only" in bug.caveat and bug.value < 0.01
    lossy = by[("turbo2/turbo2", "decode_prefix_vs_batched")]
    assert lossy.verdict == Verdict.PARTIAL and "not decode-only" in lossy.caveat
    assert by[("q8_0/q8_0", "decode_prefix_vs_batched")].verdict == Verdict.PASS
    assert by[("q4_0/q4_0", "decode_prefix_vs_batched")].verdict == Verdict.PASS
    assert by[("turbo3/turbo3", "decode_prefix_vs_batched")].verdict == Verdict.PASS
    # beside q4_0 (batched top-1 80%): no agreeing token on 3 prompts has probability 0.2^3 < 0.01; prefixes 3, 2, 3
    # are ordinary for such a cache; turbo2's 0, 1, 0 (P = 0.2^3 + 3 x 0.2^2 x 0.16) are worse than q4_0 would do
    vs = by[("turbo4/turbo4", "decode_prefix_vs_q4_0")]
    assert vs.verdict == Verdict.PARTIAL and vs.value == pytest.approx(0.2 ** 3)
    assert by[("turbo3/turbo3", "decode_prefix_vs_q4_0")].verdict == Verdict.PASS
    assert by[("turbo2/turbo2", "decode_prefix_vs_q4_0")].value == pytest.approx(0.2 ** 3 + 3 * 0.2 ** 2 * 0.16)
    assert ("q8_0/q8_0", "decode_prefix_vs_q4_0") not in by  # only turbo pairs are set beside q4_0
    assert ("f16/f16", "decode_prefix_vs_batched") not in by  # the reference is not judged against itself
    rows_by = {r["pair"]: r for r in rows}
    assert by[("turbo3/turbo3", "decode_prefix_vs_batched")].details["f16_margin_at_divergence"] == pytest.approx(
        [0.04, 0.03, 0.04])  # the f16 run's margin at the token where the pair left it
    assert rows_by["turbo4/turbo4"]["decode_first_div"] == "0, 0, 0"
    assert "| turbo4/turbo4 |" in sec["markdown"] and "0, 0, 0" in sec["markdown"] and "FAIL" in sec["markdown"]


def test_a_few_late_divergences_are_not_flagged_and_the_rule_needs_the_early_pattern():
    # one prompt at token 0, the others late: not the garbling pattern (1 of 3 early), p-value ordinary
    res, rows = _result("f16/f16,turbo4/turbo4", {"f16/f16": REF, "turbo4/turbo4": _diverge_at([0, 15, 25])},
                        {"turbo4/turbo4": 80.0})
    cells, _ = decode_cells(res, rows, load_rules(), "cpu")
    c = next(c for c in cells if c.metric == "decode_prefix_vs_batched")
    assert c.verdict == Verdict.PASS


def test_decode_crash_is_fail_with_phase_refusal_skip_and_missing_reference_skip():
    crash = JobRecord("decode", "turbo3/turbo3", False, "greedy decode killed by signal 6 in decode of prompt 0, token 1: "
                      "GGML_ASSERT", fault="fork", phase="decode of prompt 0, token 1")
    refused = JobRecord("decode", "turbo2/turbo2", False, "refused", fault="refused", phase="start-up")
    res, rows = _result("f16/f16,turbo3/turbo3,turbo2/turbo2", {"f16/f16": REF, "turbo3/turbo3": crash,
                                                              "turbo2/turbo2": refused}, {})
    cells, sec = decode_cells(res, rows, load_rules(), "cpu")
    by = {c.type: c for c in cells if c.metric == "decode_run"}
    assert by["turbo3/turbo3"].verdict == Verdict.FAIL and "decode of prompt 0, token 1" in by["turbo3/turbo3"].caveat
    assert by["turbo2/turbo2"].verdict == Verdict.SKIP
    # no f16 reference: a pair's decode is measured but not compared
    res, rows = _result("f16/f16,q8_0/q8_0", {"q8_0/q8_0": REF}, {"q8_0/q8_0": 95.0})
    res.decode["f16/f16"] = JobRecord("decode", "f16/f16", False, "timed out", fault="harness")
    cells, _ = decode_cells(res, rows, load_rules(), "cpu")
    v = {(c.type, c.metric): c.verdict for c in cells}
    assert v[("f16/f16", "decode_run")] == Verdict.ERROR and v[("q8_0/q8_0", "decode_prefix_vs_batched")] == Verdict.SKIP


# ----------------------------------------------------------------------------- depth judging

def _depth_result(kld: dict, depths=(256, 1024), model=GEMMA):
    pairs = sorted({p for (_, p) in kld})
    cfg = SweepConfig(model=Path("m.gguf"), corpus=Path("c.txt"), pairs=parse_pairs("f16/f16"), bdir=Path("b"),
                      kld_depths=tuple(depths), depth_pairs=parse_pairs(",".join(pairs)))
    res = SweepResult(cfg, {}, model, None)
    for d in depths:
        res.depth_base[d] = JobRecord("depth_base", "f16/f16", True, data={"ctx": d})
    for (d, p), (k, se) in kld.items():
        kt, vt = p.split("/")
        kv = {"k_type": kt, "v_type": vt, "changes": [], "size_line": f"K ({kt}) V ({vt})", "cells": d, "seqs": 1,
              "layers": 18, "k_mib": 0, "v_mib": 0, "parts": []}
        res.depth[(d, p)] = JobRecord("depth", p, True, evidence={f"depth{d}-ppl.stdout": "x"},
                                      data={"ctx": d, "kv": kv,
                                            "stats": {"kld": k, "kld_se": se, "ppl": 20.0, "same_top_p_pct": 80.0}})
    return res


def test_kld_growing_with_depth_beyond_noise_is_flagged_within_noise_is_not(tmp_path):
    res = _depth_result({(256, "f16/f16"): (0.0, 0.0), (1024, "f16/f16"): (0.0, 0.0),
                         (256, "q8_0/q8_0"): (0.010, 0.001), (1024, "q8_0/q8_0"): (0.011, 0.001),   # +10%: within
                         (256, "turbo3/turbo3"): (0.20, 0.01), (1024, "turbo3/turbo3"): (0.40, 0.02),  # doubles
                         (256, "q4_0/q4_0"): (0.10, 0.05), (1024, "q4_0/q4_0"): (0.16, 0.05)})  # +60% but noisy
    cells, sec = depth_cells(res, load_rules(), "cpu")
    by = {c.type: c for c in cells}
    assert by["turbo3/turbo3"].verdict == Verdict.PARTIAL and "grows with depth" in by["turbo3/turbo3"].caveat
    assert by["turbo3/turbo3"].value == pytest.approx(0.20)
    assert by["q8_0/q8_0"].verdict == Verdict.PASS
    assert by["q4_0/q4_0"].verdict == Verdict.PASS  # 0.06 < 2 x hypot(0.05, 0.05)
    assert by["f16/f16"].verdict == Verdict.PASS and "noise floor" in by["f16/f16"].caveat
    assert any("sliding-window attention (window 512)" in n and "1024" in n for n in sec["notes"])
    assert "| turbo3/turbo3 | 0.2000 ± 0.0100 | 0.4000 ± 0.0200 |" in sec["markdown"]
    p = depth_plot(sec, tmp_path)
    assert p is not None and p.stat().st_size > 1000


def test_the_f16_floor_row_passes_only_when_its_own_numbers_allow_it():
    # the committed Gemma sweep had f16/f16 printed as -0.000000 then 0.000001 (growth 1e-6 with se 0): a PASS whose
    # threshold (0) its value broke; llama-perplexity's 6 printed decimals are now the least growth judged
    from harness.report.rejudge import allowed
    res = _depth_result({(256, "f16/f16"): (-0.0, 0.0), (1024, "f16/f16"): (1e-6, 0.0)})
    (c,), _ = depth_cells(res, load_rules(), "cpu")
    assert c.verdict == Verdict.PASS and c.value <= c.threshold and allowed(c, "SWEEP") is None
    # an f16 cache whose own KLD grows with depth (still under the floor's limit) is not a clean floor
    res = _depth_result({(256, "f16/f16"): (0.0, 0.0), (1024, "f16/f16"): (0.0004, 0.0)})
    (c,), _ = depth_cells(res, load_rules(), "cpu")
    assert c.verdict == Verdict.PARTIAL and "grows with depth beyond its noise" in c.caveat and c.value > c.threshold


def test_depth_run_with_other_kv_types_than_asked_is_an_error_not_a_growth():
    res = _depth_result({(256, "turbo3/turbo3"): (0.2, 0.01), (1024, "turbo3/turbo3"): (0.2, 0.01)})
    res.depth[(1024, "turbo3/turbo3")].data["kv"]["changes"] = ["auto-asymmetric: upgrading K from turbo3 to q8_0"]
    cells, sec = depth_cells(res, load_rules(), "cpu")
    c = next(c for c in cells if c.type == "turbo3/turbo3")
    assert c.verdict == Verdict.ERROR and "ctx 1024" in c.caveat and "upgrading K" in c.caveat


def test_depth_pair_missing_at_one_depth_is_an_error_cell_not_a_pass():
    res = _depth_result({(256, "turbo3/turbo3"): (0.2, 0.01)})
    res.depth[(1024, "turbo3/turbo3")] = JobRecord("ppl", "turbo3/turbo3", False, "llama-perplexity timed out after 900 s",
                                                   fault="harness")
    cells, _ = depth_cells(res, load_rules(), "cpu")
    assert [c.verdict for c in cells if c.type == "turbo3/turbo3"] == [Verdict.ERROR]


# ----------------------------------------------------------------------------- Gemma 3's two caches

def test_gemma3_swa_and_non_swa_caches_are_one_kv_of_18_layers():
    """Captured from the fork: llama-perplexity on Gemma 3 270M with turbo3 (ctx 256) prints a non-SWA cache of 3
    layers and an SWA cache of 15; the sweep must count both (it counted 3 layers before)."""
    text = (GEMMA_FIX / "kld_turbo3.stderr").read_text()
    logs = parse_kv_logs(text)
    assert len(logs) == 1
    kv = logs[0].to_dict()
    assert kv["layers"] == 18 and kv["cells"] == 256 and [p["layers"] for p in kv["parts"]] == [3, 15]
    assert kv["k_type"] == kv["v_type"] == "turbo3" and kv["size_mib"] == pytest.approx(0.15 + 0.73, abs=0.011)
    assert kv_dims(kv) == (256, 1, 18)
    # the type traits predict both caches together; head_dim 256 is not padded: 3.125 bits per real value
    assert kv_type_problem(kv, "turbo3", "turbo3", GEMMA, TRAITS, 0.006) == ""
    from harness.runners.ggml_types import bits_per_real_value, predict_kv_bytes
    b = predict_kv_bytes(TRAITS["turbo3"], *kv_dims(kv), 1, 256)
    assert bits_per_real_value(b, *kv_dims(kv), 1, 256) == pytest.approx(3.125)
    stats = parse_kld_stats((GEMMA_FIX / "kld_turbo3.stdout").read_text())
    assert stats["kld"] > 0.3 and stats["same_top_p_pct"] == pytest.approx(63.681)


def test_caches_with_different_cell_counts_count_rows_per_cache():
    text = ("llama_kv_cache_iswa: creating non-SWA KV cache, size = 4096 cells\n"
            "llama_kv_cache: size =   12.00 MiB (  4096 cells,   3 layers,  1/1 seqs), K (f16):    6.00 MiB, V (f16):    6.00 MiB\n"
            "llama_kv_cache_iswa: creating     SWA KV cache, size = 1024 cells\n"
            "llama_kv_cache: size =   15.00 MiB (  1024 cells,  15 layers,  1/1 seqs), K (f16):    7.50 MiB, V (f16):    7.50 MiB\n")
    kv = parse_kv_log(text).to_dict()
    assert kv_dims(kv) == (1, 1, 4096 * 3 + 1024 * 15)
    assert kv_type_problem(kv, "f16", "f16", GEMMA, TRAITS, 0.006) == ""
    single = parse_kv_log(text.splitlines()[1]).to_dict()
    assert single["parts"] == [] and kv_dims(single) == (4096, 1, 3)


# ----------------------------------------------------------------------------- the sweep engine with fake tools

PPL = r"""#!/bin/sh
echo "ppl $@" >> "{calls}"
ctk=""; base=""; kld=0
while [ $# -gt 0 ]; do
  case "$1" in -ctk) ctk="$2"; shift;; --kl-divergence-base) base="$2"; shift;; --chunks) chunks="$2"; shift;; --kl-divergence) kld=1;; esac
  shift
done
if [ $kld = 0 ]; then echo logits > "$base"; sed "s/over [0-9]* chunks/over ${{chunks:-3}} chunks/" "{fix}/base_f16.stderr" >&2; exit 0; fi
cat "{fix}/kld_turbo3.stdout"
sed "s/turbo3/$ctk/g" "{fix}/kld_turbo3.stderr" >&2
"""
# fake turbo-decode: MODEL PROMPTS N_PROMPT N_GEN TYPE_K TYPE_V THREADS; f16 prints the reference tokens, turbo4
# diverges at token 0 (a decode-only bug), turbo2 crashes in decode
DECODE = r"""#!/bin/sh
echo "decode $@" >> "{calls}"
k="$5"; v="$6"; n="$4"
echo "llama_kv_cache: size =    2.20 MiB (   256 cells,  30 layers,  1/1 seqs), K ($k):    1.10 MiB, V ($v):    1.10 MiB" >&2
i=0
while read -r line; do
  echo "turbo-decode: phase prefill prompt $i" >&2
  if [ "$k" = turbo2 ]; then echo "turbo-decode: phase decode prompt $i token 1" >&2; echo "GGML_ASSERT(x) failed" >&2; kill -ABRT $$; fi
  first=1; [ "$k" = turbo4 ] && first=7
  echo "{{\"prompt\": $i, \"n_prompt\": $3, \"tokens\": [$first, 2, 3, 4], \"gap\": [1, 1, 1, 1], \"text\": \"t\"}}"
  i=$((i+1))
done < "$2"
echo '{{"done": true}}'
"""


def _script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fake(tmp_path):
    bdir = tmp_path / "build"
    calls = tmp_path / "calls.log"
    calls.write_text("")
    _script(bdir / "bin" / "llama-perplexity", PPL.format(calls=calls, fix=FIX))
    (bdir / "bin" / "libllama.so").write_bytes(b"")
    # a decode tool newer than decode.c and libllama: build_decode_tool uses it as built
    _script(bdir / "turbo-probe" / "turbo-decode", DECODE.format(calls=calls))
    model = tmp_path / "model.gguf"
    _write_tiny_gguf(model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog " * 20
                                for i in range(12)) + "\n")

    def cfg(pairs, **kw):
        base = dict(model=model, corpus=corpus, pairs=parse_pairs(pairs), bdir=bdir, ctx=256, chunks=4, depths=(0,),
                    threads=2, timeout=20, cache_dir=tmp_path / "cache", bench=False, decode_prompts=3,
                    decode_n_prompt=16, decode_n_gen=4)
        base.update(kw)
        return SweepConfig(**base)
    return type("Fake", (), {"cfg": staticmethod(cfg), "calls": calls, "tmp": tmp_path, "bdir": bdir,
                             "model": model, "corpus": corpus})


def test_sweep_runs_decode_jobs_and_judges_them(fake):
    cfg = fake.cfg("f16/f16,q8_0/q8_0,turbo4/turbo4,turbo2/turbo2")
    res = run_sweep(cfg, progress=False, log=lambda s: None, traits=TRAITS)
    assert set(res.decode) == {"f16/f16", "q8_0/q8_0", "turbo4/turbo4", "turbo2/turbo2"}
    assert res.decode["f16/f16"].ok and res.decode["turbo4/turbo4"].ok
    crash = res.decode["turbo2/turbo2"]
    assert not crash.ok and crash.fault == "fork" and crash.phase == "decode of prompt 0, token 1"
    calls = [ln for ln in fake.calls.read_text().splitlines() if ln.startswith("decode")]
    assert len(calls) == 4 and all(" 16 4 " in c for c in calls)  # n_prompt 16, n_gen 4
    cr, sec = judge_sweep(res, traits=TRAITS)
    by = {(c.type, c.metric): c for c in cr.cells}
    assert by[("turbo2/turbo2", "decode_run")].verdict == Verdict.FAIL
    t4 = by[("turbo4/turbo4", "decode_prefix_vs_batched")]
    assert t4.value is not None and t4.details["first_divergence"] == [0, 0, 0]
    assert by[("q8_0/q8_0", "decode_prefix_vs_batched")].details["agree_pct"] == 100.0
    assert "decode" in sec and "| turbo4/turbo4 |" in sec["decode"]["markdown"]
    # the second run takes every decode job from the cache
    n = len(fake.calls.read_text().splitlines())
    res2 = run_sweep(cfg, progress=False, log=lambda s: None, traits=TRAITS)
    assert len(fake.calls.read_text().splitlines()) == n + 1  # only the crashed decode (failures are not cached)
    assert res2.decode["turbo4/turbo4"].cached


def test_depth_jobs_reuse_the_main_context_and_run_the_longer_one(fake):
    cfg = fake.cfg("f16/f16,q8_0/q8_0,turbo3/turbo3", decode_prompts=0, ctx=256, chunks=8, kld_depths=(256, 1024),
                   depth_pairs=parse_pairs("f16/f16,turbo3/turbo3"))
    res = run_sweep(cfg, progress=False, log=lambda s: None, traits=TRAITS)
    ppl_calls = [ln for ln in fake.calls.read_text().splitlines() if ln.startswith("ppl")]
    # main: base + 3 pairs at -c 256; depth 256 = the main runs (cached); depth 1024: base + 2 pairs over the same
    # 2048 tokens (2 chunks)
    assert sum(" -c 256 " in c for c in ppl_calls) == 4
    long = [c for c in ppl_calls if " -c 1024 " in c]
    assert len(long) == 3 and all(" -b 1024 " in c for c in long) and "--chunks 2 " in long[0]
    assert set(res.depth) == {(256, "f16/f16"), (256, "turbo3/turbo3"), (1024, "f16/f16"), (1024, "turbo3/turbo3")}
    assert all(r.ok and r.kind == "depth" for r in res.depth.values())
    assert res.ppl["turbo3/turbo3"].kind == "ppl"  # the cache keeps the main run's record as it was
    from harness.cli_sweep import build_run, write_reports
    run = build_run(res, "t", ["turbo-harness", "sweep"])
    out = fake.tmp / "report"
    write_reports(run, res, out)
    assert (out / "plots" / "kld_vs_depth.png").is_file()
    md = (out / "summary.md").read_text()
    assert "KL divergence vs depth" in md and "plots/kld_vs_depth.png" in md
    depth_cells_ = [c for c in run.checks[0].cells if c.metric == "kld_growth_with_depth"]
    assert {c.type for c in depth_cells_} == {"f16/f16", "turbo3/turbo3"}
    assert all(any("depth1024-ppl.stdout" in e for e in c.evidence) for c in depth_cells_)
    assert all((out / e).is_file() for c in depth_cells_ for e in c.evidence)


# ----------------------------------------------------------------------------- bad input at the CLI

def _cli(fake, *args):
    from harness.cli import cli
    base = ["sweep", "--model", str(fake.model), "--corpus", str(fake.corpus), "--build-dir", str(fake.bdir),
            "--backend", "cpu", "--no-progress", "--pairs", "turbo3", "--no-bench", "--out", str(fake.tmp / "r")]
    r = CliRunner().invoke(cli, base + list(args), env={"TURBO_SWEEP_CACHE": str(fake.tmp / "cache")})
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    return r.exit_code, lines


@pytest.mark.parametrize("args, words", [
    (["--kld-depths", "300,1024"], "does not divide"),
    (["--kld-depths", "1024"], "two or more context lengths"),
    (["--kld-depths", "256,65536"], "beyond the"),
    (["--decode-tokens", "0"], "'--decode-tokens': 0 is too small"),
    (["--decode-prompts", "40"], "paragraphs"),
])
def test_bad_depth_and_decode_options_are_one_line_exit_2(fake, monkeypatch, args, words):
    from harness.runners import inputs
    real = inputs.read_model_info
    monkeypatch.setattr(inputs, "read_model_info",
                        lambda p: __import__("dataclasses").replace(real(p), n_ctx_train=8192))
    code, lines = _cli(fake, "--kld-depths", "none", *args) if "--kld-depths" not in args else _cli(fake, *args)
    assert code == 2 and len(lines) == 1 and words in lines[0], lines
    assert not [ln for ln in fake.calls.read_text().splitlines() if ln.strip()]  # nothing ran


# ----------------------------------------------------------------------------- the real fork

@pytest.mark.fork
@pytest.mark.slow
def test_real_decode_tool_on_smollm2(tmp_path):
    from tests.conftest import fork_build_or_skip, skip_or_fail
    bdir, fork = fork_build_or_skip()
    if not any((bdir / "bin").glob("libllama.*")):
        skip_or_fail(f"no libllama in {bdir}: run `make test-ready` (make test does)")
    from harness.errors import HarnessError
    from harness.runners.decode import build_decode_tool
    from harness.runners.inputs import default_corpus
    from harness.runners.models import resolve_model
    try:
        model = resolve_model("smollm2")
        corpus = default_corpus()
    except HarnessError as e:
        skip_or_fail(str(e))
    exe = build_decode_tool(bdir, fork)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(corpus_prompts(corpus, 2, 32)) + "\n")
    import subprocess
    outs = {}
    for t in ("f16", "q8_0"):
        r = subprocess.run([str(exe), str(model), str(prompts), "32", "8", t, t, "2"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-500:]
        outs[t] = parse_decode_output(r.stdout)
        assert outs[t].complete and len(outs[t].tokens) == 2 and all(len(x) == 8 for x in outs[t].tokens)
        kv = parse_kv_log(r.stderr)
        assert kv is not None and kv.k_type == t and kv.v_type == t
    # q8_0 is near-lossless: greedy decode follows f16 for at least the first tokens of most prompts
    firsts = [compare_tokens(a, b)["prefix"] for a, b in zip(outs["f16"].tokens, outs["q8_0"].tokens)]
    assert sum(firsts) >= 4, firsts
    r = subprocess.run([str(exe), str(model), str(prompts), "32", "8", "nope", "f16", "2"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "unknown cache type nope" in r.stderr
    # the sweep's -ngl is the 8th argument (layers offloaded as llama-perplexity's -ngl); a negative one is bad input
    r = subprocess.run([str(exe), str(model), str(prompts), "32", "2", "f16", "f16", "2", "99"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and parse_decode_output(r.stdout).complete, r.stderr[-500:]
    r = subprocess.run([str(exe), str(model), str(prompts), "32", "2", "f16", "f16", "2", "-1"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "N_GPU_LAYERS" in r.stderr


def test_gguf_without_attention_metadata_and_missing_package_are_one_line_exit_2(fake, monkeypatch):
    gguf = pytest.importorskip("gguf")
    import numpy as np
    bare = fake.tmp / "bare.gguf"
    w = gguf.GGUFWriter(str(bare), "llama")  # an architecture but no block_count / head_count
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, lines = _cli(fake, "--model", str(bare))
    assert code == 2 and len(lines) == 1 and "lacks the attention metadata" in lines[0] and "--model" in lines[0], lines
    from harness.runners import models
    m = models.KnownModel(name="fake", title="Fake", package="fake-pkg-xyz", module="fake_pkg_xyz_not_there",
                          pip="pip install fake-pkg-xyz", source="assemble", file="f.gguf", make=".venv/.model-fake",
                          reason="test")
    monkeypatch.setattr(models, "known_models", lambda: {"fake": m})
    code, lines = _cli(fake, "--model", "fake")
    assert code == 2 and len(lines) == 1 and "not installed" in lines[0] and "make .venv/.model-fake" in lines[0], lines
    assert not [ln for ln in fake.calls.read_text().splitlines() if ln.strip()]


def test_bad_input_after_a_sweep_keeps_its_finished_jobs(fake, monkeypatch):
    """A rerun refused for bad input (here depths the corpus is too short for) runs nothing and leaves the job cache as
    it was: the corrected command takes every finished job from it."""
    from harness.runners import sweep as S
    monkeypatch.setattr(S, "type_traits", lambda bdir: TRAITS)
    args = ["--pairs", "f16/f16,q8_0/q8_0", "--ctx", "256", "--chunks", "4", "--decode-prompts", "0"]
    code, _ = _cli(fake, *args, "--kld-depths", "256,512")
    assert (fake.tmp / "r" / "run.json").is_file()
    n = len(fake.calls.read_text().splitlines())
    jobs = sorted((fake.tmp / "cache" / "jobs").glob("*.json"))
    code, lines = _cli(fake, *args, "--kld-depths", "256,65536")  # the corpus is far too short for 2 x 65536 tokens
    assert code == 2 and "--kld-depths 256,65536" in lines[0] and "bytes" in lines[0]
    assert sorted((fake.tmp / "cache" / "jobs").glob("*.json")) == jobs and len(fake.calls.read_text().splitlines()) == n
    code2, _ = _cli(fake, *args, "--kld-depths", "256,512")
    assert code2 == code and len(fake.calls.read_text().splitlines()) == n  # all from the cache


def test_model_header_is_memoised_until_the_file_changes(tmp_path, monkeypatch):
    """gguf reads Gemma 3's whole 262k-token vocabulary (~26 s here): the shape is memoised by path, size and mtime,
    and by content (the same model assembled into a fresh clone's folder is not parsed again); another file is read."""
    import shutil
    from harness.runners import inputs
    monkeypatch.setattr(inputs, "_INFO_CACHE", tmp_path / "model_info.json")
    monkeypatch.setattr(inputs, "_SHA_CACHE", tmp_path / "sha256.json")
    m = tmp_path / "m.gguf"
    _write_tiny_gguf(m)
    first = inputs.read_model_info(m)
    assert first.n_head_kv == 3 and (tmp_path / "model_info.json").is_file()
    reads = []
    real = inputs._read_model_info
    monkeypatch.setattr(inputs, "_read_model_info", lambda p: reads.append(p) or real(p))
    assert inputs.read_model_info(m) == first and reads == []
    os.utime(m, ns=(m.stat().st_atime_ns, m.stat().st_mtime_ns + 10**9))  # touched, same bytes: known by content
    assert inputs.read_model_info(m) == first and reads == []
    (tmp_path / "clone").mkdir()
    copy = shutil.copy(m, tmp_path / "clone" / "m.gguf")  # the same model at another path
    got = inputs.read_model_info(copy)
    assert reads == [] and got.path == str(copy) and got.n_layer == first.n_layer == 30
    with open(m, "r+b") as f:  # the file changed (one byte of the tensor data): read again
        f.seek(-1, 2)
        f.write(b"\x01")
    os.utime(m, ns=(m.stat().st_atime_ns, m.stat().st_mtime_ns + 2 * 10**9))
    assert inputs.read_model_info(m).n_layer == 30 and reads == [m]


def test_new_sweep_metrics_have_their_own_meaning():
    from harness.report.findings import load_meanings
    m = load_meanings()["SWEEP"]
    for metric in ("decode_prefix_vs_batched", "decode_prefix_vs_q4_0", "decode_run", "kld_growth_with_depth"):
        assert metric in m and m[metric] != m["default"], metric


def test_gemma3_captured_runs_give_meaningful_cells():
    """judge_sweep on llama-perplexity output captured from the fork on Gemma 3 270M (ctx 256 x 8 chunks, CPU): both
    KV caches counted, no padding note, the SWA note, bits per real value 16 / 8.5 / 4.5 / 3.125, and the vs-q4_0
    cell saying plainly that turbo3 is worse than q4_0 at fewer bits (KLD 0.51 vs 0.13)."""
    pairs = ("f16", "q8_0", "q4_0", "turbo3")
    cfg = SweepConfig(model=Path("gemma3.gguf"), corpus=Path("c.txt"), pairs=parse_pairs(",".join(pairs)), bdir=Path("b"),
                      bench=False)
    res = SweepResult(cfg, {}, GEMMA, JobRecord("base", "f16/f16", True, data={"ppl": 22.8, "ppl_se": 2.3}), traits=TRAITS)
    for t in pairs:
        stats = parse_kld_stats((GEMMA_FIX / f"kld_{t}.stdout").read_text())
        kv = parse_kv_log((GEMMA_FIX / f"kld_{t}.stderr").read_text()).to_dict()
        res.ppl[f"{t}/{t}"] = JobRecord("ppl", f"{t}/{t}", True, data={"stats": stats, "kv": kv})
    cr, sec = judge_sweep(res, traits=TRAITS)
    rows = {r["pair"]: r for r in sec["rows"]}
    assert {p: rows[p]["bits_per_value"] for p in rows} == pytest.approx(
        {"f16/f16": 16.0, "q8_0/q8_0": 8.5, "q4_0/q4_0": 4.5, "turbo3/turbo3": 3.125})
    assert all(r["status"] == "ok" and r["kv_mib"] > 0 for r in rows.values())  # no 'KV size differs' ERROR
    assert rows["turbo3/turbo3"]["kv_mib"] == pytest.approx(0.88, abs=0.011)  # 0.15 non-SWA + 0.73 SWA
    notes = " ".join(cr.notes)
    assert "no padding" in notes and "zero-padded" not in notes and "sliding-window attention (window 512)" in notes
    by = {(c.type, c.metric): c for c in cr.cells}
    c = by[("turbo3/turbo3", "kld_vs_q4_0/q4_0")]
    assert c.verdict == Verdict.PARTIAL and "claim does not hold" in c.caveat and "3.12 bits" in c.caveat
    assert by[("turbo3/turbo3", "ppl_vs_q8_0")].verdict == Verdict.FAIL


@pytest.mark.fork
@pytest.mark.slow
def test_real_sweep_with_decode_and_depth_on_smollm2(tmp_path):
    """The CLI on the real fork and SmolLM2, small: decode agreement and two depths end up as cells, tables, a plot
    and evidence; q8_0 is near-lossless in both (no FAIL from the new rules)."""
    import subprocess
    import sys
    from tests.conftest import fork_build_or_skip, skip_or_fail
    bdir, _ = fork_build_or_skip()
    for tool in ("llama-perplexity", "libllama.so"):
        if not (bdir / "bin" / tool).exists():
            skip_or_fail(f"{tool} not built in {bdir}: run `make test-ready` (make test does)")
    from harness.errors import HarnessError
    from harness.runners.models import resolve_model
    try:
        resolve_model("smollm2")
    except HarnessError as e:
        skip_or_fail(str(e))
    out = tmp_path / "r"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "sweep", "--pairs", "f16/f16,q8_0/q8_0", "--ctx", "64",
                        "--chunks", "4", "--no-bench", "--kld-depths", "64,128", "--depth-pairs", "f16/f16,q8_0/q8_0",
                        "--decode-prompts", "2", "--decode-prompt-tokens", "16", "--decode-tokens", "4",
                        "--threads", str(min(2, os.cpu_count() or 1)), "--no-progress", "--out", str(out)],
                       capture_output=True, text=True, env={**os.environ, "TURBO_SWEEP_CACHE": str(tmp_path / "cache")},
                       cwd=Path(__file__).parents[1], timeout=900)
    assert r.returncode in (0, 1), r.stdout[-2000:] + r.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    cells = {(c["type"], c["metric"]): c for c in run["checks"][0]["cells"]}
    dec = cells[("q8_0/q8_0", "decode_prefix_vs_batched")]
    assert dec["verdict"] in ("PASS", "PARTIAL") and len(dec["details"]["first_divergence"]) == 2
    dep = cells[("q8_0/q8_0", "kld_growth_with_depth")]
    assert dep["verdict"] != "ERROR" and dep["details"]["short"] == 64 and dep["details"]["long"] == 128
    assert cells[("f16/f16", "kld_growth_with_depth")]["verdict"] == "PASS"
    assert (out / "plots" / "kld_vs_depth.png").is_file() and (out / "evidence" / "q8_0-q8_0" / "decode.stdout").is_file()
    md = (out / "summary.md").read_text()
    assert "## Decode agreement" in md and "## KL divergence vs depth" in md


# ----------------------------------------------------------------------------- review: nothing measured is never PASS

def test_decode_with_no_or_too_few_tokens_is_an_error_not_a_pass():
    """A decode run that printed 0 tokens per prompt compared nothing: it was PASS ('agrees on 0% of 0 tokens',
    p-value 0.37 against a 28% batched top-1)."""
    res, rows = _result("f16/f16,turbo2/turbo2", {"f16/f16": [[], [], []], "turbo2/turbo2": [[], [], []]},
                        {"turbo2/turbo2": 28.0})
    cells, sec = decode_cells(res, rows, load_rules(), "cpu")
    c = next(c for c in cells if c.metric == "decode_prefix_vs_batched")
    assert c.verdict == Verdict.ERROR and "not compared" in c.caveat
    # fewer tokens than asked on one prompt, or fewer prompts than the reference: ERROR too
    short = [list(r) for r in REF]
    short[1] = short[1][:5]
    for got in (short, REF[:2]):
        res, rows = _result("f16/f16,q8_0/q8_0", {"f16/f16": REF, "q8_0/q8_0": got}, {"q8_0/q8_0": 30.0})
        cells, _ = decode_cells(res, rows, load_rules(), "cpu")
        assert [c.verdict for c in cells if c.metric == "decode_prefix_vs_batched"] == [Verdict.ERROR]


def test_decode_job_with_fewer_tokens_than_asked_is_not_kept(fake, monkeypatch):
    """The runner refuses a run whose prompts have fewer tokens than --decode-tokens (the tool printed 'done')."""
    import harness.runners.tools as tools
    from harness.runners import decode as dec
    from harness.runners.tools import ToolResult
    cfg = fake.cfg("f16/f16", decode_prompts=2, decode_n_gen=4)
    out = ('{"prompt": 0, "tokens": [1, 2, 3, 4]}\n{"prompt": 1, "tokens": []}\n'
           '{"done": true, "n_prompts": 2, "n_gen": 4}\n')

    class Cache:
        def ev(self, key):
            return fake.tmp / key
    monkeypatch.setattr(tools, "run_tool", lambda cmd, *a, **k: ToolResult(list(cmd), 0, out, "", 0.1, False))
    rec = dec.decode_job(cfg, Path("x"), Path("p"), Cache(), "k1", "f16", "f16")
    assert not rec.ok and rec.fault == "harness" and "4, 0 tokens per prompt, 4 asked" in rec.error


def test_depth_pair_failing_at_a_middle_depth_is_its_own_cell():
    """Three depths, the pair crashed at the middle one: only the shortest and longest were looked at, so the crash
    was hidden and the pair PASS."""
    res = _depth_result({(256, "turbo3/turbo3"): (0.2, 0.01), (1024, "turbo3/turbo3"): (0.2, 0.01)},
                        depths=(256, 512, 1024))
    res.depth[(512, "turbo3/turbo3")] = JobRecord("ppl", "turbo3/turbo3", False, "llama-perplexity killed by signal 11",
                                                  fault="fork")
    cells, _ = depth_cells(res, load_rules(), "cpu")
    v = {c.metric: c.verdict for c in cells if c.type == "turbo3/turbo3"}
    assert v == {"depth512_run": Verdict.FAIL, "kld_growth_with_depth": Verdict.PASS}


def test_depth_baseline_that_timed_out_is_an_error_not_a_skip():
    """The f16 baseline at one depth timed out (the harness could not measure): its pairs are SKIP, so without the
    baseline's own ERROR cell the depth part had no ERROR at all."""
    res = _depth_result({(256, "turbo3/turbo3"): (0.2, 0.01)})
    res.depth_base[1024] = JobRecord("ppl", "f16/f16", False, "llama-perplexity timed out after 900 s", fault="harness")
    res.depth[(1024, "turbo3/turbo3")] = JobRecord("ppl", "turbo3/turbo3", False, "no f16 baseline: timed out")
    cells, _ = depth_cells(res, load_rules(), "cpu")
    v = {(c.type, c.metric): c.verdict for c in cells}
    assert v[("f16/f16", "depth1024_baseline_run")] == Verdict.ERROR
    assert v[("turbo3/turbo3", "kld_growth_with_depth")] == Verdict.SKIP


def test_decode_runs_where_the_sweep_offloads_and_says_where_it_ran(fake, monkeypatch):
    """turbo-decode loaded every model with n_gpu_layers 0: a CUDA sweep's decode ran the CPU's decode kernels (the
    decode-only bug it is meant to catch lives in the GPU's) and its cells said 'cuda:decode'. The sweep's -ngl is
    now passed to the tool; a cell says the CPU when nothing was offloaded, and with --rpc that decode stayed local."""
    import harness.runners.tools as tools
    from harness.runners import decode as dec
    from harness.runners.tools import ToolResult
    seen = []
    monkeypatch.setattr(tools, "run_tool", lambda cmd, *a, **k: seen.append(list(cmd)) or ToolResult(
        list(cmd), None, "", "", 0.1, True))

    class Cache:
        def ev(self, key):
            return fake.tmp / key
    dec.decode_job(fake.cfg("f16/f16", ngl=99), Path("x"), Path("p"), Cache(), "k1", "f16", "f16")
    assert seen[-1][-3:] == ["99", "-", "-"]  # N_GPU_LAYERS, then -dev and --rpc: none
    dec.decode_job(replace(fake.cfg("f16/f16", ngl=99), rpc=["127.0.0.1:50052"], devices="RPC0"), Path("x"), Path("p"),
                   Cache(), "k2", "f16", "f16")
    assert seen[-1][-3:] == ["99", "RPC0", "127.0.0.1:50052"]  # an rpcN side decodes on its server
    src = dec.SRC.read_text()
    assert "mp.n_gpu_layers = n_gpu_layers;" in src and "mp.n_gpu_layers = 0;" not in src
    res, rows = _result("f16/f16,q8_0/q8_0", {"f16/f16": REF, "q8_0/q8_0": REF}, {"q8_0/q8_0": 95.0})
    res.config.backend, res.config.ngl = "cuda", 0
    cells, sec = decode_cells(res, rows, load_rules(), "cuda")
    assert {c.path for c in cells} == {"cpu:decode"}
    res.config.ngl, res.config.rpc = 99, ["127.0.0.1:50052"]
    cells, sec = decode_cells(res, rows, load_rules(), "cuda")
    assert {c.path for c in cells} == {"cuda:decode"}
    assert all("spread over this machine's cuda and the rpc-server" in c.caveat for c in cells)
    assert "spread over this machine's cuda" in sec["markdown"]
    res.config.backend, res.config.devices = "rpc0", "RPC0"  # an rpcN side: every layer on the server, no note
    cells, sec = decode_cells(res, rows, load_rules(), "rpc0")
    assert {c.path for c in cells} == {"rpc0:decode"} and not any("rpc-server" in c.caveat for c in cells)


def test_decode_vs_q4_0_uses_the_baseline_the_rule_names():
    """[decode] vs_q4_0 in checks/sweeps.toml named the baseline pair, but the code read 'q4_0/q4_0' itself: the
    rule's value changed nothing."""
    res, rows = _result("f16/f16,q4_0/q4_0,q4_0/q4_0+rot,turbo3/turbo3", {
        "f16/f16": REF, "q4_0/q4_0": REF, "q4_0/q4_0+rot": REF, "turbo3/turbo3": _diverge_at([3, 2, 3])},
        {"q4_0/q4_0": 10.0, "q4_0/q4_0+rot": 99.0, "turbo3/turbo3": 64.0})
    rules = load_rules()
    cells, _ = decode_cells(res, rows, rules, "cpu")
    c = next(c for c in cells if c.metric == "decode_prefix_vs_q4_0")
    assert c.verdict == Verdict.PASS and c.details["q4_0_top1_pct"] == 10.0
    rules["decode"]["vs_q4_0"] = "q4_0/q4_0+rot"
    cells, _ = decode_cells(res, rows, rules, "cpu")
    c = next(c for c in cells if c.metric == "decode_prefix_vs_q4_0")
    assert c.verdict == Verdict.PARTIAL and c.details["q4_0_top1_pct"] == 99.0 and "q4_0/q4_0+rot" in c.caveat
