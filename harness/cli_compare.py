"""`turbo-harness diff` and `turbo-harness scorecard`: runs compared, nothing measured again (thin: the logic is in
harness/report/diff.py and harness/report/scorecard.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from harness.cli_types import OutputDir
from harness.errors import HarnessError


# what each command writes (harness/report/diff_render.py DIFF_RENDERERS, scorecard_render.py SCORECARD_RENDERERS):
# an --out folder may hold these (an earlier run of the same command, replaced) and nothing else
DIFF_FILES = ("diff.json", "diff.md", "diff.html", "junit.xml")
SCORECARD_FILES = ("scorecard.json", "scorecard.md", "scorecard.html")


def comparison_dir(out: str | None, default: str, own: tuple[str, ...], command: str) -> Path:
    """The folder a comparison (``diff``, ``scorecard``, ``sweep-compare``) writes: ``--out`` (checked while parsing,
    :class:`harness.cli_types.OutputDir`) or ``reports/<default>``, checked the same way (new, empty, or only ``own``
    files) and for being writable. Raises HarnessError (one line) otherwise."""
    from harness import usage
    from harness.cli import REPORTS
    from harness.cli_types import check_output_dir
    p = check_output_dir(Path(out) if out else REPORTS / default, own, command)
    usage.writable_dir(p, "--out")
    return p


def _run_dir(d: str, what: str) -> Path:
    p = Path(d)
    if not (p / "run.json").is_file():
        raise HarnessError(f"{what} {p} holds no run.json: give a folder written by `turbo-harness verify|check|sweep --out DIR`")
    return p


@click.command("diff")
@click.argument("base_run", type=click.Path(exists=True, file_okay=False))
@click.argument("new_run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=OutputDir(DIFF_FILES, "diff"),
              help="folder for diff.json, diff.md, diff.html, junit.xml: new, empty, or holding only an earlier diff's "
                   "(default reports/diff-BASE-NEW)")
@click.option("--fail-on", "fail_on", type=click.Choice(["worse", "changed", "never"]), default="worse", show_default=True,
              help="exit 1 when something got worse (worse, new finding, disappeared) | on any change or other rules/sizes")
def diff(base_run, new_run, out, fail_on):
    """Compare two runs (verify, check or sweep reports) cell by cell: what appeared, disappeared, changed verdict
    or moved beyond its noise; exit 1 per --fail-on."""
    from harness.pipeline import load_run
    from harness.report.diff import diff_runs, load_diff_rules
    from harness.report.diff_render import write_diff
    b, n = _run_dir(base_run, "BASE_RUN"), _run_dir(new_run, "NEW_RUN")
    rules = load_diff_rules()
    base, new = (load_run(d, log=lambda line, d=d: click.echo(f"{d}: {line}", err=True)) for d in (b, n))
    kind = {"SWEEP" in [c.id for c in r.checks] for r in (base, new)}
    if len(kind) > 1:
        raise HarnessError(f"{b} and {n} are not the same kind of report (one is a sweep): diff a sweep with a sweep, "
                           f"a verify/check report with another")
    d = diff_runs(base, new, str(b), str(n), rules)
    out_dir = comparison_dir(out, f"diff-{base.run_id}-{new.run_id}", DIFF_FILES, "diff")
    paths = write_diff(d, out_dir)
    click.echo(d.verdict_line())
    for note in d.notes:
        click.echo(f"note: {note}")
    for c in d.changes:
        click.echo(f"{c.label:<12} {c.check} {c.type} {c.path} {c.metric}: {c.why}")
    click.echo(f"report: {paths[1]} ({paths[2]})")
    sys.exit(d.exit_code(fail_on))


@click.command("scorecard")
@click.argument("run_dirs", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=OutputDir(SCORECARD_FILES, "scorecard"),
              help="folder for scorecard.json, scorecard.md, scorecard.html: new, empty, or holding only an earlier "
                   "scorecard's (default reports/scorecard)")
def scorecard(run_dirs, out):
    """Several fork builds side by side: a row per run (repository, commit, branch), a column per check x type,
    the layout per type, the backends executed and the root finding per fork."""
    from harness.report.scorecard import load_scorecard
    from harness.report.scorecard_render import write_scorecard
    dirs = [_run_dir(d, "RUN_DIR") for d in run_dirs]
    if not dirs:
        raise HarnessError("give one or more run folders (verify reports of the forks), e.g. reports/samples/cpu-verify")
    from harness.cli_types import distinct_folders
    distinct_folders(dirs, "run folder")  # one run twice would be two identical rows
    sc = load_scorecard(dirs, log=lambda line: click.echo(line, err=True))
    paths = write_scorecard(sc, comparison_dir(out, "scorecard", SCORECARD_FILES, "scorecard"))
    for r in sc.rows:
        click.echo(f"{r.verdict:<8} {r.fork}: {r.root}")
    click.echo(f"scorecard: {paths[1]} ({paths[2]})")
