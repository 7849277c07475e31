"""Turning a validated request into engine work, and engine output into a response.

Shared by completions and chat: JSON parsing with OpenAI errors, the model and context-length checks
made before anything is queued, sampling parameters, and the common run-then-respond flow (streamed or
not). Endpoint modules only say how their responses are shaped.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from flask import Response, after_this_request, current_app, jsonify, request
from pydantic import BaseModel, ValidationError

from llmserve.accounting import Origin, current_accounting
from llmserve.api import sse
from llmserve.api.disconnect import ClientWatch
from llmserve.api.resume import open_journal, resumable_response, wants_resumable
from llmserve.api.runner import Choice, GenerationRun, Update
from llmserve.api.schemas import GenerationRequest
from llmserve.engine.grammar import Grammar, GrammarError
from llmserve.engine.jobs import Fault, GenerationSpec, SamplingParams
from llmserve.errors import (
    APIError,
    ClientDisconnected,
    ContextLengthExceeded,
    EngineFailure,
    GrammarBudgetExceeded,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    from_validation_error,
)
from llmserve.metrics import current_metrics
from llmserve.models.judge import Outcome
from llmserve.models.registry import current_registry
from llmserve.models.routing import Route
from llmserve.models.served import ServedModel, off_hub
from llmserve.quotas import current_quotas
from llmserve.request_context import REQUEST_ID_HEADER, current_request
from llmserve.settings import EXTENSION as SETTINGS_EXTENSION
from llmserve.settings import Settings
from llmserve.tenancy import current_principal, current_tenant

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
# Bytes of request body from which its preparation runs off the hub (see ``off_hub_if_large``).
LARGE_BODY = 256 * 1024
FAULT_HEADER = "X-Fault-Drill"
SESSION_HEADER = "X-Session-Id"


def parse_body(model: type[M]) -> M:
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {request.mimetype or 'none'!r}.")
    # pydantic parses the JSON itself: strictly typed (``"4"`` is not a number), refusing invalid UTF-8
    # and lone surrogates, and with a depth limit instead of Python's recursion limit.
    data = request.get_data(cache=False)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(data) >= limit:
        # A chunked body is read only up to the limit (werkzeug stops there): what is left is the rest.
        raise PayloadTooLarge(f"The request body is larger than the {limit} bytes this server accepts.")
    current_request().large_body = len(data) > LARGE_BODY
    try:
        return off_hub_if_large(model.model_validate_json, data or b"null")
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise InvalidRequest("We could not parse the JSON body of your request.") from None
        if first["type"] == "model_type":
            raise InvalidRequest("The request body must be a JSON object.") from None
        raise from_validation_error(exc) from None


def off_hub_if_large(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on a native thread when the request's body is large (parsing it, turning its
    schemas into grammars, rendering its messages), so that the hub goes on serving other streams."""
    if not current_request().large_body:
        return function(*args)
    return off_hub(function, *args)


def requested_model(name: str, user: str | None) -> tuple[Route, ServedModel]:
    """The route of a request naming model or alias ``name`` (404 when the caller may not see it), and the
    model it leads to, held until the response has been sent (an unloaded model is freed only once
    nobody holds it). A session is the ``X-Session-Id`` header, else the body's ``user``."""
    route, model = current_registry().route(name, current_tenant().name, request.headers.get(SESSION_HEADER) or user)
    _hold(model)
    return route, model


def _hold(model: ServedModel) -> None:
    current_request().model = model.id
    model.hold()

    @after_this_request
    def _release_when_sent(response: Response) -> Response:
        response.call_on_close(model.release)
        return response


def answer(name: str, user: str | None, respond_with: Callable[[ServedModel], Response]) -> Response:
    """``respond_with`` the model the request's route leads to. A canary's failure before its response
    started (a 5xx) is counted against it and answered once by the alias's stable model instead, so the
    client sees no error from a bad canary."""
    route, model = requested_model(name, user)
    registry = current_registry()
    try:
        return respond_with(model)
    except Exception as exc:
        if (exc.status if isinstance(exc, APIError) else 500) < 500:
            raise
        registry.record(model, Outcome(time.monotonic(), failed=True))
        stable = registry.models.get(route.fallback) if route.fallback is not None else None
        if stable is None:
            raise
        log.warning("canary %s of %s failed before responding (%s); answered by %s", model.id, name, exc, stable.id)
        current_metrics().canary_retries.labels(route.alias).inc()
        _hold(stable)
        return respond_with(stable)


