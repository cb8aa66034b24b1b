"""How a site words what it sends back about a request: errors, validation problems, request ids.

Everything here keeps to one rule: an answer may say what went wrong and what
to do, but must not echo the data or the credentials it was handling. Free
text passes through the site's :class:`~site_workers.redaction.Redactor` later,
on its way out; this module decides what the text says in the first place.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import ValidationError

from dfm_prefect.core.errors import FederationError, OperationFailedError
from dfm_prefect.core.operations import Operation
from dfm_prefect.core.refs import DataRef
from dfm_prefect.core.wire import ErrorInfo, ExportInfo, OperationInfo, SiteInfo, SiteLoad, SiteRule, SourceInfo
from site_workers.config import ExportPolicy, ImportPolicy

log = logging.getLogger("dfm_prefect.site")
MAX_ERROR = 8192


def wire_text(text: str, limit: int | None = None) -> str:
    """``text`` made sendable: lone surrogates (from file names that are not UTF-8) replaced, cut to ``limit``.

    The wire models refuse such strings, and an answer that cannot be built is an
    answer the client never gets.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text if limit is None else text[:limit]


def error_info(
    exc: BaseException,
    detail: Literal["message", "type"] = "message",
    site: str = "",
    redact: Callable[[str], str] = str,
) -> ErrorInfo:
    """The wire form of an error.

    A `FederationError` is the site's own wording and travels as it is. Any other
    exception comes from an operation or a library and its message may quote the
    data; with ``detail="type"`` only its type leaves, and the full message goes
    to the site's log (through ``redact``) under an incident id that the site's
    administrator can look up. Text is masked by ``redact`` before it is cut: a
    credential straddling the cut would otherwise leave minus its last characters.
    """
    if isinstance(exc, FederationError):
        return ErrorInfo(code=exc.code, message=wire_text(redact(str(exc)), MAX_ERROR))
    if detail == "type":
        incident = uuid.uuid4().hex[:12]
        log.warning("incident %s: %s: %s", incident, type(exc).__name__, wire_text(redact(str(exc))))
        message = (
            f"site {site!r}: the operation failed with {type(exc).__name__}; this site does not send error "
            f"details (its export policy has error_detail: type); its administrator can look up incident {incident}"
        )
        return ErrorInfo(code=OperationFailedError.code, message=message)
    return ErrorInfo(code=OperationFailedError.code, message=wire_text(redact(f"{type(exc).__name__}: {exc}"), MAX_ERROR))


def validation_message(exc: ValidationError) -> str:
    """Where and why the input is invalid, never the input itself (it could hold data or secrets)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or '(top)'}: {error['msg']}" for error in exc.errors()[:20]
    )


def wire_safe_id(candidate: Any) -> str | None:
    """``candidate`` if it can be sent back as a request id (a short string that encodes as UTF-8)."""
    if not isinstance(candidate, str) or not 1 <= len(candidate) <= 64:
        return None
    try:
        candidate.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: the reply frame could not be encoded
        return None
    return candidate


def guess_id(frame: bytes | str) -> str | None:
    """Best effort: the id of a single-message frame that failed to decode, so the client can match the error."""
    try:
        data = json.loads(frame)
    except (ValueError, TypeError, RecursionError):
        return None
    messages = data.get("messages") if isinstance(data, dict) else None
    if isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], dict):
        return wire_safe_id(messages[0].get("id"))
    return None


def refs_in(value: Any) -> list[DataRef]:
    """Every `DataRef` inside a validated parameter value."""
    if isinstance(value, DataRef):
        return [value]
    if isinstance(value, (list, tuple)):
        return [ref for item in value for ref in refs_in(item)]
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in refs_in(item)]
    return []


def site_info(
    name: str,
    operations: dict[str, Operation],
    sources: list[SourceInfo],
    export: ExportPolicy,
    load: SiteLoad,
    compute: str,
    imports: ImportPolicy | None = None,
) -> SiteInfo:
    """What a site says about itself: operations with parameter schemas, sources, export policy, load."""
    return SiteInfo(
        name=name,
        operations={
            op_name: OperationInfo(
                name=op_name,
                version=op.version,
                result_kind=op.result_kind,
                description=op.description.split("\n\n")[0],
                params_schema=op.params.model_json_schema(),
                stream=op.stream,
            )
            for op_name, op in operations.items()
        },
        sources=sources,
        export=ExportInfo(
            kinds=list(export.kinds),
            max_bytes=export.max_bytes,
            inline_bytes=export.inline_bytes,
            share_logs=export.share_logs,
            min_group_size=export.disclosure.min_group_size,
            min_subset_size=export.disclosure.min_subset_size,
            sites={site: SiteRule(kinds=list(rule.kinds), max_bytes=rule.max_bytes) for site, rule in export.sites.items()},
            imports={site: SiteRule(kinds=list(rule.kinds), max_bytes=rule.max_bytes) for site, rule in (imports.sites if imports else {}).items()},
        ),
        load=load,
        compute=compute,
    )
