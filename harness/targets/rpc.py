"""Type agreement between this build and a remote rpc-server, proved before anything is measured.

ggml RPC sends a tensor's type and a node's op as enum numbers. The fork inserted its turbo types and
GGML_OP_TURBO_WHT into ggml's enums and kept RPC protocol 4.0.0, so a server of another fork commit
passes the protocol handshake and then reads every number after the insertion as something else: the
remote device would quantise "turbo3" as another type, and the harness would report a broken kernel
where the setup is wrong. So, per type: quantise known rows on the remote device and decode them with
this build's CPU type traits (remote writer, local reader), and quantise them here and decode them on
the remote device (local writer, remote reader); compare each with the local round trip. Before that,
the type facts: the server sizes a quantised tensor with its own type traits (ggml-rpc.cpp
get_alloc_size), so its row size of each type must equal this build's.

What is compared is what a same-type kernel difference keeps and another type's bytes do not: the L2
norm of every decoded 128-value group (both directions) and the histogram of the indices the remote
writes (Gaussian rows give each index its Lloyd-Max cell's frequency under any rotation). A real kernel
difference on the right type (another rotation, other thresholds, an uncorrected norm, a decode without
the rotation) passes and is left to the checks to judge (tests/test_rpc.py runs the NumPy emulation's
faults through it). For the plain types (f16, q8_0) the decoded values themselves are compared.
"""
from __future__ import annotations

import numpy as np

from harness.errors import HarnessError, RemoteLost, Unsupported
from harness.fork import rpc as R
from harness.reference import turbo as T

# Median relative difference of the decoded group norms above which two sides disagree on a type.
# Reason: a wrong norm correction, the largest same-type norm deviation the checks know, moves them by
# |1 - ||c||| <= 0.1 for turbo2..4's codebooks; another type's bytes moved them by 0.18 to 1.0 with the
# shifted-type stand-in (the index histogram below catches the cases under 0.25).
NORM_AGREEMENT = 0.25
# Total variation distance between index histograms above which the indices are another type's. Reason: for
# Gaussian rows each index has its Lloyd-Max cell's frequency under any rotation or norm rule, so a same-type
# kernel difference moves it little: measured on the NumPy emulation's faults (tests/test_rpc.py) up to 0.057
# (perturbed_centroids: the outermost centroid moved 15%, its thresholds with it), sampling noise ~0.01 for
# 8192 indices; another type's bytes read as this type gave 0.17 to 0.91 with the shifted-type stand-in
# in front of the fork's rpc-server (every turbo2/3/4 -> other turbo, q8_0, q4_0 renumbering).
INDEX_AGREEMENT = 0.1
# The plain types checked beside the turbo types (the coverage table's partners).
PLAIN_TYPES = ("f16", "q8_0")
N_ROWS = 64


class _Mismatch(Exception):
    """The two sides disagree on a type fact (internal: turned into the one-line HarnessError)."""


