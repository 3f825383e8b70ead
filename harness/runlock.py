"""One writer per run folder: a run holds an exclusive lock on its ``--out`` folder while it reads, merges and
writes the report there (issue 22: two runs into one folder both said PASS, run.json kept only the second's checks).

The lock is ``fcntl.flock`` on ``<folder>/.turbo-harness.lock`` (a POSIX advisory lock the kernel releases when
the process ends, however it ends); the file holds the holder's PID so that a second run can name it, and it is
removed when the lock is released. A second run does not wait: it stops at once with one line naming the holder
(exit 2), before anything slow starts. The usual lock-file pattern keeps removal safe: a process that locked a
file someone removed meanwhile (its inode is no longer the path's) drops it and tries again.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import os
from pathlib import Path

from harness.errors import HarnessError

LOCK_NAME = ".turbo-harness.lock"


class Locked(HarnessError):
    """Another process holds the run folder (the message names its PID)."""


_HELD: dict[str, tuple[int, list[Path]]] = {}  # resolved folder -> (fd holding its lock, folders acquire() made)


def _open_locked(path: Path, option: str, run_dir: Path) -> int:
    """An fd of ``path`` holding its exclusive lock. Raises Locked / HarnessError (see :func:`acquire`)."""
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise HarnessError(f"{option} {run_dir}: cannot create its lock file ({e.strerror}): give a writable "
                               f"folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise Locked(f"{option} {run_dir} is being written by another turbo-harness run (PID "
                             f"{holder or 'unknown'}): wait until it ends, or give another {option} folder") from None
            raise HarnessError(f"{option} {run_dir}: cannot lock it ({e.strerror}): give a folder on a local "
                               f"disk") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file between our open and our lock: try the new one
    raise HarnessError(f"{option} {run_dir}: its lock file keeps changing: give another {option} folder")


def acquire(run_dir: Path, option: str = "--out") -> None:
    """Lock ``run_dir`` for this process (created when missing); a second call for the same folder in this
    process is a no-op. Released by :func:`release`, when the Click command ends, or when the process ends.

    Raises:
        Locked: another process holds the folder (one line naming its PID and the fix).
        HarnessError: the lock file cannot be created (an unwritable folder).
    """
    key = str(Path(run_dir).resolve())
    if key in _HELD:
        return
    made = [a for a in [Path(key), *Path(key).parents] if not a.exists()]
    try:
        Path(key).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HarnessError(f"{option} {run_dir} cannot be created ({e.strerror}): give a writable folder") from None
    try:
        fd = _open_locked(Path(key) / LOCK_NAME, option, Path(run_dir))
    except HarnessError:
        _remove_made(made)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = (fd, made)
    import click
    ctx = click.get_current_context(silent=True)
    if ctx is not None:  # a command ends: its folder is free for the next command of the same process (tests)
        ctx.call_on_close(lambda: release(key))


def _remove_made(made: list[Path]) -> None:
    """Remove the folders acquire() made when nothing was written into them (a refused command leaves none)."""
    for a in made:
        try:
            a.rmdir()
        except OSError:
            return


def release(run_dir: Path | str) -> None:
    """Unlock ``run_dir`` if this process holds it: the lock file is removed first, then the lock dropped."""
    key = str(Path(run_dir).resolve())
    held = _HELD.pop(key, None)
    if held is None:
        return
    fd, made = held
    try:
        try:
            os.unlink(Path(key) / LOCK_NAME)
        except OSError:
            pass
        _remove_made(made)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def held_elsewhere(run_dir: Path | str) -> bool:
    """True while another live process holds ``run_dir``'s lock (a run still writing it); False when nobody does, or
    this process does. The test takes a shared lock on the lock file for an instant: the kernel drops a holder's lock
    however it ended, so a lock file left by a killed run is free (:mod:`harness.unfinished`)."""
    key = str(Path(run_dir).resolve())
    if key in _HELD:
        return False
    try:
        fd = os.open(Path(key) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False  # no lock file: nobody holds the folder
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # closing drops the instant's shared lock
    return False


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        release(key)
