"""CI's strict mode: with the fork present (TURBO_REQUIRE_FORK=1) a fork-dependent test that would skip fails."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

PROBE_TESTS = '''
import pytest
from conftest import skip_or_fail

def test_needs_build():
    skip_or_fail("fork not built in build/cpu")

@pytest.mark.fork
def test_marked_fork_plain_skip():
    pytest.skip("model missing")

def test_unrelated_skip():
    pytest.skip("needs the fork's git history")
'''


def _run(tmp_path: Path, strict: bool, *args: str) -> subprocess.CompletedProcess:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE_TESTS)
    env = {k: v for k, v in os.environ.items() if k != "TURBO_REQUIRE_FORK"}
    if strict:
        env["TURBO_REQUIRE_FORK"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", *args, str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("strict", [False, True])
def test_fork_skips_fail_only_in_strict_mode(tmp_path, strict):
    r = _run(tmp_path, strict)
    if strict:
        assert r.returncode == 1, r.stdout
        assert "2 failed, 1 skipped" in r.stdout and "TURBO_REQUIRE_FORK=1" in r.stdout
    else:
        assert r.returncode == 0, r.stdout
        assert "3 skipped" in r.stdout


def test_skip_reason_names_the_test_not_the_shared_skip_function(tmp_path):
    """Issue 23: `pytest -rs` pointed 12 skips at tests/conftest.py:21 (skip_or_fail); each now names its test."""
    r = _run(tmp_path, False, "-rs")
    skips = [ln for ln in r.stdout.splitlines() if ln.startswith("SKIPPED")]
    assert len(skips) == 3, r.stdout
    assert not any("conftest.py" in ln for ln in skips), skips
    line = PROBE_TESTS.splitlines().index("def test_needs_build():") + 1
    assert any(f"test_probe.py:{line}: fork not built in build/cpu" in ln for ln in skips), skips
