"""How every backend was examined (spec "Every backend, and how it was examined"): a table per backend x type x op,
and the one line the verdict line adds (executed / source on the host / audited only / not examined).

An op of a type counts as examined on a backend only where a cell of this run measured it there (PASS, PARTIAL or
FAIL: :func:`measured`); where its cells were SKIP or ERROR the row says 'not examined' with their reason. The modes
come from the backends themselves (:attr:`harness.targets.base.Backend.mode`: 'executed', 'software' for
a conformant software driver, 'source' for device code run on the host) and from what the source audit found; a
backend of the backend table that neither ran nor was audited is 'not examined', with the reason. No cell is blank.
Used by the AUDIT check (:mod:`harness.checks.audit`), which returns the table.
"""
from __future__ import annotations

import re

from harness.fork import backends as BT
from harness.report.model import Table
from harness.targets.base import MODES

OPS = ("quantize", "decode", "rotation", "attention")
COLUMNS = ["backend", "type", "op", "examined"]


# the op a cell's route examines ('vulkan:set_rows' quantises; 'cpu:to_float' decodes); other routes (traits, source,
# placement) examine no op of this table
ROUTE_OPS = {"set_rows": "quantize", "quantize_chunk": "quantize", "to_float": "decode", "cpy": "decode",
             "get_rows": "decode", "fa_decode": "decode", "decode": "decode", "dequant": "decode", "dequant_t4": "decode",
             "turbo_wht": "rotation", "flash_attn": "attention"}
_MEASURED = ("PASS", "PARTIAL", "FAIL")


def measured(done: dict) -> dict:
    """What the run's cells measured, per (backend, type, op).

    Args:
        done: {check id: [Cell]} of the checks already in the report (:attr:`harness.checks.common.Context.done`).
    Returns:
        {(backend, type or 'all', op): {'routes': set of routes with a measured verdict (PASS, PARTIAL, FAIL: a crash
        on an accepted op is measured too), 'why': the first SKIP/ERROR caveat}}. A path of several parts
        ('cpu:set_rows x vulkan:set_rows', 'vulkan:set_rows -> cpu:flash_attn') counts for each part; a pair type
        ('q8_0/turbo4', PQ6) for each of its types.
    """
    out: dict = {}
    for cells in done.values():
        for c in cells:
            types = str(c.type).split("/")
            for part in re.split(r" x | -> ", c.path or ""):
                backend, _, route = part.partition(":")
                op = ROUTE_OPS.get(route.split("[", 1)[0])
                if not op:
                    continue
                for t in types:
                    e = out.setdefault((backend, t, op), {"routes": set(), "why": ""})
                    if c.verdict.value in _MEASURED:
                        e["routes"].add(route.split("[", 1)[0])
                    elif not e["why"]:
                        e["why"] = (c.caveat or c.verdict.value)[:160]
    return out


def _op_mode(ctx, b, t: str, op: str, seen: dict) -> str:
    """How op ``op`` of type ``t`` was examined on backend ``b``: by the cells that measured it (``seen``,
    :func:`measured`), never by the routes the backend offers alone (Vulkan offers cpy for every type but reads only
    turbo3 on fork 69d8e4be4)."""
    label = f"{b.mode_label} as {b.name}" if b.name != b.family else b.mode_label
    e = seen.get((b.name, t, op)) or (seen.get((b.name, "all", op)) if op == "rotation" else None)
    if e and e["routes"]:
        return label if op in ("rotation", "attention") else f"{label}: {', '.join(sorted(e['routes']))}"
    r = ctx.target.routes(b.name)
    if op == "attention" and not r.attention:
        return f"{MODES['none']}: {getattr(r, 'attention_note', '') or 'no flash attention'}"
    if e and e["why"]:
        return f"{MODES['none']} on {b.name}: {e['why']}"
    return f"{MODES['none']} on {b.name}: no check of this run measured it"


def examination(ctx, audited: dict[str, set]) -> Table:
    """The examination table.

    Args:
        ctx: the run context (its backends and their routes).
        audited: {backend family: {turbo types whose tables were found in its source}} from the source audit.
    Returns:
        Table 'examination' (caption: the verdict line's summary, :func:`summary_line`).
    """
    seen = measured(getattr(ctx, "done", {}) or {})
    ran = {}
    for b in ctx.backends():
        ran.setdefault(b.family, []).append(b)
    families = list(BT.names()) + sorted(f for f in set(ran) | set(audited) if f not in BT.names() and f != "common")
    rows = []
    for fam in families:
        for t in ctx.types:
            for op in OPS:
                parts = [_op_mode(ctx, b, t, op, seen) for b in ran.get(fam, [])]
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
