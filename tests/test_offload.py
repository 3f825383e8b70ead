"""Where model-level runs put their layers (harness/runners/offload.py): a Vulkan side of a sweep on a machine whose only
Vulkan device is lavapipe names it to ggml (GGML_VK_VISIBLE_DEVICES) and says it is a software device; an rpcN side
and the MODEL check on an rpcN target pass the fork's own --rpc and -dev RPCn -ngl 99, and a run that loaded the model
elsewhere is an ERROR, never the remote device's result. Fake tools and a fake device list: no Vulkan, no server."""
from __future__ import annotations

import json
import stat
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from harness.checks.common import Context, annotate_modes, load_thresholds
from harness.checks.sweeps import judge_sweep, load_rules
from harness.checks.xbackend import judge_xbackend
from harness.fork import backends, vulkan
from harness.report.model import Verdict
from harness.runners.offload import backends_run, model_offload, sweep_device_env
from harness.runners.sweep import SweepConfig, parse_pairs
from harness.runners.sweep_jobs import _common_args
from harness.runners.xbackend import XConfig, run_xbackend, side_config
from harness.targets.base import Backend
from harness.targets.fork import ForkTarget
from tests.test_sweep_parsers import TRAITS
from tests.test_sweep_runner import _write_tiny_gguf
from tests.test_xbackend import fake_build

LAVAPIPE = {"index": 0, "type": "PHYSICAL_DEVICE_TYPE_CPU", "name": "llvmpipe (LLVM 15.0.6, 256 bits)",
            "driver_name": "llvmpipe", "driver_info": "Mesa 22.3.6 (LLVM 15.0.6)", "api": "1.3.230"}
GPU = {"index": 0, "type": "PHYSICAL_DEVICE_TYPE_DISCRETE_GPU", "name": "NVIDIA H100", "driver_name": "NVIDIA",
       "driver_info": "550", "api": "1.3.277"}


@pytest.fixture(autouse=True)
def _no_users_choice(monkeypatch):
    """The tests start from a machine where nobody set GGML_VK_VISIBLE_DEVICES."""
    monkeypatch.delenv(vulkan.VISIBLE_ENV, raising=False)


@pytest.fixture
def sides(tmp_path, monkeypatch):
    model, corpus = tmp_path / "model.gguf", tmp_path / "corpus.txt"
    _write_tiny_gguf(model)
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 50)
    calls = tmp_path / "calls.log"
    calls.write_text("")

    def make(name, devices, endpoints=(), **fake):
        monkeypatch.setattr(vulkan, "list_devices", lambda *a, **k: devices)
        ba = fake_build(tmp_path / "builds", "cpu", calls)
        bb = fake_build(tmp_path / "builds", name.rstrip("0123456789"), calls, **fake)
        tpl = SweepConfig(model=model, corpus=corpus, pairs=parse_pairs("f16/f16,q8_0/q8_0,turbo3/turbo3"), bdir=ba,
                          ctx=256, chunks=3, threads=2, timeout=30, cache_dir=tmp_path / "cache", bench=False)
        return XConfig([side_config("cpu", tpl, ba, list(endpoints)), side_config(name, tpl, bb, list(endpoints))])

    def run(cfg):
        res = run_xbackend(cfg, progress=False, log=lambda s: None, traits=TRAITS)
        secs = {s.backend: judge_sweep(res.sweeps[s.backend], traits=TRAITS)[1] for s in cfg.sides}
        return res, *judge_xbackend(res, secs, load_rules())
    return type("Sides", (), {"make": staticmethod(make), "run": staticmethod(run), "calls": calls})


