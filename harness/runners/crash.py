"""Who is at fault when a fork process dies: classify an exit (signal, abort message, AddressSanitizer report,
hang) so that a check can say FAIL for the fork's crash and ERROR for what the harness could not measure.

Spec "Who is at fault decides FAIL or ERROR": the fork's code crashing, aborting or tripping a sanitizer on a
configuration it accepted is a FAIL quoting the signal and the message; a run killed by the harness's timeout
(a hang, or a timeout set too short) is an ERROR with that reason, never a pass.
"""
from __future__ import annotations

import re
import signal as _signal
from dataclasses import dataclass

_ASAN = re.compile(r"ERROR: (Address|Memory|Thread|Leak|UndefinedBehavior)Sanitizer: ?(.*)")
_ASAN_FRAME = re.compile(r"#\d+ 0x[0-9a-f]+ in (\S+) (\S+)")
_ABORT_LINES = [re.compile(p) for p in (r"GGML_ASSERT\(.*\) failed", r"GGML_ABORT", r"\bfatal error\b",
                                         r"terminate called", r"what\(\):", r"Assertion .* failed",
                                         r"Segmentation fault", r"stack smashing detected", r"double free",
                                         r"free\(\): invalid", r"malloc\(\): ")]


@dataclass
class Crash:
    """How a process died.

    Attributes:
        kind: 'asan' (sanitizer report), 'abort' (SIGABRT or an abort message), 'segfault' (SIGSEGV/SIGBUS),
            'signal' (another signal) or 'hang' (killed by the harness's timeout).
        signal: signal name ('SIGABRT') when a signal ended it, else ''.
        message: the fork's own line (assert, sanitizer headline with its first frame), or what is known.
    """

    kind: str
    signal: str
    message: str

    @property
    def fork_fault(self) -> bool:
        """True for a crash of the fork's code (FAIL); False for a hang killed by the harness (ERROR)."""
        return self.kind != "hang"

    def describe(self) -> str:
        """One line: 'aborted (SIGABRT): GGML_ASSERT(...) failed' / 'hung: timed out after 60 s (killed)'."""
        what = {"asan": "AddressSanitizer report", "abort": "aborted", "segfault": "segmentation fault",
                "signal": "killed by a signal", "hang": "hung"}[self.kind]
        sig = f" ({self.signal})" if self.signal else ""
        return f"{what}{sig}: {self.message}"


def signal_name(rc: int | None) -> str:
    """'SIGABRT' for rc -6 (Popen) or 134 (a shell's 128+6); '' for a normal exit status."""
    if rc is None:
        return ""
    n = -rc if rc < 0 else (rc - 128 if 128 < rc < 160 else 0)
    if n <= 0:
        return ""
    try:
        return _signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _fork_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pat in _ABORT_LINES:
        for ln in lines:
            if pat.search(ln):
                return ln[:300]
    return ""


def asan_report(text: str) -> str:
    """Headline of a sanitizer report with its first frame ('stack-buffer-overflow on address ... in
    quantize_row_turbo4_0_ref ggml-turbo-quant.c:123'), or '' when the text holds none."""
    m = _ASAN.search(text)
    if not m:
        return ""
    kind = re.sub(r" on (unknown )?address 0x[0-9a-f]+.*", "", m.group(2).strip())  # addresses differ run to run
    head = f"{m.group(1)}Sanitizer: {kind}"
    frame = _ASAN_FRAME.search(text[m.end():])
    summary = re.search(r"SUMMARY: \w+Sanitizer: (.*)", text)
    where = f" in {frame.group(1)} {frame.group(2)}" if frame else (f" ({summary.group(1).strip()})" if summary else "")
    return (head + where)[:300]


def classify(rc: int | None, timed_out: bool, text: str, timeout_s: float | None = None) -> Crash | None:
    """The crash an exit shows, or None for a process that exited by itself without a crash sign.

    Args:
        rc: exit status (negative: killed by that signal; None: did not exit).
        timed_out: the harness killed it after its timeout.
        text: its stdout and stderr.
    A sanitizer report wins over everything (ASan exits with status 1 after printing it); a signal or a
    ggml abort message is an abort/segfault; a timeout is a hang. A clean non-zero exit (an error message
    and exit 1) is not a crash: the caller decides whether it is a refusal or a failure.
    """
    rep = asan_report(text)
    if rep:
        return Crash("asan", signal_name(rc), rep)
    if timed_out:
        return Crash("hang", "", f"timed out after {timeout_s:.0f} s (killed)" if timeout_s else "timed out (killed)")
    sig = signal_name(rc)
    line = _fork_line(text)
    if sig in ("SIGSEGV", "SIGBUS"):
        return Crash("segfault", sig, line or "no message")
    if sig == "SIGABRT" or (rc not in (0, None) and re.search(r"GGML_ASSERT|GGML_ABORT|terminate called", line or "")):
        return Crash("abort", sig, line or "no message")
    if sig:
        return Crash("signal", sig, line or "no message")
    return None


_PROBE_CRASH = re.compile(r"fork code crashed in probe call (\S+) \((signal (\d+)(?: \(\w+\))?|exit code (-?\d+))\): (.*)")
_PROBE_EXIT = re.compile(r"the probe worker exited \(exit code (-?\d+)\) during call (\S+?):? (.*)")


def classify_probe_message(msg: str, sanitized: bool = False) -> Crash | None:
    """The crash named by a probe worker's message (harness.fork.probe.ProbeCrash text), or None.

    'fork code crashed in probe call set_rows (signal 11 (SIGSEGV)): ...' is a segfault of the fork's code
    (FAIL); 'probe call x timed out after 600 s and was killed' is a hang (ERROR). 'the probe worker exited
    (exit code 1) during call x' is the harness's side, except under a sanitizer (``sanitized``), whose
    report ends the process with exit code 1: then it is the fork's crash.
    """
    if re.search(r"probe call \S+ timed out", msg):
        return Crash("hang", "", msg[msg.index("probe call"):])
    m = _PROBE_CRASH.search(msg)
    if not m:
        rep = asan_report(msg)
        if rep:
            return Crash("asan", "", rep)
        e = _PROBE_EXIT.search(msg)
        if e and sanitized:
            return Crash("asan", "", f"the worker exited with code {e.group(1)} after a sanitizer report (probe call {e.group(2)})")
        return None
    rest = m.group(5)
    rep = asan_report(rest) or ("AddressSanitizer" in rest and rest)
    if rep:
        return Crash("asan", "", f"{rep} (probe call {m.group(1)})")
    rc = -int(m.group(3)) if m.group(3) else int(m.group(4))
    c = classify(rc, False, rest)
    if c is None:  # the worker exited with a status but no sign: the fork's code still killed it mid-call
        c = Crash("abort", "", rest)
    c.message = f"{c.message} (probe call {m.group(1)})"
    return c
