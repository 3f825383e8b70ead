"""A fork unpacked from a source snapshot names the repository its README states: `scorecard` called the project's
own snapshot "unknown (... no git remote recorded)" although ../shared/forks/README.md says it is the source tree of
TheTom/llama-cpp-turboquant. The unpack records it (.fork-origin beside .fork-commit), git_state reports it as the
copy's remote, the build records it (fork_remote) and the scorecard shows it."""
from __future__ import annotations

import pytest

from harness.fork.provenance import git_state
from harness.fork.snapshot import unpack
from harness.report.scorecard import fork_identity
from tests.test_snapshot import _snapshot

NAME = "llama-cpp-turboquant-69d8e4be4.tar.xz"


def _with_readme(tmp_path, text: str):
    snap, digest = _snapshot(tmp_path, name=NAME)
    (snap.parent / "README.md").write_text(f"{text}\n\nsha256 {digest}\n")
    return snap


@pytest.mark.parametrize("text,origin", [
    ("`x.tar.xz`: the source tree of TheTom/llama-cpp-turboquant at commit 69d8e4be4", "TheTom/llama-cpp-turboquant"),
    ("from https://tok:en@github.com/TheTom/llama-cpp-turboquant.git at 69d8e4be4",
     "https://github.com/TheTom/llama-cpp-turboquant"),
    ("see ggml/include and ggerganov/llama.cpp (upstream)", None),  # no owner/llama-cpp-turboquant: not guessed
])
def test_the_unpack_records_the_origin_its_readme_names_and_git_state_reports_it(tmp_path, text, origin):
    tree = unpack(_with_readme(tmp_path, text), tmp_path / "dest")
    st = git_state(tree)
    assert st["commit"] == "a" * 40 and st.get("remote") == origin
    repo, commit, _ = fork_identity({"fork_commit": st["commit"], **{f"fork_{k}": v for k, v in st.items()}})
    assert repo == origin if origin else repo.startswith("unknown (built from")


def test_an_earlier_unpack_gets_the_origin_on_the_next_call(tmp_path):
    snap = _with_readme(tmp_path, "the source tree of TheTom/llama-cpp-turboquant at commit 69d8e4be4")
    tree = unpack(snap, tmp_path / "dest")
    (tree / ".fork-origin").unlink()  # as an unpack made before origins were recorded
    assert "remote" not in git_state(tree)
    assert unpack(snap, tmp_path / "dest") == tree and git_state(tree)["remote"] == "TheTom/llama-cpp-turboquant"


def test_the_projects_own_snapshot_readme_names_its_origin(tmp_path):
    from harness.fork.locate import snapshots
    found = snapshots()  # ../shared/forks/ as the harness finds it (a worktree sits deeper)
    if not found or not (found[-1].parent / "README.md").is_file():
        pytest.skip("no fork snapshot with a README in shared/forks")
    text = (found[-1].parent / "README.md").read_text()
    snap = _with_readme(tmp_path, "\n".join(ln for ln in text.splitlines() if "sha256" not in ln))  # our toy's hash
    assert git_state(unpack(snap, tmp_path / "dest"))["remote"] == "TheTom/llama-cpp-turboquant"


def test_a_readme_that_is_a_folder_names_no_origin(tmp_path):
    """review 28b: a README* that is a folder (or unreadable) raised IsADirectoryError as a traceback."""
    from harness.fork.snapshot import stated_origin
    (tmp_path / "README.d").mkdir()
    (tmp_path / "README.md").write_text("The source tree of TheTom/llama-cpp-turboquant at commit 69d8e4be4.\n")
    assert stated_origin(tmp_path / "llama-cpp-turboquant-69d8e4be4.tar.xz") == "TheTom/llama-cpp-turboquant"
