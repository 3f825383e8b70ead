"""Facts of a run as text, shared by every renderer (Markdown, HTML, JUnit, diff, scorecard): number and value
formatting, what was measured and with what (fork, build, model, corpus, sizes). Depends on the run model only,
so that the renderers above it import it without importing each other."""
from __future__ import annotations

import math
from pathlib import Path

from harness.report.model import Run


def fmt_num(v) -> str:
    """Compact number formatting for tables ('-' for None)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int,)) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return str(int(v))
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.3g}" if (abs(v) >= 1e-3 and abs(v) < 1e4) else f"{v:.2e}"
    return str(v)


def plain(v) -> str:
    """A metadata value as a reader wants it: lists joined, dicts as 'k: v; ...', None as '-', bools yes/no."""
    if v is None or v == "" or v == [] or v == {}:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(plain(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k}: {plain(x)}" for k, x in v.items())
    if isinstance(v, float):
        return fmt_num(v)
    return str(v)


def shaders_fact(shaders: dict | None) -> str:
    """'; 1234 shader variants; built for a software device: coopmat/... shaders not compiled (...)' from the build
    record's ``vulkan.shaders`` (:func:`harness.fork.vulkan.shader_plan`); '' for a record without it."""
    if not shaders:
        return ""
    n = (shaders.get("variants") or {}).get("total")
    return (f"; {n} shader variants" if n else "") + (f"; {shaders['note']}" if shaders.get("note") else "")


def run_facts(run: Run) -> list[tuple[str, str]]:
    """(label, text) pairs describing what was measured and with what (fork, build, model, corpus, sizes)."""
    m = run.meta
    commit = m.get("fork_commit") or "?"
    dirty = {True: " (dirty)", False: "", None: " (dirty state unknown)"}.get(m.get("fork_dirty"), "")
    desc = str(m.get("fork_describe") or "")
    if desc.split(" ", 1)[0] and commit.startswith(desc.split(" ", 1)[0]):
        desc = desc.split(" ", 1)[1] if " " in desc else ""  # 'abc1234 subject': the commit is already shown
    cmake = m.get("cmake_options")
    cmake = " ".join(cmake) if isinstance(cmake, (list, tuple)) else (f"CMake cache sha256 {cmake}" if cmake else "")
    if m.get("fork_dirty") and m.get("fork_diff_sha256"):
        dirty = f" (dirty, diff sha256 {m['fork_diff_sha256'][:12]})"
    facts = [("fork", f"{commit}{dirty}{' - ' + desc if desc else ''}"), ("provenance", m.get("provenance_note")),
             ("layouts the reference does not know", "; ".join(m.get("layout_notes") or []) or None),
             ("fork dir", m.get("fork_dir")), ("target backend", m.get("target_backend"))]
    if "backends_run" in m:
        facts += [("backends run", plain(m.get("backends_run"))),
                  ("backends not available here", plain(m.get("backends_not_available")))]
        vk = m.get("vulkan") or {}
        vk_run = (m.get("target") or {}).get("vulkan") or {}
        if vk or vk_run:
            facts.append(("Vulkan", f"headers {vk.get('headers', '?')} ({vk.get('headers_source', '?')}); "
                                    f"glslc {vk.get('glslc', '?')}; driver {vk_run.get('driver') or vk.get('driver', '?')}"
                                    + (f"; {vk_run['visible_devices']}" if vk_run.get("visible_devices") else "")
                                    + shaders_fact(vk.get("shaders"))))
        from harness.report.remote import remote_facts
        facts += remote_facts(m)  # remote devices (--rpc): where they are, what they are, what happened to them
    if "types" in m:
        facts.append(("types", plain(m.get("types"))))
    sweep = run.sections.get("sweep")
    if isinstance(sweep, dict):
        pin = sweep.get("pinned") or m.get("pinned") or {}
        mi = sweep.get("model") or m.get("model_info") or {}
        facts += [("model", f"{mi.get('name') or '-'} ({m.get('model', '-')}, sha256 {str(m.get('model_sha256', '-'))[:16]})"),
                  ("corpus", f"{m.get('corpus', '-')} (sha256 {str(m.get('corpus_sha256', '-'))[:16]})"),
                  ("sizes", f"ctx {pin.get('ctx', '-')} tokens x {pin.get('chunks', '-')} chunks; batch {pin.get('batch', '-')}, "
                            f"ubatch {pin.get('ubatch', '-')}; threads {pin.get('threads', '-')}; ngl {pin.get('ngl', '-')}; "
                            + (f"bench depths {plain(pin.get('depths'))}" if sweep.get("speed") else "no speed bench"))]
    facts += [("build", f"{m.get('build_dir', '-')}{'; ' + cmake if cmake else ''}"),
              ("compiler", m.get("cxx_compiler") or m.get("compiler")), ("GPU / driver", m.get("gpu") or "none"),
              ("harness", f"{m.get('harness_version')} - `{m.get('command_line', '')}`"), ("started", m.get("started"))]
    return [(k, plain(v)) for k, v in facts if v not in (None, "")]


def sweep_setup_line(run: Run) -> str:
    """'Measured on <model> with <corpus>, ctx N x M chunks' for a sweep run ('' otherwise)."""
    sweep = run.sections.get("sweep")
    if not isinstance(sweep, dict):
        return ""
    m = run.meta
    pin = sweep.get("pinned") or {}
    mi = sweep.get("model") or {}
    return (f"Measured on model {mi.get('name') or Path(str(m.get('model', '-'))).name} "
            f"({Path(str(m.get('model', '-'))).name}) with corpus {Path(str(m.get('corpus', '-'))).name}, "
            f"ctx {pin.get('ctx', '-')} tokens x {pin.get('chunks', '-')} chunks, backend {pin.get('backend', '-')}.")
