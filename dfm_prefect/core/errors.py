"""Exceptions raised to flow authors and site administrators.

Every error that crosses the wire travels as an :class:`~dfm_prefect.core.wire.ErrorInfo`
(a stable ``code`` and a message) and is turned back into one of these classes on
the client by :func:`from_error_info`. Nothing is unpickled: the code selects the
class from :data:`ERROR_CODES`, the message is plain text.
"""

from __future__ import annotations


class FederationError(Exception):
    """Base class of every dfm-prefect error."""

    code = "federation_error"

    def __init__(self, message: str, *, site: str | None = None) -> None:
        super().__init__(message)
        self.site = site

    def __str__(self) -> str:
        message = super().__str__()
        if self.site and f"site {self.site!r}" not in message:
            return f"site {self.site!r}: {message}"
        return message

    def __repr__(self) -> str:
        # Prefect logs a failed task run's exception with repr(): it must name the site as str() does.
        return f"{type(self).__name__}({str(self)!r})"


class ConfigError(FederationError):
    """A site config, federation file or runner setting is invalid."""

    code = "config_error"


class UnknownOperationError(FederationError):
    """The site does not offer the requested operation (or that version of it)."""

    code = "unknown_operation"


class InvalidParametersError(FederationError):
    """The operation's parameters failed validation; nothing was run."""

    code = "invalid_parameters"


class AccessDeniedError(FederationError):
    """A path, URL or reference points outside what the site allows."""

    code = "access_denied"


class AuthenticationError(AccessDeniedError):
    """A request's signature, certificate or freshness does not hold, or a signature the site requires is missing."""

    code = "unauthenticated"


class ExportRefusedError(FederationError):
    """The site's export policy does not let this result leave the site."""

    code = "export_refused"


class DisclosureRefusedError(ExportRefusedError):
    """The site's disclosure rules refuse a result: a group or selection is smaller than its minimum."""

    code = "disclosure_refused"


class OperationFailedError(FederationError):
    """The operation ran at the site and raised."""

    code = "operation_failed"


class SiteUnavailableError(FederationError):
    """The site cannot be reached, or died while running the request."""

    code = "site_unavailable"


class SiteOverloadedError(FederationError):
    """The site's queue is full; the request was not accepted."""

    code = "site_overloaded"


class ResultIntegrityError(FederationError):
    """A stored result is missing or does not match its recorded sha256."""

    code = "result_integrity"


class SourceChangedError(ResultIntegrityError):
    """A view's data source changed since the view was made, so recomputing it would give other numbers."""

    code = "source_changed"


class ResultExpiredError(ResultIntegrityError):
    """A stored result was removed by the site's retention (its age or store quota); run its operation again."""

    code = "result_expired"


class StoreFullError(FederationError):
    """The site's result store is at its byte limit (for all results or for this client); nothing was stored."""

    code = "store_full"


class RequestCancelledError(FederationError):
    """The request was cancelled before it finished."""

    code = "cancelled"


class RequestTimeoutError(FederationError, TimeoutError):
    """The request ran past its ``timeout_s`` and the site stopped it (also a built-in `TimeoutError`)."""

    code = "timeout"


class StreamStalledError(FederationError):
    """A streaming operation's client took no item for too long; the site stopped the stream."""

    code = "stream_stalled"


class MalformedRequestError(FederationError):
    """A message could not be decoded or does not follow the wire schema."""

    code = "malformed_request"


class PlacementError(FederationError):
    """No site can run the operation with the given inputs."""

    code = "placement_error"


ERROR_CODES: dict[str, type[FederationError]] = {
    cls.code: cls
    for cls in (
        FederationError,
        ConfigError,
        UnknownOperationError,
        InvalidParametersError,
        AccessDeniedError,
        AuthenticationError,
        ExportRefusedError,
        DisclosureRefusedError,
        OperationFailedError,
        SiteUnavailableError,
        SiteOverloadedError,
        ResultIntegrityError,
        SourceChangedError,
        ResultExpiredError,
        StoreFullError,
        RequestCancelledError,
        RequestTimeoutError,
        StreamStalledError,
        MalformedRequestError,
        PlacementError,
    )
}


def error_class(code: str) -> type[FederationError]:
    """Return the exception class for a wire error code (the base class if unknown)."""
    return ERROR_CODES.get(code, FederationError)
