"""Issue 21, the CI recipe for fork maintainers (docs/ci.md): the GitHub Actions workflow docs/ci/fork-gate.yml is
parsed with PyYAML and its steps are run as a runner would, twice, against a fake fork build:

- the fork is a small git repository whose ggml.h declares the turbo types;
- its build is real `turbo-harness build` with fake `cmake` and `cc` on PATH (they write the build folder's files:
  CMakeCache.txt, empty ggml libraries, the probe), so the build, its provenance record and the script run as in CI;
- the measurements come from the harness's NumPy emulation of a fork (the hidden ``--numpy-target`` option, passed
  through the script's VERIFY_ARGS), since empty libraries cannot be measured: clean on the first (accepted) job,
  with the 'swapped_packing' fault on the second.

`uses:` steps are played by the test (checkout, upload and download of artifacts as folder copies); every `run:`
step is executed with bash, its `if:` evaluated. The first job is green and accepted; the second fails its gate, and
its diff against the accepted run lists what got worse."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import repo_install_lock

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "docs" / "ci" / "fork-gate.yml"
USES = {"actions/checkout", "actions/upload-artifact", "dawidd6/action-download-artifact"}

FAKE_CMAKE = r"""#!/usr/bin/env python3
import sys, pathlib
a = sys.argv[1:]
if "-B" in a:  # configure: the cache the harness reads its compilers from
    b = pathlib.Path(a[a.index("-B") + 1]); b.mkdir(parents=True, exist_ok=True)
    (b / "CMakeCache.txt").write_text("CMAKE_C_COMPILER:FILEPATH=/bin/true\nCMAKE_CXX_COMPILER:FILEPATH=/bin/true\n")
elif "--build" in a:
    b = pathlib.Path(a[a.index("--build") + 1]); t = a[a.index("--target") + 1]
    (b / "bin").mkdir(parents=True, exist_ok=True)
    for name in (["libggml-base.so", "libggml.so", "libggml-cpu.so"] if t == "ggml" else [t]):
        (b / "bin" / name).write_text("fake " + t + "\n")
"""
FAKE_CC = r"""#!/usr/bin/env python3
import sys, pathlib
a = sys.argv[1:]
pathlib.Path(a[a.index("-o") + 1]).write_text("fake probe\n")
"""
GGML_H = "enum ggml_type { GGML_TYPE_TURBO3_0 = 41, GGML_TYPE_TURBO4_0 = 42, GGML_TYPE_TURBO2_0 = 43 };\n"


def _exe(p: Path, text: str) -> None:
    p.write_text(text)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


def _git(repo: Path, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=ci", "-c", "user.email=ci@example.org", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def load_workflow() -> dict:
    wf = yaml.safe_load(WORKFLOW.read_text())
    return wf


def test_workflow_is_valid_and_uses_only_files_of_this_repo():
    wf = load_workflow()
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as True
    assert {"push", "pull_request"} <= set(on)
    steps = wf["jobs"]["gate"]["steps"]
    assert {s["uses"].split("@")[0] for s in steps if "uses" in s} <= USES
    runs = [s["run"] for s in steps if "run" in s]
    assert any("fork-gate.sh\" build" in r for r in runs) and any("fork-gate.sh\" verify" in r for r in runs)
    assert any("fork-gate.sh\" diff" in r for r in runs) and any("fork-gate.sh\" gate" in r for r in runs)
    assert (REPO / "scripts" / "fork-gate.sh").stat().st_mode & stat.S_IEXEC
    assert "install:" in (REPO / "Makefile").read_text()
    doc = (REPO / "docs" / "ci.md").read_text()
    assert "docs/ci/fork-gate.yml" in doc and "scripts/fork-gate.sh" in doc


def _install_lock(cmd: str):
    """The recipe's install step runs `make install` in this repository (:func:`conftest.repo_install_lock`)."""
    return repo_install_lock() if "install" in cmd else contextlib.nullcontext()


