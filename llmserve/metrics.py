"""Prometheus metrics that stay true under gunicorn.

Under gunicorn every worker writes its samples into ``PROMETHEUS_MULTIPROC_DIR`` (prepared and wiped by
``gunicorn.conf.py``; dead workers' files are marked dead on ``child_exit``), and ``/metrics`` on any
worker reports the sum over all of them. Custom collectors do not work in that mode, so the engine's
point-in-time state is copied into gauges once a second by a greenlet; the gauges use ``livesum`` so that
a dead worker's slots stop counting. Without the variable (the Flask test client) a plain registry is
used.

Gauge modes are chosen per meaning: ``livesum`` for what adds up over workers (slots, queues, memory,
live workers), ``max`` for what every worker reports alike (configured workers, model load time), and
``mostrecent`` for host-wide readings (GPU). Tenant labels only ever take configured tenant names (or
``default``), so their number is bounded by the configuration.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from flask import Flask, Response, current_app, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

from llmserve.engine.stats import EngineStats, StepSample
from llmserve.gpu import GpuReading
from llmserve.request_context import current_request
from llmserve.requestlog import PROBE_PATHS
from llmserve.settings import Settings

if TYPE_CHECKING:
    from llmserve.api.runner import Usage


class FinishedRequest(Protocol):
    """What the metrics read from a finished generation request (``GenerationRun`` provides it)."""

    usage: Usage
    admitted_at: float | None
    first_token_at: float | None
    token_gaps: list[float]
    cancelled_by: str | None


EXTENSION = "llmserve.metrics"
# Error codes that mean the server refused work it could not take (a fixed set: bounded label values).
REJECTION_CODES = frozenset(
    {
        "queue_full",
        "queue_timeout",
        "tenant_queue_full",
        "rate_limit_exceeded",
        "context_length_exceeded",
        "model_loading",
        "engine_unavailable",
        "model_unavailable",
        "service_unavailable",
    }
)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

# LLM latencies span milliseconds (a token) to minutes (a long generation).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Between two tokens of one stream: a few milliseconds on a GPU, tens to hundreds on a small CPU.
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
GaugeMode = Literal["livesum", "max", "livemax", "mostrecent"]


@dataclass
class LLMMetrics:
    """The LLM view: engine state, tokens, latencies, rejections and errors, labelled by model (and tenant)."""

    slots_busy: Gauge
    slots_total: Gauge
    requests_running: Gauge
    requests_waiting: Gauge
    kv_cells_used: Gauge
    kv_cells_total: Gauge
    queue_length: Gauge
    saturation: Gauge
    drain_rate: Gauge
    desired_replicas: Gauge
    standby: Gauge
    kv_cache_usage: Gauge
    model_load_seconds: Gauge
    model_info: Gauge
    workers_alive: Gauge
    workers_expected: Gauge
    resident_memory: Gauge
    gpu_utilization: Gauge
    gpu_memory_used: Gauge
    gpu_memory_total: Gauge
    prompt_tokens: Counter
    generation_tokens: Counter
    cost: Counter
    engine_seconds: Counter
    rejections: Counter
    cancellations: Counter
    errors: Counter
    worker_replacements: Counter
    model_requests: Counter
    canary_weight: Gauge
    streams_parked: Gauge
    stream_journal_bytes: Gauge
    stream_resumes: Counter
    canary_rollbacks: Counter
    canary_retries: Counter
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    queue_wait: Histogram
    request_duration: Histogram
    engine_step: Histogram
    engine_batch_tokens: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> LLMMetrics:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("model",), mode: GaugeMode = "livesum") -> Gauge:
            return Gauge(name, doc, labels, registry=registry, multiprocess_mode=mode)

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        by_tenant = ("model", "tenant")
        gpu = ("gpu", "name")
        return cls(
            slots_busy=gauge("llmserve_slots_busy", "Sequence slots decoding or prefilling."),
            slots_total=gauge("llmserve_slots_total", "Sequence slots of the engines."),
            requests_running=gauge("llmserve_requests_running", "Generation jobs holding a slot.", by_tenant),
            requests_waiting=gauge("llmserve_requests_waiting", "Generation jobs queued for a slot.", by_tenant),
            kv_cells_used=gauge("llmserve_kv_cells_used", "KV cache cells held by the slots."),
            kv_cells_total=gauge("llmserve_kv_cells_total", "KV cache cells of the engines."),
            queue_length=gauge("llmserve_queue_length", "Requests waiting for a slot or the embedding lane."),
            # Ratios are not summed over workers: a request that a worker accepts waits if that worker is
            # full, so an instance is as saturated as its most saturated worker.
            saturation=gauge(
                "llmserve_saturation",
                "0-1: (busy slots + queued requests) / slots, at most 1; the most saturated worker's.",
                mode="livemax",
            ),
            drain_rate=gauge("llmserve_drain_rate", "Requests finished per second, a 30-second average."),
            # Every worker computes the instance's value from all the workers' status files: their maximum.
            desired_replicas=gauge(
                "llmserve_desired_replicas",
                "Instances this instance's load would need (fractional; a fleet needs ceil of the sum).",
                (),
                "livemax",
            ),
            standby=gauge(
                "llmserve_standby", "1 while the instance is in warm standby (no new traffic).", (), "livemax"
            ),
            kv_cache_usage=gauge(
                "llmserve_kv_cache_usage_ratio",
                "0-1: KV cache cells held / cells, the fullest worker's.",
                mode="livemax",
            ),
            model_load_seconds=gauge(
                "llmserve_model_load_seconds", "Seconds the model took to load and warm up.", mode="max"
            ),
            model_info=gauge(
                "llmserve_model_info",
                "1 for each model served and its version (the GGUF's sha256 prefix).",
                ("model", "version"),
                "livemax",
            ),
            workers_alive=gauge("llmserve_workers_alive", "Live gunicorn workers.", ()),
            workers_expected=gauge("llmserve_workers_expected", "Configured gunicorn workers.", (), mode="max"),
            resident_memory=gauge(
                "llmserve_process_resident_memory_bytes", "Resident memory of the workers, summed.", ()
            ),
            gpu_utilization=gauge("llmserve_gpu_utilization_ratio", "GPU busy share.", gpu, "mostrecent"),
            gpu_memory_used=gauge("llmserve_gpu_memory_used_bytes", "GPU memory in use.", gpu, "mostrecent"),
            gpu_memory_total=gauge("llmserve_gpu_memory_total_bytes", "GPU memory.", gpu, "mostrecent"),
            prompt_tokens=counter("llmserve_prompt_tokens", "Prompt tokens of finished requests.", by_tenant),
            generation_tokens=counter(
                "llmserve_generation_tokens", "Tokens generated for finished requests.", by_tenant
            ),
            cost=counter("llmserve_cost", "Cost of recorded requests, at the configured prices.", by_tenant),
            engine_seconds=counter(
                "llmserve_engine_seconds", "Engine time attributed to recorded requests.", by_tenant
            ),
            rejections=counter(
                "llmserve_rejections", "Requests refused before generation, by reason.", ("model", "reason")
            ),
            cancellations=counter(
                "llmserve_cancellations", "Generations ended early by the client or a shutdown.", ("model", "reason")
            ),
            errors=counter("llmserve_errors", "Error responses by status and error code.", ("status", "code")),
            worker_replacements=counter(
                "llmserve_worker_replacements",
                "Workers that replaced themselves because their engine failed or stalled.",
                ("model", "reason"),
            ),
            model_requests=counter(
                "llmserve_model_requests",
                "Generation requests by the model and version that answered, and whether they failed (5xx).",
                ("model", "version", "outcome"),
            ),
            streams_parked=gauge("llmserve_streams_parked", "Resumable streams generating with their client gone.", ()),
            stream_journal_bytes=gauge(
                "llmserve_stream_journal_bytes",
                "Bytes of events the resumable streams' journals hold (the instance's, from any worker).",
                (),
                "livemax",
            ),
            stream_resumes=counter("llmserve_stream_resumes", "Reconnects served from a stream's journal.", ()),
            canary_weight=gauge(
                "llmserve_canary_weight",
                "Percent of an alias's sessions routed to its canary.",
                ("alias", "canary"),
                "livemax",
            ),
            canary_rollbacks=counter(
                "llmserve_canary_rollbacks",
                "Canaries set to weight 0 because they were clearly worse.",
                ("alias", "canary"),
            ),
            canary_retries=counter(
                "llmserve_canary_retries",
                "Canary requests that failed before their response started and were answered by stable.",
                ("alias",),
            ),
            time_to_first_token=histogram(
                "llmserve_time_to_first_token_seconds",
                "From the request's arrival to its first generated token.",
                by_tenant,
                LATENCY_BUCKETS,
            ),
            inter_token_latency=histogram(
                "llmserve_inter_token_latency_seconds",
                "Between consecutive tokens of one choice, as the server delivered them.",
                ("model",),
                TOKEN_GAP_BUCKETS,
            ),
            queue_wait=histogram(
                "llmserve_queue_wait_seconds",
                "From arrival until every choice held a slot.",
                by_tenant,
                LATENCY_BUCKETS,
            ),
            request_duration=histogram(
                "llmserve_request_duration_seconds",
                "From arrival to the last byte of a generation request.",
                by_tenant,
                LATENCY_BUCKETS,
            ),
            engine_step=histogram(
                "llmserve_engine_step_seconds", "One batched decode step.", ("model",), TOKEN_GAP_BUCKETS
            ),
            engine_batch_tokens=histogram(
                "llmserve_engine_batch_tokens", "Tokens decoded in one step.", ("model",), BATCH_BUCKETS
            ),
        )

    def record_request(self, model: str, tenant: str, run: FinishedRequest, started: float, ended: float) -> None:
        """Account one generation request once its response is complete (or abandoned)."""
        self.prompt_tokens.labels(model, tenant).inc(run.usage.prompt_tokens)
        self.generation_tokens.labels(model, tenant).inc(run.usage.completion_tokens)
        if run.admitted_at is not None:
            self.queue_wait.labels(model, tenant).observe(run.admitted_at - started)
        if run.first_token_at is not None:
            self.time_to_first_token.labels(model, tenant).observe(run.first_token_at - started)
        gaps = self.inter_token_latency.labels(model)
        for gap in run.token_gaps:
            gaps.observe(gap)
        self.request_duration.labels(model, tenant).observe(ended - started)
        if run.cancelled_by is not None:
            self.cancellations.labels(model, run.cancelled_by).inc()

    def record_usage(self, model: str, tenant: str, cost: float, engine_seconds: float) -> None:
        """Account one usage record (every request the server took on, see ``llmserve.accounting``)."""
        self.cost.labels(model, tenant).inc(cost)
        self.engine_seconds.labels(model, tenant).inc(engine_seconds)

    def publish_engine(
        self, model: str, stats: EngineStats, steps: Iterable[StepSample], tenants: Iterable[str], kv_cells: int
    ) -> None:
        """Copy the engine's state and its steps since the last call; every configured tenant gets a value,
        so a tenant that went idle reads 0 rather than its last busy value."""
        self.slots_busy.labels(model).set(stats.slots_busy)
        self.slots_total.labels(model).set(stats.slots_total)
        self.kv_cells_used.labels(model).set(stats.kv_cells_used)
        self.kv_cells_total.labels(model).set(kv_cells)
        self.queue_length.labels(model).set(stats.queued)
        self.saturation.labels(model).set(stats.saturation)
        self.drain_rate.labels(model).set(stats.jobs_per_second)
        self.kv_cache_usage.labels(model).set(stats.kv_cells_used / kv_cells if kv_cells else 0.0)
        if stats.model_load_seconds:
            self.model_load_seconds.labels(model).set(stats.model_load_seconds)
        for tenant in tenants:
            load = stats.tenants.get(tenant)
            self.requests_running.labels(model, tenant).set(load.running if load else 0)
            self.requests_waiting.labels(model, tenant).set(load.queued if load else 0)
        step_seconds, batch_tokens = self.engine_step.labels(model), self.engine_batch_tokens.labels(model)
        for step in steps:
            step_seconds.observe(step.seconds)
            batch_tokens.observe(step.batch_tokens)

    def forget_model(self, model: str, version: str | None, tenants: Iterable[str]) -> None:
        """An unloaded model's gauges read 0 (multiprocess files keep a series once written)."""
        if version is not None:
            self.model_info.labels(model, version).set(0)
        for gauge in (
            self.slots_busy,
            self.slots_total,
            self.kv_cells_used,
            self.kv_cells_total,
            self.queue_length,
            self.saturation,
            self.drain_rate,
            self.kv_cache_usage,
        ):
            gauge.labels(model).set(0)
        for tenant in tenants:
            self.requests_running.labels(model, tenant).set(0)
            self.requests_waiting.labels(model, tenant).set(0)

    def publish_process(self, resident_bytes: int, gpus: Iterable[GpuReading]) -> None:
        self.resident_memory.set(resident_bytes)
        for gpu in gpus:
            labels = (str(gpu.index), gpu.name)
            self.gpu_utilization.labels(*labels).set(gpu.utilization)
            self.gpu_memory_used.labels(*labels).set(gpu.memory_used)
            self.gpu_memory_total.labels(*labels).set(gpu.memory_total)


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
        excluded_paths=sorted(PROBE_PATHS),
    )
    llm = LLMMetrics.create(registry)
    app.extensions[EXTENSION] = llm
    llm.workers_expected.set(settings.workers)

    @app.after_request
    def _count_errors(response: Response) -> Response:
        context = current_request()
        code = context.error_code
        if code in REJECTION_CODES:  # labelled with the model once the request named one the server has
            llm.rejections.labels(context.model or "", code).inc()
        if response.status_code >= 400 and request.path not in PROBE_PATHS:  # a 503 probe is no error
            llm.errors.labels(str(response.status_code), code or "unknown").inc()
        return response

    return llm


def current_metrics() -> LLMMetrics:
    metrics: LLMMetrics = current_app.extensions[EXTENSION]
    return metrics
