"""AUDIT: every backend's tables, read from the fork's source and judged against the reference and each other.

The tables are found by :mod:`harness.fork.source_audit` (by name and value pattern, never by line number) in the
fork checkout the target was built from. Rules, the same as PQ1/PQ2/PQ4's:

- centroid tables (f32): identical on every backend (PQ2 ``table_abs_diff`` = 0 against the target backend's, in
  float32); the target backend's table's expected distortion against the Lloyd-Max optimum (PQ2
  ``distortion_ratio``, PARTIAL beyond);
- thresholds: within PQ2 ``threshold_abs_err`` of the midpoints of the target backend's centroids (FAIL beyond);
  a threshold that differs between two backends is PARTIAL naming the size and both ``file:line`` s (spec
  "Integrity of a verdict": e.g. CUDA's ±0.145561 against CPU's ±0.145560);
- fp16 copies (centroid and magnitude LUTs, 1/sqrt(128)): each must be the correctly rounded binary16 of the f32
  value; the rounding error is reported, a copy further off is FAIL;
- WHT sign vectors: (s1, s2) of each file against the signs PQ1 recovers from the target's quantiser (FAIL when
  they differ); QJL and 64-group signs path against path;
- block structs: bytes per block equal to the build's type traits (PQ4, FAIL otherwise);
- a table with a turbo name that cannot be read is SKIP with the reason; one computed at run time is said so.

A FAIL on a backend other than the target backend is PARTIAL (:meth:`Context.cell`).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from harness.checks.common import Context
from harness.checks.observations import quantizer_rotation
from harness.checks.contract import Check, Outcome
from harness.errors import HarnessError, ProbeCrash, Unsupported
from harness.reference import turbo as T
from harness.reference.lloydmax import expected_distortion, lloyd_max
from harness.reference.wht import canonical_signs
from harness.report.model import Cell, Table, Verdict

ID, TITLE = "AUDIT", "Source audit (every backend's tables vs the reference and each other)"
COLUMNS = ["backend", "type", "kind", "table", "precision", "where", "values", "finding"]
INV_SQRT_128 = 1.0 / np.sqrt(128.0)


def _f16(v) -> np.ndarray:
    return np.asarray(v, np.float64).astype(np.float32).astype(np.float16).astype(np.float64)


def _short(v: np.ndarray, k: int = 4) -> str:
    v = np.asarray(v, float)
    pos = v[v >= 0] if np.any(v < 0) and np.allclose(np.sort(v), -np.sort(v)[::-1]) else v
    s = " ".join(f"{x:.6f}" for x in pos[::-1][:k]) if pos is not v else " ".join(f"{x:+.6f}" for x in v[:k])
    return ("±" if pos is not v else "") + s + (" ..." if len(pos) > k else "")


class _Audit:
    def __init__(self, ctx: Context, tables: list):
        self.ctx, self.tabs = ctx, tables
        self.cells: list[Cell] = []
        self.rows: list[list] = []
        self.notes: list[str] = []
        self.bits = {int(t[-1]): t for t in ctx.types if t[-1].isdigit()}

    def cell(self, tab, metric, value, threshold, v, caveat="", type_=None, details=None):
        # ggml-common.h is every backend's (the traits' own structs): judged as the target backend's
        be = self.ctx.target_backend if tab.backend == "common" else tab.backend
        c = self.ctx.cell(ID, type_ or (f"turbo{tab.bits}" if tab.bits else "all"), be, "source", metric,
                          value, threshold, v, caveat=caveat, details={"where": tab.where, "table": tab.name, **(details or {})})
        c.path = f"{tab.backend}:source"
        self.cells.append(c)
        self.rows.append([tab.backend, c.type, tab.kind, tab.name, tab.precision, tab.where, _short(tab.values) if
                          tab.values.size and tab.kind != "struct" else tab.note, f"{v.value}: {caveat}" if caveat else v.value])
        return c

    def ref_of(self, kind: str, bits: int):
        """The target backend's f32 table of this kind (else the first backend's), the path others are compared with."""
        cand = [t for t in self.tabs if t.kind == kind and t.bits == bits and t.precision == "f32"]
        return next((t for t in cand if t.backend == self.ctx.target_backend), cand[0] if cand else None)

    # ------------------------------------------------------------------ tables of values
    def centroids(self, bits: int) -> None:
        ref = self.ref_of("centroids", bits)
        if ref is None:
            return
        for tab in [t for t in self.tabs if t.kind == "centroids" and t.bits == bits and t.precision == "f32"]:
            d = float(np.max(np.abs(tab.values.astype(np.float32) - ref.values.astype(np.float32)))) \
                if tab.values.size == ref.values.size else float("inf")
            tol = self.ctx.th("PQ2", "table_abs_diff")
            ok = d <= tol
            i = int(np.argmax(np.abs(tab.values - ref.values))) if np.isfinite(d) else 0
            self.cell(tab, "centroids_max_abs_diff_vs_target_source", d, tol, Verdict.PASS if ok else Verdict.FAIL,
                      "" if ok else f"centroid {tab.values[i]:+.6f} at {tab.where_of(i)} vs {ref.values[i]:+.6f} at "
                                    f"{ref.where_of(i)}: bytes written on one backend decode to other values on the other")
        opt = lloyd_max(bits, "beta", 128)
        c = np.sort(ref.values)
        ratio = expected_distortion(c, 0.5 * (c[1:] + c[:-1]), "beta", 128) / opt.distortion
        lim = self.ctx.th("PQ2", "distortion_ratio")
        self.cell(ref, "centroids_distortion_vs_lloyd_max", ratio, lim, Verdict.PASS if ratio <= lim else Verdict.PARTIAL,
                  "" if ratio <= lim else f"distortion {ratio:.3f}x the Lloyd-Max optimum (outer centroid "
                                          f"{c[-1] * np.sqrt(128):.3f} sigma vs {opt.centroids[-1] * np.sqrt(128):.3f})")

    def thresholds(self, bits: int) -> None:
        cref = self.ref_of("centroids", bits)
        ref = self.ref_of("thresholds", bits)
        if ref is None:
            return
        tol = self.ctx.th("PQ2", "threshold_abs_err")
        mids = None
        if cref is not None:
            c = np.sort(cref.values)
            mids = 0.5 * (c[1:] + c[:-1])
        for tab in [t for t in self.tabs if t.kind == "thresholds" and t.bits == bits]:
            v = tab.values.astype(np.float32).astype(np.float64)
            if mids is not None:
                err = float(np.max(np.abs(v - mids)))
                i = int(np.argmax(np.abs(v - mids)))
                self.cell(tab, "threshold_abs_err_vs_midpoint", err, tol, Verdict.PASS if err <= tol else Verdict.FAIL,
                          "" if err <= tol else f"threshold {v[i]:+.6f} at {tab.where_of(i)} is {err:.3g} from the "
                                                f"midpoint {mids[i]:+.7f} of {cref.where}'s centroids")
            if tab is ref:
                continue
            r = ref.values.astype(np.float32).astype(np.float64)
            diff = np.abs(v - r)
            d = float(diff.max())
            if d == 0:
                self.cell(tab, "threshold_max_abs_diff_vs_target_source", d, 0.0, Verdict.PASS)
                continue
            idx = np.nonzero(diff)[0]
            pairs = "; ".join(f"{v[i]:+.6f} at {tab.where_of(i)} vs {r[i]:+.6f} at {ref.where_of(i)}" for i in idx[:2])
            self.cell(tab, "threshold_max_abs_diff_vs_target_source", d, 0.0, Verdict.PARTIAL,
                      f"{len(idx)} of {len(v)} thresholds differ from {ref.backend}'s by up to {d:.2g} ({pairs}"
                      f"{'; ...' if len(idx) > 2 else ''}): values between them get another index on each backend "
                      f"(COMPAT counts the flips)", details={"differing": idx.tolist()})

    def half_copies(self) -> None:
        for tab in [t for t in self.tabs if t.precision == "f16" and t.kind in ("centroids", "magnitudes")]:
            ref = self.ref_of("centroids", tab.bits)
            if ref is None:  # nothing to compare it with: SKIP (a note alone left the table without a cell)
                self.cell(tab, "-", None, None, Verdict.SKIP, f"{tab.name}: fp16 copy with no f32 table of its type "
                                                             f"to compare with: not audited")
                continue
            c = np.sort(ref.values)
            want = c if tab.kind == "centroids" else c[len(c) // 2:]
            if tab.kind == "magnitudes" and tab.values.size != want.size:
                continue
            exact = _f16(want)
            got = _f16(tab.values)
            ulps = np.abs(got.astype(np.float16).view(np.int16).astype(int) - exact.astype(np.float16).view(np.int16).astype(int))
            rnd = float(np.max(np.abs(got - want)))
            ok = int(ulps.max()) == 0
            i = int(np.argmax(ulps))
            self.cell(tab, "fp16_copy_ulps_from_correct_rounding", float(ulps.max()), 0.0,
                      Verdict.PASS if ok else Verdict.FAIL,
                      f"fp16 rounding error up to {rnd:.3g} ({rnd / np.max(np.abs(want)):.2g} relative)" if ok else
                      f"the fp16 copy is not the rounding of {ref.where}'s table: {tab.values[i]:+.6f} at {tab.where_of(i)} is "
                      f"{int(ulps[i])} fp16 ulps from {exact[i]:+.6f}; error up to {rnd:.3g}",
                      details={"rounding_error": rnd})

    def norm_consts(self) -> None:
        for tab in [t for t in self.tabs if t.kind == "norm_const"]:
            v = float(tab.values[0])
            if tab.precision == "f16":
                ok = _f16(v)[()] == _f16(INV_SQRT_128)[()]
                err = abs(float(_f16(v)) - INV_SQRT_128)
            else:
                ok = np.float32(v) == np.float32(INV_SQRT_128)
                err = abs(float(np.float32(v)) - INV_SQRT_128)
            self.cell(tab, "inv_sqrt128_error", err, None, Verdict.PASS if ok else Verdict.FAIL,
                      f"{tab.precision} literal, rounding error {err:.2g}" if ok else
                      f"1/sqrt(128) written as {v!r}: not its {tab.precision} rounding")

    # ------------------------------------------------------------------ signs and layouts
    def signs(self) -> None:
        ref, how = None, ""
        try:
            qr = quantizer_rotation(self.ctx, self.ctx.target_backend, "set_rows", self.bits.get(3, self.ctx.types[0]))
            if qr["is_signed_wht"]:
                ref, how = canonical_signs(qr["s1"], qr["s2"]), f"PQ1's signs recovered from {self.ctx.target_backend}:set_rows"
        except (Unsupported, ProbeCrash, HarnessError, T.UnknownLayout) as e:
            self.notes.append(f"sign vectors compared path against path only: PQ1's recovery failed ({e})")
        groups = defaultdict(list)
        for tab in self.tabs:
            if tab.kind in ("signs", "qjl_signs", "signs64"):
                groups[(tab.file, tab.kind, tab.precision)].append(tab)
        pairs = {}  # every (s1, s2) pair of a file in the order written (one pair per type in Vulkan's shaders)
        for k, v in groups.items():
            for j in range(0, len(v) - 1, 2):
                pairs[(*k, j)] = (v[j], v[j + 1])
            if len(v) % 2:
                self.cell(v[-1], "-", None, None, Verdict.SKIP, f"{v[-1].name} ({v[-1].where}): a {k[1]} vector "
                          f"without its pair in {k[0]}: not audited")
        if ref is None:
            tgt = next((p for k, p in pairs.items() if k[1] == "signs" and p[0].backend == self.ctx.target_backend), None)
            if tgt is not None:
                ref, how = canonical_signs(tgt[0].values, tgt[1].values), f"{tgt[0].where}/{tgt[1].line}"
        other = {}
        for (f, kind, prec, _), (a, b) in pairs.items():
            if kind != "signs":
                other.setdefault(kind, []).append((a, b))
                continue
            if ref is None:
                self.cell(a, "-", None, None, Verdict.SKIP, "no reference sign vectors (PQ1 could not recover them)")
                continue
            # (s1, s2) and (-s1, -s2) give the same rotation: the nearer of the two is counted
            x, r = np.concatenate([a.values, b.values]), np.concatenate([ref[0], ref[1]]).astype(float)
            bad = int(min(np.count_nonzero(x != r), np.count_nonzero(-x != r)))
            self.cell(a, "wht_sign_mismatches_vs_reference", bad, 0, Verdict.PASS if bad == 0 else Verdict.FAIL,
                      f"(s1, s2) = {a.name}/{b.name} ({prec}) vs {how}" if not bad else
                      f"{bad} of 256 signs of {a.name}/{b.name} ({a.where}, {b.where}) differ from {how}: a path using "
                      f"them rotates differently from the one that reads its bytes")
        for kind, ps in other.items():  # QJL / 64-group signs: path against path
            first = ps[0]
            for a, b in ps[1:]:
                bad = int(np.count_nonzero(a.values != first[0].values) + np.count_nonzero(b.values != first[1].values))
                self.cell(a, f"{kind}_mismatches_vs_{first[0].backend}", bad, 0, Verdict.PASS if bad == 0 else Verdict.FAIL,
                          "" if not bad else f"{bad} {kind} entries differ from {first[0].where}")
            if len(ps) == 1:
                self.notes.append(f"{kind} in {first[0].where}, {first[1].where}: the only copy, not compared "
                                  f"({'QJL: no production turbo path uses it' if kind == 'qjl_signs' else 'no other path'})")

    def structs(self) -> None:
        by = defaultdict(list)
        for tab in [t for t in self.tabs if t.kind == "struct"]:
            by[(tab.file, tab.bits)].append(tab)
        for (f, bits), defs in by.items():
            t = f"turbo{bits}"
            info = self.ctx.target.type_info(t) if t in T.TURBO_TYPES else None
            if not info:
                continue
            sizes = [int(d.values.sum()) for d in defs]
            ok = info["type_size"] in sizes
            tab = defs[sizes.index(info["type_size"])] if ok else defs[0]
            alt = f"; {len(defs)} definitions under preprocessor conditions ({', '.join(f'line {d.line}: {s} B' for d, s in zip(defs, sizes))})" if len(defs) > 1 else ""
            self.cell(tab, "block_bytes_vs_traits", float(sum(tab.values)), float(info["type_size"]),
                      Verdict.PASS if ok else Verdict.FAIL,
                      (f"{tab.note} = {int(sum(tab.values))} bytes per block" if ok else
                       f"{tab.name} is {sizes[0]} bytes ({tab.note}), the build's traits {info['type_size']}: bytes written "
                       f"by one cannot be read by the other") + alt)

    def unreadable(self) -> None:
        for tab in self.tabs:
            if tab.kind == "unparsed":
                self.cell(tab, "-", None, None, Verdict.SKIP, f"not audited: {tab.note}")
            elif tab.kind in ("runtime", "dense_matrix"):
                self.rows.append([tab.backend, "all", tab.kind, tab.name, "-", tab.where, "-",
                                  "computed at run time: not audited from source" if tab.kind == "runtime" else
                                  "a dense matrix literal: not a signed WHT's sign vectors; not audited"])

    def missing(self) -> None:
        from harness.fork.source_audit import BACKEND_DIRS
        backends = {t.backend for t in self.tabs if t.kind in ("centroids", "thresholds", "signs")}
        if self.ctx.target_backend in {b for _, b in BACKEND_DIRS}:  # the target's tables are never left unsaid
            backends.add(self.ctx.target_backend)
        backends = sorted(backends)
        for b in backends:
            for bits, t in self.bits.items():
                for kind in ("centroids", "thresholds"):
                    if not any(x.backend == b and x.kind == kind and x.bits == bits for x in self.tabs):
                        self.cells.append(Cell(ID, t, f"{b}:source", "-", None, None, Verdict.SKIP,
                                               caveat=f"no {t} {kind} table found in {b}'s source (written in a form "
                                                      f"the audit does not read, or computed at run time)",
                                               target=self.ctx.is_target(b, "source")))


def run(ctx: Context) -> Outcome:
    """AUDIT cells, the table of every table found, and a table of each type's thresholds per backend."""
    from harness.fork import source_audit as A
    fork = ctx.target.source_dir()
    if fork is None:
        return Outcome([Cell(ID, "all", "source", "-", None, None, Verdict.SKIP,
                             caveat="this target has no fork source to read (not a fork build)", target=False)])
    tabs = A.scan(fork)
    if not tabs:
        return Outcome([Cell(ID, "all", "source", "-", None, None, Verdict.SKIP, target=False,
                             caveat=f"no turbo table found in {fork}'s backend sources")])
    au = _Audit(ctx, tabs)
    for bits in au.bits:
        au.centroids(bits)
        au.thresholds(bits)
    au.half_copies()
    au.norm_consts()
    au.signs()
    au.structs()
    au.unreadable()
    au.missing()
    found = sorted({t.backend for t in tabs})
    audited: dict = {}
    for x in tabs:
        if x.kind in ("centroids", "thresholds", "signs", "struct") and x.backend != "common":
            fams = audited.setdefault(x.backend, set())
            fams.update(ctx.types if not x.bits else [f"turbo{x.bits}"])
    out = Outcome(au.cells, notes=[f"backends audited from source: {', '.join(found)} (tables found by name and value "
                                   f"pattern in {fork})"] + au.notes)
    for backend, other in A.shared_sources(fork).items():  # HIP compiles CUDA's sources: audited with them
        if other in audited and backend not in audited:
            audited[backend] = set(audited[other])
            out.notes.append(f"{backend} compiles {other}'s kernel sources (ggml/src/ggml-{backend}/CMakeLists.txt): "
                             f"its tables are {other}'s, audited above")
    from harness.checks.examined import examination
    exam = examination(ctx, audited)
    out.notes.insert(0, f"examined: {exam.caption[0]}")
    out.tables.append(exam)
    out.tables.append(Table("audit", "Source audit: every table found, per backend", COLUMNS, au.rows,
                            scope={"type": "type", "backend": "backend"}))
    for bits, t in au.bits.items():
        rows = [[x.backend, x.name, x.where, " ".join(f"{v:+.6f}" for v in x.values[len(x.values) // 2:])]
                for x in tabs if x.kind == "thresholds" and x.bits == bits]
        if rows:
            out.tables.append(Table(f"thresholds:{t}", f"{t} decision thresholds per backend (non-negative half)",
                                    ["backend", "table", "where", "thresholds"], rows, scope={"backend": "backend"}))
    return out


CHECK = Check(ID, TITLE, run, order=75, rules="PQ2", needs=("source",))
