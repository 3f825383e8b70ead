"""Issue 22, group 4: every input is checked before anything slow starts, by every command (the listed cases;
tests/test_cli_properties.py covers every number, path and list option of the command tree)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from harness.cli import cli


@pytest.fixture(autouse=True)
def _nothing_to_run(tmp_path, monkeypatch):
    """No fork, no build, reports under tmp: a value that slipped through would fail with another message."""
    monkeypatch.setenv("FORK_DIR", str(tmp_path / "no-fork"))
    monkeypatch.setenv("TURBO_BUILD_ROOT", str(tmp_path / "no-builds"))
    monkeypatch.setenv("TURBO_REPORTS", str(tmp_path / "reports"))


def _line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, (r.exit_code, r.output)
    return lines[0]


def test_sweep_batch_0_is_refused_not_replaced():
    """4.1: `sweep --batch 0` (and --ubatch 0) is refused, never silently replaced by the default."""
    for opt in ("--batch", "--ubatch"):
        assert f"'{opt}'" in _line(CliRunner().invoke(cli, ["sweep", opt, "0"]))


def test_check_kvreal_refuses_a_fake_model_up_front(tmp_path):
    """4.2: `check KVREAL --model fake.gguf` stops with one line as sweep does; no ERROR report is written."""
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    out = tmp_path / "out"
    line = _line(CliRunner().invoke(cli, ["check", "KVREAL", "--model", str(fake), "--out", str(out)]))
    assert "--model" in line and "GGUF" in line
    assert not out.exists()
    # the same file named by $TURBO_MODEL (KVREAL's other way to get a model) is read up front too
    r = CliRunner(env={"TURBO_MODEL": str(fake)}).invoke(cli, ["check", "KVREAL", "--out", str(out)])
    line = _line(r)
    assert "$TURBO_MODEL" in line and "not a valid GGUF" in line
    assert not out.exists()


def test_check_refuses_model_where_it_does_not_apply(tmp_path):
    """4.2: `check PQ3 --model ...` is refused (PQ3 reads no model), never silently ignored."""
    out = tmp_path / "out"
    line = _line(CliRunner().invoke(cli, ["check", "PQ3", "--model", "smollm2", "--numpy-target", "", "--out", str(out)]))
    assert "--model applies to KVREAL only" in line
    assert not (out / "run.json").exists()


def test_sweep_compare_refuses_a_report_folder_as_out(tmp_path):
    """4.3: `sweep-compare --out <a verify report folder>` is refused and the folder is left as it was."""
    rep = tmp_path / "verify-report"
    r = CliRunner().invoke(cli, ["check", "PQ4", "--numpy-target", "", "--type", "turbo3", "--out", str(rep)])
    assert r.exit_code == 0, r.output
    before = sorted(p.name for p in rep.iterdir())
    line = _line(CliRunner().invoke(cli, ["sweep-compare", "reports/samples/sweep-cpu-smollm2", "--out", str(rep)]))
    assert "--out" in line and "report" in line
    assert sorted(p.name for p in rep.iterdir()) == before
    assert json.loads((rep / "run.json").read_text())["checks"][0]["id"] == "PQ4"


@pytest.mark.parametrize("command", [["verify"], ["sweep"], ["check", "PQ4"]])
def test_one_rpc_server_under_two_names_is_refused(command):
    """4.4: `--rpc 127.0.0.1:P,localhost:P` names one server twice (it became rpc0 and rpc1, compared with itself)."""
    line = _line(CliRunner().invoke(cli, [*command, "--rpc", "127.0.0.1:50999,localhost:50999"]))
    assert "--rpc" in line and "same rpc-server" in line and "127.0.0.1:50999" in line


def test_sweep_help_has_no_placeholder():
    """4.5: `sweep --help` shows the default depth pairs, not '{DEPTH_PAIRS}'."""
    from harness.runners.depth import DEPTH_PAIRS
    r = CliRunner().invoke(cli, ["sweep", "--help"])
    flat = "".join(r.output.split())  # help text is wrapped
    assert r.exit_code == 0 and "{DEPTH_PAIRS}" not in flat and DEPTH_PAIRS in flat


def test_a_comma_list_with_an_empty_item_is_refused():
    """Tryout: `sweep --pairs 'f16/f16,,q8_0/q8_0'` was accepted silently (the empty item dropped): a typo (a pair
    left out) must be one line and exit 2, as must a trailing comma, in every comma-list option."""
    for opt, val in (("--pairs", "f16/f16,,q8_0/q8_0"), ("--pairs", "f16/f16,"), ("--depths", "0,,256"),
                     ("--backends", "cpu,,cuda")):
        line = _line(CliRunner().invoke(cli, ["sweep", opt, val]))
        assert f"'{opt}'" in line and "empty item" in line, line
    assert "empty item" not in CliRunner().invoke(cli, ["sweep", "--pairs", "f16/f16,q8_0/q8_0", "--help"]).output
