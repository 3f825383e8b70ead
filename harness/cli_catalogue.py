"""CLI: replay the bug ``catalogue`` (checks/replays.toml) at each entry's parent and fix, and ``replay-export`` the
commits it needs as source tarballs for a machine without git (:mod:`harness.replay_src`).

The catalogue prints one row per side with its verdict, wall time and, for a side that compiled, the build's wall
and CPU seconds (the CPU seconds are what the build costs on an idle machine, whatever the load was), then a
summary; ``--json`` also writes all of it as a record (for committing a result measured elsewhere).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import click

from harness.cli_replay import _expected, _prefer, entry_options, judge_side, replay_commit
from harness.cli_types import existing_dir
from harness.errors import HarnessError
from harness.fork import build as fb
from harness.replay import history_dir, load_catalogue


def _select(ids, backend: str, all_: bool, echo=click.echo) -> list[dict]:
    """The entries to replay: the named ones (any status), else the backend's replayed ones (all with ``all_``);
    the others of the backend are listed with their reason."""
    every = load_catalogue()
    if ids:
        entries = [e for e in every if e["id"] in ids]
        if len(entries) != len(set(ids)):
            raise HarnessError(f"unknown catalogue id among {', '.join(ids)}; known: {', '.join(e['id'] for e in every)}")
        return entries
    mine = [e for e in every if e.get("backend", "cpu") == backend]
    entries = [e for e in mine if all_ or e.get("status") == "replayed"]
    for e in mine:
        if e not in entries:
            echo(f"{e['id']:34s} not replayed: {e.get('reason', e.get('status', ''))[:150]}")
    return entries


def _side(fork, e: dict, side: str, one_tree: bool) -> dict:
    """Replay one side of an entry; the record of it (verdict, evidence, times, build figures, report)."""
    rev = e.get(f"replay_{side}", e[side])
    t0 = time.time()
    rec = {"commit": rev, "expected": _expected(e, side), "built": False}
    try:
        run, run_dir, built = replay_commit(fork, rev, [e["check"]], e["types"], e.get("routes"),
                                            label=f"{e['id']} {side}", log=lambda s: None, options=entry_options(e),
                                            sanitize=e.get("sanitize"), prefer=_prefer(e),
                                            backend=e.get("backend", "cpu"), one_tree=one_tree)
        v, why = judge_side(run.checks[0], run.meta.get("sanitizer_reports"))
        m = run.meta
        rec.update(commit=m.get("fork_commit", rev), built=built, report=str(run_dir / "summary.md"),
                   compiler=m.get("replay_compiler"), build_dir=m.get("build_dir"))
        if built:
            rec.update(build_seconds=m.get("build_seconds"), build_cpu_seconds=m.get("build_cpu_seconds"))
    except HarnessError as err:
        v, why = "ERROR", str(err)
    exp = rec["expected"]
    rec.update(verdict=v, evidence=why, seconds=round(time.time() - t0, 1),
               match=v == exp or (side == "parent" and exp in ("FAIL", "PARTIAL") and v in ("FAIL", "PARTIAL")))
    return rec


def _row(e: dict, side: str, r: dict) -> str:
    build = (f" built in {r['build_seconds']:.0f} s ({r['build_cpu_seconds']:.0f} CPU-s)"
             if r.get("build_seconds") is not None else "")
    return (f"{e['id']:34s} {side:6s} {r['commit'][:10]} {e['check']:5s} {','.join(e['types']):14s} {r['verdict']:8s} "
            f"(expected {r['expected']}) {'ok' if r['match'] else 'MISMATCH'} {r['seconds']:6.0f} s{build}  "
            f"{r['evidence'][:160]}")


def _machine() -> dict:
    gpu = None
    if fb._nvidia_gpu_present():
        import subprocess
        gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip() or None
    return {"host": platform.node(), "cpus": os.cpu_count(), "machine": platform.machine(), "gpu": gpu}


@click.command()
@click.argument("ids", nargs=-1)
@click.option("--backend", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="replay the entries of this backend (cuda needs a CUDA build machine)")
@click.option("--all", "all_", is_flag=True, help="also try the entries marked 'not replayed'")
@click.option("--fork-dir", default=None, type=existing_dir(),
              help="the fork's git history (a clone, bare or not), or a folder written by `replay-export`")
@click.option("--one-tree", is_flag=True, default=os.environ.get("TURBO_REPLAY_ONE_TREE") == "1",
              help="build every commit in one source tree per build flavour, recompiling only the files that differ "
                   "(for a machine without ccache; $TURBO_REPLAY_ONE_TREE=1)")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="also write the results as a JSON record to this file")
def catalogue(ids, backend, all_, fork_dir, one_tree, json_out):
    """Replay catalogue entries (checks/replays.toml) at parent and fix; print both verdict rows.

    Without IDS, the entries of the backend marked status = "replayed"; the others are listed with the
    reason they are not replayed. Exit 1 when a verdict differs from the catalogue. A parent that crashes on
    a configuration it accepted is FAIL (the bug), a hang is ERROR with the reason."""
    fork = history_dir(fork_dir)
    entries = _select(ids, backend, all_)
    if any(e.get("backend", "cpu") == "cuda" for e in entries) and not fb._nvidia_gpu_present():
        raise HarnessError("catalogue --backend cuda needs a machine with an NVIDIA GPU (nvidia-smi lists none here); "
                           "run it there with CUDA_ARCH set to the GPU's architecture (90 for an H100/H200)")
    load0, t_all = os.getloadavg(), time.time()
    records = []
    for e in entries:
        t_entry, sides = time.time(), {}
        for side in ("parent", "fix"):
            sides[side] = r = _side(fork, e, side, one_tree)
            click.echo(_row(e, side, r))
            if r.get("report"):
                click.echo(f"{'':36s} report {r['report']}")
        p, f = sides["parent"], sides["fix"]
        flagged = p["verdict"] in ("FAIL", "PARTIAL") or (p["verdict"] == "ERROR" and "hang" in p["evidence"])
        records.append({"id": e["id"], "backend": e.get("backend", "cpu"), "check": e["check"], "types": e["types"],
                        "fix": e["fix"], "proven": flagged and f["verdict"] == "PASS" and f["expected"] == "PASS",
                        "seconds": round(time.time() - t_entry, 1), "parent": p, "fix_side": f})
    total = time.time() - t_all
    sides = [r[k] for r in records for k in ("parent", "fix_side")]
    builds = [s for s in sides if s.get("build_seconds") is not None]
    proven = sorted({r["fix"][:10] for r in records if r["proven"]})
    for r in records:
        click.echo(f"  {r['id']:34s} {r['seconds']:7.0f} s")
    load1 = os.getloadavg()
    click.echo(f"{len(records)} entries in {total:.0f} s ({total / 60:.1f} min); builds: {len(builds)} compiled "
               f"({sum(s['build_seconds'] for s in builds):.0f} s wall, "
               f"{sum(s['build_cpu_seconds'] or 0 for s in builds):.0f} CPU-s), {sum(not s['built'] for s in sides)} "
               f"reused from the cache; load {load0[0]:.1f} at the start, {load1[0]:.1f} at the end "
               f"({os.cpu_count()} cores); {len(proven)} distinct fix commits proven (parent flagged, fix PASS): "
               f"{', '.join(proven)}")
    ok = all(s["match"] for s in sides)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps({
            "entries": records, "seconds": round(total, 1), "all_match": ok, "proven": proven,
            "load_start": load0, "load_end": load1, "one_tree": one_tree, "fork": str(fork),
            "cuda_arch": os.environ.get("CUDA_ARCH"), "machine": _machine(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
    sys.exit(0 if ok else 1)


@click.command("replay-export")
@click.argument("ids", nargs=-1)
@click.option("--backend", type=click.Choice(["cpu", "cuda"]), default=None,
              help="without IDS: every entry of this backend (default: every entry, or none when --commit is given)")
@click.option("--commit", "commits", multiple=True, help="also this commit (repeatable)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="the sources folder to write or add to")
@click.option("--fork-dir", default=None, type=existing_dir(), help="the fork's git history")
def replay_export(ids, backend, commits, out, fork_dir):
    """Export the parent and fix commits of catalogue entries (IDS) as source tarballs into a sources folder, for
    replaying on a machine without git: there, `catalogue --fork-dir OUT IDS` reads them. Each tarball is the commit's
    tree without docs, models and other files no build reads, xz-compressed; the folder's index holds each one's
    subject and SHA-256 (checked before unpacking)."""
    from harness.replay_src import export_tarballs
    fork = history_dir(fork_dir)
    every = load_catalogue()
    if ids:
        chosen = [e for e in every if e["id"] in ids]
        if len(chosen) != len(set(ids)):
            raise HarnessError(f"unknown catalogue id among {', '.join(ids)}; known: {', '.join(e['id'] for e in every)}")
    elif backend or not commits:
        chosen = [e for e in every if backend is None or e.get("backend", "cpu") == backend]
    else:  # only the commits named
        chosen = []
    revs = list(dict.fromkeys([e.get(f"replay_{s}", e[s]) for e in chosen for s in ("parent", "fix")] + list(commits)))
    if not revs:
        raise HarnessError("nothing to export: name catalogue entries or --commit HASH")
    t0 = time.time()
    index = export_tarballs(fork, revs, Path(out), log=click.echo)
    size = sum(index[c]["bytes"] for c in index)
    click.echo(f"{len(index)} commits in {out} ({size / 2**20:.1f} MiB), {time.time() - t0:.0f} s")
