"""Interruption (spec "Integrity of a verdict"): SIGINT / SIGTERM during `verify` keep the partial report,
mark it INTERRUPTED with the checks that did not run, and exit 130 / 143 (not 1, the FAIL code)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.interrupt import Interrupted, interruptible
from harness.report.model import Run

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["PQ4", "PQ1", "PQ2", "PQ3", "PQ5", "PQ6", "COMPAT"]  # PQ4 is quick; PQ1 then takes seconds


def start_verify(out: Path) -> subprocess.Popen:
    # the NumPy emulation with every call slowed down (hidden test option), so the run is still going
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "harness.cli", "verify", "--numpy-target", "slow", "--type", "turbo3",
                             "--checks", ",".join(ORDER), "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_verify_marks_the_partial_report(tmp_path, sig, code):
    out = tmp_path / "r"
    p = start_verify(out)
    lines = []
    deadline = time.time() + 120
    try:
        for ln in p.stdout:  # wait until the first check has finished and been written
            lines.append(ln)
            if ln.startswith("PQ4 ") or time.time() > deadline:
                break
        assert any(ln.startswith("PQ4 ") for ln in lines), "".join(lines)
        while not (out / "report.html").is_file() and time.time() < deadline:  # PQ4's reports are written
            time.sleep(0.05)
        time.sleep(1.0)  # PQ1 is running (about 4 s at 50 ms per call)
        p.send_signal(sig)
        rest, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, "".join(lines) + rest
    name = signal.Signals(sig).name
    assert f"interrupted by {name}" in rest
    data = json.loads((out / "run.json").read_text())
    assert data["verdict"] == "INTERRUPTED"
    info = data["interrupted"]
    assert info["signal"] == name and info["exit_code"] == code
    assert info["not_run"] == ORDER[1:] and info["in_progress"] == "PQ1"
    assert [c["id"] for c in data["checks"]] == ["PQ4"]  # what finished is kept
    summary = (out / "summary.md").read_text()
    assert summary.splitlines()[0].endswith("**INTERRUPTED**") and f"**INTERRUPTED** by {name}" in summary
    assert "not run: PQ1, PQ2, PQ3, PQ5, PQ6, COMPAT (PQ1 was running" in summary
    junit = (out / "junit.xml").read_text()
    assert 'name="INTERRUPTED"' in junit and "COMPAT not run" in junit and "<error" in junit
    assert Run.from_dict(data).exit_code() == code  # re-rendering keeps the mark


def test_interruptible_restores_handlers_and_is_a_base_exception():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e:
        with interruptible():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Exception:  # the per-check `except Exception` must not swallow an interruption
                pytest.fail("Interrupted was caught as an Exception")
    assert e.value.exit_code == 143 and e.value.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before



@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one, expected
def test_signal_swallowed_in_a_destructor_is_raised_again():
    # a handler that raises inside a destructor (or weakref callback) only gets "Exception ignored" printed:
    # seen on the real fork, where Ctrl-C during PQ5 let the run finish and exit 1
    from harness.interrupt import raise_if_pending
    carried_on = []

    class Victim:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10000):  # the handler runs here; Python ignores what it raises
                pass

    with pytest.raises(Interrupted) as e:
        with interruptible():
            v = Victim()
            del v
            carried_on.append(True)
            raise_if_pending()  # the pipeline's next safe point
    assert carried_on and e.value.exit_code == 130
