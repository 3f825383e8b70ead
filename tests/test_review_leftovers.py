"""Leftovers of a later review, each shown as a user expects: a sweep into an earlier sweep's folder keeps its
pairs (or refuses in one line), and the messages, counts and verdicts below name what really happened. Fake tools
replay real captured output (no fork build needed)."""
from __future__ import annotations

import json

from tests.test_new_user import one_error_line, sw  # noqa: F401  (sw: the fixture)


def _pairs(out_dir) -> list[str]:
    return json.loads((out_dir / "run.json").read_text())["meta"]["pairs"]


# ------------------------------------------------------------------ 1. a sweep into an earlier sweep's folder

def test_sweep_into_an_earlier_sweep_keeps_its_pairs_or_refuses_in_one_line(sw):  # noqa: F811
    """The second sweep into one --out replaced the first one's pairs without a word (they stayed in the job cache
    only). With the same settings the report now holds the union, the earlier pairs from the cache (no tool run for
    them); with other settings it is refused in one line, exit 2, the earlier report untouched."""
    out = sw.tmp / "rep"
    code, _ = sw.run("--pairs", "turbo3/turbo3", "--no-bench", "--out", str(out))
    assert _pairs(out) == ["f16/f16", "q8_0/q8_0", "turbo3/turbo3"]
    n = sw.ncalls()
    code, text = sw.run("--pairs", "q8_0/turbo3", "--no-bench", "--out", str(out))
    assert _pairs(out) == ["f16/f16", "q8_0/q8_0", "turbo3/turbo3", "q8_0/turbo3"], text
    assert sw.ncalls() - n == 1  # only the new pair ran: the earlier ones came from the job cache
    assert "its pairs f16/f16, q8_0/q8_0, turbo3/turbo3 stay in the report" in text
    rows = {r["pair"] for r in json.loads((out / "run.json").read_text())["sections"]["sweep"]["rows"]}
    assert {"turbo3/turbo3", "q8_0/turbo3"} <= rows
    before = (out / "run.json").read_bytes()
    n = sw.ncalls()
    code, text = sw.run("--pairs", "turbo3/turbo3", "--no-bench", "--ctx", "128", "--out", str(out))
    line = one_error_line(text)
    assert code == 2 and f"--out {out} holds a sweep of other settings (ctx 256 there, 128 here)" in line
    assert "give another --out folder, or the same settings" in line
    assert (out / "run.json").read_bytes() == before and sw.ncalls() == n  # nothing ran, nothing was lost
    other = sw.tmp / "other.txt"
    other.write_text("A different corpus with enough words to be read as plain text here.\n" * 40)
    code, text = sw.run("--pairs", "turbo3/turbo3", "--no-bench", "--out", str(out), corpus_=other)
    assert code == 2 and "corpus corpus.txt there, other.txt here" in one_error_line(text)
