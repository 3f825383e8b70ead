"""Who is at fault: fake fork tools that abort, hang, print an AddressSanitizer report, refuse a context or
succeed, judged by the MODEL check; probe crash messages judged by the replay catalogue. No fork build needed."""
from __future__ import annotations

import stat
import textwrap
from pathlib import Path

import pytest

from harness.checks import model_smoke
from harness.checks.common import Context, load_thresholds
from harness.cli_replay import judge_side
from harness.report.model import Cell, CheckResult, Verdict
from harness.runners.crash import classify, classify_probe_message, signal_name

KV = "llama_kv_cache: size =    2.20 MiB (   256 cells,  30 layers,  1/1 seqs), K ({k}):    1.10 MiB, V ({v}):    1.10 MiB"
ASAN = textwrap.dedent("""\
    =================================================================
    ==4242==ERROR: AddressSanitizer: stack-buffer-overflow on address 0x7ffd3a1c4f80 at pc 0x7f1 bp 0x7ff sp 0x7ff
    WRITE of size 4 at 0x7ffd3a1c4f80 thread T0
        #0 0x7f3c2a1b2c3d in quantize_row_turbo4_0_ref /src/ggml/src/ggml-turbo-quant.c:211
        #1 0x7f3c2a1b2e00 in ggml_quantize_chunk /src/ggml/src/ggml.c:6600
    SUMMARY: AddressSanitizer: stack-buffer-overflow /src/ggml/src/ggml-turbo-quant.c:211 in quantize_row_turbo4_0_ref
    ==4242==ABORTING""")

# bodies of fake llama-save-load-state scripts; $K/$V are the -ctk/-ctv values
STATE_OK = f"""
echo "{KV.format(k='$K', v='$V')}" >&2
echo "llama_context: graph splits = 1" >&2
echo "llama_kv_cache: attn_rot_k = ${{ROT_K:-0}}, n_embd_head_k_all = 64" >&2
printf '\\nfirst run: The quick brown fox jumps\\n'
printf '\\nsecond run: The quick brown fox jumps\\n'
printf '\\nsingle seq run: The quick brown fox jumps\\n'
echo "main : success" >&2
"""
STATE_ABORT_CTX = f"""
echo "{KV.format(k='$K', v='$V')}" >&2
echo "/src/ggml/src/ggml.c:3656: GGML_ASSERT(ggml_nelements(a) == ne0*ne1*ne2) failed" >&2
kill -ABRT $$
"""
STATE_ABORT_DECODE = f"""
echo "{KV.format(k='$K', v='$V')}" >&2
echo "llama_context: graph splits = 1" >&2
printf '\\nfirst run: The quick brown fox\\n'
echo "/src/ggml/src/ggml-cpu/ops.cpp:99: GGML_ASSERT(ne00 % 128 == 0) failed" >&2
kill -ABRT $$
"""
STATE_SEGV_RESTORE = f"""
echo "{KV.format(k='$K', v='$V')}" >&2
echo "llama_context: graph splits = 1" >&2
printf '\\nfirst run: a\\n'
printf '\\nsecond run: a\\n'
kill -SEGV $$
"""
STATE_MISMATCH = f"""
echo "{KV.format(k='$K', v='$V')}" >&2
echo "llama_context: graph splits = 1" >&2
printf '\\nfirst run: The quick brown fox jumps\\n'
printf '\\nsecond run: The quick brown fox sat\\n'
echo "main : error : the 2 generations are different" >&2
exit 1
"""
STATE_HANG = f"""
echo "{KV.format(k='$K', v='$V')}" >&2
echo "llama_context: graph splits = 1" >&2
printf '\\nfirst run: a\\n'
exec sleep 30
"""
STATE_ASAN = f"""
echo "{KV.format(k='$K', v='$V')}" >&2
echo "llama_context: graph splits = 1" >&2
printf '\\nfirst run: a\\n'
cat >&2 <<'EOF'
{ASAN}
EOF
exit 1
"""
STATE_REFUSED = """
echo "llama_init_from_model: K cache type $K with block size 128 does not divide n_embd_head_k=64" >&2
echo "common_init_from_params: failed to create context with model 'x.gguf'" >&2
echo "main : failed to init" >&2
exit 1
"""
STATE_BAD_ARG = """
echo "error: invalid argument: -fa" >&2
exit 1
"""
STATE_FALLBACK = f"""
echo "{KV.format(k='q8_0', v='q8_0')}" >&2
echo "llama_context: graph splits = 1" >&2
printf '\\nfirst run: a\\nsecond run: a\\nsingle seq run: a\\n'
echo "main : success" >&2
"""


