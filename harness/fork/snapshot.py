"""Getting the fork without a git host: unpack a source snapshot (``*.tar.xz``) after checking its SHA-256.

The project's shared folder carries ``forks/llama-cpp-turboquant-<commit>.tar.xz`` with a README beside it
that states ``sha256 <hex>`` and names the repository; the tarball holds one top folder (``llama.cpp/``) with the
commit in ``.fork-commit``, and the unpack adds ``.fork-origin`` beside it (the repository the README names). CI (``.ci/run``) and users without network access unpack it with
``turbo-harness unpack-fork FILE`` (or ``python -m harness.fork.snapshot FILE``) and point ``FORK_DIR`` at the
printed folder.
"""
from __future__ import annotations

import lzma
import os
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from harness.errors import HarnessError

STAMP = ".turbo-harness-snapshot"
ORIGIN = ".fork-origin"  # in the unpacked tree, beside the snapshot's own .fork-commit: the repository it came from


def stated_origin(snapshot: Path) -> str | None:
    """The repository a snapshot's README*.md beside it names, or None.

    The snapshot's name without its trailing ``-<commit>`` is the repository name (``llama-cpp-turboquant-69d8e4be4
    .tar.xz`` -> ``llama-cpp-turboquant``); the README's first mention of ``<owner>/<that name>`` is the origin, as a
    URL when the README gives one (``https://github.com/TheTom/llama-cpp-turboquant``), else as ``owner/name``
    ("the source tree of TheTom/llama-cpp-turboquant at commit ..."). Credentials in a URL are dropped."""
    from harness.fork.provenance import public_url
    stem = re.sub(r"\.tar\.xz$|\.tar\.gz$|\.tgz$", "", Path(snapshot).name)
    name = re.sub(r"-[0-9a-f]{7,40}$", "", stem, flags=re.I)
    if not name:
        return None
    pat = re.compile(r"((?:https?://[^\s/`'\"()<>]+/)?[A-Za-z0-9][\w.-]*/" + re.escape(name) + r")(?:\.git)?(?![\w-])")
    for readme in sorted(Path(snapshot).parent.glob("README*")):
        try:
            text = readme.read_text(errors="replace")
        except OSError:  # a folder or an unreadable file named README*: it names nothing
            continue
        m = pat.search(text)
        if m:
            return public_url(m.group(1))
    return None


def _record_origin(snapshot: Path, tree: Path) -> None:
    """Write :data:`ORIGIN` into the unpacked ``tree`` (the origin's line, then where it was read) when the README
    names one and the tree has none yet; :func:`harness.fork.provenance.git_state` reports it as the copy's remote."""
    origin = stated_origin(snapshot)
    if origin and not (tree / ORIGIN).is_file():
        try:
            (tree / ORIGIN).write_text(f"{origin}\nfrom the README beside {Path(snapshot).name}\n")
        except OSError:
            pass  # a read-only unpack keeps working; its reports say the origin is unknown


def expected_sha256(snapshot: Path) -> str | None:
    """The SHA-256 stated for ``snapshot`` in a README*.md beside it, or None when none is stated.

    The README line looks like ``sha256 <64 hex>`` (optionally after the file name). When the README lists
    several files, the hash on the line naming this file wins; else the only hash in it.
    """
    hashes: list[tuple[str, str]] = []
    for readme in sorted(Path(snapshot).parent.glob("README*")):
        for line in readme.read_text(errors="replace").splitlines():
            m = re.search(r"\b([0-9a-f]{64})\b", line, re.I)
            if m and "sha256" in line.lower():
                hashes.append((line, m.group(1).lower()))
    named = [h for line, h in hashes if Path(snapshot).name in line]
    if named:
        return named[0]
    return hashes[0][1] if len(set(h for _, h in hashes)) == 1 else None


