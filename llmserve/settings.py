"""The one settings model, read by the CLI, gunicorn.conf.py and the app alike.

Sources, strongest first: ``LLMSERVE_*`` environment variables (nested fields with ``__``, e.g.
``LLMSERVE_MODEL__CONTEXT_LENGTH``), then the TOML file named by ``LLMSERVE_CONFIG``, then defaults.
The CLI turns its options into those environment variables, so the gunicorn master and every worker
see exactly the same settings.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from llmserve.engine.config import EngineConfig, StepTimes
from llmserve.ledger.prices import PriceSettings
from llmserve.ledger.settings import LedgerSettings
from llmserve.models.manifest import SHA256, ManifestEntry, read_manifest
from llmserve.proxies import networks
from llmserve.resumable import JournalLimits

CONFIG_ENV_VAR = "LLMSERVE_CONFIG"
EXTENSION = "llmserve.settings"  # where the app factory keeps the settings, for the request handlers
ENV_PREFIX = "LLMSERVE_"


def available_cpus() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def _default_state_dir() -> Path:
    """systemd's ``StateDirectory=`` when run as a unit, else the user's XDG state directory."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "llmserve"


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
TENANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class TenantSettings(BaseModel):
    """One tenant's share of the model and its limits; every limit left out is not enforced."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(1.0, gt=0, le=1000, description="Share of the model's tokens under contention.")
    priority: Literal["interactive", "batch"] = Field(
        "interactive", description="Interactive tenants are served before batch tenants."
    )
    requests_per_minute: int | None = Field(None, ge=1, description="Requests per minute.")
    tokens_per_minute: int | None = Field(None, ge=1, description="Prompt plus completion tokens per minute.")
    max_running: int | None = Field(None, ge=1, description="Sequences decoding at once.")
    max_queued: int | None = Field(None, ge=0, description="Requests waiting for a slot.")
    max_tokens: int | None = Field(None, ge=1, description="Largest max_tokens; also the default.")
    models: tuple[str, ...] = Field((), description="Model ids this tenant may use; empty: all.")


EmbeddedModelName = Literal["gemma-3-270m", "smollm2-135m-instruct"]
EMBEDDED_MODELS: tuple[EmbeddedModelName, ...] = ("gemma-3-270m", "smollm2-135m-instruct")
MODEL_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
# The fields that say which model a [model] table is, rather than how to serve it.
IDENTITY_FIELDS = frozenset({"id", "path", "embedded"})


class SimulationSettings(BaseModel):
    """The step-time model of the simulated backend. The defaults are a fit of Gemma 3 270M's llama.cpp
    steps on two CPU threads (``bench/calibrate.py`` measures them for any model and host)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step_seconds: float = Field(0.0128, ge=0, le=10, description="Fixed cost of one decode step.")
    sequence_seconds: float = Field(0.0084, ge=0, le=10, description="Cost per sequence decoding a token.")
    prompt_token_seconds: float = Field(0.0034, ge=0, le=10, description="Cost per prompt token computed.")

    def step_times(self) -> StepTimes:
        return StepTimes(**self.model_dump())


