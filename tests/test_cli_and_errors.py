"""CLI behaviour on bad input, exit codes, reports kept on errors, report re-rendering."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.report.model import Verdict
from harness.targets.numpy_target import NumpyTarget
from harness.verify import run_checks


def invoke(args, env=None):
    r = CliRunner().invoke(cli, args, env=env or {}, catch_exceptions=False)
    return r.exit_code, r.output


def test_no_fork_checkout(tmp_path):
    code, out = invoke(["verify"], env={"FORK_DIR": str(tmp_path / "nope")})
    assert code == 2
    assert "no fork checkout" in out and "FORK_DIR" in out
    assert len([ln for ln in out.splitlines() if ln.startswith("error:")]) == 1


def test_fork_without_turbo_types(tmp_path):
    inc = tmp_path / "ggml" / "include"
    inc.mkdir(parents=True)
    (inc / "ggml.h").write_text("enum ggml_type { GGML_TYPE_F32 = 0, GGML_TYPE_Q8_0 = 8 };\n")
    code, out = invoke(["verify"], env={"FORK_DIR": str(tmp_path)})
    assert code == 2 and "no TurboQuant KV types" in out
    code, out = invoke(["build", "--backend", "cpu"], env={"FORK_DIR": str(tmp_path)})
    assert code == 2 and "no TurboQuant KV types" in out


def test_failed_build_names_log(tmp_path):
    inc = tmp_path / "ggml" / "include"
    inc.mkdir(parents=True)
    (inc / "ggml.h").write_text("GGML_TYPE_TURBO3_0\n")
    (tmp_path / "CMakeLists.txt").write_text('cmake_minimum_required(VERSION 3.14)\nproject(x C)\nmessage(FATAL_ERROR "broken fork")\n')
    code, out = invoke(["build", "--backend", "cpu"], env={"FORK_DIR": str(tmp_path), "TURBO_BUILD_ROOT": str(tmp_path / "b")})
    assert code == 2 and "configure" in out and "turbo-harness-build.log" in out


def test_unknown_backend_and_check(tmp_path):
    code, out = invoke(["build", "--backend", "tpu"], env={"FORK_DIR": str(tmp_path)})
    assert code == 2
    code, out = invoke(["check", "PQ9"])
    assert code == 2 and "unknown check" in out


def test_missing_backend_is_usage_error(tmp_path):
    from harness.errors import HarnessError
    with pytest.raises(HarnessError, match="not available in this build"):
        run_checks(NumpyTarget(), ["PQ4"], ["turbo3"], tmp_path / "r", target_backend="cuda")


def test_fork_crash_is_fail_and_earlier_checks_are_kept(tmp_path):
    # spec "Who is at fault": the fork aborting on an op its backend accepted is the fork's FAIL, quoting the crash
    run_dir = tmp_path / "r"
    run = run_checks(NumpyTarget(faults=["crash_attention"]), ["PQ4", "PQ6"], ["turbo3"], run_dir, log=lambda s: None)
    assert run.exit_code() == 1
    data = json.loads((run_dir / "run.json").read_text())
    by = {c["id"]: c["verdict"] for c in data["checks"]}
    assert by == {"PQ4": "PASS", "PQ6": "FAIL"}
    assert "emulated ggml abort" in (run_dir / "summary.md").read_text()
    junit = (run_dir / "junit.xml").read_text()
    assert "<failure" in junit and "<error" not in junit


def test_harness_exception_is_error(tmp_path):
    # ... while the harness failing to measure (here: a bug raising inside the target adapter) is an ERROR
    tgt = NumpyTarget()

    def broken(*a, **k):
        raise ValueError("harness bug")
    tgt.flash_attn = broken
    run = run_checks(tgt, ["PQ6"], ["turbo3"], tmp_path / "r", log=lambda s: None)
    assert run.exit_code() == 2 and run.checks[0].verdict == Verdict.ERROR
    assert all("harness error ValueError: harness bug" in c.caveat for c in run.checks[0].cells if c.verdict == Verdict.ERROR)


def test_exit_codes_fail_partial_strict(tmp_path):
    run = run_checks(NumpyTarget(faults=["uncorrected_norm"]), ["PQ3"], ["turbo3"], tmp_path / "a", log=lambda s: None)
    assert run.exit_code() == 1
    run = run_checks(NumpyTarget(faults=["perturbed_centroids"]), ["PQ2"], ["turbo4"], tmp_path / "b", log=lambda s: None)
    assert run.verdict == Verdict.PARTIAL and run.exit_code() == 0 and run.exit_code(strict=True) == 1


def test_report_rerenders_from_json(tmp_path):
    run_dir = tmp_path / "r"
    run_checks(NumpyTarget(), ["PQ4"], ["turbo2"], run_dir, log=lambda s: None)
    (run_dir / "summary.md").unlink()
    code, out = invoke(["report", str(run_dir)])
    assert code == 0 and (run_dir / "summary.md").is_file()
    assert "| turbo2 |" in (run_dir / "summary.md").read_text()
    code, out = invoke(["report", str(tmp_path / "missing")])
    assert code == 2


def test_list_shows_thresholds_with_reasons():
    code, out = invoke(["list"])
    assert code == 0 and "PQ6" in out and "rel_err_f32 = 0.0001" in out and "#" in out


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "harness.cli", "--help"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and "verify" in r.stdout
