"""How :class:`harness.targets.fork.ForkTarget` runs several ops as one probe call, and explains a failed remote call.

Batches (issue 23): on a GPU a probe call's cost is per call (backend, buffers, synchronisation), not per byte, so the
ops of a check on one device go as one graph in one call (``probe_batch.c``). Each op gets its own answer; when
the call as a whole fails (a fork crash, a hang, a lost rpc-server, an allocation the device refuses) nothing of
it counts, and every op runs again alone, so that a failure lands on the op that fails and the others are still
measured. A batch of n ops may take as long as n single calls may (the time limit is scaled by n).
"""
from __future__ import annotations

import contextlib
import re

import numpy as np

from harness.errors import HarnessError, RemoteLost, Unsupported
from harness.targets.base import attempt, fa_args


@contextlib.contextmanager
def time_limit(probe, seconds: float):
    """Run the enclosed probe calls with ``probe.timeout_s = seconds``, restored afterwards."""
    saved = probe.timeout_s
    probe.timeout_s = seconds
    try:
        yield
    finally:
        probe.timeout_s = saved


def batched(target, backend: str, what: str, ops: list[tuple], single) -> list:
    """Answers of ``ops`` run as one probe ``batch`` call on ``backend``'s device, one per op in order (a value, or
    the exception for that op: Unsupported when the device declines it, HarnessError otherwise).

    Args:
        target: the ForkTarget. ops: [(kind, *the single call's arguments after the device)] (see
            :mod:`harness.fork.probe_worker`). single: ``single(i)`` runs op i alone (raises as the single call does).
    When the batch call fails as a whole (Unsupported, HarnessError, ProbeCrash, RemoteLost), each op runs alone
    through ``single`` and the event is kept in ``target.batch_events`` (the run's per-check costs list it).
    """
    if len(ops) == 1:
        return [attempt(single, 0)]
    try:
        with time_limit(target.probe, target.probe.timeout_s * len(ops)):
            answers = target._remote(backend, what, lambda: target.probe.batch(target.device(backend), ops),
                                     calls=len(ops))
    except (Unsupported, HarnessError) as e:
        target.__dict__.setdefault("batch_events", []).append(f"{backend}: {what} failed as a whole ({str(e)[:200]}); ran its {len(ops)} ops one by one")
        return [attempt(single, i) for i in range(len(ops))]
    if len(answers) != len(ops):  # never take an answer for an op that has none
        raise HarnessError(f"probe batch {what}: {len(answers)} answers for {len(ops)} ops")
    return [v if s == "ok" else (Unsupported if s == "unsupported" else HarnessError)(v) for s, v in answers]


def quantize_many(target, backend: str, route: str, items: list) -> list:
    """:meth:`harness.targets.base.Target.quantize_many` for a fork device: set_rows items as one batch."""
    items = [(t, np.ascontiguousarray(x, np.float32)) for t, x in items]
    return batched(target, backend, f"set_rows batch of {len(items)} ({', '.join(dict.fromkeys(t for t, _ in items))})",
                   [("set_rows", t, x) for t, x in items], lambda i: target.quantize(backend, route, *items[i]))


def flash_attn_many(target, backend: str, calls: list[dict]) -> list:
    """:meth:`harness.targets.base.Target.flash_attn_many` for a fork device: the calls as one batch."""
    args = [fa_args(c) for c in calls]
    ops = [("flash_attn", a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], float(a[9]), bool(a[10]), bool(a[11]),
            int(a[12]), bool(a[13])) for a in args]
    pairs = ", ".join(dict.fromkeys(f"{a[0]}/{a[2]}" for a in args))
    return batched(target, backend, f"flash_attn batch of {len(calls)} ({pairs})", ops,
                   lambda i: target.flash_attn(backend, *args[i]))


def re_unsupported(line: str) -> bool:
    """True when a server's last message says its backend cannot run an op or type (ggml-cuda's 'op not
    supported', 'Unsupported type', a missing kernel), as opposed to a crash."""
    return bool(re.search(r"not supported|unsupported|not implemented|no kernel", line or "", re.I))


def remote_failure(target, backend: str, ep: str, what: str, said: str, limit_s: float) -> Exception:
    """The exception for a failed call on a remote device (see ``ForkTarget._remote``); restarts a server the
    harness started when it died, so that the next cell finds it again. ``limit_s``: the call's time limit."""
    from harness.runners.rpc_server import reachable
    server = target.rpc_servers.get(ep)
    timed_out = "timed out" in said

    def restart() -> str:
        if server.starts > target.rpc_restarts:
            return f"; not restarted (restarted {target.rpc_restarts} times already)"
        try:
            server.start()
            return "; restarted it for the next cells"
        except HarnessError as e:
            return f"; restarting it failed: {e}"
    if server is not None and timed_out and server.alive():  # a hung server of ours: ended, so the next cell runs
        server.kill()
        msg = (f"remote {backend}: {what} on the rpc-server at {ep} took longer than {limit_s:g} s; "
               f"the server was killed{restart()}")
        target.rpc_events.append(msg)
        return RemoteLost(msg)
    if server is not None and not server.settle(3.0):
        line = server.last_line() or "no message"
        state = server.exit_text()
        again = restart()
        target.rpc_events.append(f"{backend} ({ep}): the rpc-server died ({state}) during {what}: {line}{again}")
        if re_unsupported(line):
            return Unsupported(f"remote {backend} ({ep}) cannot run {what}: the server said '{line}' and exited ({state})")
        return RemoteLost(f"remote {backend}: the rpc-server at {ep} died ({state}) during {what}: {line}{again}")
    if timed_out:
        msg = f"remote {backend}: {what} on the rpc-server at {ep} took longer than {limit_s:g} s and was stopped"
    elif reachable(ep):
        msg = (f"remote {backend}: the rpc-server at {ep} closed the connection during {what} (it rejected the "
               f"request or its backend failed: its own log says why); client said: {said[:200]}")
    else:
        msg = (f"remote {backend}: lost the connection to the rpc-server at {ep} during {what}: it is no longer "
               f"reachable (stopped, crashed, or the SSH tunnel closed)")
    target.rpc_events.append(msg)
    return RemoteLost(msg)