def fake_build(tmp_path: Path, state_body: str, ppl: bool = False) -> Path:
    """A build folder whose bin/ holds a fake llama-save-load-state running ``state_body``."""
    bdir = tmp_path / "build"
    (bdir / "bin").mkdir(parents=True, exist_ok=True)
    tool = bdir / "bin" / "llama-save-load-state"
    prologue = 'while [ $# -gt 0 ]; do case "$1" in -ctk) K=$2; shift;; -ctv) V=$2; shift;; esac; shift; done\n'
    tool.write_text("#!/bin/bash\n" + prologue + state_body)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return bdir


class FakeTarget:
    name = "fake-build"

    def __init__(self, bdir):
        self.bdir = bdir  # no build_dir: MODEL reaches the tools only through the target (model_tools)

    def backends(self):
        return []

    def model_tools(self, backend=None):  # the fake build's scripts, run as a ForkTarget runs its build's tools
        from harness.runners.model_smoke import ModelTools
        return ModelTools(self.bdir)


def model_ctx(tmp_path, bdir, options=None, timeout=20.0) -> Context:
    th = load_thresholds()
    th["MODEL"] = dict(th["MODEL"], timeout_s=timeout)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    return Context(target=FakeTarget(bdir), target_backend="cpu", types=["turbo3"], thresholds=th,
                   evidence_dir=tmp_path / "ev", options={"MODEL": {"model": str(model), "pairs": ["turbo3/turbo3"],
                                                                   "ppl": False, **(options or {})}})


def exit_cell(cells) -> Cell:
    return next(c for c in cells if c.path == "cpu:state_roundtrip" and c.metric in ("phases_finished",))


def test_success_passes_with_types_checked(tmp_path):
    cells = model_smoke.run(model_ctx(tmp_path, fake_build(tmp_path, STATE_OK)))
    assert exit_cell(cells).verdict == Verdict.PASS and exit_cell(cells).value == 5
    kv = next(c for c in cells if c.metric == "kv_types_as_asked")
    assert kv.verdict == Verdict.PASS
    assert (tmp_path / "ev" / "MODEL" / "turbo3-turbo3.state.stderr").is_file()


def test_a_gpu_target_whose_tool_used_no_device_is_error_not_pass(tmp_path):
    """--target vulkan on a machine whose only Vulkan device ggml ignores (lavapipe): the tool runs on the CPU, exit 0,
    and its cells were 'vulkan:state_roundtrip' PASS."""
    ctx = model_ctx(tmp_path, fake_build(tmp_path, STATE_OK))
    ctx.target_backend = "vulkan"
    c = next(c for c in model_smoke.run(ctx) if c.path == "vulkan:state_roundtrip" and c.metric == "phases_finished")
    assert c.verdict == Verdict.ERROR and "used no vulkan device" in c.caveat, c.caveat
    on_gpu = fake_build(tmp_path / "g", 'echo "llama_model_load_from_file_impl: using device Vulkan0 (x)" >&2\n' + STATE_OK)
    ctx = model_ctx(tmp_path / "g", on_gpu)
    ctx.target_backend = "vulkan"
    assert next(c for c in model_smoke.run(ctx) if c.metric == "phases_finished").verdict == Verdict.PASS


