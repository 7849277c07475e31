"""Logging configuration shared by gunicorn and the app: one stderr handler, JSON or text lines.

``json`` (the default) writes one object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
``message``, ``pid`` (which worker, or the master, wrote it), then every field the call passed in
``extra`` (and ``exc_info`` with the traceback).
``text`` writes a line for a terminal with the ``extra`` fields appended as ``key=value``.

gunicorn's own loggers (``gunicorn.error``, and ``gunicorn.access`` should it be enabled) get no handlers
of their own from ``GunicornLogger``: their records go to the same handler, in the same format.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from gunicorn.glogging import Logger as _GunicornBaseLogger
from pythonjsonlogger.core import RESERVED_ATTRS, merge_record_extra
from pythonjsonlogger.json import JsonFormatter

from llmserve.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
JSON_FIELDS = ("asctime", "levelname", "name", "message", "process")
JSON_NAMES = {"asctime": "time", "levelname": "level", "name": "logger", "process": "pid"}

REQUEST_LOGGER = "llmserve.requests"
# The request line's message reads "METHOD path status duration_ms request_id" (see requestlog): a text
# line does not repeat those fields as key=value.
REQUEST_MESSAGE_FIELDS = frozenset({"method", "path", "status", "duration_ms", "request_id"})
# LogRecord's own attributes: not extra fields, and names an ``extra`` dict must not use.
RECORD_ATTRIBUTES = frozenset({*RESERVED_ATTRS, "taskName"})
_BARE_VALUE = re.compile(r"^[^\s\"=]+$")


class UTCJsonFormatter(JsonFormatter):
    """python-json-logger's formatter, its time in ISO 8601 UTC to the millisecond."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """The classic line, then the record's ``extra`` fields as ``key=value`` (quoted where needed)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = merge_record_extra(record, {}, reserved=RECORD_ATTRIBUTES)
        shown = REQUEST_MESSAGE_FIELDS if record.name == REQUEST_LOGGER else frozenset()
        pairs = "".join(f" {key}={_text_value(value)}" for key, value in fields.items() if key not in shown)
        return super().formatMessage(record) + pairs


def _text_value(value: Any) -> str:
    if isinstance(value, str):
        return value if _BARE_VALUE.match(value) else json.dumps(value)
    return json.dumps(value, default=str)


def logging_config(settings: Settings) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict for the master and (inherited through fork) the workers."""
    formatters: dict[str, dict[str, Any]] = {
        "json": {"()": UTCJsonFormatter, "fmt": list(JSON_FIELDS), "rename_fields": dict(JSON_NAMES)},
        "text": {"()": TextFormatter, "fmt": TEXT_FORMAT},
    }
    handler = {"class": "logging.StreamHandler", "formatter": settings.log_format, "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {settings.log_format: formatters[settings.log_format]},
        "handlers": {"stderr": handler},
        "root": {"level": settings.log_level.upper(), "handlers": ["stderr"]},
    }


class GunicornLogger(_GunicornBaseLogger):
    """gunicorn's logger without handlers of its own: its lines go through the root handler above.

    ``accesslog``, ``logconfig_dict`` and the like keep their meaning for whether gunicorn logs access
    lines at all (gunicorn.conf.py leaves them unset: no access lines).
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in [handler for handler in log.handlers if getattr(handler, "_gunicorn", False)]:
                log.removeHandler(handler)
            log.propagate = True
