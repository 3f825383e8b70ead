"""Issue 23, verify's own time: the report is rewritten after every check, and each rewrite drew every plot again
(most of verify's non-check time); a plot is now drawn once per change of its data. `make bench` prints the whole
verify wall time beside the checks' own (scripts/bench_verify.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.pipeline import load_run
from harness.report import plots

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pq2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pq2") / "run"
    r = CliRunner().invoke(cli, ["check", "PQ2", "--numpy-target", "", "--type", "turbo3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return load_run(out)


def test_a_plot_is_drawn_once_per_change_of_its_data(pq2_run, tmp_path, monkeypatch):
    drawn = []
    real = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, d, name, key: drawn.append(name) or real(fig, d, name, key))
    made = plots.check_plots(pq2_run, tmp_path)
    assert drawn == ["codebook"] and made["codebook"].is_file()
    assert plots.check_plots(pq2_run, tmp_path) == made and drawn == ["codebook"]  # same data: kept
    cell = next(c for c in pq2_run.checks[0].cells if c.metric.startswith("distortion") and c.value is not None)
    cell.value *= 1.5  # another measurement: drawn again
    plots.check_plots(pq2_run, tmp_path)
    assert drawn == ["codebook", "codebook"]
    (tmp_path / "codebook.png").unlink()  # a deleted plot is drawn again too
    plots.check_plots(pq2_run, tmp_path)
    assert len(drawn) == 3


@pytest.mark.slow
def test_bench_prints_whole_verify_wall_beside_the_checks(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_verify.py"), "--out", str(tmp_path / "b"),
                        "--numpy-target", "", "--type", "turbo3"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("run 1:"))
    assert "verify wall" in line and "checks' own" in line and "load " in line and "the rest" in line


def test_a_plot_drawn_in_the_background_is_in_the_final_report(pq2_run, tmp_path):
    with plots.in_background():
        assert "codebook" not in plots.check_plots(pq2_run, tmp_path) or (tmp_path / "codebook.png").is_file()
    made = plots.check_plots(pq2_run, tmp_path)  # outside: waits for the worker
    assert made["codebook"].is_file() and (tmp_path / ".codebook.key").is_file() and not plots._pending


def test_verify_report_has_every_plot(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["verify", "--numpy-target", "", "--type", "turbo3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    html = (out / "report.html").read_text()
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == ["attention.png", "codebook.png", "distortion.png"]
    assert html.count("data:image/png;base64,") >= 3