class Runner:
    """Plays one workflow job in ``ws`` (the workspace): uses-steps simulated, run-steps executed with bash."""

    def __init__(self, ws: Path, artifacts: Path, env: dict, ref: str):
        self.ws, self.artifacts, self.env, self.ref = ws, artifacts, env, ref
        self.failed, self.log = False, []
        self.download_error = False

    def expand(self, v: str) -> str:
        return (str(v).replace("${{ github.workspace }}", str(self.ws))
                .replace("${{ env.HARNESS_REPO }}", "example/turbo-harness"))

    def cond(self, s: str | None) -> bool:
        if not s:
            return not self.failed
        s = s.replace("github.ref", repr(self.ref)).replace("always()", "True").replace("success()", str(not self.failed))
        return bool(eval(s.replace("&&", " and ").replace("||", " or ")))  # the few expressions the recipe uses

    def uses(self, step: dict) -> int:
        name, w = step["uses"].split("@")[0], step.get("with", {})
        if name == "actions/checkout":
            return 0  # the workspace already holds both checkouts (the test made them)
        if name == "actions/upload-artifact":
            if not (self.ws / w["path"]).exists():
                self.log.append(f"upload {w['name']}: no files at {w['path']} (warning)")
                return 0  # if-no-files-found: warn (the action's default)
            dst = self.artifacts / w["name"]
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(self.ws / w["path"], dst)
            return 0
        if name == "dawidd6/action-download-artifact":
            src = self.artifacts / w["name"]
            if self.download_error:  # the artifact API failed (not 'no artifact yet'): the action fails
                return 1
            if not src.is_dir():  # no artifact yet: the action warns and succeeds with if_no_artifact_found: warn
                self.log.append(f"download {w['name']}: no artifact found (warning)")
                return 0 if w.get("if_no_artifact_found") == "warn" else 1
            shutil.copytree(src, self.ws / w["path"], dirs_exist_ok=True)
            return 0
        raise AssertionError(f"step uses {name}, which this test cannot play")

    def run(self, wf: dict) -> dict[str, int]:
        job = wf["jobs"]["gate"]
        env = dict(self.env)
        env.update({k: self.expand(v) for k, v in {**wf.get("env", {}), **job.get("env", {})}.items()})
        codes = {}
        for step in job["steps"]:
            if not self.cond(step.get("if")):
                codes[step["name"]] = None
                continue
            if "uses" in step:
                rc = self.uses(step)
            else:
                with _install_lock(step["run"]):
                    p = subprocess.run(["bash", "-eo", "pipefail", "-c", step["run"]], cwd=self.ws, env=env,
                                       capture_output=True, text=True, timeout=600)
                rc = p.returncode
                self.log.append(f"$ {step['run']}\n{p.stdout}{p.stderr}")
            codes[step["name"]] = rc
            if rc and not step.get("continue-on-error"):
                self.failed = True
        return codes


@pytest.fixture
def workspace(tmp_path):
    bin_ = tmp_path / "fakebin"
    bin_.mkdir()
    _exe(bin_ / "cmake", FAKE_CMAKE)
    _exe(bin_ / "cc", FAKE_CC)
    ws = tmp_path / "ws"
    (ws / "fork" / "ggml" / "include").mkdir(parents=True)
    (ws / "fork" / "ggml" / "include" / "ggml.h").write_text(GGML_H)
    _git(ws / "fork", "init", "-q", "-b", "main")
    _git(ws / "fork", "add", ".")
    _git(ws / "fork", "commit", "-qm", "fork at its accepted commit")
    (ws / "turbo-harness").symlink_to(REPO)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TURBO_", "FORK_DIR", "GITHUB_"))}
    env.update(PATH=f"{bin_}:{Path(sys.executable).parent}:{env.get('PATH', '')}", CC=str(bin_ / "cc"),
               TURBO_HARNESS=f"{sys.executable} -m harness.cli", PYTHONPATH=str(REPO))
    return ws, tmp_path / "artifacts", env


