"""Shape check of a stored sweep section (``run.sections['sweep']`` in run.json), before any reader uses it.

A run.json edited by hand or damaged in transit (the section a string, ``rows`` an object, a PPL stored as text)
made `report`, `sweep-compare` and `scorecard` stop with a traceback. :func:`check_sweep_section` raises a
ValueError naming the field instead (the caller turns it into one stderr line, exit 2).
"""
from __future__ import annotations

import re

# the parts of the section that are lists of row objects / plain objects (harness.checks.sweeps writes them)
_ROW_LISTS = ("rows", "speed")
_OBJECTS = ("pinned", "rules", "model", "base", "evidence")
# of those, the ones a sweep stores as null while it has none yet: no model read (model), or a sweep stopped before
# its f16 baseline finished (base; harness.checks.sweeps.judge_sweep starts both as None)
_NULLABLE = ("model", "base")
# row fields that hold numbers (PPL, KLD, their standard errors, percentages, MiB, bits, speed ratios and tokens/s,
# counts): a number or null, never text; other fields are free
_NUMERIC = re.compile(r"^(ppl|kld|ln_ppl|d_ln|same_top|dp_|tps|ratio)|(_se|_pct|_mib|_tps_d\d+|_ratio_d\d+|bits_.*|"
                      r"_bits_real)$|^(chunks|graph_splits|kv_cells|depth|n_tokens|reps)$")


def check_sweep_section(sweep: object) -> None:
    """Raise ValueError naming the field when the stored sweep section has the wrong JSON shape.

    sweep: the value of ``sections['sweep']`` as read from JSON (absent sections are not checked).
    Raises: ValueError('sections.sweep.rows[2].ppl is str, not a number or null').
    """
    if not isinstance(sweep, dict):
        raise ValueError(f"field 'sections.sweep' is {type(sweep).__name__}, not an object")
    for k in _OBJECTS:
        if k in sweep and not isinstance(sweep[k], dict) and not (sweep[k] is None and k in _NULLABLE):
            raise ValueError(f"field 'sections.sweep.{k}' is {type(sweep[k]).__name__}, not an object")
    if "notes" in sweep and not isinstance(sweep["notes"], list):
        raise ValueError(f"field 'sections.sweep.notes' is {type(sweep['notes']).__name__}, not a list")
    for part in _ROW_LISTS:
        rows = sweep.get(part, [])
        if not isinstance(rows, list):
            raise ValueError(f"field 'sections.sweep.{part}' is {type(rows).__name__}, not a list")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"field 'sections.sweep.{part}[{i}]' is {type(row).__name__}, not an object")
            for k, v in row.items():
                if _NUMERIC.search(k) and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise ValueError(f"field 'sections.sweep.{part}[{i}].{k}' is {type(v).__name__}, "
                                     f"not a number or null")
