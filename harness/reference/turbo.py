"""Reference quantise / pack / unpack / decode for the turbo KV-cache formats, plus q8_0 and q4_0.

The math (TurboQuant, arXiv 2504.19874, Algorithm 1 "TurboQuant_mse"; PolarQuant arXiv
2502.02617 Sec. 3): per group of d = 128 values store the L2 norm, rotate the normalised vector,
replace each rotated coordinate by the index of its nearest centroid. The fork additionally stores
a corrected norm ||x|| / ||c|| (c = chosen centroids) so that the decoded vector has the input's norm.

The byte layouts below are the formats as the fork declares them for its block structs; they are the
*specification* the harness checks the build against (PQ4 measures the build's sizes from its type
traits and compares). Index bit order inside a byte is little-endian (element j of a byte occupies
the lowest bits first).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

from harness.errors import Unsupported
from harness.turbo_types import TURBO_TYPES

GROUP = 128  # rotation group size; one block per group for all three turbo types


@dataclass(frozen=True)
class TurboFormat:
    """Byte layout of a turbo type: blocks of ``block`` values, ``128 // block`` blocks per rotation group.

    Attributes:
        name: ggml type name ('turbo2', 'turbo3', 'turbo4').
        bits: index bits per value.
        block: values per block (128 today; 32 for turbo2/turbo3 in fork commits before b9df4c3d).
        block_bytes: bytes per block.
        reserved: (offset, size) of a per-block field that must be zero, or None.
    """

    name: str
    bits: int
    block: int
    block_bytes: int
    reserved: tuple[int, int] | None = None

    @property
    def levels(self) -> int:
        return 2 ** self.bits

    @property
    def group_bytes(self) -> int:
        """Bytes per rotation group of 128 values."""
        return self.block_bytes * (GROUP // self.block)

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.block_bytes / self.block

    @property
    def qs_offset(self) -> int:
        """Byte offset of the packed indices in a block: after the fp16 norm and the reserved field, if any."""
        return sum(self.reserved) if self.reserved else 2


def _layout(name: str, block: int) -> TurboFormat:
    # turbo2: half norm; u8 qs[block/4] (2-bit, 4 per byte)                  -> 34 bytes for 128 (10 for 32)
    # turbo3: half norm; u8 qs[block/4] (low 2 bits); u8 signs[block/8] (bit 2) -> 50 bytes for 128 (14 for 32)
    # turbo4: half norm; half rnorm (reserved, 0); u8 qs[block/2] (nibbles)   -> 68 bytes for 128
    if name == "turbo2":
        return TurboFormat(name, 2, block, 2 + block // 4)
    if name == "turbo3":
        return TurboFormat(name, 3, block, 2 + block // 4 + block // 8)
    return TurboFormat(name, 4, block, 4 + block // 2, reserved=(2, 2))


# Layouts the harness knows, by (type, values per block). The norm of a group is stored in every block.
KNOWN_LAYOUTS = {(n, b): _layout(n, b) for n, b in (("turbo2", 128), ("turbo3", 128), ("turbo4", 128),
                                                    ("turbo2", 32), ("turbo3", 32))}
DEFAULT_FORMATS: dict[str, TurboFormat] = {n: KNOWN_LAYOUTS[(n, 128)] for n in TURBO_TYPES}
FORMATS = DEFAULT_FORMATS  # the specification's layouts (read-only; a target's own are in its Layouts)


class UnknownLayout(Unsupported):
    """A build's turbo type has block traits that match no layout the reference knows: the checks that
    need to read or write its bytes SKIP with this one-line reason (PQ4 reports it as its finding)."""


@dataclass(frozen=True)
class Layouts:
    """The harness's reading of one target's turbo layouts (see :func:`select_layouts`).

    Attributes:
        formats: {type name: the known layout that matches the target's traits}.
        unknown: {type name: one-line reason} for types whose traits match no known layout.
        traits: {type name: (values per block, bytes per block)} as the target reports them.
    """

    formats: dict = field(default_factory=lambda: dict(DEFAULT_FORMATS))
    unknown: dict = field(default_factory=dict)
    traits: dict = field(default_factory=dict)

    @property
    def notes(self) -> list[str]:
        """One line per type whose layout is unknown (for the report)."""
        return [self.unknown[t] for t in TURBO_TYPES if t in self.unknown]

    def get(self, type_name: str) -> TurboFormat:
        """The layout of a turbo type. Raises UnknownLayout (with the reason) or KeyError (not a turbo type)."""
        if type_name in self.unknown:
            raise UnknownLayout(self.unknown[type_name])
        try:
            return self.formats[type_name]
        except KeyError:
            raise KeyError(f"unknown turbo type {type_name!r}; known: {', '.join(TURBO_TYPES)}") from None

    def describe(self) -> dict:
        """{type: 'B values / N bytes' or the unknown-layout reason} for the report."""
        return {t: self.unknown.get(t) or f"{self.formats[t].block} values / {self.formats[t].block_bytes} bytes"
                for t in TURBO_TYPES}


def select_layouts(infos: dict[str, dict | None]) -> Layouts:
    """Select, per type, the known layout matching a build's type traits (block size, bytes per block).

    Args:
        infos: {type name: {'block_size', 'type_size'} or None}, as a target reports them. A type
            that is absent (None) keeps the default layout; PQ4 reports it missing.
    Returns:
        Layouts whose ``unknown`` names each type with traits no known layout has, e.g.
        "turbo4: 128 values in 66 bytes, no known layout". Nothing global is changed: the layouts
        travel with the target (:meth:`harness.targets.base.Target.layouts`).
    """
    formats, unknown, traits = dict(DEFAULT_FORMATS), {}, {}
    for name in TURBO_TYPES:
        info = infos.get(name)
        if not info:
            continue
        blk, size = int(info["block_size"]), int(info["type_size"])
        traits[name] = (blk, size)
        lay = KNOWN_LAYOUTS.get((name, blk))
        if lay is not None and lay.block_bytes == size:
            formats[name] = lay
        else:
            known = ", ".join(f"{f.block} in {f.block_bytes}" for (n, _), f in KNOWN_LAYOUTS.items() if n == name)
            unknown[name] = (f"{name}: {blk} values in {size} bytes, no known layout (known: {known}); "
                             f"the reference cannot read or write its blocks")
    return Layouts(formats, unknown, traits)


_ACTIVE: ContextVar[Layouts] = ContextVar("turbo_layouts", default=Layouts())


@contextmanager
def layouts_in_use(lay: Layouts | None):
    """Make ``lay`` the layouts that :func:`fmt`, :func:`pack`, :func:`unpack` and :func:`decode_any`
    use for type names inside this block (context-local: another thread or run keeps its own).
    ``None`` leaves the current ones."""
    if lay is None:
        yield
        return
    token = _ACTIVE.set(lay)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def fmt(type_name: str | TurboFormat) -> TurboFormat:
    """The layout of a turbo type in the layouts in use (see :func:`layouts_in_use`); a TurboFormat is
    returned as it is (a target emulating a fork passes its own).

    Raises:
        UnknownLayout: the target's traits for this type match no known layout (a SKIP reason).
        KeyError: not a turbo type.
    """
    if isinstance(type_name, TurboFormat):
        return type_name
    return _ACTIVE.get().get(type_name)


def pack(type_name: str, indices: np.ndarray, norms: np.ndarray, reserved: np.ndarray | None = None) -> np.ndarray:
    """Pack indices and fp16 norms into raw blocks.

    Args:
        type_name: 'turbo2' | 'turbo3' | 'turbo4' (layout from :func:`fmt`: the layouts in use), or a
            TurboFormat (a target emulating a fork packs with its own layout).
        indices: integer array (n_groups, 128), values in [0, 2**bits).
        norms: float array (n_groups,); stored as IEEE fp16 in every block of the group.
        reserved: optional uint16 array (n_groups,) written into turbo4's reserved field (tests only).

    Returns:
        uint8 array (n_groups, group_bytes).
    """
    f = fmt(type_name)
    idx = np.asarray(indices).astype(np.uint8)
    n = idx.shape[0]
    if idx.shape != (n, GROUP):
        raise ValueError(f"indices must have shape (n, {GROUP}), got {idx.shape}")
    k, B = GROUP // f.block, f.block
    sub = idx.reshape(n * k, B)
    m = n * k
    out = np.zeros((m, f.block_bytes), dtype=np.uint8)
    with np.errstate(over="ignore"):  # norms beyond fp16 range store Inf, as an fp16 field does
        n16 = np.asarray(norms, dtype=np.float64).astype(np.float16)
    out[:, 0:2] = np.repeat(n16.reshape(n), k).reshape(m, 1).view(np.uint8)
    if f.name in ("turbo2", "turbo3"):
        low = (sub & 0x3).reshape(m, B // 4, 4)
        out[:, 2:2 + B // 4] = (low[..., 0] | (low[..., 1] << 2) | (low[..., 2] << 4) | (low[..., 3] << 6))
        if f.name == "turbo3":
            hi = ((sub >> 2) & 0x1).reshape(m, B // 8, 8)
            out[:, 2 + B // 4:] = np.packbits(hi, axis=-1, bitorder="little")[..., 0]
    else:
        if reserved is not None and f.reserved:
            o, sz = f.reserved
            out[:, o:o + sz] = np.repeat(np.asarray(reserved, dtype=np.uint16).reshape(n), k).reshape(m, 1).view(np.uint8)
        nib = (sub & 0xF).reshape(m, B // 2, 2)
        out[:, f.qs_offset:] = nib[..., 0] | (nib[..., 1] << 4)
    return out.reshape(n, f.group_bytes)


def unpack(type_name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unpack raw blocks.

    Args:
        blocks: uint8 array (n_groups, group_bytes) (or flat bytes of a whole number of groups).

    Returns:
        (indices uint8 (n, 128), norms float16 (n,) from each group's first block,
        reserved uint16 (n,): the largest reserved value in the group, zeros when the type has none).
    """
    f = fmt(type_name)
    k, B = GROUP // f.block, f.block
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, f.block_bytes)
    m = b.shape[0]
    n = m // k
    norms = b[:, 0:2].copy().view(np.float16).reshape(n, k)[:, 0].copy()
    reserved = np.zeros(n, dtype=np.uint16)
    if f.name in ("turbo2", "turbo3"):
        qs = b[:, 2:2 + B // 4]
        idx = np.stack([(qs >> s) & 0x3 for s in (0, 2, 4, 6)], axis=-1).reshape(m, B)
        if f.name == "turbo3":
            hi = np.unpackbits(b[:, 2 + B // 4:, None], axis=-1, bitorder="little").reshape(m, B)
            idx = idx | (hi << 2)
    else:
        if f.reserved:
            o, sz = f.reserved
            reserved = b[:, o:o + sz].copy().view(np.uint16).reshape(n, k).max(axis=1)
        qs = b[:, f.qs_offset:]
        idx = np.stack([qs & 0xF, qs >> 4], axis=-1).reshape(m, B)
    return idx.reshape(n, GROUP).astype(np.uint8), norms, reserved


def nearest_index(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the cell each value falls in: ``#{t : t <= v}`` (ties go up, as ``x < t`` tests do).

    Args:
        values: float array (...), rotated unit-vector coordinates.
        thresholds: sorted float array (k-1,).
    Returns:
        uint8 array of values' shape.
    """
    return np.searchsorted(np.asarray(thresholds), values, side="right").astype(np.uint8)


def quantize(x: np.ndarray, R: np.ndarray, centroids: np.ndarray, thresholds: np.ndarray,
             corrected: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference TurboQuant_mse quantiser with the fork's norm correction, in float64.

    Args:
        x: float array (n, 128), one rotation group per row.
        R: float array (128, 128), forward rotation.
        centroids: (k,) sorted; thresholds: (k-1,).
        corrected: store ||x|| / ||c|| (True) or ||x|| (the uncorrected variant).

    Returns:
        (indices uint8 (n, 128), stored norm float64 (n,), rotated unit coordinates float64 (n, 128)).
        All-zero rows give norm 0 and the indices of the zero vector.
    """
    x = np.asarray(x, dtype=np.float64)
    nrm = np.linalg.norm(x, axis=1)
    safe = np.where(nrm > 1e-10, nrm, 1.0)
    y = (x / safe[:, None]) @ np.asarray(R, dtype=np.float64).T
    y[nrm <= 1e-10] = 0.0
    idx = nearest_index(y, thresholds)
    c = np.asarray(centroids, dtype=np.float64)[idx]
    cn = np.linalg.norm(c, axis=1)
    stored = np.where(cn > 1e-10, nrm / np.where(cn > 1e-10, cn, 1.0), nrm) if corrected else nrm
    return idx, stored, y


def decode(type_name: str, blocks: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Decode raw blocks to rotated-domain values ``centroid[idx] * norm`` in float32 arithmetic.

    Args:
        blocks: uint8 (n, group_bytes). centroids: float (2**bits,) - the table under test.
    Returns:
        float32 array (n, 128). The product is formed in float32, as a C decoder would.
    """
    idx, norms, _ = unpack(type_name, blocks)
    return np.asarray(centroids, dtype=np.float32)[idx] * norms.astype(np.float32)[:, None]


# ---------- ggml's classic block formats, for comparison rows and q8_0 attention partners ----------

def decode_q8_0(raw: np.ndarray, n_values: int) -> np.ndarray:
    """Decode ggml q8_0 (blocks of 32: fp16 scale d, 32 x int8; value = d * q). Source: ggml-common.h.

    Args:
        raw: uint8 flat array of n_values/32 * 34 bytes. Returns float32 (n_values,).
    """
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 34)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    q = b[:, 2:].view(np.int8).astype(np.float32)
    return (q * d).reshape(-1)[:n_values]


def decode_q4_0(raw: np.ndarray, n_values: int) -> np.ndarray:
    """Decode ggml q4_0 (blocks of 32: fp16 d; 16 bytes, low nibbles = values 0..15, high = 16..31;
    value = d * (q - 8)). Source: ggml-common.h / ggml-quants.c dequantize_row_q4_0.

    Returns float32 (n_values,).
    """
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 18)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    qs = b[:, 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32) - 8.0
    return (q * d).reshape(-1)[:n_values]


CLASSIC_DECODERS = {"q8_0": (32, 34, decode_q8_0), "q4_0": (32, 18, decode_q4_0)}


def decode_any(type_name: str, raw: np.ndarray, nrows: int, ncols: int, centroids: dict | None = None) -> np.ndarray:
    """Decode rows of any supported type with the reference decoders.

    Args:
        type_name: a turbo type (needs ``centroids[type_name]``), 'q8_0', 'q4_0' or 'f32'/'f16'.
        raw: uint8 bytes of nrows rows of ncols values.
    Returns:
        float32 (nrows, ncols); turbo types in the rotated domain.
    """
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if type_name in TURBO_TYPES:
        if centroids is None or type_name not in centroids:
            raise ValueError(f"decoding {type_name} needs its centroid table")
        return decode(type_name, raw.reshape(-1, fmt(type_name).group_bytes), centroids[type_name]).reshape(nrows, ncols)
    if type_name in CLASSIC_DECODERS:
        return CLASSIC_DECODERS[type_name][2](raw, nrows * ncols).reshape(nrows, ncols)
    if type_name == "f32":
        return raw.view(np.float32).reshape(nrows, ncols).copy()
    if type_name == "f16":
        return raw.view(np.float16).astype(np.float32).reshape(nrows, ncols)
    raise ValueError(f"no reference decoder for type {type_name!r}")

def quantize_classic(type_name: str, x: np.ndarray) -> np.ndarray:
    """q8_0 / q4_0 quantisers, written from ggml's format definition (blocks of 32; q8_0: d = amax/127,
    q = round(x/d); q4_0: d = max/-8, q = clamp(floor(x/d + 8.5), 0, 15)).

    Args: x float32 (..., multiple of 32). Returns flat uint8 bytes (34 or 18 per block).
    """
    blocks = x.reshape(-1, 32).astype(np.float32)
    if type_name == "q8_0":
        amax = np.abs(blocks).max(axis=1)
        d = amax / 127.0
        inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0)
        q = np.round(blocks * inv[:, None]).astype(np.int8)
        out = np.zeros((len(blocks), 34), np.uint8)
        out[:, :2] = d.astype(np.float16).reshape(-1, 1).view(np.uint8)
        out[:, 2:] = q.view(np.uint8)
        return out.reshape(-1)
    idx = np.argmax(np.abs(blocks), axis=1)
    mx = blocks[np.arange(len(blocks)), idx]
    d = mx / -8.0
    inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0)
    q = np.clip(np.floor(blocks * inv[:, None] + 8.5), 0, 15).astype(np.uint8)
    out = np.zeros((len(blocks), 18), np.uint8)
    out[:, :2] = d.astype(np.float16).reshape(-1, 1).view(np.uint8)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out.reshape(-1)