@pytest.mark.slow
def test_two_jobs_accept_then_fail_on_worse(workspace):
    ws, artifacts, env = workspace
    wf = load_workflow()
    quick = "--checks PQ4 --type turbo3,turbo4"
    first = Runner(ws, artifacts, dict(env, VERIFY_ARGS=f"--numpy-target= {quick}"), "refs/heads/main")
    codes = first.run(wf)
    log = "\n".join(first.log)
    assert codes["build the fork (ggml, test-backend-ops, probe)"] == 0 and codes["gate (known findings and diff)"] == 0, log
    assert codes["accept this run (main, green)"] == 0, codes  # green on main: accepted
    built = json.loads((ws / "build" / "cpu" / "turbo-harness-build.json").read_text())
    assert built["fork_commit"] == _git(ws / "fork", "rev-parse", "HEAD") and built["targets"] == ["ggml", "test-backend-ops"]
    assert "no accepted run" in log and (artifacts / "turbo-harness-accepted" / "run.json").is_file()

    # a new commit of the fork that breaks the packing: the gate fails and the diff names what got worse
    (ws / "fork" / "README").write_text("kernel change\n")
    _git(ws / "fork", "add", ".")
    _git(ws / "fork", "commit", "-qm", "kernel change")
    shutil.rmtree(ws / "reports")
    second = Runner(ws, artifacts, dict(env, VERIFY_ARGS=f"--numpy-target swapped_packing {quick}"), "refs/heads/main")
    codes = second.run(wf)
    log = "\n".join(second.log)
    assert codes["gate (known findings and diff)"] == 1, (codes, log)
    assert codes["accept this run (main, green)"] is None  # a red job is never accepted
    assert json.loads((ws / "build" / "cpu" / "turbo-harness-build.json").read_text())["fork_commit"] == \
        _git(ws / "fork", "rev-parse", "HEAD")  # rebuilt from the new commit
    d = json.loads((ws / "reports" / "run" / "diff" / "diff.json").read_text())
    assert any(c["label"] == "WORSE" and c["check"] == "PQ4" for c in d["changes"]), d["changes"]
    assert (artifacts / "turbo-harness-run" / "diff" / "diff.md").is_file()  # uploaded with the run, red as it is
    assert "fork-gate: diff -> 1" in log and "fork-gate: verify -> 1" in log


@pytest.mark.slow
def test_plain_shell_version_runs_all_steps(workspace):
    """The script alone (docs/ci.md 'Without GitHub Actions'): `all` builds, verifies, diffs and gates."""
    ws, _, env = workspace
    env = dict(env, FORK_DIR=str(ws / "fork"), TURBO_BUILD_ROOT=str(ws / "build"), REPORT_DIR="reports/run",
               ACCEPTED_DIR="reports/accepted", VERIFY_ARGS="--numpy-target= --checks PQ4 --type turbo3")
    script = str(REPO / "scripts" / "fork-gate.sh")
    p = subprocess.run([script, "all"], cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    shutil.copytree(ws / "reports" / "run", ws / "reports" / "accepted")
    p = subprocess.run([script, "all"], cwd=ws, env=dict(env, VERIFY_ARGS="--numpy-target swapped_packing --checks PQ4 "
                                                                            "--type turbo3"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1 and "WORSE" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([script, "nonsense"], cwd=ws, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "unknown step" in p.stderr


@pytest.mark.slow
def test_a_failed_download_of_the_accepted_run_is_never_green(workspace):
    """The download step had continue-on-error: a download that failed for any reason (not only 'no artifact yet',
    which if_no_artifact_found: warn already covers) left reports/accepted empty, the diff step said 'nothing to
    compare with' and passed, and the job went green and was accepted without comparing anything."""
    ws, artifacts, env = workspace
    wf = load_workflow()
    args = dict(env, VERIFY_ARGS="--numpy-target= --checks PQ4 --type turbo3")
    first = Runner(ws, artifacts, args, "refs/heads/main")
    assert first.run(wf)["accept this run (main, green)"] == 0, "\n".join(first.log)
    shutil.rmtree(ws / "reports")
    second = Runner(ws, artifacts, args, "refs/heads/main")
    second.download_error = True
    codes = second.run(wf)
    assert second.failed, (codes, "\n".join(second.log))
    assert codes["accept this run (main, green)"] is None and codes["gate (known findings and diff)"] is None, codes


def test_shell_gate_with_require_accepted_fails_when_the_accepted_run_is_missing(tmp_path):
    """REQUIRE_ACCEPTED=1: a missing accepted run (wrong path, failed download) fails the gate (exit 2) instead of
    passing every time; without it the first run passes with a note."""
    import subprocess
    script = Path(__file__).resolve().parents[1] / "scripts" / "fork-gate.sh"
    rep = tmp_path / "run"
    state = tmp_path / "run.gate"
    state.mkdir()
    (state / "verify").write_text("0\n")
    env = {**os.environ, "REPORT_DIR": str(rep), "ACCEPTED_DIR": str(tmp_path / "nowhere")}
    for require, want in (("1", 2), ("0", 0)):
        e = {**env, "REQUIRE_ACCEPTED": require}
        d = subprocess.run(["bash", str(script), "diff"], env=e, capture_output=True, text=True, timeout=60)
        assert d.returncode == 0, d.stderr
        g = subprocess.run(["bash", str(script), "gate"], env=e, capture_output=True, text=True, timeout=60)
        assert g.returncode == want, (require, g.stdout, d.stdout, d.stderr)
        if require == "1":
            assert "REQUIRE_ACCEPTED=1" in d.stderr