def test_a_vulkan_side_on_a_machine_with_only_lavapipe_names_it_and_says_software(sides):
    """The gap: verify --target vulkan set GGML_VK_VISIBLE_DEVICES, sweep --backends cpu,vulkan did not, and every
    vulkan job was ERROR 'used no vulkan device' on a lavapipe-only machine."""
    res, cr, sec = sides.run(sides.make("vulkan", [LAVAPIPE], needs_env=vulkan.VISIBLE_ENV))
    vk = res.sweeps["vulkan"]
    assert vk.base.ok, vk.base.error
    assert vk.config.extra_env[vulkan.VISIBLE_ENV] == "0"
    assert res.config.sides[1].extra_env[vulkan.VISIBLE_ENV] == "0"  # the scoring runs too
    c = {x.type: x for x in cr.cells if x.metric == "cross_kld_vs_floor"}["turbo3/turbo3"]
    assert c.verdict == Verdict.PASS, c.caveat
    assert vulkan.VISIBLE_ENV not in res.sweeps["cpu"].config.device_facts.get("env", {})
    # the report says what the device is: backends run, the sweep's notes, the Vulkan facts line
    label = backends_run(vk.config, "vulkan")[0]
    assert "llvmpipe" in label and "software device" in label, label
    notes = judge_sweep(vk, traits=TRAITS)[0].notes
    assert any("software device" in n and f"{vulkan.VISIBLE_ENV}=0 set by the harness" in n for n in notes), notes
    assert vk.meta["device"]["software"].startswith("Vulkan on a software device (lavapipe)")


def test_a_gpu_or_a_users_choice_is_left_alone(sides, monkeypatch):
    cfg = sweep_device_env(sides.make("vulkan", [GPU]).sides[1])
    assert vulkan.VISIBLE_ENV not in cfg.env() and not cfg.device_facts["software"]
    assert backends_run(cfg) == ["vulkan (NVIDIA H100)"]
    monkeypatch.setenv(vulkan.VISIBLE_ENV, "0")  # the user's own choice is kept (inherited) and named
    cfg = sweep_device_env(sides.make("vulkan", [LAVAPIPE]).sides[1])
    assert vulkan.VISIBLE_ENV not in cfg.env() and "as set by the user" in cfg.device_facts["visible_devices"]
    assert "software device" in cfg.device_facts["label"]
    cpu = sweep_device_env(sides.make("vulkan", [LAVAPIPE]).sides[0])  # the CPU side keeps its hiding value
    assert cpu.extra_env[vulkan.VISIBLE_ENV] == "" and not cpu.device_facts


def test_an_rpc_side_puts_every_layer_on_the_remote_device_and_a_local_load_is_an_error(sides):
    cfg = sides.make("rpc0", [], endpoints=["127.0.0.1:50052"])
    args = _common_args(cfg.sides[1])
    assert args[args.index("--rpc") + 1] == "127.0.0.1:50052" and args[args.index("-dev") + 1] == "RPC0"
    assert args.index("--rpc") < args.index("-dev")  # the tools resolve RPC0 when they parse -dev
    res, cr, sec = sides.run(cfg)  # the fake 'rpc' build loads the model on RPC0
    assert res.sweeps["rpc0"].base.ok and backends_run(res.sweeps["rpc0"].config) == ["rpc 127.0.0.1:50052"]
    lines = [ln for ln in sides.calls.read_text().splitlines() if ln.startswith("rpc ")]
    assert lines and all("--rpc 127.0.0.1:50052" in ln and "-dev RPC0" in ln for ln in lines)
    # a build whose tools load the model on a local GPU instead: never filed as rpc0's result
    cfg = sides.make("rpc0", [], endpoints=["127.0.0.1:50052"])
    cfg.sides[1] = replace(cfg.sides[1], bdir=fake_build(sides.calls.parent / "g", "cuda", sides.calls), fresh=True)
    res, cr, sec = sides.run(cfg)
    assert "did not use RPC0" in res.sweeps["rpc0"].base.error
    assert cr.verdict != Verdict.PASS