def test_abort_at_context_creation_is_fail_quoting_the_assert(tmp_path):
    c = exit_cell(model_smoke.run(model_ctx(tmp_path, fake_build(tmp_path, STATE_ABORT_CTX))))
    assert c.verdict == Verdict.FAIL
    assert "SIGABRT" in c.caveat and "GGML_ASSERT(ggml_nelements(a) == ne0*ne1*ne2)" in c.caveat
    assert c.caveat.startswith("context creation died")  # the KV cache existed, the graph reservation aborted


def test_abort_in_decode_names_the_phase_and_keeps_earlier_ones(tmp_path):
    c = exit_cell(model_smoke.run(model_ctx(tmp_path, fake_build(tmp_path, STATE_ABORT_DECODE))))
    assert c.verdict == Verdict.FAIL and c.caveat.startswith("decode died: aborted (SIGABRT)")
    assert "finished: context creation, warm-up/prefill" in c.caveat and c.value == 2


def test_segfault_in_state_restore_is_fail(tmp_path):
    c = exit_cell(model_smoke.run(model_ctx(tmp_path, fake_build(tmp_path, STATE_SEGV_RESTORE))))
    assert c.verdict == Verdict.FAIL and c.caveat.startswith("state restore died: segmentation fault (SIGSEGV)")


def test_different_generation_after_restore_is_fail(tmp_path):
    c = exit_cell(model_smoke.run(model_ctx(tmp_path, fake_build(tmp_path, STATE_MISMATCH))))
    assert c.verdict == Verdict.FAIL and "the 2 generations are different" in c.caveat and "state restore" in c.caveat


def test_hang_is_error_with_the_reason(tmp_path):
    c = exit_cell(model_smoke.run(model_ctx(tmp_path, fake_build(tmp_path, STATE_HANG), timeout=1.5)))
    assert c.verdict == Verdict.ERROR and "hung: timed out after 2 s" in c.caveat and "decode" in c.caveat


def test_asan_report_is_fail_quoting_the_report(tmp_path):
    c = exit_cell(model_smoke.run(model_ctx(tmp_path, fake_build(tmp_path, STATE_ASAN))))
    assert c.verdict == Verdict.FAIL
    assert "AddressSanitizer: stack-buffer-overflow" in c.caveat and "quantize_row_turbo4_0_ref" in c.caveat


def test_clean_refusal_is_skip_with_the_forks_message(tmp_path):
    c = exit_cell(model_smoke.run(model_ctx(tmp_path, fake_build(tmp_path, STATE_REFUSED))))
    assert c.verdict == Verdict.SKIP and "does not divide n_embd_head_k=64" in c.caveat


def test_refusal_of_a_documented_configuration_is_fail(tmp_path):
    c = exit_cell(model_smoke.run(model_ctx(tmp_path, fake_build(tmp_path, STATE_REFUSED), {"must_accept": True})))
    assert c.verdict == Verdict.FAIL and "documents as supported" in c.caveat


def test_tool_that_cannot_run_is_error_not_fail(tmp_path):
    c = exit_cell(model_smoke.run(model_ctx(tmp_path, fake_build(tmp_path, STATE_BAD_ARG))))
    assert c.verdict == Verdict.ERROR and "invalid argument" in c.caveat


def test_silent_type_change_is_error(tmp_path):
    cells = model_smoke.run(model_ctx(tmp_path, fake_build(tmp_path, STATE_FALLBACK)))
    kv = next(c for c in cells if c.metric == "kv_types_as_asked")
    assert kv.verdict == Verdict.ERROR and "K=q8_0 V=q8_0" in kv.caveat


@pytest.mark.parametrize("logged,verdict", [("0", Verdict.FAIL), ("1", Verdict.PASS)])
def test_env_switch_must_show_in_the_log(tmp_path, logged, verdict):
    body = STATE_OK.replace("${ROT_K:-0}", logged)
    opts = {"env": {"LLAMA_ATTN_ROT_K_OVERRIDE": "1"}, "pairs": ["q8_0/q8_0"]}
    cells = model_smoke.run(model_ctx(tmp_path, fake_build(tmp_path, body), opts))
    c = next(c for c in cells if c.metric == "attn_rot_k")
    assert c.verdict == verdict and c.value == float(logged)
    if verdict == Verdict.FAIL:
        assert "ignored" in c.caveat


