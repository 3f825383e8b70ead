"""Exceptions whose message is one line the CLI prints as it is (and exits 2)."""


class HarnessError(Exception):
    """A problem the user can fix; ``str(e)`` names the problem and the fix in one line."""


class ProbeCrash(HarnessError):
    """The native probe's worker process died (ggml abort, segfault) during a call."""


class Unsupported(Exception):
    """The device or fork build does not support the requested op (becomes a SKIP/not-covered cell)."""


class RemoteLost(HarnessError):
    """A remote device (ggml RPC) could not be measured: its server died, closed the connection, timed out or
    is unreachable. An ERROR cell naming the server and its last message, never a hang and never a PASS."""
