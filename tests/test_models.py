"""Models as data (checks/models.toml): names resolve to GGUF files, with one-line errors naming the fix."""
from __future__ import annotations

import sys
import types

import pytest
from conftest import skip_or_fail

from harness.errors import HarnessError
from harness.runners import models
from harness.runners.models import KnownModel, known_models, resolve_model


def test_catalogue_has_both_real_models_with_install_hints():
    known = known_models()
    assert {"smollm2", "gemma3"} <= set(known)
    for m in known.values():
        assert m.pip.startswith("pip install") and m.make.startswith(".venv/") and m.reason
    assert known["gemma3"].source == "assemble" and len(known["gemma3"].sha256) == 64


def test_unknown_name_lists_known_models(tmp_path):
    with pytest.raises(HarnessError, match="not a known model: give a GGUF path or one of smollm2, gemma3"):
        resolve_model("llama-70b")


def test_a_path_is_taken_as_is(tmp_path):
    p = tmp_path / "my.gguf"
    p.write_bytes(b"GGUF")
    assert resolve_model(str(p)) == p


def _fake(monkeypatch, tmp_path, **kw):
    m = KnownModel(name="fake", title="Fake 1M", package="fake-pkg", module="fake_model_pkg_xyz", pip="pip install fake-pkg",
                   source=kw.pop("source", "assemble"), file="fake.gguf", make=".venv/.model-fake", reason="test", **kw)
    monkeypatch.setattr(models, "known_models", lambda: {"fake": m})
    monkeypatch.setenv("TURBO_MODEL_CACHE", str(tmp_path / "models"))
    return m


def test_package_not_installed_names_make_target_and_pip(monkeypatch, tmp_path):
    _fake(monkeypatch, tmp_path)
    with pytest.raises(HarnessError) as e:
        resolve_model("fake")
    assert "make .venv/.model-fake" in str(e.value) and "pip install fake-pkg" in str(e.value)


def test_assembled_model_is_hash_checked(monkeypatch, tmp_path):
    import hashlib
    payload = b"GGUF fake model bytes"
    mod = types.ModuleType("fake_model_pkg_xyz")
    mod.__path__ = []  # a package, so find_spec finds it

    def assemble(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(payload)
        return out
    mod.assemble = assemble
    monkeypatch.setitem(sys.modules, "fake_model_pkg_xyz", mod)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: types.SimpleNamespace(submodule_search_locations=[]))
    _fake(monkeypatch, tmp_path, sha256=hashlib.sha256(payload).hexdigest())
    out = resolve_model("fake")
    assert out == tmp_path / "models" / "fake.gguf" and out.read_bytes() == payload
    _fake(monkeypatch, tmp_path, sha256="0" * 64)
    with pytest.raises(HarnessError, match="expected 0000000000000000... .*delete it and rerun"):
        resolve_model("fake")


@pytest.mark.fork
@pytest.mark.slow
def test_real_gemma3_shape_from_header():
    """Gemma 3 270M, when installed: head_dim 256, GQA 4, sliding window 512, 32k trained context (from the GGUF)."""
    from harness.runners.inputs import read_model_info
    try:
        path = resolve_model("gemma3")
    except HarnessError as e:
        skip_or_fail(f"gemma3 not installed: {e}")
    mi = read_model_info(path)
    assert (mi.arch, mi.head_dim_k, mi.n_head, mi.n_head_kv) == ("gemma3", 256, 4, 1)
    assert mi.sliding_window == 512 and mi.n_ctx_train == 32768