def _group_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each 128-value group of float rows (n, 128*k) -> float64 (n*k,)."""
    return np.linalg.norm(np.asarray(x, np.float64).reshape(-1, 128), axis=1)


def _hist(idx: np.ndarray, levels: int) -> np.ndarray:
    return np.bincount(np.asarray(idx, np.int64).reshape(-1), minlength=levels)[:levels] / max(np.size(idx), 1)


def index_shift(type_name: str, local_raw: np.ndarray, remote_raw: np.ndarray) -> float:
    """Total variation distance between the index histograms of this build's bytes and the remote's (same rows).

    Gaussian rows give each centroid index a fixed frequency (its Lloyd-Max cell's probability) whatever the
    rotation, the norm rule or a small threshold difference, so a same-type kernel difference keeps the
    histogram; bytes of another type read as this one do not (4-bit indices read as 2-bit fields are near
    uniform). Indices are read with the harness's layout of the type (:func:`harness.reference.turbo.unpack`).

    Args:
        local_raw, remote_raw: flat uint8 bytes of the same rows, written here and on the remote device.
    Returns:
        TV distance in [0, 1]; 0.0 when the type's layout is unknown to the harness (nothing to compare).
    """
    try:
        f = T.fmt(type_name)
        li, _, _ = T.unpack(type_name, np.asarray(local_raw, np.uint8))
        ri, _, _ = T.unpack(type_name, np.asarray(remote_raw, np.uint8))
    except (T.UnknownLayout, KeyError, ValueError):
        return 0.0
    return 0.5 * float(np.abs(_hist(li, f.levels) - _hist(ri, f.levels)).sum())


def disagreement(type_name: str, got: np.ndarray, want: np.ndarray) -> float:
    """How far a decode of the other side's bytes is from the local round trip (0 = same).

    Turbo types: the median relative difference of the 128-group norms; plain types: the relative L2
    difference of the values. Both float arrays (n, 128).
    """
    got = np.nan_to_num(np.asarray(got, np.float64), nan=1e30, posinf=1e30, neginf=-1e30)
    want = np.asarray(want, np.float64)
    if type_name in PLAIN_TYPES:
        return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    gn, wn = _group_norms(got), _group_norms(want)
    return float(np.median(np.abs(gn - wn) / np.maximum(wn, 1e-30)))


def _remote_decode(target, backend: str, t: str, raw: np.ndarray, n: int) -> tuple[str, np.ndarray]:
    """Decode on the remote device through its first route that runs; (route, float (n, 128))."""
    errs, lost = [], []
    for route in target.routes(backend).decode:
        try:
            return route, target.decode(backend, route, t, raw, n, 128)
        except Unsupported as e:
            errs.append(f"{route}: {e}")
        except RemoteLost as e:  # the server died on this route (a harness-started one is back for the next)
            lost.append(e)
            errs.append(f"{route}: {e}")
    if lost:
        raise RemoteLost(f"no decode route could be measured on {backend} ({'; '.join(errs)})")
    raise Unsupported(f"no decode route runs on {backend} ({'; '.join(errs)})")


def handshake(target, types: list[str], log=lambda s: None) -> dict:
    """Prove that every remote device of a target reads and writes the types as this build does.

    Args:
        target: a :class:`harness.targets.fork.ForkTarget` with ``--rpc`` endpoints (others: nothing to do).
        types: the turbo types of the run (the plain types :data:`PLAIN_TYPES` are checked as well).
    Returns:
        {backend: {type: {'remote_write_local_read': float, 'local_write_remote_read': float, 'route': str}
        or {'not_covered': reason}}} (also for the report's metadata).
    Raises:
        HarnessError: one line naming the remote device, the type and the size of the disagreement, or the
            failure that stopped the handshake, with the fix (a server of this very build).
    """
    remotes = [b.name for b in target.backends() if R.is_rpc_backend(b.name)]
    if not remotes:
        return {}
    rng = np.random.default_rng(20140)
    x = rng.standard_normal((N_ROWS, 128)).astype(np.float32)
    out: dict = {}
    for be in remotes:
        ep = target.rpc_endpoint(be)
        res = out[be] = {}
        for t in [*PLAIN_TYPES, *types]:
            if target.type_info(t) is None:
                continue
            step = "sizing"
            try:
                if t not in PLAIN_TYPES or t == "q8_0":
                    there, here = target.row_bytes(be, t, 128)
                    res[t] = {"row_bytes_remote": there, "row_bytes_local": here}
                    if there != here:
                        raise _Mismatch(f"{be} stores a row of 128 {t} values in {there} bytes, this build in {here}")
                step = "quantising"
                local = target.quantize("cpu", "set_rows", t, x)
                want = target.decode("cpu", "to_float", t, local, N_ROWS, 128)
                remote = target.quantize(be, "set_rows", t, x)
                a = disagreement(t, target.decode("cpu", "to_float", t, remote, N_ROWS, 128), want)
                step = "decoding"
                route, dec = _remote_decode(target, be, t, local, N_ROWS)
                b = disagreement(t, dec, want)
                if t not in PLAIN_TYPES:  # the remote writer's indices (a remote reader is judged by norms only:
                    # a decode that skips the rotation, a real kernel bug, would move its snapped histogram)
                    with T.layouts_in_use(target.layouts()):
                        ia = index_shift(t, local, remote)
                    res[t] = {**res.get(t, {}), "index_tv_remote_write": ia}
                    if ia > INDEX_AGREEMENT:
                        raise _Mismatch(f"the indices {be} wrote for {t} have another histogram (total variation "
                                        f"{ia:.3g}, limit {INDEX_AGREEMENT}): they are not {t} indices")
            except _Mismatch as e:
                raise HarnessError(f"type mismatch with {be} ({ep}): {e}: the server is a build of another fork commit "
                                   f"(type or op numbers differ); run rpc-server from the same fork build as this "
                                   f"harness's build") from None
            except Unsupported as e:
                res[t] = {"not_covered": str(e)}
                log(f"rpc handshake: {be} {t}: not covered ({e})")
                continue
            except HarnessError as e:
                if " took longer than " in str(e):  # the time limit, not the types: say which knob it is
                    raise HarnessError(
                        f"type handshake with {be} ({ep}) stopped while {step} {t}: {e}: give the link more time "
                        f"(--rpc-timeout, default 120 s) or check that the server is not stuck") from None
                raise HarnessError(
                    f"type handshake with {be} ({ep}) stopped while {step} {t}: {e}: the server is probably a build of "
                    f"another fork commit (type or op numbers differ); run rpc-server from the same fork build as "
                    f"this harness's build") from None
            res[t] = {**res.get(t, {}), "remote_write_local_read": a, "local_write_remote_read": b, "route": route}
            if max(a, b) > NORM_AGREEMENT:
                side = (f"bytes {be} wrote for {t} decode here {a:.3g} off" if a > NORM_AGREEMENT
                        else f"{be} decodes this build's {t} bytes {b:.3g} off")
                raise HarnessError(
                    f"type mismatch with {be} ({ep}): {side} (median relative group-norm difference, limit "
                    f"{NORM_AGREEMENT}): the server is a build of another fork commit (type or op numbers differ); "
                    f"run rpc-server from the same fork build as this harness's build")
        log(f"rpc handshake: {be} ({ep}) agrees on {', '.join(t for t in res if 'not_covered' not in res[t])}")
    return out
