"""One writer per run folder: a run holds an exclusive lock on its ``--out`` folder while it reads, merges and
writes the report there (issue 22: two runs into one folder both said PASS, run.json kept only the second's checks).

The lock is ``fcntl.flock`` on ``<folder>/.turbo-harness.lock`` (POSIX advisory lock, released by the kernel when
the process ends, however it ends); the file holds the holder's PID so that a second run can name it. A second
run does not wait: it stops at once with one line naming the holder (exit 2), before anything slow starts.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import os
from pathlib import Path

from harness.errors import HarnessError

LOCK_NAME = ".turbo-harness.lock"
_HELD: dict[str, int] = {}  # resolved folder -> open file descriptor holding its lock (this process)
_MADE: dict[str, list[Path]] = {}  # resolved folder -> the folders acquire() created for it (removed again if left empty)


def _remove_made(lock: Path, made: list[Path]) -> None:
    """Remove the lock file and the folders acquire() made when nothing else was written into them (a command
    refused after the lock leaves no empty folder behind)."""
    if not made:
        return
    try:
        if [p.name for p in lock.parent.iterdir()] == [LOCK_NAME]:
            lock.unlink()
            for a in made:
                a.rmdir()
    except OSError:
        pass


def acquire(run_dir: Path, option: str = "--out") -> None:
    """Lock ``run_dir`` (an existing, writable folder) for this process; a second call for the same folder in this
    process is a no-op. Released by :func:`release`, when the Click command ends, or when the process ends.

    Raises:
        HarnessError: another process holds the folder (one line naming its PID and the fix).
    """
    key = str(Path(run_dir).resolve())
    if key in _HELD:
        return
    path = Path(key) / LOCK_NAME
    made = [a for a in [Path(key), *Path(key).parents] if not a.exists()]
    try:
        Path(key).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise HarnessError(f"{option} {run_dir}: cannot create its lock file ({e.strerror}): give a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = ""
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        except OSError:
            pass
        os.close(fd)
        _remove_made(path, made)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise HarnessError(f"{option} {run_dir} is being written by another turbo-harness run "
                               f"(PID {holder or 'unknown'}): wait until it ends, or give another {option} folder") from None
        raise HarnessError(f"{option} {run_dir}: cannot lock it ({e.strerror}): give a folder on a local disk") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd
    _MADE[key] = made
    import click
    ctx = click.get_current_context(silent=True)
    if ctx is not None:  # a command ends: its folder is free for the next command of the same process (tests)
        ctx.call_on_close(lambda: release(key))


def release(run_dir: Path | str) -> None:
    """Unlock ``run_dir`` if this process holds it (the lock file stays; it is empty of meaning when unlocked)."""
    key = str(Path(run_dir).resolve())
    fd = _HELD.pop(key, None)
    if fd is not None:
        try:
            _remove_made(Path(key) / LOCK_NAME, _MADE.pop(key, []))
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        release(key)
