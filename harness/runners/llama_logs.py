"""Parsers for the output of the fork's ``llama-perplexity`` and ``llama-bench``.

Everything is parsed from text the tools print (formats of llama.cpp ``tools/perplexity/perplexity.cpp``,
``tools/llama-bench/llama-bench.cpp`` and the fork's ``src/llama-kv-cache.cpp`` log lines); the
fixtures under ``tests/fixtures/sweep/`` are real captures of this fork's output.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

# llama_kv_cache: size =    2.20 MiB (   256 cells,  30 layers,  1/1 seqs), K (turbo3):    1.10 MiB, V (turbo3):    1.10 MiB
_KV_SIZE = re.compile(
    r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/(\d+) seqs\), "
    r"K \(([^)]+)\):\s*([\d.]+) MiB, V \(([^)]+)\):\s*([\d.]+) MiB")
# llama_kv_cache: turbo zero-padding K head_dim 64 -> 128 (cache 192 -> 384)
_KV_PAD = re.compile(r"turbo zero-padding ([KV]) head_dim (\d+) -> (\d+) \(cache (\d+) -> (\d+)\)")
# lines by which the fork announces that it changes the K/V types it was asked for
_KV_CHANGES = [
    re.compile(r"auto-asymmetric:.*upgrading K from (\S+) to (\S+)"),
    re.compile(r"layer-adaptive mode (\d+) enabled"),
    re.compile(r"Boundary V (?:mode \d+|auto-enabled)"),
    re.compile(r"V-only LA mode"),
]
_SPLITS = re.compile(r"graph splits = (\d+)")
# llama_context: graph splits = 5 (with bs=64), 7 (with bs=1): the prompt-size and one-token graphs differ
# (src/llama-context.cpp sched_reserve prints one count when they agree)
_SPLITS_TG = re.compile(r"graph splits = \d+ \(with bs=\d+\), (\d+) \(with bs=1\)")


@dataclass
class KvLog:
    """What the KV-cache log lines of one context creation say.

    Attributes:
        size_mib, k_mib, v_mib: total / K / V cache size in MiB as printed (2 decimals).
        cells: KV cells per stream; layers: layers with a KV cache; seqs: streams (n_seq / n_seq_max).
        k_type, v_type: ggml type names printed in the size line (the *layer-0 request* after the fork's
            auto-asymmetric rewrite; per-layer changes are not shown there).
        padding: {'K'|'V': (head_dim, padded_head_dim)} from the zero-padding lines.
        changes: verbatim log lines in which the fork announced a type change.
        size_line: the verbatim size line (for quoting).
        graph_splits: the largest 'graph splits = N' seen (None when absent): the prompt-size (batched) graph's.
        graph_splits_tg: the largest split count of the one-token (decode) graph where llama printed it apart
            ('graph splits = N (with bs=B), M (with bs=1)'); None when it printed one count for both, or none.
    """

    size_mib: float
    k_type: str
    k_mib: float
    v_type: str
    v_mib: float
    cells: int
    layers: int
    seqs: int
    size_line: str
    padding: dict[str, tuple[int, int]] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    graph_splits: int | None = None
    graph_splits_tg: int | None = None
    # a model with interleaved sliding-window attention (Gemma 3) has two caches per context, a non-SWA one and an
    # SWA one, each with its own size line: they are merged into one KvLog (sizes and layers summed) and listed
    # here as {'swa', 'cells', 'layers', 'k_mib', 'v_mib', 'size_line'}; [] for a single cache
    parts: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def kv_dims(kv: dict) -> tuple[int, int, int]:
    """(cells, seqs, layers) of a KvLog dict for :func:`harness.runners.ggml_types.predict_kv_bytes`: the printed
    ones, or for a merged SWA + non-SWA log whose caches have different cell counts, (1, seqs, sum of cells x layers)
    so that the product is still the number of cached rows per stream."""
    parts = kv.get("parts") or []
    if parts and len({p["cells"] for p in parts}) > 1:
        return 1, kv["seqs"], sum(p["cells"] * p["layers"] for p in parts)
    return kv["cells"], kv["seqs"], kv["layers"]


def _merge_swa(first: KvLog, swa: KvLog) -> KvLog:
    """One KvLog for a context with a non-SWA and an SWA cache (see KvLog.parts)."""
    def part(x: KvLog, is_swa: bool) -> dict:
        return {"swa": is_swa, "cells": x.cells, "layers": x.layers, "k_mib": x.k_mib, "v_mib": x.v_mib,
                "k_type": x.k_type, "v_type": x.v_type, "size_line": x.size_line}
    parts = (first.parts or [part(first, False)]) + [part(swa, True)]
    kt = first.k_type if swa.k_type == first.k_type else f"{first.k_type}+{swa.k_type}"
    vt = first.v_type if swa.v_type == first.v_type else f"{first.v_type}+{swa.v_type}"
    return KvLog(size_mib=round(first.size_mib + swa.size_mib, 4), k_type=kt, k_mib=round(first.k_mib + swa.k_mib, 4),
                 v_type=vt, v_mib=round(first.v_mib + swa.v_mib, 4), cells=first.cells, layers=first.layers + swa.layers,
                 seqs=first.seqs, size_line=f"{first.size_line} + SWA: {swa.size_line}",
                 padding={**first.padding, **swa.padding}, changes=first.changes + swa.changes,
                 graph_splits=first.graph_splits, graph_splits_tg=first.graph_splits_tg, parts=parts)


def parse_kv_logs(text: str) -> list[KvLog]:
    """Every KV-cache creation found in a tool log, in order (llama-bench -v makes one per test).

    Padding and type-change lines are attributed to the next size line that follows them.
    Returns [] when there is no size line.
    """
    out: list[KvLog] = []
    pad: dict[str, tuple[int, int]] = {}
    changes: list[str] = []
    splits_all = [int(m.group(1)) for m in _SPLITS.finditer(text)]
    splits_tg = [int(m.group(1)) for m in _SPLITS_TG.finditer(text)]
    swa_next = False
    for raw in text.splitlines():
        line = raw.strip()
        if "llama_kv_cache_iswa: creating" in line:  # the next size line is the non-SWA or the SWA cache of one context
            swa_next = "non-SWA" not in line
            continue
        m = _KV_PAD.search(line)
        if m:
            pad[m.group(1)] = (int(m.group(2)), int(m.group(3)))
            continue
        if any(p.search(line) for p in _KV_CHANGES):
            changes.append(line)
            continue
        m = _KV_SIZE.search(line)
        if m:
            kv = KvLog(size_mib=float(m.group(1)), cells=int(m.group(2)), layers=int(m.group(3)),
                       seqs=int(m.group(5)), k_type=m.group(6), k_mib=float(m.group(7)),
                       v_type=m.group(8), v_mib=float(m.group(9)), size_line=line,
                       padding=dict(pad), changes=list(changes),
                       graph_splits=max(splits_all) if splits_all else None,
                       graph_splits_tg=max(splits_tg) if splits_tg else None)
            if swa_next and out:
                out[-1] = _merge_swa(out[-1], kv)
            else:
                out.append(kv)
            pad, changes, swa_next = {}, [], False
    return out


def parse_kv_log(text: str) -> KvLog | None:
    """The first KV-cache creation of a log (None when the log has no ``llama_kv_cache: size`` line)."""
    logs = parse_kv_logs(text)
    return logs[0] if logs else None


_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)"
_STAT = re.compile(r"^(?P<key>[^:\[\]]+?)\s*:\s*" + _NUM + r"\s*%?(?:\s*±\s*" + _NUM + r")?\s*%?\s*$")
_KLD_KEYS = {
    "Mean PPL(Q)": "ppl",
    "Mean PPL(base)": "ppl_base",
    "Cor(ln(PPL(Q)), ln(PPL(base)))": "cor_ln_ppl",
    "Mean ln(PPL(Q)/PPL(base))": "ln_ppl_ratio",
    "Mean PPL(Q)/PPL(base)": "ppl_ratio",
    "Mean PPL(Q)-PPL(base)": "ppl_diff",
    "Mean    KLD": "kld",
    "Maximum KLD": "kld_max",
    "99.9%   KLD": "kld_p99_9",
    "99.0%   KLD": "kld_p99",
    "95.0%   KLD": "kld_p95",
    "Median  KLD": "kld_median",
    "Mean    Δp": "dp_mean_pct",
    "Maximum Δp": "dp_max_pct",
    "Minimum Δp": "dp_min_pct",
    "Median  Δp": "dp_median_pct",
    "RMS Δp": "dp_rms_pct",
    "Same top p": "same_top_p_pct",
}


def parse_kld_stats(text: str) -> dict[str, float]:
    """Statistics of a ``llama-perplexity --kl-divergence`` run.

    Returns a dict with the keys of ``_KLD_KEYS`` values that were found (e.g. 'ppl', 'ppl_se',
    'ln_ppl_ratio', 'ln_ppl_ratio_se', 'kld', 'kld_se', 'same_top_p_pct', 'same_top_p_pct_se',
    'dp_mean_pct', 'dp_rms_pct', 'cor_ln_ppl' (percent)); '<key>_se' is the ± value. Percent values stay
    in percent. Also 'chunks' (number of per-chunk rows). Empty dict when there is no statistics block.
    """
    out: dict[str, float] = {}
    keys = {re.sub(r"\s+", " ", k): v for k, v in _KLD_KEYS.items()}
    for raw in text.splitlines():
        m = _STAT.match(raw.strip())
        if not m:
            continue
        key = keys.get(re.sub(r"\s+", " ", m.group("key").strip()))
        if key is None:
            continue
        out[key] = float(m.group(2))
        if m.group(3) is not None:
            out[key + "_se"] = float(m.group(3))
    rows = re.findall(r"^\s*(\d+)\s+[\d.]+\s*±", text, re.MULTILINE)
    if out and rows:
        out["chunks"] = int(rows[-1])
    return out


_FINAL = re.compile(r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM)


def parse_final_ppl(text: str) -> tuple[float, float] | None:
    """(PPL, standard error) from the 'Final estimate: PPL = x +/- y' line of a plain perplexity run."""
    m = _FINAL.search(text)
    return (float(m.group(1)), float(m.group(2))) if m else None


def parse_chunk_ppls(text: str) -> list[float]:
    """Cumulative per-chunk PPL values '[1]46.1962,[2]24.0889,...' of a plain perplexity run."""
    return [float(x) for x in re.findall(r"\[\d+\]" + _NUM, text)]


@dataclass
class BenchRow:
    """One llama-bench test: prefill ('pp', n_prompt tokens) or decode ('tg', n_gen tokens) at a depth.

    Attributes:
        test: 'pp' or 'tg'; n_tokens: n_prompt or n_gen; depth: n_depth (tokens already in the cache).
        type_k, type_v: types llama-bench reports it asked for.
        avg_ts, stddev_ts: mean and standard deviation of tokens/s over repetitions.
        samples_ts: tokens/s of each repetition.
    """

    test: str
    n_tokens: int
    depth: int
    type_k: str
    type_v: str
    avg_ts: float
    stddev_ts: float
    samples_ts: list[float]
    n_batch: int = 0
    n_ubatch: int = 0
    n_threads: int = 0
    flash_attn: bool | None = None
    n_gpu_layers: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_bench_json(text: str) -> list[BenchRow]:
    """Rows of ``llama-bench -o json`` output.

    Raises:
        ValueError: the text is not the JSON array llama-bench prints (message names what is wrong).
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"llama-bench output is not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise ValueError("llama-bench JSON is not a list of tests")
    rows = []
    for d in data:
        n_p, n_g = int(d.get("n_prompt", 0)), int(d.get("n_gen", 0))
        test = "pp" if n_p > 0 and n_g == 0 else "tg" if n_g > 0 and n_p == 0 else "pg"
        rows.append(BenchRow(test=test, n_tokens=n_p or n_g, depth=int(d.get("n_depth", 0)),
                             type_k=str(d.get("type_k")), type_v=str(d.get("type_v")),
                             avg_ts=float(d["avg_ts"]), stddev_ts=float(d.get("stddev_ts", math.nan)),
                             samples_ts=[float(x) for x in d.get("samples_ts", [])],
                             n_batch=int(d.get("n_batch", 0)), n_ubatch=int(d.get("n_ubatch", 0)),
                             n_threads=int(d.get("n_threads", 0)), flash_attn=d.get("flash_attn"),
                             n_gpu_layers=int(d.get("n_gpu_layers", 0))))
    return rows


