"""Getting the fork from a source snapshot (what CI and offline users do): hash checked, unpacked once."""
from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.errors import HarnessError
from harness.fork.snapshot import expected_sha256, unpack


def _snapshot(tmp_path, name="fork-abc.tar.xz", extra=None):
    """A tiny fork snapshot (llama.cpp/ggml/include/ggml.h + .fork-commit) and a README stating its hash."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for path, text in {"llama.cpp/ggml/include/ggml.h": "GGML_TYPE_TURBO3_0 = 42,\n",
                           "llama.cpp/.fork-commit": "a" * 40 + "\n", **(extra or {})}.items():
            data = text.encode()
            ti = tarfile.TarInfo(path)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    snap = tmp_path / "forks" / name
    snap.parent.mkdir(parents=True, exist_ok=True)
    snap.write_bytes(buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    (snap.parent / "README.md").write_text(f"# snapshots\n`{name}`: the fork.\n\nsha256 {digest}\n")
    return snap, digest


def test_unpack_checks_hash_and_finds_tree(tmp_path):
    snap, digest = _snapshot(tmp_path)
    assert expected_sha256(snap) == digest
    tree = unpack(snap, tmp_path / "dest")
    assert tree == (tmp_path / "dest" / "llama.cpp").resolve()
    assert (tree / ".fork-commit").read_text().strip() == "a" * 40
    # a second call reuses the unpacked tree (no re-extract): a marker file survives
    (tree / "marker").write_text("x")
    assert unpack(snap, tmp_path / "dest") == tree and (tree / "marker").is_file()


def test_corrupt_snapshot_is_refused_with_one_line(tmp_path):
    snap, _ = _snapshot(tmp_path)
    snap.write_bytes(snap.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(HarnessError, match="expected .*copy it again"):
        unpack(snap, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_no_hash_stated_is_refused(tmp_path):
    snap, _ = _snapshot(tmp_path)
    (snap.parent / "README.md").write_text("no hash here\n")
    with pytest.raises(HarnessError, match="no SHA-256"):
        unpack(snap, tmp_path / "dest")


def test_unsafe_member_is_refused(tmp_path):
    snap, _ = _snapshot(tmp_path, extra={"../evil": "x"})
    with pytest.raises(HarnessError, match="unsafe"):
        unpack(snap, tmp_path / "dest")
    assert not (tmp_path / "evil").exists()


def test_cli_unpack_fork_prints_fork_dir_and_exit_2_on_bad_hash(tmp_path):
    snap, digest = _snapshot(tmp_path)
    env = {"TURBO_CACHE": str(tmp_path / "cache")}  # the command remembers the folder: not in this checkout's .cache
    r = CliRunner().invoke(cli, ["unpack-fork", str(snap), "--dest", str(tmp_path / "d")], env=env)
    assert r.exit_code == 0 and r.output.strip().endswith("llama.cpp")
    r = CliRunner().invoke(cli, ["unpack-fork", str(snap), "--dest", str(tmp_path / "e"), "--sha256", "0" * 64], env=env)
    assert r.exit_code == 2 and "expected" in r.output and len(r.output.strip().splitlines()) == 1
