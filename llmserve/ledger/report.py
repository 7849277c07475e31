"""Usage reports as CSV or JSON, from the rows of ``Ledger.query``, and the bounds they are asked for.

Periods are written as ISO 8601 UTC times (``2026-11-27T10:00:00Z``), the start of the hour or day.
Bounds are read as ISO 8601 times or dates (UTC unless they say otherwise) or as unix seconds.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from llmserve.ledger.store import SUMS

COLUMNS = ("period", "tenant", "model", *SUMS)
Format = Literal["csv", "json"]
_UNIX_SECONDS = re.compile(r"-?\d+(\.\d+)?")


def parse_moment(text: str) -> datetime:
    """An aware UTC time from ISO 8601 (``2026-11-27``, ``2026-11-27T10:00:00+01:00``) or unix seconds;
    ValueError for anything else."""
    try:
        if _UNIX_SECONDS.fullmatch(text):
            return datetime.fromtimestamp(float(text), UTC)
        moment = datetime.fromisoformat(text)
    except (OverflowError, OSError) as exc:
        raise ValueError(f"{text!r} is out of range") from exc
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def format_moment(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render(rows: Sequence[dict[str, Any]], fmt: Format) -> str:
    return to_csv(rows) if fmt == "csv" else to_json(rows)


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """A header line, then one line per row; the period column only when the rows have periods."""
    columns = _columns(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_plain(row[name]) for name in columns] for row in rows)
    return out.getvalue()


def to_json(rows: Sequence[dict[str, Any]]) -> str:
    """A JSON array of objects, one per row, keys in report order."""
    columns = _columns(rows)
    return json.dumps([{name: _plain(row[name]) for name in columns} for row in rows], indent=2) + "\n"


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    grouped = bool(rows) and "period" in rows[0]
    return [name for name in COLUMNS if name != "period" or grouped]


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_moment(value)
    return value
