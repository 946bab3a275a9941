"""Why the service refuses a request, below the API: every wing raises these, and only
`api/errors.py` turns them into HTTP (a status per class, the one error shape), so serving,
storage and jobs never import the web framework.

Each carries `code`, the stable machine-readable reason clients branch on, and a message that
names the problem.
"""


class ServiceError(Exception):
    """A refused request: `code` says why, the message says what."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Invalid(ServiceError):
    """The request is well-formed but its content is wrong (422)."""


class TooLarge(ServiceError):
    """Over a documented limit (413)."""


class NotFound(ServiceError, LookupError):
    """An id or name that the service does not hold (404, code `<kind>_not_found`)."""

    def __init__(self, kind: str, name: str):
        super().__init__(f"{kind}_not_found", f"unknown {kind} {name!r}")
        self.kind = kind


class Conflict(ServiceError):
    """Contradicts what is stored: a name taken, another model (409)."""

    def __init__(self, message: str, code: str = "conflict"):
        super().__init__(code, message)


class Busy(ServiceError):
    """Refused for now: retry after `retry_after_s` seconds (429)."""

    def __init__(self, code: str, message: str, retry_after_s: int):
        super().__init__(code, message)
        self.retry_after_s = retry_after_s


class Unavailable(ServiceError):
    """A component the request needs is unreachable (503)."""
