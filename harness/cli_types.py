"""Parameter types of the command line: every number, path and list is checked while Click parses the options,
before anything slow starts (issue 22, group 4), and a bad value is one stderr line naming the option (exit 2).

The types are Click's own where they exist (``click.IntRange``, ``click.Path``); the ones here add what Click
lacks: comma-separated lists with a vocabulary or an item check (:class:`CommaList`), finite numbers of
seconds (:class:`Seconds`), backend names (:class:`BackendName`, :class:`BuildName`) and models given by
name or GGUF path (:class:`ModelArg`). ``tests/test_cli_properties.py`` walks the command tree and feeds every
option of these kinds a bad value.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Iterable

import click

from harness.errors import HarnessError


class OneLineUsage(click.ClickException):
    """A usage error printed as one line, 'error: <problem> (see `<command> --help`)', exit 2 (README: bad input
    is one line naming the problem and the fix)."""

    exit_code = 2

    def __init__(self, err: click.UsageError):
        where = err.ctx.command_path if err.ctx is not None else "turbo-harness"
        super().__init__(f"{err.format_message()} (see `{where} --help`)")

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class AtLeast(click.IntRange):
    """An integer of at least ``lo``; a smaller one is refused with why (never replaced by the default)."""

    def __init__(self, lo: int, why: str = ""):
        super().__init__(min=lo)
        self.why = why

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as e:
            try:
                v = int(value)
            except (TypeError, ValueError):
                raise e from None
            self.fail(f"{v} is too small{f' ({self.why})' if self.why else ''}: give {self.min} or more, or leave it "
                      f"out for the default", param, ctx)


class Seconds(click.FloatRange):
    """A finite number of seconds above ``lo`` (at least ``lo`` with ``open_=False``); NaN and inf are refused (NaN
    compares false and would mean no limit)."""

    name = "seconds"

    def __init__(self, lo: float = 0.0, open_: bool = True):
        super().__init__(min=lo, min_open=open_)

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return v


class CommaList(click.ParamType):
    """A comma-separated list, checked whole while parsing; the command receives the string unchanged. An empty item
    ('a,,b', 'a,') is refused (one line, exit 2), never skipped.

    Args:
        what: what one item is ('turbo type', 'HOST:PORT'), for the messages.
        choices: the allowed items (a callable so that a registry can be read when the option is parsed).
        check: called with the whole string; raises HarnessError or ValueError with a one-line reason.
        none_words: words that mean 'none' (e.g. --kld-depths none), accepted as they are.
    """

    name = "list"

    def __init__(self, what: str, choices: Callable[[], Iterable[str]] | None = None,
                 check: Callable[[str], object] | None = None, none_words: tuple[str, ...] = ()):
        self.what, self.choices, self.check, self.none_words = what, choices, check, none_words

    def convert(self, value, param, ctx):
        if value is None:
            return None
        s = str(value)
        if s.strip().lower() in self.none_words:
            return s
        items = [x.strip() for x in s.split(",") if x.strip()]
        if not items:
            self.fail(f"{s!r} names no {self.what}: give a comma-separated list", param, ctx)
        if len(items) != len(s.split(",")):  # 'f16/f16,,q8_0/q8_0' or a trailing comma: a typo, never skipped silently
            self.fail(f"{s!r} has an empty item (two commas in a row, or a comma at an end): give a comma-separated "
                      f"list of {self.what}s without empty items", param, ctx)
        if self.choices is not None:
            allowed = list(self.choices())
            bad = [x for x in items if x not in allowed]
            if bad:
                self.fail(f"unknown {self.what} {', '.join(bad)}: choose from {', '.join(allowed)}", param, ctx)
        if self.check is not None:
            try:
                self.check(s)
            except (HarnessError, ValueError) as e:
                self.fail(_strip_option(str(e)), param, ctx)
        return s


def _strip_option(msg: str) -> str:
    """A HarnessError message without its leading option name ('--rpc X: ...' -> 'X: ...'): Click names the option."""
    return re.sub(r"^--[\w-]+:?\s+", "", msg) or msg


class BackendName(click.ParamType):
    """A ggml backend name of the backend table (or rpcN for remote devices), lower-cased."""

    name = "backend"

    def convert(self, value, param, ctx):
        if value is None:
            return None
        from harness import usage
        from harness.fork import backends
        try:
            return usage.backend_name(str(value), "--backend")
        except HarnessError:
            self.fail(f"unknown backend {value!r}: choose from {backends.choices(', ')} (or rpc0, rpc1, ... for the "
                      f"devices of --rpc servers)", param, ctx)


class BuildName(click.ParamType):
    """``--build``: the backend whose build folder (``$TURBO_BUILD_ROOT/<backend>``) to use. A path is refused with
    the way to use a build folder elsewhere (it is not a backend name)."""

    name = "backend"

    def convert(self, value, param, ctx):
        if value is None:
            return None
        from harness import usage
        from harness.fork import backends
        v = str(value)
        if "/" in v or v.startswith("."):
            p = Path(v).expanduser()
            hint = (f"TURBO_BUILD_ROOT={p.resolve().parent} with --build {p.name}" if backends.find(p.name.lower())
                    else "TURBO_BUILD_ROOT=<folder holding it> with --build <its backend name>")
            self.fail(f"{v!r} is a path; --build takes a backend name ({backends.choices(', ')}), the folder "
                      f"$TURBO_BUILD_ROOT/<backend>: for a build folder elsewhere use {hint}", param, ctx)
        try:
            return usage.backend_name(v, "--build")
        except HarnessError as e:
            self.fail(_strip_option(str(e)), param, ctx)


class ModelArg(click.ParamType):
    """A model by name (checks/models.toml: smollm2, gemma3) or the path of a GGUF file (its magic is read now)."""

    name = "model"

    def convert(self, value, param, ctx):
        if value is None:
            return None
        from harness.runners.models import known_models
        v = str(value)
        names = list(known_models())
        if v.lower() in names:
            return v
        p = Path(v).expanduser()
        if not p.is_file():
            self.fail(f"{v} does not exist and is not a known model ({', '.join(names)}): give a .gguf path or a name",
                      param, ctx)
        try:
            with open(p, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            self.fail(f"{v} cannot be read ({e.strerror}): give a readable .gguf file", param, ctx)
        if magic != b"GGUF":
            self.fail(f"{v} is not a valid GGUF file (it does not start with 'GGUF'): give a model converted to GGUF, "
                      f"or a name ({', '.join(names)})", param, ctx)
        return v


class Sha256(click.ParamType):
    """A SHA-256 hex digest (64 hex digits), lower-cased."""

    name = "sha256"

    def convert(self, value, param, ctx):
        if value is None:
            return None
        v = str(value).strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            self.fail(f"{value!r} is not a SHA-256 (64 hex digits): copy it from the README beside the snapshot", param, ctx)
        return v


def existing_dir() -> click.Path:
    """A folder that must exist (e.g. --fork-dir, a report folder to read)."""
    return click.Path(exists=True, file_okay=False)


def existing_file() -> click.Path:
    """A file that must exist (e.g. --known, --corpus)."""
    return click.Path(exists=True, dir_okay=False)


def out_dir(**kw) -> click.Path:
    """A folder to write (created when missing; an existing file is refused)."""
    return click.Path(file_okay=False, **kw)


class ReportDir(click.Path):
    """A report folder to write: new, empty, or a turbo-harness report (its run.json, or only what a run writes
    before it: evidence/, plots/, the run lock, a run.json being written, sub-reports with their own run.json). A folder holding anything else
    is refused, so that a report never overwrites files it did not write (``--out .`` in a checkout, ``--out /``)."""

    def __init__(self, **kw):
        super().__init__(file_okay=False, **kw)

    def convert(self, value, param, ctx):
        from harness.runlock import LOCK_NAME
        value = super().convert(value, param, ctx)
        p = Path(value)
        if p.is_dir():
            mine = {"evidence", "plots", LOCK_NAME, ".run.json.tmp"}  # the last: run.json being written (render.write_json)
            foreign = sorted(e.name for e in p.iterdir()
                             if e.name not in mine and not (e.is_dir() and (e / "run.json").is_file()))
            if foreign and not (p / "run.json").is_file():
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                self.fail(f"{value} is not a turbo-harness report folder and not empty (it holds {shown}): a report "
                          "would overwrite files it did not write; give a new or empty folder, or a report folder "
                          "to add to", param, ctx)
        return value


def foreign_output(p: Path, own: Iterable[str]) -> list[str]:
    """The entries of folder ``p`` that are not a command's own output: anything but a plain file (not a link) named
    in ``own``. [] for a folder that does not exist or is empty."""
    own = set(own)
    if not p.is_dir():
        return []
    return sorted(e.name for e in p.iterdir() if not (e.name in own and e.is_file() and not e.is_symlink()))


def check_output_dir(path: str | Path, own: Iterable[str], command: str, option: str = "--out") -> Path:
    """Refuse a folder a comparison (``diff``, ``scorecard``, ``sweep-compare``) did not make: it must be new, empty, or
    hold only the files the command writes (``own``: its earlier output, replaced). Used for a given ``--out``
    (:class:`OutputDir`) and for the default folder alike.

    Raises:
        HarnessError: one line naming the folder, what it holds and the fix (exit 2 at the command line).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise HarnessError(f"{option} {p} is a file: give a folder for the {command} output")
    try:
        foreign = foreign_output(p, own)
    except OSError as e:  # a folder this user may not list (PermissionError) is not one to write into
        raise HarnessError(f"{option} {p} cannot be read ({e.strerror or e}): give a folder you can write for the "
                           f"{command} output") from e
    if not foreign:
        return p
    if (p / "run.json").is_file():
        held = "a turbo-harness run report (run.json)"
    else:
        held = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    raise HarnessError(f"{option} {p} holds {held}, which `{command}` did not write: it would overwrite or mix with "
                       f"them; give a new or empty folder (or one holding only an earlier {command}'s "
                       f"{', '.join(sorted(own))})")


