"""The fork's Metal per-block code, compiled for the host CPU through the harness's compatibility header.

Nothing of the fork is copied into this repository: at build time the turbo items are cut by name out of the fork's
``ggml-metal.metal`` (:mod:`harness.fork.source_scan`) - the per-block ``quantize_turbo*_0`` / ``dequantize_turbo*_0``
(and ``_t4``) functions, the rotation helpers, the tables they read, the scalar ``kernel_set_rows_turbo*`` kernels and
``kernel_turbo_wht`` - and written, each behind a ``#line`` naming its place in the fork's file, into one C++ unit with
``metal_shim.h`` (address spaces, ``half`` with binary16 rounding, vectors, the ``h`` literal) and a driver that
plays the GPU's dispatch: one thread per threadgroup, every threadgroup in turn. The unit is compiled once and cached
by the SHA-256 of the extracted text, the header, the driver and the compiler (:func:`build_shim`).

What this examines is the Metal source's logic, tables and layouts, not Apple GPU arithmetic (``MODE_NOTE``). Items
that need simdgroup or threadgroup-memory semantics (the flash-attention kernels) are not compiled: see
:data:`NOT_ON_HOST`.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.errors import HarnessError, Unsupported
from harness.fork import source_scan as S

SHIM_H = Path(__file__).with_name("metal_shim.h")
METAL_REL = Path("ggml/src/ggml-metal/ggml-metal.metal")
MODE_NOTE = "Metal source on the host CPU: logic, tables and layouts, not Apple GPU arithmetic"
NOT_ON_HOST = ("flash attention on Metal needs simdgroup reductions and threadgroup memory shared between threads, "
               "which the host shim cannot reproduce faithfully: not examined from source")
TYPES = ("turbo2", "turbo3", "turbo4")
# roots of the extraction; everything they name that the file defines at top level comes with them
ROOT_PATTERNS = (r"quantize_turbo[234]_0", r"dequantize_turbo[234]_0(_t4)?", r"kernel_set_rows_turbo\w*",
                 r"kernel_turbo_wht")
# the Metal features the shim does not provide: an item that uses one is left out (its routes are SKIP)
_GPU_ONLY = re.compile(r"\bsimd_\w+|threadgroup_barrier|\bsimdgroup_\w+|\[\[\s*threadgroup\s*\(")


def metal_source(fork: Path) -> Path | None:
    """The fork's ``ggml-metal.metal``, or None when the fork has no Metal backend source."""
    p = Path(fork) / METAL_REL
    return p if p.is_file() else None


@dataclass
class Extract:
    """What was cut out of the Metal source: the unit's text, the items in it, per type the ``set_rows`` kernel
    expression of its ``host_name`` instantiation, and why anything is missing."""

    source: Path
    items: list = field(default_factory=list)
    set_rows: dict = field(default_factory=dict)   # type -> 'kernel_set_rows_turbo<int64_t, block_turbo3_0, ...>'
    dequant: dict = field(default_factory=dict)    # type -> {'dequant': bool, 'dequant_t4': bool}
    has_wht: bool = False
    missing: dict = field(default_factory=dict)    # 'turbo3:set_rows' -> reason
    left_out: dict = field(default_factory=dict)   # item name -> reason (GPU-only features)

    def to_json(self) -> str:
        """What a cached shim needs to say about its extract (no fork text)."""
        import json
        return json.dumps({"items": [[it.name, it.line] for it in self.items], "set_rows": self.set_rows,
                           "dequant": self.dequant, "has_wht": self.has_wht, "missing": self.missing,
                           "left_out": self.left_out})

    @classmethod
    def from_json(cls, source: Path, text: str) -> "Extract":
        import json
        d = json.loads(text)
        items = [S.Item(n, "", source, ln, ln, "") for n, ln in d.pop("items")]
        return cls(source=source, items=items, **d)

    def text(self) -> str:
        """The items in file order, each behind a #line of its place in the fork's file."""
        return "".join(f'#line {it.line} "{self.source}"\n{it.text}\n' for it in self.items)


