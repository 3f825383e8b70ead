"""Model-level smoke runs with the fork's own tools, for the MODEL check.

- ``llama-save-load-state`` (llama.cpp's example, built with ``-DLLAMA_BUILD_EXAMPLES=ON``): context creation,
  warm-up, a short prefill, a few decode steps, a full-state save and restore into a second context, and a
  sequence-state copy into another sequence; it compares the generations itself.
- ``llama-perplexity`` on a few small chunks: an f16-cache run that writes the logits baseline, then each K/V pair
  with ``--kl-divergence`` against it (PPL and KLD of the same commit).

Each run gives a :class:`SmokeRun`: which phases finished (from the tools' own progress lines), how it ended
(:mod:`harness.runners.crash`), whether the fork refused the configuration cleanly, the KV types its log reports
and the switches it logs (``attn_rot_k = 1``). Nothing here judges; the check does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from harness.runners.crash import Crash, classify
from harness.runners.llama_logs import KvLog, parse_final_ppl, parse_kld_stats, parse_kv_log
from harness.runners.tools import ToolResult, error_line, run_tool

# phase -> a line the tool prints once that phase has finished (searched in stdout + stderr)
STATE_PHASES = [
    ("context creation", r"graph splits = \d+|warming up the model"),
    ("warm-up/prefill", r"^first run:"),
    ("decode", r"^second run:"),
    ("state restore", r"^single seq run:"),
    ("sequence state copy/restore", r"\bsuccess\s*$"),
]
PPL_PHASES = [
    ("context creation", r"graph splits = \d+"),
    ("prefill (perplexity chunks)", r"Final estimate: PPL|Mean +KLD|^\s*\d+\s+[\d.]+\s*±"),
]
# a context the fork declined with a message (no crash): the tools then print one of these and exit non-zero
REFUSAL = re.compile(r"failed to create context|failed to init|does not divide|requires flash.?attn|"
                     r"unsupported cache type|Unsupported cache type|invalid cache type|error while handling argument",
                     re.IGNORECASE)
_SWITCH = re.compile(r"\b(attn_rot_[kv]) = (\d+)")


@dataclass
class SmokeRun:
    """One tool run of the MODEL check.

    Attributes:
        tool: tool name; pair: 'K/V'; result: the ToolResult (evidence files beside it).
        phases_done: phases whose progress line was seen, in order; died_in: the first phase not finished
            ('' when all finished).
        crash: how it died (None when it exited by itself without a crash sign).
        refused: the fork's message when it declined the configuration before a context existed ('' otherwise).
        kv: the KV-cache size line parsed (types, sizes); switches: {'attn_rot_k': 1, ...} as logged.
        stats: parsed numbers (perplexity: 'ppl', 'kld', ...).
    """

    tool: str
    pair: str
    result: ToolResult
    phases_done: list[str]
    died_in: str
    crash: Crash | None
    refused: str
    kv: KvLog | None
    switches: dict[str, int] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.result.stdout + "\n" + self.result.stderr

    def failure(self) -> str:
        """One line: the crash, the refusal, or the tool's own error line ('' for a clean success)."""
        if self.crash:
            return self.crash.describe()
        if self.refused:
            return self.refused
        return "" if self.result.ok else f"exit {self.result.rc}: {error_line(self.text)}"


def _phases(text: str, phases) -> tuple[list[str], str]:
    done = []
    for name, pat in phases:
        if re.search(pat, text, re.MULTILINE):
            done.append(name)
    # progress is sequential: a phase counts as finished only when every earlier one did too
    ordered = []
    for name, _ in phases:
        if name not in done:
            return ordered, name
        ordered.append(name)
    return ordered, ""


def _observe(tool: str, pair: str, res: ToolResult, phases, timeout: float) -> SmokeRun:
    text = res.stdout + "\n" + res.stderr
    done, died = _phases(text, phases)
    crash = classify(res.rc, res.timed_out, text, timeout)
    refused = ""
    if not crash and not res.ok and not done:  # declined before a context existed, with a message
        m = [ln.strip() for ln in text.splitlines() if REFUSAL.search(ln)]
        if m:
            refused = " / ".join(dict.fromkeys(m))[:300]
    switches = {k: int(v) for k, v in _SWITCH.findall(text)}
    return SmokeRun(tool, pair, res, done, died if not res.ok or crash else "", crash, refused, parse_kv_log(text),
                    switches)


