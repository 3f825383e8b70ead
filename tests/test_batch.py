"""Batched probe calls (issue 23): COMPAT's writes and attentions go as few calls per backend, each op keeps its own
answer, a failure inside a batch lands on its own cell, and the probe keeps one ggml backend per device."""
from __future__ import annotations

import numpy as np
import pytest

from harness.checks import compat
from harness.errors import HarnessError, ProbeCrash, Unsupported
from harness.report.model import Verdict
from harness.targets.base import Backend, Target
from harness.targets.fork import ForkTarget
from harness.targets.numpy_target import NumpyTarget
from harness.verify import run_checks


class Batching(NumpyTarget):
    """Two emulated backends answering batches as a fork device does (one call, one answer per item), with a failure
    injected into one item of one batch: ``fail_write`` (backend, route, type, rows) or ``fail_attn`` (reader,
    writer backend, writer route, type). Records every batch call."""

    def __init__(self, fail_write=None, fail_attn=None, fail=Unsupported("emulated: declined inside a batch")):
        super().__init__(backends=(("cpu", "cpu"), ("cuda", "gpu")))
        self.fail_write, self.fail_attn, self.fail = fail_write, fail_attn, fail
        self.batches: list[tuple[str, str, int]] = []
        self.writer_of: dict[int, tuple] = {}  # id of the bytes -> (backend, route, type) that wrote them (backends
        # write identical bytes here: the object, not its content, names the writer)

    def quantize_many(self, backend, route, items):
        self.batches.append(("quantize", f"{backend}:{route}", len(items)))
        out = super().quantize_many(backend, route, items)
        for i, ((t, x), a) in enumerate(zip(items, out)):
            if self.fail_write == (backend, route, t, x.shape[0]):
                out[i] = self.fail
            elif isinstance(a, np.ndarray):
                self.writer_of[id(a)] = (backend, route, t)
        return out

    def flash_attn_many(self, backend, calls):
        self.batches.append(("attention", backend, len(calls)))
        out = super().flash_attn_many(backend, calls)
        for i, c in enumerate(calls):
            if self.fail_attn == (backend, *self.writer_of.get(id(c["kraw"]), ())):
                out[i] = self.fail
        return out


def _cross(cells):
    """The cross-decode cells, measured or not (a cell that could not be measured has metric '-')."""
    return [c for c in cells if c.metric == "cross_decode_rel_err" or c.path.endswith(":flash_attn")]


def test_compat_makes_few_calls_per_backend(make_ctx):
    tgt = Batching()
    cells = compat.run(make_ctx(tgt, target_backend="cuda", types=("turbo3", "turbo4")))
    assert all(c.verdict == Verdict.PASS for c in cells)
    # one write batch per quantise path (rows, K and V of every type), one attention batch per reader for the
    # cross-decode, one write and one attention batch per backend for the coverage table
    writes = [b for b in tgt.batches if b[0] == "quantize"]
    attns = [b for b in tgt.batches if b[0] == "attention"]
    assert sorted(b[1] for b in writes) == ["cpu:quantize_chunk", "cpu:set_rows", "cpu:set_rows", "cuda:set_rows",
                                            "cuda:set_rows"]
    assert ("quantize", "cuda:set_rows", 6) in writes  # 2 types x (rows, K, V) in one call
    assert sorted(b[1] for b in attns) == ["cpu", "cpu", "cuda", "cuda"]
    assert ("attention", "cuda", 6) in attns  # 2 types x 3 writers read by cuda in one call
    assert len(_cross(cells)) == 12


@pytest.mark.parametrize("fail", [Unsupported("emulated: declined inside a batch"),
                                  ProbeCrash("fork code crashed in probe call flash_attn (signal 6 (SIGABRT)): emulated")])
def test_a_failed_attention_inside_a_batch_fails_its_cell_only(make_ctx, fail):
    clean = _cross(compat.run(make_ctx(Batching(), target_backend="cuda", types=("turbo3", "turbo4"))))
    tgt = Batching(fail_attn=("cuda", "cpu", "quantize_chunk", "turbo4"), fail=fail)
    cells = _cross(compat.run(make_ctx(tgt, target_backend="cuda", types=("turbo3", "turbo4"))))
    assert len(cells) == len(clean) == 12
    bad = [c for c in cells if c.verdict != Verdict.PASS]
    assert len(bad) == 1  # the failed op's cell, and no other
    c = bad[0]
    assert c.type == "turbo4" and c.value is None
    want = Verdict.SKIP if isinstance(fail, Unsupported) else Verdict.FAIL
    assert c.verdict == want and "emulated" in c.caveat
    assert c.path == "cuda:flash_attn"  # the reader's path: nothing measured, nothing passed
    good = [(x.type, x.details["writer"], x.details["reader"]) for x in cells if x.verdict == Verdict.PASS]
    assert ("turbo4", "cpu:quantize_chunk", "cuda") not in good and len(good) == 11


