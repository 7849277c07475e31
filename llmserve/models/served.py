"""One served model as the HTTP layer sees it: its engine, readiness, version, tokenizer and chat format."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import gevent

from llmserve.chat_format import ChatFormatError, ChatFormatter, Message, select_template
from llmserve.engine.backend import Backend, LlamaBackend
from llmserve.engine.engine import Engine, EngineState
from llmserve.engine.llama_model import DecodeGate, Vocabulary
from llmserve.engine.simulated import SimulatedBackend
from llmserve.errors import APIError, InvalidRequest, ServiceUnavailable
from llmserve.models.files import ModelFile, locate
from llmserve.settings import ModelSettings
from scheduler import TenantShare
from scheduler.fair import Policy

log = logging.getLogger(__name__)

T = TypeVar("T")


def off_hub(function: Callable[..., T], *args: object) -> T:
    """Run CPU-bound work (tokenizing a long prompt, compiling a grammar) on a native thread, not the hub.
    An exception is raised here, on the hub, as if the call were local (gevent's pool would also print
    its traceback: a request that fails validation is no server error)."""

    def outcome() -> tuple[bool, T | BaseException]:
        try:
            return True, function(*args)
        except Exception as exc:
            return False, exc

    succeeded, value = gevent.get_hub().threadpool.apply(outcome)
    if not succeeded:
        assert isinstance(value, BaseException)
        raise value
    return value


def backend_of(settings: ModelSettings) -> Backend:
    """The backend a model's settings name; the simulated one only when asked for by name."""
    if settings.backend == "simulated":
        log.warning("model %s: SIMULATED backend: its answers are not the model's", settings.id)
        return SimulatedBackend(settings.simulation.step_times())
    return LlamaBackend()


class ServedModel:
    """A model and its engine thread. The GGUF file is located (and, when embedded, assembled and
    verified) on the engine thread, so its version is known once the engine is loading.

    Requests hold the model from the moment they name it until their response is sent (a stream keeps
    turning tokens into text with its vocabulary until then), so an unloaded model's weights are freed
    only once its engine has stopped and nobody holds it.
    """

    def __init__(
        self,
        settings: ModelSettings,
        cache_dir: Path,
        *,
        queue_size: int,
        queue_timeout: float,
        shares: Mapping[str, TenantShare],
        policy: Policy,
        decode_gate: DecodeGate,
    ) -> None:
        self.settings = settings
        self._cache_dir = cache_dir
        self.file: ModelFile | None = None
        self.holders = 0
        self.engine = Engine(
            settings.engine_config(),
            self._locate,
            backend_of(settings),
            queue_size=queue_size,
            queue_timeout=queue_timeout,
            shares=shares,
            policy=policy,
            decode_gate=decode_gate,
        )

    def chaos_strikes(self) -> bool:
        """Whether the ``chaos_error_rate`` drill fails this request."""
        return random.random() < self.settings.chaos_error_rate

    def hold(self) -> None:
        self.holders += 1

    def release(self) -> None:
        self.holders -= 1

    def free(self) -> None:
        """Free the weights of a stopped engine's model that nobody holds any more."""
        assert not self.engine.alive and self.holders == 0
        if self.engine.model is not None:
            self.engine.model.close()

    def _locate(self) -> Path:
        self.file = locate(self.settings, self._cache_dir)
        return self.file.path

    @property
    def id(self) -> str:
        return self.settings.id

    @property
    def version(self) -> str | None:
        """The GGUF's sha256 prefix (``sim-`` before it on the simulated backend, whose answers are not the
        file's); None until the engine has found the file."""
        if self.file is None:
            return None
        return f"sim-{self.file.version}" if self.simulated else self.file.version

    @property
    def backend(self) -> str:
        return self.engine.backend.name

    @property
    def simulated(self) -> bool:
        return self.settings.backend == "simulated"

    @property
    def ready(self) -> bool:
        return self.engine.state is EngineState.READY

    @property
    def failed_to_load(self) -> bool:
        return self.engine.state is EngineState.FAILED and not self.engine.served

    def stalled_for(self) -> float:
        """Seconds the engine has made no progress while work was pending (0 when it is idle)."""
        engine = self.engine
        return time.monotonic() - engine.last_progress if engine.busy else 0.0

    @property
    def vocab(self) -> Vocabulary:
        """The vocabulary of the loaded model; a 503 while the model is still loading, or once the engine
        has stopped (a failed engine's worker is being replaced: another worker may serve the retry)."""
        engine = self.engine
        if engine.served and not engine.alive:
            raise ServiceUnavailable(
                "This worker's engine has stopped and the worker is being replaced; retry the request.",
                code="engine_unavailable",
                retry_after=1,
            )
        if self.failed_to_load:
            raise ServiceUnavailable(
                f"The model `{self.id}` failed to load on this server; see its log.",
                code="model_unavailable",
                retry_after=30,
            )
        if engine.state is not EngineState.READY or engine.vocab is None:
            raise ServiceUnavailable("The model is loading; retry shortly.", code="model_loading", retry_after=5)
        return engine.vocab

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        vocab = self.vocab
        return off_hub(lambda: vocab.tokenize(text, add_special=add_special))

    @cached_property
    def _chat_formatter(self) -> ChatFormatter | None:
        vocab = self.vocab  # a 503 while loading, and nothing is cached then
        model = self.engine.model
        assert model is not None
        choice = select_template(
            self.settings.chat_format,
            model.metadata("tokenizer.chat_template"),
            model.metadata("general.architecture"),
        )
        if choice is None:
            return None
        name, template = choice
        log.info("model %s: chat format %s", self.id, name)
        return ChatFormatter(
            template, name=name, bos_token=vocab.special_text(vocab.bos), eos_token=vocab.special_text(vocab.eos)
        )

    def render_chat(self, messages: list[Message]) -> str:
        try:
            formatter = self._chat_formatter
        except ChatFormatError:
            log.error("model %s: no usable chat template for chat_format=%s", self.id, self.settings.chat_format)
            raise APIError(f"The chat format of model `{self.id}` is misconfigured; see the log.") from None
        if formatter is None:
            raise InvalidRequest(
                f"The model `{self.id}` has no chat template; use /v1/completions or set chat_format.",
                param="messages",
            )
        try:
            return formatter.render(messages)
        except ChatFormatError as exc:
            raise InvalidRequest(str(exc), param="messages") from exc
