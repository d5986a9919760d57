"""Log records that say which name, generation and host they are about.

The loop sets :data:`current` for the duration of a name's loop (its own records, and those of
the work query and worker it calls, run in that context); a host sets it, without a name, for
its own tasks. :class:`ContextFilter` copies it onto a record as ``batchloop_name``,
``batchloop_generation`` and ``batchloop_host``. It is installed on the ``batchloop`` logger,
so every record of the library carries the fields; add it to your own handler to have your own
log lines inside callables carry them too::

    handler.addFilter(batchloop.observe.logs.ContextFilter())

:class:`JsonFormatter` writes one JSON object per record (``batchloop --log-format json``).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Any

FIELDS = ("batchloop_name", "batchloop_generation", "batchloop_host")


@dataclass(frozen=True, slots=True)
class LogContext:
    name: str | None = None
    generation: int | None = None
    host: str | None = None


current: contextvars.ContextVar[LogContext | None] = contextvars.ContextVar(
    "batchloop_log_context", default=None
)
"""What the code running now is about (None outside any host or loop)."""


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's ``batchloop_*`` fields: its own (``extra=``), else the current context's."""
    ctx = current.get()
    defaults = (ctx.name, ctx.generation, ctx.host) if ctx is not None else (None, None, None)
    out = {}
    for key, default in zip(FIELDS, defaults, strict=True):
        value = getattr(record, key, None)
        out[key] = default if value is None else value
    return out


class ContextFilter(logging.Filter):
    """Adds ``batchloop_name``, ``batchloop_generation`` and ``batchloop_host`` to every record
    (None where unknown); fields a record already has (given with ``extra=``) are kept. Never
    drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in fields(record).items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (ISO 8601, UTC), ``level``,
    ``logger``, ``message``, the ``batchloop_*`` fields, any other ``extra=`` fields, and
    ``exc_info`` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **fields(record),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


_INSTALLED = ContextFilter()


def install(logger: logging.Logger | None = None) -> None:
    """Put a :class:`ContextFilter` on ``logger`` (default: ``batchloop``), once."""
    target = logger if logger is not None else logging.getLogger("batchloop")
    if not any(isinstance(f, ContextFilter) for f in target.filters):
        target.addFilter(_INSTALLED)


def enter(
    name: str | None = None, generation: int | None = None, host: str | None = None
) -> contextvars.Token[LogContext | None]:
    """Make ``name``/``generation``/``host`` the current context (a missing host is inherited
    from the enclosing context); undo with ``current.reset(token)``."""
    if host is None:
        outer = current.get()
        host = outer.host if outer is not None else None
    return current.set(LogContext(name, generation, host))


__all__ = ["FIELDS", "ContextFilter", "JsonFormatter", "LogContext", "current", "enter", "install"]
