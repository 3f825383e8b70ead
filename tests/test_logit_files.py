"""The reader of llama-perplexity's saved logits (harness/runners/logit_files.py): files written here in the fork's
layout from known logits, then the real fork's files cross-checked against llama-perplexity's own statistics."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

from harness.errors import HarnessError
from harness.runners.logit_files import kld_between_files, open_logits


def write_logits(path: Path, logits: np.ndarray, tokens: np.ndarray, n_ctx: int) -> None:
    """Write float logits [n_chunk * (n_ctx - 1 - n_ctx//2), n_vocab] as the fork's perplexity() does (its
    log_softmax(..., uint16_t*): log-its below max - 16 clamp to 0, the rest rounded to (max - min)/65535 steps)."""
    n_rows, n_vocab = logits.shape
    n_chunk = len(tokens) // n_ctx
    nv = 2 * ((n_vocab + 1) // 2) + 4
    out = np.zeros((n_rows, nv), "<u2")
    for i, lg in enumerate(logits.astype(np.float32)):
        mx, mn = lg.max(), max(lg.min(), lg.max() - np.float32(16))
        lse = np.float32(math.log(np.exp((lg - mx).astype(np.float64)).sum()))
        scale = np.float32((mx - mn) / np.float32(65535))
        out[i, :4] = np.frombuffer(struct.pack("<ff", scale, mn - mx - lse), "<u2")
        q = np.where(lg > mn, np.rint((lg - mn) / scale), 0)
        out[i, 4:4 + n_vocab] = q.astype("<u2")
    with open(path, "wb") as f:
        f.write(b"_logits_" + struct.pack("<Iii", n_ctx, n_vocab, n_chunk) + tokens.astype("<i4").tobytes())
        f.write(out.tobytes())


def _exact(la: np.ndarray, lb: np.ndarray, tgt: np.ndarray) -> dict:
    """KLD(a || b) per row, top-1 agreement and nll difference in float64 from the exact logits."""
    pa = la - np.logaddexp.reduce(la, axis=1, keepdims=True)
    pb = lb - np.logaddexp.reduce(lb, axis=1, keepdims=True)
    m = pa > -16
    kld = (np.where(m, np.exp(pa) * (pa - pb), 0)).sum(axis=1)
    idx = np.arange(len(tgt))
    return {"kld": kld.mean(), "top": 100 * np.mean(la.argmax(1) == lb.argmax(1)),
            "dnll": np.mean(-pb[idx, tgt] + pa[idx, tgt])}


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(7)
    n_ctx, n_chunk, n_vocab = 64, 4, 301  # odd vocabulary: a row has one uint16 of padding
    per = n_ctx - 1 - n_ctx // 2
    tokens = rng.integers(0, n_vocab, n_ctx * n_chunk)
    tgt = tokens.reshape(n_chunk, n_ctx)[:, n_ctx // 2 + 1:].reshape(-1)
    la = rng.normal(0, 2, (n_chunk * per, n_vocab))  # within the files' 16-nat range (below it they clamp)
    lb = la + rng.normal(0, 0.3, la.shape)  # a quantised cache's disturbance
    write_logits(tmp_path / "a.kld", la, tokens, n_ctx)
    write_logits(tmp_path / "b.kld", lb, tokens, n_ctx)
    return tmp_path, la, lb, tgt, tokens, n_ctx


def test_kld_from_two_files_matches_the_exact_figures(pair):
    d, la, lb, tgt, _, _ = pair
    st = kld_between_files(d / "a.kld", d / "b.kld", block_elems=1000)  # several blocks, threads
    ex = _exact(la, lb, tgt)
    assert st["count"] == len(tgt) and st["chunks"] == 4
    assert st["kld"] == pytest.approx(ex["kld"], rel=1e-3)
    assert st["same_top_p_pct"] == pytest.approx(ex["top"], abs=100 / len(tgt) + 1e-9)  # a rounding tie at most
    assert st["ln_ppl_ratio_files"] == pytest.approx(ex["dnll"], abs=1e-3)
    assert 0 < st["kld_se"] < st["kld"] and st["kld_p99"] <= st["kld_max"]
    same = kld_between_files(d / "a.kld", d / "a.kld")
    assert same["kld"] == 0.0 and same["same_top_p_pct"] == 100.0 and same["dp_rms_pct"] == 0.0


def test_bad_files_are_one_line_errors(pair):
    d, la, lb, tgt, tokens, n_ctx = pair
    (d / "junk.kld").write_bytes(b"not a logits file at all")
    with pytest.raises(HarnessError, match="not a llama-perplexity logits file"):
        kld_between_files(d / "a.kld", d / "junk.kld")
    (d / "cut.kld").write_bytes((d / "b.kld").read_bytes()[:-10])
    with pytest.raises(HarnessError, match="truncated"):
        kld_between_files(d / "a.kld", d / "cut.kld")
    other = tokens.copy()
    other[5] += 1
    write_logits(d / "c.kld", lb, other, n_ctx)
    with pytest.raises(HarnessError, match="different tokens"):
        kld_between_files(d / "a.kld", d / "c.kld")
    assert open_logits(d / "a.kld").targets().tolist() == tgt.tolist()


@pytest.mark.fork
@pytest.mark.slow
def test_kld_from_files_agrees_with_llama_perplexity_on_the_same_runs(tmp_path):
    """The real fork on SmolLM2 (CPU, ctx 128 x 2 chunks): f16 and q4_0 runs save their logits; llama-perplexity then
    scores q4_0 against the f16 file itself. The harness's figures from the two files must match the fork's."""
    from conftest import fork_build_or_skip, skip_or_fail
    from harness.runners.inputs import default_corpus
    from harness.runners.llama_logs import parse_final_ppl, parse_kld_stats
    from harness.runners.models import resolve_model
    from harness.runners.tools import run_tool
    bdir, _ = fork_build_or_skip()
    tool = bdir / "bin" / "llama-perplexity"
    if not tool.is_file():
        skip_or_fail(f"no llama-perplexity in {bdir}: run `make test-ready`")
    try:
        model, corpus = resolve_model("smollm2"), default_corpus()
    except HarnessError as e:
        skip_or_fail(f"no SmolLM2 model or corpus: {e}")
    common = [str(tool), "-m", str(model), "-f", str(corpus), "-c", "128", "--chunks", "2", "-b", "128", "-t", "2",
              "-ngl", "0", "-fa", "on", "-fit", "off"]

    def run(*args):
        r = run_tool(common + list(args), {}, 300)
        assert r.ok, r.failure()
        return r.stdout + r.stderr
    ppl = {}
    for t in ("f16", "q8_0", "q4_0"):
        ppl[t] = parse_final_ppl(run("-ctk", t, "-ctv", t, "--kl-divergence-base", str(tmp_path / f"{t}.kld")))[0]
    for t, tol in (("q4_0", 1e-3), ("q8_0", 1e-2)):  # a large and a small KLD
        fork = parse_kld_stats(run("-ctk", t, "-ctv", t, "--kl-divergence-base", str(tmp_path / "f16.kld"),
                                   "--kl-divergence"))
        assert fork["ppl"] == pytest.approx(ppl[t], abs=1e-4), "the CPU runs are not repeatable: nothing to compare"
        ours = kld_between_files(tmp_path / "f16.kld", tmp_path / f"{t}.kld")
        print(t, {k: (fork.get(k), ours.get(k)) for k in ("kld", "kld_se", "kld_p99", "same_top_p_pct", "dp_rms_pct",
                                                         "ln_ppl_ratio_se")})
        assert fork["kld"] > 1e-4  # the cache moves the logits: a comparison of something
        # the fork scores exact logits, the harness their saved copy (rounded to <= 16/65535 nats an entry)
        assert ours["kld"] == pytest.approx(fork["kld"], rel=tol, abs=2e-6)
        assert ours["kld_se"] == pytest.approx(fork["kld_se"], rel=tol, abs=2e-6)
        assert ours["kld_p99"] == pytest.approx(fork["kld_p99"], rel=tol, abs=2e-6)
        assert ours["same_top_p_pct"] == pytest.approx(fork["same_top_p_pct"], abs=100 / ours["count"] + 1e-3)
        assert ours["dp_rms_pct"] == pytest.approx(fork["dp_rms_pct"], rel=tol, abs=2e-3)
        assert ours["ln_ppl_ratio_se"] == pytest.approx(fork["ln_ppl_ratio_se"], rel=tol, abs=2e-6)
        # the ln PPL ratio the sweep reports for the saving side: from the two runs' own PPL lines
        assert math.log(ppl[t] / ppl["f16"]) == pytest.approx(fork["ln_ppl_ratio"], abs=0.1 * fork["ln_ppl_ratio_se"])