def parse_bench_json_partial(text: str) -> tuple[list[BenchRow], bool]:
    """The tests a ``llama-bench -o json`` run printed before it died, and whether the array was closed.

    llama-bench prints ``[``, then each finished test as one JSON object (flushed as soon as the test
    ends, objects separated by commas) and ``]`` at the very end; a run that aborts in its third test
    leaves ``[`` and two complete objects. Complete objects are kept, a truncated last one is dropped.

    Returns:
        (rows, complete): complete is True when the closing ``]`` was printed.
    """
    s = text.strip()
    if not s.startswith("["):
        return [], False
    dec = json.JSONDecoder()
    objs: list[dict] = []
    i = 1
    while True:
        while i < len(s) and s[i] in " \t\r\n,":
            i += 1
        if i >= len(s) or s[i] == "]":
            break
        try:
            obj, i = dec.raw_decode(s, i)
        except json.JSONDecodeError:
            break  # the object being printed when the tool died
        if isinstance(obj, dict):
            objs.append(obj)
    complete = i < len(s) and s[i] == "]"
    return parse_bench_json(json.dumps(objs)), complete


# llama-bench --progress: "llama-bench: benchmark 2/4: warmup generation run"
_BENCH_PROGRESS = re.compile(r"llama-bench: benchmark (\d+)/(\d+): (warmup prompt run|warmup generation run|depth run|"
                             r"prompt run|generation run)")
