"""Log records as one JSON object per line (or readable text), each tagged with its request id.

``reid serve`` calls :func:`configure_logging` once: every logger of the process (the service's,
uvicorn's, SQLAlchemy's ...) then writes through one handler on the root logger, whose filter
stamps each record with the id of the request it was emitted for (see
:mod:`service.http.request_context`). A JSON line carries ``time`` (UTC, ISO 8601), ``level``,
``logger``, ``message``, ``request_id`` and every ``extra=`` field of the call, so log shippers
index them without parsing messages.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import IO, Any, Literal

from service.http.request_context import current_request_id

LogFormat = Literal["json", "text"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is emitted.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "taskName",  # Python >= 3.12 adds it to every record
    "color_message",  # uvicorn's copy of the message with terminal colour codes
}


class RequestIdFilter(logging.Filter):
    """Stamp each record with the current request id (``None`` outside a request).

    Installed on handlers rather than loggers, so it sees the records of every logger; it runs in
    the thread and context that emitted the record, where the request id is still current.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # an explicit extra={"request_id": ...} wins
            record.request_id = current_request_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra field that JSON cannot encode (a Path, a datetime) is written as
        # its text rather than losing the whole line.
        return json.dumps(payload, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return super().format(record)


def make_handler(log_format: LogFormat, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (default stderr) writing ``log_format`` lines with request ids."""
    if log_format not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', got {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else _TextFormatter(TEXT_FORMAT))
    return handler


def configure_logging(log_format: LogFormat = "json", level: str | int = "INFO") -> logging.Handler:
    """Route every logger of the process through one handler on the root logger.

    Replaces the root logger's handlers (``reid``'s default text ones included) and lets uvicorn's
    loggers propagate to it, so the server's own lines are formatted alike; call it before
    ``uvicorn.run(..., log_config=None)``.

    Args:
        log_format: ``json`` (one object per line, for log shippers) or ``text`` (for people).
        level: root level name or number (``info``, ``warning`` ...).

    Returns:
        The installed handler.
    """
    handler = make_handler(log_format)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        server_logger = logging.getLogger(name)
        server_logger.handlers.clear()
        server_logger.propagate = True
    # Python warnings (a library's deprecation, pydantic's schema notes) go through the same handler
    # as records of the ``py.warnings`` logger: raw text on stderr would break a JSON log stream.
    logging.captureWarnings(True)
    return handler
