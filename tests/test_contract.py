"""The one check contract: a registry every command reads, checks that return tables, renderers that show every
table, and no module-global state written by a run."""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
import types
import xml.etree.ElementTree as ET
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import harness
from harness.checks import kvreal
from harness.checks.contract import Check, Outcome, Registry
from harness.checks.registry import REGISTRY
from harness.errors import HarnessError
from harness.reference import turbo as T
from harness.report.model import Run, Table, Verdict
from harness.runners import backend_ops
from harness.targets.numpy_target import NumpyTarget
from harness.verify import run_checks

FIX = Path(__file__).resolve().parent / "fixtures" / "backend_ops"


class ToolTarget(NumpyTarget):
    """A NumPy target whose test-backend-ops output is a real CUDA log (the target runs the tool, not the check)."""

    def backend_ops(self, log_path=None):
        text = (FIX / "cuda_h200_excerpt.log").read_text()
        if log_path:
            Path(log_path).write_text(text)
        from dataclasses import asdict
        res = [asdict(r) for r in backend_ops.parse(text) if backend_ops.is_turbo_related(r)]
        return {"results": res, "returncode": 0, "note": "", "command": "test-backend-ops test -o TURBO_WHT (fixture)"}


def test_html_json_markdown_junit_show_the_coverage_and_test_backend_ops_tables(tmp_path):
    run = run_checks(ToolTarget(), ["COMPAT"], ["turbo3"], tmp_path, log=lambda s: None)
    compat = run.checks[0]
    tables = {t.id: t for t in compat.tables}
    assert set(tables) == {"coverage", "backend_ops"}
    cov, ops = tables["coverage"], tables["backend_ops"]
    assert len(cov.rows) == 3 + 2 * 2 * 3 + 4  # K+V x 3 dims, 2 roles x 2 partners x 3 dims; 4 backends not here
    assert ops.rows and {r[1] for r in ops.rows} == {"TURBO_WHT", "FLASH_ATTN_EXT"}
    assert any(c.path == "test-backend-ops" and c.verdict == Verdict.PASS for c in compat.cells)
    page = (tmp_path / "report.html").read_text()
    body = page[page.index("<h2 id='COMPAT'>"):]  # inside COMPAT's own section, as HTML tables
    for t in (cov, ops):
        assert f"<h3>{t.title}</h3>" in body.replace("&#x27;", "'")
        for r in t.rows:
            assert "<tr>" + "".join(f"<td class=l>{x}</td>" for x in (str(v) for v in r)) + "</tr>" in \
                body.replace("&#x27;", "'").replace("&amp;", "&"), r
    md = (tmp_path / "summary.md").read_text()
    assert f"### {cov.title}" in md and f"### {ops.title}" in md
    assert "| cuda | all | all | all | all | not covered: backend not available on this machine |" in md
    stored = json.loads((tmp_path / "run.json").read_text())
    assert [t["id"] for t in stored["checks"][0]["tables"]] == ["coverage", "backend_ops"]
    assert Run.from_dict(stored).checks[0].tables == compat.tables  # structured, not Markdown: it round-trips
    out = [s.find("system-out").text for s in ET.parse(tmp_path / "junit.xml").getroot() if s.get("name") == "COMPAT"][0]
    assert cov.title in out and ops.title in out and "FLASH_ATTN_EXT" in out


def test_kvreal_per_layer_tables_reach_the_html(make_ctx, tmp_path):
    rng = np.random.default_rng(3)
    q = {0: rng.standard_normal((64, 4, 128)).astype(np.float32)}
    k = {0: rng.standard_normal((64, 2, 128)).astype(np.float32)}
    v = {0: rng.standard_normal((64, 2, 128)).astype(np.float32)}
    ctx = make_ctx(NumpyTarget(), types=("turbo3",))
    out = kvreal.cells_from_analysis(ctx, kvreal.analyse(ctx, q, k, v, label="syn"))
    assert [t.id for t in out.tables] == ["per_layer:syn:nmse", "per_layer:syn:attn_rel_err",
                                          "per_layer:syn:logit_rel_err", "per_layer:syn:stats"]
    run = Run("r")
    from harness.report.model import CheckResult
    run.checks.append(CheckResult("KVREAL", kvreal.TITLE, cells=list(out), tables=out.tables))
    from harness.report.html import write_html
    page = write_html(run, tmp_path).read_text()
    for t in out.tables:
        assert f"<h3>{t.title}</h3>" in page.replace("&#x27;", "'")
    nmse = out.tables[0]
    assert f"<td class=l>0</td><td class=l>{nmse.rows[0][1]:.3g}</td>" in page


