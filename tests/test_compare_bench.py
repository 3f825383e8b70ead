"""Issue 13: sweeps of several models side by side (`sweep-compare`) and the sweep benchmark's tool-time sum."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.errors import HarnessError
from harness.report.compare import load_sweep, write_compare


def _sweep_dir(tmp: Path, name: str, model: str, head: int, rows: list[tuple], swa=None) -> Path:
    d = tmp / name
    d.mkdir()
    cells = [{"type": p, "metric": f"kld_vs_{b}", "verdict": v} for p, _, _, _, vs in rows for b, v in vs.items()]
    run = {"meta": {"model": f"/m/{model}.gguf"}, "checks": [{"id": "SWEEP", "cells": cells}],
           "sections": {"sweep": {"model": {"name": model, "head_dim_k": head, "n_head": 4, "n_head_kv": 1, "n_layer": 18,
                                            "sliding_window": swa},
                                  "pinned": {"ctx": 256, "chunks": 8, "backend": "cpu"},
                                  "rows": [{"pair": p, "kld": k, "kld_se": 0.01, "bits_per_value": b, "ppl": 20.0,
                                            "ppl_se": 2.0, "same_top_p_pct": t} for p, k, b, t, _ in rows]},
                        "decode": {"rows": [{"pair": "turbo3/turbo3", "agree_pct": 40.0, "first_divergence": [0, 3, None]}]}}}
    (d / "run.json").write_text(json.dumps(run))
    return d


def test_two_models_give_one_table_each_and_one_plot(tmp_path):
    a = _sweep_dir(tmp_path, "a", "smol", 64, [("f16/f16", 0.0, 16.0, 100.0, {}), ("q4_0/q4_0", 0.15, 4.5, 77.0, {}),
                                               ("turbo3/turbo3", 0.25, 6.25, 72.0, {"q4_0/q4_0": "PARTIAL"})])
    b = _sweep_dir(tmp_path, "b", "gemma", 256, [("q4_0/q4_0", 0.13, 4.5, 80.0, {}),
                                                 ("turbo3/turbo3", 0.51, 3.125, 64.0, {"q4_0/q4_0": "PARTIAL",
                                                                                       "q4_0/q4_0+rot": "PARTIAL"})], swa=512)
    md, png = write_compare([a, b], tmp_path / "out")
    text = md.read_text()
    assert "## smol on " in text and "(head_dim 64" in text and "## gemma on " in text and "(head_dim 256" in text
    assert "SWA window 512" in text
    assert "| turbo3/turbo3 | 20.00 ± 2.00 | 0.5100 ± 0.0100 | 64.0 | 3.125 | PARTIAL | PARTIAL | 40 | 0, 3, none |" in text
    assert png.is_file() and png.stat().st_size > 5000


def test_a_folder_that_is_not_a_sweep_report_is_one_line_exit_2(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "run.json").write_text(json.dumps({"checks": [], "sections": {}}))
    with pytest.raises(HarnessError, match="not a sweep report") as e:
        load_sweep(tmp_path / "v")
    assert "cross-backend" not in str(e.value)
    # a cross-backend sweep's top folder: the message names its per-backend sweep folders
    for side in ("cpu", "cuda"):
        (tmp_path / "v" / side).mkdir()
        (tmp_path / "v" / side / "run.json").write_text("{}")
    with pytest.raises(HarnessError, match="cross-backend sweep; give its per-backend sweeps") as e:
        load_sweep(tmp_path / "v")
    assert str(tmp_path / "v" / "cpu") in str(e.value) and str(tmp_path / "v" / "cuda") in str(e.value)
    from harness.cli import cli
    r = CliRunner().invoke(cli, ["sweep-compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output and len(r.output.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["sweep-compare", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "holds no run.json" in r.output and len(r.output.strip().splitlines()) == 1


def test_bench_sums_the_tool_times_recorded_in_the_evidence(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_sweep", Path(__file__).parents[1] / "scripts" / "bench_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for pair, text in (("f16-f16", "X=1 llama-perplexity ...\n# rc=0 after 27.5 s\n"),
                       ("turbo3-turbo3", "llama-bench ...\n# rc=-6 after 3.0 s\n"),
                       ("q8_0-q8_0", "turbo-decode ...\n# timed out after 900.0 s\n")):
        (tmp_path / "evidence" / pair).mkdir(parents=True)
        (tmp_path / "evidence" / pair / "x.cmd").write_text(text)
    assert mod.tool_seconds(tmp_path) == (pytest.approx(930.5), 3)
    # the depth table's copy of the main run is the same tool call: counted once
    (tmp_path / "evidence" / "f16-f16" / "depth256-ppl.cmd").write_text("X=1 llama-perplexity ...\n# rc=0 after 27.5 s\n")
    assert mod.tool_seconds(tmp_path) == (pytest.approx(930.5), 3)


def test_the_model_line_is_the_best_kld_at_that_memory_or_less():
    from harness.report.compare import pareto_front
    rows = [{"pair": "a", "bits_per_value": 8.5, "kld": 0.005}, {"pair": "b", "bits_per_value": 4.5, "kld": 0.15},
            {"pair": "c", "bits_per_value": 4.5, "kld": 0.05}, {"pair": "d", "bits_per_value": 6.25, "kld": 0.25},
            {"pair": "e", "bits_per_value": 4.25, "kld": 1.1}]
    assert [r["pair"] for r in pareto_front(rows)] == ["e", "c", "a"]