BENCH_PHASES = {"warmup prompt run": "prefill warm-up", "warmup generation run": "decode warm-up",
                "depth run": "depth fill (prefill up to the test depth)", "prompt run": "prefill",
                "generation run": "decode"}


def last_bench_progress(text: str) -> tuple[int, str] | None:
    """(1-based test number, phase word) of the last ``llama-bench --progress`` line, or None.

    Phase words (from :data:`BENCH_PHASES`): 'prefill warm-up', 'decode warm-up', 'depth fill ...',
    'prefill', 'decode'.
    """
    last = None
    for m in _BENCH_PROGRESS.finditer(text):
        last = m
    return (int(last.group(1)), BENCH_PHASES[last.group(3)]) if last else None


def kld_chunks_done(text: str) -> int:
    """How many per-chunk rows a ``llama-perplexity --kl-divergence`` run printed (``   3   33.04 ± ...``),
    or how many ``[n]ppl`` values a plain perplexity run printed."""
    rows = re.findall(r"^\s*(\d+)\s+[-+\d.naif]+\s*±", text, re.MULTILINE)
    return max(len(rows), len(parse_chunk_ppls(text)))


# llama-perplexity prints each KLD to 6 decimals (tools/perplexity/perplexity.cpp: "Mean    KLD: %10.6lf"), so a
# printed KLD, and the difference of two, is known to 1e-6 only
KLD_PRINT_RESOLUTION = 1e-6


def kld_shown(v):
    """A KL divergence as the tables show it: a negative value no further below 0 than llama-perplexity's printed
    resolution (:data:`KLD_PRINT_RESOLUTION`) is 0.0, anything else unchanged (None, a real value, a negative beyond
    the resolution: a fault to see). An exact 0 (the f16 cache against the f16 baseline) can be printed as -0.000001,
    and a KLD is never negative. Display only: run.json, the CSVs and every rule keep the value as measured."""
    if isinstance(v, float) and -KLD_PRINT_RESOLUTION <= v < 0:
        return 0.0
    return v