class ModelSettings(BaseModel):
    """One GGUF model, served by an engine of its own in each worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field("gemma-3-270m", pattern=MODEL_ID, description="Model id clients send.")
    path: Path | None = Field(None, description="GGUF file; empty serves an embedded model.")
    embedded: EmbeddedModelName | None = Field(
        None, description="Embedded model to serve when no path is given; empty: gemma-3-270m."
    )
    chat_format: Literal["auto", "gguf", "gemma", "chatml"] = Field(
        "auto", description="Chat turn format: the GGUF's template, or a named family format."
    )
    context_length: int = Field(4096, ge=128, le=1_048_576, description="Tokens per sequence (prompt+output).")
    parallel: int = Field(8, ge=1, le=256, description="Sequence slots decoded together in one batch.")
    threads: int = Field(
        default_factory=available_cpus,
        ge=1,
        le=1024,
        description="CPU threads for decode, per worker; default: the CPUs divided among the workers.",
    )
    batch_tokens: int = Field(512, ge=32, le=65_536, description="Most tokens in one engine step.")
    gpu_layers: int = Field(0, ge=-1, le=10_000, description="Layers offloaded to a GPU (-1 all).")
    embeddings: bool = Field(True, description="Serve /v1/embeddings from a second, pooled context.")
    grammar_scan_budget: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="Seconds of the engine thread one sequence's grammar may spend matching the whole vocabulary "
        "(when it allows none of the 4,096 likeliest tokens); past them the sequence ends with an error.",
    )
    embedding_context: int = Field(2048, ge=64, le=65_536, description="Longest embedding input in tokens.")
    backend: Literal["llama.cpp", "simulated"] = Field(
        "llama.cpp",
        description="What computes the model: llama.cpp, or a step-time simulation for fleet tests and benchmarks "
        "(its answers are not the model's; never for production).",
    )
    simulation: SimulationSettings = Field(
        default_factory=SimulationSettings, description="Step times of the simulated backend."
    )
    sha256: str | None = Field(
        None,
        pattern=SHA256,
        description="The GGUF's expected SHA-256 (from model_manifest, or set here); a file whose hash differs "
        "is refused.",
    )
    chaos_error_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of this model's generation requests failed with a 500 engine_error before their first "
        "token, to rehearse a bad version (a canary rollback). Never on in production.",
    )

    @model_validator(mode="after")
    def _every_slot_fits_a_step(self) -> ModelSettings:
        if self.path is not None and self.embedded is not None:
            raise ValueError(f"model {self.id!r}: set path or embedded, not both")
        if self.batch_tokens < self.parallel:
            raise ValueError(
                f"batch_tokens ({self.batch_tokens}) must be at least parallel ({self.parallel}): "
                "each step decodes one token of every slot"
            )
        return self

    def engine_config(self) -> EngineConfig:
        """The fields the engine is told about, by the same names."""
        return EngineConfig(**self.model_dump(include={field.name for field in dataclasses.fields(EngineConfig)}))


class AliasSettings(BaseModel):
    """A client-facing model name served by a stable model and, optionally, a canary taking a share of the
    sessions (blue-green: the canary at 100, then promoted)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stable: str = Field(pattern=MODEL_ID, description="The model that serves the alias.")
    canary: str | None = Field(None, pattern=MODEL_ID, description="A model given canary_weight of the sessions.")
    canary_weight: float = Field(0.0, ge=0, le=100, description="Percent of sessions routed to the canary.")
    promote_after: float | None = Field(
        None,
        gt=0,
        le=86_400,
        description="Seconds of clean canary traffic after which it becomes stable; empty: by hand.",
    )

    @model_validator(mode="after")
    def _canary_differs(self) -> AliasSettings:
        if self.canary == self.stable:
            raise ValueError(f"the canary of an alias must differ from its stable model ({self.stable!r})")
        return self


