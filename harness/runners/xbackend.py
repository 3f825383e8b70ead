"""Cross-backend sweep: the same model, corpus, context and K/V pairs on two or more backends, logit for logit.

``turbo-harness sweep --backends A,B[,C...]`` runs, per backend, the ordinary sweep (:func:`run_sweep`: its f16
baseline, each pair once, speed, decode), with one difference on backend A (the reference, listed first): each pair's
one ``llama-perplexity`` pass saves its logits (``--kl-divergence-base``; it still prints the pair's PPL) instead of
being scored against A's f16 logits, and A's KLD vs its own f16 is computed by the harness from the two saved files
(:mod:`harness.runners.logit_files`, cross-checked against llama-perplexity in tests/test_logit_files.py). Then per
K/V pair each other backend B runs the pair scored against A's saved logits of it (``--kl-divergence-base A-file
--kl-divergence``): the fork's own cross-backend KLD, top-1 agreement and PPL of B for that pair.

f16/f16 scored this way is the noise floor (different kernels and reduction orders of the same exact cache).
Model passes (llama-perplexity runs): each backend's sweep (its f16 baseline and one pass per pair, as an ordinary
sweep) plus one scoring pass per pair on each other backend: with N pairs and two backends 2(N+1) + N, the bound of
the spec. (Before, A ran each non-f16 pair twice: once scored, once to save its logits, 4N+1 in all.)

Backends by name (harness/fork/backends.py): ``cpu`` (``-ngl 0 -dev none`` and the GPU backends' hide_env, so a CPU
side of a GPU build stays on the CPU), a GPU backend (``-ngl 99``; a Vulkan side on a machine whose only Vulkan devices
are software ones also gets ``GGML_VK_VISIBLE_DEVICES`` naming them: :mod:`harness.runners.offload`), or ``rpcN`` (the
N-th ``--rpc`` server, ``-ngl 99 --rpc HOST:PORT -dev RPC0``: every layer on that server's device, none on a local GPU
of the side's build). Judging is in :mod:`harness.checks.xbackend`.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from harness.errors import HarnessError
from harness.fork import backends
from harness.runners.sweep_config import JobRecord, SweepConfig, SweepResult, pair_label

REF_PAIR = ("f16", "f16")
_RPC = re.compile(r"^rpc(\d+)$")


def parse_backends(spec: str, n_rpc: int) -> list[str]:
    """'cpu,cuda' -> ['cpu', 'cuda']: two or more distinct names, each a row of the backend table or ``rpcN``.

    Args:
        spec: the ``--backends`` value. n_rpc: how many ``--rpc`` endpoints were given (rpcN needs N < n_rpc).
    Raises:
        HarnessError: fewer than two names, a repeated name, an unknown name, or rpcN without its endpoint.
    """
    names = [s.strip().lower() for s in (spec or "").split(",") if s.strip()]
    if len(names) < 2:
        raise HarnessError(f"--backends {spec!r}: give two or more backends, the reference first, e.g. "
                           f"--backends cpu,cuda (names: {backends.choices(', ')}, rpcN)")
    if len(set(names)) != len(names):
        raise HarnessError(f"--backends {spec!r} names a backend twice: give each once")
    for n in names:
        m = _RPC.match(n)
        if m and int(m.group(1)) >= n_rpc:
            raise HarnessError(f"--backends {n}: the rpc-server number {m.group(1)} needs --rpc with "
                               f"{int(m.group(1)) + 1} endpoint(s) (HOST:PORT,...); {n_rpc} given")
        if not m and backends.find(n) is None:
            raise HarnessError(f"--backends {n}: unknown backend; give {backends.choices(', ')} or rpcN "
                               f"(the N-th --rpc server)")
    return names


def side_config(name: str, template: SweepConfig, bdir: Path, endpoints: list[str]) -> SweepConfig:
    """The sweep settings of one side: ``template`` (pairs, sizes, corpus, model) with this backend's build folder,
    offload, remote server and the variables that keep its tools on it.

    cpu: ``-ngl 0 -dev none`` plus every GPU backend's hide_env (CUDA_VISIBLE_DEVICES='' ...), so that a CPU side of a
    GPU build neither offloads layers nor big matrix products. rpcN: ``-ngl 99 --rpc endpoints[N] -dev RPC0`` (the
    tools number the devices of the one server they are given from RPC0, ggml-rpc.cpp ggml_backend_rpc_add_server; the
    device list keeps the layers off a local GPU of the side's build). Any other name: ``-ngl 99`` on its own build
    (a Vulkan side's device variable is added when it runs: :func:`harness.runners.offload.sweep_device_env`)."""
    m = _RPC.match(name)
    if name == "cpu":
        hide = {k: v for b in backends.TABLE if b.name != "cpu" for k, v in b.hide_env}
        return replace(template, backend="cpu", bdir=bdir, ngl=0, rpc=[], devices="none",
                       extra_env={**template.extra_env, **hide})
    if m:
        return replace(template, backend=name, bdir=bdir, ngl=99, rpc=[endpoints[int(m.group(1))]], devices="RPC0")
    return replace(template, backend=name, bdir=bdir, ngl=99, rpc=[], devices="")


@dataclass
class XConfig:
    """A cross-backend sweep: one :class:`SweepConfig` per backend, the reference (A) first. Every side has the same
    model, corpus, ctx, chunks and pairs (checked by :func:`check_sides`)."""

    sides: list[SweepConfig]
    target: str = ""          # the backend under test (FAIL there, PARTIAL elsewhere); default the second side

    def __post_init__(self):
        self.target = self.target or self.sides[1].backend
        self.sides = [replace(s, save_pair_logits=i == 0) for i, s in enumerate(self.sides)]

    @property
    def ref(self) -> SweepConfig:
        return self.sides[0]


def check_sides(cfg: XConfig) -> None:
    """Raise HarnessError when the sides differ in what makes logits comparable (model, corpus, ctx, chunks, pairs, the
    fork source their builds record: commit, dirty state, diff), or the target is not one of them."""
    a = cfg.ref
    for s in cfg.sides[1:]:
        for what in ("model", "corpus", "ctx", "chunks", "pairs"):
            if getattr(s, what) != getattr(a, what):
                raise HarnessError(f"--backends: {s.backend} and {a.backend} differ in {what} "
                                   f"({getattr(s, what)} vs {getattr(a, what)}): logits of different runs cannot be compared")
    from harness.fork.provenance import source_label
    from harness.runners.sweep_jobs import _fork_identity
    ids = {s.backend: _fork_identity(s.bdir) for s in cfg.sides}
    fa = ids[a.backend]
    for s in cfg.sides[1:]:
        fs = ids[s.backend]
        if "unknown" in (str(fa["fork_commit"]), str(fs["fork_commit"])):
            continue  # a build without a record: nothing to compare (its report says the commit is unknown)
        if [str(fa[k]) for k in ("fork_commit", "fork_dirty", "fork_diff_sha256")] != \
                [str(fs[k]) for k in ("fork_commit", "fork_dirty", "fork_diff_sha256")]:
            lab = lambda f: source_label(f["fork_commit"], f["fork_dirty"], f["fork_diff_sha256"])  # noqa: E731
            raise HarnessError(f"--backends: {s.backend}'s build {s.bdir} was built from fork {lab(fs)} and "
                               f"{a.backend}'s {a.bdir} from {lab(fa)}: a difference would be the commits', not the "
                               f"backends'; rebuild both from one checkout (or give --build-dir)")
    if cfg.target not in [s.backend for s in cfg.sides]:
        raise HarnessError(f"--target {cfg.target}: not one of --backends {','.join(s.backend for s in cfg.sides)}")


@dataclass
class XResult:
    """What :func:`run_xbackend` produced.

    Attributes:
        sweeps: backend -> its own :class:`SweepResult`.
        logits: pair label -> the reference backend's pass of that pair (it saved the pair's logits).
        cross: (backend B, pair label) -> B's run of the pair scored against the reference's logits (kind 'ppl').
        load_start, load_end: :func:`harness.runners.sweep.machine_load` before the first and after the last run.
        passes: {'sweeps': llama-perplexity runs of the per-backend sweeps, 'scoring': cross scoring runs (runs
            that really ran or were found in the cache), 'bound': what the spec allows: the per-backend sweeps'
            passes plus one scoring pass per pair and compared backend}.
    """

    config: XConfig
    sweeps: dict[str, SweepResult] = field(default_factory=dict)
    logits: dict[str, JobRecord] = field(default_factory=dict)
    cross: dict[tuple[str, str], JobRecord] = field(default_factory=dict)
    seconds: float = 0.0
    jobs_run: int = 0
    jobs_cached: int = 0
    jobs_failed: int = 0
    load_start: dict = field(default_factory=dict)
    load_end: dict = field(default_factory=dict)
    passes: dict = field(default_factory=dict)
    interrupted: dict | None = None


def _perplexity_passes(res: SweepResult) -> int:
    """llama-perplexity runs of one per-backend sweep: its baseline and each pair's scoring run (and depth runs)."""
    return ((1 if res.base is not None else 0) + len(res.ppl) + len(res.depth_base)
            + len([k for k in res.depth if k[0] != res.config.ctx]))


def run_xbackend(cfg: XConfig, progress: bool = True, log: Callable[[str], None] = print,
                 traits: dict | None = None) -> XResult:
    """Run (or resume: every job is cached like a sweep's) a cross-backend sweep.

    Args:
        cfg: the sides, reference first. progress/log: as :func:`harness.runners.sweep.run_sweep`.
        traits: {type name: TypeTrait} (tests inject them; default measured from each side's build).
    Returns:
        XResult. A side whose sweep could not start (``error``) leaves its cross jobs failed with that reason.
    Raises:
        HarnessError: the tools of a side are not built. KeyboardInterrupt / Interrupted: with ``e.xbackend_result``
            (the partial result; its ``interrupted`` names the signal), finished jobs stay cached.
    """
    from harness.interrupt import Interrupted, raise_if_pending
    from harness.runners import sweep as S

    from harness.runners.offload import sweep_device_env
    t0 = time.time()
    cfg.sides = [sweep_device_env(s) for s in cfg.sides]  # once per side: its own sweep and its scoring runs use it
    out = XResult(cfg, load_start=S.machine_load())
    try:
        for side in cfg.sides:
            (log or print)(f"sweep on {side.backend}: {len(side.pairs)} pairs")
            res = S.run_sweep(side, progress=progress, log=log, traits=traits)
            out.sweeps[side.backend] = res
            out.jobs_run += res.jobs_run
            out.jobs_cached += res.jobs_cached
            out.jobs_failed += res.jobs_failed
        ref = out.sweeps[cfg.ref.backend]
        for k, v in cfg.ref.pairs:
            raise_if_pending()
            lab = pair_label(k, v)
            rec = ref.ppl.get(lab) or JobRecord("ppl", lab, False, ref.error or f"{cfg.ref.backend} did not run {lab}")
            out.logits[lab] = rec
            for side in cfg.sides[1:]:
                raise_if_pending()
                out.cross[(side.backend, lab)] = _cross_job(side, out.sweeps[side.backend], cfg.ref.backend, rec, k, v,
                                                            out, log)
    except (KeyboardInterrupt, Interrupted) as e:
        out.interrupted = {"signal": getattr(e, "name", "SIGINT"), "exit_code": getattr(e, "exit_code", 130),
                           "units": "jobs", "in_progress": None, "not_run": []}
        partial = getattr(e, "sweep_result", None)
        if partial is not None:
            out.sweeps[partial.config.backend] = partial
        e.xbackend_result = out
        raise
    finally:
        out.seconds = time.time() - t0
        out.load_end = S.machine_load()
        out.passes = {"sweeps": sum(_perplexity_passes(r) for r in out.sweeps.values()),
                      "scoring": len([r for r in out.cross.values() if r.key]),
                      "bound": sum(_perplexity_passes(r) for r in out.sweeps.values())
                      + len(cfg.ref.pairs) * (len(cfg.sides) - 1)}
    return out


def _cross_job(side: SweepConfig, res: SweepResult, ref_name: str, logits: JobRecord, k: str, v: str, out: XResult,
               log) -> JobRecord:
    """Backend ``side`` runs pair (k, v) scored against the reference's logits of that pair (cached by both keys)."""
    from harness.runners import sweep as S
    lab = pair_label(k, v)
    if res.error:
        return JobRecord("ppl", lab, False, res.error, fault="harness")
    if not logits.ok:
        why = logits.error or "not run"
        return JobRecord("ppl", lab, False, f"not compared: {ref_name} gave no logits for {lab}: {why}",
                         fault="reference")
    ident = S.job_ident(side, S._fork_identity(side.bdir), res.meta)
    key = S._key({**ident, "job": "xscore", "pair": [k, v], "ref": logits.key or logits.data.get("base_file"), "v": 1})
    cache = S._Cache(side.cache_dir)
    rec = None if side.fresh else S.cached_run(side, cache, key)
    if rec is not None:
        out.jobs_cached += 1
        return rec
    rec = S._run_ppl(side, S.binary(side.bdir, "llama-perplexity"), cache, key, k, v, logits.data["base_file"])
    out.jobs_run += 1  # it ran, failed or not
    out.jobs_failed += not rec.ok
    if rec.ok:
        cache.put(rec)
    elif log:
        log(f"{side.backend} {lab} scored against {ref_name}: {rec.error}")
    return rec


def copy_cross_evidence(res: XResult, run_dir: Path) -> dict[str, list[str]]:
    """Copy the logits and scoring runs' command lines and logs into ``run_dir/evidence/cross/<backend>/<pair>/``
    (the logits files themselves are referenced in place). Returns {'logits:<pair>' | 'cross:<backend>:<pair>': paths}."""
    import shutil
    out: dict[str, list[str]] = {}
    items = [(f"logits:{lab}", res.config.ref.backend, rec) for lab, rec in res.logits.items()]
    items += [(f"cross:{b}:{lab}", b, rec) for (b, lab), rec in res.cross.items()]
    for key, backend, rec in items:
        dst = Path(run_dir) / "evidence" / "cross" / backend / rec.pair.replace("/", "_")
        rels = []
        for name, src in rec.evidence.items():
            if name.endswith(".kld"):
                rels.append(str(src))
            elif Path(src).is_file():
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst / name)
                rels.append(str((dst / name).relative_to(run_dir)))
        out[key] = rels
    return out
