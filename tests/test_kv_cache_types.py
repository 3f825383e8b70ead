"""--pairs / --depth-pairs are checked against the K/V cache types the fork's tools accept for -ctk/-ctv (read from
the build's source, common/arg.cpp kv_cache_types), not against every ggml type the build knows: `--pairs q4_K/q4_K`
passed the old check ("this build knows ... q4_K") and llama-perplexity refused it only after the baselines ran."""
from __future__ import annotations

import re
import subprocess

import pytest

from harness.runners import sweep as S
from harness.runners.ggml_types import TypeTrait
from tests.conftest import fork_build_or_skip
from tests.test_new_user import one_error_line, sw  # noqa: F401  (sw: the sweep CLI with fake tools)
from tests.test_sweep_parsers import TRAITS

ARG_CPP = """
const std::vector<ggml_type> kv_cache_types = {
    GGML_TYPE_F16,
    GGML_TYPE_Q8_0,
    GGML_TYPE_Q4_0,
    GGML_TYPE_TURBO3_0,
};
"""
GGML_C = """
    [GGML_TYPE_F16] = {
        .type_name                = "f16",
    },
    [GGML_TYPE_Q4_0] = {
        .type_name                = "q4_0",
    },
    [GGML_TYPE_Q8_0] = {
        .type_name                = "q8_0",
    },
    [GGML_TYPE_Q4_K] = {
        .type_name                = "q4_K",
    },
    [GGML_TYPE_TURBO3_0] = {
        .type_name                = "turbo3",
    },
"""


def _toy_source(root):
    (root / "common").mkdir(parents=True)
    (root / "ggml" / "src").mkdir(parents=True)
    (root / "common" / "arg.cpp").write_text(ARG_CPP)
    (root / "ggml" / "src" / "ggml.c").write_text(GGML_C)
    return root


def test_the_list_is_read_from_the_source_in_its_order(tmp_path):
    from harness.runners.kv_cache_types import from_source
    src = _toy_source(tmp_path / "src")
    assert from_source(src) == ("f16", "q8_0", "q4_0", "turbo3")
    (src / "common" / "arg.cpp").write_text(ARG_CPP.replace("GGML_TYPE_TURBO3_0", "GGML_TYPE_TURBO9_0"))
    assert from_source(src) == ()  # a type with no name in ggml.c: not guessed
    assert from_source(tmp_path / "nowhere") == ()


@pytest.mark.parametrize("opt,value", [("--pairs", "q4_K/q4_K"), ("--pairs", "turbo3/q4_K"),
                                       ("--depth-pairs", "q4_K")])
def test_a_ggml_type_that_is_no_kv_cache_type_is_refused_before_any_tool_runs(sw, tmp_path, monkeypatch,  # noqa: F811
                                                                             opt, value):
    src = _toy_source(tmp_path / "src")
    (tmp_path / "build" / "CMakeCache.txt").write_text(f"CMAKE_HOME_DIRECTORY:INTERNAL={src}\n")
    # the build knows q4_K as a ggml type (the real one does: the old check let it through)
    monkeypatch.setattr(S, "type_traits", lambda bdir: {**TRAITS, "q4_K": TypeTrait("q4_K", 12, 256, 144)})
    extra = ["--kld-depths", "128,256"] if opt == "--depth-pairs" else []
    code, out = sw.run(opt, value, "--pairs", "turbo3", *extra) if opt == "--depth-pairs" else sw.run(opt, value)
    line = one_error_line(out)
    assert code == 2 and sw.ncalls() == 0, out
    assert f"{opt}: 'q4_K' is not a K/V cache type of this build: -ctk/-ctv accept f16, q8_0, q4_0, turbo3" in line
    assert f"kv_cache_types in {src / 'common' / 'arg.cpp'}" in line


def test_without_a_recorded_source_the_ggml_types_are_the_check(sw):  # noqa: F811
    from harness.runners.kv_cache_types import kv_cache_types
    assert kv_cache_types(sw.tmp / "build") == ((), "")
    code, out = sw.run("--pairs", "turbo9")
    assert code == 2 and "unknown cache type 'turbo9': this build knows" in one_error_line(out)


def test_the_source_list_is_what_the_builds_llama_perplexity_accepts():
    """Cross-check of the parse against the build: its --help prints the same list (common/arg.cpp
    get_all_kv_cache_types)."""
    from harness.runners.kv_cache_types import kv_cache_types
    bdir, fork = fork_build_or_skip()
    tool = bdir / "bin" / "llama-perplexity"
    if not tool.is_file():
        pytest.skip(f"{tool} is not built")
    out = subprocess.run([str(tool), "--help"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"-ctk,\s+--cache-type-k\b.*?allowed values:\s*(.*?)\(default", out, re.S)
    assert m, out[:2000]
    assert kv_cache_types(bdir)[0] == tuple(x for x in re.split(r"[,\s]+", m.group(1)) if x)