def extract(fork: Path) -> Extract:
    """Cut the turbo items out of the fork's Metal source (see the module doc).

    Raises:
        Unsupported: the fork has no ``ggml-metal.metal``, or none of the root functions is in it.
    """
    src = metal_source(fork)
    if src is None:
        raise Unsupported(f"the fork has no Metal source ({METAL_REL} absent): nothing to run on the host")
    text = src.read_text(errors="replace")
    all_items = S.items(src, text)
    by_name: dict[str, list] = {}
    for it in all_items:
        if it.name and it.kind in ("function", "table"):
            by_name.setdefault(it.name, []).append(it)
    ex = Extract(source=src)
    roots = [n for n in by_name if any(re.fullmatch(p, n) for p in ROOT_PATTERNS)]
    if not roots:
        raise Unsupported(f"{src.name} defines none of quantize_turbo*_0, dequantize_turbo*_0, kernel_set_rows_turbo*: "
                          f"no turbo code to run on the host")
    chosen: dict[str, object] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in chosen or name in ex.left_out:
            continue
        its = by_name.get(name, [])
        gpu = next((it for it in its if _GPU_ONLY.search(it.text)), None)
        if gpu is not None:
            ex.left_out[name] = f"{name} ({src.name}:{gpu.line}) uses simdgroup/threadgroup features the shim lacks"
            continue
        for it in its:
            chosen[(name, it.line)] = it
            todo += [w for w in set(S.IDENT.findall(S.mask(it.text))) if w in by_name and w != name]
    ex.items = sorted(chosen.values(), key=lambda it: it.line)
    names = {it.name for it in ex.items}
    ex.has_wht = "kernel_turbo_wht" in names
    for t in TYPES:
        n = t[-1]
        m = re.search(rf'host_name\("kernel_set_rows_{t}_i64"\)\]\]\s*kernel\s+\w+\s+([^;]+);', text)
        if m and m.group(1).split("<")[0].strip() in names:
            ex.set_rows[t] = " ".join(m.group(1).split())
        else:
            ex.missing[f"{t}:set_rows"] = (f"no kernel_set_rows_{t}_i64 instantiation of an extracted kernel in "
                                          f"{src.name}")
        ex.dequant[t] = {"dequant": f"dequantize_turbo{n}_0" in names, "dequant_t4": f"dequantize_turbo{n}_0_t4" in names}
        for r, ok in ex.dequant[t].items():
            if not ok:
                ex.missing[f"{t}:{r}"] = ex.left_out.get(f"dequantize_turbo{n}_0" + ("_t4" if r == "dequant_t4" else ""),
                                                         f"dequantize_turbo{n}_0{'_t4' if r == 'dequant_t4' else ''} "
                                                         f"not defined in {src.name}")
    return ex


def _driver(ex: Extract) -> str:
    """The C++ driver: extern "C" entry points that play the GPU dispatch for each extracted kernel/function."""
    out = ['extern "C" {']
    for t in TYPES:
        n = t[-1]
        blk = f"block_turbo{n}_0"
        out.append(f"int th_qk_{t}(void) {{ return QK_TURBO{n}; }}\nint th_bytes_{t}(void) {{ return (int) sizeof({blk}); }}")
        if t in ex.set_rows:
            out.append(f"""
void th_set_rows_{t}(const float * src, int64_t nrows, int64_t ncols, unsigned char * dst) {{
    ggml_metal_kargs_set_rows a; memset(&a, 0, sizeof(a));
    a.nk0 = (int32_t)(ncols / QK_TURBO{n}); a.ne01 = (int32_t) nrows; a.nb01 = (uint64_t) ncols * sizeof(float);
    a.ne11 = 1; a.ne12 = 1; a.nb10 = sizeof(int64_t); a.nb1 = (uint64_t) (ncols / QK_TURBO{n}) * sizeof({blk});
    int64_t * idx = new int64_t[nrows];
    for (int64_t i = 0; i < nrows; i++) idx[i] = i;
    uint3 tptg = {{1, 1, 1}};
    for (int64_t r = 0; r < nrows; r++) {{
        uint3 tgpig = {{(uint) r, 0, 0}};
        {ex.set_rows[t]}(a, src, idx, (float *) dst, tgpig, 0, tptg);
    }}
    delete[] idx;
}}""")
        if ex.dequant[t]["dequant"]:
            out.append(f"""
void th_dequant_{t}(const unsigned char * src, int64_t nblocks, float * dst) {{
    const {blk} * b = (const {blk} *) src;
    for (int64_t i = 0; i < nblocks; i++)
        for (short il = 0; il < QK_TURBO{n} / 16; il++) {{
            float4x4 reg; dequantize_turbo{n}_0<float4x4>(b + i, il, reg);
            for (int g = 0; g < 4; g++) for (int k = 0; k < 4; k++) dst[i * QK_TURBO{n} + il * 16 + g * 4 + k] = reg[g][k];
        }}
}}""")
        if ex.dequant[t]["dequant_t4"]:
            out.append(f"""
void th_dequant_t4_{t}(const unsigned char * src, int64_t nblocks, float * dst) {{
    const {blk} * b = (const {blk} *) src;
    for (int64_t i = 0; i < nblocks; i++)
        for (short il = 0; il < QK_TURBO{n} / 4; il++) {{
            float4 reg; dequantize_turbo{n}_0_t4<float4>(b + i, il, reg);
            for (int k = 0; k < 4; k++) dst[i * QK_TURBO{n} + il * 4 + k] = reg[k];
        }}
}}""")
    if ex.has_wht:
        out.append("""
void th_wht(const float * src, int64_t n, int direction, float * dst) {
    ggml_metal_kargs_turbo_wht a; a.n_elements = n; a.direction = direction;
    for (int64_t g = 0; g < n / 128; g++) kernel_turbo_wht(a, src, dst, (uint) g, 0, 1);
}""")
    out.append("}")
    return "\n".join(out) + "\n"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise Unsupported("no C++ compiler for the Metal shim: install g++ or clang++, or set CXX")
    return cxx


