"""What a model-level sweep is made of: the K/V pairs (parsing, labels, the attention-rotation suffix), the
settings (:class:`SweepConfig`) and the records its jobs leave (:class:`JobRecord`, :class:`SweepResult`).

Split out of :mod:`harness.runners.sweep` (which re-exports every name here); nothing here runs a tool.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.errors import HarnessError
from harness.fork.build import REPO_ROOT
from harness.runners.inputs import ModelInfo

PINNED_ENV = {"TURBO_AUTO_ASYMMETRIC": "0", "TURBO_LAYER_ADAPTIVE": "0", "TURBO_SPARSE_V": "0"}

DEFAULT_PAIRS = ("f16/f16,q8_0/q8_0,q4_0/q4_0,q4_0/q4_0+rot,turbo4/turbo4,turbo3/turbo3,turbo2/turbo2,"
                 "q8_0/turbo4,q8_0/turbo3,turbo4/q8_0")

# Defaults sized so the whole default sweep takes ~10-15 min on a 2-core CPU (turbo KV on CPU is
# 3-25x slower than f16), and a GPU sweep gets enough tokens for tight paired statistics.
CPU_DEFAULTS = {"ctx": 256, "chunks": 8, "depths": (0, 256), "reps": 3, "n_prompt": 64, "n_gen": 16, "timeout": 900}
GPU_DEFAULTS = {"ctx": 512, "chunks": 64, "depths": (0, 2048, 8192), "reps": 5, "n_prompt": 512, "n_gen": 128,
                "timeout": 1800}


# The pairs the sweep's rules need (spec "Model-level sweeps"): f16/f16 calibrates the KLD noise floor against the
# f16 baseline, q8_0/q8_0 is what every pair's PPL and prefill speed are judged against.
BASELINE_PAIRS = (("f16", "f16"), ("q8_0", "q8_0"))


# llama-perplexity --kl-divergence (tools/perplexity/perplexity.cpp, kl_divergence) scores tokens n_ctx/2 .. n_ctx-2 of
# every chunk (``first = n_ctx/2``, ``n_ctx - 1 - first`` tokens) and returns before printing any KL-divergence
# statistics while ``kld.count < 100`` ("we do not wish to do statistics on so few values").
KLD_MIN_SCORED = 100


def kld_scored_tokens(ctx: int, chunks: int) -> int:
    """Tokens llama-perplexity scores for KLD over ``chunks`` chunks of ``ctx`` tokens: ``chunks * (ctx - 1 - ctx//2)``
    (tools/perplexity/perplexity.cpp, kl_divergence: ``first = n_ctx/2``, ``n_ctx - 1 - first`` per chunk)."""
    return chunks * max(0, ctx - 1 - ctx // 2)


def check_kld_size(ctx: int, chunks: int) -> None:
    """Refuse a ``--ctx`` x ``--chunks`` for which llama-perplexity prints no KL-divergence statistics.

    It prints them only when it scored :data:`KLD_MIN_SCORED` (100) or more tokens (``if (kld.count < 100) return;``
    in tools/perplexity/perplexity.cpp), and it scores :func:`kld_scored_tokens` of them: every pair's cell would end
    in ERROR after the tools ran. The smallest context for ``chunks`` chunks is ``2*ceil(100/chunks) + 1``.

    Raises:
        HarnessError: one line with the tokens scored, the tool's rule, and the smallest --ctx (and --chunks) that work.
    """
    got = kld_scored_tokens(ctx, chunks)
    if got >= KLD_MIN_SCORED:
        return
    per_chunk = -(-KLD_MIN_SCORED // chunks)
    min_ctx = 2 * per_chunk + 1
    per = ctx - 1 - ctx // 2
    more = f" (or --chunks {-(-KLD_MIN_SCORED // per)} at --ctx {ctx})" if per > 0 else ""
    raise HarnessError(f"--ctx {ctx} with --chunks {chunks} is too small: llama-perplexity scores only the second half of "
                       f"each chunk ({per} of {ctx} tokens, {got} in all) and prints no KL-divergence statistics for "
                       f"fewer than {KLD_MIN_SCORED} (tools/perplexity/perplexity.cpp: 'kld.count < 100'): give "
                       f"--ctx {min_ctx} or more{more}")


def with_baselines(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """The pairs with the missing :data:`BASELINE_PAIRS` put in front, and the labels of those added.

    Without q8_0/q8_0 no pair can be judged (the rules compare with q8_0) and the sweep would be SKIP
    ("nothing judged"); without f16/f16 KLD has no noise floor. ``--no-baselines`` skips this.
    """
    missing = [p for p in BASELINE_PAIRS if p not in pairs]
    return missing + [p for p in pairs], [pair_label(k, v) for k, v in missing]


def baselines_note(added: list[str]) -> str:
    """The one sentence that says which baseline pairs :func:`with_baselines` added: printed when the sweep starts
    and kept among the report's notes (the console's list of notes at the end leaves it out: said once)."""
    return (f"added the baseline pairs {', '.join(added)} that the rules need (--no-baselines to run only the pairs "
            f"given)")


def parse_pairs(spec: str) -> list[tuple[str, str]]:
    """'f16/f16,q8_0,q8_0/turbo3' -> [('f16','f16'), ('q8_0','q8_0'), ('q8_0','turbo3')].

    A single name means a symmetric pair. Raises HarnessError on an empty spec or an empty name.
    """
    out: list[tuple[str, str]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        rot = item.endswith(ROT_SUFFIX)
        parts = [p.strip() for p in item.removesuffix(ROT_SUFFIX).split("/")]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or not all(parts) or any(ROT_SUFFIX in p for p in parts):
            raise HarnessError(f"bad K/V pair {item!r}: write K/V, e.g. q8_0/turbo3 (or one name for K=V; "
                               f"append {ROT_SUFFIX} for the attention rotation, e.g. q4_0/q4_0{ROT_SUFFIX})")
        if rot:
            parts[1] += ROT_SUFFIX
        if (parts[0], parts[1]) not in out:
            out.append((parts[0], parts[1]))
    if not out:
        raise HarnessError("no K/V pairs given: e.g. --pairs f16/f16,q8_0/q8_0,turbo3/turbo3")
    return out


def pair_label(k: str, v: str) -> str:
    return f"{k}/{v}"


# A pair written with this suffix (``q4_0/q4_0+rot``) runs with the Hadamard attention rotation that upstream
# llama.cpp switches on by default for quantised caches and this fork family switches off; the fork's switches
# are LLAMA_ATTN_ROT_{K,V}_OVERRIDE (src/llama-kv-cache.cpp), and its log line ``attn_rot_k = 1`` proves it.
ROT_SUFFIX = "+rot"
ROT_ENV = {"LLAMA_ATTN_ROT_K_OVERRIDE": "1", "LLAMA_ATTN_ROT_V_OVERRIDE": "1"}


def split_pair(k: str, v: str) -> tuple[str, str, bool]:
    """(K cache type, V cache type, rotation on) of a pair as :func:`parse_pairs` stores it ('q4_0', 'q4_0+rot')."""
    rot = k.endswith(ROT_SUFFIX) or v.endswith(ROT_SUFFIX)
    return k.removesuffix(ROT_SUFFIX), v.removesuffix(ROT_SUFFIX), rot


def rotation_problem(stderr: str) -> str:
    """'' when the log shows the attention rotation on for K and V (``attn_rot_k = 1``, ``attn_rot_v = 1``), else
    the reason the run does not measure what the '+rot' pair names."""
    import re
    got = {side: m.group(1) for side, m in ((s, re.search(rf"attn_rot_{s} = (\d+)", stderr)) for s in ("k", "v")) if m}
    if got.get("k") == "1" and got.get("v") == "1":
        return ""
    if not got:
        return "the log has no 'attn_rot_k = ...' line: this build cannot switch the attention rotation on"
    return (f"attention rotation asked for ({', '.join(f'{k}=1' for k in ROT_ENV)}) but the log says "
            f"attn_rot_k = {got.get('k', '?')}, attn_rot_v = {got.get('v', '?')}: the override did not take effect")


def rpc_unreached(endpoints, stderr: str) -> str:
    """'' when the tool reached every ``--rpc`` server, else why its run does not measure the remote devices.

    The fork's tools print 'Failed to connect to HOST:PORT' (ggml-rpc.cpp) for a server they cannot reach, then
    carry on with the local devices only and exit 0: such a run measured this machine, not the remote one."""
    missed = [ep for ep in endpoints or () if f"Failed to connect to {ep}" in stderr]
    if not missed:
        return ""
    return (f"the tool could not reach the rpc-server at {', '.join(missed)} ('Failed to connect to {missed[0]}' in "
            f"its log) and ran on this machine's devices only: nothing was measured remotely; start the server "
            f"(README 'Remote devices') and rerun")


def no_device_used(cfg, stderr: str) -> str:
    """'' unless a run asked to offload to a GPU backend's device used none, else why it measured the CPU instead.

    llama.cpp prints 'llama_model_load_from_file_impl: using device Vulkan0 (...)' for every device it loads the model
    with (src/llama.cpp; layers go to them as -ngl says); a tool of a GPU build that sees no device of it (a Vulkan
    build on a machine whose only Vulkan device is lavapipe, which ggml ignores unless ``GGML_VK_VISIBLE_DEVICES``
    names it; CUDA_VISIBLE_DEVICES hiding every GPU) prints none, ignores ``-ngl`` and runs on the CPU with exit 0. Checked for a side that offloads
    (``ngl`` > 0) on a backend other than the CPU; a remote side is :func:`rpc_unreached`'s, and a side whose device
    list names the devices (``-dev RPC0``) must have used each of them."""
    import re
    if cfg.ngl <= 0 or cfg.backend in ("cpu", ""):
        return ""
    named = [d for d in (cfg.devices or "").split(",") if d and d != "none"]
    unused = [d for d in named if not re.search(rf"using device {re.escape(d)}\b", stderr)]
    if unused:
        return (f"the tool did not use {unused[0]} (no 'using device {unused[0]}' line in its log, though -dev "
                f"{cfg.devices} -ngl {cfg.ngl} asked for it), so nothing was measured on {cfg.backend}")
    if named or cfg.rpc or "using device " in stderr:
        return ""
    return (f"the tool used no {cfg.backend} device (no 'using device' line in its log: it ignored -ngl {cfg.ngl} and ran "
            f"on the CPU), so nothing was measured on {cfg.backend}: make the device visible to it (a software Vulkan "
            f"device: GGML_VK_VISIBLE_DEVICES=0) or check the driver")


def run_problem(cfg, stderr: str) -> str:
    """'' when a finished run measured where it was asked to, else why not (:func:`rpc_unreached`,
    :func:`no_device_used`)."""
    return rpc_unreached(cfg.rpc, stderr) or no_device_used(cfg, stderr)


def fewer_chunks(asked: int, stderr: str) -> str:
    """'' unless a llama-perplexity run given ``--chunks asked`` computed over fewer chunks, then why and the fix. It
    takes min(--chunks, corpus tokens / n_ctx) and says so on stderr ('calculating perplexity over N chunks' for a
    plain or --kl-divergence-base run: tools/perplexity/perplexity.cpp), so a corpus too short for ctx x chunks would
    otherwise give a report that names chunks never measured. The up-front corpus check counts bytes, not tokens,
    and cannot see this."""
    import re
    m = re.search(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+)", stderr)
    if m is None or int(m.group(1)) >= asked:
        return ""
    n, ctx = int(m.group(1)), m.group(2)
    return (f"llama-perplexity computed over {n} chunks, not the {asked} asked: the corpus holds too few tokens "
            f"for --ctx {ctx} x --chunks {asked}; give a longer --corpus, or --chunks {n} or fewer")


def pair_slug(k: str, v: str) -> str:
    return f"{k}-{v}".replace("/", "_")


@dataclass
class SweepConfig:
    """Everything that defines a sweep (all sizes in tokens; timeout in seconds per tool call)."""

    model: Path
    corpus: Path
    pairs: list[tuple[str, str]]
    bdir: Path
    backend: str = "cpu"
    ctx: int = CPU_DEFAULTS["ctx"]
    chunks: int = CPU_DEFAULTS["chunks"]
    depths: tuple[int, ...] = CPU_DEFAULTS["depths"]
    reps: int = CPU_DEFAULTS["reps"]
    n_prompt: int = CPU_DEFAULTS["n_prompt"]
    n_gen: int = CPU_DEFAULTS["n_gen"]
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    ngl: int = 0
    batch: int = 0     # 0 = ctx (one sequence per pass, the same layout for every cell)
    ubatch: int = 0    # 0 = min(batch, 512)
    fresh: bool = False
    fork_defaults: bool = False
    timeout: float = CPU_DEFAULTS["timeout"]
    cache_dir: Path = field(default_factory=lambda: Path(os.environ.get("TURBO_SWEEP_CACHE") or REPO_ROOT / ".cache" / "sweep"))
    bench: bool = True
    no_baselines: bool = False                                  # --no-baselines: run only the pairs asked for
    baselines_added: list[str] = field(default_factory=list)    # labels added by with_baselines (for the report)
    rpc: list[str] = field(default_factory=list)                # --rpc endpoints passed to the tools (remote devices)
    # decode agreement (harness/runners/decode.py): greedy decode of decode_n_gen tokens after decode_n_prompt prompt
    # tokens, for decode_prompts corpus prompts (0 = off), with the f16 cache and with each pair
    decode_prompts: int = 0
    decode_n_prompt: int = 64
    decode_n_gen: int = 32
    # depth (harness/runners/depth.py): KLD of depth_pairs at each context length in kld_depths (() = off), all on
    # the same depth_tokens tokens of the corpus
    kld_depths: tuple[int, ...] = ()
    depth_pairs: list[tuple[str, str]] = field(default_factory=list)
    # cross-backend sweeps (harness/runners/xbackend.py): variables that keep the tools on this side's backend (e.g.
    # CUDA_VISIBLE_DEVICES='' for the CPU side of a CUDA build; harness/fork/backends.py hide_env) and the fork's
    # own --device list ('none' = the CPU only; '' = not passed)
    extra_env: dict[str, str] = field(default_factory=dict)
    devices: str = ""
    # the reference side of a cross-backend sweep: each pair's one llama-perplexity pass saves its logits (scored
    # by the other backends) and its KLD vs this side's f16 is computed from the two files (runners/logit_files.py)
    save_pair_logits: bool = False
    # what the side's backend device needs and is (harness/runners/offload.py sweep_device_env: the Vulkan visibility
    # variable set, the devices used, whether one is a software device); {} until looked at, and for other backends
    device_facts: dict = field(default_factory=dict)

    def __post_init__(self):
        self.batch = self.batch or self.ctx
        self.ubatch = self.ubatch or min(self.batch, 512)

    def env(self) -> dict[str, str]:
        """Variables set for every tool call (none under --fork-defaults, which also unsets PINNED_ENV)."""
        return {**({} if self.fork_defaults else PINNED_ENV), **self.extra_env}

    def env_unset(self) -> tuple[str, ...]:
        return tuple(PINNED_ENV) if self.fork_defaults else ()

    def pinned(self) -> dict:
        """The settings that change the numbers, as recorded in the report."""
        return {"ctx": self.ctx, "chunks": self.chunks, "batch": self.batch, "ubatch": self.ubatch,
                "threads": self.threads, "ngl": self.ngl, "flash_attn": "on", "fit": "off",
                "depths": list(self.depths), "reps": self.reps, "n_prompt": self.n_prompt, "n_gen": self.n_gen,
                "env": self.env(), "env_unset": list(self.env_unset()), "fork_defaults": self.fork_defaults,
                "backend": self.backend, "timeout_s": self.timeout,
                # the decode-agreement and depth jobs' sizes (their cells measure other samples when these differ)
                "decode_prompts": self.decode_prompts, "decode_prompt_tokens": self.decode_n_prompt,
                "decode_tokens": self.decode_n_gen, "kld_depths": list(self.kld_depths),
                **({"rpc": list(self.rpc)} if self.rpc else {}),
                **({"devices": self.devices} if self.devices else {}),
                **({"save_pair_logits": True} if self.save_pair_logits else {})}


@dataclass
class JobRecord:
    """One finished (or failed) job. ``data`` holds parsed numbers; ``evidence`` maps names to files
    (absolute, in the cache) holding the raw output they were parsed from."""

    kind: str                    # 'base' | 'ppl' | 'bench'
    pair: str
    ok: bool
    error: str = ""
    data: dict = field(default_factory=dict)
    evidence: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False
    key: str = ""
    fault: str = ""              # failed jobs: 'fork' (FAIL), 'refused' (SKIP), 'harness' (ERROR); see classify_failure
    phase: str = ""              # failed jobs: the phase that died, e.g. 'decode (tg16 at depth 0)'

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SweepResult:
    """The outcome of :func:`run_sweep`: inputs, identity of build/model/corpus, and every job record."""

    config: SweepConfig
    meta: dict
    model_info: ModelInfo | None
    base: JobRecord | None
    ppl: dict[str, JobRecord] = field(default_factory=dict)
    bench: dict[str, JobRecord] = field(default_factory=dict)
    error: str = ""              # a sweep-wide problem (corrupt model, empty corpus) -> every cell ERROR
    seconds: float = 0.0
    jobs_run: int = 0            # jobs whose tool ran in this invocation, those that failed included
    jobs_cached: int = 0
    jobs_failed: int = 0         # of jobs_run: those that failed (never cached: a rerun runs them again)
    traits: dict = field(default_factory=dict)  # {type name: TypeTrait} measured from the build
    interrupted: dict | None = None  # {'signal', 'exit_code', 'in_progress', 'not_run'} when a signal stopped it
    decode: dict[str, JobRecord] = field(default_factory=dict)         # pair label -> greedy-decode job
    depth: dict[tuple[int, str], JobRecord] = field(default_factory=dict)  # (ctx, pair label) -> KLD job at that depth
    depth_base: dict[int, JobRecord] = field(default_factory=dict)     # ctx -> f16 baseline at that depth

