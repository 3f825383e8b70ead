"""Parsers of the fork's tool output, tested on real captures (tests/fixtures/sweep/, trimmed to the
relevant lines) of TheTom/llama-cpp-turboquant 69d8e4be4 running SmolLM2-135M-Instruct Q4_1 on CPU."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.checks.sweeps import kv_type_problem, load_rules
from harness.runners.ggml_types import TypeTrait, bits_per_real_value, padded_head, predict_kv_bytes
from harness.runners.inputs import ModelInfo
from harness.runners.llama_logs import (parse_bench_json, parse_chunk_ppls, parse_final_ppl, parse_kld_stats,
                                        parse_kv_log, parse_kv_logs)
from harness.runners.tools import error_line

FIX = Path(__file__).parent / "fixtures" / "sweep"

# Traits as this fork's build reports them (ggml_blck_size / ggml_type_size); test_sweep_real.py checks
# them against the build when it is present.
TRAITS = {n: TypeTrait(n, i, b, s) for n, i, b, s in [
    ("f16", 1, 1, 2), ("q4_0", 2, 32, 18), ("q8_0", 8, 32, 34),
    ("turbo2", 42, 128, 34), ("turbo3", 43, 128, 50), ("turbo4", 44, 128, 68)]}
SMOL = ModelInfo("smol.gguf", "llama", "smol", n_layer=30, n_head=9, n_head_kv=3, head_dim_k=64, head_dim_v=64, n_embd=576)


def read(name: str) -> str:
    return (FIX / name).read_text()


def test_kld_stats_parsed_from_real_output():
    s = parse_kld_stats(read("kld_turbo3.stdout"))
    assert s["ppl"] == pytest.approx(33.047158) and s["ppl_se"] == pytest.approx(5.942923)
    assert s["ppl_base"] == pytest.approx(25.709334)
    assert s["ln_ppl_ratio"] == pytest.approx(0.251081) and s["ln_ppl_ratio_se"] == pytest.approx(0.052169)
    assert s["kld"] == pytest.approx(0.273270) and s["kld_se"] == pytest.approx(0.036160)
    assert s["kld_p99"] == pytest.approx(4.939776)
    assert s["same_top_p_pct"] == pytest.approx(75.591) and s["same_top_p_pct_se"] == pytest.approx(2.204)
    assert s["dp_mean_pct"] == pytest.approx(-6.098) and s["dp_rms_pct"] == pytest.approx(15.674)
    assert s["cor_ln_ppl"] == pytest.approx(95.84)
    assert s["chunks"] == 3
    # internal consistency of what the tool printed: exp(mean ln ratio) ~ mean ratio
    assert abs(s["ppl_ratio"] - 2.718281828 ** s["ln_ppl_ratio"]) < 0.01


def test_kld_stats_empty_on_other_text():
    assert parse_kld_stats(read("kld_turbo3.stderr")) == {}


def test_kv_log_turbo3_with_padding():
    kv = parse_kv_log(read("kld_turbo3.stderr"))
    assert (kv.k_type, kv.v_type) == ("turbo3", "turbo3")
    assert (kv.cells, kv.layers, kv.seqs) == (256, 30, 1)
    assert kv.k_mib == pytest.approx(1.10) and kv.size_mib == pytest.approx(2.20)
    assert kv.padding == {"K": (64, 128), "V": (64, 128)}
    assert kv.changes == [] and kv.graph_splits == 1


def test_kv_prediction_matches_real_log_and_bits_per_real_value():
    kv = parse_kv_log(read("kld_turbo3.stderr"))
    pred = predict_kv_bytes(TRAITS["turbo3"], kv.cells, kv.seqs, kv.layers, 3, 64) / 2**20
    assert pred == pytest.approx(kv.k_mib, abs=0.006)
    # head_dim 64 padded to 128: 50 bytes per 64 real values = 6.25 bits, not the nominal 3.125
    assert padded_head(64, "turbo3") == 128 and padded_head(64, "q8_0") == 64
    bits = bits_per_real_value(pred * 2**20, kv.cells, kv.seqs, kv.layers, 3, 64)
    assert bits == pytest.approx(6.25)
    f16 = parse_kv_log(read("base_f16.stderr"))
    assert predict_kv_bytes(TRAITS["f16"], 256, 1, 30, 3, 64) / 2**20 == pytest.approx(f16.k_mib, abs=0.006)


def test_asked_types_really_used_passes():
    kv = parse_kv_log(read("kld_turbo3.stderr")).to_dict()
    assert kv_type_problem(kv, "turbo3", "turbo3", SMOL, TRAITS, 0.006) == ""


def test_fork_default_layer_adaptive_switch_is_detected_and_quoted():
    # captured with TURBO_LAYER_ADAPTIVE unset: the fork silently stores V of layers 0,1,28,29 as q8_0
    kv = parse_kv_log(read("layer_adaptive_default_turbo2.stderr")).to_dict()
    assert kv["k_type"] == "turbo2" and kv["v_type"] == "turbo2"  # the size line still claims turbo2
    msg = kv_type_problem(kv, "turbo2", "turbo2", SMOL, TRAITS, 0.006)
    assert "Boundary V mode 7: first2+last2 V=q8_0, rest V=turbo2" in msg
    # even without the announcing line, the V size gives it away (0.85 MiB vs 0.75 predicted)
    kv["changes"] = []
    msg = kv_type_problem(kv, "turbo2", "turbo2", SMOL, TRAITS, 0.006)
    assert "predicted K 0.75 V 0.75 MiB" in msg and "V (turbo2):    0.85 MiB" in msg


def test_layer_adaptive_env_mode1_detected():
    kv = parse_kv_log(read("layer_adaptive1_fitoff_turbo3.stderr")).to_dict()
    assert kv["changes"] == ["llama_kv_cache: layer-adaptive mode 1 enabled (env)"]
    assert "layer-adaptive mode 1" in kv_type_problem(kv, "turbo3", "turbo3", SMOL, TRAITS, 0.006)


def test_auto_asymmetric_k_rewrite_detected():
    # The auto-asymmetric path needs GQA >= 6 (SmolLM2 has 3), so this line is built from the fork's format
    # string (src/llama-kv-cache.cpp: "%s: auto-asymmetric: GQA ratio ..."); the size line then says K (q8_0).
    text = ("llama_kv_cache: auto-asymmetric: GQA ratio 7:1 (n_head=28, n_head_kv=4) — upgrading K from turbo3 to q8_0 "
            "to prevent quality degradation. Disable with TURBO_AUTO_ASYMMETRIC=0\n"
            + read("kld_turbo3.stderr").replace("K (turbo3)", "K (q8_0)"))
    kv = parse_kv_log(text).to_dict()
    assert kv["k_type"] == "q8_0"
    assert "upgrading K from turbo3 to q8_0" in kv_type_problem(kv, "turbo3", "turbo3", None, TRAITS, 0.006)
    kv["changes"] = []
    assert "K (q8_0)" in kv_type_problem(kv, "turbo3", "turbo3", None, TRAITS, 0.006)


def test_missing_size_line_is_a_problem():
    assert "no 'llama_kv_cache: size' line" in kv_type_problem(None, "f16", "f16", SMOL, TRAITS, 0.006)


def test_bench_json_and_verbose_kv_logs():
    rows = parse_bench_json(read("bench_turbo3.json"))
    assert [(r.test, r.depth) for r in rows] == [("pp", 0), ("tg", 0), ("pp", 256), ("tg", 256)]
    r = rows[2]
    assert (r.type_k, r.type_v, r.n_tokens, r.flash_attn, r.n_batch) == ("turbo3", "turbo3", 64, True, 256)
    assert r.avg_ts == pytest.approx(26.680345) and len(r.samples_ts) == 3
    assert r.stddev_ts == pytest.approx(0.495267)
    kvs = parse_kv_logs(read("bench_verbose_turbo4.stderr"))
    assert len(kvs) == 2 and all(k.k_type == "turbo4" and k.padding["K"] == (64, 128) for k in kvs)
    with pytest.raises(ValueError, match="not JSON"):
        parse_bench_json("main: error\n")


def test_final_ppl_and_chunks():
    assert parse_final_ppl(read("base_f16.stderr")) == (25.9562, 4.76622)
    assert parse_chunk_ppls(read("plain_f16.stdout")) == [46.1962, 24.0889, 25.9562, 29.9557]
    assert parse_final_ppl("nothing") is None


def test_error_line_quotes_the_tools_own_message():
    assert error_line(read("bad_type.stderr")) == 'error while handling argument "-ctk": Unsupported cache type: foo'
    assert error_line("") == "no output"


def test_rules_file_has_reasons_and_spec_defaults():
    r = load_rules()
    assert r["ppl_vs_q8_0"]["turbo4/turbo4"] == 0.01 and r["ppl_vs_q8_0"]["turbo3/turbo3"] == 0.025
    assert r["ppl_vs_q8_0"]["turbo2/turbo2"] == 0.10 and r["ppl_vs_q8_0"]["q8_0/turbo3"] == 0.005
    assert r["speed"]["prefill_ratio_min"] == 0.95 and r["significance"]["paired_se"] == 2.0
    assert all(r[sec][k + "_reason"] for sec in r for k in r[sec] if not k.endswith("_reason"))
