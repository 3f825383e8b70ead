"""The greedy-decode tool's argument handling (harness/fork/decode.c), run for real: compiled against the fork's
headers and a CPU build's libllama into this test's own folder (the build folder is only read), and given a model
path that does not exist, so that every run stops before any model is loaded.

Before: an empty DEVICES ('', ',') was read as an empty device list, i.e. 'none' (the CPU only) without a word, and
a list of more than 15 names was cut to its first 15 (later names, even unknown ones, never looked at). Now an empty
list or name is bad input (exit 2, one line naming the fix), any number of names is resolved, and stderr says how
many were given. Skips with the reason when the fork or its libllama is not built (`make test-ready`).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.runners.decode import SRC

MISSING_MODEL_EXIT = 3  # decode.c: the model or context could not be created


@pytest.fixture(scope="module")
def tool(tmp_path_factory):
    from harness.errors import HarnessError
    from harness.fork.probe import compile_c
    from tests.conftest import fork_build_or_skip, skip_or_fail
    bdir, fork = fork_build_or_skip()
    if not any((bdir / "bin").glob("libllama.*")):
        skip_or_fail(f"no libllama in {bdir}: run `make test-ready` (make test does) to build the fork's llama target")
    out = tmp_path_factory.mktemp("decode-args") / "turbo-decode"
    try:  # into this test's folder, never into the (possibly shared) build folder
        return compile_c("the greedy-decode tool", fork, bdir / "bin", out,
                         [str(SRC), f"-I{fork / 'include'}", f"-I{fork / 'ggml' / 'include'}", "-lllama", "-lggml",
                          "-lggml-base"])
    except HarnessError as e:
        pytest.fail(f"decode.c does not compile against {fork}: {e}")


def _run(tool: Path, tmp: Path, devices: str, rpc: str = "-") -> subprocess.CompletedProcess:
    prompts = tmp / "prompts.txt"
    prompts.write_text("a short prompt\n")
    return subprocess.run([str(tool), str(tmp / "missing.gguf"), str(prompts), "4", "2", "f16", "f16", "1", "0",
                           devices, rpc], capture_output=True, text=True, timeout=60)


@pytest.mark.fork
@pytest.mark.parametrize("devices", ["", ",", "CPU,,CPU", "CPU,", ",CPU"])
def test_an_empty_device_list_or_name_is_bad_input_not_the_cpu(tool, tmp_path, devices):
    r = _run(tool, tmp_path, devices)
    assert r.returncode == 2, r.stderr[-400:]
    assert "has an empty device name" in r.stderr and "'none' for the CPU only" in r.stderr
    assert "could not load model" not in r.stderr  # refused before any model load


@pytest.mark.fork
def test_more_than_15_devices_are_all_resolved_and_reported(tool, tmp_path):
    # the 17th name is unknown: cut to 15, the old tool never saw it and went on to load the model
    r = _run(tool, tmp_path, ",".join(["CPU"] * 16 + ["nope"]))
    assert r.returncode == 2 and "unknown device: nope" in r.stderr, r.stderr[-400:]
    r = _run(tool, tmp_path, ",".join(["CPU"] * 17))
    assert r.returncode == MISSING_MODEL_EXIT and ": 17 devices" in r.stderr, r.stderr[-400:]
    r = _run(tool, tmp_path, "none")  # the CPU only, said so
    assert r.returncode == MISSING_MODEL_EXIT and "DEVICES none: every layer on the CPU" in r.stderr


@pytest.mark.fork
@pytest.mark.parametrize("rpc", ["", ",", "127.0.0.1:1,,127.0.0.1:2", ",127.0.0.1:1", "127.0.0.1:1,"])
def test_an_empty_rpc_endpoint_is_bad_input(tool, tmp_path, rpc):
    r = _run(tool, tmp_path, "-", rpc)
    assert r.returncode == 2 and "has an empty endpoint" in r.stderr, r.stderr[-400:]