def test_missing_tool_is_skip_naming_the_build_step(tmp_path):
    bdir = tmp_path / "empty"
    (bdir / "bin").mkdir(parents=True)
    cells = model_smoke.run(model_ctx(tmp_path, bdir))
    assert cells and all(c.verdict == Verdict.SKIP for c in cells)
    assert "LLAMA_BUILD_EXAMPLES" in cells[0].caveat


# ----------------------------------------------------------------------------- classification and replay sides

@pytest.mark.parametrize("rc,name", [(-6, "SIGABRT"), (134, "SIGABRT"), (-11, "SIGSEGV"), (0, ""), (1, ""), (None, "")])
def test_signal_names(rc, name):
    assert signal_name(rc) == name


def test_clean_error_exit_is_not_a_crash():
    assert classify(1, False, "error: something the user did") is None
    assert classify(0, False, "all fine") is None


def probe_result(caveat: str, verdict=Verdict.ERROR) -> CheckResult:
    return CheckResult(id="PQ6", title="t", cells=[
        Cell("PQ6", "turbo3", "cpu:set_rows", "rel_err", 1e-6, 1e-4, Verdict.PASS),
        Cell("PQ6", "turbo3", "cpu:flash_attn", "-", None, None, verdict, caveat=caveat)])


def test_replayed_probe_segfault_is_fail_quoting_it():
    v, why = judge_side(probe_result("fork code crashed in probe call flash_attn (signal 11 (SIGSEGV)): Segmentation fault"))
    assert v == "FAIL" and "segmentation fault (SIGSEGV)" in why and "flash_attn" in why


def test_replayed_probe_abort_is_fail():
    msg = "fork code crashed in probe call turbo_wht (signal 6 (SIGABRT)): ggml.c:6050: GGML_ASSERT(a->ne[0] % 128 == 0) failed"
    v, why = judge_side(probe_result(msg))
    assert v == "FAIL" and "GGML_ASSERT(a->ne[0] % 128 == 0)" in why


def test_replayed_probe_asan_exit_is_fail():
    v, why = judge_side(probe_result("fork code crashed in probe call quantize_chunk (exit code 1): " +
                                     ASAN.splitlines()[1]))
    assert v == "FAIL" and "AddressSanitizer: stack-buffer-overflow" in why


def test_replayed_probe_hang_stays_error():
    v, why = judge_side(probe_result("probe call flash_attn timed out after 600 s and was killed"))
    assert v == "ERROR" and "hang" in why


def test_harness_error_stays_error():
    v, _ = judge_side(probe_result("harness error KeyError: 'x' at common.py:1"))
    assert v == "ERROR"
    assert classify_probe_message("harness error KeyError") is None


def test_all_pass_side_is_pass_and_empty_side_is_not():
    assert judge_side(probe_result("", Verdict.PASS))[0] == "PASS"
    assert judge_side(CheckResult(id="PQ6", title="t"))[0] == "SKIP"


# ----------------------------------------------------------------------------- llama-perplexity (KLD vs f16)

PPL_BODY = """
while [ $# -gt 0 ]; do case "$1" in -ctk) K=$2; shift;; -ctv) V=$2; shift;; --kl-divergence-base) B=$2; shift;;
  --kl-divergence) KLD=1;; esac; shift; done
echo "{kv}" >&2
echo "sched_reserve: graph splits = 1" >&2
if [ -z "$KLD" ]; then echo base > "$B"; echo "Final estimate: PPL = 23.6526 +/- 6.93"; exit 0; fi
{extra}
echo "Mean PPL(Q)                   :  25.000601 ±   7.187407"
echo "Mean PPL(base)                :  23.652597 ±   6.934703"
echo "Mean    KLD:   $KLDVAL ±   0.008353"
"""