def test_a_failed_write_inside_a_batch_fails_its_writer_only(make_ctx, thresholds):
    rows = int(thresholds["COMPAT"]["rows"])
    tgt = Batching(fail_write=("cuda", "set_rows", "turbo3", rows))
    cells = compat.run(make_ctx(tgt, target_backend="cuda", types=("turbo3", "turbo4")))
    writer = [c for c in cells if c.metric == "-" or c.metric.startswith("writer_")]
    bad = [c for c in writer if c.verdict != Verdict.PASS]
    assert [(c.type, c.path, c.verdict) for c in bad] == [("turbo3", "cuda:set_rows", Verdict.SKIP)]
    assert "emulated" in bad[0].caveat
    # turbo3's cuda:set_rows bytes were never measured: no pair or cross-decode cell claims them
    assert not any("cuda:set_rows" in c.path for c in cells if c.type == "turbo3" and c.verdict == Verdict.PASS
                   and c.metric != "cross_decode_rel_err")
    assert not any(c.details.get("writer") == "cuda:set_rows" for c in _cross(cells) if c.type == "turbo3")
    assert all(c.verdict == Verdict.PASS for c in cells if c.type == "turbo4")


def test_a_failed_coverage_attention_marks_its_row_only(make_ctx):
    class CovFail(Batching):
        def flash_attn_many(self, backend, calls):
            out = super().flash_attn_many(backend, calls)
            for i, c in enumerate(calls):
                if backend == "cpu" and c["tk"] == "q8_0" and c["D"] == 256:
                    out[i] = HarnessError("emulated: not measured")
            return out
    rows = compat.coverage(make_ctx(CovFail(), types=("turbo3",)))
    err = [r for r in rows if r["status"].startswith("error")]
    assert [(r["backend"], r["pair"], r["head_dim"]) for r in err] == [("cpu", "q8_0/turbo3", 256)]
    assert all(r["status"].startswith(("tested", "runs")) for r in rows if r not in err)


# ----------------------------------------------------------------------------- ForkTarget's batch, with a fake probe

class FakeProbe:
    """The probe's client surface: ``batch`` answers (or raises ``batch_raises``), single ``set_rows`` calls raise for
    rows whose first value is 99 (the op that crashes)."""

    def __init__(self, batch_raises=None, answers=None):
        self.timeout_s = 600.0
        self.batch_raises, self.answers = batch_raises, answers
        self.calls: list[str] = []

    def batch(self, dev, ops):
        self.calls.append(f"batch {len(ops)}")
        if self.batch_raises:
            raise self.batch_raises
        return self.answers(ops)

    def set_rows(self, dev, t, x):
        self.calls.append("set_rows")
        if x[0, 0] == 99:
            raise ProbeCrash("fork code crashed in probe call set_rows (signal 6 (SIGABRT)): GGML_ASSERT failed")
        return np.full(4, x.shape[0], np.uint8)


def _fork_with(probe) -> ForkTarget:
    t = ForkTarget.__new__(ForkTarget)
    t.probe, t.rpc, t.host, t._rpc_devices = probe, [], {}, {}
    t._backends = [Backend("cpu", "CPU", "cpu")]
    return t


def _items():
    x = np.zeros((3, 128), np.float32)
    bad = x.copy()
    bad[0, 0] = 99
    return [("turbo3", x), ("turbo3", bad), ("turbo4", x[:2])]


def test_a_batch_that_crashes_runs_op_by_op_and_the_crash_lands_on_its_op():
    t = _fork_with(FakeProbe(batch_raises=ProbeCrash("fork code crashed in probe call batch (signal 6 (SIGABRT))")))
    out = t.quantize_many("cpu", "set_rows", _items())
    assert isinstance(out[1], ProbeCrash) and "set_rows" in str(out[1])
    assert out[0].tolist() == [3] * 4 and out[2].tolist() == [2] * 4
    assert t.probe.calls == ["batch 3", "set_rows", "set_rows", "set_rows"]
    assert len(t.batch_events) == 1 and "ran its 3 ops one by one" in t.batch_events[0]


