"""The id of the request being handled, visible to every log record and error body it produces.

A request id comes from the client's ``X-Request-ID`` header when that header is a plausible id
(short, printable, no spaces or separators that could forge a log line or a header), and is
generated otherwise. It lives in a :class:`~contextvars.ContextVar`, so code running for the request
(the endpoint, its dependencies, the exception handlers, and worker threads started with
``anyio.to_thread``, which copy the context) sees it without being handed it.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar, Token

REQUEST_ID_HEADER = "X-Request-ID"

#: Longest client-supplied id that is kept; longer ones are replaced (they would bloat every log line).
MAX_REQUEST_ID_LENGTH = 128

# Letters, digits and the punctuation of common id formats (UUIDs, ULIDs, W3C trace ids, AWS
# "Root=1-abc-def"), nothing that can break a header or a log line (no spaces, quotes, CR/LF).
_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:=+/\-]+")

_request_id: ContextVar[str | None] = ContextVar("reid_request_id", default=None)


def new_request_id() -> str:
    """A fresh request id: 32 hexadecimal digits (a random UUID without dashes)."""
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str | None:
    """The client's request id if it is acceptable as is, else ``None`` (the caller makes a new one).

    Args:
        value: the ``X-Request-ID`` header value, or ``None`` when absent.
    """
    if value is None or not 0 < len(value) <= MAX_REQUEST_ID_LENGTH:
        return None
    return value if _REQUEST_ID_PATTERN.fullmatch(value) else None


def current_request_id() -> str | None:
    """The id of the request this code runs for, or ``None`` outside a request (jobs, start-up)."""
    return _request_id.get()


def set_request_id(value: str | None) -> Token[str | None]:
    """Make ``value`` the current request id; returns a token for :func:`reset_request_id`."""
    return _request_id.set(value)


def reset_request_id(token: Token[str | None]) -> None:
    """Restore the request id that was current before :func:`set_request_id` returned ``token``."""
    _request_id.reset(token)
