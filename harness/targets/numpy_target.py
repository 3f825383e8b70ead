"""A NumPy implementation of a turbo fork, with faults that can be injected one at a time.

It exists to prove that the checks detect what they claim to: a correct NumpyTarget must pass
every check, and each fault must move the matching check off PASS. It can emulate several
backends (e.g. a CPU fallback and a GPU) with different faults per backend.

Faults (names accepted in ``faults``):
    dense_rotation      quantiser and graph op use a dense random orthogonal matrix, not a signed WHT
    quantizer_signs     the quantiser's WHT uses other sign vectors than the graph op
    uncorrected_norm    store ||x|| instead of ||x|| / ||c||
    perturbed_centroids the centroid table (decode and decisions) is moved off Lloyd-Max
    thresholds_off      decision thresholds shifted off the midpoints
    swapped_packing     index order inside each byte reversed when packing and unpacking
    nan_zero_rows       an all-zero row stores a NaN norm (0/0)
    no_output_inverse   attention ignores the request to inverse-rotate its output
    skip_q_rotation     attention ignores the request to rotate Q
    reserved_nonzero    turbo4's reserved field is written non-zero
    crash_attention     flash attention raises ProbeCrash (a backend that aborts)
    zero_indices        the quantiser stores index 0 for every value (a fork's CPU turbo2/turbo3 quantisers did)
    decode_unrotated    decode returns the original domain (R^T applied), as turbo4's CPU decode did before fe2ead96
    thresholds_shift_1e-6  every decision threshold moved 1e-6 away from zero (each still within 1e-6 of its
                        midpoint), as CUDA's turbo4 constants (±0.145561/±0.013964) differ from CPU's
                        (±0.145560/±0.013963) on fork 69d8e4be4
    partial_block_write the quantiser writes the indices of the first 32 values of each 128-value block only (the other
                        bytes keep the cleared buffer's zeros: index 0), with the block's right norm, as CUDA's
                        turbo3/turbo2 set_rows did after the block size became 128 (b9df4c3d, fixed by f028c66b)
    boundary_ties       a rotated coordinate within 1e-7 of a decision threshold gets the neighbouring index
                        (float32 rounding of another kernel's arithmetic, made deterministic): boundary ties only
"""
from __future__ import annotations

import numpy as np
from scipy.stats import ortho_group

from harness.errors import ProbeCrash, Unsupported
from harness.reference import turbo as T
from harness.reference.attention import attention
from harness.reference.lloydmax import lloyd_max
from harness.reference.wht import signed_wht_matrix
from harness.targets.base import Backend, Routes, Target

KNOWN_FAULTS = {"dense_rotation", "quantizer_signs", "uncorrected_norm", "perturbed_centroids", "thresholds_off",
                "swapped_packing", "nan_zero_rows", "no_output_inverse", "skip_q_rotation", "reserved_nonzero",
                "crash_attention", "decode_unrotated", "thresholds_shift_1e-6", "boundary_ties", "zero_indices",
                "partial_block_write"}
TIE_BAND = 1e-7  # the 'boundary_ties' fault's band around each threshold


def _signs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.choice([-1.0, 1.0], 128), rng.choice([-1.0, 1.0], 128)


