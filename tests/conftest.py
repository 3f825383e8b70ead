"""Shared fixtures. Tests that need a built fork skip with the reason when it is absent."""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

import pytest

from harness.checks.common import Context, load_thresholds
from harness.fork import build as fb

# The suite runs one worker per core (pytest_cmdline_main below), and the fork's tools, the probe and the workers share
# the cores: idle OpenMP threads of the tools sleep instead of spinning against the other workers (set before any tool
# starts; the tools inherit it; nothing the tests assert depends on it).
os.environ.setdefault("OMP_WAIT_POLICY", "passive")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The whole suite (no test paths given: the README's, the Makefile's and CI's command) runs one test worker per
    core when pytest-xdist is installed (the dev extra), as if ``-n auto`` were given: most tests wait on the fork's
    tools or run NumPy on one core. Given paths run in one process (the workers' start-up would cost more than they
    save); ``-n N`` (``-n 0``: one process), ``--pdb`` or ``-p no:xdist`` choose otherwise; without xdist everything
    runs in one process. Runs before xdist's own hook (a conftest's hook of the same priority is called first), which
    then starts the workers."""
    opt = config.option
    if (config.pluginmanager.hasplugin("xdist") and getattr(opt, "numprocesses", None) is None
            and config.args_source == pytest.Config.ArgsSource.TESTPATHS
            and not hasattr(config, "workerinput") and not getattr(opt, "usepdb", False)
            and not getattr(opt, "collectonly", False)):
        opt.numprocesses = "auto"
        if getattr(opt, "dist", "no") == "no":
            # tests are handed out two at a time, in order, to whichever worker is free: the slow ones (first in the
            # order) spread over the workers instead of queueing on one, as xdist's larger first batches would
            opt.dist, opt.maxschedchunk = "load", 2


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (tens of seconds: the fork's tools on a real model, CI recipes of many commands) run
    first, in their order, the rest after them in theirs: with several workers they overlap the short tests instead of
    ending the run one after another."""
    items[:] = [i for i in items if i.get_closest_marker("slow")] + [i for i in items if not i.get_closest_marker("slow")]


# CI sets this when it has the fork (snapshot or checkout): then a test that needs the built fork or the model
# must run, and a skip for want of them is a failure (see .ci/run).
REQUIRE_FORK = os.environ.get("TURBO_REQUIRE_FORK") == "1"


@contextlib.contextmanager
def repo_install_lock():
    """Held while a test runs a make target that first makes ``install`` in this repository (its .venv): tests in
    parallel workers take turns, so that two pip installs never write the same .venv at once (when it is stale)."""
    with open(Path(tempfile.gettempdir()) / "turbo-harness-test-install.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def skip_or_fail(reason: str):
    """Skip a fork-dependent test with the reason, or fail it when TURBO_REQUIRE_FORK=1 (CI with the fork)."""
    if REQUIRE_FORK:
        pytest.fail(f"fork-dependent test could not run although TURBO_REQUIRE_FORK=1: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under TURBO_REQUIRE_FORK=1 a test marked `fork` that skipped (for any reason) is reported as failed.

    A skip raised in a shared helper (:func:`skip_or_fail`, a fixture here) is reported at the test that skipped
    (``tests/test_x.py:42``), not at the helper's line in conftest.py: ``pytest -rs`` then names the test."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3 \
            and Path(str(rep.longrepr[0])).name == "conftest.py":
        path, line0, _ = item.location
        rep.longrepr = (path, (line0 or 0) + 1, rep.longrepr[2])
    if REQUIRE_FORK and rep.skipped and item.get_closest_marker("fork") is not None:
        rep.outcome = "failed"
        rep.longrepr = f"fork test skipped although TURBO_REQUIRE_FORK=1: {rep.longrepr}"


@pytest.fixture(autouse=True)
def _keep_the_remembered_fork():
    """`unpack-fork` remembers the folder it unpacked (.cache/fork-dir): a test that unpacks a toy snapshot must not
    change which fork the later tests (and the user's next command) find. Restored after every test."""
    from harness.fork.locate import memo_file
    f = memo_file()
    before = f.read_text() if f.is_file() else None
    yield
    after = f.read_text() if f.is_file() else None
    if after != before:
        if before is None:
            f.unlink(missing_ok=True)
        else:
            f.write_text(before)


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
        skip_or_fail(f"no fork checkout ({e})")
    if not fb.has_turbo_types(fork):
        skip_or_fail(f"{fork} has no turbo types")
    bdir = fb.build_dir(os.environ.get("TURBO_TEST_BACKEND", "cpu"))
    if not any((bdir / "bin").glob("libggml-base.*")):
        skip_or_fail(f"fork not built in {bdir}: run `make test-ready` (make test does) to enable the fork tests")
    return bdir, fork


@pytest.fixture(scope="session")
def fork_target():
    bdir, fork = fork_build_or_skip()
    from harness.targets.fork import ForkTarget
    t = ForkTarget(bdir, fork)
    yield t
    t.close()


@pytest.fixture(autouse=True)
def quiet_machine_load(monkeypatch):
    """In-process sweeps see a quiet machine (1-min load 0.5): a speed figure measured above the CPU count is not
    judged (harness.checks.sweep_rules.speed_not_judged), and the verdicts the tests assert must not depend on how
    busy the machine running the suite is. tests/test_speed_judged.py sets the load it tests."""
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))
