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
            acknowledge()            # later signals wait for the report to be written
            raise                    # the CLI exits with e.exit_code
    # and call raise_if_pending() between jobs: a signal that fired inside a destructor is not lost
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from contextvars import ContextVar

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


# The state of the innermost interruptible() block: the signal that arrived and whether a pipeline has
# caught it. Context-local (set and reset by the block), not module state. A handler that raises can fire
# inside a destructor or weakref callback, where Python prints the exception and carries on: the run
# would then go on as if nothing happened. raise_if_pending() at safe points (between checks, around
# each cell) raises it again until the pipeline acknowledges it.
_STATE: ContextVar[dict | None] = ContextVar("turbo_interrupt_state", default=None)


def raise_if_pending() -> None:
    """Raise :class:`Interrupted` again when a signal arrived inside :func:`interruptible` and its
    exception has not reached a pipeline yet (it was swallowed where Python ignores exceptions)."""
    st = _STATE.get()
    if st is not None and st["pending"] is not None and not st["acknowledged"]:
        raise Interrupted(st["pending"])


def acknowledge() -> None:
    """Called by the pipeline that caught :class:`Interrupted`: later signals are ignored while it
    writes the partial report (until the :func:`interruptible` block ends)."""
    st = _STATE.get()
    if st is not None:
        st["acknowledged"] = True


@contextmanager
def interruptible(signals=SIGNALS):
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (again at each
    :func:`raise_if_pending` until a pipeline calls :func:`acknowledge`; after that they are ignored
    so that writing the partial report is not cut short). The previous handlers are restored on exit.
    Off the main thread (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    st = {"pending": None, "acknowledged": False}

    def handler(signum, frame):
        if st["acknowledged"]:
            return
        if st["pending"] is None:
            st["pending"] = signum
        raise Interrupted(st["pending"])

    token = _STATE.set(st)
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _STATE.reset(token)


@contextmanager
def deferred(signals=SIGNALS):
    """Within the block SIGINT and SIGTERM are recorded, not raised: the teardown after the last check (closing
    the target, writing the final report) runs to its end, and the caller marks the report INTERRUPTED when
    ``state['pending']`` (the first signal number, or None) is set, so that exit code and report agree.
    The previous handlers are restored on exit, unless :func:`hold_until_exit` was called inside the block.
    Off the main thread it only yields the state."""
    st: dict = {"pending": None, "hold": False}
    if threading.current_thread() is not threading.main_thread():
        yield st
        return

    def handler(signum, frame):
        if st["pending"] is None:
            st["pending"] = signum
    previous = {s: signal.signal(s, handler) for s in signals}
    _DEFERRED.set(st)
    try:
        yield st
    finally:
        if not st["hold"]:
            for s, h in previous.items():
                signal.signal(s, h)
        _DEFERRED.set(None)


_DEFERRED: ContextVar[dict | None] = ContextVar("turbo_deferred_state", default=None)
# set by the console entry point (harness.cli.main): the process ends right after the command, so signals that
# arrive once the final report is written are ignored to the end (exit code and report already agree)
STANDALONE = {"on": False}


def hold_until_exit() -> None:
    """Called once the final report is written and its exit code decided: in the console program, signals that
    arrive from now on are ignored until the process ends (a SIGINT after the 'report:' line must not turn a
    PASS report into exit 130). Under a test runner (not the console program) it does nothing."""
    if not STANDALONE["on"] or threading.current_thread() is not threading.main_thread():
        return
    st = _DEFERRED.get()
    if st is not None:
        st["hold"] = True  # the deferred block must not put its handlers back
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
