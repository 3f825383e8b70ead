"""Provenance (spec "Integrity of a verdict"): a report names the build that was measured, read from that
build; a checkout that differs from the build stops the run with one line; reports of different builds
are never merged. No fork build is needed: fake build folders and fake checkouts."""
import json
import subprocess

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.fork import build as fb
from harness.targets.numpy_target import NumpyTarget

A, B, C = "a" * 40, "b" * 40, "c" * 40


def fake_fork(path, commit=None):
    inc = path / "ggml" / "include"
    inc.mkdir(parents=True, exist_ok=True)
    (inc / "ggml.h").write_text("enum ggml_type { GGML_TYPE_TURBO3_0 = 41, GGML_TYPE_TURBO4_0 = 42, GGML_TYPE_TURBO2_0 = 43 };\n")
    if commit:
        (path / ".fork-commit").write_text(commit + "\n")
    return path


def fake_build(root, commit, dirty=False, diff=None, describe="built commit"):
    bdir = root / "cpu"
    (bdir / "bin").mkdir(parents=True, exist_ok=True)
    (bdir / "bin" / "libggml-base.so").write_bytes(b"")
    meta = {"backend": "cpu", "fork_commit": commit, "fork_dirty": dirty, "fork_diff_sha256": diff,
            "fork_describe": describe, "cmake_options": ["-DGGML_CUDA=OFF"], "cxx_compiler": "c++ 12"}
    (bdir / fb.BUILD_META).write_text(json.dumps(meta))
    return bdir


@pytest.fixture
def fake_target(monkeypatch):
    """The fork target replaced by the NumPy emulation, so the CLI runs end to end without a build: what
    matters here is which commit the report is labelled with."""
    import harness.targets.fork as tf
    monkeypatch.setattr(tf, "ForkTarget", lambda bdir, fork: NumpyTarget())


def invoke(args, env):
    r = CliRunner().invoke(cli, args, env={"BACKEND": "cpu", **env}, catch_exceptions=False)
    return r.exit_code, r.output


def errors(out):
    return [ln for ln in out.splitlines() if ln.startswith("error:")]


def test_checkout_at_another_commit_is_refused_not_relabelled(tmp_path, fake_target):
    fork = fake_fork(tmp_path / "fork", commit=B)
    fake_build(tmp_path / "build", A)
    code, out = invoke(["check", "PQ4", "--type", "turbo4", "--out", str(tmp_path / "r")],
                       {"FORK_DIR": str(fork), "TURBO_BUILD_ROOT": str(tmp_path / "build")})
    assert code == 2, out
    [err] = errors(out)
    assert A[:12] in err and B[:12] in err and "another commit" in err and "turbo-harness build" in err
    assert not (tmp_path / "r" / "run.json").exists()  # nothing measured, nothing labelled


def test_report_is_labelled_from_the_build_record(tmp_path, fake_target):
    fork = fake_fork(tmp_path / "fork", commit=A)
    fake_build(tmp_path / "build", A, describe="aaaaaaa the commit that was built")
    env = {"FORK_DIR": str(fork), "TURBO_BUILD_ROOT": str(tmp_path / "build")}
    code, out = invoke(["check", "PQ4", "--type", "turbo3", "--out", str(tmp_path / "r")], env)
    assert code == 0, out
    meta = json.loads((tmp_path / "r" / "run.json").read_text())["meta"]
    # from the build's record, not the checkout's ("copy without .git", dirty unknown)
    assert meta["fork_commit"] == A and meta["fork_dirty"] is False
    assert meta["fork_describe"] == "aaaaaaa the commit that was built" and meta["checkout_commit"] == A
    assert "the commit that was built" in (tmp_path / "r" / "summary.md").read_text()


