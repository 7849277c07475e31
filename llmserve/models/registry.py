"""The models a worker serves: what the API asks for "the model of this request".

Created by the app factory; ``start`` runs in the gunicorn worker after fork (``gunicorn.conf.py``'s
``post_worker_init``), never at import time or in the master: threads and model memory do not survive a
fork. Each model has its own engine thread and scheduler; their decodes take turns through one decode
gate per process (see ``llama_model.DecodeGate``).

A model that fails to load leaves the others serving: its requests get 503 ``model_unavailable`` and
``/readyz`` says which model failed. The worker is ready once no model is still loading and at least one
serves.
"""

from __future__ import annotations

import logging

import gevent
import psutil
from flask import Flask, current_app
from gevent import monkey

from llmserve.errors import ModelNotFound
from llmserve.gpu import GpuMonitor
from llmserve.metrics import LLMMetrics
from llmserve.models.served import ServedModel
from llmserve.settings import Settings
from llmserve.tenancy import Tenancy, current_principal

log = logging.getLogger(__name__)

EXTENSION = "llmserve.models"
ENGINE_METRICS_INTERVAL = 1.0  # seconds between copies of the engines' state into the metrics
_native_lock = monkey.get_original("_thread", "allocate_lock")


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: LLMMetrics, tenancy: Tenancy) -> None:
        self.metrics = metrics
        self._tenant_names = tuple(tenancy.tenants)
        gate = _native_lock()
        self.models: dict[str, ServedModel] = {
            model_id: ServedModel(
                model,
                settings.cache_dir,
                queue_size=settings.queue_size,
                queue_timeout=settings.queue_timeout,
                shares=tenancy.shares(),
                policy=settings.scheduling,
                decode_gate=gate,
            )
            for model_id, model in settings.models.items()
        }
        self.draining = False

    def init_app(self, app: Flask) -> None:
        app.extensions[EXTENSION] = self

    def start(self) -> None:
        for model in self.models.values():
            model.engine.start()
        gevent.spawn(self._publish_metrics)

    def stop(self) -> None:
        for model in self.models.values():
            model.engine.stop()

    def drain(self, deadline: float) -> None:
        """Stop taking work: readiness turns 503, and running generations must end by ``deadline``."""
        self.draining = True
        for model in self.models.values():
            model.engine.drain(deadline)

    @property
    def loading(self) -> bool:
        return any(model.engine.alive and not model.ready for model in self.models.values())

    @property
    def ready(self) -> bool:
        """Every model loaded (or failed to), at least one serving, and not draining: what /readyz and
        systemd are told."""
        return not self.draining and not self.loading and any(model.ready for model in self.models.values())

    def _publish_metrics(self) -> None:
        """Copy engine, process and GPU state into the metrics while this worker lives."""
        self.metrics.workers_alive.set(1)
        process = psutil.Process()
        gpus = GpuMonitor()
        published_versions: set[str] = set()
        while any(model.engine.alive for model in self.models.values()):
            for model in self.models.values():
                engine = model.engine
                if model.version is not None and model.id not in published_versions and model.ready:
                    self.metrics.model_info.labels(model.id, model.version).set(1)
                    published_versions.add(model.id)
                kv_cells = engine.config.parallel * engine.config.context_length
                self.metrics.publish_engine(model.id, engine.stats(), engine.take_steps(), self._tenant_names, kv_cells)
            self.metrics.publish_process(process.memory_info().rss, gpus.read())
            gevent.sleep(ENGINE_METRICS_INTERVAL)

    def visible(self) -> list[ServedModel]:
        """The models the calling tenant may use, in configuration order (it sees no others)."""
        tenant = current_principal().tenant
        return [model for model in self.models.values() if tenant is None or tenant.may_use(model.id)]

    def get(self, model_id: str) -> ServedModel:
        """The model a request names; 404 ``model_not_found`` when it does not exist or the tenant may not
        use it (the two are told apart to nobody)."""
        tenant = current_principal().tenant
        model = self.models.get(model_id)
        if model is None or (tenant is not None and not tenant.may_use(model_id)):
            raise ModelNotFound(
                f"The model `{model_id}` does not exist or you do not have access to it.", param="model"
            )
        return model


def current_registry() -> ModelRegistry:
    registry: ModelRegistry = current_app.extensions[EXTENSION]
    return registry
