"""A per-side greedy-decode cell (``cuda:decode``) is PASS only when the run's log shows the pair's decode placed on
that backend like the side's own f16 decode (spec "Integrity of a verdict": placement; "Every backend, and how it
was examined").

The real case: in ``reports/samples/xbackend-cuda-h100-smollm2/cuda`` q8_0/turbo3's decode on an H100 reserved 62
graph splits against 2 for its f16 decode (the turbo3-V flash attention ran on the CPU) and its ``cuda:decode`` cells
were PASS: CUDA was credited with numbers the CPU computed in part. These tests replay those logs through the decode
runner (:func:`harness.runners.decode.decode_job`, with the tool's run replaced by the recorded stdout/stderr) and
judge them (:func:`harness.checks.decode.decode_cells`); a log without a split count proves nothing either.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.checks.decode import decode_cells
from harness.checks.sweeps import load_rules
from harness.report.model import Verdict
from harness.runners.llama_logs import parse_kv_logs
from harness.runners.sweep import SweepConfig, SweepResult, parse_pairs

SAMPLE = Path(__file__).resolve().parents[1] / "reports" / "samples" / "xbackend-cuda-h100-smollm2" / "cuda" / "evidence"
# the sample's batched top-1 agreement per pair (its sweep.csv, same_top_p_pct)
TOP1 = {"q8_0/q8_0": 91.569, "q4_0/q4_0": 78.2, "turbo3/turbo3": 72.6, "q8_0/turbo3": 88.8}
PAIRS = "f16/f16,q8_0/q8_0,q4_0/q4_0,turbo3/turbo3,q8_0/turbo3"


def _logs(pair: str) -> tuple[str, str]:
    d = SAMPLE / pair.replace("/", "-")
    return (d / "decode.stdout").read_text(), (d / "decode.stderr").read_text()


def _run(tmp_path, monkeypatch, edit=lambda pair, err: err, ngl=99, backend="cuda"):
    """Each pair's decode job on the replayed sample logs (``edit`` may change a pair's stderr), then its cells."""
    import harness.runners.tools as tools
    from harness.runners import decode as dec
    from harness.runners.tools import ToolResult
    cfg = SweepConfig(model=tmp_path / "m.gguf", corpus=tmp_path / "c.txt", pairs=parse_pairs(PAIRS), bdir=tmp_path,
                      backend=backend, ngl=ngl, decode_prompts=3, decode_n_prompt=64, decode_n_gen=32)
    res = SweepResult(cfg, {}, None, None)

    class Cache:
        def ev(self, key):
            return tmp_path / key
    for k, v in cfg.pairs:
        lab = f"{k}/{v}"
        out, err = _logs(lab)
        err = edit(lab, err)
        monkeypatch.setattr(tools, "run_tool", lambda cmd, *a, o=out, e=err, **kw: ToolResult(list(cmd), 0, o, e, 1.0,
                                                                                              False))
        res.decode[lab] = dec.decode_job(cfg, Path("turbo-decode"), Path("p"), Cache(), lab.replace("/", "-"), k, v)
        assert res.decode[lab].ok, res.decode[lab].error
    rows = [{"pair": p, "same_top_p_pct": t} for p, t in TOP1.items()]
    cells, sec = decode_cells(res, rows, load_rules(), backend)
    return {(c.type, c.metric): c for c in cells}, sec


def test_cuda_decode_whose_attention_fell_back_to_the_cpu_is_not_pass(tmp_path, monkeypatch):
    by, sec = _run(tmp_path, monkeypatch)
    moved = by[("q8_0/turbo3", "decode_prefix_vs_batched")]
    assert moved.path == "cuda:decode"
    assert moved.verdict == Verdict.PARTIAL and "graph splits 62 vs 2 for its f16 decode" in moved.caveat
    assert "ran elsewhere than on cuda" in moved.caveat and moved.details["placement"]["kind"] == "moved"
    vs_q4 = by[("q8_0/turbo3", "decode_prefix_vs_q4_0")]  # the same run beside q4_0: not cuda's either
    assert vs_q4.verdict == Verdict.PARTIAL and "graph splits 62 vs 2" in vs_q4.caveat
    # pairs placed like the f16 decode (2 splits each) keep their verdicts
    for lab in ("q8_0/q8_0", "q4_0/q4_0", "turbo3/turbo3"):
        assert by[(lab, "decode_prefix_vs_batched")].verdict == Verdict.PASS, by[(lab, "decode_prefix_vs_batched")].caveat
    assert by[("turbo3/turbo3", "decode_prefix_vs_q4_0")].verdict == Verdict.PASS
    assert "PARTIAL" in {r["pair"]: r["status"] for r in sec["rows"]}["q8_0/turbo3"]
    row = next(ln for ln in sec["markdown"].splitlines() if ln.startswith("| q8_0/turbo3 |"))
    assert "PARTIAL (graph splits 62 vs 2" in row  # the decode table names the cause too


def _no_splits(err: str) -> str:
    return "\n".join(ln for ln in err.splitlines() if "graph splits" not in ln)


def test_no_split_count_in_the_log_cannot_claim_the_backend_ran_it(tmp_path, monkeypatch):
    by, _ = _run(tmp_path, monkeypatch, lambda pair, err: _no_splits(err) if pair == "q8_0/q8_0" else err)
    c = by[("q8_0/q8_0", "decode_prefix_vs_batched")]
    assert c.verdict == Verdict.PARTIAL and "placement unknown" in c.caveat and "the pair's decode log" in c.caveat
    assert by[("q4_0/q4_0", "decode_prefix_vs_batched")].verdict == Verdict.PASS
    # without a split count in the f16 reference's log no pair can be shown to be cuda's
    by, _ = _run(tmp_path, monkeypatch, lambda pair, err: _no_splits(err) if pair == "f16/f16" else err)
    judged = [c for c in by.values() if c.metric.startswith("decode_prefix")]
    assert judged and all(c.verdict != Verdict.PASS for c in judged)
    assert all("the f16 reference's decode log" in c.caveat for c in judged)


def test_one_token_graph_split_count_is_the_decode_path_evidence(tmp_path, monkeypatch):
    """llama prints 'graph splits = N (with bs=B), M (with bs=1)' when the prompt-size and one-token graphs differ: a
    pair whose one-token (decode) graph alone falls back was read as 2 splits, like the f16 decode."""
    line = "sched_reserve: graph splits = 2 (with bs=64), 34 (with bs=1)"
    kv = parse_kv_logs("llama_kv_cache: size =    2.20 MiB (   256 cells,  30 layers,  1/1 seqs), K (q8_0):    1.10 "
                       "MiB, V (turbo3):    1.10 MiB\n" + line + "\n")[0]
    assert (kv.graph_splits, kv.graph_splits_tg) == (2, 34)
    by, _ = _run(tmp_path, monkeypatch, lambda pair, err: err.replace("graph splits = 2", line[15:])
                 if pair == "turbo3/turbo3" else err)
    c = by[("turbo3/turbo3", "decode_prefix_vs_batched")]
    assert c.verdict == Verdict.PARTIAL and "graph splits 34 vs 2" in c.caveat


@pytest.mark.parametrize("backend", ["cuda", "cpu"])
def test_a_decode_run_entirely_on_the_cpu_needs_no_split_evidence(tmp_path, monkeypatch, backend):
    """-ngl 0: every layer and its cache on the CPU (path 'cpu:decode'), nothing to fall back from."""
    by, _ = _run(tmp_path, monkeypatch, lambda pair, err: _no_splits(err), ngl=0, backend=backend)
    c = by[("q8_0/q8_0", "decode_prefix_vs_batched")]
    assert c.path == "cpu:decode" and c.verdict == Verdict.PASS
