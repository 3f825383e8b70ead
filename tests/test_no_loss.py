"""Issue 22, group 2 and the one-line rule of group 3 for unpack-fork: never lose or destroy what the user had.

Each test names the bullet it covers; each failed on the code before the fix (a folder emptied, a traceback,
'Aborted!', two runs in one folder both claiming it, a SIGINT in teardown exiting 130 over a PASS report).
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

from click.testing import CliRunner

from harness.cli import cli


def _snapshot(tmp_path, data: bytes | None = None):
    """A tiny fork snapshot and a README stating its hash; ``data`` replaces the archive bytes (hash follows)."""
    if data is None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tf:
            for path, text in {"llama.cpp/ggml/include/ggml.h": "GGML_TYPE_TURBO3_0 = 42,\n" + "x" * 20000,
                               "llama.cpp/.fork-commit": "a" * 40 + "\n"}.items():
                raw = text.encode()
                ti = tarfile.TarInfo(path)
                ti.size = len(raw)
                tf.addfile(ti, io.BytesIO(raw))
        data = buf.getvalue()
    snap = tmp_path / "forks" / "fork.tar.xz"
    snap.parent.mkdir(parents=True, exist_ok=True)
    snap.write_bytes(data)
    (snap.parent / "README.md").write_text(f"sha256 {hashlib.sha256(data).hexdigest()}\n")
    return snap, data


def _one_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.output and "Aborted!" not in r.output, r.output
    return lines[0]


def test_unpack_fork_never_empties_a_folder_it_did_not_make(tmp_path):
    """2.1: `--dest ~/src` (no stamp) is refused and left as it was."""
    snap, _ = _snapshot(tmp_path)
    dest = tmp_path / "src"
    dest.mkdir()
    (dest / "my-work.c").write_text("precious")
    r = CliRunner().invoke(cli, ["unpack-fork", str(snap), "--dest", str(dest)])
    assert r.exit_code == 2
    assert "did not make" in _one_line(r)
    assert (dest / "my-work.c").read_text() == "precious"


def test_unpack_fork_truncated_archive_keeps_the_earlier_unpack(tmp_path):
    """2.1 + 3.2: a truncated archive whose hash matches leaves the earlier good unpack in place; one line,
    not 'Aborted!'."""
    snap, data = _snapshot(tmp_path)
    dest = tmp_path / "fork"
    assert CliRunner().invoke(cli, ["unpack-fork", str(snap), "--dest", str(dest)]).exit_code == 0
    (dest / "llama.cpp" / "marker").write_text("kept")
    _snapshot(tmp_path, data[: len(data) // 2])  # same file name, truncated, README states its (new) hash
    r = CliRunner().invoke(cli, ["unpack-fork", str(snap), "--dest", str(dest)])
    assert r.exit_code == 2
    assert "truncated" in _one_line(r) or "not a readable" in r.stderr
    assert (dest / "llama.cpp" / "marker").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fork")] == []  # no temporary left behind


def test_unpack_fork_non_xz_file_is_one_line(tmp_path):
    """3.2: a file that is not .tar.xz is one line naming it, not a 67-line traceback."""
    snap, _ = _snapshot(tmp_path, b"this is not an xz archive\n" * 10)
    r = CliRunner().invoke(cli, ["unpack-fork", str(snap), "--dest", str(tmp_path / "d")])
    assert r.exit_code == 2
    assert "fork.tar.xz" in _one_line(r)
    assert not (tmp_path / "d").exists()


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _start(args, **kw):
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_second_run_into_a_locked_folder_stops_naming_the_holder(tmp_path):
    """2.2: a second run into the same --out while the first writes it stops with one line naming the holder's
    PID (exit 2); the first run's checks are all in run.json."""
    import time
    out = tmp_path / "r"
    first = _start(["verify", "--numpy-target", "slow", "--type", "turbo3", "--checks", "PQ4,PQ1", "--out", str(out)])
    try:
        deadline = time.time() + 60
        while not (out / "run.json").is_file() and time.time() < deadline:  # the first run is writing
            time.sleep(0.05)
        second = _start(["check", "PQ4", "--numpy-target", "slow", "--type", "turbo3", "--out", str(out)])
        _, err2 = second.communicate(timeout=60)
        assert second.returncode == 2, err2
        lines = [ln for ln in err2.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"PID {first.pid}" in lines[0], err2
        first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0
    assert sorted(c["id"] for c in json.loads((out / "run.json").read_text())["checks"]) == ["PQ1", "PQ4"]
    # the folder is free again once the first run ended, and no lock file is left in it
    assert not (out / ".turbo-harness.lock").exists()
    r = CliRunner().invoke(cli, ["check", "PQ4", "--numpy-target", "slow", "--type", "turbo3", "--out", str(out)])
    assert r.exit_code == 0, r.output


def test_signal_during_teardown_marks_the_report_interrupted(tmp_path):
    """2.3: a SIGINT that lands in the teardown (closing the target, after every check finished): the exit code and
    run.json agree (130 and INTERRUPTED), never 130 or 1 over a PASS report."""
    import signal
    out = tmp_path / "r"
    p = _start(["check", "PQ4", "--numpy-target", "slowclose", "--type", "turbo3", "--out", str(out)])
    try:
        for ln in p.stderr:
            if "(test) closing the target" in ln:
                break
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    data = json.loads((out / "run.json").read_text())
    assert p.returncode == 130 and data["verdict"] == "INTERRUPTED", (p.returncode, data["verdict"])
    assert data["interrupted"]["signal"] == "SIGINT" and [c["id"] for c in data["checks"]] == ["PQ4"]


def test_unpack_fork_keeps_the_earlier_unpack_when_the_final_move_fails(tmp_path, monkeypatch):
    """2.1: the earlier unpack is moved aside before the new one is moved into place; when that last move failed
    (an OSError), the earlier unpack stayed hidden under a dot-name and the error escaped as a traceback. It is
    put back and the error is one line."""
    from pathlib import Path

    from harness.errors import HarnessError
    from harness.fork import snapshot as S
    snap, _ = _snapshot(tmp_path)
    dest = tmp_path / "fork"
    S.unpack(snap, dest)
    (dest / S.STAMP).write_text("0" * 64 + " an-older.tar.xz\n")  # an earlier unpack of another snapshot
    (dest / "earlier.txt").write_text("earlier unpack")
    real = Path.rename

    def rename(self, target):
        if ".unpacking-" in self.name:
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    try:
        S.unpack(snap, dest)
        raise AssertionError("the failed move was not reported")
    except HarnessError as e:
        assert "No space left" in str(e) or "failed" in str(e)
    assert (dest / "earlier.txt").read_text() == "earlier unpack"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fork.")], list(tmp_path.iterdir())
