"""Remote devices through ggml's RPC backend: the ``--rpc HOST:PORT[,HOST:PORT...]`` option.

The fork carries ggml's RPC backend (CMake ``GGML_RPC=ON``, :data:`harness.fork.build.RPC_CMAKE`): a remote
host runs the fork's ``rpc-server`` and its devices join the local ggml registry as ``RPC0``, ``RPC1``, ...
(the order of the endpoints, then each server's devices). The harness calls them ``rpc0``, ``rpc1``, ... and
treats each as one more backend of the writer x reader matrix.

Facts of the fork's RPC code (69d8e4be4, ggml/src/ggml-rpc/ggml-rpc.cpp) this module and its users rely on:
the protocol has no authentication; the client's supports_op answers yes to every op (a TODO there), so the
harness finds out by running; a failed call aborts the client ("Remote RPC server crashed or returned
malformed response") and a failed graph on the server aborts the server; the device type is always GPU
and the device description is the endpoint, so nothing names the remote backend (CUDA, Metal, CPU).
"""
from __future__ import annotations

import ipaddress
import re

from harness.errors import HarnessError

# the probe worker reads the endpoints from this environment variable and adds them to its registry
PROBE_ENV = "TURBO_PROBE_RPC"
RPC_NAME = re.compile(r"^rpc(\d+)$")


def parse_endpoints(value: str | None, option: str = "--rpc") -> list[str]:
    """The endpoints of ``--rpc``: 'HOST:PORT[,HOST:PORT...]' -> ['HOST:PORT', ...] (order kept, repeats dropped).

    HOST is a name or an IPv4 address (the fork's RPC code is IPv4-only: ggml-rpc's parse_endpoint splits at the
    first ':' and transport.cpp opens AF_INET sockets, so an IPv6 address is refused here); PORT is 1..65535.

    Raises:
        HarnessError: an entry is not HOST:PORT (one line naming it and the expected form).
    """
    if value is None:
        return []
    eps = [e.strip() for e in value.split(",") if e.strip()]
    if not eps:
        raise HarnessError(f"{option} {value!r} names no server: give HOST:PORT of an rpc-server, e.g. {option} 127.0.0.1:50052")
    for e in eps:
        if e.startswith("[") or e.count(":") > 1:
            raise HarnessError(f"{option} {e!r}: ggml RPC connects over IPv4 only (the fork's client and rpc-server "
                               f"open AF_INET sockets and split the endpoint at its first ':'): give an IPv4 address "
                               f"or a host name, e.g. {option} 127.0.0.1:50052")
        m = re.fullmatch(r"([A-Za-z0-9_.-]+):(\d+)", e)
        if m and not 0 < int(m.group(2)) < 65536:
            raise HarnessError(f"{option} {e!r}: port {int(m.group(2))} is out of range: give a port from 1 to 65535, "
                               f"e.g. {option} 127.0.0.1:50052")
        if not m:
            raise HarnessError(f"{option} {e!r} is not HOST:PORT: give the address of an rpc-server, e.g. "
                               f"{option} 127.0.0.1:50052 (an SSH tunnel's local end)")
    eps = list(dict.fromkeys(eps))
    same = _same_server(eps)
    if same:
        raise HarnessError(f"{option} {same[0]} and {same[1]} are the same rpc-server (both resolve to {same[2]}): its "
                           f"devices would be compared with themselves; give each server once")
    return eps


def _same_server(eps: list[str]) -> tuple[str, str, str] | None:
    """Two endpoints that name one server (same port, host names resolving to a common IPv4 address), as
    (first, second, 'ADDRESS:PORT'); None when all differ. A name that does not resolve is left to the
    reachability check."""
    import socket
    seen: dict[str, str] = {}
    for e in eps:
        host, port = e.rsplit(":", 1)
        try:
            addrs = {ai[4][0] for ai in socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)}
        except (OSError, UnicodeError):
            addrs = {host}
        for a in sorted(addrs):
            key = f"{a}:{int(port)}"
            if key in seen and seen[key] != e:
                return seen[key], e, key
        for a in addrs:
            seen.setdefault(f"{a}:{int(port)}", e)
    return None


