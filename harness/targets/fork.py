"""The fork build under test, observed through the native probe."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from harness.errors import HarnessError, ProbeCrash, Unsupported
from harness.fork import backends
from harness.fork import rpc as R
from harness.fork.probe import Probe, build_probe
from harness.targets import fork_calls as FC
from harness.targets.base import Backend, Routes, Target

def backend_name(reg_name: str) -> str:
    """Short backend name for a ggml registry name ('CUDA' -> 'cuda', 'ROCm' -> 'hip', 'Metal' -> 'metal'), from the
    backend table (:func:`harness.fork.backends.from_registry`)."""
    return backends.from_registry(reg_name)


def select_backends(devices: list[dict]) -> list[Backend]:
    """First device of each registry that can hold a KV cache (cpu, gpu, igpu kinds; BLAS-like
    accelerators are skipped), in registry order.

    Remote devices of ggml's RPC backend (registry 'RPC') are each a backend of their own, named from the
    device ('RPC0' -> 'rpc0'), so two rpc-servers give rpc0 and rpc1.

    Args:
        devices: [{'name', 'description', 'reg', 'kind'}] as the probe reports them.
    """
    seen: dict[str, Backend] = {}
    for d in devices:
        if d["kind"] not in ("cpu", "gpu", "igpu"):
            continue
        name = R.backend_name(d["name"]) if d["reg"] == "RPC" else backend_name(d["reg"])
        if name not in seen:
            desc = d.get("description", "")
            seen[name] = Backend(name, d["name"], d["kind"], desc, *backends.examination(name, d["name"], desc))
    return list(seen.values())


class ForkTarget(Target):
    """A fork build driven through the probe worker.

    Args:
        build_dir: fork build folder (holds bin/libggml*); fork: the checkout (headers).
        devices: optional fake device list (tests), bypassing the probe's registry listing.
        env: the probe worker's whole environment (default the harness's), e.g. with LD_PRELOAD of the
            sanitizer runtime for an AddressSanitizer build.
        rpc: endpoints ('HOST:PORT') of rpc-servers whose devices join as backends rpc0, rpc1, ...
            (:mod:`harness.fork.rpc`); they must be reachable when the devices are first listed.
        rpc_servers: {endpoint: RpcServer} of servers the harness started itself
            (:class:`harness.runners.rpc_server.RpcServer`): their log explains a failure, and one that died is
            restarted (up to ``rpc_restarts`` times) so that the cells after it still run.
        rpc_timeout_s: seconds one probe call on a remote device may take before it is killed (a hung server or
            network is a clear cell, never a hung run).
        vk_devices: this machine's Vulkan devices (:func:`harness.fork.vulkan.list_devices`; tests pass a fake list);
            read only for a build with the Vulkan backend, default listed with vulkaninfo. When all are software
            devices, the probe and test-backend-ops get ``GGML_VK_VISIBLE_DEVICES`` naming them
            (:func:`harness.fork.vulkan.device_env`).
    """

    def __init__(self, build_dir: Path, fork: Path, timeout_s: float = 600.0, devices: list[dict] | None = None,
                 env: dict | None = None, rpc: list[str] | None = None, rpc_servers: dict | None = None,
                 rpc_timeout_s: float = 120.0, rpc_restarts: int = 100, vk_devices: list[dict] | None = None):
        self.build_dir = Path(build_dir)
        self.fork = Path(fork)
        env, self.vulkan = self._vulkan_env(env, vk_devices)
        self.env = env
        self.lib = build_probe(self.build_dir, self.fork)
        self.rpc = list(rpc or [])
        self.rpc_servers = dict(rpc_servers or {})
        self.rpc_timeout_s = float(rpc_timeout_s)
        self.rpc_restarts = int(rpc_restarts)
        self.rpc_events: list[str] = []  # what happened to remote devices during the run (for the report)
        self.batch_events: list[str] = []  # batches that failed as a whole and ran op by op (fork_calls.batched)
        if self.rpc:
            env = dict(os.environ if env is None else env)
            env[R.PROBE_ENV] = ",".join(self.rpc)
        self.probe = Probe(self.lib, timeout_s=timeout_s, env=env)
        self.name = f"fork:{self.build_dir.name}"
        self._devices = devices
        self._backends: list[Backend] | None = None
        self.host: dict = {}  # backends whose device code runs on the host: {name: routes object}
        self._types: dict[str, dict | None] = {}
        with self._rpc_first_contact():  # the worker's first call connects to every --rpc server
            self.layout_notes = self.layouts().notes

    def _vulkan_env(self, env: dict | None, vk_devices: list[dict] | None) -> tuple[dict | None, dict | None]:
        """(the environment of the fork's processes, the report's Vulkan facts or None for a build without Vulkan)."""
        from harness.fork import vulkan
        if not vulkan.build_has_vulkan(self.build_dir):
            return env, None
        devs = vk_devices if vk_devices is not None else vulkan.list_devices()
        new, note = vulkan.device_env(dict(os.environ if env is None else env), devs)
        return new, {"driver": vulkan.driver_line(devs), "visible_devices": note or "not set (ggml's default: GPUs only)",
                     "devices": devs}

    def missing_device(self, backend: str) -> str | None:
        """Why a backend the build has shows no device here (e.g. a Vulkan build on a machine without a Vulkan
        device), or None."""
        if backend == "vulkan" and self.vulkan is not None and "vulkan" not in [b.name for b in self.backends()]:
            return (f"the build has the Vulkan backend but ggml found no Vulkan device here (vulkaninfo: "
                    f"{self.vulkan['driver']}): install a Vulkan driver (`apt-get install mesa-vulkan-drivers` gives "
                    f"Mesa's software device, lavapipe) or run on a machine with a GPU")
        return None

    def backends(self) -> list[Backend]:
        if self._backends is None:
            devices = self._devices if self._devices is not None else self._list_devices()
            if self.rpc and self._devices is None:
                down = self.probe.rpc_status()
                if down:
                    ep, msg = next(iter(down.items()))
                    raise HarnessError(f"--rpc {ep}: {msg}: start the fork's rpc-server there (README 'Remote devices') "
                                       f"or fix the address")
            self._backends = select_backends(devices)
            self._add_host_backends()
            self._rpc_devices = {b.name: b.description for b in self._backends if R.is_rpc_backend(b.name)}
        return self._backends

    def _is_host(self, backend: str) -> bool:
        """Whether a backend's code runs on the host (metal-src), not through the probe."""
        host = self.__dict__.setdefault("host", {})  # (a target made without __init__, as in tests, has none)
        if self.__dict__.get("_backends") is None and backend not in host:
            self.backends()
        return backend in host

    def _add_host_backends(self) -> None:
        """metal-src (:mod:`harness.targets.metal_src`) when the fork ships Metal source, no local Metal device is in
        the build and no remote device was asked for (``--rpc``: a Mac behind it is the real witness, and takes
        precedence)."""
        from harness.targets.metal_src import MetalSrcRoutes
        if MetalSrcRoutes.available(self.fork) and not self.rpc and not any(b.name == "metal" for b in self._backends):
            r = MetalSrcRoutes(self.fork)
            self.host[r.name] = r
            self._backends.append(r.backend())

    # ------------------------------------------------------------------ remote devices

    def _list_devices(self) -> list[dict]:
        """The probe's device listing (with ``--rpc`` endpoints, under the RPC time limit)."""
        with self._rpc_first_contact():
            return self.probe.devices()

    @contextlib.contextmanager
    def _rpc_first_contact(self):
        """Run the enclosed probe calls under the RPC time limit when there are ``--rpc`` endpoints.

        The probe worker connects to every server on its first call and waits for the answer to RPC's hello. A
        port that accepts the connection but never answers (an rpc-server busy with another client: it serves one
        at a time; a stuck server; another service) would otherwise hold the run for the probe's whole limit
        (600 s) and then be reported as a crash of the probe.

        Raises:
            HarnessError: no answer within ``rpc_timeout_s`` (one line naming the endpoints and the causes).
        """
        if not self.rpc:
            yield
            return
        saved = self.probe.timeout_s
        self.probe.timeout_s = min(saved, self.rpc_timeout_s)
        try:
            yield
        except ProbeCrash as e:
            if "timed out" not in str(e):
                raise
            raise HarnessError(
                f"--rpc {', '.join(self.rpc)}: no answer within {self.rpc_timeout_s:g} s (--rpc-timeout): the port "
                f"accepts connections but no rpc-server answered there (rpc-server serves one client at a time: "
                f"another run may hold it; or it is stuck, or another service listens there); free or restart the "
                f"server, or fix the address") from None
        finally:
            self.probe.timeout_s = saved

    def rpc_endpoint(self, backend: str) -> str | None:
        """The endpoint of a remote backend ('rpc0' -> '127.0.0.1:50052'), None for a local one."""
        if not R.is_rpc_backend(backend):
            return None
        self.backends()
        return self._rpc_devices.get(backend)

    def row_bytes(self, backend: str, type_name: str, ncols: int = 128) -> tuple[int, int]:
        """(bytes of one row of ``ncols`` values of a type on this backend, the same in this build's traits).

        Over RPC the server sizes quantised tensors itself (ggml-rpc.cpp get_alloc_size, for rows that are not
        a multiple of 512 values), so the first number is the server's: the difference of two tensor sizes
        (3 rows minus 1 row, halved) cancels any per-tensor padding the server's backend adds.
        """
        a1 = self._remote(backend, f"sizing {type_name}", lambda: self.probe.alloc_size(self.device(backend), type_name, ncols, 1))
        a3 = self._remote(backend, f"sizing {type_name}", lambda: self.probe.alloc_size(self.device(backend), type_name, ncols, 3))
        return (a3 - a1) // 2, self.probe.row_bytes(type_name, ncols)

    def _remote(self, backend: str, what: str, fn, calls: int = 1):
        """Run one probe call on a backend; on a remote one, with the RPC time limit and a failure explained.

        Over RPC every op is 'supported' (the client never asks the server), so a failure shows up as the
        client aborting or the connection closing. Raises Unsupported when the server's own log says its
        backend cannot run the op (not covered), else :class:`harness.errors.RemoteLost` (an ERROR cell:
        nothing was measured) naming the server's state and its last message. ``calls``: the call stands for
        that many single calls (a batch), and may take that many times the RPC time limit.
        """
        ep = self.rpc_endpoint(backend)
        if ep is None:
            return fn()
        limit = self.rpc_timeout_s * calls
        try:
            with FC.time_limit(self.probe, min(self.probe.timeout_s, limit)):
                return fn()
        except ProbeCrash as e:
            raise self._remote_failure(backend, ep, what, str(e), limit) from None
        except HarnessError as e:
            from harness.runners.rpc_server import reachable
            if "rpc-server" in str(e) or not reachable(ep):  # the worker could not reach the server (it died earlier)
                raise self._remote_failure(backend, ep, what, str(e), limit) from None
            raise

    def _remote_failure(self, backend: str, ep: str, what: str, said: str, limit_s: float) -> Exception:
        """The exception for a failed call on a remote device (:func:`harness.targets.fork_calls.remote_failure`)."""
        return FC.remote_failure(self, backend, ep, what, said, limit_s)

    def device(self, backend: str) -> str:
        for b in self.backends():
            if b.name == backend:
                return b.device
        raise HarnessError(f"backend {backend!r} is not in this build (has: {', '.join(b.name for b in self.backends())})")

    def routes(self, backend: str) -> Routes:
        """The backend table's routes for this backend (CPU KV reads go through the type traits' to_float; GPU
        backends: a decode op if the backend has one, else flash attention over one KV row per head); a backend the
        table does not know gets the routes of its kind."""
        b = next(b for b in self.backends() if b.name == backend)
        if self._is_host(backend):
            return self.host[backend].routes()
        spec = backends.find(b.name) or backends.find("cpu" if b.kind == "cpu" else "cuda")
        return Routes(quantize=list(spec.quantize), decode=list(spec.decode))

    def type_info(self, type_name: str) -> dict | None:
        if type_name not in self._types:
            self._types[type_name] = self.probe.type_info(type_name)
        return self._types[type_name]

    def quantize(self, backend, route, type_name, x):
        x = np.ascontiguousarray(x, np.float32)
        if self._is_host(backend):
            return self.host[backend].quantize(route, type_name, x)
        if route == "quantize_chunk":
            return self.probe.quantize_chunk(type_name, x)
        if route == "set_rows":
            return self._remote(backend, f"set_rows {type_name}", lambda: self.probe.set_rows(self.device(backend), type_name, x))
        raise Unsupported(f"unknown quantize route {route!r}")

    def decode(self, backend, route, type_name, raw, nrows, ncols):
        if self._is_host(backend):
            return self.host[backend].decode(route, type_name, raw, nrows, ncols)
        if route == "to_float":
            return self.probe.to_float(type_name, raw, nrows * ncols).reshape(nrows, ncols)
        if route in ("get_rows", "cpy"):
            return self._remote(backend, f"{route} decode {type_name}", lambda: self.probe.decode(
                self.device(backend), type_name, raw, nrows, ncols, 0 if route == "get_rows" else 1))
        if route == "fa_decode":
            return self._fa_decode(backend, type_name, raw, nrows, ncols)
        raise Unsupported(f"unknown decode route {route!r}")

    def _fa_decode(self, backend, type_name, raw, nrows, ncols):
        """Decode rows through flash attention: one head per row, one KV entry, all-zero K (norm 0), so
        softmax weight 1 and the output is the decoded V row (rotated domain; no WHT ops applied)."""
        if ncols % 128:
            raise Unsupported("fa_decode needs rows of whole 128-value groups")
        zeros = np.zeros((nrows, ncols), np.float32)
        kraw = self.quantize(backend, "set_rows", type_name, zeros)
        q = np.zeros((nrows, 1, ncols), np.float32)
        out = self.flash_attn(backend, type_name, kraw, type_name, raw, q, ncols, ncols, 1, nrows, 1.0, False, False)
        return out.reshape(nrows, ncols)

    def quantize_many(self, backend, route, items):
        """set_rows items on a device as one probe call (:func:`harness.targets.fork_calls.quantize_many`)."""
        if route != "set_rows" or self._is_host(backend):
            return super().quantize_many(backend, route, items)
        return FC.quantize_many(self, backend, route, items)

    def flash_attn_many(self, backend, calls):
        """Flash-attention calls on a device as one probe call (:func:`harness.targets.fork_calls.flash_attn_many`)."""
        if self._is_host(backend):
            return super().flash_attn_many(backend, calls)
        return FC.flash_attn_many(self, backend, calls)

    def call_stats(self) -> dict:
        """{'calls': probe calls so far, 'seconds': their wall time, 'by_method': {method: [calls, seconds]},
        'batch_events': batches that failed as a whole and ran op by op} (cumulative; the run takes differences)."""
        counts = {m: list(v) for m, v in getattr(self.probe, "counts", {}).items()}  # (a test's fake probe: none)
        return {"calls": sum(v[0] for v in counts.values()), "seconds": sum(v[1] for v in counts.values()),
                "by_method": counts, "batch_events": list(self.__dict__.get("batch_events", []))}

    def wht(self, backend, x, direction, group=128):
        if self._is_host(backend):
            return self.host[backend].wht(np.ascontiguousarray(x, np.float32), direction, group)
        return self._remote(backend, "turbo_wht", lambda: self.probe.turbo_wht(
            self.device(backend), np.ascontiguousarray(x, np.float32), direction, group))

    def flash_attn(self, backend, tk, kraw, tv, vraw, q, D, Dv, n_kv, n_head_kv, scale,
                   rotate_q, inverse_out, group=128, prec_f32=True):
        if self._is_host(backend):
            return self.host[backend].flash_attn()
        return self._remote(backend, f"flash_attn {tk}/{tv}", lambda: self.probe.flash_attn(
            self.device(backend), tk, kraw, tv, vraw, q, D, Dv, n_kv, n_head_kv,
            float(scale), bool(rotate_q), bool(inverse_out), group, bool(prec_f32)))

    def backend_ops(self, log_path=None):
        """Run the build's ``bin/test-backend-ops`` (see :meth:`Target.backend_ops`); None when it is not built. A
        run begun by :meth:`start_backend_ops` for the same ``log_path`` is waited for instead of run again."""
        started, self._bops = getattr(self, "_bops", None), None
        if started is not None and started[0] == log_path:
            return started[1].result()
        return self._backend_ops_now(log_path)

    def start_backend_ops(self, log_path=None) -> bool:
        """Begin :meth:`backend_ops` in a background thread, beside the checks that use the probe, and return at once
        (True; False when test-backend-ops is not built, or a device is a software one). Worth it only where cores
        are spare (:func:`harness.runners.backend_ops.jobs` > 1): on a GPU machine its flash-attention cases take
        most of COMPAT's time. An error in it reaches :meth:`backend_ops`; :meth:`close` stops it."""
        import threading
        from concurrent.futures import ThreadPoolExecutor
        if not (self.build_dir / "bin" / "test-backend-ops").is_file():
            return False
        if any(b.software for b in self.backends()):  # a software device computes on these cores: nothing to spare
            return False
        self._bops_stop = threading.Event()
        ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-backend-ops")
        self._bops = (log_path, ex.submit(self._backend_ops_now, log_path, self._bops_stop))
        ex.shutdown(wait=False)
        return True

    def _backend_ops_now(self, log_path=None, stop=None):
        from harness.runners import backend_ops
        binary = self.build_dir / "bin" / "test-backend-ops"
        if not binary.is_file():
            return None
        soft = [b.name for b in self.backends() if b.software]  # a software device: one process at a time, whole
        return backend_ops.run(binary, log_path=log_path, env=self.env, stop=stop, n_jobs=1 if soft else None,
                               plan=backend_ops.SOFTWARE_PLAN if soft else backend_ops.PLAN)

    runs_models = True

    def kv_capture_tool(self):
        """The K/V capture tool compiled against this build (:func:`harness.fork.kvcapture.build_kvcapture`)."""
        from harness.fork.kvcapture import build_kvcapture
        return build_kvcapture(self.build_dir, self.fork)

    def capture_kv(self, model, corpus, n_tokens, out_dir, timeout_s=300.0):
        """Capture a model's K/V with this build (:func:`harness.fork.kvcapture.capture`)."""
        from harness.fork.kvcapture import capture
        return capture(self.kv_capture_tool(), model, corpus, n_tokens, out_dir, timeout_s=timeout_s)

    def model_tools(self, backend: str | None = None):
        """The llama tools of this build (:class:`harness.runners.model_smoke.ModelTools`), with the arguments and
        environment that put their layers on ``backend``'s device (:func:`harness.runners.offload.model_offload`:
        ``--rpc`` for a remote device, the Vulkan visibility variable this target set for its probe).

        Raises:
            HarnessError: the backend has no device in this build."""
        from harness.runners.model_smoke import ModelTools
        from harness.runners.offload import model_offload
        return ModelTools(self.build_dir, model_offload(self, backend))

    def describe(self):
        return {"target": self.name, "build_dir": str(self.build_dir), "probe": str(self.lib),
                "layouts": self.layouts().describe(),
                "layout_notes": self.layout_notes,
                "wht_op_args": self.probe.wht_args(),
                "backends": [b.__dict__ for b in self.backends()],
                **({"vulkan": {k: v for k, v in self.vulkan.items() if k != "devices"}} if self.vulkan else {}),
                **({"host_backends": {n: r.describe() for n, r in self.host.items()}} if self.host else {}),
                **({"rpc": self.describe_rpc()} if self.rpc else {})}

    def describe_rpc(self) -> dict:
        """What the report says about remote devices: endpoints, each rpc backend's endpoint and memory, the
        devices a harness-started server said it serves (a server started by hand names none over RPC: the
        protocol carries no backend name), and what happened to them during the run."""
        self.backends()
        mem = {}
        if self._devices is None:
            mem = {R.backend_name(d["name"]): d.get("memory_total") for d in self.probe.devices() if d["reg"] == "RPC"}
        return {"endpoints": list(self.rpc),
                "devices": {name: {"endpoint": ep, "memory_total_mib": (mem.get(name) or 0) // 2**20}
                            for name, ep in self._rpc_devices.items()},
                "started_by_harness": {ep: {"serves": s.served_devices(), "log": str(s.log_path), "starts": s.starts}
                                       for ep, s in self.rpc_servers.items()},
                "events": list(self.rpc_events),
                "note": "over RPC the remote backend's name, build and hardware are not visible: the handshake "
                        "proved that it quantises and decodes the checked types as this build does"}

    def close(self):
        stop = getattr(self, "_bops_stop", None)
        if stop is not None:  # a test-backend-ops run still going (an interrupted verify): its processes are killed
            stop.set()
        self.probe.close()
