"""PQ4 Layout: type traits, reserved field, reference packing decoded exactly on every path.

Measured (spec PQ4): block size and bytes per block from the build's type traits vs the format;
turbo4's reserved field in bytes written by every quantise path; index patterns packed by the
reference packer and decoded by every decode path (must equal the reference decode exactly);
the fork's own bytes unpacked by the reference and compared with the fork's own decode. The model
KV-bytes part of PQ4 is measured by the sweep (llama's KV-cache lines vs the traits).

A backend that writes a type it cannot read (Vulkan's turbo2/turbo4 on fork 69d8e4be4) has no own decode to compare
with: its bytes are decoded by another backend's exact decoder (:mod:`harness.checks.readers`), and their arrangement
is judged directly (:func:`_arrangement`): the indices unpacked by the reference must be those the reference quantiser
chooses for the same rows (with the writer's measured thresholds and the graph op's rotation), at the same positions.
A writer that stores them at other positions inside a block, or relabels their values, FAILs with the rearrangement.
"""
from __future__ import annotations

import numpy as np

from harness.checks.contract import Check
from harness.checks.common import Context, guarded, quant_paths
from harness.checks.observations import (decision_thresholds, decode_route, decode_tolerance, op_matrices,
                                         precise_table, quantizer_rotation)
from harness.checks.readers import Reader, reader_of
from harness.errors import Unsupported
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
    reader = reader_of(ctx, backend, t)  # another backend's decoder when this one only writes the type
    table = precise_table(ctx, t, backend)
    own = reader.decode(ctx, raw, 64, 128)
    ref = T.decode(t, raw.reshape(64, -1), table.astype(np.float32))
    mism = int(np.count_nonzero(np.abs(own.astype(np.float64) - ref) > decode_tolerance(reader.route, ref)))
    _, _, reserved = T.unpack(t, raw)
    res_bad = int(np.count_nonzero(reserved)) if f.reserved else 0
    cav = []
    if mism:
        cav.append(f"{mism} of {own.size} values: reference unpacking of the fork's bytes differs from "
                   + (f"{reader.path}'s decode" if reader.foreign else "its own decode"))
    if res_bad:
        cav.append(f"reserved field non-zero in {res_bad} of 64 blocks")
    arr = _arrangement(ctx, t, backend, route, reader, table) if reader.foreign else {}
    if arr.get("note"):
        cav.append(arr["note"])
    if reader.note:
        cav.append(reader.note)
    bad = mism + res_bad + arr.get("misplaced", 0)
    ev = ctx.evidence(ID, f"{t}_{backend}_{route}_bytes", raw=raw, own=own, reference=ref)
    return [ctx.cell(ID, t, backend, route, "mismatches", bad, 0, Verdict.PASS if not bad else Verdict.FAIL,
                     caveat="; ".join(cav), evidence=ev,
                     details={"decode_mismatches": mism, "reserved_nonzero_blocks": res_bad, "decode_route": reader.route,
                              **reader.details(), **{k: v for k, v in arr.items() if k != "note"}})]


