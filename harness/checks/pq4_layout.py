"""PQ4 Layout: type traits, reserved field, reference packing decoded exactly on every path.

Measured (spec PQ4): block size and bytes per block from the build's type traits vs the format;
turbo4's reserved field in bytes written by every quantise path; index patterns packed by the
reference packer and decoded by every decode path (must equal the reference decode exactly);
the fork's own bytes unpacked by the reference and compared with the fork's own decode. The model
KV-bytes part of PQ4 is measured by the sweep (llama's KV-cache lines vs the traits).
"""
from __future__ import annotations

import numpy as np

from harness.checks.contract import Check
from harness.checks.common import Context, decode_route, decode_tolerance, guarded, precise_table, quant_paths
from harness.reference import turbo as T
from harness.report.model import Cell, Verdict

ID, TITLE = "PQ4", "Layout (traits, packing, reserved field)"


def _traits_cell(ctx: Context, t: str) -> list[Cell]:
    info = ctx.target.type_info(t)
    be = ctx.target_backend
    if info is None:
        return [ctx.cell(ID, t, be, "traits", "type_present", 0, 1, Verdict.FAIL, op=">=",
                         caveat=f"the build has no type named {t} (measured: its type traits are absent; nothing crashed)",
                         details={"cause": "missing_type"})]
    layouts = ctx.target.layouts()
    if t in layouts.unknown:
        # the finding: the build's blocks match no layout the reference knows, so every check that
        # reads or writes this type's bytes SKIPs with this reason (never a harness exception)
        ev = ctx.evidence(ID, f"{t}_traits", block_size=info["block_size"], type_size=info["type_size"])
        return [ctx.cell(ID, t, be, "traits", "known_layout", 0, 1, Verdict.FAIL, op=">=",
                         caveat=f"{layouts.unknown[t]}: the checks that need its layout are SKIP", evidence=ev,
                         details={"block_size": info["block_size"], "type_size": info["type_size"],
                                  "bits_per_value": 8.0 * info["type_size"] / info["block_size"]})]
    f = layouts.get(t)
    mism = int(info["block_size"] != f.block) + int(info["type_size"] != f.block_bytes)
    cav = (f"traits say {info['block_size']} values in {info['type_size']} bytes, no known layout has that "
           f"(checked against {f.block} in {f.block_bytes})") if mism else (
           f"legacy layout: blocks of {f.block} values, the group's norm in each" if f.block != T.GROUP else "")
    ev = ctx.evidence(ID, f"{t}_traits", block_size=info["block_size"], type_size=info["type_size"],
                      format_block=f.block, format_block_bytes=f.block_bytes)
    return [ctx.cell(ID, t, be, "traits", "mismatched_fields", mism, 0, Verdict.PASS if not mism else Verdict.FAIL,
                     caveat=cav, evidence=ev, details={"block_size": info["block_size"], "type_size": info["type_size"],
                                          "bits_per_value": 8.0 * info["type_size"] / info["block_size"]})]


def _decode_cells(ctx: Context, t: str, backend: str, route: str | None = None) -> list[Cell]:
    """Reference packing decoded on a backend's first working decode route (or the given further reader)."""
    f = T.fmt(t)
    route = route or decode_route(ctx, backend, t)
    table = precise_table(ctx, t, backend)
    rng = ctx.rng(f"pq4-{t}")
    n = 64
    idx = rng.integers(0, f.levels, (n, 128)).astype(np.uint8)
    idx[0] = np.arange(128) % f.levels  # every index at every position phase
    norms = rng.uniform(0.1, 4.0, n)
    raw = T.pack(t, idx, norms).reshape(-1)
    got = ctx.target.decode(backend, route, t, raw, n, 128)
    ref = T.decode(t, raw.reshape(n, -1), table.astype(np.float32))
    mism = int(np.count_nonzero(np.abs(got.astype(np.float64) - ref) > decode_tolerance(route, ref)))
    ev = ctx.evidence(ID, f"{t}_{backend}_{route}_refpack", indices=idx, decoded=got, reference=ref)
    lossy = "" if not decode_tolerance(route, np.ones(1))[0] else f"compared within {route}'s half-precision error bound"
    return [ctx.cell(ID, t, backend, route, "values_differing_on_reference_packing", mism, 0,
                     Verdict.PASS if mism == 0 else Verdict.FAIL,
                     caveat=lossy if not mism else f"{mism} of {got.size} values decode differently from the reference unpacker "
                                                   "(bit order or field offsets differ)", evidence=ev)]


def _quant_cells(ctx: Context, t: str, backend: str, route: str) -> list[Cell]:
    f = T.fmt(t)
    x = ctx.rng(f"pq4q-{t}").standard_normal((64, 128)).astype(np.float32)
    raw = ctx.target.quantize(backend, route, t, x)
    if raw.size != 64 * f.group_bytes:
        return [ctx.cell(ID, t, backend, route, "bytes_written", raw.size, 64 * f.group_bytes, Verdict.FAIL,
                         caveat=f"wrote {raw.size} bytes for 64 blocks, expected {64 * f.group_bytes}")]
    dr = decode_route(ctx, backend, t)
    table = precise_table(ctx, t, backend)
    own = ctx.target.decode(backend, dr, t, raw, 64, 128)
    ref = T.decode(t, raw.reshape(64, -1), table.astype(np.float32))
    mism = int(np.count_nonzero(np.abs(own.astype(np.float64) - ref) > decode_tolerance(dr, ref)))
    _, _, reserved = T.unpack(t, raw)
    res_bad = int(np.count_nonzero(reserved)) if f.reserved else 0
    cav = []
    if mism:
        cav.append(f"{mism} of {own.size} values: reference unpacking of the fork's bytes differs from its own decode")
    if res_bad:
        cav.append(f"reserved field non-zero in {res_bad} of 64 blocks")
    ev = ctx.evidence(ID, f"{t}_{backend}_{route}_bytes", raw=raw, own=own, reference=ref)
    return [ctx.cell(ID, t, backend, route, "mismatches", mism + res_bad, 0,
                     Verdict.PASS if not (mism or res_bad) else Verdict.FAIL, caveat="; ".join(cav), evidence=ev,
                     details={"decode_mismatches": mism, "reserved_nonzero_blocks": res_bad, "decode_route": dr})]


def run(ctx: Context) -> list[Cell]:
    """PQ4 cells: traits per type; reference packing per decode path; fork bytes per quantise path."""
    cells: list[Cell] = []
    for t in ctx.types:
        cells += guarded(ctx, ID, t, ctx.target_backend, "traits", lambda t=t: _traits_cell(ctx, t))
        for b in ctx.backends():
            cells += guarded(ctx, ID, t, b.name, "decode", lambda t=t, b=b: _decode_cells(ctx, t, b.name))
            for r in ctx.target.routes(b.name).readers:  # further reads of the same bytes (metal-src:dequant_t4)
                cells += guarded(ctx, ID, t, b.name, r, lambda t=t, b=b, r=r: _decode_cells(ctx, t, b.name, r))
        for backend, route in quant_paths(ctx):
            cells += guarded(ctx, ID, t, backend, route, lambda t=t, b=backend, r=route: _quant_cells(ctx, t, b, r))
    return cells


CHECK = Check(ID, TITLE, run, order=40, rules="PQ4", catches={"swapped_packing": ("FAIL",), "reserved_nonzero": ("FAIL",), "decode_unrotated": ("FAIL",)})