def test_an_rpc_side_whose_server_is_gone_is_an_error_not_the_forks_refusal(sides):
    """With -dev RPC0 a tool that cannot reach the rpc-server no longer carries on locally: it prints 'Failed to
    connect to HOST:PORT', then 'invalid device: RPC0', and exits 1 before any context. That is the harness's setup
    (no server there), never a configuration the fork refused (SKIP) nor its fault."""
    cfg = sides.make("rpc0", [], endpoints=["127.0.0.1:50052"])
    cfg.sides[1] = replace(cfg.sides[1], bdir=fake_build(sides.calls.parent / "u", "rpc", sides.calls, unreachable=True),
                           fresh=True)
    res, cr, sec = sides.run(cfg)
    base = res.sweeps["rpc0"].base
    assert not base.ok and base.fault == "harness", (base.fault, base.error)
    assert "could not reach the rpc-server at 127.0.0.1:50052" in base.error
    assert cr.verdict == Verdict.ERROR



def test_an_rpc_server_lost_mid_sweep_is_an_error_naming_it_not_a_fork_crash_or_refusal(sides):
    """Tryout: the rpc-server went away in the middle of a cpu,rpc0 sweep. llama-perplexity said 'Remote RPC server
    crashed or returned malformed response' and aborted (filed as FAIL 'fork failure: llama-perplexity crashed'); the
    later runs said 'Failed to connect to HOST:PORT' / 'invalid device: RPC0' (SKIP 'refused the configuration'). Both
    are the harness's measurement failing: ERROR naming the endpoint, never FAIL or SKIP."""
    from harness.runners.sweep_jobs import classify_failure
    from harness.runners.tools import ToolResult
    cfg = sides.make("rpc0", [], endpoints=["127.0.0.1:50052"], rpc_lost=["turbo3"])
    res, cr, sec = sides.run(cfg)
    rec = res.sweeps["rpc0"].ppl["turbo3/turbo3"]
    assert not rec.ok and rec.fault == "harness", (rec.fault, rec.error)
    assert "lost the rpc-server at 127.0.0.1:50052" in rec.error and "Remote RPC server crashed" in rec.error
    cells = [c for c in cr.cells if c.type == "turbo3/turbo3"]
    assert cells and all(c.verdict == Verdict.ERROR for c in cells), [(c.verdict, c.caveat) for c in cells]
    own = judge_sweep(res.sweeps["rpc0"], traits=TRAITS)[0]
    bad = [c for c in own.cells if c.type == "turbo3/turbo3" and c.verdict in (Verdict.FAIL, Verdict.SKIP)]
    assert not bad, [(c.verdict, c.caveat) for c in bad]
    # later runs: the server is gone ('invalid device: RPC0' without the endpoint's own line counts too)
    side = cfg.sides[1]
    for err in ("Failed to connect to 127.0.0.1:50052\nerror while handling argument \"-dev\": invalid device: RPC0\n",
                "error while handling argument \"-dev\": invalid device: RPC0\n"):
        fault, _, msg = classify_failure("ppl", ToolResult(["llama-perplexity"], 1, "", err, 0.1), side)
        assert fault == "harness" and "127.0.0.1:50052" in msg, (fault, msg)
    # a local run's crash is still the fork's
    local = cfg.sides[0]
    fault, _, _ = classify_failure("ppl", ToolResult(["llama-perplexity"], -6, "", "GGML_ASSERT(x) failed\n", 0.1), local)
    assert fault == "fork"


# ----------------------------------------------------------------------------- MODEL

