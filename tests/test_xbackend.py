"""Cross-backend sweep (sweep --backends A,B): fake llama-perplexity builds whose logits are points on a line, so the
KLD between two runs is known; a shifted backend, a crash on one backend, equal logits and a zero floor. Then the
real thing on this machine: CPU against the same CPU backend behind a loopback rpc-server (fork test)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from harness.checks.sweeps import judge_sweep, load_rules
from harness.checks.xbackend import judge_xbackend
from harness.errors import HarnessError
from harness.report.model import Verdict
from harness.runners import sweep as S
from harness.runners.sweep import SweepConfig, parse_pairs
from harness.runners.xbackend import XConfig, check_sides, parse_backends, run_xbackend, side_config
from tests.test_sweep_parsers import TRAITS
from tests.test_sweep_runner import _script, _write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]

# A fake llama-perplexity. Each build folder has fake.json: {"name", "jitter", "shift": {type: x}, "crash": [types]}.
# A run's logits are the point pos = LOSS[ctk] + shift[ctk] + jitter; the KLD of a run against saved logits is
# |pos - saved pos| (so two backends' f16 runs differ by their jitters: the floor). Logits files are in the fork's
# layout (harness/runners/logit_files.py) over a 2-token vocabulary: every row has log p = [-pos, -pos - 17], so the
# KLD of a saved run against a saved run at pos 0 (the f16 baseline on a backend without jitter) is pos.
FAKE = r'''#!{py}
import json, os, signal, struct, sys
sys.path.insert(0, {root!r})
from harness.runners.ggml_types import TypeTrait, predict_kv_bytes
conf = json.load(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fake.json")))
TRAITS = {{n: TypeTrait(*t) for n, t in conf["traits"].items()}}  # the test's TRAITS (no import of pytest here)
LOSS = {{"f16": 0.0, "q8_0": 0.001, "q4_0": 0.02, "turbo4": 0.01, "turbo3": 0.03, "turbo2": 0.1}}
a = sys.argv[1:]
with open(conf["calls"], "a") as f:
    f.write(conf["name"] + " " + " ".join(a) + "\n")
ctk, ctv, ctx = a[a.index("-ctk") + 1], a[a.index("-ctv") + 1], int(a[a.index("-c") + 1])
ctk, ctv = conf.get("sub", {{}}).get(ctk, ctk), conf.get("sub", {{}}).get(ctv, ctv)  # a fork that silently uses others
base = a[a.index("--kl-divergence-base") + 1]
if conf.get("unreachable") and "--rpc" in a:  # the fork's tools with -dev RPC0 and no rpc-server at the endpoint
    sys.stderr.write(f"Failed to connect to {{a[a.index('--rpc') + 1]}}\n")
    sys.stderr.write(f"error while handling argument \"-dev\": invalid device: {{a[a.index('-dev') + 1]}}\n")
    sys.exit(1)
if ctk in conf.get("refuse", []):  # a clean refusal at start-up, before any KV cache exists
    sys.stderr.write(f"llama_init_from_model: failed to initialize the context: {{ctk}} is not supported here\n")
    sys.exit(1)
mib = lambda t: predict_kv_bytes(TRAITS[t], ctx, 1, 30, 3, 64) / 2**20
sys.stderr.write(f"llama_kv_cache: size = {{mib(ctk) + mib(ctv):8.2f}} MiB ({{ctx:6d}} cells,  30 layers,  1/1 seqs), "
                 f"K ({{ctk}}): {{mib(ctk):8.2f}} MiB, V ({{ctv}}): {{mib(ctv):8.2f}} MiB\n")
seen = not conf.get("needs_env") or os.environ.get(conf["needs_env"])  # lavapipe: ggml sees it only when named
if int(a[a.index("-ngl") + 1]) > 0 and not conf.get("no_device") and seen:
    sys.stderr.write(f"llama_model_load_from_file_impl: using device {{conf['name'].upper()}}0 (fake) - 1000 MiB free\n")
sys.stderr.write(f"sched_reserve: graph splits = {{conf.get('splits', {{}}).get(ctk, 1)}}\n")
sys.stderr.flush()
if ctk in conf.get("term_parent", []):  # the user presses Ctrl-C / a job scheduler sends SIGTERM mid-sweep
    import time
    os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(10)
if ctk in conf.get("rpc_lost", []) and "--rpc" in a:  # the rpc-server went away mid-run: ggml-rpc's RPC_STATUS_ASSERT
    sys.stderr.write("/src/ggml/src/ggml-rpc/ggml-rpc.cpp:354: Remote RPC server crashed or returned malformed response\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGABRT)
if ctk in conf["crash"]:
    sys.stderr.write("/src/ggml-cuda/fattn.cu:77: GGML_ASSERT(fake crash) failed\n"); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGABRT)
pos = LOSS[ctk] + conf["shift"].get(ctk, 0.0) + conf["jitter"]
pos = 17.0 - struct.unpack("<f", struct.pack("<f", 17.0 - pos))[0]  # as a logits file holds it (float32)
ppl = 10.0 * (1.0 + pos)
if "--kl-divergence" not in a:
    chunks = int(a[a.index("--chunks") + 1])
    rows = chunks * (ctx - 1 - ctx // 2)
    with open(base, "wb") as f:  # "_logits_", n_ctx, n_vocab, n_chunk, tokens, rows of [scale, min, q0, q1]
        f.write(b"_logits_" + struct.pack("<Iii", ctx, 2, chunks) + bytes(4 * ctx * chunks))
        f.write(struct.pack("<ffHH", 17.0 - pos, -17.0, 1, 0) * rows)
    print(f"Final estimate: PPL = {{ppl:.4f}} +/- 0.10000")
    sys.exit(0)
with open(base, "rb") as f:
    n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", f.read(20)[8:])
    f.seek(20 + 4 * n_ctx * n_chunk)
    scale, mn, q0, q1 = struct.unpack("<ffHH", f.read(12))
ref = {{"pos": -(scale * q0 + mn)}}
kld = abs(pos - ref["pos"])
lnr = pos - ref["pos"]
print("====== Perplexity statistics ======")
print(f"Mean PPL(Q)                   :  {{ppl:.6f}} ±   0.100000")
print(f"Mean PPL(base)                :  {{10 * (1 + ref['pos']):.6f}} ±   0.100000")
print(f"Mean ln(PPL(Q)/PPL(base))     :   {{lnr:.6f}} ±   {{0.02 * kld:.6f}}")
print("")
print("====== KL divergence statistics ======")
print(f"Mean    KLD:   {{kld:.6f}} ±   {{0.02 * kld:.6f}}")
print(f"Same top p: {{100 - 100 * kld:.3f}} ± 0.100 %")
'''


def fake_build(root: Path, name: str, calls: Path, jitter=0.0, shift=None, crash=(), splits=None, sub=None,
               no_device=False, refuse=(), needs_env="", unreachable=False, rpc_lost=(), term_parent=()) -> Path:
    bdir = root / name
    (bdir / "bin").mkdir(parents=True, exist_ok=True)
    _script(bdir / "bin" / "llama-perplexity", FAKE.format(py=sys.executable, root=str(ROOT)))
    (bdir / "fake.json").write_text(json.dumps({"name": name, "jitter": jitter, "shift": shift or {},
                                                "crash": list(crash), "calls": str(calls),
                                                "splits": splits or {}, "sub": sub or {},
                                                "no_device": no_device, "refuse": list(refuse),
                                                "needs_env": needs_env, "unreachable": unreachable, "rpc_lost": list(rpc_lost), "term_parent": list(term_parent),
                                                "traits": {n: [t.name, t.id, t.blck, t.size] for n, t in TRAITS.items()}}))
    return bdir


@pytest.fixture
def xb(tmp_path):
    model = tmp_path / "model.gguf"
    _write_tiny_gguf(model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 50)
    calls = tmp_path / "calls.log"
    calls.write_text("")

    def make(pairs="f16/f16,q8_0/q8_0,turbo3/turbo3", a=None, b=None, target="", **kw):
        ba = fake_build(tmp_path / "builds", "cpu", calls, **(a or {}))
        bb = fake_build(tmp_path / "builds", "cuda", calls, **(b or {}))
        tpl = SweepConfig(model=model, corpus=corpus, pairs=parse_pairs(pairs), bdir=ba, ctx=256, chunks=3, threads=2,
                          timeout=30, cache_dir=tmp_path / "cache", bench=False, **kw)
        return XConfig([side_config("cpu", tpl, ba, []), side_config("cuda", tpl, bb, [])], target=target)

    def run(cfg):
        res = run_xbackend(cfg, progress=False, log=lambda s: None, traits=TRAITS)
        secs = {s.backend: judge_sweep(res.sweeps[s.backend], traits=TRAITS)[1] for s in cfg.sides}
        cr, sec = judge_xbackend(res, secs, load_rules())
        return res, cr, sec

    def ncalls():
        return len([ln for ln in calls.read_text().splitlines() if ln.strip()])

    def cli(cfg, monkeypatch, pairs, *extra):
        """`turbo-harness sweep --backends cpu,cuda` on the fake builds of ``cfg`` (tiny sizes, then ``extra``
        options); (result, out folder)."""
        from click.testing import CliRunner

        from harness.cli import cli as main
        monkeypatch.setenv("TURBO_BUILD_ROOT", str(tmp_path / "builds"))
        monkeypatch.setenv("TURBO_SWEEP_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(S, "type_traits", lambda bdir: TRAITS)
        out = tmp_path / "report"
        args = ["sweep", "--backends", "cpu,cuda", "--model", str(cfg.ref.model), "--corpus", str(cfg.ref.corpus),
                "--ctx", "256", "--chunks", "3", "--pairs", pairs, "--no-bench", "--decode-prompts", "0",
                "--kld-depths", "none", "--no-progress", "--out", str(out), *extra]
        return CliRunner().invoke(main, args), out
    return type("XB", (), {"make": staticmethod(make), "run": staticmethod(run), "ncalls": staticmethod(ncalls),
                           "cli": staticmethod(cli), "tmp": tmp_path, "calls": calls})


def _cells(cr, metric):
    return {c.type: c for c in cr.cells if c.metric == metric}


def test_equal_logits_pass_at_a_zero_floor_without_dividing_by_it(xb):
    res, cr, sec = xb.run(xb.make())
    fl = _cells(cr, "noise_floor")["f16/f16"]
    assert fl.value == 0.0 and fl.verdict == Verdict.PASS and "bit-identical" in fl.caveat
    cross = _cells(cr, "cross_kld_vs_floor")
    assert set(cross) == {"q8_0/q8_0", "turbo3/turbo3"}
    assert all(c.verdict == Verdict.PASS and c.value == 0.0 for c in cross.values())
    assert cross["turbo3/turbo3"].threshold == pytest.approx(load_rules()["xbackend"]["kld_min"])  # max(10 x 0, min)
    row = next(r for r in sec["rows"] if r["pair"] == "turbo3/turbo3")
    # own KLD: cuda's printed by its llama-perplexity (6 decimals), cpu's computed by the harness from its two files
    assert row["x_floor"] is None and row["own_kld"] == pytest.approx(0.03, abs=2e-6)
    assert row["own_kld_ref"] == pytest.approx(0.03, abs=2e-6)
    assert cr.verdict == Verdict.PASS
    assert "noise floor (f16/f16) KLD 0" in sec["markdown"]


def test_b_logits_shifted_fail_naming_b_or_partial_when_b_is_not_the_target(xb):
    for target, want in (("cuda", Verdict.FAIL), ("cpu", Verdict.PARTIAL)):
        res, cr, sec = xb.run(xb.make(a={"jitter": 0.0}, b={"jitter": 2e-4, "shift": {"turbo3": 0.05}}, target=target))
        c = _cells(cr, "cross_kld_vs_floor")["turbo3/turbo3"]
        assert c.value == pytest.approx(0.0502) and c.threshold == pytest.approx(0.005)  # max(10 x 2e-4, 0.005)
        assert c.verdict == want and "cuda moved further from its own f16" in c.caveat, c.caveat
        assert c.details["moved_further"] == "cuda"
        assert _cells(cr, "cross_kld_vs_floor")["q8_0/q8_0"].verdict == Verdict.PASS  # at the floor
        assert _cells(cr, "noise_floor")["f16/f16"].value == pytest.approx(2e-4)
        row = next(r for r in sec["rows"] if r["pair"] == "q8_0/q8_0")
        assert row["x_floor"] == pytest.approx(1.0)


def test_a_large_floor_raises_the_limit_and_is_itself_partial(xb):
    res, cr, sec = xb.run(xb.make(b={"jitter": 0.01, "shift": {"turbo3": 0.05}}))
    assert _cells(cr, "noise_floor")["f16/f16"].verdict == Verdict.PARTIAL  # 0.01 > floor_max
    c = _cells(cr, "cross_kld_vs_floor")["turbo3/turbo3"]
    assert c.threshold == pytest.approx(0.1) and c.verdict == Verdict.PASS  # 0.05 is within 10 x the floor


def test_crash_on_b_only_is_its_own_cell_never_pass(xb):
    res, cr, sec = xb.run(xb.make(b={"crash": ["turbo3"]}))
    c = _cells(cr, "cross_compared")["turbo3/turbo3"]
    assert c.verdict == Verdict.FAIL and "ran on cpu only" in c.caveat and "GGML_ASSERT(fake crash)" in c.caveat
    assert "turbo3/turbo3" not in _cells(cr, "cross_kld_vs_floor")
    assert cr.verdict == Verdict.FAIL
    # the other way round: the reference crashed, the target ran alone (fresh: another fake fork in the same build
    # folders; its jobs must not come from the first scenario's cache, where the cpu side's turbo3 run succeeded)
    res, cr, sec = xb.run(xb.make(a={"crash": ["turbo3"]}, pairs="f16/f16,turbo3/turbo3", fresh=True))
    c = _cells(cr, "cross_compared")["turbo3/turbo3"]
    assert c.verdict == Verdict.FAIL and "ran on cuda only" in c.caveat and c.target is False


def test_pair_placed_on_the_cpu_on_b_is_its_own_cell(xb):
    res, cr, sec = xb.run(xb.make(pairs="f16/f16,turbo3/turbo3", b={"splits": {"turbo3": 5}}))
    c = _cells(cr, "cross_compared")["turbo3/turbo3"]
    assert c.verdict == Verdict.PARTIAL and "not compared on cuda" in c.caveat and "graph splits 5" in c.caveat
    assert "turbo3/turbo3" not in _cells(cr, "cross_kld_vs_floor")


def test_a_pair_whose_runs_used_other_kv_types_is_not_judged_agreeing(xb):
    """Both backends' builds silently run turbo3 as q8_0: their logits agree, but no turbo3 was compared. The
    per-backend sweeps said ERROR (the log names q8_0); XBACKEND judged the scoring run alone and said PASS."""
    res, cr, sec = xb.run(xb.make(a={"sub": {"turbo3": "q8_0"}}, b={"sub": {"turbo3": "q8_0"}}))
    assert "turbo3/turbo3" not in _cells(cr, "cross_kld_vs_floor")
    c = _cells(cr, "cross_compared")["turbo3/turbo3"]
    assert c.verdict == Verdict.ERROR and "K=turbo3" in c.caveat and "q8_0" in c.caveat, c.caveat
    assert _cells(cr, "cross_kld_vs_floor")["q8_0/q8_0"].verdict == Verdict.PASS
    row = next(r for r in sec["rows"] if r["pair"] == "turbo3/turbo3")
    assert row["status"] == "ERROR"
    # the floor's own runs not on the f16 cache: no floor to judge any pair against
    # (fresh: another fake fork in the same build folders; its jobs must not come from the first run's cache)
    res, cr, sec = xb.run(xb.make(b={"sub": {"f16": "q8_0"}}, pairs="f16/f16,q8_0/q8_0", fresh=True))
    assert _cells(cr, "cross_compared")["f16/f16"].verdict == Verdict.ERROR
    c = _cells(cr, "cross_kld_vs_floor")["q8_0/q8_0"]
    assert c.verdict == Verdict.SKIP and "did not use the f16 cache" in c.caveat, c.caveat
    # only the target's run substituted: named as the target's
    res, cr, sec = xb.run(xb.make(b={"sub": {"turbo3": "q8_0"}}, fresh=True))
    c = _cells(cr, "cross_compared")["turbo3/turbo3"]
    assert c.verdict == Verdict.ERROR and c.path.startswith("cuda:") and "cuda's run" in c.caveat, c.caveat


def test_a_gpu_side_whose_tools_used_no_device_is_not_compared(xb):
    """A Vulkan build on a machine whose only Vulkan device is lavapipe: ggml ignores it unless told, llama-perplexity
    ignores -ngl 99 and runs on the CPU (exit 0, no 'using device' line). The comparison was CPU against CPU, every
    pair PASS 'agrees within the floor rule'."""
    cfg = xb.make(b={"no_device": True})
    res, cr, sec = xb.run(cfg)
    assert not _cells(cr, "cross_kld_vs_floor") and cr.verdict != Verdict.PASS
    c = _cells(cr, "cross_compared")["turbo3/turbo3"]
    assert c.verdict == Verdict.ERROR and "used no cuda device" in c.caveat, c.caveat
    assert "used no cuda device" in res.sweeps["cuda"].base.error
    # a record cached by a harness that did not look is run again, not reused
    from harness.runners.sweep_jobs import _Cache
    rec = res.cross[("cuda", "turbo3/turbo3")]
    rec.ok, rec.error, rec.data = True, "", {"stats": {"kld": 0.0, "ppl": 10.0}, "kv": {}}
    _Cache(cfg.sides[1].cache_dir).put(rec)
    assert S.cached_run(cfg.sides[1], _Cache(cfg.sides[1].cache_dir), rec.key) is None


def test_nothing_compared_is_never_pass(xb):
    res, cr, sec = xb.run(xb.make(pairs="f16/f16", a={"crash": ["f16"]}, no_baselines=True))
    assert cr.verdict != Verdict.PASS
    assert any(c.metric == "pairs_compared" and c.verdict == Verdict.SKIP for c in cr.cells)


def test_model_passes_are_within_the_two_sweeps_plus_one_scoring_pass_per_pair_and_a_rerun_is_cached(xb):
    cfg = xb.make()
    res, cr, sec = xb.run(cfg)
    n_pairs = 3
    sweeps = 2 * (1 + n_pairs)       # each backend: its f16 baseline and one pass per pair
    bound = sweeps + n_pairs         # spec: the two per-backend sweeps plus one scoring pass per pair
    assert res.passes == {"sweeps": sweeps, "scoring": n_pairs, "bound": bound}
    assert xb.ncalls() == bound      # the tool calls themselves, counted by the fake
    # A's pass of each pair saves its logits (no --kl-divergence); B's runs are scored against A's file of the pair
    a_lines = [ln for ln in xb.calls.read_text().splitlines() if ln.startswith("cpu")]
    assert len(a_lines) == 1 + n_pairs and not any("--kl-divergence " in ln + " " for ln in a_lines)
    lines = [ln for ln in xb.calls.read_text().splitlines() if ln.startswith("cuda") and "--kl-divergence " in ln + " "]
    for lab in ("f16/f16", "q8_0/q8_0", "turbo3/turbo3"):
        f = str(res.logits[lab].data["base_file"])
        assert f != str(res.sweeps["cpu"].base.data["base_file"]) and any(f in ln for ln in lines)
    assert res.sweeps["cpu"].ppl["turbo3/turbo3"].data["measured_by"]["kld"].startswith("harness")
    assert "are the harness's, computed from the two logit files" in sec["markdown"]
    n = xb.ncalls()
    res2, cr2, _ = xb.run(cfg)
    assert xb.ncalls() == n and res2.jobs_run == 0 and cr2.verdict == cr.verdict


def test_side_settings_and_bad_backends(tmp_path):
    tpl = SweepConfig(model=tmp_path / "m", corpus=tmp_path / "c", pairs=[("f16", "f16")], bdir=tmp_path, ctx=64)
    cpu = side_config("cpu", tpl, tmp_path, [])
    assert cpu.ngl == 0 and cpu.devices == "none" and cpu.extra_env["CUDA_VISIBLE_DEVICES"] == ""
    assert "-dev" in S._common_args(cpu) and cpu.env()["CUDA_VISIBLE_DEVICES"] == ""
    rpc = side_config("rpc1", tpl, tmp_path, ["127.0.0.1:1", "127.0.0.1:2"])
    assert rpc.rpc == ["127.0.0.1:2"] and rpc.ngl == 99 and "CUDA_VISIBLE_DEVICES" not in rpc.env()
    assert parse_backends("CPU, vulkan", 0) == ["cpu", "vulkan"]
    for spec, words in (("cpu", "two or more"), ("cpu,cpu", "twice"), ("cpu,tpu", "unknown backend"),
                        ("cpu,rpc0", "needs --rpc")):
        with pytest.raises(HarnessError, match=words):
            parse_backends(spec, 0)
    other = side_config("cuda", SweepConfig(model=tmp_path / "m", corpus=tmp_path / "c", pairs=[("f16", "f16")],
                                            bdir=tmp_path, ctx=128), tmp_path, [])
    with pytest.raises(HarnessError, match="differ in ctx"):
        check_sides(XConfig([cpu, other]))


def test_sides_built_from_different_fork_commits_are_refused(xb):
    """build/cpu from one commit, build/cuda from another: every difference would be the commits', and the report
    named the reference side's commit only."""
    cfg = xb.make()
    for side, commit in zip(cfg.sides, ("1" * 40, "2" * 40)):
        (side.bdir / "turbo-harness-build.json").write_text(json.dumps({"fork_commit": commit, "fork_dirty": False}))
    with pytest.raises(HarnessError, match="built from fork 222222222222 .* from 111111111111"):
        check_sides(cfg)
    (cfg.sides[1].bdir / "turbo-harness-build.json").write_text(json.dumps({"fork_commit": "1" * 40, "fork_dirty": False}))
    check_sides(cfg)  # the same source: compared


