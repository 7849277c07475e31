"""The models a worker serves: what the API asks for "the model of this request".

Created by the app factory; ``start`` runs in the gunicorn worker after fork (``gunicorn.conf.py``'s
``post_worker_init``), never at import time or in the master: threads and model memory do not survive a
fork. Each model has its own engine thread and scheduler; their decodes take turns through one decode
gate per process (see ``llama_model.DecodeGate``).

The set follows the shared state file (``state``): each worker polls it once a second, loads a model
added there beside the running ones (requests for it get 503 ``model_loading`` until it is warm), and
unloads a model taken away: from then on it is not found, its queued requests are refused with a
retryable 503, its running generations finish (within ``graceful_timeout``), then its engine stops and,
once no response uses it any more, its weights are freed. Each worker writes what it serves to a status
file beside the state file, so that ``llmserve models status`` can show every worker's view.

A model that fails to load leaves the others serving: its requests get 503 ``model_unavailable`` and
``/readyz`` says which model failed. The worker is ready once no model is still loading and at least one
serves.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import gevent
import psutil
from flask import Flask, current_app
from gevent import monkey

from llmserve.errors import ModelNotFound
from llmserve.gpu import GpuMonitor
from llmserve.metrics import LLMMetrics
from llmserve.models.served import ServedModel, off_hub
from llmserve.models.state import ModelState, ModelStateError, WorkerStatus
from llmserve.settings import ModelSettings, Settings
from llmserve.tenancy import Tenancy, current_principal

log = logging.getLogger(__name__)

EXTENSION = "llmserve.models"
ENGINE_METRICS_INTERVAL = 1.0  # seconds between copies of the engines' state into the metrics
SYNC_INTERVAL = 1.0  # seconds between looks at the shared state file
UNLOAD_POLL = 0.1
_native_lock = monkey.get_original("_thread", "allocate_lock")


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: LLMMetrics, tenancy: Tenancy) -> None:
        self.metrics = metrics
        self._settings = settings
        self._tenancy = tenancy
        self._tenant_names = tuple(tenancy.tenants)
        self._gate = _native_lock()
        self._state = ModelState(settings.state_dir)
        self._status = WorkerStatus(settings.state_dir, os.getpid())
        self.models: dict[str, ServedModel] = {}
        self.unloading: dict[str, ServedModel] = {}
        try:
            desired = self._state.read().desired(settings.models)
        except ModelStateError as exc:
            log.error("%s; serving the configured models", exc)
            desired = settings.models
        for model in desired.values():
            self._add(model)
        self.draining = False

    def init_app(self, app: Flask) -> None:
        app.extensions[EXTENSION] = self

    def start(self) -> None:
        for model in self.models.values():
            model.engine.start()
        gevent.spawn(self._publish_metrics)
        gevent.spawn(self._follow_state)

    def stop(self) -> None:
        for model in [*self.models.values(), *self.unloading.values()]:
            model.engine.stop()
        self._status.remove()

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

    # -- following the state file ----------------------------------------------------------------

    def sync(self, desired: dict[str, ModelSettings]) -> None:
        """Load what ``desired`` adds and unload what it takes away; a model whose settings changed keeps
        its running ones (an unload and a load change them)."""
        for name in [name for name in self.models if name not in desired]:
            self._unload(name)
        for name, model in desired.items():
            if name not in self.models:
                log.info("model %s: loading beside the running models", name)
                self._add(model).engine.start()
            elif self.models[name].settings != model:
                log.warning("model %s: changed settings take effect once it is unloaded and loaded", name)

    def _add(self, model: ModelSettings) -> ServedModel:
        served = ServedModel(
            model,
            self._settings.cache_dir,
            queue_size=self._settings.queue_size,
            queue_timeout=self._settings.queue_timeout,
            shares=self._tenancy.shares(),
            policy=self._settings.scheduling,
            decode_gate=self._gate,
        )
        self.models[model.id] = served
        return served

    def _unload(self, name: str) -> None:
        model = self.models.pop(name)
        self.unloading[name] = model
        deadline = time.monotonic() + self._settings.graceful_timeout
        log.info("model %s: unloading once its running generations finish", name)
        model.engine.drain(deadline)
        gevent.spawn(self._finish_unload, model, deadline)

    def _finish_unload(self, model: ServedModel, deadline: float) -> None:
        while model.engine.busy and time.monotonic() < deadline + 1:
            gevent.sleep(UNLOAD_POLL)
        off_hub(model.engine.stop)  # waits for the engine thread to exit
        while model.holders:
            gevent.sleep(UNLOAD_POLL)
        model.free()
        self.metrics.forget_model(model.id, model.version, self._tenant_names)
        del self.unloading[model.id]
        log.info("model %s: unloaded", model.id)

    def _follow_state(self) -> None:
        """Converge on the state file's models, and report this worker's, while it serves."""
        seen: tuple[int, int] | None = self._state.stamp()
        reported: dict[str, Any] | None = None
        while not self.draining:
            stamp = self._state.stamp()
            if stamp != seen:
                seen = stamp
                try:
                    self.sync(self._state.read().desired(self._settings.models))
                except ModelStateError as exc:
                    log.error("%s; keeping the models served", exc)
            status = self.status()
            if status != reported:
                reported = status
                self._write_status(status)
            gevent.sleep(SYNC_INTERVAL)

    def status(self) -> dict[str, Any]:
        """This worker's models: each one's state and version."""
        models = {
            name: {"status": model.engine.state.value, "version": model.version} for name, model in self.models.items()
        }
        models |= {name: {"status": "unloading", "version": model.version} for name, model in self.unloading.items()}
        return {"pid": os.getpid(), "models": models}

    def _write_status(self, status: dict[str, Any]) -> None:
        try:
            self._status.write(status)
        except OSError as exc:
            log.warning("could not write %s: %s", self._status.path, exc)

    # -- metrics -----------------------------------------------------------------------------------

    def _publish_metrics(self) -> None:
        """Copy engine, process and GPU state into the metrics while this worker lives."""
        self.metrics.workers_alive.set(1)
        process = psutil.Process()
        gpus = GpuMonitor()
        while self.models or self.unloading:
            for model in [*self.models.values(), *self.unloading.values()]:
                engine = model.engine
                if model.ready and model.version is not None and model.id in self.models:
                    self.metrics.model_info.labels(model.id, model.version).set(1)
                kv_cells = engine.config.parallel * engine.config.context_length
                self.metrics.publish_engine(model.id, engine.stats(), engine.take_steps(), self._tenant_names, kv_cells)
            self.metrics.publish_process(process.memory_info().rss, gpus.read())
            gevent.sleep(ENGINE_METRICS_INTERVAL)

    # -- what the API asks -------------------------------------------------------------------------

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
