"""Process logging: JSON lines in production, readable text in development.

Every line names the service. Request-scoped fields (method, app_id, ...) are bound once with
:func:`bind_log_fields` and then appear on every line logged while that request runs, without
passing them around: each gRPC call runs in its own task, so a context variable is per request.
Fields given through ``extra=`` on one call are added to that line only.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, TextIO

__all__ = ["bind_log_fields", "configure_logging", "exception_fields", "log_fields"]

# An immutable default: the mapping is shared by every context that never bound a field.
_fields: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "tidings_log_fields", default=MappingProxyType({})
)

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "service", "taskName"}

#: Chatty third-party loggers, quietened unless the service itself runs at DEBUG.
_NOISY_LOGGERS = ("aiokafka", "kafka", "asyncio", "grpc")


def bind_log_fields(**fields: object) -> None:
    """Add fields to every line logged from now on in the current context (e.g. one RPC).

    The binding is not undone: it lives in the context of the current task, which a gRPC call
    owns alone, so it disappears with the call. Call it again to add or overwrite fields.

    Args:
        **fields: Field names and JSON-serialisable values.
    """
    _fields.set({**_fields.get(), **fields})


def log_fields() -> Mapping[str, object]:
    """The fields bound in the current context."""
    return _fields.get()


def _line_fields(record: logging.LogRecord) -> dict[str, object]:
    """Context fields, then this call's ``extra=`` fields (which win on a clash)."""
    fields: dict[str, object] = dict(_fields.get())
    for key, value in vars(record).items():
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``service``, ``logger``, ``msg``, fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as a JSON line."""
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_line_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        # default=str: a stray non-JSON value must never turn a log line into a crash.
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS.mmm LEVEL service logger: message key=value ...`` for humans."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as a readable line (plus the traceback, if any)."""
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        text = f"{when} {record.levelname:<7} {self._service} {record.name}: {record.getMessage()}"
        fields = _line_fields(record)
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(
    service: str,
    *,
    log_format: Literal["json", "text"] = "json",
    level: str = "INFO",
    stream: TextIO | None = None,
) -> logging.Logger:
    """Send all logging of this process to one stream in the chosen format.

    Replaces the root logger's handlers, so calling it twice (tests, ``migrate`` then
    ``serve``) does not duplicate lines.

    Args:
        service: Service name put on every line.
        log_format: ``json`` (production) or ``text`` (development).
        level: Root level name, e.g. ``INFO``.
        stream: Where lines go; standard error by default.

    Returns:
        The service's logger (``tidings.<service>``).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter: logging.Formatter = (
        JsonFormatter(service) if log_format == "json" else TextFormatter(service)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet = logging.WARNING if root.level > logging.DEBUG else logging.NOTSET
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    return logging.getLogger(f"tidings.{service}")


def exception_fields(exc: BaseException) -> dict[str, Any]:
    """Fields describing an exception without its message (which may hold data or SQL)."""
    return {"error_type": f"{type(exc).__module__}.{type(exc).__qualname__}"}