TOOL = r'''#!{py}
import os, sys
a = sys.argv[1:]
tool = os.path.basename(sys.argv[0])
with open({calls!r}, "a") as f:
    f.write(tool + " " + " ".join(a) + " VK=" + os.environ.get("GGML_VK_VISIBLE_DEVICES", "-") + "\n")
k, v = a[a.index("-ctk") + 1], a[a.index("-ctv") + 1]
dev = a[a.index("-dev") + 1] if "-dev" in a else ""
rpc = a[a.index("--rpc") + 1] if "--rpc" in a else ""
local = {local!r}
if rpc and dev.startswith("RPC") and not local:  # the remote device exists only when --rpc registered it
    print(f"llama_model_load_from_file_impl: using device {{dev}} ({{rpc}}) (unknown id) - 1000 MiB free", file=sys.stderr)
elif dev.startswith("Vulkan") and os.environ.get("GGML_VK_VISIBLE_DEVICES"):  # lavapipe: seen only when named
    print(f"llama_model_load_from_file_impl: using device {{dev}} (llvmpipe) (0000:00:00.0) - 1000 MiB free", file=sys.stderr)
elif local == "always" or (local and dev != "none"):  # a GPU build's defaults: every layer on its GPU ('-dev none': none)
    print("llama_model_load_from_file_impl: using device CUDA0 (local GPU) (0000:01:00.0) - 1000 MiB free", file=sys.stderr)
print(f"llama_kv_cache: size =    2.20 MiB (   256 cells,  30 layers,  1/1 seqs), K ({{k}}):    1.10 MiB, V ({{v}}):    1.10 MiB", file=sys.stderr)
print("llama_context: graph splits = 1", file=sys.stderr)
if tool == "llama-save-load-state":
    print("\nfirst run: a\n\nsecond run: a\n\nsingle seq run: a")
    print("main : success", file=sys.stderr)
elif "--kl-divergence" in a:
    print("   1      10.0000 ±    1.0000       0.00100 ±    0.00100       0.00100 ±    0.00010    1.0 ±  0.1 %    99.0 ±  0.1 %")
    print("Mean PPL(Q)                   :  10.010000 ±   1.000000")
    print("Mean PPL(base)                :  10.000000 ±   1.000000")
    print("Mean    KLD:   0.001000 ±   0.000100")
else:
    open(a[a.index("--kl-divergence-base") + 1], "w").write("logits")
    print("Final estimate: PPL = 10.0000 +/- 1.00000")
'''


def _fake_tools(bdir: Path, calls: Path, local=False) -> Path:
    (bdir / "bin").mkdir(parents=True, exist_ok=True)
    for name in ("llama-save-load-state", "llama-perplexity"):
        p = bdir / "bin" / name
        p.write_text(TOOL.format(py=sys.executable, calls=str(calls), local=local))
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return bdir


def _target(bdir: Path, rpc=(), vk_devices=None, cuda=False) -> ForkTarget:
    """A ForkTarget without a probe: its device listing given, as the probe would list it."""
    t = ForkTarget.__new__(ForkTarget)
    t.build_dir, t.rpc, t.name, t.host = bdir, list(rpc), f"fork:{bdir.name}", {}
    t.env, t.vulkan = t._vulkan_env(None, vk_devices)
    t._backends = [Backend("cpu", "CPU", "cpu")]
    if rpc:
        t._backends.append(Backend("rpc0", "RPC0", "gpu", rpc[0]))
    if vk_devices:
        t._backends.append(Backend("vulkan", "Vulkan0", "gpu", vk_devices[0]["name"],
                                   *backends.examination("vulkan", "Vulkan0", vk_devices[0]["name"])))
    if cuda:
        t._backends.append(Backend("cuda", "CUDA0", "gpu", "NVIDIA H100"))
    t._rpc_devices = {b.name: b.description for b in t._backends if b.name.startswith("rpc")}
    return t


def _model(tmp_path, monkeypatch, target, backend):
    from harness.checks import model_smoke
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 50)
    monkeypatch.setenv("TURBO_CORPUS", str(corpus))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    th = load_thresholds()
    th["MODEL"] = dict(th["MODEL"], timeout_s=20.0)
    ctx = Context(target=target, target_backend=backend, types=["turbo3"], thresholds=th, evidence_dir=tmp_path / "ev",
                  options={"MODEL": {"model": str(model), "pairs": ["f16/f16", "turbo3/turbo3"]}})
    out = model_smoke.run(ctx)
    annotate_modes(out, target.backends())  # as verify does after every check
    return out


