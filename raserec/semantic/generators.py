"""The LLM step, pluggable: turn a prompt (an item's or a user's template text) into the text
that gets embedded.

- ``template``: no LLM; the prompt's own text (the papers' "w/o LLM" ablation; label runs so).
- ``precomputed``: responses from a JSON-lines file ``{"key": ..., "text": ...}`` (keys: item ids
  as strings); a key without a response falls back to the template text, counted in the log.
- ``openai_compatible``: a chat-completions endpoint (a user's vLLM / llama.cpp server or an
  API): base URL + model, temperature 0, retries.

Every generated text of a generator that does real work (``needs_cache``) goes through
:func:`generate_cached`: a JSON-lines cache keyed by sha256 of (generator identity, prompt),
appended as responses arrive, so an interrupted run resumes and a changed prompt or generator never
reuses a stale text. Each cached line carries a digest of its key and text: a line edited by hand
is refused, a line cut by an interrupted write is asked for again. ``template`` and
``precomputed`` are lookups, not cached (a precomputed response belongs to an item key, not to a
prompt: two items with the same template text may have different responses).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from raserec.errors import ConfigError, DataError
from raserec.outputs import replacing

log = logging.getLogger(__name__)

#: System message of the item and user prompts (SRA-CL's, shortened; the template text follows).
SYSTEM_PROMPT = ("You are a recommendation expert. Describe the item (or summarise the user's preferences "
                 "from their purchases, in order) in one short paragraph.")


class TextGenerator(Protocol):
    needs_cache: bool
    """Whether responses are worth caching (an LLM call) or a cheap lookup (template, file)."""

    def identity(self) -> dict[str, object]:
        """What determines the outputs (the cache key)."""
        ...

    def generate(self, keys: Sequence[str], prompts: Sequence[str]) -> list[str]: ...


class TemplateGenerator:
    """No LLM: the text is the prompt itself (the item's fields rendered as text)."""

    needs_cache = False

    def identity(self) -> dict[str, object]:
        return {"name": "template"}

    def generate(self, keys: Sequence[str], prompts: Sequence[str]) -> list[str]:
        return list(prompts)


class PrecomputedGenerator:
    """Responses read from a JSON-lines file of ``{"key": str, "text": str}`` objects.

    Args:
        path: the file; its sha256 is part of the generator's identity.
    """

    needs_cache = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such precomputed-response file")
        self.responses: dict[str, str] = {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.path}: not a UTF-8 text file (byte {exc.start})") from exc
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.responses[str(record["key"])] = str(record["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{self.path}:{number}: not a {{\"key\", \"text\"}} JSON object ({exc})") from exc
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def identity(self) -> dict[str, object]:
        return {"name": "precomputed", "file_sha256": self.sha256}

    def generate(self, keys: Sequence[str], prompts: Sequence[str]) -> list[str]:
        out = [self.responses.get(str(k)) for k in keys]
        missing = sum(t is None for t in out)
        if missing:
            log.warning("%s: %d of %d keys have no response; they keep their template text", self.path, missing,
                        len(keys))
        return [p if t is None else t for t, p in zip(out, prompts, strict=True)]


class OpenAICompatibleGenerator:
    """A chat-completions endpoint (``POST {base_url}/chat/completions``), temperature 0.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model's name.
        api_key_env: environment variable holding the API key (not stored anywhere).
        temperature: sampling temperature (0: greedy, as the papers).
        top_p: nucleus mass (SRA-CL's scripts: 0.001).
        max_tokens: response length limit.
        retries: attempts per prompt before the run stops with an error (a failed call is never
            cached).
        timeout_s: per-request timeout.
    """

    needs_cache = True

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.0,
                 top_p: float = 0.001, max_tokens: int = 200, retries: int = 3, timeout_s: float = 60.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.retries = max(1, retries)
        self.timeout_s = timeout_s

    def identity(self) -> dict[str, object]:
        # The URL is not part of it: the same model served elsewhere gives the same texts.
        return {"name": "openai_compatible", "model": self.model, "temperature": self.temperature,
                "top_p": self.top_p, "max_tokens": self.max_tokens, "system": SYSTEM_PROMPT}

    def _complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": self.temperature, "top_p": self.top_p,
                           "max_tokens": self.max_tokens,
                           "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        error: Exception | None = None
        for attempt in range(self.retries):
            try:
                request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers)
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read())
                text = payload["choices"][0]["message"]["content"]
                if not isinstance(text, str):
                    raise ValueError("the response has no text content")
                return text
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
                error = exc
                time.sleep(min(2.0 ** attempt * 0.1, 5.0))
        raise DataError(f"{self.base_url}: no usable response after {self.retries} attempt(s) ({error})")

    def generate(self, keys: Sequence[str], prompts: Sequence[str]) -> list[str]:
        return [self._complete(p) for p in prompts]