class _Impl:
    """One emulated backend's behaviour."""

    def __init__(self, faults: set[str], seed: int = 42, formats: dict | None = None):
        self.seed = seed
        self.formats = dict(formats or T.DEFAULT_FORMATS)  # the emulated fork's own block layouts
        bad = set(faults) - KNOWN_FAULTS
        if bad:
            raise ValueError(f"unknown faults {sorted(bad)}; known: {sorted(KNOWN_FAULTS)}")
        self.faults = set(faults)
        s1, s2 = _signs(seed)
        self.R_op = signed_wht_matrix(s1, s2)
        if "dense_rotation" in self.faults:
            self.R_op = ortho_group.rvs(128, random_state=seed)
        self.R_q = self.R_op
        if "quantizer_signs" in self.faults:
            t1, t2 = _signs(seed + 1)
            self.R_q = signed_wht_matrix(t1, t2)
        self.tables = {}
        for name, f in self.formats.items():
            c = lloyd_max(f.bits, "beta", 128).centroids.astype(np.float32)
            if "perturbed_centroids" in self.faults:
                c = (c * np.where(np.abs(c) == np.abs(c).max(), 0.85, 1.0)).astype(np.float32)
            t = (0.5 * (c[1:] + c[:-1])).astype(np.float32)
            if "thresholds_off" in self.faults:
                t = (t + np.float32(0.002)).astype(np.float32)
            if "thresholds_shift_1e-6" in self.faults:
                t = (t + np.sign(t) * np.float32(1e-6)).astype(np.float32)
            self.tables[name] = (c, t)

    def _reorder(self, type_name: str, idx: np.ndarray) -> np.ndarray:
        # swap neighbours inside each byte: the packer's element order reversed
        per_byte = {"turbo2": 4, "turbo3": 4, "turbo4": 2}[type_name]
        n = idx.shape[0]
        return idx.reshape(n, -1, per_byte)[..., ::-1].reshape(n, 128)

    def quantize(self, type_name, x):
        x = np.asarray(x, np.float32)
        if type_name not in self.formats:
            raise Unsupported(f"numpy target has no quantiser for {type_name}")
        f = self.formats[type_name]
        c, t = self.tables[type_name]
        n, ncols = x.shape
        groups = x.reshape(-1, 128)
        idx, stored, y = T.quantize(groups, self.R_q, c, t, corrected="uncorrected_norm" not in self.faults)
        if "boundary_ties" in self.faults:
            j = np.searchsorted(t, y)
            lo, hi = np.clip(j - 1, 0, len(t) - 1), np.clip(j, 0, len(t) - 1)
            k = np.where(np.abs(y - t[lo]) <= np.abs(y - t[hi]), lo, hi)  # the nearest threshold
            tie = np.abs(y - t[k]) < TIE_BAND
            idx = np.where(tie, np.where(y >= t[k], k, k + 1), idx).astype(idx.dtype)
            cn = np.linalg.norm(c.astype(np.float64)[idx], axis=1)  # the corrected norm of the indices stored
            nrm = np.linalg.norm(groups.astype(np.float64), axis=1)
            stored = np.where(cn > 1e-10, nrm / np.where(cn > 1e-10, cn, 1.0), nrm)
        zero = np.linalg.norm(groups.astype(np.float64), axis=1) == 0
        if "nan_zero_rows" in self.faults:
            stored = np.where(zero, np.nan, stored)
        if "zero_indices" in self.faults:  # a quantiser that writes no indices (a fork's CPU turbo2/turbo3 did)
            idx = np.zeros_like(idx)
        if "partial_block_write" in self.faults:  # warps 1-3 of each block wrote elsewhere
            idx = idx.copy()
            idx[:, 32:] = 0
        if "swapped_packing" in self.faults:
            idx = self._reorder(type_name, idx)
        reserved = np.full(len(idx), 0x3C00, np.uint16) if "reserved_nonzero" in self.faults else None
        return T.pack(f, idx, stored, reserved).reshape(-1)

    def decode(self, type_name, raw, nrows, ncols):
        if type_name not in self.formats:
            return T.decode_any(type_name, raw, nrows, ncols)
        f = self.formats[type_name]
        blocks = np.asarray(raw, np.uint8).reshape(-1, f.group_bytes)
        idx, norms, _ = T.unpack(f, blocks)
        if "swapped_packing" in self.faults:
            idx = self._reorder(type_name, idx)
        c, _ = self.tables[type_name]
        out = c[idx] * norms.astype(np.float32)[:, None]
        if "decode_unrotated" in self.faults:
            out = (out.astype(np.float64) @ self.R_q).astype(np.float32)
        return out.reshape(nrows, ncols)

    def wht(self, x, direction, group=128):
        x = np.asarray(x, np.float64)
        R = self.R_op if group == 128 else self._small(group)
        g = x.reshape(-1, group)
        out = g @ (R.T if direction == 0 else R)
        return out.reshape(x.shape).astype(np.float32)

    def _small(self, group):
        # smaller groups: the first `group` entries of the sign vectors, as the fork's op does
        if "dense_rotation" in self.faults:
            return ortho_group.rvs(group, random_state=7)
        s1, s2 = _signs(self.seed)
        return signed_wht_matrix(s1[:group], s2[:group])


