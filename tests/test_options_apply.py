"""Sweep options that contradict each other or do nothing are refused in one line (exit 2) before any tool runs:
--ubatch above the batch (llama requires ubatch <= batch and would cap it, so the recorded -ub would not be what
ran), and options of a part that another option turns off (--depth-pairs with --kld-depths none, where even a bad
type went unchecked; --decode-tokens with --decode-prompts 0; llama-bench's --reps/--depths with --no-bench)."""
from __future__ import annotations

import pytest

from tests.test_new_user import one_error_line, sw  # noqa: F401  (sw: the sweep CLI with fake tools)


@pytest.mark.parametrize("args,words", [
    (["--ubatch", "256", "--batch", "128"], "--ubatch 256 is above --batch 128: llama requires ubatch <= batch"),
    (["--ubatch", "512"], "--ubatch 512 is above the batch (--batch, default --ctx 256)"),  # the fixture's --ctx 256
    (["--depth-pairs", "turbo5", "--kld-depths", "none"], "--depth-pairs does nothing with --kld-depths none"),
    (["--depth-pairs", "turbo3", "--kld-depths", "off"], "--depth-pairs does nothing with --kld-depths off"),
    (["--decode-tokens", "5", "--decode-prompts", "0"], "--decode-tokens does nothing with --decode-prompts 0"),
    (["--decode-prompt-tokens", "8", "--decode-prompts", "0"], "--decode-prompt-tokens does nothing with --decode-prompts 0"),
    (["--reps", "5", "--no-bench"], "--reps does nothing with --no-bench"),
    (["--depths", "0", "--no-bench"], "--depths does nothing with --no-bench"),
])
def test_options_that_do_not_apply_or_contradict_are_one_line_exit_2(sw, tmp_path, args, words):  # noqa: F811
    code, out = sw.run("--pairs", "turbo3", "--out", str(tmp_path / "o"), *args)
    line = one_error_line(out)
    assert code == 2 and words in line and sw.ncalls() == 0, line


@pytest.mark.parametrize("opts", [dict(ubatch=128, batch=128), dict(ubatch=64), dict(ubatch=512, batch=1024),
                                  dict(depth_pairs="turbo3", kld_depths="128,256"), dict(depth_pairs="turbo3"),
                                  dict(decode_tokens=4, decode_prompts=1), dict(decode_prompts=0),
                                  dict(reps=2, depths="0"), dict(no_bench=True, kld_depths="none")])
def test_the_same_options_where_they_apply_are_accepted(opts):
    from harness.sweep_inputs import check_option_combinations
    check_option_combinations(opts, ctx=256)


def test_a_sweep_with_a_smaller_ubatch_runs(sw, tmp_path):  # noqa: F811
    code, out = sw.run("--pairs", "turbo3", "--ubatch", "64", "--out", str(tmp_path / "o"))
    assert sw.ncalls() > 0 and not out.startswith("error:"), out
