"""Issue 22, 'What it must show' 2: a property of the whole command line, generated from the Click command tree.

For every command and every option or argument that takes a number, a path or a list, a bad value gives exit 2
and ONE stderr line naming the option, with nothing slow started (Click parses and refuses it; the environment
points at no fork, no build and an empty reports folder, so a value that slipped through parsing would fail the
test with some other message). A new option is covered without editing this test: its kind is read from its
Click type, and a number without a declared range, a path that refuses nothing, or a comma-separated list
declared as a plain string fails the test itself.
"""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.cli_types import CommaList, Seconds

NUMBER = (click.types.IntParamType, click.types.FloatParamType)


def _commands():
    ctx = click.Context(cli)
    return [(name, cli.get_command(ctx, name)) for name in cli.list_commands(ctx)]


def _kind(p: click.Parameter) -> str | None:
    if getattr(p, "is_flag", False):
        return None
    if isinstance(p.type, NUMBER):
        return "number"
    if isinstance(p.type, click.Path):
        return "path"
    if isinstance(p.type, CommaList):
        return "list"
    return None


def _looks_like_list(p: click.Parameter) -> bool:
    text = f"{getattr(p, 'help', '') or ''} {p.metavar or ''}".lower()
    return "comma" in text or "[,...]" in text


def _bad_values(p: click.Parameter, tmp) -> list[str]:
    """Values this parameter must refuse, read from its type (the test fails when the type declares none)."""
    t = p.type
    if isinstance(t, NUMBER):
        lo = getattr(t, "min", None)
        assert lo is not None, f"{p.opts}: a number option must declare its range (click.IntRange/FloatRange, Seconds)"
        below = lo if getattr(t, "min_open", False) else lo - 1
        return ["not-a-number", str(below)] + (["nan"] if isinstance(t, Seconds) else [])
    if isinstance(t, click.Path):
        f = tmp / "a-file"
        f.write_text("x")
        d = tmp / "a-dir"
        d.mkdir(exist_ok=True)
        bad = ([str(tmp / "does-not-exist")] if t.exists else []) + ([str(f)] if not t.file_okay else []) \
            + ([str(d)] if not t.dir_okay else [])
        assert bad, f"{p.opts or p.name}: a path must refuse something (exists=True, file_okay=False or dir_okay=False)"
        return bad
    if isinstance(t, CommaList):
        return ["", ","] + (["no-such-item"] if t.choices is not None else [])
    raise AssertionError(p)


def _good_value(p: click.Parameter, tmp) -> str:
    """A value that parses, for the required parameters around the one under test."""
    t = p.type
    if isinstance(t, click.Path):
        if t.exists and t.dir_okay and not t.file_okay:
            (tmp / "good-dir").mkdir(exist_ok=True)
            return str(tmp / "good-dir")
        if t.exists:
            (tmp / "good-file").write_text("x")
            return str(tmp / "good-file")
        return str(tmp / "new" / "x")
    if isinstance(t, CommaList) and t.choices is not None:
        return list(t.choices())[0]
    if isinstance(t, click.Choice):
        return t.choices[0]
    if isinstance(t, NUMBER):
        return "1"
    return {"check_id": "PQ4"}.get(p.name, "x")


def _cases():
    out = []
    for name, cmd in _commands():
        for p in cmd.params:
            if _kind(p) is not None:
                out.append(pytest.param(name, p.name, id=f"{name}:{p.name}"))
    return out


def test_the_tree_declares_every_list_as_a_list():
    """A comma-separated option declared as a plain string would escape the property: refused here."""
    plain = [f"{name} {p.opts[0]}" for name, cmd in _commands() for p in cmd.params
             if isinstance(p, click.Option) and p.type is click.STRING and _looks_like_list(p)]
    assert plain == [], f"declare these as harness.cli_types.CommaList: {plain}"
    assert len(_cases()) >= 40  # the property covers the tree, not a handful of options


@pytest.mark.parametrize("command,param", _cases())
def test_bad_value_is_exit_2_and_one_line_naming_it(tmp_path, monkeypatch, command, param):
    monkeypatch.setenv("FORK_DIR", str(tmp_path / "no-fork"))
    monkeypatch.setenv("TURBO_BUILD_ROOT", str(tmp_path / "no-builds"))
    monkeypatch.setenv("TURBO_REPORTS", str(tmp_path / "reports"))
    cmd = dict(_commands())[command]
    p = next(x for x in cmd.params if x.name == param)
    name = p.opts[0] if isinstance(p, click.Option) else p.human_readable_name
    for bad in _bad_values(p, tmp_path):
        args = [command]  # in declaration order, so that a bad argument lands in its own position
        for q in cmd.params:
            if q is p:
                args += [name, bad] if isinstance(p, click.Option) else [bad]
            elif q.required:
                args += ([q.opts[0]] if isinstance(q, click.Option) else []) + [_good_value(q, tmp_path)]
        r = CliRunner().invoke(cli, args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        where = f"{' '.join(map(repr, args))}: exit {r.exit_code}, stderr {r.stderr!r}"
        assert r.exit_code == 2, where
        assert len(lines) == 1 and "Traceback" not in r.output, where
        assert name.strip("-").upper() in lines[0].upper(), where