def test_model_on_an_rpc_target_passes_rpc_and_puts_the_layers_there(tmp_path, monkeypatch):
    calls = tmp_path / "calls.log"
    t = _target(_fake_tools(tmp_path / "b", calls), rpc=["127.0.0.1:50052"])
    cells = _model(tmp_path, monkeypatch, t, "rpc0")
    lines = calls.read_text().splitlines()
    assert {ln.split()[0] for ln in lines} == {"llama-save-load-state", "llama-perplexity"}
    assert all("--rpc 127.0.0.1:50052 -dev RPC0 -ngl 99" in ln for ln in lines), lines
    ran = [c for c in cells if c.metric in ("phases_finished", "ppl", "kld_vs_f16")]
    assert ran and all(c.verdict == Verdict.PASS and c.path.startswith("rpc0:") for c in ran), \
        [(c.path, c.metric, c.verdict, c.caveat) for c in ran]
    assert model_offload(t, "cpu").args == ()  # the CPU target: the tools' defaults, as before


def test_model_run_that_loaded_on_a_local_gpu_is_not_the_remote_devices(tmp_path, monkeypatch):
    t = _target(_fake_tools(tmp_path / "b", tmp_path / "calls.log", local=True), rpc=["127.0.0.1:50052"])
    every = _model(tmp_path, monkeypatch, t, "rpc0")
    cells = [c for c in every if c.metric == "phases_finished"]
    assert cells and all(c.verdict == Verdict.ERROR and "did not use RPC0" in c.caveat for c in cells), \
        [(c.path, c.verdict, c.caveat) for c in cells]
    # nothing else is judged from a run on another device: no 'KV types as asked' PASS filed under rpc0
    assert not [c for c in every if c.verdict in (Verdict.PASS, Verdict.FAIL)], [(c.path, c.metric, c.verdict) for c in every]


def test_model_on_a_lavapipe_only_vulkan_target_names_the_device_and_says_software(tmp_path, monkeypatch):
    calls = tmp_path / "calls.log"
    bdir = _fake_tools(tmp_path / "b", calls)
    (bdir / "CMakeCache.txt").write_text("GGML_VULKAN:BOOL=ON\n")
    t = _target(bdir, vk_devices=[LAVAPIPE])
    cells = _model(tmp_path, monkeypatch, t, "vulkan")
    lines = calls.read_text().splitlines()
    assert lines and all("-dev Vulkan0 -ngl 99" in ln and ln.endswith("VK=0") for ln in lines), lines
    ran = [c for c in cells if c.metric in ("phases_finished", "ppl", "kld_vs_f16")]
    assert ran and all(c.verdict == Verdict.PASS for c in ran), [(c.path, c.verdict, c.caveat) for c in ran]
    assert all("Vulkan on a software device (lavapipe)" in c.caveat for c in ran)
    assert json.dumps(model_offload(t, "vulkan").env) == json.dumps({vulkan.VISIBLE_ENV: "0"})


def test_model_on_the_cpu_of_a_gpu_build_keeps_the_layers_on_the_cpu(tmp_path, monkeypatch):
    """verify --target cpu on a CUDA build: the tools' defaults (-ngl auto) put every layer on the GPU, and the cells
    were filed as cpu's. The CPU target of a build with a local GPU runs with -dev none -ngl 0, and a run whose log
    says it used a device anyway is ERROR, never cpu's result."""
    calls = tmp_path / "calls.log"
    t = _target(_fake_tools(tmp_path / "b", calls, local=True), cuda=True)
    cells = _model(tmp_path, monkeypatch, t, "cpu")
    lines = calls.read_text().splitlines()
    assert lines and all("-dev none -ngl 0" in ln for ln in lines), lines
    ran = [c for c in cells if c.metric in ("phases_finished", "ppl", "kld_vs_f16")]
    assert ran and all(c.verdict == Verdict.PASS and c.path.startswith("cpu:") for c in ran), \
        [(c.path, c.metric, c.verdict, c.caveat) for c in ran]
    t = _target(_fake_tools(tmp_path / "g", tmp_path / "calls2.log", local="always"), cuda=True)
    cells = [c for c in _model(tmp_path, monkeypatch, t, "cpu") if c.metric == "phases_finished"]
    assert cells and all(c.verdict == Verdict.ERROR and "CUDA0" in c.caveat for c in cells), \
        [(c.path, c.verdict, c.caveat) for c in cells]
    assert model_offload(_target(tmp_path / "b"), "cpu").args == ()  # a CPU-only build: the tools' defaults
