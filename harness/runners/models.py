"""Models as data: the real models the harness knows by name (``checks/models.toml``) and how to get their GGUF.

``--model NAME`` picks a known model (``smollm2``, ``gemma3``); anything else is taken as a path to a GGUF file.
A model shipped as one file inside a PyPI package is used in place; one shipped as chunk packages is assembled once
into the model cache (``$TURBO_MODEL_CACHE``, else ``.cache/models`` of the harness checkout) by the package's own
``assemble()``, and its SHA-256 is checked against the catalogue.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError

REPO_ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = REPO_ROOT / "checks" / "models.toml"
DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class KnownModel:
    """One entry of checks/models.toml (see the file's header for the fields)."""

    name: str
    title: str
    package: str
    module: str
    pip: str
    source: str
    file: str
    make: str
    reason: str
    sha256: str | None = None


def known_models() -> dict[str, KnownModel]:
    """{name: KnownModel} from checks/models.toml, in file order."""
    data = tomllib.loads(CATALOGUE.read_text())
    return {m["name"]: KnownModel(**m) for m in data.get("model", [])}


def model_cache() -> Path:
    """Folder for assembled models: $TURBO_MODEL_CACHE, else .cache/models of the harness checkout."""
    return Path(os.environ.get("TURBO_MODEL_CACHE") or (REPO_ROOT / ".cache" / "models"))


def _not_installed(m: KnownModel) -> HarnessError:
    return HarnessError(f"model {m.name!r} ({m.title}) is not installed: run `make {m.make}` (or `{m.pip}`), "
                        f"or pass --model PATH.gguf")


def model_path(m: KnownModel) -> Path:
    """The GGUF of a known model, assembling it into :func:`model_cache` when it comes in chunks.

    Raises:
        HarnessError: package not installed (names the make target and pip command), no GGUF in it, or an
            assembled file whose SHA-256 differs from the catalogue's.
    """
    spec = importlib.util.find_spec(m.module)
    if spec is None:
        raise _not_installed(m)
    if m.source == "file":
        for loc in spec.submodule_search_locations or []:
            p = Path(loc) / m.file
            if p.is_file():
                return p
            found = sorted(Path(loc).glob("*.gguf"))
            if found:
                return found[0]
        raise HarnessError(f"package {m.package} holds no .gguf file: reinstall it (`{m.pip} --force-reinstall`) or pass --model")
    if m.source == "assemble":
        out = model_cache() / m.file
        if not out.is_file():
            mod = importlib.import_module(m.module)
            # assembled under a name of this process and renamed when complete: another process (a parallel test
            # worker, a second command) never finds a half-written model at ``out``
            part = out.with_name(f".{out.name}.{os.getpid()}.part")
            try:
                os.replace(Path(mod.assemble(part)), out)
            except (OSError, ValueError) as e:  # a missing chunk package or a bad checksum, in the package's words
                raise HarnessError(f"could not assemble model {m.name!r} into {out}: {e}; reinstall with `{m.pip}`") from None
            finally:
                part.unlink(missing_ok=True)
        if m.sha256:
            from harness.runners.inputs import sha256_file
            got = sha256_file(out)
            if got != m.sha256:
                raise HarnessError(f"model {out} has SHA-256 {got[:16]}..., expected {m.sha256[:16]}... ({m.name}): delete "
                                   f"it and rerun to assemble it again")
        return out
    raise HarnessError(f"checks/models.toml: model {m.name!r} has unknown source {m.source!r} (use 'file' or 'assemble')")


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A GGUF path for ``--model``: a known model's name (default :data:`DEFAULT_MODEL`) or a file path.

    Raises:
        HarnessError: an unknown name that is not an existing file (lists the known names), or see :func:`model_path`.
    """
    known = known_models()
    name = str(spec) if spec is not None else DEFAULT_MODEL
    if name in known:
        return model_path(known[name])
    p = Path(name).expanduser()
    if p.is_file():
        return p
    raise HarnessError(f"--model {name} does not exist and is not a known model: give a GGUF path or one of "
                       f"{', '.join(known)}")


def model_name_of(path: Path) -> str | None:
    """The catalogue name of a GGUF path when it is a known model's file, else None."""
    for m in known_models().values():
        if Path(path).name == m.file:
            return m.name
    return None