def toy_run(ctx):
    """A toy check: one cell per type, a note and a table; data only."""
    cells = Outcome(notes=["toy note: nothing measured"],
                    tables=[Table("toy", "Toy table", ["type", "value"], [[t, 0.25] for t in ctx.types])])
    for t in ctx.types:
        cells.append(ctx.cell("TOY", t, ctx.target_backend, "set_rows", "toy_metric", 0.25, 1.0, Verdict.PASS))
    return cells


def test_a_toy_check_added_through_the_registry_alone_appears_everywhere(tmp_path):
    toy = Check("TOY", "A toy check added by a test", toy_run, order=65)
    reg = REGISTRY.with_check(toy)
    # placed by its order among whatever checks are registered (a new check module must not break this test)
    assert "TOY" not in REGISTRY and reg.default_ids() == [c.id for c in sorted(reg, key=lambda c: c.order)
                                                          if c.in_verify and c.command == "verify"]
    assert "TOY" in reg.default_ids()
    runner = CliRunner()
    r = runner.invoke(harness_cli(), ["list"], obj=reg)
    assert r.exit_code == 0 and "TOY  A toy check added by a test" in r.output
    out = tmp_path / "run"
    r = runner.invoke(harness_cli(), ["verify", "--numpy-target", "", "--type", "turbo3", "--out", str(out)], obj=reg)
    assert r.exit_code == 0, r.output
    assert "TOY    PASS" in r.output
    stored = json.loads((out / "run.json").read_text())
    assert [c["id"] for c in stored["checks"]] == reg.default_ids()
    toy_json = next(c for c in stored["checks"] if c["id"] == "TOY")
    assert toy_json["verdict"] == "PASS" and toy_json["notes"] == ["toy note: nothing measured"]
    assert toy_json["cells"][0]["metric"] == "toy_metric" and toy_json["tables"][0]["rows"] == [["turbo3", 0.25]]
    page = (out / "report.html").read_text()
    assert "<h2 id='TOY'>TOY: A toy check added by a test" in page and "<h3>Toy table</h3>" in page
    assert "toy_metric" in page and "toy note: nothing measured" in page
    assert "### Toy table" in (out / "summary.md").read_text()
    # the default registry did not change: without obj, TOY is unknown
    r = runner.invoke(harness_cli(), ["check", "TOY", "--numpy-target", "", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown check TOY" in r.output


def test_registry_refuses_two_checks_with_one_id():
    with pytest.raises(HarnessError, match="two checks registered as PQ1"):
        REGISTRY.with_check(Check("PQ1", "another PQ1", toy_run, order=1))
    assert Registry.discover().ids() == REGISTRY.ids()


def harness_cli():
    from harness.cli import cli
    return cli


def _import_all() -> None:
    for info in pkgutil.walk_packages(harness.__path__, "harness."):
        importlib.import_module(info.name)


def _module_state() -> dict:
    """{(module, name): fingerprint} of every value bound at module level in the harness package: the object's
    identity, and for data (containers, numbers, strings, context variables) its contents."""
    state = {}
    for name, mod in list(sys.modules.items()):
        if not (name == "harness" or name.startswith("harness.")) or mod is None:
            continue
        for k, v in vars(mod).items():
            if k.startswith("__") or isinstance(v, (types.ModuleType, types.FunctionType, type)):
                continue
            if isinstance(v, ContextVar):
                state[(name, k)] = ("contextvar", repr(v.get(None)))
            elif isinstance(v, (dict, list, set, tuple, frozenset, str, int, float, bool, bytes, type(None), Path)):
                state[(name, k)] = (id(v), repr(v))
            elif isinstance(v, Registry):
                state[(name, k)] = (id(v), tuple(c.id for c in v))
            else:
                state[(name, k)] = (id(v), type(v).__name__)
    return state


def test_no_module_global_state_is_written_by_runs_of_two_targets_with_different_layouts(tmp_path):
    _import_all()
    before, env = _module_state(), dict(os.environ)
    odd = NumpyTarget(formats={"turbo4": T.TurboFormat("turbo4", 4, 128, 66)})  # no rnorm field: unknown layout
    plain = NumpyTarget()
    r1 = run_checks(odd, ["PQ3", "PQ4"], ["turbo4"], tmp_path / "odd", log=lambda s: None)
    r2 = run_checks(plain, ["PQ3", "PQ4"], ["turbo4"], tmp_path / "plain", log=lambda s: None)
    r3 = run_checks(odd, ["PQ4"], ["turbo4"], tmp_path / "odd2", log=lambda s: None)
    assert r1.verdict == Verdict.FAIL and r2.verdict == Verdict.PASS and r3.verdict == Verdict.FAIL
    assert "128 values in 66 bytes" in next(c for c in r1.checks[1].cells if c.verdict == Verdict.FAIL).caveat
    after = _module_state()
    changed = {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert not changed, changed
    assert dict(os.environ) == env


def test_subcommands_in_their_own_modules_load_when_named_not_on_import():
    import subprocess
    code = ("import sys, harness.cli as c; assert 'harness.cli_sweep' not in sys.modules "
            "and 'harness.cli_replay' not in sys.modules, 'imported on import'; "
            "names = c.cli.list_commands(None); assert {'sweep', 'replay', 'catalogue', 'bisect'} <= set(names), names")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    r = CliRunner().invoke(harness_cli(), ["sweep", "--help"])
    assert r.exit_code == 0 and "--pairs" in r.output


def test_a_backend_is_one_row_of_the_backend_table(monkeypatch):
    """Build flags, command-line names and their fix, registry names and routes all come from the one table."""
    from harness import usage
    from harness.fork import backends
    from harness.fork import build as fb
    from harness.targets.base import Backend
    from harness.targets.fork import ForkTarget, select_backends
    row = backends.BackendSpec("sycl", ("-DGGML_SYCL=ON",), ("sycl", "level_zero"), ("set_rows",), ("get_rows",),
                               "an Intel GPU and oneAPI")
    with pytest.raises(HarnessError, match="unknown backend 'sycl'"):
        fb.cmake_options("sycl")
    monkeypatch.setattr(backends, "TABLE", backends.TABLE + (row,))
    assert fb.cmake_options("sycl")[-1] == "-DGGML_SYCL=ON"
    assert usage.backend_name("SYCL", "--backend") == "sycl" and "an Intel GPU and oneAPI" in usage.backend_fix("sycl")
    devs = [{"name": "L0", "description": "Arc", "reg": "Level_Zero", "kind": "gpu"},
            {"name": "CPU", "description": "x86", "reg": "CPU", "kind": "cpu"}]
    assert [b.name for b in select_backends(devs)] == ["sycl", "cpu"]
    t = ForkTarget.__new__(ForkTarget)  # routes only: no probe needed
    t._backends = [Backend("sycl", "L0", "gpu"), Backend("cpu", "CPU", "cpu")]
    assert t.routes("sycl").decode == ["get_rows"] and t.routes("cpu").quantize == ["set_rows", "quantize_chunk"]
    r = CliRunner().invoke(harness_cli(), ["build", "--help"])
    assert all(n in r.output for n in ("cpu", "cuda", "metal", "vulkan", "hip"))


def test_sweep_is_in_the_registry_and_runs_only_through_its_command():
    from harness.checks import sweeps
    sweep = REGISTRY.get("SWEEP")
    assert sweep.command == "sweep" and "SWEEP" not in REGISTRY.ids()
    runner = CliRunner()
    r = runner.invoke(harness_cli(), ["list"])
    assert r.exit_code == 0 and f"SWEEP  {sweep.title}" in r.output and "run by `turbo-harness sweep`" in r.output
    assert "ppl_vs_q8_0." in r.output  # its rules come from checks/sweeps.toml
    for args in (["verify", "--checks", "PQ1,SWEEP"], ["check", "sweep"]):
        r = runner.invoke(harness_cli(), args + ["--numpy-target", ""])
        assert r.exit_code == 2 and "SWEEP runs through `turbo-harness sweep`" in r.output, r.output
    assert (sweeps.ID, sweeps.TITLE) == (sweep.id, sweep.title)


@pytest.mark.parametrize("name", [n for n, _ in __import__("harness.report.render", fromlist=["RENDERERS"]).RENDERERS])
def test_every_output_format_renders_every_part_of_a_check(name, tmp_path):
    """Each renderer of RENDERERS shows a check's title, verdict, note, table (title, column, values) and cell."""
    from harness.report.model import Cell, CheckResult
    from harness.report.render import RENDERERS
    run = Run("r-formats")
    run.checks.append(CheckResult("TOY", "Toy check title", notes=["a toy note"],
                                  tables=[Table("t", "Toy table title", ["col_alpha", "col_beta"], [["row_one", 0.125]])],
                                  cells=[Cell("TOY", "turbo3", "cpu:set_rows", "toy_metric", 0.5, 1.0, Verdict.FAIL,
                                              caveat="a toy caveat")]))
    write = dict(RENDERERS)[name]
    text = Path(write(run, tmp_path)).read_text()
    assert Path(tmp_path / name).is_file()
    for part in ("TOY", "Toy check title", "FAIL", "a toy note", "Toy table title", "col_alpha", "row_one", "0.125",
                 "toy_metric", "a toy caveat"):
        assert part in text, (name, part)


def test_the_readme_check_table_has_a_row_for_every_registered_check():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## The checks"):readme.index("Thresholds live in")]
    rows = {ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("| ")} - {"id"}
    assert rows == {c.id for c in REGISTRY}, rows ^ {c.id for c in REGISTRY}


def test_junit_carries_the_sweep_table_like_the_other_formats(tmp_path):
    from harness.report.model import CheckResult
    from harness.report.render import write_all
    run = Run("sweep-r")
    run.checks.append(CheckResult("SWEEP", "sweep", cells=[]))
    run.sections["sweep"] = {"rows": [{"pair": "turbo3/turbo3", "ppl": 12.5, "ppl_se": 0.25, "status": "ok"}],
                             "speed": []}
    write_all(run, tmp_path)
    for name in ("summary.md", "report.html", "junit.xml", "run.json"):
        assert "turbo3/turbo3" in (tmp_path / name).read_text() and "12.5" in (tmp_path / name).read_text(), name


def test_a_check_list_error_names_the_option_and_a_sweep_check_is_refused_everywhere(tmp_path, monkeypatch):
    """`--checks` with an unknown id says which option and the choices; SWEEP (another command's check) is refused in
    one line by verify, run_checks, replay and bisect before anything is built or written."""
    runner = CliRunner()
    r = runner.invoke(harness_cli(), ["verify", "--checks", "PQ1,PQ9", "--numpy-target", "", "--out", str(tmp_path / "v")])
    assert r.exit_code == 2 and "'--checks': 'PQ1,PQ9': unknown check PQ9; choose from PQ1" in r.output, r.output
    assert "(or leave it out for all)" in r.output and "SWEEP" not in r.output.split("choose from")[1]
    with pytest.raises(HarnessError, match="SWEEP runs through `turbo-harness sweep`"):
        run_checks(NumpyTarget(), ["PQ1", "SWEEP"], ["turbo3"], tmp_path / "rc", log=lambda s: None)
    assert not (tmp_path / "rc").exists()
    import harness.cli_replay as cr

    def no_build(*a, **k):
        raise AssertionError("a refused check list must not build anything")
    monkeypatch.setattr(cr, "history_dir", lambda *a: tmp_path)
    monkeypatch.setattr(cr, "resolve", lambda fork, rev: "a" * 40)
    monkeypatch.setattr(cr, "replay_commit", no_build)
    monkeypatch.setattr(cr, "run_bisect", no_build)
    for args in (["replay", "HEAD", "--checks", "PQ1,SWEEP"], ["bisect", "--good", "a", "--bad", "b", "--check", "sweep"]):
        r = runner.invoke(harness_cli(), args)
        assert r.exit_code == 2 and "SWEEP runs through `turbo-harness sweep`" in r.output, (args, r.output)
    r = runner.invoke(harness_cli(), ["replay", "HEAD", "--checks", "PQ7"])
    assert r.exit_code == 2 and "unknown check PQ7" in r.output
    assert cr._checks(None) == [c for c in REGISTRY.default_ids() if c != "COMPAT"]


def test_a_table_plot_is_embedded_when_in_the_run_folder_and_linked_otherwise(tmp_path):
    import base64

    from harness.report.html import table_html
    png = b"\x89PNG\r\n\x1a\n-not-really-a-png"
    (tmp_path / "evidence").mkdir()
    (tmp_path / "evidence" / "p.png").write_bytes(png)
    shown = table_html(Table("t", "K <norm> & 'V'", ["a"], [[1]], image="evidence/p.png"), tmp_path)
    assert f"src='data:image/png;base64,{base64.b64encode(png).decode()}'" in shown
    assert "alt='K &lt;norm&gt; &amp; &#x27;V&#x27;'" in shown and "<figcaption class=small>evidence/p.png<" in shown
    linked = table_html(Table("t", "T", ["a"], [[1]], image="evidence/missing.png"), tmp_path)
    assert "src='evidence/missing.png'" in linked and "base64" not in linked


def test_a_check_re_run_into_a_report_of_schema_1_0_keeps_the_coverage_rows_of_other_types(tmp_path):
    """Before tables, COMPAT's coverage was the section run.sections['coverage'] (rows as dicts); a re-run of COMPAT
    with fewer types into such a report replaces that section by its table and keeps the other types' rows."""
    from harness.pipeline import load_run
    d = tmp_path / "r"
    run_checks(NumpyTarget(), ["COMPAT"], ["turbo2", "turbo3"], d, log=lambda s: None)
    stored = json.loads((d / "run.json").read_text())
    cov = next(t for t in stored["checks"][0].pop("tables") if t["id"] == "coverage")
    stored["sections"]["coverage"] = {"rows": [dict(zip(cov["columns"], r), pair="x") for r in cov["rows"]],
                                      "markdown": "## Coverage (old)"}
    stored["schema_version"] = "1.0"
    (d / "run.json").write_text(json.dumps(stored))
    old_turbo3 = [r for r in cov["rows"] if r[1] == "turbo3"]
    assert old_turbo3
    run = run_checks(NumpyTarget(), ["COMPAT"], ["turbo2"], d, log=lambda s: None, run=load_run(d))
    table = next(t for t in run.checks[0].tables if t.id == "coverage")
    assert "coverage" not in run.sections
    assert [r for r in table.rows if r[1] == "turbo3"] == old_turbo3
    assert {r[1] for r in table.rows} == {"turbo2", "turbo3", "all"}
    assert len(table.rows) == len(cov["rows"]) and "## Coverage (old)" not in (d / "summary.md").read_text()


def test_verify_help_does_not_promise_every_check_by_default():
    """`verify --help` said '--checks ... (default all)' and named only MODEL as opt-in, while the default leaves
    out every opt-in check (MODEL, KVREAL): the help must not say 'all' and must name each opt-in check's way in."""
    r = CliRunner().invoke(harness_cli(), ["verify", "--help"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "check ids (default all)" not in text and "opt-in" in text
    for c in REGISTRY:
        if c.command == "verify" and not c.in_verify:
            assert c.id in text, c.id