def ledger_request_id() -> str:
    """The request log's id, made unique when the client chose it: the ledger keeps one record per id,
    and a client that sent the same X-Request-ID twice must still pay for both requests."""
    request_id = current_request().request_id
    if request.headers.get(REQUEST_ID_HEADER) != request_id:
        return request_id  # generated by the server, unique already
    return f"{request_id[:96]}~{uuid.uuid4().hex[:16]}"


def endpoint_of(path: str) -> str:
    if path.endswith("/chat/completions"):
        return "chat.completions"
    return "embeddings" if path.endswith("/embeddings") else "completions"


def origin_of(model: ServedModel) -> Origin:
    """This request as its usage record describes it."""
    return Origin(
        request_id=ledger_request_id(),
        key_id=current_principal().key_id,
        endpoint=endpoint_of(request.path),
        started=current_request().started,
        model=model.id,
        model_version=model.version,
    )


def server_settings() -> Settings:
    settings: Settings = current_app.extensions[SETTINGS_EXTENSION]
    return settings


def sampling_params(body: GenerationRequest, vocab_size: int) -> SamplingParams:
    bias = []
    for token, value in (body.logit_bias or {}).items():
        if int(token) >= vocab_size:
            raise InvalidRequest(f"logit_bias names token {token}, beyond the vocabulary", param="logit_bias")
        bias.append((int(token), value))
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repeat_penalty=body.repeat_penalty,
        seed=body.seed,
        logit_bias=tuple(bias),
    )


def requested_fault(drills_allowed: bool) -> Fault | None:
    """The failure a fault drill asks for in the ``X-Fault-Drill`` header, honoured only when the
    ``fault_drills`` setting allows drills; otherwise the header means nothing."""
    name = request.headers.get(FAULT_HEADER)
    if not drills_allowed or name is None:
        return None
    try:
        return Fault(name)
    except ValueError:
        raise InvalidRequest(f"{FAULT_HEADER} must be one of {', '.join(Fault)}, got {name!r}.") from None


def output_budget(prompt_tokens: int, requested: int | None, context_length: int, default: int | None) -> int:
    """Tokens the model may generate; a 400 when the prompt, or prompt plus request, cannot fit."""
    if prompt_tokens >= context_length:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens. However, your prompt is "
            f"{prompt_tokens} tokens long.",
            param="messages" if request.path.endswith("chat/completions") else "prompt",
        )
    room = context_length - prompt_tokens
    if requested is not None and requested > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the "
            "completion). Please reduce the prompt or the completion length.",
            param="max_tokens",
        )
    limit = requested if requested is not None else default
    return min(limit, room) if limit is not None else room


def build_choices(
    model: ServedModel,
    body: GenerationRequest,
    prompts: list[tuple[int, ...]],
    *,
    requested: int | None,
    default_max_tokens: int | None,
    top_logprobs: int | None,
    grammar: str | None = None,
) -> list[Choice]:
    """One choice per prompt and per ``n``, indexed as the OpenAI API does (prompt-major). Choices of one
    prompt get consecutive seeds, so a seeded request with ``n`` > 1 still gets different choices."""
    generations = len(prompts) * body.n
    asks = f"This request asks for {generations} generations at once (prompts x n)"
    param = "n" if body.n > 1 else "prompt"
    slots = model.settings.parallel
    if generations > slots:
        raise InvalidRequest(f"{asks}; this server decodes at most {slots} together.", param=param)
    sampling = sampling_params(body, model.vocab.size)
    context_length = model.settings.context_length
    limits = current_tenant().limits
    if limits.max_running is not None and limits.max_queued is not None:
        most = limits.max_running + limits.max_queued
        if generations > most:
            raise InvalidRequest(f"{asks}; your organization may run and queue at most {most}.", param=param)
    cap = limits.max_tokens
    if cap is not None:
        if requested is not None and requested > cap:
            raise InvalidRequest(
                f"max_tokens is {requested}, and your organization may ask for at most {cap} per request.",
                param="max_tokens",
            )
        default_max_tokens = min(default_max_tokens or cap, cap)
    fault = requested_fault(server_settings().fault_drills)
    choices: list[Choice] = []
    for prompt_index, prompt in enumerate(prompts):
        budget = output_budget(len(prompt), requested, context_length, default_max_tokens)
        for offset in range(body.n):
            seed = None if sampling.seed is None else sampling.seed + offset
            spec = GenerationSpec(prompt, budget, replace(sampling, seed=seed), top_logprobs, grammar, fault)
            compiled = compile_grammar(model, grammar) if grammar is not None else None
            choices.append(Choice(len(choices), spec, body.stop_sequences, prompt_index, compiled))
    return choices


