"""Type traits (block size, bytes per block) read from the build under test, and KV-size predictions.

Sizes are never taken from docs: :func:`type_traits` asks the build's own ``libggml-base`` through
``ggml_type_name`` / ``ggml_blck_size`` / ``ggml_type_size``.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from harness.errors import HarnessError

TURBO_TYPES = ("turbo2", "turbo3", "turbo4")
TURBO_GROUP = 128  # the fork pads every turbo head to a multiple of this (checked against blck_size below)


@dataclass(frozen=True)
class TypeTrait:
    """One ggml type: ``blck`` values stored in ``size`` bytes (bits per value = 8*size/blck)."""

    name: str
    id: int
    blck: int
    size: int

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.size / self.blck


def _lib_path(bdir: Path) -> Path:
    for sub in ("bin", "lib", "."):
        for p in sorted((Path(bdir) / sub).glob("libggml-base.*")):
            if p.suffix in (".so", ".dylib", ".dll") or ".so." in p.name:
                return p
    raise HarnessError(f"no libggml-base shared library in {bdir}/bin: build the fork with BUILD_SHARED_LIBS=ON (`make build`)")


@lru_cache(maxsize=8)
def type_traits(bdir: str | Path) -> dict[str, TypeTrait]:
    """All ggml types the build knows, by name, measured from the build's ``libggml-base``.

    Args:
        bdir: build folder (holding bin/libggml-base.so).

    Returns:
        {name: TypeTrait}; removed/deprecated types are left out.

    Raises:
        HarnessError: the library is missing or does not export the ggml type functions.
    """
    lib_path = _lib_path(Path(bdir))
    try:
        lib = ctypes.CDLL(str(lib_path))
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        lib.ggml_blck_size.restype = ctypes.c_int64
        lib.ggml_blck_size.argtypes = [ctypes.c_int]
        lib.ggml_type_size.restype = ctypes.c_size_t
        lib.ggml_type_size.argtypes = [ctypes.c_int]
    except (OSError, AttributeError) as e:
        raise HarnessError(f"cannot read type traits from {lib_path}: {e}") from None
    out: dict[str, TypeTrait] = {}
    for i in range(256):
        raw = lib.ggml_type_name(i)
        try:
            name = raw.decode() if raw else ""
        except UnicodeDecodeError:  # past GGML_TYPE_COUNT the table is not ours to read
            break
        if name == "NONE":
            break
        blck, size = int(lib.ggml_blck_size(i)), int(lib.ggml_type_size(i))
        if not name or blck <= 0 or size <= 0 or " " in name or name == "DEPRECATED":
            continue
        out[name] = TypeTrait(name, i, blck, size)
    if not out:
        raise HarnessError(f"{lib_path} reports no ggml types")
    return out


def padded_head(head_dim: int, type_name: str) -> int:
    """Head width the fork stores for a type: turbo types pad to a multiple of 128, others keep it."""
    if type_name in TURBO_TYPES and head_dim % TURBO_GROUP:
        return ((head_dim + TURBO_GROUP - 1) // TURBO_GROUP) * TURBO_GROUP
    return head_dim


def predict_kv_bytes(trait: TypeTrait, cells: int, seqs: int, layers: int, n_head_kv: int, head_dim: int) -> int:
    """Bytes of one of K or V: layers x streams x cells rows of n_head_kv*padded_head values.

    Args:
        trait: the type's measured traits; cells: KV cells per stream; seqs: streams;
        layers: KV layers; n_head_kv: KV heads; head_dim: real head width (before padding).

    Raises:
        HarnessError: a row is not a whole number of blocks (the type cannot hold this head size).
    """
    width = n_head_kv * padded_head(head_dim, trait.name)
    if width % trait.blck:
        raise HarnessError(f"{trait.name} blocks of {trait.blck} do not divide a KV row of {width} values")
    return layers * seqs * cells * (width // trait.blck) * trait.size


def bits_per_real_value(kv_bytes: float, cells: int, seqs: int, layers: int, n_head_kv: int, head_dim: int) -> float:
    """Effective bits per *real* (unpadded) cached value: 8*bytes / (layers*seqs*cells*n_head_kv*head_dim)."""
    n = layers * seqs * cells * n_head_kv * head_dim
    return 8.0 * kv_bytes / n if n else math.nan
