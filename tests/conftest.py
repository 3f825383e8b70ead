"""Shared fixtures. Tests that need a built fork skip with the reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.checks.common import Context, load_thresholds
from harness.fork import build as fb


@pytest.fixture(scope="session")
def thresholds():
    return load_thresholds()


@pytest.fixture
def make_ctx(thresholds, tmp_path):
    def make(target, target_backend="cpu", types=("turbo3", "turbo4"), **kw):
        return Context(target=target, target_backend=target_backend, types=list(types), thresholds=thresholds,
                       evidence_dir=tmp_path / "evidence", **kw)
    return make


def fork_build_or_skip() -> tuple[Path, Path]:
    """(build_dir, fork_dir) of a CPU build, or skip with the reason."""
    try:
        fork = fb.fork_dir()
    except Exception as e:
        pytest.skip(f"no fork checkout ({e})")
    if not fb.has_turbo_types(fork):
        pytest.skip(f"{fork} has no turbo types")
    bdir = fb.build_dir(os.environ.get("TURBO_TEST_BACKEND", "cpu"))
    if not any((bdir / "bin").glob("libggml-base.*")):
        pytest.skip(f"fork not built in {bdir}: run `make build` to enable fork tests")
    return bdir, fork


@pytest.fixture(scope="session")
def fork_target():
    bdir, fork = fork_build_or_skip()
    from harness.targets.fork import ForkTarget
    t = ForkTarget(bdir, fork)
    yield t
    t.close()
