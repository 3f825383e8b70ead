"""Who reads a writer's bytes, and who un-rotates them: a writer is judged whenever any reader can decode its bytes
(spec "Every backend, and how it was examined"), whether or not its own backend can read them back.

PQ1, PQ3, PQ4 and PQ5 decode the bytes of every quantise path. A backend that writes a type it cannot read (Vulkan
writes turbo2/turbo4 but reads only turbo3 on fork 69d8e4be4) has its bytes decoded by another backend's exact
decode route (:func:`harness.checks.observations.byte_reader`): the bytes are the common block format, so any reader
decodes them. The cell then says who decoded them (:attr:`Reader.note`), its details name the reader
(``details['reader']``, which :func:`harness.checks.common.annotate_modes` and :func:`harness.checks.examined.measured`
read: the write op ran on the writer's backend, the decode on the reader's), and where no reader exists the cell stays
SKIP with the writer's own reason (Unsupported from :func:`byte_reader`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.checks.common import Context
from harness.checks.observations import byte_reader, centroid_table
from harness.errors import Unsupported
from harness.reference import turbo as T


@dataclass(frozen=True)
class Reader:
    """The decode route that reads the bytes ``writer`` writes for ``type``: its own, or another backend's."""

    writer: str
    type: str
    backend: str
    route: str

    @property
    def path(self) -> str:
        """'cpu:to_float'."""
        return f"{self.backend}:{self.route}"

    @property
    def foreign(self) -> bool:
        """True when another backend reads the writer's bytes (the writer cannot read this type)."""
        return self.backend != self.writer

    @property
    def note(self) -> str:
        """The caveat of a cell judged through a foreign reader ('' for the writer's own reader)."""
        return f"{self.writer} writes {self.type} but cannot read it: decoded by {self.path}" if self.foreign else ""

    def details(self) -> dict:
        """{'reader': 'cpu:to_float'} for a foreign reader, {} otherwise (cell details)."""
        return {"reader": self.path} if self.foreign else {}

    def decode(self, ctx: Context, raw: np.ndarray, nrows: int, ncols: int) -> np.ndarray:
        """The writer's bytes decoded by this reader: float32 (nrows, ncols), rotated domain."""
        return ctx.target.decode(self.backend, self.route, self.type, raw, nrows, ncols)


def reader_of(ctx: Context, writer: str, type_name: str) -> Reader:
    """The reader of the bytes a backend writes for a type (:func:`byte_reader`, cached there).

    Raises:
        Unsupported: no backend of the target decodes the type exactly (the writer's own reason).
    """
    rb, rr = byte_reader(ctx, writer, type_name)
    return Reader(writer, type_name, rb, rr)


def reader_indices(ctx: Context, reader: Reader, raw: np.ndarray, nrows: int) -> np.ndarray:
    """Indices of a writer's quantised rows as its reader decodes them (packing-order independent).

    Decoded value / stored norm, snapped to the nearest entry of the reader's table (sorted ascending, so index 0 is
    the most negative centroid). Returns int array (nrows * ncols/128, 128).
    """
    t = reader.type
    table = np.sort(centroid_table(ctx, reader.backend, reader.route, t))
    f = T.fmt(t)
    blocks = np.asarray(raw, np.uint8).reshape(-1, f.group_bytes)
    norms = blocks[:, 0:2].copy().view(np.float16).astype(np.float64).reshape(-1)
    dec = reader.decode(ctx, raw, nrows, blocks.shape[0] * 128 // nrows).reshape(-1, 128)
    safe = np.where(np.isfinite(norms) & (norms != 0), norms, 1.0)
    u = dec.astype(np.float64) / safe[:, None]
    return np.argmin(np.abs(u[..., None] - table[None, None, :]), axis=-1)


def unrotate(ctx: Context, reader: Reader, x: np.ndarray) -> tuple[np.ndarray, str]:
    """Undo the rotation of decoded rows with the graph's inverse WHT, as the fork's graph does.

    The writer's own rotation op when its backend has one, else the reader's (a writer-only backend without the op).

    Args:
        x: float32 (n, 128k) decoded rows (rotated domain).
    Returns:
        (float32 rows in the original domain, the op's path that ran, e.g. 'vulkan:turbo_wht').
    Raises:
        Unsupported: neither backend has the op (the writer's reason).
    """
    try:
        return ctx.target.wht(reader.writer, x, 1, 128), f"{reader.writer}:turbo_wht"
    except Unsupported:
        if not reader.foreign:
            raise
        return ctx.target.wht(reader.backend, x, 1, 128), f"{reader.backend}:turbo_wht"