def _arrangement(ctx: Context, t: str, backend: str, route: str, reader: Reader, table: np.ndarray) -> dict:
    """Whether a writer stores, at the reference positions, the indices the reference quantiser chooses.

    For a writer whose bytes only another backend reads (no own decode to compare the reference unpacker with).
    Expected: T.quantize of the same rows with the writer's measured thresholds (:func:`decision_thresholds`) and the
    graph op's rotation (the writer's op, else the reader's); stored: the reference unpacker's indices, ranked in the
    table's sorted order. Indices within ``boundary_flip_abs`` of a threshold are not counted. When they differ:
    a rearrangement of positions inside a block (:func:`position_permutation`) or of index values
    (:func:`value_relabelling`) is a layout fault, counted in 'misplaced'; indices that follow the quantiser's own
    measured rotation instead of the op's are a rotation difference (PQ1 judges it), not a layout one; anything else
    leaves the layout unconfirmed and is counted.

    Returns:
        {'misplaced': int (0 when the layout is confirmed), 'note': str, 'arrangement': 'reference' |
        'positions permuted' | 'values relabelled' | 'quantizer rotation' | 'unexplained', 'rotation_op': path}.
    """
    n = 256
    x = ctx.rng(f"pq4a-{t}").standard_normal((n, 128)).astype(np.float32)
    raw = ctx.target.quantize(backend, route, t, x)
    try:
        R, op = op_matrices(ctx, backend)["R"], f"{backend}:turbo_wht"
    except Unsupported:
        R, op = op_matrices(ctx, reader.backend)["R"], f"{reader.backend}:turbo_wht"
    thr = decision_thresholds(ctx, backend, route, t)
    th = np.where(np.isnan(thr["thresholds"]), thr["midpoints"], thr["thresholds"])
    rank = np.argsort(np.argsort(table))  # index in the fork's table order -> position in the sorted table
    stored = rank[T.unpack(t, raw)[0]]
    eps = ctx.th("general", "boundary_flip_abs")

    unmeasured = np.isnan(thr["thresholds"])

    def off(rot):
        expected, _, y = T.quantize(x, rot, thr["table"], th)
        near = np.min(np.abs(y[..., None] - th[None, None, :]), axis=-1) < eps
        # neighbours across a threshold that was not found near its midpoint (PQ2 reports it): the writer's decision
        # there is unknown, so such a difference says nothing about the layout
        lo = np.minimum(stored, expected).clip(0, len(th) - 1)
        unknown = (np.abs(stored.astype(int) - expected) == 1) & unmeasured[lo]
        return expected, int(np.count_nonzero((stored != expected) & ~near & ~unknown)), int(np.count_nonzero(unknown))

    expected, real, unknown = off(R)
    out = {"rotation_op": op, "misplaced": 0, "arrangement": "reference", "unmeasured_threshold_diffs": unknown}
    if unknown:
        out["note"] = (f"{unknown} of {stored.size} indices lie across decision thresholds not found near their "
                       f"midpoints (PQ2): not counted here")
    if real == 0:
        return out
    pi = position_permutation(stored, expected)
    if pi is not None:
        moved = np.nonzero(pi != np.arange(len(pi)))[0]
        pairs = ", ".join(f"{i}->{pi[i]}" for i in moved[:4])
        return {**out, "misplaced": real, "arrangement": "positions permuted", "permutation": pi,
                "note": f"the writer stores a block's indices at other positions than the reference layout "
                        f"({len(moved)} of 128 moved: {pairs}, ...): every reader decodes them to the wrong coordinates"}
    g = value_relabelling(stored, expected, len(table))
    if g is not None:
        return {**out, "misplaced": real, "arrangement": "values relabelled", "relabelling": g,
                "note": f"the writer stores index k as {list(map(int, g))}[k] (bit order inside an index differs "
                        f"from the reference layout): every reader decodes other centroids"}
    qr = quantizer_rotation(ctx, backend, route, t)
    if qr["R"] is not None and off(qr["R"])[1] == 0:
        return {**out, "arrangement": "quantizer rotation",
                "note": "the bytes hold the indices of the quantiser's own rotation, which differs from the graph "
                        "op's (PQ1 judges it), at the reference positions: the layout is the reference's"}
    return {**out, "misplaced": real, "arrangement": "unexplained",
            "note": f"{real} of {stored.size} stored indices are not the reference quantiser's (with the graph op's "
                    f"or the quantiser's measured rotation) and not a rearrangement of them: the layout of these "
                    f"bytes could not be confirmed"}


def position_permutation(stored: np.ndarray, expected: np.ndarray, agree: float = 0.98) -> np.ndarray | None:
    """The rearrangement of positions inside a block that maps the expected indices onto the stored ones, if any.

    ``M[i, j]`` = the fraction of rows whose stored index at position j equals the expected index at position i; a
    layout that stores index i at position pi(i) gives M[i, pi(i)] ~ 1 (less boundary flips), while indices chosen
    with another rotation agree with no one position better than chance (well below ``agree``).

    Args:
        stored, expected: int arrays (rows, 128), both in sorted-table order.
        agree: the fraction of rows a position must match (0.98: boundary flips stay far below 2%).
    Returns:
        int array (128,) pi with stored[:, pi[i]] ~ expected[:, i] when it is a bijection other than the identity,
        else None.
    """
    s, e = np.asarray(stored), np.asarray(expected)
    M = np.mean(s[:, None, :] == e[:, :, None], axis=0)  # (i expected, j stored)
    pi = np.argmax(M, axis=1)
    ok = np.all(M[np.arange(len(pi)), pi] >= agree) and len(set(pi.tolist())) == len(pi)
    return pi if ok and not np.array_equal(pi, np.arange(len(pi))) else None


def value_relabelling(stored: np.ndarray, expected: np.ndarray, levels: int, agree: float = 0.98) -> np.ndarray | None:
    """The relabelling g of index values with stored ~ g[expected] (e.g. the bits of each index reversed), if any.

    Args:
        stored, expected: int arrays of the same shape, both in sorted-table order; levels: 2**bits.
    Returns:
        int array (levels,) g, a bijection other than the identity that holds for at least ``agree`` of the values of
        every index that occurs, else None.
    """
    s, e = np.asarray(stored).ravel(), np.asarray(expected).ravel()
    C = np.zeros((levels, levels))
    np.add.at(C, (e, s), 1)
    seen = C.sum(axis=1) > 0
    g = np.argmax(C, axis=1)
    frac = C[np.arange(levels), g] / np.maximum(C.sum(axis=1), 1)
    ok = np.all(frac[seen] >= agree) and len(set(g[seen].tolist())) == int(seen.sum())
    return g if ok and not np.array_equal(g[seen], np.arange(levels)[seen]) else None


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
