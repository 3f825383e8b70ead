"""The thing under test: an interface the checks call, with no knowledge of how it is implemented.

Implementations: :class:`harness.targets.fork.ForkTarget` (the native probe on a fork build) and
:class:`harness.targets.numpy_target.NumpyTarget` (the reference math with injectable faults, for tests).

Arrays: rows of values are float32 (nrows, ncols); raw quantised bytes are flat uint8 arrays of
nrows * row_bytes; decoded turbo values are in the rotated domain (the fork never un-rotates K/V).
Methods raise :class:`harness.errors.Unsupported` when a backend lacks the op, and
:class:`harness.errors.ProbeCrash` when the implementation crashed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from harness.errors import HarnessError


# How a backend's cells were examined (spec "Every backend, and how it was examined"): the mode travels on the
# backend (:attr:`Backend.mode`) and every renderer shows its label.
MODES = {
    "executed": "executed",
    "software": "executed on a software device",
    "source": "source on the host",
    "audited": "audited from source",
    "none": "not examined",
}


@dataclass(frozen=True)
class Backend:
    """One compute backend of a target: short name ('cpu', 'cuda', 'metal', ...), device, kind.

    ``mode`` says how its cells examine it (a key of :data:`MODES`: 'executed' for the fork's kernels on that
    backend's device, 'software' for a conformant software driver, 'source' for the backend's device code compiled
    for the host); ``of`` names the backend family it stands for when its name is not one ('metal-src' -> 'metal').
    ``mode_note`` is what every cell and coverage row of a backend examined other than by plain execution carries
    (e.g. 'Vulkan on a software device (lavapipe): shader logic, not GPU arithmetic'; '' otherwise).
    """

    name: str
    device: str
    kind: str  # 'cpu' | 'gpu' | 'igpu' | 'src' (device code run on the host)
    description: str = ""
    mode: str = "executed"
    mode_note: str = ""
    of: str = ""

    @property
    def family(self) -> str:
        """The backend-table name this backend examines ('metal' for 'metal-src')."""
        return self.of or self.name

    @property
    def mode_label(self) -> str:
        """The coverage word for :attr:`mode` ('source on the host'), with the device where it ran."""
        label = MODES.get(self.mode, self.mode)
        return f"{label} ({self.device})" if self.mode in ("executed", "software") and self.device else label

    @property
    def software(self) -> bool:
        """True on a software device (:data:`MODES` 'software'): work there is sized down (flash attention is slow)."""
        return self.mode == "software"

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("gpu", "igpu")


@dataclass
class Routes:
    """Which routes a backend offers for each role."""

    quantize: list[str] = field(default_factory=lambda: ["set_rows"])
    decode: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)  # further decode routes judged beside the first that works
    wht: bool = True
    attention: bool = True
    attention_note: str = ""  # why attention is not examined on this backend (attention False)
    wht_groups: tuple = (128, 64)  # group sizes its rotation op takes
    wht_precision: str = "f32"  # 'f16': the rotation op computes in half precision (PQ1 judges it with max_abs_err_half)


FA_ARGS = ("tk", "kraw", "tv", "vraw", "q", "D", "Dv", "n_kv", "n_head_kv", "scale", "rotate_q", "inverse_out",
           "group", "prec_f32")


def fa_args(call: dict) -> tuple:
    """A flash-attention call dict (:meth:`Target.flash_attn_many`) as :meth:`Target.flash_attn`'s positional
    arguments after the backend (group 128 and prec_f32 True unless given)."""
    return tuple({"group": 128, "prec_f32": True, **call}[k] for k in FA_ARGS)


def attempt(fn, *args):
    """fn(*args), or the exception it raised (an Exception; an interrupt, a BaseException, passes through)."""
    try:
        return fn(*args)
    except Exception as e:
        return e


def take(answer):
    """An answer of :meth:`Target.quantize_many` / :meth:`Target.flash_attn_many`: its value, or its exception
    raised here, where the item's cell is made."""
    if isinstance(answer, BaseException):
        raise answer
    return answer


