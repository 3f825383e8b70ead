"""How every backend was examined (spec "Every backend, and how it was examined"): a table per backend x type x op,
and the one line the verdict line adds (executed / source on the host / audited only / not examined).

The modes come from the backends themselves (:attr:`harness.targets.base.Backend.mode`: 'executed', 'software' for
a conformant software driver, 'source' for device code run on the host) and from what the source audit found; a
backend of the backend table that neither ran nor was audited is 'not examined', with the reason. No cell is blank.
Used by the AUDIT check (:mod:`harness.checks.audit`), which returns the table.
"""
from __future__ import annotations

from harness.fork import backends as BT
from harness.report.model import Table
from harness.targets.base import MODES

OPS = ("quantize", "decode", "rotation", "attention")
COLUMNS = ["backend", "type", "op", "examined"]


def _op_mode(ctx, b, op: str) -> str:
    r = ctx.target.routes(b.name)
    label = f"{b.mode_label} as {b.name}" if b.name != b.family else b.mode_label
    if op == "quantize":
        return f"{label}: {', '.join(r.quantize)}" if r.quantize else f"{MODES['none']}: no quantise route"
    if op == "decode":
        reads = list(r.decode[:1]) + list(getattr(r, "readers", []))
        return f"{label}: {', '.join(reads)}" if reads else f"{MODES['none']}: no decode route"
    if op == "rotation":
        return label if r.wht else f"{MODES['none']}: no rotation op"
    return label if r.attention else f"{MODES['none']}: {getattr(r, 'attention_note', '') or 'no flash attention'}"


def examination(ctx, audited: dict[str, set]) -> Table:
    """The examination table.

    Args:
        ctx: the run context (its backends and their routes).
        audited: {backend family: {turbo types whose tables were found in its source}} from the source audit.
    Returns:
        Table 'examination' (caption: the verdict line's summary, :func:`summary_line`).
    """
    ran = {}
    for b in ctx.backends():
        ran.setdefault(b.family, []).append(b)
    families = list(BT.names()) + sorted(f for f in set(ran) | set(audited) if f not in BT.names() and f != "common")
    rows = []
    for fam in families:
        for t in ctx.types:
            for op in OPS:
                parts = [_op_mode(ctx, b, op) for b in ran.get(fam, [])]
                if t in audited.get(fam, set()) and op in ("quantize", "decode", "rotation"):
                    parts.append(MODES["audited"])
                if not parts:
                    why = ("backend not available on this machine/build" if fam in BT.names() else "not in this build")
                    why += "; no tables of this type found in its source" if fam in audited else "; no source of it in the fork"
                    parts.append(f"{MODES['none']}: {why}")
                rows.append([fam, t, op, "; ".join(parts)])
    return Table("examination", "How each backend was examined (backend x type x op)", COLUMNS, rows,
                 caption=[summary_line(ran, audited, families)], scope={"type": "type"})


def summary_line(ran: dict, audited: dict, families: list) -> str:
    """'executed: cpu; source on the host: metal (metal-src); audited from source only: cuda, vulkan; not examined: hip'."""
    by_mode: dict[str, list[str]] = {}
    for fam, bs in ran.items():
        for b in bs:
            by_mode.setdefault(b.mode, []).append(fam if b.name == fam else f"{fam} ({b.name})")
    only_audited = [f for f in families if f in audited and f not in ran]
    none = [f for f in families if f not in ran and f not in audited]
    parts = [f"{MODES.get(m, m)}: {', '.join(v)}" for m, v in by_mode.items()]
    if only_audited:
        parts.append(f"audited from source only: {', '.join(only_audited)}")
    if none:
        parts.append(f"not examined: {', '.join(none)}")
    return "; ".join(parts)
