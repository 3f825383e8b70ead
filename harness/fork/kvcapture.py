"""Build and run ``kvcapture.c``: the Q/K/V vectors a real model writes, per layer, after RoPE.

The capture tool is a small program compiled against the fork's ``llama.h`` and ``libllama``; it runs
the model on the first tokens of a text through the fork's own API and dumps the tensors named
``Qcur-<il>``/``Kcur-<il>``/``Vcur-<il>`` (see the C file). It runs as a subprocess with a time
limit, so a fork crash or hang is a :class:`~harness.errors.ProbeCrash`, never a dead harness.

Models are named as in ``checks/models.toml`` (``smollm2``, ``gemma3``) or given as a path to any GGUF;
``$TURBO_MODEL`` (or ``turbo-harness check KVREAL --model``) picks one for KVREAL.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.errors import HarnessError, ProbeCrash

SRC = Path(__file__).with_name("kvcapture.c")
EXE = "turbo-kvcapture"


class NoModel(HarnessError):
    """No model is available (package not installed, file missing): KVREAL skips with this message."""


def resolve_model(spec: str | None = None) -> tuple[Path, str]:
    """The GGUF file and a short label for a model name or path (harness/runners/models.py does the work).

    Args:
        spec: a known model's name (checks/models.toml: 'smollm2', 'gemma3'), or a GGUF path; None reads
            $TURBO_MODEL, default 'smollm2'.
    Returns:
        (path of an existing GGUF, label: the catalogue name, else the file's stem).
    Raises:
        NoModel: the model's package is not installed, or the path does not exist (message names the fix).
        HarnessError: the model is there but unusable (e.g. an assembled file with the wrong SHA-256).
    """
    from harness.runners import models
    spec = str(spec or os.environ.get("TURBO_MODEL") or models.DEFAULT_MODEL).strip()
    known = models.known_models()
    if spec in known:
        if importlib.util.find_spec(known[spec].module) is None:
            raise NoModel(str(models._not_installed(known[spec])))
        return models.resolve_model(spec), spec
    p = Path(spec).expanduser()
    if not p.is_file():
        raise NoModel(f"model {spec} is neither a file nor a known model ({', '.join(known)}): set TURBO_MODEL "
                      f"(or --model) to one of them or to a GGUF path")
    return p, models.model_name_of(p) or p.stem


def build_kvcapture(bdir: Path, fork: Path, force: bool = False) -> Path:
    """Compile the capture tool against the fork's headers and the build's libllama/libggml.

    Args:
        bdir: a fork build folder holding ``bin/libllama.so`` (or .dylib).
        fork: the fork checkout (for ``include/llama.h`` and ``ggml/include``).
    Returns:
        Path of the executable ``<bdir>/turbo-probe/turbo-kvcapture`` (rebuilt when the source or libs are newer).
    Raises:
        HarnessError: libllama not built, no compiler, or the compile failed (first error quoted).
    """
    from harness.fork.probe import build_llama_tool
    return build_llama_tool("the K/V capture tool", SRC, EXE, bdir, fork, force)


@dataclass
class Capture:
    """Q/K/V of one model run, per layer.

    Attributes:
        q, k, v: {layer: float32 (n_tokens, n_heads, head_dim)} (q has n_head heads, k/v n_head_kv).
        info: the tool's summary (arch, n_layer, n_head, n_head_kv, key_length, tokens, tensors -> op).
        model: GGUF path; seconds: wall time of the tool; out_dir: folder holding the .npy files.
    """

    q: dict[int, np.ndarray]
    k: dict[int, np.ndarray]
    v: dict[int, np.ndarray]
    info: dict
    model: str
    seconds: float
    out_dir: str
    notes: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.k) & set(self.v))


def capture(exe: Path, model: Path, text: Path, n_tokens: int, out_dir: Path | None = None, threads: int | None = None,
            timeout_s: float = 300.0) -> Capture:
    """Run the capture tool and load its tensors.

    Args:
        exe: :func:`build_kvcapture`'s executable. model: GGUF. text: corpus file (its first tokens are used).
        n_tokens: tokens decoded in one batch. out_dir: where the .npy files go (a temp folder when None).
        timeout_s: the tool is killed after this many seconds.
    Returns:
        :class:`Capture`; K/Q captured from a node other than ROPE are noted in ``notes``.
    Raises:
        ProbeCrash: the tool crashed or timed out. HarnessError: bad input (exit 2) or nothing captured.
    """
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="turbo-kvcapture-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*cur-*.npy"):
        old.unlink()
    threads = threads or max(1, min(os.cpu_count() or 2, 8))
    cmd = [str(exe), str(model), str(text), str(int(n_tokens)), str(out_dir), str(threads)]
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise ProbeCrash(f"K/V capture of {Path(model).name} timed out after {timeout_s:.0f} s and was killed") from None
    secs = time.time() - t0
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if r.returncode == 2:
        raise HarnessError(f"K/V capture rejected its input: {err[-1] if err else 'no message'}")
    if r.returncode != 0:
        why = f"signal {-r.returncode}" if r.returncode < 0 else f"exit code {r.returncode}"
        raise ProbeCrash(f"K/V capture of {Path(model).name} failed ({why}): {err[-1][:300] if err else 'no message'}")
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise HarnessError(f"K/V capture printed no summary: {r.stdout[-200:]!r}") from None
    (out_dir / "capture.json").write_text(json.dumps(info))
    arrays: dict[str, dict[int, np.ndarray]] = {"Qcur": {}, "Kcur": {}, "Vcur": {}}
    heads = {"Qcur": info.get("n_head"), "Kcur": info.get("n_head_kv"), "Vcur": info.get("n_head_kv")}
    for name in info.get("tensors", {}):
        kind, il = name.rsplit("-", 1)
        a = np.load(out_dir / f"{name}.npy")
        if a.shape[0] == 1 and a.shape[1] == n_tokens and heads[kind]:  # a 2-D node (tokens, heads*dim): split the heads
            a = a.reshape(n_tokens, heads[kind], -1)
        arrays[kind][int(il)] = a
    if not arrays["Kcur"] or not arrays["Vcur"]:
        raise HarnessError(f"K/V capture of {Path(model).name} saw no Kcur-*/Vcur-* tensors: this model's graph "
                           f"names them differently (tensors seen: {', '.join(info.get('tensors', {})) or 'none'})")
    notes = [f"{n} was taken from a {op} node, not ROPE (this layer may not rotate positions)"
             for n, op in info.get("tensors", {}).items() if n.split("-")[0] in ("Qcur", "Kcur") and op != "ROPE"]
    return Capture(arrays["Qcur"], arrays["Kcur"], arrays["Vcur"], info, str(model), secs, str(out_dir), notes)