def make_generator(name: str, path: str | None = None, base_url: str | None = None,
                   model: str | None = None) -> TextGenerator:
    """The generator called ``name`` (``template``, ``precomputed`` needs ``path``,
    ``openai_compatible`` needs ``base_url`` and ``model``)."""
    if name == "template":
        return TemplateGenerator()
    if name == "precomputed":
        if not path:
            raise ConfigError("generator 'precomputed' needs a responses file (generator_path)")
        return PrecomputedGenerator(path)
    if name == "openai_compatible":
        if not base_url or not model:
            raise ConfigError("generator 'openai_compatible' needs base_url and llm_model")
        return OpenAICompatibleGenerator(base_url, model)
    raise ConfigError(f"unknown generator {name!r}; choose template, precomputed or openai_compatible")


def _text_key(identity: dict[str, object], prompt: str) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode() + b"\x00" + prompt.encode()).hexdigest()


def _line_digest(key: str, text: str) -> str:
    return hashlib.sha256(key.encode() + b"\x00" + text.encode()).hexdigest()[:16]


def _cache_line(key: str, text: str) -> str:
    """One line of a text cache: the key, the text and their digest."""
    return json.dumps({"k": key, "text": text, "sha": _line_digest(key, text)}) + "\n"


def _read_text_cache(path: Path) -> dict[str, str]:
    """The cached texts of ``path``. The last line, if cut by an interrupted write, is dropped from
    the file (its response is asked for again); any other unreadable line, or a line whose digest
    does not match its text, is refused. Lines written before digests existed (no ``sha``) are
    accepted and the file is rewritten with digests (never paid for again)."""
    known: dict[str, str] = {}
    lines = path.read_text().splitlines()
    legacy, cut = 0, False
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            key, text = record["k"], record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines):
                cut = True
                continue
            raise DataError(f"{path}:{number}: not a cached text (corrupt file); delete it to generate the texts "
                            "again") from None
        digest = record.get("sha")
        if not (isinstance(key, str) and isinstance(text, str)) or (
                digest is not None and digest != _line_digest(key, text)):
            raise DataError(f"{path}:{number}: a cached text that does not match its digest (edited?); "
                            "delete the file to generate the texts again")
        legacy += digest is None
        known[key] = text
    if legacy:
        log.warning("%s: %d cached texts without a digest (an older cache); rewritten with digests", path, legacy)
    if legacy or cut:
        _write_text_cache(path, known)
    return known


def _write_text_cache(path: Path, known: dict[str, str]) -> None:
    with replacing(path) as tmp, tmp.open("w") as out:
        out.writelines(_cache_line(key, text) for key, text in known.items())


def generate_cached(generator: TextGenerator, keys: Sequence[str], prompts: Sequence[str],
                    cache_dir: str | Path | None, progress: bool = False, chunk: int = 32) -> list[str]:
    """``generator.generate(keys, prompts)``, each response cached under sha256(identity, prompt) in
    ``cache_dir/texts-<generator>.jsonl`` (appended chunk by chunk, so a stopped run resumes).
    Lookup generators (``needs_cache`` false) are called directly."""
    if len(keys) != len(prompts):
        raise ValueError("keys and prompts differ in length")
    identity = generator.identity()
    if not getattr(generator, "needs_cache", True) or cache_dir is None:
        return generator.generate(keys, prompts)
    tag = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"texts-{identity['name']}-{tag}.jsonl"
    known = _read_text_cache(path) if path.is_file() else {}
    text_keys = [_text_key(identity, p) for p in prompts]
    todo = [i for i, k in enumerate(text_keys) if k not in known]
    if todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            for start in tqdm(range(0, len(todo), chunk), desc=f"generate ({identity['name']})", unit="chunk",
                              disable=not progress, leave=False):
                rows = todo[start:start + chunk]
                texts = generator.generate([keys[i] for i in rows], [prompts[i] for i in rows])
                for i, text in zip(rows, texts, strict=True):
                    known[text_keys[i]] = text
                    out.write(_cache_line(text_keys[i], text))
                out.flush()
    return [known[k] for k in text_keys]
