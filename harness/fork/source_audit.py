"""Find the tables every backend of a fork writes in its source (the reading side of the AUDIT check).

For each backend folder the fork ships (the table :data:`BACKEND_DIRS`: CPU ``ggml-turbo-quant.c`` and
``ggml-cpu``, CUDA, Metal, Vulkan shaders, HIP, SYCL, OpenCL) every source that mentions turbo is read, where it
is, and these are collected with their ``file:line``:

- arrays written as literals (``static const float X[16] = {...}``, ``__constant__``, Metal ``constant half4 X[32] =
  {half4(...)...}``, GLSL ``const float X[8] = float[8](...)``, top-level or inside a function), classified by
  their values: sign vectors (all +-1, 128 or 64 long; QJL by name), centroid tables (2^b values of both signs),
  magnitude tables (2^(b-1) positive values), decision thresholds (2^b - 1 ascending values), each f32 or f16 (by
  its declared type or an ``h`` suffix);
- threshold tables written as code: ``if (v < -0.145560f) return 0; ...`` chains (:func:`_chains`);
- the 1/sqrt(128) normalisation constant wherever it is a literal;
- the ``block_turbo*_0`` structs (field order and sizes, array sizes evaluated with the file's and ggml-common.h's
  ``#define`` s);
- tables with a turbo name but no literal initializer: computed at run time (said so, not judged) or unreadable
  (an initializer that is not a list of numbers: a SKIP with the reason).

Nothing here judges: :mod:`harness.checks.audit` compares these with the reference and with each other.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.fork import source_scan as S

# (path prefix inside the fork, backend name): first match wins
BACKEND_DIRS = (
    ("ggml/src/ggml-turbo-quant.c", "cpu"), ("ggml/src/ggml-cpu/", "cpu"), ("ggml/src/ggml-cuda/", "cuda"),
    ("ggml/src/ggml-metal/", "metal"), ("ggml/src/ggml-vulkan/", "vulkan"), ("ggml/src/ggml-hip/", "hip"),
    ("ggml/src/ggml-sycl/", "sycl"), ("ggml/src/ggml-opencl/", "opencl"), ("ggml/src/ggml-common.h", "common"),
)
SUFFIXES = {".c", ".cpp", ".h", ".hpp", ".cu", ".cuh", ".metal", ".comp", ".glsl", ".cl"}
SKIP_PARTS = ("template-instances",)
KEY = re.compile(r"centroid|codebook|_mid|thresh|signs|_lut|_mag", re.I)
HALF = re.compile(r"\b(half\d?|__half2?|float16_t|f16vec\d|ggml_half)\b")
_T = r"(?:float|double|half\d?|__half2?|float16_t|f16vec\d|vec\d|ggml_half|int|int8_t|uint8_t|uint|int32_t|uint32_t)"
ARRAY = re.compile(r"\[([^\]\n]*)\]\s*=\s*(?:[A-Za-z_]\w*\s*\[\s*\w*\s*\]\s*)?([({])")
DECL_BEFORE = re.compile(r"\b" + _T + r"\s+([A-Za-z_]\w*)\s*$")
RUNTIME = re.compile(r"^(?:static\s+)?" + _T + r"\s+(\w*(?:rotation|centroid|signs|qjl)\w*)\s*\[[^\]\n]+\]\s*;", re.I | re.M)
CHAIN = re.compile(r"\bif\s*\(\s*([A-Za-z_]\w*)\s*<\s*(-?\s*(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?)[fF]?\s*\)")
_CMP_NUM = re.compile(r"<\s*-?\s*\d*\.\d+[fF]?\s*\)")
FUNC = re.compile(r"\b([A-Za-z_]\w*)\s*\([^;{}()]*(?:\([^()]*\)[^;{}()]*)*\)\s*(?:const\s*)?\{")
INV_SQRT = re.compile(r"(?<![\w.])0\.088388347\d*[fFhH]?(?![\w.])")


@dataclass
class SrcTable:
    """One table found in a backend's source.

    Attributes:
        backend: backend name of its folder. file: path relative to the fork. line: first line of its values.
        name: declared name (or 'function(if-chain)'). kind: 'centroids' | 'magnitudes' | 'thresholds' | 'signs' |
            'signs64' | 'qjl_signs' | 'norm_const' | 'struct' | 'dense_matrix' | 'runtime' | 'unparsed'.
        bits: 2, 3, 4 (the turbo type) or 0 when not tied to one. precision: 'f32' | 'f16'.
        values: float64 array (kind 'struct': field sizes in bytes). lines: the line of each value.
        note: for 'struct' the fields 'name:bytes,...'; for 'runtime'/'unparsed' the reason.
    """

    backend: str
    file: str
    line: int
    name: str
    kind: str
    bits: int = 0
    precision: str = "f32"
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lines: list = field(default_factory=list)
    note: str = ""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def where_of(self, i: int) -> str:
        """file:line of value i."""
        return f"{self.file}:{self.lines[i] if i < len(self.lines) else self.line}"


def backend_of(rel: str) -> str | None:
    """Backend of a fork-relative path (:data:`BACKEND_DIRS`), None outside them."""
    return next((b for p, b in BACKEND_DIRS if rel == p or (p.endswith("/") and rel.startswith(p))), None)


def source_files(fork: Path) -> list[tuple[str, Path]]:
    """[(backend, file)] of every source under the backend folders that mentions turbo (case-insensitive)."""
    fork = Path(fork)
    out = []
    for prefix, backend in BACKEND_DIRS:
        p = fork / prefix
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.suffix in SUFFIXES) if p.is_dir() else []
        for f in files:
            rel = f.relative_to(fork).as_posix()
            if any(s in rel for s in SKIP_PARTS) or backend_of(rel) != backend or not f.is_file():
                continue
            out.append((backend, f))
    return out


def _bits_hint(name: str) -> int:
    m = re.search(r"([234])\s*_?bit", name, re.I) or re.search(r"turbo([234])", name, re.I)
    return int(m.group(1)) if m else 0


def _classify(backend: str, rel: str, name: str, prefix: str, vals: list[tuple[float, int, str]]) -> SrcTable | None:
    v = np.array([x[0] for x in vals], np.float64)
    lines = [x[1] for x in vals]
    prec = "f16" if HALF.search(prefix) or (vals and all(x[2] == "h" for x in vals)) else "f32"
    base = dict(backend=backend, file=rel, line=lines[0] if lines else 0, name=name, precision=prec, values=v, lines=lines)
    n = len(v)
    if n == 128 * 128:  # a dense 128x128 matrix written out (a rotation that is not a signed WHT)
        return SrcTable(kind="dense_matrix", note=f"{name}: a dense 128x128 matrix literal ({n} values)", **base)
    if n and np.all(np.abs(v) == 1.0):
        if n not in (64, 128) or np.all(v == v[0]):
            return None
        kind = "qjl_signs" if "qjl" in name.lower() else ("signs" if n == 128 else "signs64")
        return SrcTable(kind=kind, **base)
    if n < 2 or np.max(np.abs(v)) > 0.5:  # unit-variance codebooks of weight types, scales, other constants
        return None
    hint = _bits_hint(name)
    pos = bool(np.all(v >= 0))
    for bits in ([hint] if hint else [2, 3, 4]):
        k = 2 ** bits
        if pos and n == k // 2 and np.all(np.diff(v) > 0):
            return SrcTable(kind="magnitudes", bits=bits, **base)
        if not pos and n == k and np.all(np.diff(v) > 0):
            return SrcTable(kind="centroids", bits=bits, **base)
        if n == k - 1 and np.all(np.diff(v) > 0):
            return SrcTable(kind="thresholds", bits=bits, **base)
    return None


def _misshapen(backend: str, rel: str, line: int, name: str, vals: list[tuple[float, int, str]]) -> SrcTable | None:
    """A table named like a turbo table (centroids, thresholds, midpoints, magnitudes, fp16 LUT) with the size and scale
    of one (2^b - 1, 2^b or 2^(b-1) values for b = 2..4, all within +-0.5) that :func:`_classify` did not accept (not
    ascending, signs not symmetric): an 'unparsed' table, so the audit says SKIP where it would otherwise drop the table
    and judge the backend on its other copies. None for anything else (other types' tables, sign vectors)."""
    v = np.array([x[0] for x in vals], np.float64)
    sizes = {n for b in (2, 3, 4) for n in (2 ** b - 1, 2 ** b, 2 ** (b - 1))}
    other_bits = re.search(r"(\d+)\s*_?bit", name, re.I)  # e.g. CENTROIDS_1BIT (a QJL sign codebook): not a turbo type's
    if not re.search(r"centroid|codebook|_mid|thresh|_lut|_mag", name, re.I) or v.size not in sizes \
            or np.all(np.abs(v) == 1.0) or np.max(np.abs(v)) > 0.5 \
            or (other_bits and other_bits.group(1) not in ("2", "3", "4")):
        return None
    return SrcTable(backend, rel, line, name, "unparsed", bits=_bits_hint(name),
                    note=f"{name} at {rel}:{line} has {v.size} values that do not form a turbo table (centroids and "
                         f"thresholds ascend, magnitudes are positive and ascend): the audit cannot judge it")


def _match_close(text: str, i: int) -> int:
    """Offset just past the bracket closing the one at text[i] ('(' or '{'); -1 when unbalanced."""
    open_c = text[i]
    close_c = ")" if open_c == "(" else "}"
    depth = 0
    for m in _BRACKET.finditer(text, i):
        c = m.group(0)
        depth += (c == open_c) - (c == close_c)
        if depth == 0:
            return m.end()
    return -1


_BRACKET = re.compile(r"[(){}]")


def _defines(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2).split("//")[0].split("/*")[0].strip()
            for m in re.finditer(r"^[ \t]*#\s*define\s+(\w+)[ \t]+([^\n]+)", text, re.M)}