def compile_grammar(model: ServedModel, grammar: str) -> Grammar:
    """The choice's own grammar, compiled by llama.cpp on a native thread: neither the hub nor the engine
    thread (which every stream waits on) spends the time. llama.cpp refusing a grammar this server wrote
    is the server's error."""
    vocab = model.vocab
    try:
        return off_hub(Grammar, vocab, grammar, model.settings.grammar_scan_budget)
    except GrammarError:
        log.error("llama.cpp refused a generated grammar of %d bytes", len(grammar))
        raise APIError("The server could not compile the grammar for this request; see its log.") from None


class Renderer(Protocol):
    """How one endpoint shapes its output."""

    object_name: str
    chunk_object_name: str
    # Finish reasons the renderer reported instead of the engine's ("tool_calls"), by choice index, so
    # that the request log and the usage record say what the client was told.
    reported_finish_reasons: dict[int, str]

    def opening_chunks(self) -> list[dict[str, Any]]: ...

    def chunk_choices(self, update: Update) -> list[dict[str, Any]]:
        """The chunk choices one update streams as (a chat reply read for tool calls may need several)."""
        ...

    def final_choice(self, index: int, text: str, logprobs: list[Any], finish_reason: str) -> dict[str, Any]: ...


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def respond(
    model: ServedModel,
    body: GenerationRequest,
    choices: list[Choice],
    renderer: Renderer,
    response_id: str,
) -> Response:
    """Run the choices on the engine, then answer with one JSON body or an SSE stream.

    The tenant's token quota is reserved for the prompt and every choice's ``max_tokens`` before anything
    is queued; what the response did not use is given back when it is complete, or all of it if the
    request never got a slot.
    """
    settings = server_settings()
    if model.chaos_strikes():
        raise EngineFailure(f"The model `{model.id}` failed this request (its chaos_error_rate drill).")
    tenant = current_tenant()
    quotas = current_quotas()
    accounting = current_accounting()
    metrics = current_metrics()
    registry = current_registry()
    log_fields = current_request().log
    origin = origin_of(model)
    resumable = body.stream and wants_resumable(settings.streams.resumable)
    run = GenerationRun(
        model.engine,
        choices,
        tenant=tenant.name,
        heartbeat=settings.heartbeat_interval,
        admission_timeout=settings.queue_timeout + 5,
        # A resumable stream's client may leave and come back: the stream's writes notice it leaving.
        client_gone=(lambda: False) if resumable else ClientWatch(request.environ).gone,
    )
    prompt_tokens = run.usage.prompt_tokens
    reservation = quotas.reserve_tokens(
        tenant, prompt_tokens + sum(c.spec.max_tokens for c in choices), needed=prompt_tokens + len(choices)
    )
    journal = None
    try:
        journal = open_journal(response_id, tenant.name) if resumable else None
        run.admit()
    except BaseException as exc:
        run.close()
        quotas.settle(reservation, 0)
        accounting.record_generation(run, tenant.name, origin, {}, exc)
        if journal is not None:
            journal.delete()
        raise
    started = current_request().started

    def finish(error: BaseException | None = None) -> None:
        """Settle and record the request; for a resumable stream this may run after its response closed,
        so it uses only what it took from the request beforehand."""
        run.close()
        told = {**run.finish_reasons, **renderer.reported_finish_reasons}  # what the client was told
        quotas.settle(reservation, run.usage.prompt_tokens + run.usage.completion_tokens)
        metrics.record_request(model.id, tenant.name, run, started, time.monotonic())
        registry.record(model, _outcome(run, started, told, error))
        log_fields.update(_log_fields(model, run, choices, told, started, tenant.name, settings.log_prompts))
        resumed = journal is not None and journal.resumed()
        accounting.record_generation(run, tenant.name, origin, told, error, resumed=resumed)

    created = int(time.time())
    envelope = {"id": response_id, "created": created, "model": model.id}
    if body.stream:
        chunk_envelope = {**envelope, "object": renderer.chunk_object_name}
        chunks = _stream_chunks(run, renderer, chunk_envelope, body.include_usage)
        if journal is None:
            return sse.stream_response(chunks, finish)
        return resumable_response(chunks, finish, journal, model, settings.streams.grace, lambda: registry.draining)
    try:
        collected: dict[int, tuple[list[str], list[Any]]] = {c.index: ([], []) for c in choices}
        for update in run.updates():
            if update is not None:
                texts, logprobs = collected[update.index]
                texts.append(update.delta.text)
                logprobs.extend(update.delta.logprobs)
    except BaseException as exc:
        finish(exc)
        raise
    final = [
        renderer.final_choice(i, "".join(texts), logprobs, run.finish_reasons[i])
        for i, (texts, logprobs) in sorted(collected.items())
    ]
    finish()
    return jsonify({**envelope, "object": renderer.object_name, "choices": final, "usage": run.usage.as_dict()})


