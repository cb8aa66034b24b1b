"""Keeping a site's credentials out of everything the site sends.

The site's secrets are the values its config took from the site's environment
(``${env:NAME}``, except in ``url`` fields, which the catalog publishes) and
every string under a credential-like key (``key``, ``secret``, ``token``,
``password``, ...) inside any ``storage_options`` or a database's ``connect_args`` or a service's ``headers``, and database passwords. :class:`Redactor` replaces
them, and their URL- and JSON-escaped forms, in error messages, log lines,
progress messages, result summaries and catalog entries, and tells the export
gate when a result's bytes contain one. Values shorter than
:data:`MIN_SECRET_LENGTH` characters are not redacted: they would match
ordinary text, and a credential that short protects nothing.

Masking always comes before cutting (a secret straddling a cut would no longer
match whole). As a second line, a text that *ends* with the start of a secret,
or *starts* with the end of one (at least :data:`MIN_SECRET_LENGTH` characters
of it), has that piece masked too: that is what a secret cut by someone else
upstream looks like.

Example:

```python
redactor = Redactor.for_config(config)
redactor.text("auth failed for token s3cr3t-value")   # 'auth failed for token [redacted]'
```
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, quote_plus

from dfm_prefect.core.wire import (
    Described,
    ErrorInfo,
    ErrorReply,
    LogLine,
    ProgressUpdate,
    RunResult,
    SiteMessage,
    SourceInfo,
    StreamItem,
)
from site_workers.answers import wire_text
from site_workers.config import SiteConfig

MIN_SECRET_LENGTH = 6
MASK = "[redacted]"
_SECRET_KEY = re.compile(r"key|secret|token|passw|credential|auth|session|private|signature|sas", re.IGNORECASE)
_ERROR_LIMIT = 8192
_LOG_LIMIT = 8192
_PROGRESS_LIMIT = 512


def _under_secret_keys(value: Any, secret: bool = False) -> Iterator[str]:
    if isinstance(value, str):
        if secret:
            yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _under_secret_keys(item, secret or bool(_SECRET_KEY.search(str(key))))
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _under_secret_keys(item, secret)


def config_secrets(config: SiteConfig) -> set[str]:
    """Every credential the config holds (see the module docstring)."""
    found = set(config.env_secrets)
    for section in (*config.sources, *config.data_roots, config.result_store):
        found.update(_under_secret_keys(section.storage_options))
    for db in config.databases:  # a password written in the file is as secret as one read from the environment
        found.update(value for value in (db.password,) if value)
        found.update(_under_secret_keys(db.connect_args))
    for service in config.services:
        found.update(_under_secret_keys(service.headers))
    return found


class Redactor:
    """Masks a fixed set of secret values in outgoing text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
                continue
            forms.update({secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1], repr(secret)[1:-1]})
        ordered = sorted((form for form in forms if len(form) >= MIN_SECRET_LENGTH), key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._bytes = [form.encode("utf-8", "surrogatepass") for form in ordered]
        # Pieces of a secret that a cut leaves at the end (its starts) or the start (its ends) of a text.
        self._heads = {form[:n] for form in ordered for n in range(MIN_SECRET_LENGTH, len(form))}
        self._tails = {form[-n:] for form in ordered for n in range(MIN_SECRET_LENGTH, len(form))}
        self._longest = max(map(len, ordered), default=0)

    @classmethod
    def for_config(cls, config: SiteConfig) -> Redactor:
        return cls(config_secrets(config))

    @property
    def active(self) -> bool:
        """True when the site has secrets to keep in."""
        return self._pattern is not None

    def text(self, text: str, limit: int | None = None) -> str:
        """``text`` with every secret masked, then made JSON-safe and cut to ``limit`` characters.

        Masks first, cuts second, then masks what a cut left of a secret at either edge.
        """
        if self._pattern is None:
            return wire_text(text, limit)
        text = self._edges(wire_text(self._pattern.sub(MASK, text)))
        if limit is not None and len(text) > limit:
            text = self._edges(text[:limit])
            if len(text) > limit:  # the mask is longer than the piece it replaced
                text = text[: limit - len(MASK)] + MASK
        return text

    def _edges(self, text: str) -> str:
        """``text`` with a piece of a secret at its end or its start masked (what a cut leaves)."""
        for n in range(min(self._longest, len(text)), MIN_SECRET_LENGTH - 1, -1):
            if text[-n:] in self._heads:
                text = text[:-n] + MASK
                break
        for n in range(min(self._longest, len(text)), MIN_SECRET_LENGTH - 1, -1):
            if text[:n] in self._tails:
                text = MASK + text[n:]
                break
        return text

    def value(self, value: Any) -> Any:
        """A JSON-like value with every string (keys included) masked."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(key)): self.value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value

    def found_in(self, data: bytes) -> bool:
        """True if ``data`` contains a secret (the export gate refuses such results)."""
        return any(form in data for form in self._bytes)

    # ------------------------------------------------------------- messages

    def _error(self, error: ErrorInfo | None) -> ErrorInfo | None:
        if error is None:
            return None
        return error.model_copy(update={"message": self.text(error.message, _ERROR_LIMIT)})

    def _log(self, line: LogLine) -> LogLine:
        return line.model_copy(update={"message": self.text(line.message, _LOG_LIMIT)})

    def _source(self, source: SourceInfo) -> SourceInfo:
        return source.model_copy(update={"url": self.text(source.url), "summary": self.value(source.summary)})

    def message(self, message: SiteMessage) -> SiteMessage:
        """The message as it may leave the site: secrets masked in every free-text field."""
        if isinstance(message, RunResult):
            update: dict[str, Any] = {"error": self._error(message.error), "logs": [self._log(line) for line in message.logs]}
            if message.ref is not None:
                update["ref"] = message.ref.model_copy(update={"summary": self.value(message.ref.summary)})
            return message.model_copy(update=update)
        if isinstance(message, StreamItem):
            return message.model_copy(update={"ref": message.ref.model_copy(update={"summary": self.value(message.ref.summary)})})
        if isinstance(message, ErrorReply):
            return message.model_copy(update={"error": self._error(message.error)})
        if isinstance(message, ProgressUpdate):
            return message.model_copy(update={"message": self.text(message.message, _PROGRESS_LIMIT)})
        if isinstance(message, Described):
            info = message.info.model_copy(update={"sources": [self._source(s) for s in message.info.sources]})
            return message.model_copy(update={"info": info})
        return message