def test_each_answer_of_a_batch_is_its_own_op():
    def answers(ops):
        return [("ok", np.ones(2, np.uint8)), ("unsupported", "device CPU does not support SET_ROWS"),
                ("error", "not measured")]
    t = _fork_with(FakeProbe(answers=answers))
    out = t.quantize_many("cpu", "set_rows", _items())
    assert isinstance(out[0], np.ndarray)
    assert isinstance(out[1], Unsupported) and "SET_ROWS" in str(out[1])
    assert isinstance(out[2], HarnessError) and not isinstance(out[2], ProbeCrash)
    assert t.probe.calls == ["batch 3"]


def test_a_batch_with_missing_answers_is_an_error_not_a_pass():
    t = _fork_with(FakeProbe(answers=lambda ops: [("ok", np.ones(2, np.uint8))]))
    with pytest.raises(HarnessError, match="1 answers for 3 ops"):
        t.quantize_many("cpu", "set_rows", _items())


# ----------------------------------------------------------------------------- the real probe

@pytest.fixture(scope="module")
def probe_lib():
    from conftest import fork_build_or_skip
    from harness.fork.probe import build_probe
    bdir, fork = fork_build_or_skip()
    return build_probe(bdir, fork)


@pytest.mark.fork
def test_the_probe_keeps_one_backend_per_device(probe_lib):
    from harness.fork.probe import Probe
    p = Probe(probe_lib)
    try:
        x = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
        raw = p.set_rows("CPU", "turbo3", x)
        p.set_rows("CPU", "turbo4", x)
        p.decode("CPU", "turbo3", raw, 16, 128, 1)
        p.flash_attn("CPU", "turbo3", raw, "turbo3", raw, x.reshape(2, 8, 128), 128, 128, 16, 1, 0.1, True, True, 128, True)
        p.batch("CPU", [("set_rows", "turbo3", x), ("set_rows", "turbo2", x)])
        s = p.stats()
        assert s["backend_inits"] == 1 and s["backends_kept"] == 1  # five calls, one backend
        assert s["computes"] == 5  # the batch of two is one graph
        p.release()
        p.set_rows("CPU", "turbo3", x)
        assert p.stats()["backend_inits"] == 2  # released: the next call made one again
        assert p.counts["set_rows"][0] == 3 and p.counts["batch"][0] == 1
    finally:
        p.close()


@pytest.mark.fork
def test_a_device_whose_backends_are_not_kept_gets_one_per_call_and_the_same_bytes(probe_lib, monkeypatch):
    """Backends are kept only where that was checked against one per call (CPU, RPC); elsewhere (Vulkan's kept backend
    corrupted the heap in a flash-attention call) each call makes and frees its own. TURBO_PROBE_KEEP_BACKENDS=0 puts
    the CPU on that path: every call initialises a backend, none stays, and the bytes are the kept path's."""
    from harness.fork.probe import Probe
    x = np.random.default_rng(1).standard_normal((16, 128)).astype(np.float32)
    p = Probe(probe_lib)
    try:
        kept = p.set_rows("CPU", "turbo3", x)
    finally:
        p.close()
    monkeypatch.setenv("TURBO_PROBE_KEEP_BACKENDS", "0")  # read by the probe in its worker process
    p = Probe(probe_lib)
    try:
        own = [p.set_rows("CPU", "turbo3", x) for _ in range(3)]
        s = p.stats()
        assert s["backend_inits"] == 3 and s["backends_kept"] == 0, s
        assert all(np.array_equal(np.asarray(o), np.asarray(kept)) for o in own)
    finally:
        p.close()


@pytest.mark.fork
def test_a_batch_answers_each_op_as_its_single_call_does(probe_lib):
    from harness.fork.probe import Probe
    p = Probe(probe_lib)
    try:
        rng = np.random.default_rng(1)
        x = rng.standard_normal((64, 128)).astype(np.float32)
        x256 = rng.standard_normal((4, 256)).astype(np.float32)
        q = rng.standard_normal((4, 2, 128)).astype(np.float32)
        k = p.set_rows("CPU", "turbo3", x)
        fa = ("turbo3", k, "turbo3", k, q, 128, 128, 32, 2, 0.125, True, True, 128, True)
        out = p.batch("CPU", [("set_rows", "turbo4", x), ("set_rows", "iq2_xxs", x256), ("set_rows", "no_such_type", x),
                              ("flash_attn", *fa)])
        assert [s for s, _ in out] == ["ok", "unsupported", "unsupported", "ok"]
        assert "does not support SET_ROWS" in out[1][1] and "no ggml type named 'no_such_type'" in out[2][1]
        assert np.array_equal(out[0][1], p.set_rows("CPU", "turbo4", x))  # byte for byte the single call's
        assert np.array_equal(out[3][1], p.flash_attn("CPU", *fa))
    finally:
        p.close()


