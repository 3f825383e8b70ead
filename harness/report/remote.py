"""The report's lines about remote devices (ggml RPC, ``--rpc``): read from a run's metadata only."""
from __future__ import annotations


def remote_facts(meta: dict) -> list[tuple[str, str]]:
    """(label, text) lines a report shows about remote devices, from a run's metadata (none without --rpc).

    Says, per remote backend: its endpoint and memory as the server reports them, what a harness-started server
    said it serves (a server started by hand names nothing: ggml RPC does not carry the backend's name), the
    handshake's verdict per type, and anything that happened to the server during the run.
    """
    rpc = (meta.get("target") or {}).get("rpc") if isinstance(meta.get("target"), dict) else None
    if not rpc:
        return []
    hs = meta.get("rpc_handshake") or {}
    out = []
    for name, d in (rpc.get("devices") or {}).items():
        ep = d.get("endpoint")
        started = (rpc.get("started_by_harness") or {}).get(ep)
        serves = ("served by an rpc-server the harness started on this machine: " + ", ".join(started.get("serves") or ["?"])
                  if started else "the remote backend's name, build and hardware are not visible over RPC "
                                  "(record them beside the report)")
        agree = [t for t, r in (hs.get(name) or {}).items() if "not_covered" not in r]
        out.append((f"remote {name}", f"{ep}, {d.get('memory_total_mib', '?')} MiB; {serves}; type handshake: "
                                      f"{'agrees on ' + ', '.join(agree) if agree else 'not run'}"))
    from harness.fork.rpc import collapse_events
    for ev in collapse_events(list(rpc.get("events") or [])):  # reports written before events were collapsed too
        out.append(("remote event", ev))
    return out