def test_cli_backends_writes_both_sweeps_and_the_comparison(xb, monkeypatch):
    from click.testing import CliRunner

    from harness.cli import cli
    cfg = xb.make(b={"shift": {"turbo3": 0.05}})  # makes the fake builds under builds/cpu and builds/cuda
    r, out = xb.cli(cfg, monkeypatch, "turbo3/turbo3")
    assert r.exit_code == 1, r.output  # FAIL on the target (cuda moved)
    assert "cuda moved further from its own f16" in r.output
    assert (out / "cpu" / "run.json").is_file() and (out / "cuda" / "run.json").is_file()
    top = json.loads((out / "run.json").read_text())
    assert [c["id"] for c in top["checks"]] == ["XBACKEND"] and top["meta"]["backends"] == ["cpu", "cuda"]
    assert top["meta"]["sides"]["cpu"]["env"]["CUDA_VISIBLE_DEVICES"] == "" and top["meta"]["load_start"]["cpus"]
    assert "Backends agree at model level" in (out / "summary.md").read_text()
    r = CliRunner().invoke(cli, ["sweep", "--backends", "cpu", "--out", str(xb.tmp / "r2")])
    assert r.exit_code == 2 and "two or more" in r.output


@pytest.mark.fork
@pytest.mark.slow
def test_cpu_against_rpc0_on_this_machine(tmp_path, monkeypatch):
    """The cross-backend sweep in CI (issue 20 "Where it runs"), through the command line as a user runs it: CPU (2
    threads) against the CPU backend behind a loopback rpc-server (1 thread), SmolLM2, tiny context (ctx 128 x 2
    chunks: llama-perplexity prints KLD statistics from 100 scored tokens), two pairs (the f16/f16 floor and turbo3),
    one decode prompt: 3N+2 = 8 llama-perplexity passes."""
    from click.testing import CliRunner

    from conftest import fork_build_or_skip, skip_or_fail
    from harness.cli import cli
    from harness.fork import build as fb
    from harness.runners.models import resolve_model
    from harness.runners.rpc_server import RpcServer
    bdir, _ = fork_build_or_skip()
    if not fb.has_rpc(bdir) or not (bdir / "bin" / "rpc-server").is_file():
        skip_or_fail(f"{bdir} has no RPC backend / rpc-server: build with `turbo-harness build --rpc`")
    try:
        resolve_model("smollm2")
    except HarnessError as e:
        skip_or_fail(f"no SmolLM2 model: {e}")
    monkeypatch.setenv("TURBO_SWEEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "xb"
    srv = RpcServer(bdir / "bin" / "rpc-server", threads=1, log_path=tmp_path / "rpc.log").start()
    try:
        r = CliRunner().invoke(cli, ["sweep", "--backends", "cpu,rpc0", "--rpc", srv.endpoint, "--model", "smollm2",
                                     "--build-dir", str(bdir), "--ctx", "128", "--chunks", "2", "--threads", "2",
                                     "--pairs", "f16/f16,turbo3/turbo3", "--no-baselines", "--no-bench", "--kld-depths", "none",
                                     "--decode-prompts", "1", "--decode-prompt-tokens", "16", "--decode-tokens", "4",
                                     "--no-progress", "--out", str(out)])
    finally:
        srv.stop()
    assert (out / "run.json").is_file(), r.output
    d = json.loads((out / "run.json").read_text())
    cr = d["checks"][0]
    cells = {(c["metric"], c["type"]): c for c in cr["cells"]}
    md = d["sections"]["xbackend"]["markdown"]
    assert cells[("noise_floor", "f16/f16")]["value"] < 0.005, md
    assert {t for m, t in cells if m == "cross_kld_vs_floor"} == {"turbo3/turbo3"}, md
    assert all(c["verdict"] != "ERROR" for c in cr["cells"]), md
    assert r.exit_code in (0, 1), r.output  # PASS, or a finding; never a harness error
    # 3N+2 llama-perplexity passes (it was 4N+1 = 9 with separate logits runs), counted by the harness and in the
    # evidence (each call's command line once)
    assert d["meta"]["model_passes"] == {"sweeps": 6, "scoring": 2, "bound": 8}
    cmds = {f.read_text() for f in out.rglob("*.cmd") if "llama-perplexity" in f.read_text()}
    assert len(cmds) == 8
    assert "rpc0 vs cpu" in md and "are the harness's, computed from the two logit files" in md
    rows = {x["pair"]: x for x in d["sections"]["xbackend"]["rows"]}
    assert rows["turbo3/turbo3"]["own_kld_ref"] > 0 and rows["turbo3/turbo3"]["own_kld"] > 0  # cpu's and rpc0's own
    # every evidence link of the comparison resolves (the decode cells' point into each side's own report)
    links = [e for c in cr["cells"] for e in c["evidence"]]
    assert any("/evidence/turbo3-turbo3/decode.stdout" in e for e in links)
    assert all((out / e).is_file() or Path(e).is_file() for e in links), [e for e in links if not (out / e).is_file()]
    cpu = json.loads((out / "cpu" / "run.json").read_text())
    assert any("computed by the harness from the two saved logit files" in n for n in cpu["checks"][0]["notes"])


def test_sweep_compare_warns_on_different_ctx_chunks_and_labels_by_backend(tmp_path):
    from click.testing import CliRunner

    from harness.cli import cli
    from harness.report.compare import compare_warnings
    samples = ROOT / "reports" / "samples"
    cpu, cuda = samples / "sweep-cpu-smollm2", samples / "cuda-h200-sweep"
    warns = compare_warnings([cpu, cuda])
    assert any(w.startswith("the sweeps differ in ctx") for w in warns)
    assert any(w.startswith("the sweeps differ in chunks") for w in warns)
    assert compare_warnings([cpu, cpu]) == []
    r = CliRunner().invoke(cli, ["sweep-compare", str(cpu), str(cuda), "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "not directly comparable" in md and "warning: the sweeps differ in ctx" in r.output
    assert " on cpu (" in md and " on cuda (" in md  # each table (and plot line) names its backend


def _dec(pair, tokens, gaps=None, splits=None):
    """A finished decode record; ``splits``: the graph splits its log showed (None: no split count in its log)."""
    from harness.runners.sweep import JobRecord
    return JobRecord("decode", pair, True, data={"out": {"tokens": tokens, "gaps": gaps or [[0.5] * len(t) for t in tokens],
                                                         "texts": [""] * len(tokens), "complete": True},
                                                 "kv": [] if splits is None else [{"graph_splits": splits}]})


def test_decode_across_backends_early_divergence_names_the_backend_and_near_ties_pass(tmp_path):
    from harness.checks.xdecode import xdecode_cells
    from harness.runners.sweep import SweepResult
    from harness.runners.xbackend import XResult
    tpl = SweepConfig(model=tmp_path / "m", corpus=tmp_path / "c", pairs=parse_pairs("f16/f16,turbo3/turbo3"),
                      bdir=tmp_path, ctx=64, decode_prompts=3, decode_n_gen=8)
    cfg = XConfig([side_config("cpu", tpl, tmp_path, []), side_config("cuda", tpl, tmp_path, [])])
    ref = [[1, 2, 3, 4, 5, 6, 7, 8]] * 3
    garbled = [[9, 9, 9, 9, 9, 9, 9, 9]] * 3
    res = XResult(cfg)
    for name, side in zip(("cpu", "cuda"), cfg.sides):
        res.sweeps[name] = SweepResult(side, {}, None, None)
        res.sweeps[name].decode["f16/f16"] = _dec("f16/f16", ref, splits=2)
    res.sweeps["cpu"].decode["turbo3/turbo3"] = _dec("turbo3/turbo3", ref, splits=2)
    res.sweeps["cuda"].decode["turbo3/turbo3"] = _dec("turbo3/turbo3", garbled, splits=2)
    rows = [{"backend": "cuda", "pair": "f16/f16", "top1_pct": 99.0}, {"backend": "cuda", "pair": "turbo3/turbo3", "top1_pct": 99.0}]
    cells, drows = xdecode_cells(res, rows, load_rules())
    by = {c.type: c for c in cells}
    assert by["turbo3/turbo3"].verdict == Verdict.FAIL and "cuda strays further" in by["turbo3/turbo3"].caveat
    assert by["f16/f16"].verdict == Verdict.PASS
    # the same divergence where the reference's own choice was a near-tie and the batched agreement is low: not FAIL
    rows[1]["top1_pct"] = 20.0
    cells, _ = xdecode_cells(res, rows, load_rules())
    assert {c.type: c for c in cells}["turbo3/turbo3"].verdict == Verdict.PASS
    # a decode that did not run on one backend is not compared, never PASS
    res.sweeps["cuda"].decode.pop("turbo3/turbo3")
    cells, _ = xdecode_cells(res, rows, load_rules())
    c = {c.type: c for c in cells}["turbo3/turbo3"]
    assert c.verdict == Verdict.SKIP and "did not complete on cuda" in c.caveat


def test_decode_across_backends_placed_elsewhere_is_not_compared(tmp_path):
    """The cuda sample: q8_0/turbo3's decode on cuda ran attention on the CPU (graph splits 62 vs 2 for its f16
    decode) and its cell 'cuda:decode-vs-cpu' was PASS, as if cuda's kernels had been compared with the CPU's."""
    from harness.checks.xdecode import xdecode_cells
    from harness.runners.sweep import SweepResult
    from harness.runners.xbackend import XResult
    tpl = SweepConfig(model=tmp_path / "m", corpus=tmp_path / "c", pairs=parse_pairs("f16/f16,q8_0/turbo3"),
                      bdir=tmp_path, ctx=64, decode_prompts=3, decode_n_gen=8)
    cfg = XConfig([side_config("cpu", tpl, tmp_path, []), side_config("cuda", tpl, tmp_path, [])])
    ref = [[1, 2, 3, 4, 5, 6, 7, 8]] * 3
    res = XResult(cfg)
    for name, side in zip(("cpu", "cuda"), cfg.sides):
        res.sweeps[name] = SweepResult(side, {}, None, None)
        for lab in ("f16/f16", "q8_0/turbo3"):
            res.sweeps[name].decode[lab] = _dec(lab, ref)
            res.sweeps[name].decode[lab].data["kv"] = [{"graph_splits": 1 if name == "cpu" else 2}]
    rows = [{"backend": "cuda", "pair": p, "top1_pct": 99.0} for p in ("f16/f16", "q8_0/turbo3")]
    cells, _ = xdecode_cells(res, rows, load_rules())
    assert all(c.verdict == Verdict.PASS for c in cells)  # same placement as the f16 decode: compared
    res.sweeps["cuda"].decode["q8_0/turbo3"].data["kv"] = [{"graph_splits": 62}]
    cells, drows = xdecode_cells(res, rows, load_rules())
    c = {c.type: c for c in cells}["q8_0/turbo3"]
    assert c.verdict == Verdict.PARTIAL and "graph splits 62 vs 2" in c.caveat and c.caveat.startswith("not compared on cuda")
    assert {r["pair"]: r["status"] for r in drows}["q8_0/turbo3"] == "PARTIAL"
    # no split count in cuda's log (cuda offloads its layers): nothing shows cuda ran that decode, so never PASS; the
    # CPU side (-ngl 0, every layer on the CPU) needs none
    res.sweeps["cuda"].decode["q8_0/turbo3"].data["kv"] = []
    for lab in ("f16/f16", "q8_0/turbo3"):
        res.sweeps["cpu"].decode[lab].data["kv"] = []
    cells, _ = xdecode_cells(res, rows, load_rules())
    by = {c.type: c for c in cells}
    assert by["q8_0/turbo3"].verdict == Verdict.PARTIAL and "placement unknown" in by["q8_0/turbo3"].caveat
    assert by["f16/f16"].verdict == Verdict.PASS


def test_speed_spread_covering_the_limit_is_not_fail_and_load_is_noted():
    from harness.checks.sweep_rules import _speed_table, load_note
    from harness.runners.sweep import JobRecord

    def bench(pair, samples):
        n = len(samples)
        m = sum(samples) / n
        sd = (sum((x - m) ** 2 for x in samples) / max(n - 1, 1)) ** 0.5
        return JobRecord("bench", pair, True, data={"rows": [{"test": "pp", "n_tokens": 64, "depth": 0, "avg_ts": m,
                                                              "stddev_ts": sd, "samples_ts": samples}]})
    rows = _speed_table({"q8_0/q8_0": bench("q8_0/q8_0", [100.0, 60.0, 100.0]),
                         "turbo3/turbo3": bench("turbo3/turbo3", [80.0, 80.0, 80.0])})
    t = next(r for r in rows if r["pair"] == "turbo3/turbo3")
    assert t["ratio"] < 0.95 and t["ratio_lo"] == pytest.approx(0.8) and t["ratio_hi"] == pytest.approx(80 / 60)
    assert load_note({"load_start": {"load_1min": 7.9, "cpus": 2}, "load_end": {"load_1min": 8.2, "cpus": 2}}).startswith(
        "measured at load 7.9 (start) / 8.2 (end) on 2 CPUs")
    assert load_note({"load_start": {"load_1min": 0.5, "cpus": 2}, "load_end": {"load_1min": 1.0, "cpus": 2}}) == ""


def test_cli_backends_top_verdict_includes_each_backends_own_sweep(xb, monkeypatch):
    """Tryout: both backends ran turbo3 equally badly (they agree: XBACKEND passes) but each backend's own sweep
    FAILs; the top summary.md/run.json said 'PASS: every judged cell passed' while the command exited 1, and
    `report <out>` exited 0. The top verdict is the worst of XBACKEND and every backend's own sweep."""
    from click.testing import CliRunner

    from harness.cli import cli
    bad = {"shift": {"turbo3": 0.5}}
    cfg = xb.make(a=bad, b=bad)
    r, out = xb.cli(cfg, monkeypatch, "turbo3/turbo3,q4_0/q4_0")
    own = {b: json.loads((out / b / "run.json").read_text())["verdict"] for b in ("cpu", "cuda")}
    assert own == {"cpu": "FAIL", "cuda": "FAIL"}, (own, r.output)
    assert r.exit_code == 1, r.output
    top = json.loads((out / "run.json").read_text())
    assert top["verdict"] == "FAIL", top["verdict"]
    md = (out / "summary.md").read_text()
    head = [ln for ln in md.splitlines() if ln.strip()][:2]
    assert "**FAIL**" in head[0] and head[1].startswith("**FAIL"), head
    for b in ("cpu", "cuda"):
        assert f"{b}'s own sweep: SWEEP FAIL; report {b}/summary.md" in md
    assert 'failures="0"' not in (out / "junit.xml").read_text() or "FAIL" in (out / "junit.xml").read_text()
    r = CliRunner().invoke(cli, ["report", str(out)])
    assert r.exit_code == 1, r.output


def test_cli_backends_interrupted_writes_a_partial_report_marked_interrupted(xb, monkeypatch):
    """Tryout: SIGTERM during `sweep --backends` left no report folder at all (only 'jobs cached; rerun to resume'),
    while a one-backend sweep writes its partial report marked INTERRUPTED. Now: the first backend's own sweep, the
    second's partial one and the comparison are written, the top one INTERRUPTED (never PASS), exit 143."""
    from click.testing import CliRunner

    from harness.cli import cli
    cfg = xb.make(b={"term_parent": ["turbo3"]})
    r, out = xb.cli(cfg, monkeypatch, "turbo3/turbo3")
    assert r.exit_code == 143, r.output
    top = json.loads((out / "run.json").read_text())
    assert top["verdict"] == "INTERRUPTED" and top["interrupted"]["signal"] == "SIGTERM", top["verdict"]
    assert any("cuda" in x for x in top["interrupted"]["not_run"]), top["interrupted"]
    assert (out / "summary.md").read_text().lstrip().startswith("# ") and "INTERRUPTED" in (out / "summary.md").read_text()
    assert json.loads((out / "cpu" / "run.json").read_text())["verdict"] != "INTERRUPTED"  # cpu: ran to its end
    assert json.loads((out / "cuda" / "run.json").read_text())["verdict"] == "INTERRUPTED"
    assert not any(c["verdict"] == "PASS" and c["type"] == "turbo3/turbo3" for c in top["checks"][0]["cells"])
    r = CliRunner().invoke(cli, ["report", str(out)])
    assert r.exit_code != 0, r.output