def unpack(snapshot: str | Path, dest: str | Path, sha256: str | None = None) -> Path:
    """Unpack a fork source snapshot into ``dest`` (once) and return the fork checkout folder inside it.

    Args:
        snapshot: the ``.tar.xz`` file.
        dest: folder to unpack into (created); a second call with the same verified snapshot reuses it.
        sha256: expected hex digest; default the one stated in the README beside the snapshot.

    Returns:
        The folder holding ``ggml/include/ggml.h`` (``dest/llama.cpp`` for the shared snapshots).

    Raises:
        HarnessError: missing file, no hash to check against, hash mismatch, or no fork tree inside.
    """
    snapshot, dest = Path(snapshot), Path(dest)
    if not snapshot.is_file():
        raise HarnessError(f"fork snapshot {snapshot} not found: give the path of a llama-cpp-turboquant-*.tar.xz")
    want = (sha256 or expected_sha256(snapshot) or "").lower()
    if not want:
        raise HarnessError(f"no SHA-256 for {snapshot.name}: state it in a README beside it ('sha256 <hex>') or pass --sha256")
    stamp = dest / STAMP
    if stamp.is_file() and stamp.read_text().split()[:1] == [want]:
        _record_origin(snapshot, _tree(dest))  # an unpack made before origins were recorded gets it now
        return _tree(dest)
    _refuse_foreign(dest)  # before the (slow) hash: a folder the harness did not make is never touched
    from harness.runners.inputs import sha256_file
    got = sha256_file(snapshot)
    if got != want:
        raise HarnessError(f"fork snapshot {snapshot} has SHA-256 {got}, expected {want}: the file is corrupt or "
                           f"not the one the README names; copy it again")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpacking-", dir=dest.parent))
    except OSError as e:
        raise HarnessError(f"--dest {dest}: cannot create a folder beside it ({e.strerror}): give a writable --dest") from None
    try:
        _extract(snapshot, tmp)
        _record_origin(snapshot, _tree(tmp))
        (tmp / STAMP).write_text(f"{want} {snapshot.name}\n")
        _replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _tree(dest)


def _refuse_foreign(dest: Path) -> None:
    """Raise HarnessError when ``dest`` is a file or a non-empty folder that unpack-fork did not make (no stamp)."""
    if dest.exists() and not dest.is_dir():
        raise HarnessError(f"--dest {dest} is a file: give a folder to unpack into")
    if dest.is_dir() and not (dest / STAMP).is_file() and any(dest.iterdir()):
        raise HarnessError(f"--dest {dest} is a folder unpack-fork did not make (no {STAMP} in it) and is not empty: "
                           f"it is left as it is; give a new or empty folder")


def _extract(snapshot: Path, into: Path) -> None:
    """Unpack the .tar.xz into the folder ``into``; every read error of the archive is one-line HarnessError."""
    try:
        with tarfile.open(snapshot, "r:xz") as tf:
            members = tf.getmembers()
            bad = [m.name for m in members if m.name.startswith("/") or ".." in Path(m.name).parts]
            if bad:
                raise HarnessError(f"fork snapshot {snapshot} holds unsafe paths ({bad[0]}): refusing to unpack it")
            tf.extractall(into, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(into)
    except (tarfile.TarError, lzma.LZMAError, EOFError) as e:
        what = "truncated" if isinstance(e, EOFError) else f"not a readable .tar.xz ({type(e).__name__}: {e})"
        raise HarnessError(f"fork snapshot {snapshot} is {what}: nothing was unpacked; copy the file again") from None
    except OSError as e:
        raise HarnessError(f"unpacking {snapshot} failed ({e.strerror or e}): nothing was changed at the destination; "
                           f"free space or give another --dest") from None


def _replace(tmp: Path, dest: Path) -> None:
    """Move the finished unpack ``tmp`` to ``dest``; an earlier unpack there (stamped) or an empty folder goes."""
    _refuse_foreign(dest)
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}") if dest.is_dir() else None
    try:
        if old is not None:
            dest.rename(old)
        tmp.rename(dest)
    except OSError as e:
        if old is not None and old.exists() and not dest.exists():
            old.rename(dest)  # the earlier unpack goes back where it was
        raise HarnessError(f"moving the new unpack to --dest {dest} failed ({e.strerror or e}): the earlier content "
                           f"is left as it was; free space or give another --dest") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tree(dest: Path) -> Path:
    """The unpacked fork checkout: dest itself or its one sub-folder holding ggml/include/ggml.h."""
    for cand in [dest, *sorted(p for p in dest.iterdir() if p.is_dir())]:
        if (cand / "ggml" / "include" / "ggml.h").is_file():
            return cand.resolve()
    raise HarnessError(f"no fork tree (ggml/include/ggml.h) inside the snapshot unpacked at {dest}")


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.fork.snapshot FILE [--dest DIR] [--sha256 HEX]``: print the FORK_DIR to use."""
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("snapshot")
    ap.add_argument("--dest", default=".cache/fork")
    ap.add_argument("--sha256", default=None)
    a = ap.parse_args(argv)
    try:
        print(unpack(a.snapshot, a.dest, a.sha256))
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
