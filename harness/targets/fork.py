"""The fork build under test, observed through the native probe."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.errors import HarnessError, Unsupported
from harness.fork import backends
from harness.fork.probe import Probe, build_probe
from harness.targets.base import Backend, Routes, Target

def backend_name(reg_name: str) -> str:
    """Short backend name for a ggml registry name ('CUDA' -> 'cuda', 'ROCm' -> 'hip', 'Metal' -> 'metal'), from the
    backend table (:func:`harness.fork.backends.from_registry`)."""
    return backends.from_registry(reg_name)


def select_backends(devices: list[dict]) -> list[Backend]:
    """First device of each registry that can hold a KV cache (cpu, gpu, igpu kinds; BLAS-like
    accelerators are skipped), in registry order.

    Args:
        devices: [{'name', 'description', 'reg', 'kind'}] as the probe reports them.
    """
    seen: dict[str, Backend] = {}
    for d in devices:
        if d["kind"] not in ("cpu", "gpu", "igpu"):
            continue
        name = backend_name(d["reg"])
        if name not in seen:
            seen[name] = Backend(name=name, device=d["name"], kind=d["kind"], description=d.get("description", ""))
    return list(seen.values())


class ForkTarget(Target):
    """A fork build driven through the probe worker.

    Args:
        build_dir: fork build folder (holds bin/libggml*); fork: the checkout (headers).
        devices: optional fake device list (tests), bypassing the probe's registry listing.
        env: the probe worker's whole environment (default the harness's), e.g. with LD_PRELOAD of the
            sanitizer runtime for an AddressSanitizer build.
    """

    def __init__(self, build_dir: Path, fork: Path, timeout_s: float = 600.0, devices: list[dict] | None = None,
                 env: dict | None = None):
        self.build_dir = Path(build_dir)
        self.fork = Path(fork)
        self.lib = build_probe(self.build_dir, self.fork)
        self.probe = Probe(self.lib, timeout_s=timeout_s, env=env)
        self.name = f"fork:{self.build_dir.name}"
        self._devices = devices
        self._backends: list[Backend] | None = None
        self._types: dict[str, dict | None] = {}
        self.layout_notes = self.layouts().notes

    def backends(self) -> list[Backend]:
        if self._backends is None:
            self._backends = select_backends(self._devices if self._devices is not None else self.probe.devices())
        return self._backends

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
        spec = backends.find(b.name) or backends.find("cpu" if b.kind == "cpu" else "cuda")
        return Routes(quantize=list(spec.quantize), decode=list(spec.decode))

    def type_info(self, type_name: str) -> dict | None:
        if type_name not in self._types:
            self._types[type_name] = self.probe.type_info(type_name)
        return self._types[type_name]

    def quantize(self, backend, route, type_name, x):
        x = np.ascontiguousarray(x, np.float32)
        if route == "quantize_chunk":
            return self.probe.quantize_chunk(type_name, x)
        if route == "set_rows":
            return self.probe.set_rows(self.device(backend), type_name, x)
        raise Unsupported(f"unknown quantize route {route!r}")

    def decode(self, backend, route, type_name, raw, nrows, ncols):
        if route == "to_float":
            return self.probe.to_float(type_name, raw, nrows * ncols).reshape(nrows, ncols)
        if route in ("get_rows", "cpy"):
            return self.probe.decode(self.device(backend), type_name, raw, nrows, ncols, 0 if route == "get_rows" else 1)
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

    def wht(self, backend, x, direction, group=128):
        return self.probe.turbo_wht(self.device(backend), np.ascontiguousarray(x, np.float32), direction, group)

    def flash_attn(self, backend, tk, kraw, tv, vraw, q, D, Dv, n_kv, n_head_kv, scale,
                   rotate_q, inverse_out, group=128, prec_f32=True):
        return self.probe.flash_attn(self.device(backend), tk, kraw, tv, vraw, q, D, Dv, n_kv, n_head_kv,
                                     float(scale), bool(rotate_q), bool(inverse_out), group, bool(prec_f32))

    def backend_ops(self, log_path=None):
        """Run the build's ``bin/test-backend-ops`` (see :meth:`Target.backend_ops`); None when it is not built."""
        from harness.runners import backend_ops
        binary = self.build_dir / "bin" / "test-backend-ops"
        if not binary.is_file():
            return None
        return backend_ops.run(binary, log_path=log_path)

    runs_models = True

    def kv_capture_tool(self):
        """The K/V capture tool compiled against this build (:func:`harness.fork.kvcapture.build_kvcapture`)."""
        from harness.fork.kvcapture import build_kvcapture
        return build_kvcapture(self.build_dir, self.fork)

    def capture_kv(self, model, corpus, n_tokens, out_dir, timeout_s=300.0):
        """Capture a model's K/V with this build (:func:`harness.fork.kvcapture.capture`)."""
        from harness.fork.kvcapture import capture
        return capture(self.kv_capture_tool(), model, corpus, n_tokens, out_dir, timeout_s=timeout_s)

    def model_tools(self):
        """The llama tools of this build (:class:`harness.runners.model_smoke.ModelTools`)."""
        from harness.runners.model_smoke import ModelTools
        return ModelTools(self.build_dir)

    def describe(self):
        return {"target": self.name, "build_dir": str(self.build_dir), "probe": str(self.lib),
                "layouts": self.layouts().describe(),
                "layout_notes": self.layout_notes,
                "wht_op_args": self.probe.wht_args(),
                "backends": [b.__dict__ for b in self.backends()]}

    def close(self):
        self.probe.close()
