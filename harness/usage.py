"""Checks of the user's input at the command line's edge, before anything slow starts.

Each raises :class:`~harness.errors.HarnessError` with one line naming the problem and the fix; the
CLI prints it and exits 2.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

from harness.errors import HarnessError
from harness.fork import backends

BACKENDS = backends.names()  # the backend table's names (harness/fork/backends.py)


def writable_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Prove a report can be written at ``path``: create it (with parents), write a file, and remove
    again the folders this created (the command creates them when it writes).

    Raises:
        HarnessError: it is a file, or it cannot be created or written (names the OS reason and the fix).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise HarnessError(f"{option} {p} is a file: give a folder for the report")
    created = [a for a in [p, *p.parents] if not a.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
        for a in created:  # leave no empty folders behind when a later step stops the command
            a.rmdir()
    except OSError as e:
        raise HarnessError(f"{option} {p} cannot be written ({e.strerror or e}): give a folder you can write to, "
                           f"e.g. {option} reports/my-run") from None
    return p


def backend_fix(name: str) -> str:
    """How to get a build with backend ``name`` on this machine or elsewhere (one clause)."""
    if name == "metal" and sys.platform != "darwin":
        return "Metal exists only on macOS with an Apple GPU: run the harness on a Mac (there `make build` builds Metal)"
    if name == "cpu":
        return "build it with `BACKEND=cpu make build`"
    if re.fullmatch(r"rpc\d+", name):
        return ("remote devices come from --rpc HOST:PORT (an rpc-server of the same fork build; README 'Remote "
                "devices'): rpc0 is the first device of the first server")
    spec = backends.find(name)
    hw = spec.hardware if spec is not None else "that hardware"
    return f"on a machine with {hw}, build it with `BACKEND={name} make build`, or leave the option out"


def backend_name(name: str | None, option: str) -> str | None:
    """Lower-cased backend name, or None. Raises HarnessError for a name no build can have."""
    if name is None:
        return None
    n = name.strip().lower()
    if backends.find(n) is None and not re.fullmatch(r"rpc\d+", n):
        raise HarnessError(f"unknown backend {name!r} for {option}: choose from {backends.choices(', ')} "
                           f"(or rpc0, rpc1, ... for the devices of --rpc servers)")
    return n


def unavailable_backend(name: str, present: list[str], option: str) -> HarnessError:
    """The error for a backend that is valid but absent from this build (problem and fix in one line)."""
    return HarnessError(f"{option} {name}: this build has no {name} backend (it has {', '.join(present) or 'none'}); "
                        f"{backend_fix(name)}")
