"""The probe's worker process: loads the native probe library (``probe.c``, ``probe_batch.c``) with ctypes and serves
calls from :class:`harness.fork.probe.Probe` (``python -m harness.fork.probe_worker LIB``).

Protocol: length-prefixed pickles ``(method, args)`` on stdin; answers ``("ok", value)``, ``("unsupported", msg)`` or
``("error", msg)`` on a private copy of stdout (the worker's own fd 1 is pointed at stderr so that anything ggml prints
cannot corrupt the stream). A ggml abort or a segfault kills this process only: the client reports it as a crash.

The library keeps one ggml backend per device across calls (freed when stdin closes); :func:`serve`'s ``batch``
handler runs many independent ops on one device as one graph, one call (see ``probe_batch.c``).
"""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import struct
import sys

import numpy as np

from harness.errors import HarnessError, Unsupported

# the kinds of op a batch takes, with the arguments of the single call of the same name (device first, dropped)
BATCH_OPS = ("set_rows", "flash_attn")


def serve(lib_path: str) -> None:  # pragma: no cover - runs in the worker process
    """Serve probe calls until stdin closes, then free the kept backends and return."""
    # Ctrl-C reaches the whole process group: the harness handles it (partial report) and closes this
    # worker; dying here first would make the call in flight look like a fork crash
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    proto_in = sys.stdin.buffer
    lib = ctypes.CDLL(lib_path)
    I64, P, F = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.tp_last_error.restype = ctypes.c_char_p
    for fn in ("tp_dev_name", "tp_dev_description", "tp_dev_reg_name", "tp_type_name", "tp_batch_error"):
        getattr(lib, fn).restype = ctypes.c_char_p
    for fn in ("tp_type_size", "tp_blck_size", "tp_dev_memory_total", "tp_alloc_size", "tp_stat"):
        getattr(lib, fn).restype = I64

    # remote devices (harness/fork/rpc.py): each rpc-server named in the environment joins the registry before
    # the first call, strictly in endpoint order in every worker, so 'RPC0' names the same device in a fresh worker
    from harness.fork.rpc import RegistryJoin

    def _add(ep):
        return None if lib.tp_rpc_add(ep.encode()) >= 0 else lib.tp_last_error().decode(errors="replace")
    rpc_join = RegistryJoin(os.environ.get("TURBO_PROBE_RPC", "").split(","), _add)

    def on_device(dev):
        """The device name for ggml; a remote one while an rpc-server cannot be reached raises (one line). A server
        that was down when this worker started is tried again (it may have been restarted since), and the ones
        after it only then (:class:`harness.fork.rpc.RegistryJoin`)."""
        if dev.startswith("RPC") and not rpc_join.join():
            raise RuntimeError("; ".join(f"{msg}" for msg in rpc_join.down.values()))
        return dev.encode()

    def ptr(a):
        return a.ctypes.data_as(P)

    def last_error(what):
        return lib.tp_last_error().decode(errors="replace") or what

    def check(rc, what):
        if rc == 0:
            return
        raise (Unsupported if rc == 1 else HarnessError)(last_error(what))

    def type_id(name):
        t = lib.tp_type_by_name(name.encode())
        if t < 0:
            raise Unsupported(f"this fork build has no ggml type named {name!r}")
        return t

    def row_size(t, ncols):
        return ncols // lib.tp_blck_size(t) * lib.tp_type_size(t)

    def devices():
        return [{"name": lib.tp_dev_name(i).decode(), "description": lib.tp_dev_description(i).decode(),
                 "reg": lib.tp_dev_reg_name(i).decode(), "kind": ["cpu", "gpu", "accel", "igpu"][lib.tp_dev_type(i)],
                 "memory_total": int(lib.tp_dev_memory_total(i))}
                for i in range(lib.tp_dev_count())]

    def rpc_status():
        return rpc_join.status()

    def alloc_size(dev, tname, ne0, ne1):
        n = lib.tp_alloc_size(on_device(dev), type_id(tname), I64(ne0), I64(ne1))
        if n < 0:
            raise HarnessError(last_error("alloc_size"))
        return int(n)

    def row_bytes(tname, ncols):
        return int(row_size(type_id(tname), ncols))

    def type_info(name):
        t = lib.tp_type_by_name(name.encode())
        if t < 0:
            return None
        return {"id": t, "block_size": lib.tp_blck_size(t), "type_size": lib.tp_type_size(t)}

    # ---- set_rows and flash attention: each op is added to an open batch (a single call is a batch of one)

    def add_set_rows(keep, tname, x):
        t = type_id(tname)
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros(x.shape[0] * row_size(t, x.shape[1]), np.uint8)
        keep += [x, out]
        return lib.tp_batch_set_rows(t, ptr(x), I64(x.shape[0]), I64(x.shape[1]), ptr(out)), lambda: out

    def add_flash_attn(keep, tk, kraw, tv, vraw, q, D, Dv, n_kv, n_head_kv, scale, rotate_q, inverse_out, group, prec_f32):
        ik, iv = type_id(tk), type_id(tv)
        q = np.ascontiguousarray(q, np.float32)
        n_head, n_q = q.shape[0], q.shape[1]
        kraw = np.ascontiguousarray(kraw, np.uint8)
        vraw = np.ascontiguousarray(vraw, np.uint8)
        out = np.zeros(n_q * n_head * Dv, np.float32)
        keep += [q, kraw, vraw, out]
        slot = lib.tp_batch_flash_attn(ik, ptr(kraw), iv, ptr(vraw), ptr(q), I64(D), I64(Dv), I64(n_q), I64(n_kv),
                                       I64(n_head), I64(n_head_kv), F(scale), int(rotate_q), int(inverse_out),
                                       int(group), int(prec_f32), ptr(out))
        return slot, lambda: out.reshape(n_q, n_head, Dv)

    adders = {"set_rows": add_set_rows, "flash_attn": add_flash_attn}

    def batch(dev, ops):
        """Run ops [(kind, *args of the single call without the device)] on one device as one graph.

        Returns one answer per op, in order: ("ok", value), ("unsupported", msg) (the device declines the op, or
        the build lacks the type) or ("error", msg). Raises HarnessError when the batch as a whole could not run
        (allocation, compute): nothing of it was measured, and the caller runs the ops one by one.
        """
        d = on_device(dev)
        if lib.tp_batch_begin(d, I64(len(ops))) != 0:
            raise HarnessError(last_error("batch"))
        answers: list = [None] * len(ops)
        pending, keep = {}, []
        try:
            for i, (kind, *args) in enumerate(ops):
                try:
                    if kind not in adders:
                        raise HarnessError(f"unknown batch op {kind!r} (known: {', '.join(BATCH_OPS)})")
                    slot, value = adders[kind](keep, *args)
                    if slot < 0:
                        raise HarnessError(last_error("batch"))
                    if lib.tp_batch_status(slot) == 1:
                        answers[i] = ("unsupported", lib.tp_batch_error(slot).decode(errors="replace"))
                    else:
                        pending[i] = (slot, value)
                except Unsupported as e:
                    answers[i] = ("unsupported", str(e))
                except HarnessError as e:  # this op only (an unknown kind, a full batch)
                    answers[i] = ("error", str(e))
            if pending and lib.tp_batch_run() != 0:
                raise HarnessError(last_error("batch"))
            for i, (slot, value) in pending.items():  # only an op the library says it computed is an answer
                answers[i] = ("ok", value()) if lib.tp_batch_status(slot) == 0 else ("error", "not measured")
        finally:
            lib.tp_batch_end()
        return [a if a is not None else ("error", "not measured") for a in answers]

    def one(kind, dev, *args):
        (status, value), = batch(dev, [(kind, *args)])
        if status == "ok":
            return value
        raise (Unsupported if status == "unsupported" else HarnessError)(value)

    def set_rows(dev, tname, x):
        return one("set_rows", dev, tname, x)

    def flash_attn(dev, *args):
        return one("flash_attn", dev, *args)

    def quantize_chunk(tname, x):
        t = type_id(tname)
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros(x.shape[0] * row_size(t, x.shape[1]), np.uint8)
        check(lib.tp_quantize_chunk(t, ptr(x), I64(x.shape[0]), I64(x.shape[1]), ptr(out)), "quantize_chunk")
        return out

    def to_float(tname, raw, n):
        t = type_id(tname)
        raw = np.ascontiguousarray(raw, np.uint8)
        out = np.zeros(n, np.float32)
        check(lib.tp_to_float(t, ptr(raw), I64(n), ptr(out)), "to_float")
        return out

    def decode(dev, tname, raw, nrows, ncols, route):
        t = type_id(tname)
        raw = np.ascontiguousarray(raw, np.uint8)
        out = np.zeros(nrows * ncols, np.float32)
        check(lib.tp_decode(on_device(dev), t, ptr(raw), I64(nrows), I64(ncols), int(route), ptr(out)), "decode")
        return out.reshape(nrows, ncols)

    def turbo_wht(dev, x, direction, group):
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros_like(x)
        check(lib.tp_turbo_wht(on_device(dev), ptr(x), I64(x.shape[0]), I64(x.shape[1]), int(direction), int(group), ptr(out)), "turbo_wht")
        return out

    def wht_args():
        return lib.tp_wht_nargs()

    def stats():
        """{'backend_inits': backends initialised by this worker, 'computes': graphs computed, 'backends_kept'}."""
        return {"backend_inits": int(lib.tp_stat(0)), "computes": int(lib.tp_stat(1)), "backends_kept": int(lib.tp_stat(2))}

    def release():
        """Free the kept backends (the next call on a device initialises one again)."""
        lib.tp_release()

    handlers = {f.__name__: f for f in (devices, type_info, set_rows, quantize_chunk, to_float, decode, batch,
                                        turbo_wht, flash_attn, wht_args, rpc_status, alloc_size, row_bytes, stats,
                                        release)}
    while True:
        hdr = proto_in.read(8)
        if len(hdr) < 8:
            lib.tp_release()  # backends freed before the libraries' own teardown at exit
            return
        (n,) = struct.unpack("<Q", hdr)
        method, args = pickle.loads(proto_in.read(n))
        try:
            res = ("ok", handlers[method](*args))
        except Unsupported as e:
            res = ("unsupported", str(e))
        except Exception as e:  # reported to the caller, which re-raises as HarnessError
            res = ("error", f"{type(e).__name__}: {e}")
        data = pickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL)
        proto_out.write(struct.pack("<Q", len(data)) + data)
        proto_out.flush()


if __name__ == "__main__":  # pragma: no cover
    serve(sys.argv[1])
