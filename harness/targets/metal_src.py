"""The route ``metal-src``: the fork's Metal per-block code run on the host CPU (:mod:`harness.fork.metal_src`).

A fork build target (:class:`harness.targets.fork.ForkTarget`) offers it as one more backend when the fork ships
``ggml-metal.metal``, no real Metal device is in the build and no remote device was asked for (a Mac - local, or
behind ``--rpc`` - is always the better witness and takes precedence). Its paths:

- ``metal-src:set_rows``: ``kernel_set_rows_turbo*`` (normalise, ``turbo_rotate_forward``, the midpoint chains, norm
  correction), one row per threadgroup;
- ``metal-src:dequant``: ``dequantize_turbo*_0`` (float table, 16 values per call), the flash-attention kernels' read;
- ``metal-src:dequant_t4``: ``dequantize_turbo*_0_t4`` (the half-precision LUTs, 4 values per call), the vector
  flash-attention read; turbo3 is compiled with ``TURBO_USE_4MAG=1``, the branch the fork selects on M1-M4;
- the rotation op: ``kernel_turbo_wht`` (half4 butterfly);
- flash attention: not on the host (:data:`harness.fork.metal_src.NOT_ON_HOST`), every such cell is SKIP.

Every cell of these paths carries :data:`harness.fork.metal_src.MODE_NOTE`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.errors import Unsupported
from harness.fork import metal_src as M
from harness.targets.base import Backend, Routes

NAME = "metal-src"


class MetalSrcRoutes:
    """The metal-src backend of a target: built lazily (the first op compiles or finds the cached shim).

    Args:
        fork: the fork checkout holding ``ggml/src/ggml-metal/ggml-metal.metal``.
        cache: folder of compiled shims (default :func:`harness.fork.metal_src.cache_root`).
    """

    name = NAME

    def __init__(self, fork: Path, cache: Path | None = None):
        self.fork = Path(fork)
        self.cache = cache
        self._shim = None
        self._error: str | None = None

    @staticmethod
    def available(fork: Path | None) -> bool:
        """Whether the fork has a Metal source to run (cheap: no compile)."""
        return fork is not None and M.metal_source(Path(fork)) is not None

    def backend(self) -> Backend:
        return Backend(name=NAME, device="host CPU", kind="src", description=M.MODE_NOTE, mode="source", of="metal")

    def routes(self) -> Routes:
        return Routes(quantize=["set_rows"], decode=["dequant"], readers=["dequant_t4"], wht=True, attention=False,
                      attention_note=M.NOT_ON_HOST, wht_groups=(128,), wht_precision="f16")

    def shim(self) -> M.MetalSource:
        """The loaded shim. Raises Unsupported (once, then the same reason) when it cannot be built."""
        if self._shim is None:
            if self._error:
                raise Unsupported(self._error)
            try:
                self._shim = M.MetalSource(self.fork, cache=self.cache)
            except Unsupported as e:
                self._error = str(e)
                raise
        return self._shim

    def _check_layout(self, t: str) -> None:
        """The Metal struct must be the size the build's traits use, or bytes cannot be exchanged with other paths."""
        qk, nb = self.shim().block(t)
        from harness.reference import turbo as T
        try:
            f = T.fmt(t)
        except (T.UnknownLayout, KeyError):
            return
        if qk * f.group_bytes != nb * 128:
            raise Unsupported(f"the Metal source's block_{t}_0 is {nb} bytes per {qk} values, the build's traits "
                              f"{f.group_bytes} bytes per 128: bytes of one cannot be read by the other")

    def quantize(self, route: str, t: str, x: np.ndarray) -> np.ndarray:
        if route != "set_rows":
            raise Unsupported(f"metal-src has no quantize route {route!r}")
        self._check_layout(t)
        return self.shim().set_rows(t, x)

    def decode(self, route: str, t: str, raw: np.ndarray, nrows: int, ncols: int) -> np.ndarray:
        if route not in ("dequant", "dequant_t4"):
            raise Unsupported(f"metal-src has no decode route {route!r}")
        self._check_layout(t)
        return self.shim().dequant(t, route, raw, nrows * ncols).reshape(nrows, ncols)

    def wht(self, x: np.ndarray, direction: int, group: int = 128) -> np.ndarray:
        if group != 128:
            raise Unsupported("kernel_turbo_wht rotates 128-value groups only")
        return self.shim().wht(x, direction).reshape(np.shape(x))

    def flash_attn(self, *args, **kwargs):
        raise Unsupported(M.NOT_ON_HOST)

    def describe(self) -> dict:
        d = {"source": str(M.metal_source(self.fork)), "mode": M.MODE_NOTE}
        if self._shim is not None:
            ex = self._shim.extract
            d.update({"shim": str(self._shim.lib_path), "compiled_in_this_run": self._shim.compiled_now,
                      "items": [f"{it.name}:{it.line}" for it in ex.items], "left_out": ex.left_out,
                      "missing": ex.missing, "turbo3_t4_branch": "TURBO_USE_4MAG=1 (M1-M4)"})
        elif self._error:
            d["not_built"] = self._error
        return d