class Target:
    """Abstract target. Subclasses implement every method below."""

    name = "target"

    def backends(self) -> list[Backend]:
        """The backends this target can run, in registry order."""
        raise NotImplementedError

    def routes(self, backend: str) -> Routes:
        """The quantise/decode routes a backend offers (see :class:`Routes`)."""
        raise NotImplementedError

    def type_info(self, type_name: str) -> dict | None:
        """{'block_size', 'type_size'} from the build's type traits, or None when the type is absent."""
        raise NotImplementedError

    def quantize(self, backend: str, route: str, type_name: str, x: np.ndarray) -> np.ndarray:
        """Quantise float32 rows (n, ncols) on a backend route; returns flat uint8 bytes."""
        raise NotImplementedError

    def decode(self, backend: str, route: str, type_name: str, raw: np.ndarray, nrows: int, ncols: int) -> np.ndarray:
        """Decode raw bytes to float32 (nrows, ncols) on a backend route."""
        raise NotImplementedError

    def wht(self, backend: str, x: np.ndarray, direction: int, group: int = 128) -> np.ndarray:
        """The fork's rotation op on rows of x (float32 (n, ncols)); direction 0 forward, 1 inverse."""
        raise NotImplementedError

    def flash_attn(self, backend: str, tk: str, kraw: np.ndarray, tv: str, vraw: np.ndarray, q: np.ndarray,
                   D: int, Dv: int, n_kv: int, n_head_kv: int, scale: float,
                   rotate_q: bool, inverse_out: bool, group: int = 128, prec_f32: bool = True) -> np.ndarray:
        """Flash attention with raw K/V bytes; q float32 (n_head, n_q, D); returns float32 (n_q, n_head, Dv)."""
        raise NotImplementedError

    def quantize_many(self, backend: str, route: str, items: list[tuple[str, np.ndarray]]) -> list:
        """Quantise several inputs on one backend route: items [(type name, float32 rows (n, ncols))].

        Returns one answer per item, in order: its flat uint8 bytes (as :meth:`quantize`), or the exception that
        item raised (Unsupported, HarnessError, ProbeCrash, or any other), for the caller to raise where that item's
        cell is made (:func:`take`): one item's failure is never another's. The default calls :meth:`quantize` once
        per item; a target may run the items as one call (the fork: one graph on the device) if it answers each.
        """
        return [attempt(self.quantize, backend, route, t, x) for t, x in items]

    def flash_attn_many(self, backend: str, calls: list[dict]) -> list:
        """Several flash-attention calls on one backend: each a dict of :meth:`flash_attn`'s arguments after the
        backend (tk, kraw, tv, vraw, q, D, Dv, n_kv, n_head_kv, scale, rotate_q, inverse_out, and optionally group,
        prec_f32). Returns one answer per call, as :meth:`quantize_many`: float32 (n_q, n_head, Dv) or the exception."""
        return [attempt(self.flash_attn, backend, *fa_args(c)) for c in calls]

    def layouts(self):
        """The harness's reading of this target's turbo layouts (:class:`harness.reference.turbo.Layouts`):
        per turbo type, the known layout that matches the target's type traits, or the reason none does.
        Measured once from :meth:`type_info` and kept on the target, so two targets in one process each
        get their own; the checks run inside :func:`harness.reference.turbo.layouts_in_use` of it."""
        lay = getattr(self, "_layouts", None)
        if lay is None:
            from harness.reference import turbo as T
            lay = self._layouts = T.select_layouts({t: self.type_info(t) for t in T.TURBO_TYPES})
        return lay

    def backend_ops(self, log_path=None) -> dict | None:
        """The fork's own ``test-backend-ops`` on the turbo-related ops, run by the target (the engine's side, not
        a check's): :func:`harness.runners.backend_ops.run`'s dict ({'results', 'returncode', 'note', 'command'}),
        its console output written to ``log_path`` when given; None when this target has no such tool."""
        return None

    def source_dir(self):
        """The fork checkout this target was built from (its sources are read by the AUDIT check), or None (a
        NumPy target has none unless a test gives it one as ``fork``)."""
        return getattr(self, "fork", None)

    runs_models = False  # whether this target can run a model through the fork's llama library (KVREAL, MODEL)

    def kv_capture_tool(self):
        """Build (or find, cached) the tool that captures a model's K/V; returns its path.

        Raises:
            HarnessError: this target runs no model (see :attr:`runs_models`), or the tool cannot be built.
        """
        raise HarnessError(f"{self.name} runs no model (not a fork build)")

    def capture_kv(self, model, corpus, n_tokens: int, out_dir, timeout_s: float = 300.0):
        """Run a model on the first ``n_tokens`` of ``corpus`` and return its per-layer Q/K/V
        (:class:`harness.fork.kvcapture.Capture`); the target runs the tool, the check only reads the result.

        Raises:
            HarnessError: the target runs no model, or the tool failed (message quotes it); ProbeCrash: it crashed.
        """
        raise HarnessError(f"{self.name} runs no model (not a fork build)")

    def model_tools(self, backend: str | None = None):
        """The fork's llama tools this target runs for the MODEL check
        (:class:`harness.runners.model_smoke.ModelTools`), their layers on ``backend``'s device (None: the tools'
        defaults), or None when it has none (not a fork build)."""
        return None

    def describe(self) -> dict:
        """Metadata for the report."""
        return {"target": self.name}

    def close(self) -> None:
        pass