def fake_ppl(tmp_path: Path, kld: str, extra: str = "") -> Path:
    bdir = tmp_path / "build"
    (bdir / "bin").mkdir(parents=True, exist_ok=True)
    tool = bdir / "bin" / "llama-perplexity"
    tool.write_text("#!/bin/bash\nKLDVAL=" + kld + "\n" + PPL_BODY.replace("{kv}", KV.format(k="$K", v="$V"))
                    .replace("{extra}", extra))
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return bdir


def ppl_cells(tmp_path, bdir, pairs):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text " * 100)
    import os
    old = os.environ.get("TURBO_CORPUS")
    os.environ["TURBO_CORPUS"] = str(corpus)
    try:
        return model_smoke.run(model_ctx(tmp_path, bdir, {"state": False, "ppl": True, "pairs": pairs}))
    finally:
        if old is None:
            del os.environ["TURBO_CORPUS"]
        else:
            os.environ["TURBO_CORPUS"] = old


def test_kld_within_the_types_bound_passes_and_above_fails(tmp_path):
    cells = ppl_cells(tmp_path, fake_ppl(tmp_path, "0.40"), ["turbo3/turbo3", "turbo4/turbo4"])
    by = {c.type: c for c in cells if c.metric == "kld_vs_f16"}
    assert by["turbo3/turbo3"].verdict == Verdict.PASS and by["turbo3/turbo3"].threshold == 0.6
    assert by["turbo4/turbo4"].verdict == Verdict.FAIL and "corrupts the logits" in by["turbo4/turbo4"].caveat
    assert next(c for c in cells if c.type == "f16/f16").metric == "ppl"


def test_perplexity_abort_after_context_is_fail_naming_prefill(tmp_path):
    bdir = fake_ppl(tmp_path, "0.1", extra='echo "ggml-cpu/ops.cpp:7: GGML_ASSERT(k->ne[0] == 128) failed" >&2; kill -ABRT $$')
    cells = ppl_cells(tmp_path, bdir, ["turbo3/turbo3"])
    c = next(c for c in cells if c.type == "turbo3/turbo3" and c.metric == "phases_finished")
    assert c.verdict == Verdict.FAIL and c.caveat.startswith("prefill (perplexity chunks) died: aborted (SIGABRT)")
    assert "GGML_ASSERT(k->ne[0] == 128)" in c.caveat


def test_kld_bound_takes_the_looser_side():
    bounds = load_thresholds()["MODEL"]["kld_max"]
    assert model_smoke.kld_bound(bounds, "q8_0", "turbo2") == bounds["turbo2"]
    assert model_smoke.kld_bound(bounds, "q8_0", "iq4_nl") == bounds["other"]


def test_doctor_says_whether_ccache_is_installed(tmp_path):
    from click.testing import CliRunner
    from harness.cli import cli
    out = CliRunner().invoke(cli, ["doctor"], env={"FORK_DIR": str(tmp_path)}).output
    assert "ccache" in out and ("installed" in out)


@pytest.mark.parametrize("caveat,fixed,code", [
    ("fork code crashed in probe call set_rows (signal 11 (SIGSEGV)): Segmentation fault", True, 0),   # crash = still broken
    ("fork code crashed in probe call set_rows (signal 11 (SIGSEGV)): Segmentation fault", False, 1),  # crash = bad
    ("probe call set_rows timed out after 600 s and was killed", True, 125),                 # hang: skip the commit
])
def test_bisect_oracle_counts_a_crash_as_flagged_and_skips_a_hang(monkeypatch, tmp_path, caveat, fixed, code):
    from click.testing import CliRunner
    import harness.cli_replay as cr
    from harness.cli import cli
    from harness.report.model import Run

    def fake_replay(fork, rev, checks, types, routes, **kw):
        run = Run(run_id="x")
        run.checks.append(probe_result(caveat))
        return run, tmp_path / "r", False
    monkeypatch.setattr(cr, "replay_commit", fake_replay)
    monkeypatch.setattr(cr, "resolve", lambda fork, rev: "a" * 40)
    monkeypatch.setattr(cr, "history_dir", lambda *a: tmp_path)
    monkeypatch.setattr(cr.subprocess, "run", lambda *a, **k: type("R", (), {"stdout": "a" * 40 + "\n"})())
    args = ["bisect-oracle", "--check", "PQ6", "--type", "turbo3", "--log", str(tmp_path / "log.jsonl")]
    r = CliRunner().invoke(cli, args + (["--fixed"] if fixed else []), catch_exceptions=False)
    assert r.exit_code == code