def host_of(endpoint: str) -> str:
    """The host part of 'HOST:PORT' (brackets of an IPv6 address removed)."""
    return endpoint.rpartition(":")[0].strip("[]")


def is_loopback(endpoint: str) -> bool:
    """True for 'localhost', 127.0.0.0/8 and ::1 (what an SSH tunnel's local end looks like)."""
    host = host_of(endpoint)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def security_warning(endpoints: list[str]) -> str | None:
    """The warning printed for endpoints off the loopback interface, or None when all are loopback."""
    far = [e for e in endpoints if not is_loopback(e)]
    if not far:
        return None
    return (f"--rpc {', '.join(far)} is not on this machine's loopback: ggml RPC is unauthenticated and unencrypted "
            f"(anyone who can reach the port can run code on that server and read its memory); bind rpc-server to "
            f"127.0.0.1 there and forward it, e.g. `ssh -N -L 50052:127.0.0.1:50052 user@host`, then use --rpc 127.0.0.1:50052")


def backend_name(device_name: str) -> str:
    """The harness's name of a remote device: ggml's 'RPC0' -> 'rpc0'."""
    return device_name.strip().lower()


def is_rpc_backend(name: str) -> bool:
    """True for the harness's names of remote devices ('rpc0', 'rpc1', ...)."""
    return bool(RPC_NAME.match(name or ""))


def collapse_events(events: list[str]) -> list[str]:
    """The remote servers' events of a run, each kind once: a server lost early makes every later remote call
    fail the same way ('lost the connection ... during set_rows turbo3: ...'), which would bury the first event
    under a hundred copies. Events equal but for the call they happened in ('during ...:') become the first one
    plus how many more calls failed that way; order of first occurrence kept."""
    first: dict[str, int] = {}
    out: list[list] = []
    for line in events:
        key = re.sub(r" during [^:]*:", " during:", line)
        if key in first:
            out[first[key]][1] += 1
        else:
            first[key] = len(out)
            out.append([line, 0])
    return [line if n == 0 else f"{line} (and {n} more remote call{'s' if n > 1 else ''} failed the same way)"
            for line, n in out]


class RegistryJoin:
    """Adds the ``--rpc`` servers to a ggml registry strictly in endpoint order (used by the probe worker).

    ggml names a remote device from a process-wide counter at the moment its server is added ('RPC0' is the
    first device added, whichever server it is on; ggml-rpc.cpp ggml_backend_rpc_add_server), and the harness
    maps 'rpc0' to the first endpoint. A fresh worker that skipped a server that was down and added the next
    one would give that next server's device the name 'RPC0', and once the first server was back (the harness
    restarts the servers it started) every 'rpc0' cell would be measured on the other machine's device. So no
    server is added before every server ahead of it is: a down server blocks the ones after it until it is back.

    Args:
        endpoints: the ``--rpc`` endpoints in order. add: ``add(endpoint) -> str | None`` adds one server's devices
            to the registry and returns None, or the reason it could not.
    """

    def __init__(self, endpoints: list[str], add):
        self.pending = [e for e in endpoints if e]
        self.add = add
        self.down: dict[str, str] = {}
        self.join()

    def join(self) -> bool:
        """Add the pending servers in order, stopping at the first that cannot be added; True when all are in."""
        while self.pending:
            ep = self.pending[0]
            err = self.add(ep)
            if err is not None:
                self.down = {ep: err}
                return False
            self.pending.pop(0)
        self.down = {}
        return True

    def status(self) -> dict[str, str]:
        """{endpoint: why} of the server blocking the rest ({} when every server is in the registry); the servers
        behind it are listed as waiting for it."""
        if not self.pending:
            return {}
        first = self.pending[0]
        out = {first: self.down.get(first, "not added yet")}
        for ep in self.pending[1:]:
            out[ep] = f"not added: it waits for {first} (devices are numbered in endpoint order)"
        return out