class OutputDir(click.Path):
    """``--out`` of a comparison command: a folder that is new, empty, or holds only that command's own files
    (:func:`check_output_dir`), as :class:`ReportDir` is for the reports of ``verify`` and ``sweep``.

    Args:
        own: the file names the command writes (e.g. diff.md, diff.html, diff.json, junit.xml).
        command: its name, for the message.
    """

    def __init__(self, own: Iterable[str], command: str, **kw):
        super().__init__(file_okay=False, **kw)
        self.own, self.command = tuple(own), command

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        try:
            check_output_dir(value, self.own, self.command, option=(param.opts[0] if param is not None else "--out"))
        except HarnessError as e:
            self.fail(_strip_option(str(e)), param, ctx)
        return value


def distinct_folders(dirs: Iterable[str | Path], what: str) -> None:
    """Refuse a folder given twice to a command that compares folders (``scorecard``, ``sweep-compare``): as the same
    path, with a trailing slash, another relative path or through a link (compared resolved).

    Raises:
        HarnessError: '<dir> is given twice (as <first> before): give each <what> once' (exit 2 at the command line).
    """
    seen: dict[Path, str | Path] = {}
    for d in dirs:
        key = Path(d).resolve()
        if key in seen:
            raise HarnessError(f"{d} is given twice (as {seen[key]} before): give each {what} once")
        seen[key] = d