@pytest.mark.fork
def test_a_fork_crash_inside_a_batch_lands_on_its_op(fork_target):
    x = np.random.default_rng(2).standard_normal((8, 128)).astype(np.float32)
    bad = np.zeros((8, 100), np.float32)  # 100 values: not whole turbo blocks, ggml asserts while building the op
    n0 = len(fork_target.batch_events)
    out = fork_target.quantize_many("cpu", "set_rows", [("turbo3", x), ("turbo3", bad), ("turbo4", x)])
    assert isinstance(out[1], ProbeCrash) and "set_rows" in str(out[1])
    assert np.array_equal(out[0], fork_target.quantize("cpu", "set_rows", "turbo3", x))
    assert np.array_equal(out[2], fork_target.quantize("cpu", "set_rows", "turbo4", x))
    assert len(fork_target.batch_events) == n0 + 1


@pytest.mark.fork
def test_compat_batched_gives_the_numbers_of_single_calls(fork_target, tmp_path):
    class OneByOne(ForkTarget):
        quantize_many = Target.quantize_many
        flash_attn_many = Target.flash_attn_many
    single = OneByOne.__new__(OneByOne)
    single.__dict__.update(fork_target.__dict__)

    def cells(tgt, name):
        run = run_checks(tgt, ["COMPAT"], ["turbo3"], tmp_path / name, target_backend="cpu", log=lambda s: None)
        return run, [(c.path, c.metric, c.value, c.verdict, c.caveat) for c in run.checks[0].cells], \
            [t.rows for t in run.checks[0].tables if t.id == "coverage"]
    run_b, batched, cov_b = cells(fork_target, "batched")
    run_s, one, cov_s = cells(single, "single")
    assert batched == one and cov_b == cov_s and len(batched) > 5
    costs = run_b.meta["check_costs"]["COMPAT"]
    device_backends = [b for b in fork_target.backends() if not fork_target._is_host(b.name)]
    assert costs["by_method"]["batch"][0] == 4 * len(device_backends)  # writes, cross-decode, coverage K/V, coverage FA
    # attention: one single call per backend is left (PQ6's kernel precision, measured when COMPAT runs alone);
    # one by one, each coverage row (15 for one type) and each cross-decode cell (3 writers) is a call
    assert costs["by_method"].get("flash_attn", [0])[0] <= len(device_backends)
    assert run_s.meta["check_costs"]["COMPAT"]["by_method"]["flash_attn"][0] >= (15 + 3) * len(device_backends)
    assert {"writes", "writer matrix", "cross-decode", "coverage", "test-backend-ops"} <= set(costs["parts_s"])


def test_a_probe_built_from_other_sources_is_rebuilt_whatever_its_file_time(tmp_path, monkeypatch):
    """A newer libturbo_probe.so of another harness version (without the batch entry points) must not be taken for
    this one's: the probe is rebuilt when its sources' digest differs from the one it was built from."""
    from harness.fork import probe as P
    bdir, fork = tmp_path / "b", tmp_path / "fork"
    (bdir / "bin").mkdir(parents=True)
    (bdir / "bin" / "libggml-base.so").write_text("")
    (fork / "ggml" / "include").mkdir(parents=True)
    (fork / "ggml" / "include" / "ggml.h").write_text("")
    built = []

    def fake_compile(what, fork_, libdir, out, args):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("lib")
        built.append(out)
        return out
    monkeypatch.setattr(P, "compile_c", fake_compile)
    out = P.build_probe(bdir, fork)
    assert len(built) == 1
    P.build_probe(bdir, fork)
    assert len(built) == 1  # same sources, libs not newer: kept
    out.with_name(out.name + ".sources").write_text("digest of another version's sources\n")
    out.touch()  # newer than everything: file times alone would keep it
    P.build_probe(bdir, fork)
    assert len(built) == 2