def _outcome(
    run: GenerationRun, started: float, finish_reasons: dict[int, str], error: BaseException | None
) -> Outcome:
    """What a generation that held a slot did, for the canary judge: an error other than the client
    leaving or the request's grammar exceeding its budget is a failure; the first choice's finish
    reason stands for the request."""
    failed = error is not None and not isinstance(error, ClientDisconnected | GrammarBudgetExceeded)
    return Outcome(
        at=time.monotonic(),
        failed=failed or run.cancelled_by == "engine_error",
        empty=not any(run.outputs),
        ttft=None if run.first_token_at is None else run.first_token_at - started,
        finish_reason=next(iter(finish_reasons.values()), None),
    )


def _milliseconds(start: float, end: float | None) -> float | None:
    return None if end is None else round((end - start) * 1000, 1)


def _log_fields(
    model: ServedModel,
    run: GenerationRun,
    choices: list[Choice],
    finish_reasons: dict[int, str],
    started: float,
    tenant: str,
    log_prompts: bool,
) -> dict[str, Any]:
    """The request log's view of a finished generation; prompt and output text only if so configured."""
    fields: dict[str, Any] = {
        "tenant": tenant,
        "model_version": model.version,
        "prompt_tokens": run.usage.prompt_tokens,
        "completion_tokens": run.usage.completion_tokens,
        "cached_tokens": run.usage.cached_tokens,
        "queue_ms": _milliseconds(started, run.admitted_at),
        "ttft_ms": _milliseconds(started, run.first_token_at),
        "finish_reason": ",".join(finish_reasons.get(c.index, run.cancelled_by or "error") for c in choices),
    }
    if log_prompts:
        prompts = {choice.prompt_index: choice.spec.prompt for choice in choices}
        fields["prompt"] = [model.vocab.detokenize(list(prompt)) for prompt in prompts.values()]
        fields["output"] = run.outputs
    return fields


def _stream_chunks(
    run: GenerationRun, renderer: Renderer, envelope: dict[str, Any], include_usage: bool
) -> Iterator[dict[str, Any] | None]:
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    for choice in renderer.opening_chunks():
        yield {**envelope, "choices": [choice], **extra}
    for update in run.updates():
        if update is None:
            yield None
            continue
        for choice in renderer.chunk_choices(update):
            yield {**envelope, "choices": [choice], **extra}
    if include_usage:
        yield {**envelope, "choices": [], "usage": run.usage.as_dict()}
