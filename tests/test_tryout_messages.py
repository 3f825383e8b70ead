"""Tryout 28, messages: a refused --kld-depths suggests a value the harness accepts (item 5), a sweep says once that
it added the baseline pairs (item 6), `verify --build cuda` on a machine without a GPU says a GPU is needed, as
`--target cuda` does (item 7)."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from harness.cli import cli


def _line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, (r.exit_code, r.output)
    return lines[0]


@pytest.mark.parametrize("bad", ["none,256", "-5,256", "256,x"])
def test_a_refused_kld_depths_suggests_a_value_that_is_accepted(bad):
    """The old suggestion 'e.g. 0,256' is itself refused ('0 is not a context length')."""
    line = _line(CliRunner().invoke(cli, ["sweep", f"--kld-depths={bad}"]))
    example = re.search(r"e\.g\. ([0-9,]+)", line).group(1)
    r = CliRunner().invoke(cli, ["sweep", "--kld-depths", example, "--model", "/nonexistent.gguf"])
    assert "--kld-depths" not in r.stderr, (example, r.stderr)  # the suggestion parses; the model is what stops it
    assert "'none'" in line  # and how to turn it off


from tests.test_new_user import sw  # noqa: E402,F401  (the sweep through the CLI with fake tools)


def test_a_sweep_says_once_that_it_added_the_baseline_pairs(sw):
    """It said it at the start (stderr) and again, worded differently, among the notes at the end."""
    d = sw.tmp / "r"
    code, out = sw.run("--pairs", "turbo3", "--no-bench", "--out", str(d))
    assert (d / "run.json").is_file(), out
    assert out.count("added the baseline pairs") == 1, out
    assert "added the baseline pairs f16/f16, q8_0/q8_0" in out
    assert "added the baseline pairs" in (d / "summary.md").read_text()  # the report keeps it


@pytest.fixture
def no_builds(tmp_path, monkeypatch):
    """An empty build root and a fork folder that names the turbo types."""
    fork = tmp_path / "fork"
    (fork / "ggml" / "include").mkdir(parents=True)
    (fork / "ggml" / "include" / "ggml.h").write_text("enum ggml_type { GGML_TYPE_TURBO3_0 = 41 };\n")
    monkeypatch.setenv("TURBO_BUILD_ROOT", str(tmp_path / "builds"))
    monkeypatch.setenv("FORK_DIR", str(fork))
    return tmp_path


def test_verify_build_cuda_on_a_cpu_only_machine_says_a_gpu_is_needed(no_builds, monkeypatch):
    """It said only "run `make build` (BACKEND=cuda)", which cannot work there; --target cuda said what is needed."""
    from harness.fork import build as fb
    monkeypatch.setattr(fb, "_nvidia_gpu_present", lambda: False)
    line = _line(CliRunner().invoke(cli, ["verify", "--build", "cuda", "--out", str(no_builds / "r")]))
    assert "not built for cuda" in line and "NVIDIA GPU" in line and "BACKEND=cuda make build" in line, line
    assert "cannot build or run it" in line
    assert not (no_builds / "r" / "run.json").exists()


def test_verify_build_cuda_where_cuda_can_be_built_says_to_build_it(no_builds, monkeypatch):
    from harness.fork import build as fb
    monkeypatch.setattr(fb, "machine_can_build", lambda backend: True)
    line = _line(CliRunner().invoke(cli, ["verify", "--build", "cuda", "--out", str(no_builds / "r")]))
    assert "run `make build` (BACKEND=cuda)" in line and "cannot build" not in line, line


def test_machine_can_build_follows_the_machine(monkeypatch):
    from harness.fork import build as fb
    monkeypatch.setattr(fb, "_nvidia_gpu_present", lambda: False)
    assert fb.machine_can_build("cpu") and fb.machine_can_build("vulkan") and not fb.machine_can_build("cuda")
    monkeypatch.setattr(fb, "_nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(fb.shutil, "which", lambda name: "/usr/bin/" + name)
    assert fb.machine_can_build("cuda")
