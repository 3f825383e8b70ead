"""Read C-family sources (C, C++, CUDA, Metal, GLSL) of a fork as top-level items, by name, never by line number.

A source is cut into its top-level items: a function definition (up to its closing brace), a declaration or a
table (up to its ``;``), a struct typedef. Comments, strings and preprocessor lines are skipped while cutting, so a
brace in a comment cannot move a boundary. Each item keeps its name, its first and last line (1-based) and its text,
so a finding can name ``file:line`` and the Metal shim can compile the fork's own text.

Also here: the numeric literals of a piece of source with the line of each (:func:`numbers`), which the source
audit reads as tables.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from pathlib import Path

IDENT = re.compile(r"[A-Za-z_]\w*")


@dataclass
class Item:
    """One top-level item of a source file.

    Attributes:
        name: its declared name ('' when none was found, e.g. a bare instantiation).
        kind: 'function' (has a body), 'table' (an initialised declaration), 'decl' (anything else ending in ';').
        file: the source file. line, end_line: 1-based lines of its first and last character.
        text: the item's text, exactly as in the file (comments included).
        start: character offset of ``text`` in the file.
    """

    name: str
    kind: str
    file: Path
    line: int
    end_line: int
    text: str
    start: int = 0

    def where(self, root: Path | None = None, offset: int = 0) -> str:
        """'relative/path:line' of the item's first line plus ``offset`` lines."""
        p = self.file.relative_to(root) if root is not None and self.file.is_relative_to(root) else self.file
        return f"{p}:{self.line + offset}"


_SKIP = re.compile(r"""//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|^[ \t]*\#(?:\\\n|[^\n])*""",
                   re.S | re.M)


def _blank(m: re.Match) -> str:
    t = m.group(0)
    if t[0] in "\"'":
        return t[0] + re.sub(r"[^\n]", " ", t[1:-1]) + t[-1]
    return re.sub(r"[^\n]", " ", t)


def _mask(text: str) -> str:
    """The text with comments, string/char literals and preprocessor lines replaced by spaces (newlines kept), so
    offsets and line numbers stay those of the original."""
    return _SKIP.sub(_blank, text)


mask = _mask  # public name: the Metal extraction and the source audit read masked text


def _strip_header(head: str) -> str:
    """A declaration's head without attributes ``[[...]]``, ``__attribute__((...))`` and ``template <...>``."""
    head = re.sub(r"\[\[.*?\]\]", " ", head, flags=re.S)
    head = re.sub(r"__attribute__\s*\(\(.*?\)\)", " ", head, flags=re.S)
    while True:
        m = re.search(r"\btemplate\s*<", head)
        if not m:
            return head
        depth, j = 1, m.end()
        while j < len(head) and depth:
            depth += {"<": 1, ">": -1}.get(head[j], 0)
            j += 1
        head = head[:m.start()] + " " + head[j:]


def _name(head: str, kind: str) -> str:
    """The declared name in a head: the identifier before the first '(' of a function, before '[' / '=' of a table,
    the last identifier of a typedef or plain declaration."""
    h = _strip_header(head)
    if kind == "function":
        m = re.search(r"([A-Za-z_]\w*)\s*\(", h)
        return m.group(1) if m else ""
    m = re.search(r"([A-Za-z_]\w*)\s*(\[[^\]]*\]\s*)*=", h) or re.search(r"([A-Za-z_]\w*)\s*\[", h)
    if m:
        return m.group(1)
    ids = IDENT.findall(re.sub(r"<[^<>]*>", " ", h))
    return ids[-1] if ids else ""


def items(path: Path, text: str | None = None) -> list[Item]:
    """The top-level items of a source file, in file order.

    Args:
        path: the file (read as UTF-8 with replacement when ``text`` is None).
    Returns:
        list of :class:`Item`. A file that cannot be cut (unbalanced braces) gives the items found before the
        imbalance; nothing raises on odd syntax.
    """
    text = Path(path).read_text(errors="replace") if text is None else text
    masked = _mask(text)
    nl = [m.start() for m in re.finditer("\n", text)]
    out: list[Item] = []
    depth = 0
    start = None
    body_open = None  # offset of the first top-level '{' of the current item
    nonspace = re.compile(r"[^\s;}]")
    pos = 0
    for m in re.finditer(r"[{};]", masked):
        i, c = m.start(), m.group(0)
        if start is None:
            s0 = nonspace.search(masked, pos, i + 1)
            start = s0.start() if s0 else None
        pos = i + 1
        if c == "{":
            if depth == 0 and body_open is None:
                body_open = i
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                break
            if depth == 0 and start is not None and body_open is not None:
                head = masked[start:body_open]
                is_fn = "(" in _strip_header(head) and "=" not in head and not re.match(
                    r"\s*(typedef|struct|union|enum|class|namespace)\b", head)
                if re.match(r"\s*(namespace|extern\s*\"C\")", head):
                    start, body_open = None, None  # a namespace: its inside is read as top level
                    continue
                if is_fn:
                    out.append(_make(path, text, nl, start, i + 1, "function", head))
                    start, body_open = None, None
        elif c == ";" and depth == 0 and start is not None:
            head = masked[start:body_open] if body_open is not None else masked[start:i]
            kind = "table" if "=" in masked[start:i] and body_open is not None else "decl"
            if body_open is not None and kind == "decl":  # typedef struct {...} name;  the name follows the body
                head = masked[masked.rfind("}", start, i) + 1:i]
            out.append(_make(path, text, nl, start, i + 1, kind, head))
            start, body_open = None, None
    return out


def _make(path: Path, text: str, nl: list[int], a: int, b: int, kind: str, head: str) -> Item:
    return Item(name=_name(head, kind), kind=kind, file=Path(path), line=bisect.bisect_left(nl, a) + 1,
                end_line=bisect.bisect_left(nl, b - 1) + 1, text=text[a:b], start=a)


NUM = re.compile(r"(?<![\w.])([+-]?\s*(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)([fFhH]|(?:_?h))?(?![\w.])")


def numbers(item: Item, text: str | None = None) -> list[tuple[float, int, str]]:
    """Numeric literals of an item's code (comments masked) as (value, file line, suffix) in order; ``text`` is a
    part of the item's text (default all of it), taken from its start."""
    t = item.text if text is None else text
    masked = _mask(t)
    nl = [m.start() for m in re.finditer("\n", t)]
    out = []
    for m in NUM.finditer(masked):
        raw = m.group(1).replace(" ", "")
        try:
            v = float(raw)
        except ValueError:
            continue
        out.append((v, item.line + bisect.bisect_left(nl, m.start()), (m.group(2) or "").lower()))
    return out
