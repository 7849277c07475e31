"""The served model as the HTTP layer sees it: its engine, readiness, tokenizer and chat format.

Created by the app factory, started in the gunicorn worker after fork (``gunicorn.conf.py``'s
``post_worker_init``), never at import time or in the master: threads and model memory do not survive
a fork.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import cached_property
from typing import TypeVar

import gevent
import psutil
from flask import Flask, current_app

from llmserve.accounting import Accounting
from llmserve.chat_format import ChatFormatError, ChatFormatter, Message, select_template
from llmserve.engine.engine import Engine, EngineState
from llmserve.engine.llama_model import Vocabulary
from llmserve.errors import APIError, InvalidRequest, ModelNotFound, ServiceUnavailable
from llmserve.gpu import GpuMonitor
from llmserve.metrics import LLMMetrics
from llmserve.model_files import resolve_model_path
from llmserve.settings import Settings
from llmserve.tenancy import Tenancy, current_principal

log = logging.getLogger(__name__)

EXTENSION = "llmserve.service"
T = TypeVar("T")


ENGINE_METRICS_INTERVAL = 1.0  # seconds between copies of the engine's state into the metrics


class ModelService:
    def __init__(self, settings: Settings, metrics: LLMMetrics, tenancy: Tenancy) -> None:
        self.settings = settings
        self.metrics = metrics
        self.accounting = Accounting(settings, metrics)  # the usage ledger, opened by start()
        self._tenant_names = tuple(tenancy.tenants)
        self.engine = Engine(
            settings.model,
            lambda: resolve_model_path(settings.model, settings.cache_dir),
            queue_size=settings.queue_size,
            queue_timeout=settings.queue_timeout,
            shares=tenancy.shares(),
            policy=settings.scheduling,
        )
        self.draining = False

    def init_app(self, app: Flask) -> None:
        app.extensions[EXTENSION] = self

    def start(self) -> None:
        self.engine.start()
        self.accounting.start()
        gevent.spawn(self._publish_metrics)

    def _publish_metrics(self) -> None:
        """Copy engine, process and GPU state into the metrics while this worker lives."""
        self.metrics.workers_alive.set(1)
        process = psutil.Process()
        gpus = GpuMonitor()
        kv_cells = self.settings.model.parallel * self.settings.model.context_length
        while self.engine.alive:
            self.metrics.publish_engine(
                self.model_id, self.engine.stats(), self.engine.take_steps(), self._tenant_names, kv_cells
            )
            self.metrics.publish_process(process.memory_info().rss, gpus.read())
            gevent.sleep(ENGINE_METRICS_INTERVAL)

    def stop(self) -> None:
        self.engine.stop()
        self.accounting.stop()  # after the engine: its last Finished events complete the last records

    def drain(self, deadline: float) -> None:
        """Stop taking work: readiness turns 503, and running generations must end by ``deadline``."""
        self.draining = True
        self.engine.drain(deadline)

    @property
    def ready(self) -> bool:
        """Loaded, warmed up and not draining: what /readyz and systemd are told."""
        return self.engine.state is EngineState.READY and not self.draining

    def stalled_for(self) -> float:
        """Seconds the engine has made no progress while work was pending (0 when it is idle)."""
        engine = self.engine
        return time.monotonic() - engine.last_progress if engine.busy else 0.0

    @property
    def model_id(self) -> str:
        return self.settings.model.id

    def visible_to_caller(self, model_id: str) -> bool:
        """Whether the model exists and the calling tenant may use it (it sees no others)."""
        tenant = current_principal().tenant
        return model_id == self.model_id and (tenant is None or tenant.may_use(model_id))

    def require_model(self, model_id: str) -> None:
        if not self.visible_to_caller(model_id):
            raise ModelNotFound(
                f"The model `{model_id}` does not exist or you do not have access to it.", param="model"
            )

    @property
    def vocab(self) -> Vocabulary:
        """The vocabulary of the loaded model; a 503 while the model is still loading, or once the engine
        has stopped (a failed engine's worker is being replaced: another worker may serve the retry)."""
        if self.engine.served and not self.engine.alive:
            raise ServiceUnavailable(
                "This worker's engine has stopped and the worker is being replaced; retry the request.",
                code="engine_unavailable",
                retry_after=1,
            )
        if self.engine.state is not EngineState.READY or self.engine.vocab is None:
            raise ServiceUnavailable("The model is loading; retry shortly.", code="model_loading", retry_after=5)
        return self.engine.vocab

    def off_hub(self, function: Callable[..., T], *args: object) -> T:
        """Run a CPU-bound llama.cpp call (tokenizing a long prompt) on a native thread, not the hub."""
        return gevent.get_hub().threadpool.apply(function, args)

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        vocab = self.vocab
        return self.off_hub(lambda: vocab.tokenize(text, add_special=add_special))

    @cached_property
    def _chat_formatter(self) -> ChatFormatter | None:
        vocab = self.vocab  # a 503 while loading, and nothing is cached then
        model = self.engine.model
        assert model is not None
        choice = select_template(
            self.settings.model.chat_format,
            model.metadata("tokenizer.chat_template"),
            model.metadata("general.architecture"),
        )
        if choice is None:
            return None
        name, template = choice
        log.info("model %s: chat format %s", self.model_id, name)
        return ChatFormatter(
            template, name=name, bos_token=vocab.special_text(vocab.bos), eos_token=vocab.special_text(vocab.eos)
        )

    def render_chat(self, messages: list[Message]) -> str:
        try:
            formatter = self._chat_formatter
        except ChatFormatError:
            log.error(
                "model %s: no usable chat template for chat_format=%s", self.model_id, self.settings.model.chat_format
            )
            raise APIError("This server's chat format is misconfigured; see its log.") from None
        if formatter is None:
            raise InvalidRequest(
                f"The model `{self.model_id}` has no chat template; use /v1/completions or set chat_format.",
                param="messages",
            )
        try:
            return formatter.render(messages)
        except ChatFormatError as exc:
            raise InvalidRequest(str(exc), param="messages") from exc


def current_service() -> ModelService:
    service: ModelService = current_app.extensions[EXTENSION]
    return service
