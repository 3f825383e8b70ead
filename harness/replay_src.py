"""Where a replayed commit's source comes from: the fork's git history, or a folder of exported source tarballs.

A replay needs each commit's tree. With git (a clone of the fork, bare or not) the tree is exported from the
history. A machine without git or network (a lent GPU machine) gets a *sources folder* instead, written here by
``turbo-harness replay-export``: one ``<commit>.tar.xz`` per commit (the tree without docs, models and other files
no build reads) and ``replay-sources.json``, the index (commit -> subject, file, SHA-256, bytes). Every function
below takes either kind of ``fork`` and answers the same way, except :func:`git_dir_of`, which only a bisection needs.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from harness.errors import HarnessError
from harness.fork import build as fb

# blobs the history does not hold (the mirror lacks them; no build reads them)
EXCLUDE = [":(exclude)models/ggml-vocab-*.gguf", ":(exclude)tools/server/public/bundle.js"]
# also left out of exported tarballs: what no CMake configure or compile of ggml / libllama / the tools reads
SLIM = ["docs", "models", "media", "benches", "tools/server/public", "tools/server/webui", ".github", ".devops"]
INDEX = "replay-sources.json"
GIT_VARS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR")


def git_env() -> dict:
    """The environment without git's repository variables (a bisection sets GIT_DIR to its own clone): every git
    call here names the repository it reads itself."""
    return {k: v for k, v in os.environ.items() if k not in GIT_VARS}


def is_sources(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder of exported sources (it holds :data:`INDEX`)."""
    return (Path(path) / INDEX).is_file()


def load_index(path: str | os.PathLike) -> dict:
    """The sources folder's index: {full commit: {'subject', 'file', 'sha256', 'bytes'}}. HarnessError when unreadable."""
    p = Path(path) / INDEX
    try:
        return json.loads(p.read_text())["commits"]
    except (OSError, ValueError, KeyError) as e:
        raise HarnessError(f"{p} is not a replay sources index ({e}): write it again with `turbo-harness replay-export`")


def git_dir_of(fork: Path) -> Path:
    """The git directory holding the fork's history (a checkout's .git, or a bare repository).

    Raises HarnessError for a sources folder (no history: bisection needs git) or a folder without history of its own.
    """
    if is_sources(fork):
        raise HarnessError(f"{fork} holds exported sources (replay-export), not the fork's git history: bisect needs a "
                           f"clone of the fork")

    def rev_parse(*args):
        r = subprocess.run(["git", "-C", str(fork), "rev-parse", *args], capture_output=True, text=True, env=git_env())
        return r.stdout.strip() if r.returncode == 0 else None
    gdir = rev_parse("--absolute-git-dir")
    # a folder without history of its own inside another repository (e.g. a source snapshot unpacked under the
    # harness checkout) must not borrow that repository's history
    top = rev_parse("--show-toplevel") if gdir and rev_parse("--is-bare-repository") != "true" else None
    own = bool(gdir) and (top is None or Path(top).resolve() == Path(fork).resolve())
    if not own:
        raise HarnessError(f"{fork} is not a git checkout of the fork: replay needs the fork's history (set FORK_DIR to "
                           f"a clone, bare or not, or to a folder written by `turbo-harness replay-export`)")
    return Path(gdir.strip())


