"""One usage record per answered request: what the ledger stores and what reports add up.

A record is written once, when the response ends, and never updated: ``request_id`` is its identity,
so writing the same record twice (a retried batch) stores it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

ENDPOINTS = frozenset({"chat.completions", "completions", "embeddings"})


@dataclass(frozen=True)
class UsageRecord:
    """What one request used, and what it cost at the prices of ``price_version``.

    ``prompt_tokens`` includes ``cached_tokens`` (as in OpenAI's ``usage``); ``engine_seconds`` is the
    share of engine time attributed to this request, which prices compute time independently of tokens.
    """

    request_id: str
    tenant: str
    key_id: str | None
    model: str
    endpoint: str
    started_at: datetime
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    queue_seconds: float | None
    ttft_seconds: float | None
    total_seconds: float
    engine_seconds: float
    finish_reason: str
    status: int
    cost: float = 0.0
    price_version: str = ""
    # The first 12 hex digits of the GGUF file's sha256: which build of ``model`` answered.
    model_version: str | None = None
    # A resumable stream whose client lost its connection and read it again before it ended.
    resumed: bool = False

    def __post_init__(self) -> None:
        # Hours and days are UTC everywhere in the ledger; a naive time would land in the wrong bucket.
        if self.started_at.utcoffset() is None:
            raise ValueError("started_at must be timezone-aware")
        if self.started_at.utcoffset() != timedelta(0):
            object.__setattr__(self, "started_at", self.started_at.astimezone(UTC))
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {self.endpoint!r}")
