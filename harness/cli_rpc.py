"""The command line's remote-device options (``--rpc``, ``--rpc-local``, ``--rpc-timeout``) for verify and check.

``--rpc HOST:PORT[,...]`` adds the devices of rpc-servers someone started (on this machine, or at the local
end of an SSH tunnel); ``--rpc-local DEVICE[,...]`` starts this build's own rpc-server on 127.0.0.1 serving
those ggml devices (e.g. CPU, CUDA0) and adds it the same way: a loopback check of the RPC path, where the
harness also reads the server's log (a failure is explained with the server's own message and the server
is restarted for the next cell).
"""
from __future__ import annotations

import math

import click

from harness.cli_types import CommaList, Seconds
from harness.errors import HarnessError
from harness.fork import build as fb
from harness.fork import rpc as R

RPC_OPTIONS = [
    click.option("--rpc", "rpc", default=None, metavar="HOST:PORT[,...]", type=CommaList("HOST:PORT", check=R.parse_endpoints),
                 help="also check the devices of these rpc-servers (same fork build; ggml RPC): they join the matrix "
                      "as rpc0, rpc1, ... (--target rpc0 makes one the production target); README 'Remote devices'"),
    click.option("--rpc-local", "rpc_local", default=None, metavar="DEVICE[,...]", type=CommaList("ggml device"),
                 help="start this build's rpc-server on 127.0.0.1 serving these ggml devices (e.g. CPU, CUDA0) and "
                      "check them over RPC"),
    click.option("--rpc-timeout", "rpc_timeout", type=Seconds(0.0), default=120.0, show_default=True,
                 help="seconds one call on a remote device may take before it is stopped"),
]


class RpcOptions:
    """The parsed remote-device options of one command, and the servers it started.

    Args:
        rpc: the ``--rpc`` value (None: none). rpc_local: the ``--rpc-local`` value (None: none).
        rpc_timeout: seconds per remote call (> 0).
    """

    def __init__(self, rpc: str | None, rpc_local: str | None, rpc_timeout: float = 120.0):
        self.raw, self.local_raw, self.timeout = rpc, rpc_local, float(rpc_timeout)
        self.endpoints: list[str] = []
        self.local_devices: list[str] = []
        self.servers: dict = {}

    @property
    def active(self) -> bool:
        """True when --rpc or --rpc-local was given at all (an empty value is given, and refused by validate)."""
        return self.raw is not None or self.local_raw is not None

    def validate(self, numpy_target: bool = False) -> None:
        """Check the values before anything starts; print the security warning for non-loopback servers.

        Raises:
            HarnessError: a malformed HOST:PORT, a timeout <= 0, or remote devices asked of a NumPy target.
        """
        if not self.active:
            return
        if numpy_target:
            raise HarnessError("--rpc/--rpc-local need a fork build (remote devices are ggml devices): leave out --numpy-target")
        if not math.isfinite(self.timeout) or self.timeout <= 0:  # nan compares false: it would mean no limit
            raise HarnessError(f"--rpc-timeout {self.timeout:g}: give a finite number of seconds above 0 (default 120)")
        self.endpoints = R.parse_endpoints(self.raw)
        if self.local_raw is not None:
            self.local_devices = [d.strip() for d in self.local_raw.split(",") if d.strip()]
            if not self.local_devices:
                raise HarnessError(f"--rpc-local {self.local_raw!r} names no device: give ggml device names, e.g. "
                                   f"--rpc-local CPU or --rpc-local CUDA0")
        warn = R.security_warning(self.endpoints)
        if warn:
            click.echo(f"warning: {warn}", err=True)

    def open(self, bdir, fork):
        """Start the --rpc-local server (if any) and open the fork target with every endpoint.

        Raises:
            HarnessError: the build has no RPC backend, the local server did not start, or a server is unreachable.
        """
        from harness.runners.rpc_server import RpcServer
        from harness.targets.fork import ForkTarget
        if not fb.has_rpc(bdir):
            raise HarnessError(f"--rpc needs a build with ggml's RPC backend, and {bdir} has none: rebuild it with "
                               f"`turbo-harness build --rpc` (or `make build RPC=1`)")
        endpoints = list(self.endpoints)
        if self.local_devices:
            server = RpcServer(fb.binary(bdir, "rpc-server"), devices=self.local_devices,
                               log_path=bdir / "rpc-server-logs" / "rpc-server.log").start()
            self.servers[server.endpoint] = server
            endpoints.append(server.endpoint)
            click.echo(f"started {' '.join(server.command()[-8:])} ({', '.join(server.served_devices()) or 'devices: see its log'})")
        target = ForkTarget(bdir, fork, rpc=endpoints, rpc_servers=self.servers, rpc_timeout_s=self.timeout)
        try:
            target.backends()
        except HarnessError:
            target.close()
            raise
        return target

    def handshake(self, target, types: list[str], log) -> dict:
        """The type handshake (:func:`harness.targets.rpc.handshake`); returns report metadata."""
        from harness.targets.rpc import handshake
        return {"rpc_handshake": handshake(target, types, log=log)}

    def record_events(self, run, target, run_dir) -> None:
        """Put the remote servers' events of the run (deaths, restarts, lost connections) into the report's
        metadata and rewrite the report (the metadata was taken before the first check)."""
        from harness.report.render import write_all
        events = R.collapse_events(list(getattr(target, "rpc_events", [])))
        rpc_meta = (run.meta.get("target") or {}).get("rpc")
        if events and isinstance(rpc_meta, dict):
            rpc_meta["events"] = events
            for line in events:
                click.echo(f"remote: {line}", err=True)
            write_all(run, run_dir)

    def close(self) -> None:
        """Stop the servers this command started."""
        for s in self.servers.values():
            s.stop()
        self.servers = {}