def history_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The fork's history for replay: --fork-dir, else $FORK_DIR, else vendor/llama.cpp; a checkout, a bare
    repository, or a sources folder written by ``replay-export`` (replay exports each commit's tree itself, so no
    work tree is needed).

    Raises:
        HarnessError: the folder holds no git history and no sources index, with the fix.
    """
    given = explicit or os.environ.get("FORK_DIR")
    p = Path(given or fb.DEFAULT_FORK).resolve()
    if not p.exists():
        raise HarnessError(f"no fork history at {p}: set FORK_DIR (or --fork-dir) to a clone of the fork, bare or not")
    if not is_sources(p):
        git_dir_of(p)
    return p


def resolve(fork: Path, rev: str) -> str:
    """Full hash of a commit (a unique prefix of one, in a sources folder). Raises HarnessError when there is none."""
    if is_sources(fork):
        hits = [c for c in load_index(fork) if c.startswith(rev.lower())] if len(rev) >= 4 else []
        if len(hits) != 1:
            raise HarnessError(f"commit {rev!r} is {'ambiguous' if hits else 'not'} among the exported sources in {fork}: "
                               f"export it where the history is (`turbo-harness replay-export {rev} --out DIR`)")
        return hits[0]
    r = subprocess.run(["git", "--git-dir", str(git_dir_of(fork)), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                       capture_output=True, text=True, env=git_env())
    if r.returncode != 0 or not r.stdout.strip():
        raise HarnessError(f"commit {rev!r} is not in the fork's history at {fork}: give a hash or ref that "
                           f"`git -C {fork} log` shows")
    return r.stdout.strip()


def git_subject(fork: Path, commit: str) -> str:
    """'<short hash> <subject>' of a commit ('' when git cannot say)."""
    if is_sources(fork):
        return load_index(fork).get(commit, {}).get("subject", "")
    return subprocess.run(["git", "--git-dir", str(git_dir_of(fork)), "log", "-1", "--format=%h %s", commit],
                          capture_output=True, text=True, env=git_env()).stdout.strip()


def checkout_tree(fork: Path, commit: str, dest: Path, exclude: list[str] = ()) -> None:
    """Write a commit's tree from the git history into the empty folder ``dest`` (paths in ``exclude`` left out).

    Raises HarnessError when git cannot (the message quotes git's last line)."""
    dest = Path(dest).resolve()
    env = dict(git_env(), GIT_INDEX_FILE=str(dest / ".git-index"))
    spec = [*EXCLUDE, *(f":(exclude){p}" for p in exclude)]
    r = subprocess.run(["git", "--git-dir", str(git_dir_of(fork)), "--work-tree", str(dest), "checkout", commit, "--", ".",
                        *spec], capture_output=True, text=True, env=env)
    (dest / ".git-index").unlink(missing_ok=True)
    if r.returncode != 0 and not (dest / "ggml" / "include" / "ggml.h").is_file():
        raise HarnessError(f"could not export {commit[:12]}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'git failed'}")
    (dest / ".fork-commit").write_text(commit + "\n")


def unpack_tree(fork: Path, commit: str, dest: Path) -> None:
    """Unpack a commit's tarball of a sources folder into the empty folder ``dest`` after checking its SHA-256.

    Raises HarnessError: the commit is not in the index, the file is missing or its hash differs, or it is not a tarball."""
    info = load_index(fork).get(commit)
    if info is None:
        raise HarnessError(f"commit {commit[:12]} is not among the exported sources in {fork}")
    f = Path(fork) / info["file"]
    if not f.is_file():
        raise HarnessError(f"{f} is missing: copy the whole folder written by `turbo-harness replay-export`")
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != info["sha256"]:
        raise HarnessError(f"{f}: SHA-256 {h.hexdigest()[:16]}... differs from the index's {info['sha256'][:16]}...: "
                           f"the copy is damaged; export it again")
    try:
        with tarfile.open(f, "r:*") as tf:
            tf.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else _extract_checked(tf, dest)
    except (tarfile.TarError, lzma.LZMAError, EOFError) as e:
        raise HarnessError(f"{f} is not a readable tarball ({e}): export it again")
    (dest / ".fork-commit").write_text(commit + "\n")


def _extract_checked(tf: tarfile.TarFile, dest: Path) -> None:
    """extractall for Pythons without tarfile's 'data' filter: members must stay inside ``dest``."""
    root = Path(dest).resolve()
    for m in tf.getmembers():
        if m.issym() or m.islnk() or not (root / m.name).resolve().is_relative_to(root):
            raise tarfile.TarError(f"member {m.name!r} would leave the folder or is a link")
    tf.extractall(dest)


def export_source(fork: Path, commit: str, dest: Path) -> Path:
    """The commit's tree (minus large model blobs) in ``dest`` (written once, atomically); returns ``dest``."""
    if (dest / ".fork-commit").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="src-tmp-", dir=dest.parent))
    try:
        unpack_tree(fork, commit, tmp) if is_sources(fork) else checkout_tree(fork, commit, tmp)
    except HarnessError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def export_tarballs(fork: Path, revs: list[str], out: Path, log=print, preset: int = 6) -> dict:
    """Write each commit's tree without :data:`SLIM` as ``<out>/<commit>.tar.xz`` and add it to ``<out>/``:data:`INDEX`.

    A commit already in the index with its file present is kept. Returns the index ({commit: info}). Raises
    HarnessError when a commit is not in the history or git cannot write its tree.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    index = load_index(out) if is_sources(out) else {}
    for rev in revs:
        c = resolve(fork, rev)
        name = f"{c}.tar.xz"
        if c in index and (out / name).is_file():
            continue
        with tempfile.TemporaryDirectory(prefix="export-", dir=out) as tmp:
            tree = Path(tmp) / "tree"
            tree.mkdir()
            checkout_tree(fork, c, tree, SLIM)
            with lzma.open(out / (name + ".part"), "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w") as tf:
                for p in sorted(tree.iterdir()):
                    tf.add(p, arcname=p.name)
        (out / (name + ".part")).rename(out / name)
        data = (out / name).read_bytes()
        index[c] = {"subject": git_subject(fork, c), "file": name, "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data)}
        log(f"{c[:12]}: {name} {len(data) / 1e6:.1f} MB ({index[c]['subject']})")
        (out / INDEX).write_text(json.dumps({"commits": index}, indent=1) + "\n")
    return index


def sync_tree(src: Path, dest: Path) -> dict:
    """Make ``dest`` hold exactly the files of ``src``, rewriting only files whose bytes differ (they get a new
    modification time, the others keep theirs), so that an incremental build in a folder configured from ``dest``
    recompiles only what changed between two commits (the one-tree mode of replay, for machines without ccache).

    Returns {'changed': n, 'added': n, 'removed': n} (files; symbolic links count as files).
    """
    def files(root: Path) -> dict:
        out = {}
        for dirpath, dirnames, names in os.walk(root):
            for n in names + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                p = Path(dirpath) / n
                out[p.relative_to(root).as_posix()] = p
        return out
    a, b = files(src), files(dest)
    stats = {"changed": 0, "added": 0, "removed": 0}
    for rel, p in b.items():
        if rel not in a:
            p.unlink()
            stats["removed"] += 1
    for rel, p in a.items():
        q = dest / rel
        if rel in b:
            if p.is_symlink() or q.is_symlink():
                same = p.is_symlink() and q.is_symlink() and os.readlink(p) == os.readlink(q)
            else:
                same = p.stat().st_size == q.stat().st_size and p.read_bytes() == q.read_bytes()
            if same:
                continue
            q.unlink()
            stats["changed"] += 1
        else:
            q.parent.mkdir(parents=True, exist_ok=True)
            stats["added"] += 1
        if p.is_symlink():
            os.symlink(os.readlink(p), q)
        else:
            shutil.copyfile(p, q)
            shutil.copymode(p, q)
    for dirpath, dirnames, names in os.walk(dest, topdown=False):  # folders emptied by removals
        if dirpath != str(dest) and not os.listdir(dirpath):
            os.rmdir(dirpath)
    return stats