def cache_root() -> Path:
    """Where compiled shims are kept: $TURBO_HARNESS_CACHE, else $XDG_CACHE_HOME or ~/.cache, under turbo-harness/."""
    base = os.environ.get("TURBO_HARNESS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "turbo-harness"
    return Path(base) / "metal-src"


COMPILE_TIMEOUT_S = 240.0


def common_decls(fork: Path, cxx: str) -> str:
    """The turbo block structs and QK_TURBO* sizes of the fork's ``ggml-common.h`` as Metal code sees them.

    The header is run through the host preprocessor (its C branch, so every ``#if`` - e.g. ``TURBO4_USE_4BIT`` - is
    resolved as the fork's builds resolve it) and the ``block_turbo*`` typedefs are cut from the result by name;
    ``ggml_half`` is then the shim's ``half``. (The whole header cannot be included: its other blocks put half in
    anonymous unions, which C++ refuses for a type with constructors.)

    Raises:
        Unsupported: the header is missing or cannot be preprocessed.
    """
    common = Path(fork) / "ggml/src/ggml-common.h"
    if not common.is_file():
        raise Unsupported("the Metal shim needs ggml/src/ggml-common.h, which this fork lacks")
    base = [cxx, "-x", "c", "-E", "-DGGML_COMMON_DECL_C", str(common)]
    try:
        pre = subprocess.run(base, capture_output=True, text=True, timeout=60)
        macros = subprocess.run(base[:4] + ["-dM"] + base[4:], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unsupported(f"could not preprocess ggml-common.h for the Metal shim: {e}") from None
    if pre.returncode or macros.returncode:
        raise Unsupported(f"could not preprocess ggml-common.h for the Metal shim: {(pre.stderr or macros.stderr)[:200]}")
    defs = [ln for ln in macros.stdout.splitlines() if re.match(r"#define (QK_TURBO\w*|NL_TURBO\w*|TURBO4_USE_4BIT)\b", ln)]
    structs = [it.text for it in S.items(common, pre.stdout)
               if it.kind == "decl" and re.fullmatch(r"block_turbo\d_0", it.name) and it.text.lstrip().startswith("typedef")]
    return "typedef half ggml_half;\ntypedef half2 ggml_half2;\n" + "\n".join(defs + structs) + "\n"
FLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-DTURBO_USE_4MAG=1"]


def build_shim(fork: Path, ex: Extract | None = None, cache: Path | None = None) -> tuple[Path, Extract, bool]:
    """Compile the extracted Metal items for the host (cached by content hash).

    Returns:
        (shared library path, the extract, whether it was compiled now (False: found in the cache)).
    Raises:
        Unsupported: no Metal source, no C++ compiler, or the fork's Metal code does not compile through the shim
            (the message quotes the first error with its place in the fork's file): nothing can run on the host.
    """
    fork = Path(fork)
    src = metal_source(fork)
    if src is None:
        raise Unsupported(f"the fork has no Metal source ({METAL_REL} absent): nothing to run on the host")
    impl = fork / "ggml/src/ggml-metal/ggml-metal-impl.h"
    common = fork / "ggml/src/ggml-common.h"
    for h in (impl, common):
        if not h.is_file():
            raise Unsupported(f"the Metal shim needs {h.relative_to(fork)}, which this fork lacks")
    cxx = _compiler()
    # the key: every input of the unit (the Metal source, the headers, the shim header, this module, compiler, flags)
    h = hashlib.sha256()
    for part in (src.read_bytes(), impl.read_bytes(), common.read_bytes(), SHIM_H.read_bytes(),
                 Path(__file__).read_bytes(), cxx.encode(), " ".join(FLAGS).encode()):
        h.update(hashlib.sha256(part).digest())
    d = (cache or cache_root()) / h.hexdigest()[:24]
    lib, meta = d / "libturbo_metal_src.so", d / "extract.json"
    if lib.is_file() and meta.is_file() and ex is None:
        return lib, Extract.from_json(src, meta.read_text()), False
    ex = ex or extract(fork)
    unit = ('#include "metal_shim.h"\n#include <cstring>\n' + common_decls(fork, cxx) +
            f'#include "{impl}"\n' + ex.text() + '#line 1 "turbo-harness-driver.cpp"\n' + _driver(ex))
    d.mkdir(parents=True, exist_ok=True)
    # every file is written under a name of this process and renamed when complete, extract.json before the library:
    # a second process (a parallel test worker) compiling the same key never reads a half-written file, and one that
    # finds the library finds its extract
    pid = os.getpid()

    def put(name: str, text: str) -> Path:
        part = d / f".{name}.{pid}.part"
        part.write_text(text)
        os.replace(part, d / name)
        return d / name
    put("metal_shim.h", SHIM_H.read_text())
    put("unit.cpp", unit)
    tmp = d / f"lib.{pid}.tmp"
    cmd = [cxx, *FLAGS, f"-I{d}", str(d / "unit.cpp"), "-o", str(tmp)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise Unsupported(f"compiling the Metal shim took longer than {COMPILE_TIMEOUT_S:g} s") from None
    except OSError as e:
        raise Unsupported(f"could not run {cxx} for the Metal shim: {e}") from None
    if r.returncode != 0:
        (d / "compile.log").write_text(r.stderr)
        first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:300])
        raise Unsupported(f"the fork's Metal code does not compile for the host through the shim: {first.strip()}")
    put(meta.name, ex.to_json())
    os.replace(tmp, lib)
    return lib, ex, True


class MetalSource:
    """The compiled shim, loaded with ctypes: the Metal source's writer and readers on the host.

    Arrays: rows float32 (n, ncols), ncols a multiple of the type's block size; raw bytes flat uint8.
    Raises Unsupported for a route the extract lacks (with the reason).
    """

    def __init__(self, fork: Path, cache: Path | None = None):
        self.lib_path, self.extract, self.compiled_now = build_shim(fork, cache=cache)
        self.lib = ctypes.CDLL(str(self.lib_path))

    def _fn(self, name: str, why: str):
        try:
            return getattr(self.lib, name)
        except AttributeError:
            raise Unsupported(self.extract.missing.get(why, f"{name} is not in the Metal shim")) from None

    def block(self, t: str) -> tuple[int, int]:
        """(values per block, bytes per block) of a type as the Metal source's structs define them (QK_TURBO*,
        sizeof(block_turbo*_0)). Raises Unsupported for a type the shim lacks."""
        return int(self._fn(f"th_qk_{t}", t)()), int(self._fn(f"th_bytes_{t}", t)())

    def set_rows(self, t: str, x: np.ndarray) -> np.ndarray:
        """Quantise float32 rows (n, ncols) with the Metal ``kernel_set_rows_*`` of type t, one row per threadgroup;
        returns the blocks as flat uint8 (n * ncols / QK * block bytes). Raises Unsupported for rows that are not
        whole 128-value groups or a type without a set_rows kernel."""
        qk, nb = self.block(t)
        x = np.ascontiguousarray(x, np.float32)
        n, ncols = x.shape
        if ncols % 128 or ncols % qk:
            raise Unsupported(f"metal-src set_rows needs rows of whole 128-value groups (got {ncols})")
        out = np.zeros(n * (ncols // qk) * nb, np.uint8)
        f = self._fn(f"th_set_rows_{t}", f"{t}:set_rows")
        f(x.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(n), ctypes.c_int64(ncols), out.ctypes.data_as(ctypes.c_void_p))
        return out

    def dequant(self, t: str, route: str, raw: np.ndarray, nvalues: int) -> np.ndarray:
        """Decode flat uint8 blocks to float32 (nvalues,) through ``dequantize_*`` (route 'dequant', 16 values per
        call) or ``dequantize_*_t4`` ('dequant_t4', 4 per call). Values stay in the rotated domain (as on Metal).
        Raises Unsupported when the bytes are not whole blocks or the function is missing."""
        qk, nb = self.block(t)
        raw = np.ascontiguousarray(raw, np.uint8)
        nblocks = nvalues // qk
        if nvalues % qk or raw.size != nblocks * nb:
            raise Unsupported(f"{raw.size} bytes are not {nblocks} Metal {t} blocks of {nb} bytes")
        out = np.zeros(nvalues, np.float32)
        f = self._fn(f"th_{route}_{t}", f"{t}:{route}")
        f(raw.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(nblocks), out.ctypes.data_as(ctypes.c_void_p))
        return out

    def wht(self, x: np.ndarray, direction: int) -> np.ndarray:
        """``kernel_turbo_wht`` (half4 butterfly) on float32 values in 128-value groups; direction 0 forward, 1
        inverse. Returns float32 of x's shape."""
        x = np.ascontiguousarray(x, np.float32)
        if x.size % 128:
            raise Unsupported("kernel_turbo_wht works on whole 128-value groups")
        out = np.zeros_like(x)
        f = self._fn("th_wht", "wht")
        f(x.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size), ctypes.c_int(int(direction)),
          out.ctypes.data_as(ctypes.c_void_p))
        return out
