"""Prometheus metrics that stay true under gunicorn.

Under gunicorn every worker writes its samples into ``PROMETHEUS_MULTIPROC_DIR`` (prepared and wiped by
``gunicorn.conf.py``; dead workers' files are marked dead on ``child_exit``), and ``/metrics`` on any
worker reports the sum over all of them. Custom collectors do not work in that mode, so the engine's
point-in-time state is copied into gauges once a second by a greenlet; the gauges use ``livesum`` so that
a dead worker's slots stop counting. Without the variable (the Flask test client) a plain registry is
used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import Flask, Response, g
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

from llmserve.engine.stats import EngineStats
from llmserve.settings import Settings

if TYPE_CHECKING:
    from llmserve.api.runner import Usage

EXTENSION = "llmserve.metrics"
# Error codes that mean the server refused work it could not take (a fixed set: bounded label values).
REJECTION_CODES = frozenset(
    {"queue_full", "queue_timeout", "context_length_exceeded", "model_loading", "service_unavailable"}
)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

# LLM latencies span milliseconds (a token) to minutes (a long generation).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class LLMMetrics:
    """The LLM view: engine state, tokens, latencies and rejections, labelled by model."""

    slots_busy: Gauge
    slots_total: Gauge
    requests_waiting: Gauge
    kv_cells_used: Gauge
    prompt_tokens: Counter
    generation_tokens: Counter
    time_to_first_token: Histogram
    request_duration: Histogram
    rejections: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> LLMMetrics:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["model"], registry=registry, multiprocess_mode="livesum")

        return cls(
            slots_busy=gauge("llmserve_slots_busy", "Sequence slots decoding or prefilling."),
            slots_total=gauge("llmserve_slots_total", "Sequence slots of the engines."),
            requests_waiting=gauge("llmserve_requests_waiting", "Generation jobs queued for a slot."),
            kv_cells_used=gauge("llmserve_kv_cells_used", "KV cache cells held by the slots."),
            prompt_tokens=Counter(
                "llmserve_prompt_tokens", "Prompt tokens of finished requests.", ["model"], registry=registry
            ),
            generation_tokens=Counter(
                "llmserve_generation_tokens", "Tokens generated for finished requests.", ["model"], registry=registry
            ),
            time_to_first_token=Histogram(
                "llmserve_time_to_first_token_seconds",
                "From the request's arrival to its first generated token.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            request_duration=Histogram(
                "llmserve_request_duration_seconds",
                "From arrival to the last byte of a generation request.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            rejections=Counter(
                "llmserve_rejections",
                "Requests refused before generation, by reason.",
                ["model", "reason"],
                registry=registry,
            ),
        )

    def record_request(
        self, model: str, usage: Usage, started: float, first_token_at: float | None, ended: float
    ) -> None:
        """Account one generation request once its response is complete (or abandoned)."""
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self.generation_tokens.labels(model).inc(usage.completion_tokens)
        if first_token_at is not None:
            self.time_to_first_token.labels(model).observe(first_token_at - started)
        self.request_duration.labels(model).observe(ended - started)

    def publish_engine(self, model: str, stats: EngineStats) -> None:
        self.slots_busy.labels(model).set(stats.slots_busy)
        self.slots_total.labels(model).set(stats.slots_total)
        self.requests_waiting.labels(model).set(stats.queued)
        self.kv_cells_used.labels(model).set(stats.kv_cells_used)


def init_app(app: Flask, settings: Settings) -> LLMMetrics:
    """Expose /metrics (HTTP metrics by endpoint and status, plus the LLM view) and return the latter."""
    registry = CollectorRegistry()
    exporter_class = GunicornInternalPrometheusMetrics if os.environ.get(MULTIPROCESS_ENV) else PrometheusMetrics
    exporter_class(
        app,
        registry=registry,
        group_by="endpoint",
        defaults_prefix="llmserve",
        buckets=LATENCY_BUCKETS,
        excluded_paths=["/metrics", "/healthz", "/readyz"],
    )
    llm = LLMMetrics.create(registry)
    app.extensions[EXTENSION] = llm
    model = settings.model.id

    @app.after_request
    def _count_rejection(response: Response) -> Response:
        code = g.get("api_error_code")
        if code in REJECTION_CODES:
            llm.rejections.labels(model, code).inc()
        return response

    return llm
