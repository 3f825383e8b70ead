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

from dataclasses import dataclass

import numpy as np

GROUP = 128  # rotation group size; one block per group for all three turbo types


@dataclass(frozen=True)
class TurboFormat:
    """Byte layout of one turbo block of GROUP values.

    Attributes:
        name: ggml type name ('turbo2', 'turbo3', 'turbo4').
        bits: index bits per value.
        block_bytes: bytes per block.
        norm_offset: byte offset of the fp16 corrected norm.
        reserved: (offset, size) of a field that must be zero, or None.
    """

    name: str
    bits: int
    block_bytes: int
    norm_offset: int = 0
    reserved: tuple[int, int] | None = None

    @property
    def levels(self) -> int:
        return 2 ** self.bits

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.block_bytes / GROUP


# block_turbo2_0: half norm; u8 qs[32] (2-bit, 4 per byte)                     -> 34 bytes
# block_turbo3_0: half norm; u8 qs[32] (low 2 bits); u8 signs[16] (bit 2)     -> 50 bytes
# block_turbo4_0: half norm; half rnorm (reserved, 0); u8 qs[64] (nibbles)    -> 68 bytes
FORMATS: dict[str, TurboFormat] = {
    "turbo2": TurboFormat("turbo2", 2, 2 + GROUP // 4),
    "turbo3": TurboFormat("turbo3", 3, 2 + GROUP // 4 + GROUP // 8),
    "turbo4": TurboFormat("turbo4", 4, 4 + GROUP // 2, reserved=(2, 2)),
}
TURBO_TYPES = tuple(FORMATS)


def fmt(type_name: str) -> TurboFormat:
    """Look up a turbo format by ggml type name. Raises KeyError with the known names."""
    try:
        return FORMATS[type_name]
    except KeyError:
        raise KeyError(f"unknown turbo type {type_name!r}; known: {', '.join(FORMATS)}") from None


def pack(type_name: str, indices: np.ndarray, norms: np.ndarray, reserved: np.ndarray | None = None) -> np.ndarray:
    """Pack indices and fp16 norms into raw blocks.

    Args:
        type_name: 'turbo2' | 'turbo3' | 'turbo4'.
        indices: integer array (n_blocks, 128), values in [0, 2**bits).
        norms: float array (n_blocks,); stored as IEEE fp16.
        reserved: optional uint16 array (n_blocks,) written into turbo4's reserved field (tests only).

    Returns:
        uint8 array (n_blocks, block_bytes).
    """
    f = fmt(type_name)
    idx = np.asarray(indices).astype(np.uint8)
    n = idx.shape[0]
    if idx.shape != (n, GROUP):
        raise ValueError(f"indices must have shape (n, {GROUP}), got {idx.shape}")
    out = np.zeros((n, f.block_bytes), dtype=np.uint8)
    out[:, 0:2] = np.asarray(norms, dtype=np.float16).reshape(n, 1).view(np.uint8)
    if f.name in ("turbo2", "turbo3"):
        low = (idx & 0x3).reshape(n, GROUP // 4, 4)
        out[:, 2:2 + GROUP // 4] = (low[..., 0] | (low[..., 1] << 2) | (low[..., 2] << 4) | (low[..., 3] << 6))
        if f.name == "turbo3":
            hi = ((idx >> 2) & 0x1).reshape(n, GROUP // 8, 8)
            out[:, 2 + GROUP // 4:] = np.packbits(hi, axis=-1, bitorder="little")[..., 0]
    else:
        if reserved is not None:
            out[:, 2:4] = np.asarray(reserved, dtype=np.uint16).reshape(n, 1).view(np.uint8)
        nib = (idx & 0xF).reshape(n, GROUP // 2, 2)
        out[:, 4:] = nib[..., 0] | (nib[..., 1] << 4)
    return out


def unpack(type_name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unpack raw blocks.

    Args:
        blocks: uint8 array (n_blocks, block_bytes) (or flat bytes of a whole number of blocks).

    Returns:
        (indices uint8 (n, 128), norms float16 (n,), reserved uint16 (n,) - zeros when the type has none).
    """
    f = fmt(type_name)
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, f.block_bytes)
    n = b.shape[0]
    norms = b[:, 0:2].copy().view(np.float16).reshape(n)
    reserved = np.zeros(n, dtype=np.uint16)
    if f.name in ("turbo2", "turbo3"):
        qs = b[:, 2:2 + GROUP // 4]
        idx = np.stack([(qs >> s) & 0x3 for s in (0, 2, 4, 6)], axis=-1).reshape(n, GROUP)
        if f.name == "turbo3":
            hi = np.unpackbits(b[:, 2 + GROUP // 4:, None], axis=-1, bitorder="little").reshape(n, GROUP)
            idx = idx | (hi << 2)
    else:
        reserved = b[:, 2:4].copy().view(np.uint16).reshape(n)
        qs = b[:, 4:]
        idx = np.stack([qs & 0xF, qs >> 4], axis=-1).reshape(n, GROUP)
    return idx.astype(np.uint8), norms, reserved


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
        blocks: uint8 (n, block_bytes). centroids: float (2**bits,) - the table under test.
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
    if type_name in FORMATS:
        if centroids is None or type_name not in centroids:
            raise ValueError(f"decoding {type_name} needs its centroid table")
        return decode(type_name, raw.reshape(-1, FORMATS[type_name].block_bytes), centroids[type_name]).reshape(nrows, ncols)
    if type_name in CLASSIC_DECODERS:
        return CLASSIC_DECODERS[type_name][2](raw, nrows * ncols).reshape(nrows, ncols)
    if type_name == "f32":
        return raw.view(np.float32).reshape(nrows, ncols).copy()
    if type_name == "f16":
        return raw.view(np.float16).astype(np.float32).reshape(nrows, ncols)
    raise ValueError(f"no reference decoder for type {type_name!r}")


def row_bytes(type_name: str, ncols: int) -> int:
    """Bytes of one row of ncols values for the types this module knows (turbo, q8_0, q4_0, f16, f32)."""
    if type_name in FORMATS:
        return ncols // GROUP * FORMATS[type_name].block_bytes
    if type_name in CLASSIC_DECODERS:
        blk, size, _ = CLASSIC_DECODERS[type_name]
        return ncols // blk * size
    return ncols * {"f32": 4, "f16": 2}[type_name]


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
