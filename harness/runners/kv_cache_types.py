"""The K/V cache types the fork's tools accept for ``-ctk`` / ``-ctv``: a narrower set than the ggml types the build
knows (:func:`harness.runners.ggml_types.type_traits` lists q4_K, q8_K, ... which llama's common argument parser
refuses: "Unsupported cache type"). Never a list of our own: read from the source the build was made from.

The source folder is the one the build records (its harness build record, else its CMakeCache:
:func:`harness.fork.build._built_from`): the ``kv_cache_types`` vector of ``common/arg.cpp`` (the list
``kv_cache_type_from_str`` accepts for -ctk/-ctv and ``--help`` prints as "allowed values"), its ``GGML_TYPE_*``
names turned into type names through the ``[GGML_TYPE_X] = { .type_name = "..." }`` table of ``ggml/src/ggml.c``.
The build's binary is not run for this (a ``--help`` of a GPU build initialises its devices).
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

ARG_RE = re.compile(r"kv_cache_types\s*=\s*\{([^}]*)\}")
NAME_RE = re.compile(r"\[GGML_TYPE_(\w+)\]\s*=\s*\{[^}]*?\.type_name\s*=\s*\"([^\"]+)\"")


def from_source(src: Path) -> tuple[str, ...]:
    """Type names of ``kv_cache_types`` in ``src/common/arg.cpp`` (names from ``src/ggml/src/ggml.c``), in the
    source's order; () when either file or the list is missing, or a listed type has no name there."""
    try:
        arg = (Path(src) / "common" / "arg.cpp").read_text(errors="replace")
        names = dict(NAME_RE.findall((Path(src) / "ggml" / "src" / "ggml.c").read_text(errors="replace")))
    except OSError:
        return ()
    m = ARG_RE.search(arg)
    enums = re.findall(r"GGML_TYPE_(\w+)", m.group(1)) if m else []
    return tuple(names[e] for e in enums) if enums and all(e in names for e in enums) else ()


@lru_cache(maxsize=8)
def _cached(src: str, stamp: tuple) -> tuple[str, ...]:
    return from_source(Path(src))


def kv_cache_types(bdir: str | Path) -> tuple[tuple[str, ...], str]:
    """(the -ctk/-ctv types the build's tools accept, where that was read), or ((), '') when the build records no
    source or its source does not say (the caller then checks less, and the tool reports what it refuses).
    Memoised per source file (mtime)."""
    from harness.fork.build import _built_from
    try:
        src = _built_from(Path(bdir))
    except (OSError, ValueError):  # an unreadable record or CMakeCache: no source to read
        return (), ""
    if not src:
        return (), ""
    arg = Path(src) / "common" / "arg.cpp"
    try:
        stamp: tuple = (arg.stat().st_mtime_ns, (Path(src) / "ggml" / "src" / "ggml.c").stat().st_mtime_ns)
    except OSError:
        return (), ""
    got = _cached(src, stamp)
    return (got, f"kv_cache_types in {arg}") if got else ((), "")