class NumpyTarget(Target):
    """NumPy fork emulation.

    Args:
        faults: faults applied to every backend.
        backends: list of (name, kind) pairs, default [('cpu', 'cpu')].
        backend_faults: extra faults per backend name, e.g. {'cpu': {'quantizer_signs'}}.
        formats: {turbo type: TurboFormat} block layouts this emulated fork uses (default the 128-value
            layouts); e.g. ``TurboFormat('turbo4', 4, 128, 66)`` for a turbo4 with no reserved rnorm field.
            Its type traits report them; the harness reads them only through those traits.
        unreadable: {backend: types} a backend can write but not read (decode and flash attention raise
            Unsupported), as Vulkan writes turbo2/turbo4 but reads only turbo3 on fork 69d8e4be4.
        devices: {backend: device name}, e.g. {'vulkan': 'llvmpipe (LLVM 15.0.6, 256 bits)'} for a software device
            (the backend table decides the examination mode from it); default the upper-cased name.
    """

    def __init__(self, faults=(), backends=(("cpu", "cpu"),), backend_faults: dict | None = None, seed: int = 42,
                 formats: dict | None = None, unreadable: dict | None = None, devices: dict | None = None):
        from harness.fork.backends import examination
        self.name = "numpy" + (f"[{','.join(sorted(faults))}]" if faults else "")
        devs = dict(devices or {})
        self._backends = [Backend(n, devs.get(n, n.upper()), k, "", *examination(n, devs.get(n, n.upper())))
                          for n, k in backends]
        self.unreadable = {b: set(ts) for b, ts in (unreadable or {}).items()}
        bf = backend_faults or {}
        self.formats = {**T.DEFAULT_FORMATS, **(formats or {})}
        self.impl = {b.name: _Impl(set(faults) | set(bf.get(b.name, ())), seed, self.formats) for b in self._backends}
        self.faults = set(faults)

    def backends(self):
        return list(self._backends)

    def routes(self, backend):
        kind = next(b.kind for b in self._backends if b.name == backend)
        if kind == "cpu":
            return Routes(quantize=["set_rows", "quantize_chunk"], decode=["to_float"])
        return Routes(quantize=["set_rows"], decode=["get_rows"])

    def type_info(self, type_name):
        if type_name in self.formats:
            return {"block_size": self.formats[type_name].block, "type_size": self.formats[type_name].block_bytes}
        if type_name in T.CLASSIC_DECODERS:
            blk, size, _ = T.CLASSIC_DECODERS[type_name]
            return {"block_size": blk, "type_size": size}
        return None

    def quantize(self, backend, route, type_name, x):
        if type_name in T.CLASSIC_DECODERS:
            return T.quantize_classic(type_name, np.asarray(x, np.float32))
        return self.impl[backend].quantize(type_name, x)

    def _readable(self, backend, *types):
        bad = [t for t in types if t in self.unreadable.get(backend, ())]
        if bad:
            raise Unsupported(f"{backend} cannot read {', '.join(bad)} (emulated: a writer-only type)")

    def decode(self, backend, route, type_name, raw, nrows, ncols):
        self._readable(backend, type_name)
        return self.impl[backend].decode(type_name, raw, nrows, ncols)

    def wht(self, backend, x, direction, group=128):
        return self.impl[backend].wht(x, direction, group)

    def flash_attn(self, backend, tk, kraw, tv, vraw, q, D, Dv, n_kv, n_head_kv, scale,
                   rotate_q, inverse_out, group=128, prec_f32=True):
        self._readable(backend, tk, tv)
        im = self.impl[backend]
        if "crash_attention" in im.faults:
            raise ProbeCrash("emulated ggml abort in flash attention")
        k = im.decode(tk, kraw, n_head_kv * n_kv, D).reshape(n_head_kv, n_kv, D)
        v = im.decode(tv, vraw, n_head_kv * n_kv, Dv).reshape(n_head_kv, n_kv, Dv)
        q = np.asarray(q, np.float32)
        if rotate_q and "skip_q_rotation" not in im.faults:
            q = im.wht(q, 0)
        out = attention(q, k, v, scale).astype(np.float32)
        if inverse_out and "no_output_inverse" not in im.faults:
            out = im.wht(out, 1)
        return out

    def describe(self):
        return {"target": self.name, "faults": sorted(self.faults),
                "backend_faults": {b: sorted(i.faults) for b, i in self.impl.items()}}