def _eval_size(expr: str, macros: dict) -> int | None:
    e = expr
    for _ in range(6):
        e2 = re.sub(r"\b[A-Za-z_]\w*\b", lambda m: f"({macros[m.group(0)]})" if m.group(0) in macros else m.group(0), e)
        if e2 == e:
            break
        e = e2
    if not re.fullmatch(r"[\d\s()+\-*/]+", e):
        return None
    try:
        return int(eval(e.replace("/", "//"), {"__builtins__": {}}))  # digits and operators only (checked above)
    except (SyntaxError, ZeroDivisionError, ValueError):
        return None


FIELD_BYTES = {"ggml_half": 2, "half": 2, "float16_t": 2, "uint16_t": 2, "int16_t": 2, "uint8_t": 1, "int8_t": 1,
               "float": 4, "uint32_t": 4, "int32_t": 4, "uint": 4, "ggml_half2": 4}
STRUCT = re.compile(r"(?:typedef\s+struct\s*\w*\s*(\{)\s*|struct\s+(block_turbo[234]_0)\s*(\{))")


def _structs(backend: str, rel: str, text: str, masked: str, macros: dict) -> list[SrcTable]:
    out = []
    for m in STRUCT.finditer(masked):
        ob = m.start(1) if m.group(1) else m.start(3)
        end = _match_close(masked, ob)
        if end < 0:
            continue
        name = m.group(2)
        if name is None:
            t = re.match(r"\s*(\w+)\s*;", masked[end:])
            name = t.group(1) if t else ""
        if not re.fullmatch(r"block_turbo[234]_0", name or ""):
            continue
        fields, sizes = [], []
        for f in re.finditer(r"(\w+)\s+(\w+)\s*(?:\[([^\]]+)\])?\s*;", masked[ob + 1:end - 1]):
            per = FIELD_BYTES.get(f.group(1))
            count = _eval_size(f.group(3), macros) if f.group(3) else 1
            if per is None or count is None:
                sizes = None
                break
            fields.append(f"{f.group(2)}:{per * count}")
            sizes.append(per * count)
        line = text.count("\n", 0, m.start()) + 1
        if sizes is None:
            out.append(SrcTable(backend, rel, line, name, "unparsed", int(name[11]),
                                note=f"struct {name}: a field of unknown type or size ({f.group(0).strip()})"))
            continue
        out.append(SrcTable(backend, rel, line, name, "struct", int(name[11]), values=np.array(sizes, float),
                            note=",".join(fields)))
    return out