def test_replayed_crash_quotes_the_sanitizer_report_written_beside_it(tmp_path):
    from harness.cli_replay import sanitizer_reports
    d = tmp_path / "evidence" / "sanitizer"
    d.mkdir(parents=True)
    (d / "asan.4242").write_text(ASAN)
    reps = sanitizer_reports(tmp_path)
    assert reps and "stack-buffer-overflow" in reps[0] and "quantize_row_turbo4_0_ref" in reps[0]
    v, why = judge_side(probe_result("fork code crashed in probe call quantize_chunk (exit code 1): ==4242==ABORTING"), reps)
    assert v == "FAIL" and "AddressSanitizer report: AddressSanitizer: stack-buffer-overflow" in why


def test_replay_takes_a_bare_history_repository(tmp_path):
    import subprocess
    from harness.errors import HarnessError
    from harness.replay import commit_root, export_source, history_dir, resolve, targets_for
    work = tmp_path / "w"
    (work / "ggml" / "include").mkdir(parents=True)
    (work / "ggml" / "include" / "ggml.h").write_text("GGML_TYPE_TURBO3_0\n")
    g = ["git", "-C", str(work)]
    subprocess.run(g + ["init", "-q"], check=True)
    subprocess.run(g + ["add", "."], check=True)
    subprocess.run(g + ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x"], check=True)
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    fork = history_dir(str(bare))
    c = resolve(fork, "HEAD")
    src = export_source(fork, c, tmp_path / "cache")
    assert src == commit_root(c, tmp_path / "cache") / "src" and (src / "ggml" / "include" / "ggml.h").is_file()
    with pytest.raises(HarnessError, match="no fork history"):
        history_dir(str(tmp_path / "missing"))
    assert targets_for(["PQ1"]) == ("ggml",) and "llama-save-load-state" in targets_for(["PQ1", "MODEL"])


def test_a_route_skipped_because_the_fork_crashed_is_fail_and_a_plain_skip_stays_skip():
    skipped = "not supported: no decode route for turbo4 on cpu (to_float: fork code crashed in probe call to_float " \
              "(exit code 1): no message)"
    v, why = judge_side(probe_result(skipped, Verdict.SKIP), ["AddressSanitizer: stack-buffer-overflow in f x.c:1"])
    assert v == "FAIL" and "stack-buffer-overflow" in why
    v, _ = judge_side(probe_result("not supported: this fork build has no ggml_turbo_wht op", Verdict.SKIP))
    assert v == "SKIP"
    v, why = judge_side(probe_result("not supported: probe call to_float timed out after 600 s and was killed", Verdict.SKIP))
    assert v == "ERROR" and "hang" in why


def test_old_probe_message_format_still_reads_and_a_check_fail_for_a_hang_is_error():
    v, why = judge_side(probe_result("fork code crashed in probe call set_rows (signal 11): no message"))
    assert v == "FAIL" and "SIGSEGV" in why
    hang = "fork failure on a configuration the backend accepted: probe call flash_attn timed out after 600 s and was killed"
    v, why = judge_side(probe_result(hang, Verdict.FAIL))
    assert v == "ERROR" and "hang" in why


def test_worker_exit_is_the_harness_side_unless_a_sanitizer_reported():
    msg = "the probe worker exited (exit code 1) during call to_float: ==1==ABORTING"
    assert judge_side(probe_result(msg))[0] == "ERROR"
    v, why = judge_side(probe_result(msg), ["AddressSanitizer: stack-buffer-overflow in f x.c:1"])
    assert v == "FAIL" and "stack-buffer-overflow" in why