def test_out_into_a_report_of_another_build_is_refused(tmp_path, fake_target):
    fork = fake_fork(tmp_path / "fork", commit=A)
    fake_build(tmp_path / "build", A)
    env = {"FORK_DIR": str(fork), "TURBO_BUILD_ROOT": str(tmp_path / "build")}
    out_dir = tmp_path / "r"
    assert invoke(["check", "PQ4", "--type", "turbo3", "--out", str(out_dir)], env)[0] == 0
    code, out = invoke(["check", "PQ3", "--type", "turbo3", "--out", str(out_dir)], env)  # same build: added
    assert code == 0 and "adding to the checks already there" in out
    assert [c["id"] for c in json.loads((out_dir / "run.json").read_text())["checks"]] == ["PQ4", "PQ3"]
    # the fork moved on and was rebuilt: the old report must not be merged with (or relabelled by) the new build
    fake_fork(tmp_path / "fork", commit=C)
    fake_build(tmp_path / "build", C)
    before = (out_dir / "run.json").read_text()
    code, out = invoke(["check", "PQ1", "--type", "turbo3", "--out", str(out_dir)], env)
    assert code == 2, out
    [err] = errors(out)
    assert "another build" in err and A[:12] in err and C[:12] in err and "new --out" in err
    assert (out_dir / "run.json").read_text() == before


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                   check=True, capture_output=True)


def test_git_checkout_moved_or_edited_since_the_build(tmp_path):
    repo = fake_fork(tmp_path / "fork")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "one")
    st = fb.git_state(repo)
    bdir = fake_build(tmp_path / "build", st["commit"])
    fb.check_provenance(bdir, repo)  # the same source: no complaint
    h = repo / "ggml" / "include" / "ggml.h"
    h.write_text(h.read_text() + "// local edit\n")
    with pytest.raises(fb.HarnessError, match="uncommitted changes in the checkout"):
        fb.check_provenance(bdir, repo)
    dirty = fb.git_state(repo)
    assert dirty["dirty"] and len(dirty["diff_sha256"]) == 64
    bdir = fake_build(tmp_path / "build", st["commit"], dirty=True, diff=dirty["diff_sha256"])
    fb.check_provenance(bdir, repo)  # built from exactly this diff
    h.write_text(h.read_text() + "// another edit\n")
    with pytest.raises(fb.HarnessError, match="another diff"):
        fb.check_provenance(bdir, repo)
    git(repo, "commit", "-qam", "two")
    with pytest.raises(fb.HarnessError, match="another commit") as e:
        fb.check_provenance(bdir, repo)
    assert len(str(e.value).splitlines()) == 1 and st["commit"][:12] in str(e.value)


def test_doctor_flags_the_mismatch(tmp_path):
    fork = fake_fork(tmp_path / "fork", commit=B)
    fake_build(tmp_path / "build", A)
    code, out = invoke(["doctor"], {"FORK_DIR": str(fork), "TURBO_BUILD_ROOT": str(tmp_path / "build")})
    assert code == 2
    [ln] = [ln for ln in out.splitlines() if "provenance" in ln]
    assert ln.startswith("NO") and "MISMATCH" in ln and A[:12] in ln and B[:12] in ln


def test_sweep_labels_the_build_record_not_the_moved_checkout(tmp_path):
    from harness.runners.sweep import _fork_identity
    repo = fake_fork(tmp_path / "fork")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "built")
    built = fb.git_state(repo)["commit"]
    bdir = fake_build(tmp_path / "build", built, describe="built commit")
    meta = json.loads((bdir / fb.BUILD_META).read_text())
    (bdir / fb.BUILD_META).write_text(json.dumps(dict(meta, fork_dir=str(repo))))
    (repo / "ggml" / "include" / "ggml.h").write_text("// moved on\nGGML_TYPE_TURBO3_0\n")
    git(repo, "commit", "-qam", "later")  # the checkout moved after the build
    ident = _fork_identity(bdir)
    assert ident["fork_commit"] == built and ident["fork_describe"] == "built commit"