def _chains(masked: str, nl: list) -> list[tuple[str, list[tuple[float, int, str]]]]:
    """Threshold tables written as ``if (v < C)`` chains: runs of one variable with increasing constants, each
    comparison within 400 characters of the previous; named after the enclosing function."""
    import bisect
    runs, cur, var, last = [], [], None, -10 ** 9
    if not _CMP_NUM.search(masked):
        return []
    for m in CHAIN.finditer(masked):
        v = float(m.group(2).replace(" ", ""))
        entry = (v, bisect.bisect_left(nl, m.start()) + 1, "", m.start())
        if m.group(1) == var and cur and v > cur[-1][0] and m.start() - last < 400:
            cur.append(entry)
        else:
            if len(cur) >= 3:
                runs.append((var, cur))
            cur, var = [entry], m.group(1)
        last = m.start()
    if len(cur) >= 3:
        runs.append((var, cur))
    out = []
    for var, run in runs:
        fn = None
        for f in FUNC.finditer(masked, max(0, run[0][3] - 4000), run[0][3]):
            if f.group(1) not in ("if", "for", "while", "switch", "return"):
                fn = f.group(1)
        out.append((f"{fn or '?'}(if-chain on {var})", [r[:3] for r in run]))
    return out


def scan_file(backend: str, path: Path, fork: Path, common_macros: dict) -> list[SrcTable]:
    """Every table of one source file (see the module doc)."""
    data = path.read_bytes()
    if not any(w in data for w in (b"turbo", b"TURBO", b"Turbo")) and "turbo" not in path.name.lower():
        return []
    text = data.decode(errors="replace")
    rel = path.relative_to(fork).as_posix()
    masked = S.mask(text)
    nl = [m.start() for m in re.finditer("\n", text)]
    out: list[SrcTable] = []
    for m in ARRAY.finditer(masked):
        d = DECL_BEFORE.search(masked, max(0, m.start() - 80), m.start())
        if d is None:
            continue
        name, ob = d.group(1), m.start(2)
        end = _match_close(masked, ob)
        if end < 0:
            continue
        prefix = masked[max(0, masked.rfind("\n", 0, d.start()) - 200):m.start()].split(";")[-1].split("}")[-1]
        line0 = bisect.bisect_left(nl, ob) + 1
        body = masked[ob + 1:end - 1]
        if body.count(",") >= 128 * 128 - 1:  # a dense matrix: not read value by value
            out.append(SrcTable(backend, rel, line0, name, "dense_matrix",
                                note=f"{name}: a dense matrix literal (~{body.count(',') + 1} values)"))
            continue
        item = S.Item(name, "table", path, line0, line0, text[ob + 1:end - 1])
        vals = S.numbers(item)
        rest = re.sub(r"\b[A-Za-z_]\w*\s*\(", "(", body)
        rest = S.NUM.sub(" 0 ", rest)
        if re.search(r"[A-Za-z_]", rest):
            if KEY.search(name) and re.search(r"\b(const|constant|__constant__|static|constexpr)\b", prefix):
                out.append(SrcTable(backend, rel, line0, name, "unparsed",
                                    note=f"{name}'s initializer is not a list of numbers "
                                         f"({' '.join(body.split())[:60]}...): the audit cannot read it"))
            continue
        t = _classify(backend, rel, name, prefix, vals)
        if t is None:
            t = _misshapen(backend, rel, line0, name, vals)
        if t is not None:
            out.append(t)
    for name, vals in _chains(masked, nl):
        t = _classify(backend, rel, name, "", vals)
        if t is not None and t.kind == "thresholds":
            out.append(t)
    for m in RUNTIME.finditer(masked):
        if "turbo" in (m.group(1) + rel).lower():  # a file-scope table (at column 0), not a local buffer
            out.append(SrcTable(backend, rel, bisect.bisect_left(nl, m.start()) + 1, m.group(1), "runtime",
                                note=f"{m.group(1)} has no literal initializer: it is computed at run time"))
    for m in INV_SQRT.finditer(masked):
        lit = m.group(0)
        prec = "f16" if lit[-1] in "hH" else "f32"
        out.append(SrcTable(backend, rel, bisect.bisect_left(nl, m.start()) + 1, "1/sqrt(128) literal", "norm_const",
                            precision=prec, values=np.array([float(lit.rstrip("fFhH"))])))
    out += _structs(backend, rel, text, masked, {**common_macros, **_defines(text)})
    return out


def shared_sources(fork: Path) -> dict[str, str]:
    """{backend: backend whose sources it compiles}, read from the fork's CMake: ggml-hip's CMakeLists globs
    ``../ggml-cuda/*.cu`` (HIP builds CUDA's kernels), so HIP's tables are CUDA's."""
    out = {}
    for backend, other in (("hip", "cuda"), ("sycl", "cuda"), ("opencl", "cuda")):
        cm = Path(fork) / f"ggml/src/ggml-{backend}/CMakeLists.txt"
        if cm.is_file() and re.search(rf"\.\./ggml-{other}/\*\.cu\b", cm.read_text(errors="replace")):
            out[backend] = other
    return out


def scan(fork: Path) -> list[SrcTable]:
    """Every table of every backend source of a fork (empty list when it has none of the folders)."""
    fork = Path(fork)
    common = fork / "ggml/src/ggml-common.h"
    macros = _defines(common.read_text(errors="replace")) if common.is_file() else {}
    out: list[SrcTable] = []
    for backend, f in source_files(fork):
        out += scan_file(backend, f, fork, macros)
    return out