class CanarySettings(BaseModel):
    """When a canary is clearly worse than its stable model: its weight is set to 0 automatically."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_requests: int = Field(20, ge=1, le=100_000, description="Canary requests before its TTFT is judged.")
    significance: float = Field(
        0.001,
        gt=0,
        lt=1,
        description="Chance below which a canary within the limits would fail as often as it does: then it is "
        "rolled back.",
    )
    window: float = Field(60.0, gt=0, le=3600, description="Seconds of requests judged.")
    interval: float = Field(1.0, gt=0, le=60, description="Seconds between judgements.")
    max_error_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Canary error share that rolls it back, when also above stable's times the factor.",
    )
    error_rate_factor: float = Field(2.0, ge=1, le=100, description="How many times stable's error share that is.")
    max_empty_rate: float = Field(0.2, ge=0, le=1, description="Share of empty outputs, judged the same way.")
    ttft_factor: float = Field(3.0, ge=1, le=100, description="Canary TTFT p99 above stable's times this rolls back...")
    min_ttft_seconds: float = Field(1.0, ge=0, le=600, description="...when it is also above this many seconds.")
    golden_set: Path | None = Field(
        None, description="JSON Lines of prompts and expected answers a canary must pass before it gets traffic."
    )
    golden_margin: float = Field(
        0.0, ge=0, le=1, description="How far below stable's golden-set score a canary may be and still pass."
    )


class ScalingSettings(BaseModel):
    """What ``llmserve_desired_replicas`` aims at (``llmserve.scaling``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_utilisation: float = Field(
        0.8, gt=0, le=1, description="Share of the slots an instance should keep busy, leaving headroom."
    )
    target_queue_wait: float = Field(
        2.0, gt=0, le=600, description="Seconds within which the queue should be gone at the measured drain rate."
    )


class StreamSettings(BaseModel):
    """Resumable streams (``api.resume``): how long a stream waits for its client, and how much it may keep."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resumable: bool = Field(
        False, description="Make every stream resumable, as if each request sent X-Stream-Resumable: true."
    )
    grace: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Seconds a resumable stream's generation goes on with nobody reading it, and its events are "
        "kept after it ended; more than heartbeat_interval.",
    )
    buffer_bytes: int = Field(
        4 * 1024 * 1024, ge=4096, le=1 << 30, description="Bytes of events one resumable stream may keep."
    )
    tenant_bytes: int = Field(
        256 * 1024 * 1024,
        ge=4096,
        le=1 << 40,
        description="Bytes one tenant's resumable streams may reserve: a running one its buffer, an ended one "
        "its events.",
    )
    total_bytes: int = Field(
        1024 * 1024 * 1024, ge=4096, le=1 << 40, description="Bytes all resumable streams may reserve so."
    )

    def limits(self, heartbeat: float) -> JournalLimits:
        return JournalLimits(self.grace, self.buffer_bytes, self.tenant_bytes, self.total_bytes, heartbeat)


def keyless_refusal(address: str) -> str:
    """Why a server without API keys will not listen on ``address``, and what to do instead."""
    return (
        f"{address} is not a loopback address and no tenants are configured, so anyone who can reach it could "
        "use the model. Configure [tenants.NAME] and create keys with `llmserve keys create --tenant NAME`, "
        "bind to 127.0.0.1, or set allow_unauthenticated = true if an authenticating proxy guards the port"
    )


class Settings(BaseSettings):
    """Server settings; every field bounded and described."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", min_length=1, description="Address to bind.")
    port: int = Field(8000, ge=1, le=65_535, description="TCP port to bind.")
    workers: int = Field(1, ge=1, le=64, description="gunicorn worker processes; each loads the model.")
    worker_connections: int = Field(1000, ge=10, le=100_000, description="Open connections per worker.")
    graceful_timeout: int = Field(30, ge=1, le=3600, description="Seconds to finish requests on stop.")
    agent_port: int | None = Field(
        None, ge=1, le=65_535, description="TCP port of HAProxy's agent check, on the host address; unset: off."
    )
    drain_notice: float = Field(
        3.0,
        ge=0,
        le=300,
        description="With agent_port: seconds between the first SIGTERM and closing the listeners, while the agent "
        "tells the balancers to drain (at least twice their agent-inter).",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "llmserve", description="Rebuildable files (the assembled embedded model)."
    )
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=1 << 30, description="Largest request body.")
    queue_size: int = Field(256, ge=0, le=100_000, description="Requests that may wait for a free slot.")
    queue_timeout: float = Field(60.0, gt=0, le=3600, description="Seconds a request may wait for a slot.")
    heartbeat_interval: float = Field(5.0, gt=0, le=300, description="Seconds between SSE keep-alives.")
    watchdog_timeout: float = Field(60.0, gt=0, le=3600, description="Engine stall that fails /healthz.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per line; text: for a terminal."
    )
    log_prompts: bool = Field(False, description="Log prompts and outputs (off: they may hold personal data).")
    model: ModelSettings = Field(
        default_factory=ModelSettings,
        description="With [models.NAME] tables: defaults for every model. Alone: the one model served when it "
        "sets path, embedded or id; else its fields apply to every embedded model, all of which are served.",
    )
    models: dict[str, ModelSettings] = Field(
        default_factory=dict,
        description="The models served, by the id clients send; none configured: see model.",
    )
    state_dir: Path = Field(
        default_factory=_default_state_dir, description="Durable state: API keys, the usage ledger."
    )
    tenants: dict[str, TenantSettings] = Field(
        default_factory=dict, description="Tenants by name; none configured: single tenant, no API keys."
    )
    allow_unauthenticated: bool = Field(
        False, description="Serve without API keys on a non-loopback address (behind an authenticating proxy)."
    )
    fault_drills: bool = Field(
        False,
        description="Honour the X-Fault-Drill request header (sequence: that request's decode fails after its "
        "first token; engine: the engine thread fails; stall: it stops making progress), to rehearse "
        "failures. Never on in production.",
    )
    metrics_networks: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="With tenants: client networks that may read /metrics and /readyz's engine details without "
        "the admin key (a request a proxy forwarded, with X-Forwarded-For or Forwarded, never counts).",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks of the balancers in front: from them, X-Forwarded-For names the "
        "client (per-address limits, the request log); from anyone else it is ignored.",
    )
    scheduling: Literal["fair", "fifo"] = Field(
        "fair", description="Who gets a free slot: weighted fair share of tokens, or first come first served."
    )
    rate_limit_storage: str = Field(
        "memory://", description="Quota counters: memory:// (per worker) or redis://host:port/db (shared)."
    )
    rate_limit_timeout: float = Field(
        0.5, gt=0, le=30, description="Seconds a quota call waits for Redis (connect or answer) before failing open."
    )
    key_store: Literal["file", "ledger"] = Field(
        "file",
        description="Where API keys live: STATE_DIR/keys.json, or the ledger's database, shared by the replicas "
        "of a fleet that share it.",
    )
    key_refresh_interval: float = Field(
        2.0,
        gt=0,
        le=300,
        description="With key_store = ledger: seconds until a created or revoked key holds everywhere.",
    )
    auth_failures_per_minute: int = Field(
        30, ge=1, le=100_000, description="Failed API-key attempts per client address before 429s."
    )
    ledger: LedgerSettings = Field(
        default_factory=LedgerSettings, description="The usage ledger: storage, write interval, backups."
    )
    aliases: dict[str, AliasSettings] = Field(
        default_factory=dict, description="Client-facing model names with a stable model and an optional canary."
    )
    canary: CanarySettings = Field(default_factory=CanarySettings, description="Automatic canary rollback.")
    streams: StreamSettings = Field(default_factory=StreamSettings, description="Resumable streams.")
    scaling: ScalingSettings = Field(
        default_factory=ScalingSettings, description="The scaling signal autoscalers read (llmserve_desired_replicas)."
    )
    memory_budget_mib: int | None = Field(
        None,
        ge=64,
        le=1 << 30,
        description="MiB the models may take on this host (weights once, KV caches and buffers per worker); a "
        "model load that would exceed it is refused. Empty: no limit.",
    )
    prices: PriceSettings = Field(
        default_factory=PriceSettings, description="Prices per model, recorded with each request's cost."
    )
    console: bool = Field(
        True, description="Serve the browser console at / (status, playground, tenants and usage); off: / is a 404."
    )
    model_manifest: Path | None = Field(
        None,
        description="A model manifest (llmserve models manifest): each model it lists must have its SHA-256.",
    )
    standby: bool = Field(
        False,
        description="Start in warm standby: models loaded and warm, the agent check answering drain until "
        "POST /v1/admin/activate or llmserve activate.",
    )

    @model_validator(mode="before")
    @classmethod
    def _split_cpus_among_workers(cls, data: Any) -> Any:
        """Unless set, each worker decodes with its share of the CPUs. ggml's threads spin-wait for each
        other at every operation: two workers each running a thread per CPU made one run 15 times slower
        than one thread each (docs/engine.md)."""
        if not isinstance(data, dict):
            return data
        try:
            workers = max(1, int(data.get("workers", 1)))
        except (TypeError, ValueError):
            return data  # the field's own validation says what is wrong
        threads = max(1, available_cpus() // workers)
        model = data.get("model")
        if model is None:
            return {**data, "model": {"threads": threads}}
        if isinstance(model, dict) and "threads" not in model:
            return {**data, "model": {**model, "threads": threads}}
        if isinstance(model, ModelSettings) and "threads" not in model.model_fields_set:
            return {**data, "model": model.model_copy(update={"threads": threads})}
        return data

    @property
    def oversubscribed(self) -> bool:
        """More decode threads in all workers together than CPUs: they then slow each other down. A
        worker's models take turns to decode, so a worker needs the threads of its largest model."""
        return self.workers * max(model.threads for model in self.models.values()) > available_cpus()

    @model_validator(mode="after")
    def _streams_outlast_heartbeats(self) -> Settings:
        """A generating stream touches its journal at every heartbeat; one quiet for ``grace`` is taken
        for lost, so the grace must be longer."""
        if self.streams.grace <= self.heartbeat_interval:
            raise ValueError(
                f"streams.grace ({self.streams.grace}s) must be longer than heartbeat_interval "
                f"({self.heartbeat_interval}s): a stream quiet that long would be taken for lost"
            )
        return self

    @model_validator(mode="after")
    def _serve_the_configured_models(self) -> Settings:
        """Fill ``models`` with the set served: the [models.NAME] tables, each over the [model] defaults; or
        the one model a [model] table names (its path, embedded model or id); or every embedded model."""
        names_a_model = bool(self.model.model_fields_set & IDENTITY_FIELDS)
        if self.models:
            if names_a_model:
                raise ValueError(
                    "model.id, model.path and model.embedded name the single model served; with [models.NAME] "
                    "tables set them in those tables ([model] then holds defaults for every model)"
                )
            served = {}
            for name, entry in self.models.items():
                if "id" in entry.model_fields_set and entry.id != name:
                    raise ValueError(f"models.{name}.id is {entry.id!r}: a model's id is its table's name")
                own = {field: getattr(entry, field) for field in entry.model_fields_set}
                try:
                    served[name] = self.model_over_defaults(name, own)
                except ValidationError as exc:  # each part was valid alone: say which model the whole is
                    problems = "; ".join(error["msg"] for error in exc.errors())
                    raise ValueError(f"models.{name} with the [model] defaults: {problems}") from None
        elif names_a_model:
            served = {self.model.id: self.model}
        else:
            served = {name: self.model_over_defaults(name, {"embedded": name}) for name in EMBEDDED_MODELS}
        for name in served:
            if not re.match(MODEL_ID, name):
                raise ValueError(f"model name {name!r} must match {MODEL_ID}")
        for name in self.aliases:
            if not re.match(MODEL_ID, name) or name in served:
                raise ValueError(f"alias {name!r} must match {MODEL_ID} and differ from every model's name")
        if self.model_manifest is not None:
            served = _with_manifest_hashes(served, read_manifest(self.model_manifest))
        object.__setattr__(self, "models", served)  # frozen: the set is settled here, once
        return self

    def model_over_defaults(self, name: str, fields: dict[str, Any]) -> ModelSettings:
        """Model ``name`` with ``fields`` over the [model] defaults (a ``ValidationError`` if invalid): how
        a [models.NAME] table, and a model loaded at runtime, become settings."""
        defaults = {field: getattr(self.model, field) for field in self.model.model_fields_set - IDENTITY_FIELDS}
        return ModelSettings(**{**defaults, **fields, "id": name})

    @model_validator(mode="after")
    def _keys_guard_public_addresses(self) -> Settings:
        for name in self.tenants:
            if not re.match(TENANT_NAME, name):
                raise ValueError(f"tenant name {name!r} must match {TENANT_NAME}")
        if self.loopback_only and self.host not in LOOPBACK_HOSTS:
            raise ValueError(keyless_refusal(f"host {self.host!r}"))
        try:
            networks(self.trusted_proxies)
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: {exc}") from None
        if self.key_store == "ledger" and not self.ledger.enabled:
            raise ValueError("key_store = 'ledger' keeps the keys in the ledger's database: enable [ledger]")
        return self

    @property
    def multi_tenant(self) -> bool:
        """API keys are required exactly when tenants are configured."""
        return bool(self.tenants)

    @property
    def loopback_only(self) -> bool:
        """Without API keys, and not told that a proxy authenticates, the server listens on loopback only."""
        return not self.tenants and not self.allow_unauthenticated

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the TOML file, which load_settings passes as init values.
        return env_settings, init_settings


def _with_manifest_hashes(
    models: dict[str, ModelSettings], manifest: dict[str, ManifestEntry]
) -> dict[str, ModelSettings]:
    """Each model the manifest lists, expecting its hash; a model whose own sha256 says otherwise is an error."""
    hashed = {}
    for name, model in models.items():
        entry = manifest.get(name)
        if entry is not None and model.sha256 not in (None, entry.sha256):
            raise ValueError(f"models.{name}.sha256 differs from the model manifest's ({entry.sha256})")
        hashed[name] = model if entry is None else model.model_copy(update={"sha256": entry.sha256})
    return hashed


class SettingsError(Exception):
    """Settings that cannot be used; the message names every bad value and where it came from."""


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc


def _describe(error: dict[str, Any], config_file: Path | None) -> str:
    location = [str(part) for part in error["loc"]]
    env_name = ENV_PREFIX + "__".join(location).upper()
    source = (
        f"{env_name}"
        if env_name in os.environ
        else (f"{'.'.join(location)} in {config_file}" if config_file else env_name)
    )
    return f"  {source}: {error['msg']} (got {error.get('input')!r})"


def load_settings(config_file: Path | None = None) -> Settings:
    """Read settings from the TOML file (argument or LLMSERVE_CONFIG) and the environment."""
    if config_file is None and os.environ.get(CONFIG_ENV_VAR):
        config_file = Path(os.environ[CONFIG_ENV_VAR])
    file_values = _read_toml(config_file) if config_file else {}
    try:
        return Settings(**file_values)
    except ValidationError as exc:
        lines = [_describe(dict(error), config_file) for error in exc.errors()]
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None
