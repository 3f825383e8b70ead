"""Interruption of a run by SIGINT or SIGTERM, as one exception a pipeline can catch.

Spec "Integrity of a verdict" / Interruption: an interrupted run keeps its partial report, marks it
INTERRUPTED with the checks or jobs that did not run, and exits 130 (SIGINT) or 143 (SIGTERM),
the shell's 128 + signal number, never 1 (the FAIL code).

Usage (any pipeline: verify, sweep)::

    with interruptible():
        try:
            ...                      # run jobs, write the report after each
        except Interrupted as e:
            ...                      # mark the report, list what did not run
            raise                    # the CLI exits with e.exit_code
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised in the main thread when SIGINT or SIGTERM arrives inside :func:`interruptible`.

    A BaseException, like KeyboardInterrupt, so that the ``except Exception`` that keeps a harness bug
    in one check from killing the run does not swallow it.

    Attributes:
        signum: the signal number; name: e.g. 'SIGINT'; exit_code: 128 + signum (130, 143).
    """

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def interruptible(signals=SIGNALS):
    """Within the block, the first SIGINT or SIGTERM raises :class:`Interrupted`; later ones are ignored
    until the block ends, so writing the partial report is not cut short. The previous handlers are
    restored on exit. Off the main thread (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"fired": False}

    def handler(signum, frame):
        if state["fired"]:
            return
        state["fired"] = True
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
