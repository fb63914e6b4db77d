"""Structured logs: one JSON object per line on stderr, for ``budgetd serve|up|bridge``.

Every line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and ``msg``;
whatever a call passes as ``extra`` (``event``, ``request_id``, ``team_id``, ...) follows
as keys of its own, and a traceback goes in ``exc``. Stdlib logging throughout.

Lines are formatted where they are logged but written by a background thread (a
:class:`~logging.handlers.QueueHandler` feeding a :class:`~logging.handlers.QueueListener`),
so a slow reader of stderr (a full pipe, a busy journal) never stalls the event loop.
"""

from __future__ import annotations

import copy
import json
import logging
import logging.handlers
import queue
import sys
from datetime import UTC, datetime
from typing import Any, Final, TextIO

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (never raises on odd ``extra`` values)."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = record.__dict__
        payload.update((name, extra[name]) for name in extra if name not in _STANDARD)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = record.stack_info
        return json.dumps(payload, default=str, ensure_ascii=False)


class LogSetup:
    """The installed handlers; :meth:`close` flushes what is queued (call it before exit)."""

    def __init__(self, listener: logging.handlers.QueueListener, handler: logging.Handler) -> None:
        self._listener: logging.handlers.QueueListener | None = listener
        self._handler = handler

    def close(self) -> None:
        """Write every queued line and stop the writer thread (idempotent)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            logging.getLogger().removeHandler(self._handler)
            listener.stop()  # writes what is queued, then joins the thread


class _Preformatted(logging.handlers.QueueHandler):
    """Formats in the caller (so ``extra`` and tracebacks are read while they are current)
    and queues the finished line."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        line = self.format(record)
        queued = copy.copy(record)  # other handlers (tests' caplog) still see the original
        queued.msg, queued.args, queued.exc_info, queued.exc_text = line, None, None, None
        return queued


def configure(level: str, stream: TextIO | None = None) -> LogSetup:
    """Send every log record at ``level`` and above to ``stream`` (stderr) as JSON lines."""
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = logging.StreamHandler(stream or sys.stderr)
    writer.setFormatter(logging.Formatter("%(message)s"))
    listener = logging.handlers.QueueListener(lines, writer)
    handler = _Preformatted(lines)
    handler.setFormatter(JsonFormatter())
    # Logging's documented optimisations: budgetd logs a line per request, and none of these
    # (calling thread and process, the caller's file and line) is ever written.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # skips finding the caller's frame (logging docs, Optimization)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    listener.start()
    return LogSetup(listener, handler)