def common_args(model: Path, k: str, v: str, fa: str, ctx: int, threads: int) -> list[str]:
    """Arguments both tools share: model, K/V cache types, flash attention (on|off|auto), context, threads."""
    return ["-m", str(model), "-ctk", k, "-ctv", v, "-fa", fa, "-c", str(ctx), "-t", str(threads)]


def state_roundtrip(bdir: Path, model: Path, k: str, v: str, *, fa: str, ctx: int, n_predict: int, threads: int,
                    env: dict[str, str], timeout: float, evidence: Path | None, workdir: Path,
                    offload: tuple[str, ...] = ()) -> SmokeRun:
    """Run ``llama-save-load-state`` once for one K/V pair, in ``workdir`` (the tool writes its state file,
    ``dump_state.bin``, where it runs). ``offload``: arguments that put the layers on a device
    (:class:`harness.runners.offload.Offload`; () = the tool's defaults)."""
    tool = Path(bdir) / "bin" / "llama-save-load-state"
    cmd = [str(tool), *common_args(model, k, v, fa, ctx, threads), *offload, "-n", str(n_predict), "--seed", "1234"]
    res = run_tool(cmd, env, timeout, evidence, cwd=workdir)
    return _observe("llama-save-load-state", f"{k}/{v}", res, STATE_PHASES, timeout)


def perplexity(bdir: Path, model: Path, corpus: Path, k: str, v: str, *, fa: str, ctx: int, chunks: int, threads: int,
               env: dict[str, str], timeout: float, evidence: Path | None, base_file: Path, write_base: bool,
               offload: tuple[str, ...] = ()) -> SmokeRun:
    """One ``llama-perplexity`` run: with ``write_base`` the f16 run that saves the logits to ``base_file``,
    else ``--kl-divergence`` against it. stats gets 'ppl' (and 'kld', 'same_top_p_pct', ... for KLD runs).
    ``offload``: as for :func:`state_roundtrip`."""
    tool = Path(bdir) / "bin" / "llama-perplexity"
    cmd = [str(tool), *common_args(model, k, v, fa, ctx, threads), *offload, "-f", str(corpus), "--chunks", str(chunks),
           "-b", str(ctx), "--kl-divergence-base", str(base_file)]
    if not write_base:
        cmd.append("--kl-divergence")
    res = run_tool(cmd, env, timeout, evidence)
    run = _observe("llama-perplexity", f"{k}/{v}", res, PPL_PHASES, timeout)
    stats = parse_kld_stats(run.text) if not write_base else {}
    fin = parse_final_ppl(run.text)
    if fin and "ppl" not in stats:
        stats["ppl"], stats["ppl_se"] = fin
    run.stats = stats
    return run


@dataclass(frozen=True)
class ModelTools:
    """The fork's llama tools of one build folder (``<bdir>/bin``), handed to the MODEL check by its target
    (:meth:`harness.targets.base.Target.model_tools`): the target's build runs them, the check judges what they
    return (:class:`SmokeRun`).

    ``offload`` (:class:`harness.runners.offload.Offload`) puts every run's layers on the target backend's device:
    its arguments (``-dev Vulkan0 -ngl 99``, ``--rpc HOST:PORT -dev RPC0 -ngl 99``) and environment additions
    (``GGML_VK_VISIBLE_DEVICES``) go to every tool call; None runs the tools with their defaults."""

    bdir: Path
    offload: object = None

    @property
    def device(self) -> str:
        """ggml's name of the device the layers must go to ('' when none is named)."""
        return getattr(self.offload, "device", "")

    def has(self, tool: str) -> bool:
        """Whether ``bin/<tool>`` is built."""
        return (Path(self.bdir) / "bin" / tool).is_file()

    def _kw(self, kw: dict) -> dict:
        if self.offload is None:
            return kw
        return {**kw, "offload": tuple(self.offload.args), "env": {**kw.get("env", {}), **self.offload.env}}

    def state_roundtrip(self, model: Path, k: str, v: str, **kw) -> SmokeRun:
        """:func:`state_roundtrip` with this build."""
        return state_roundtrip(self.bdir, model, k, v, **self._kw(kw))

    def perplexity(self, model: Path, corpus: Path, k: str, v: str, **kw) -> SmokeRun:
        """:func:`perplexity` with this build."""
        return perplexity(self.bdir, model, corpus, k, v, **self._kw(kw))
