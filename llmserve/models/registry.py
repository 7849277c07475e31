"""The models a worker serves: what the API asks for "the model of this request".

Created by the app factory; ``start`` runs in the gunicorn worker after fork (``gunicorn.conf.py``'s
``post_worker_init``), never at import time or in the master: threads and model memory do not survive a
fork. Each model has its own engine thread and scheduler; their decodes take turns through one decode
gate per process (see ``llama_model.DecodeGate``).

The set follows the shared state file (``state``): each worker polls it once a second, loads a model
added there beside the running ones (requests for it get 503 ``model_loading`` until it is warm), and
unloads a model taken away: from then on it is not found, its queued requests are refused with a
retryable 503, its running generations finish (within ``graceful_timeout``), then its engine stops and,
once no response uses it any more, its weights are freed. Each worker writes what it serves, its load
and its recent activity (``activity``) to a status file beside the state file, so that ``llmserve models
status``, the agent check, ``GET /v1/status`` and the tenant views can show every worker's view.

Aliases (``[aliases.NAME]``, or set at runtime in the same state file) are client-facing names routed
to a stable model and, for a share of the sessions, a canary (``routing``). Every finished request
leaves an outcome per model; a judge compares each canary with its stable model once a second
(``judge``) and, when the canary is clearly worse, sets its weight to 0 in the state file: every worker
follows, and no new session reaches it. With ``promote_after``, a canary that stayed clean that long
becomes the stable model.

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

from llmserve.errors import ModelNotFound, ServiceUnavailable
from llmserve.gpu import GpuMonitor
from llmserve.ledger.native import allocate_lock
from llmserve.metrics import LLMMetrics
from llmserve.models import state
from llmserve.models.activity import WINDOW_SECONDS, Activity, ttft_view
from llmserve.models.judge import Outcome, Outcomes, verdict
from llmserve.models.routing import Route, route
from llmserve.models.served import ServedModel, off_hub
from llmserve.models.state import ModelState, ModelStateError, WorkerStatus, worker_statuses
from llmserve.scaling import desired_replicas
from llmserve.settings import AliasSettings, ModelSettings, Settings
from llmserve.standby import Standby
from llmserve.tenancy import Tenancy, current_principal

log = logging.getLogger(__name__)

EXTENSION = "llmserve.models"
ENGINE_METRICS_INTERVAL = 1.0  # seconds between copies of the engines' state into the metrics
SYNC_INTERVAL = 1.0  # seconds between looks at the shared state file
UNLOAD_POLL = 0.1


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: LLMMetrics, tenancy: Tenancy) -> None:
        self.metrics = metrics
        self._settings = settings
        self._tenancy = tenancy
        self._tenant_names = tuple(tenancy.tenants)
        self._gate = allocate_lock()  # a native lock: engine threads take it, never greenlets
        self._state = ModelState(settings.state_dir)
        self._status = WorkerStatus(settings.state_dir, os.getpid())
        self.models: dict[str, ServedModel] = {}
        self.unloading: dict[str, ServedModel] = {}
        self.outcomes = Outcomes()
        self.activity = Activity()
        self._canary_since: dict[str, float] = {}  # alias: when this worker first saw its canary take traffic
        try:
            changes = self._state.read()
        except ModelStateError as exc:
            log.error("%s; serving the configured models", exc)
            changes = state.ModelChanges()
        for model in changes.desired(settings.models).values():
            self._add(model)
        self.aliases: dict[str, AliasSettings] = changes.desired_aliases(settings.aliases)
        self.draining = False
        self._stopped = False

    def init_app(self, app: Flask) -> None:
        app.extensions[EXTENSION] = self

    def start(self) -> None:
        for model in self.models.values():
            model.engine.start()
        gevent.spawn(self._publish_metrics)
        gevent.spawn(self._follow_state)
        gevent.spawn(self._judge_canaries)

    def stop(self) -> None:
        self._stopped = True  # before anything yields: no status file is written after this
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
        if self.unloading.get(model.id) is model:  # not a namesake unloaded again since
            del self.unloading[model.id]
        if model.id not in self.models:  # a namesake loaded again keeps its figures
            self.outcomes.forget(model.id)
            self.activity.forget(model.id)
            self.metrics.forget_model(model.id, model.version, self._tenant_names)
        log.info("model %s: unloaded", model.id)

    def _follow_state(self) -> None:
        """Converge on the state file's models while this worker serves, and report its own until it stops
        (a draining worker's running requests still count in the tenant views)."""
        seen: tuple[int, int] | None = self._state.stamp()
        reported: dict[str, Any] | None = None
        while not self._stopped:
            stamp = self._state.stamp()
            if stamp != seen and not self.draining:
                seen = stamp
                try:
                    changes = self._state.read()
                    self.sync(changes.desired(self._settings.models))
                    self.aliases = changes.desired_aliases(self._settings.aliases)
                except ModelStateError as exc:
                    log.error("%s; keeping the models served", exc)
            for name, model in self.models.items():
                stats = model.engine.stats()
                self.activity.sample(name, stats.generated_tokens, stats.queued)
            status = self.status()
            if status != reported:
                reported = status
                self._write_status(status)
            gevent.sleep(SYNC_INTERVAL)

    def status(self) -> dict[str, Any]:
        """This worker's models: each one's state, version and load (what the balancer's agent reads), and
        their recent activity (what ``GET /v1/status`` sums)."""
        models = {name: self._model_status(model) for name, model in self.models.items()}
        models |= {name: {"status": "unloading", "version": model.version} for name, model in self.unloading.items()}
        return {"pid": os.getpid(), "models": models}

    def _write_status(self, status: dict[str, Any]) -> None:
        try:
            self._status.write(status)
        except OSError as exc:
            log.warning("could not write %s: %s", self._status.path, exc)

    def _model_status(self, model: ServedModel) -> dict[str, Any]:
        stats = model.engine.stats()
        recent = self.outcomes.recent(model.id, WINDOW_SECONDS)
        return {
            "status": model.engine.state.value,
            "version": model.version,
            "slots": stats.slots_total,
            "busy": stats.slots_busy,
            "queued": stats.queued,
            "drain": round(stats.jobs_per_second, 4),
            "tenants": {
                name: [load.running, load.queued] for name, load in stats.tenants.items() if load.running or load.queued
            },
            "activity": self.activity.view(model.id),
            "ttfts": ttft_view(outcome.ttft for outcome in recent if outcome.ttft is not None),
        }

    # -- canaries -----------------------------------------------------------------------------------

    def record(self, model: ServedModel, outcome: Outcome) -> None:
        """What one finished request of ``model`` did, for the judge and the per-version counters."""
        self.outcomes.record(model.id, outcome)
        self.metrics.model_requests.labels(model.id, model.version or "", "error" if outcome.failed else "ok").inc()

    def _judge_canaries(self) -> None:
        rules = self._settings.canary
        while not self.draining:
            now = time.monotonic()
            for name, alias in list(self.aliases.items()):
                if alias.canary is None or alias.canary_weight == 0:
                    self._canary_since.pop(name, None)
                    continue
                since = self._canary_since.setdefault(name, now)
                canary = self.outcomes.summary(alias.canary, rules.window, since)
                reason = verdict(canary, self.outcomes.summary(alias.stable, rules.window), rules)
                if reason is not None:
                    self._roll_back(name, alias, reason)
                elif self._promotable(alias, now - since, canary.requests):
                    self._promote(name, alias)
            gevent.sleep(rules.interval)

    def _promotable(self, alias: AliasSettings, clean_for: float, requests: int) -> bool:
        after = alias.promote_after
        return after is not None and clean_for >= after and requests >= self._settings.canary.min_requests

    def _roll_back(self, name: str, alias: AliasSettings, reason: str) -> None:
        try:
            changed = self._state.update(state.canary_weight_zero(name, alias))
        except ModelStateError as exc:
            log.error("alias %s: could not roll back canary %s: %s", name, alias.canary, exc)
            return
        self.aliases[name] = alias.model_copy(update={"canary_weight": 0.0})  # at once here, the others follow
        if changed:  # this worker's judgement made the change (another may have been first)
            self.metrics.canary_rollbacks.labels(name, alias.canary).inc()
            log.error("alias %s: canary %s rolled back to weight 0: %s", name, alias.canary, reason)

    def _promote(self, name: str, alias: AliasSettings) -> None:
        assert alias.canary is not None
        promoted = AliasSettings(stable=alias.canary)
        try:
            if self._state.update(state.set_alias(name, promoted)):
                log.info("alias %s: canary %s promoted to stable after a clean window", name, alias.canary)
        except ModelStateError as exc:
            log.error("alias %s: could not promote canary %s: %s", name, alias.canary, exc)

    # -- metrics -----------------------------------------------------------------------------------

    def _publish_metrics(self) -> None:
        """Copy engine, process and GPU state into the metrics while this worker lives."""
        self.metrics.workers_alive.set(1)
        process = psutil.Process()
        gpus = GpuMonitor()
        standby = Standby(self._settings.state_dir)
        while self.models or self.unloading:
            for model in [*self.models.values(), *self.unloading.values()]:
                engine = model.engine
                if model.ready and model.version is not None and model.id in self.models:
                    self.metrics.model_info.labels(model.id, model.version).set(1)
                kv_cells = engine.config.parallel * engine.config.context_length
                self.metrics.publish_engine(model.id, engine.stats(), engine.take_steps(), self._tenant_names, kv_cells)
            for name, alias in self.aliases.items():
                if alias.canary is not None:
                    self.metrics.canary_weight.labels(name, alias.canary).set(alias.canary_weight)
            self.metrics.publish_process(process.memory_info().rss, gpus.read())
            statuses = worker_statuses(self._settings.state_dir)  # the instance's: every worker's
            self.metrics.desired_replicas.set(desired_replicas(statuses, self._settings.scaling))
            self.metrics.standby.set(1 if standby.on else 0)
            gevent.sleep(ENGINE_METRICS_INTERVAL)

    # -- what the API asks -------------------------------------------------------------------------

    def visible(self) -> list[str]:
        """The model and alias names the calling tenant may use, models first (it sees no others)."""
        tenant = current_principal().tenant
        return [name for name in [*self.models, *self.aliases] if tenant is None or tenant.may_use(name)]

    def route(self, name: str, tenant: str, session: str | None) -> tuple[Route, ServedModel]:
        """Where a request naming ``name`` goes, and that model; a 404 for a name the tenant may not use.
        May a tenant use an alias, it may use the models the alias routes to. An alias whose canary is
        not served (unloaded, not loaded yet here) routes to its stable model."""
        self.require_visible(name)
        chosen = route(name, self.aliases.get(name), tenant, session)
        if chosen.model not in self.models and chosen.fallback is not None:
            chosen = Route(chosen.fallback, chosen.alias)
        model = self.models.get(chosen.model)
        if model is None:
            raise ServiceUnavailable(
                f"The model `{chosen.model}` behind `{name}` is not served here now.",
                code="model_unavailable",
                retry_after=5,
            )
        return chosen, model

    def backend(self, name: str) -> str | None:
        """What computes model ``name``, or the stable model of alias ``name``; None when not served here."""
        alias = self.aliases.get(name)
        model = self.models.get(alias.stable if alias is not None else name)
        return model.backend if model is not None else None

    def require_visible(self, name: str) -> None:
        """A 404 unless ``name`` is a model or alias the calling tenant may use."""
        principal = current_principal().tenant
        if (name not in self.models and name not in self.aliases) or (principal and not principal.may_use(name)):
            raise _not_found(name)


def _not_found(name: str) -> ModelNotFound:
    return ModelNotFound(f"The model `{name}` does not exist or you do not have access to it.", param="model")


def current_registry() -> ModelRegistry:
    registry: ModelRegistry = current_app.extensions[EXTENSION]
    return registry
