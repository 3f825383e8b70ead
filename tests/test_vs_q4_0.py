"""Claims at equal memory: the q4_0 baselines (with and without upstream's attention rotation) and the
per-pair judgement whether turbo beats them at the same or fewer bits per real value."""
from __future__ import annotations

import pytest

from harness.checks.sweeps import judge_sweep, load_rules, vs_q4_0_cells
from harness.errors import HarnessError
from harness.report.model import Verdict
from harness.runners.sweep import parse_pairs, rotation_problem, run_sweep, split_pair
from tests.test_sweep_parsers import TRAITS
from tests.test_sweep_runner import _script, fake  # noqa: F401  (fixture)


def test_rot_pairs_parse_and_split():
    assert parse_pairs("q4_0/q4_0+rot,q4_0+rot,q4_0") == [("q4_0", "q4_0+rot"), ("q4_0", "q4_0")]
    assert split_pair("q4_0", "q4_0+rot") == ("q4_0", "q4_0", True)
    assert split_pair("turbo3", "turbo3") == ("turbo3", "turbo3", False)
    with pytest.raises(HarnessError, match="append \\+rot"):
        parse_pairs("q4_0+rot/q4_0")


def test_rotation_problem_reads_the_forks_log_lines():
    on = "llama_kv_cache: attn_rot_k = 1, n_embd_head_k_all = 64\nllama_kv_cache: attn_rot_v = 1, n_embd_head_k_all = 64\n"
    off = on.replace("= 1,", "= 0,")
    assert rotation_problem(on) == ""
    assert "did not take effect" in rotation_problem(off) and "attn_rot_k = 0" in rotation_problem(off)
    assert "no 'attn_rot_k" in rotation_problem("llama_kv_cache: size = 1 MiB")


WRAP = r"""#!/bin/sh
# prints the fork's rotation lines: on when the override is set (unless IGNORE=1, a build that ignores it)
r=0; [ "${{LLAMA_ATTN_ROT_K_OVERRIDE:-0}}" = 1 ] && [ "{ignore}" != 1 ] && r=1
echo "llama_kv_cache: attn_rot_k = $r, n_embd_head_k_all = 64" >&2
echo "llama_kv_cache: attn_rot_v = $r, n_embd_head_k_all = 64" >&2
exec "{real}" "$@"
"""


@pytest.mark.parametrize("ignore", [False, True])
def test_rot_pair_sets_the_override_and_checks_the_log(fake, ignore):  # noqa: F811
    real = fake.tmp / "build" / "bin" / "llama-perplexity.real"
    (fake.tmp / "build" / "bin" / "llama-perplexity").rename(real)
    _script(fake.tmp / "build" / "bin" / "llama-perplexity", WRAP.format(real=real, ignore=int(ignore)))
    res = run_sweep(fake.cfg("f16/f16,q8_0/q8_0,q8_0/q8_0+rot", bench=False), progress=False, log=lambda s: None,
                    traits=TRAITS)
    assert "-ctk q8_0 -ctv q8_0" in fake.calls.read_text() and "+rot" not in fake.calls.read_text()
    rec = res.ppl["q8_0/q8_0+rot"]
    if ignore:  # the run did not measure what the pair names: ERROR, never a number
        assert not rec.ok and "did not take effect" in rec.error
    else:
        assert rec.ok
    assert res.ppl["q8_0/q8_0"].ok  # the plain pair never gets the override
    cr, sec = judge_sweep(res, traits=TRAITS)
    row = next(r for r in sec["rows"] if r["pair"] == "q8_0/q8_0+rot")
    assert row["rotation"] is True and row["k"] == "q8_0"


def _row(pair, kld, se, bits, lnr=0.0, status="ok"):
    k, v, _ = split_pair(*pair.split("/"))
    return {"pair": pair, "k": k, "v": v, "kld": kld, "kld_se": se, "bits_per_value": bits,
            "ln_ppl_ratio_vs_f16": lnr, "ln_ppl_ratio_se": 0.001, "status": status}


def _verdicts(rows):
    cells = vs_q4_0_cells(rows, load_rules(), "cpu", "test model")
    return {(c.type, c.metric): c for c in cells}


def test_turbo_better_at_fewer_bits_holds_worse_does_not():
    rows = [_row("q4_0/q4_0", 0.10, 0.002, 4.5), _row("q4_0/q4_0+rot", 0.06, 0.002, 4.5),
            _row("turbo3/turbo3", 0.07, 0.002, 3.125), _row("turbo4/turbo4", 0.02, 0.002, 4.25)]
    v = _verdicts(rows)
    assert v[("turbo3/turbo3", "kld_vs_q4_0/q4_0")].verdict == Verdict.PASS
    c = v[("turbo3/turbo3", "kld_vs_q4_0/q4_0+rot")]  # 0.07 vs 0.06, 3.5 se worse: the claim fails
    assert c.verdict == Verdict.PARTIAL and "does not hold" in c.caveat and c.value == pytest.approx(0.01)
    assert v[("turbo4/turbo4", "kld_vs_q4_0/q4_0+rot")].verdict == Verdict.PASS
    assert ("q4_0/q4_0", "kld_vs_q4_0/q4_0") not in v  # only turbo pairs are judged


def test_within_noise_counts_as_not_worse_and_more_bits_is_not_equal_memory():
    rows = [_row("q4_0/q4_0", 0.100, 0.01, 4.5), _row("turbo3/turbo3", 0.110, 0.01, 4.5),
            _row("turbo4/turbo4", 0.01, 0.001, 8.5)]  # padded head: 8.5 bits per real value
    v = _verdicts(rows)
    assert v[("turbo3/turbo3", "kld_vs_q4_0/q4_0")].verdict == Verdict.PASS  # +0.01 < 2 x 0.014
    c = v[("turbo4/turbo4", "kld_vs_q4_0/q4_0")]
    assert c.verdict == Verdict.PARTIAL and "4.00 more bits" in c.caveat
    # no rotated baseline measured: said, not judged
    assert v[("turbo3/turbo3", "kld_vs_q4_0/q4_0+rot")].verdict == Verdict.SKIP


def test_default_pairs_pass_the_cli_type_check(fake, monkeypatch):  # noqa: F811
    """The default sweep holds q4_0/q4_0+rot: the up-front type check must read it as q4_0 (a regression once)."""
    from harness import sweep_inputs
    from harness.runners import sweep as S
    monkeypatch.setattr(S, "type_traits", lambda bdir: TRAITS)
    cfg = fake.cfg(S.DEFAULT_PAIRS, bench=False)
    assert ("q4_0", "q4_0+rot") in cfg.pairs
    sweep_inputs.check_inputs(cfg)  # raises HarnessError on an unknown type
    bad = fake.cfg("q4_0/q9_9+rot", bench=False)
    with pytest.raises(HarnessError, match="unknown cache type 'q9_9'"):
        sweep_inputs.check_inputs(bad)
