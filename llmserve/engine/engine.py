"""The engine: one native OS thread that owns the model and decodes every running sequence together.

Greenlets talk to it only through ``submit`` and ``cancel``; it answers through each job's event sink.
Each step builds one batch holding the next token of every decoding sequence plus a bounded chunk of
prompt for sequences being prefilled, runs one ``llama_decode``, samples each sequence (numpy, in
``sampling``), and only then tells the jobs their tokens. Jobs join and leave between steps. A free slot
is given to the job that the scheduler picks, preferring the slot whose cached tokens share the longest
prefix with the job's prompt.
"""

from __future__ import annotations

import _queue
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path

import numpy as np
from gevent import monkey

from llmserve.engine.backend import Backend, ContextSpec, DecodeContext, LoadedModel
from llmserve.engine.config import EngineConfig
from llmserve.engine.distribution import SamplingError, Scratch
from llmserve.engine.embedder import Embedder, EmbeddingLane
from llmserve.engine.grammar import GrammarBudgetExhausted, GrammarError
from llmserve.engine.jobs import (
    Admitted,
    EmbeddingSpec,
    Fault,
    Finished,
    FinishReason,
    GenerationSpec,
    Job,
    PrefixCopied,
    Rejected,
    RejectReason,
    Token,
)
from llmserve.engine.llama_model import DecodeGate, LlamaError, Vocabulary
from llmserve.engine.sampling import Sampler, greedy_token, token_logprob
from llmserve.engine.slots import Fed, Slot, charge_step, common_prefix, slot_for
from llmserve.engine.stats import EngineStats, StatsRecorder, StepSample, TenantLoad
from scheduler import DrainRate, FairScheduler, MonotonicClock, QueueFullError, TenantQueueFullError, TenantShare
from scheduler.fair import Policy

log = logging.getLogger(__name__)

# Real OS threads and locks even after gevent's monkey-patching (threading.Thread would be a greenlet).
_start_native_thread = monkey.get_original("_thread", "start_new_thread")
_native_lock = monkey.get_original("_thread", "allocate_lock")
_native_thread_id = monkey.get_original("_thread", "get_native_id")

IDLE_WAIT = 0.5  # seconds the idle engine sleeps on its inbox before it reports liveness again
# Copying another slot's KV cells copies that slot's whole cache stream; below this many shared tokens
# recomputing them is cheaper. Nor is reusing so short a prefix worth evicting another cached prompt.
MIN_SHARED_PREFIX = 64
SHUTTING_DOWN = Rejected(RejectReason.SHUTTING_DOWN, 1.0)  # what a job the engine will not run is told


class EngineState(StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    STOPPED = "stopped"
    FAILED = "failed"


class InjectedFault(Exception):
    """The engine thread's failure that a fault drill asked for."""


class Engine:
    """Continuous-batching engine for one model. ``start`` spawns the thread that loads and serves it."""

    def __init__(
        self,
        config: EngineConfig,
        model_path: Callable[[], Path],
        backend: Backend,
        *,
        queue_size: int,
        queue_timeout: float,
        shares: Mapping[str, TenantShare],
        policy: Policy = "fair",
        decode_gate: DecodeGate | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self._decode_gate = decode_gate
        self._model_path = model_path  # resolved on the engine thread: assembling a GGUF takes seconds
        self._queue_timeout = queue_timeout
        self._inbox: _queue.SimpleQueue[Job | None] = _queue.SimpleQueue()
        self._clock = MonotonicClock()
        self._scheduler: FairScheduler[Job] = FairScheduler(self._clock, max_queued=queue_size, policy=policy)
        self._scheduler.configure(shares)
        # Embedding requests wait in a scheduler of their own, with the same caps, shares and timeouts, for
        # the one embedding lane: its decodes alternate with the generation steps.
        embed_scheduler: FairScheduler[Job] = FairScheduler(self._clock, max_queued=queue_size, policy=policy)
        embed_scheduler.configure(shares)
        self._drain = DrainRate(self._clock)
        self._tenant_drain: dict[str, DrainRate] = {}
        self._slots = [Slot(i) for i in range(config.parallel)]
        self._admissions = 0  # jobs admitted so far: orders the slots by last use
        self._stats = StatsRecorder(config.parallel)
        self._embeddings = EmbeddingLane(embed_scheduler, self._stats, self._record_finished)
        self._stopping = False
        self._drain_deadline: float | None = None
        # What a step tells its jobs, held until all its rows are sampled: a greenlet woken by the first
        # row's token would take the GIL from the rows still sampling (numpy releases it between
        # operations), and a Finished needs the step's time charged first.
        self._outbox: list[tuple[Job, Token | FinishReason]] | None = None
        self._scratch: Scratch | None = None
        self._exited = _native_lock()
        self.state = EngineState.STARTING
        self.served = False  # it has been ready: a failure from then on is not one of loading the model
        self.failure: str | None = None
        self.model: LoadedModel | None = None
        self.vocab: Vocabulary | None = None
        self.thread_id: int | None = None
        self.last_progress = time.monotonic()

    # -- the greenlet side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._exited.acquire()
        _start_native_thread(self._run, ())

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def cancel(self, job: Job, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """End a job wherever it is; its slot is free again before the next step."""
        job.stop_reason = reason
        self._inbox.put(None)

    def drain(self, deadline: float) -> None:
        """Refuse new and queued jobs from now on, and end running ones at ``deadline`` (monotonic)."""
        self._drain_deadline = deadline
        self._inbox.put(None)

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask the thread to finish its jobs as cancelled and free the model; True once it has exited."""
        self._stopping = True
        self._inbox.put(None)
        if self.state == EngineState.STARTING:
            return True
        exited = self._exited.acquire(True, timeout)
        if exited:
            self._exited.release()
        return exited

    @property
    def alive(self) -> bool:
        return self.state in (EngineState.STARTING, EngineState.LOADING, EngineState.READY)

    @property
    def busy(self) -> bool:
        """Whether any job is queued or running (the watchdog only judges progress while busy)."""
        stats = self._stats.snapshot
        return stats.slots_busy > 0 or stats.queued > 0 or self._embeddings.job is not None

    def stats(self) -> EngineStats:
        return self._stats.snapshot

    def take_steps(self) -> list[StepSample]:
        """Decode steps (duration, batch size) since the last call, for the metrics."""
        return self._stats.take_steps()

    # -- the engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        self.thread_id = _native_thread_id()
        context: DecodeContext | None = None
        embedder: Embedder | None = None
        try:
            self.state = EngineState.LOADING
            started = time.monotonic()
            self.model = self.backend.load(self._model_path(), gpu_layers=self.config.gpu_layers)
            self.vocab = self.model.vocab
            spec = ContextSpec(
                n_ctx=self.config.context_length * self.config.parallel,
                n_batch=self.config.batch_tokens,
                n_seq_max=self.config.parallel,
                threads=self.config.threads,
            )
            context = self.backend.context(self.model, spec, self._decode_gate)
            if self.config.embeddings:
                embedder = Embedder(self.backend, self.model, self.config, self._decode_gate)
            self._warm_up(context, embedder)
            self._stats.model_load_seconds = time.monotonic() - started
            log.info(
                "engine %s: ready in %.1fs (%d slots x %d tokens, %s backend)",
                self.config.id,
                self._stats.model_load_seconds,
                self.config.parallel,
                self.config.context_length,
                self.backend.name,
            )
            self.state = EngineState.READY
            self.served = True
            self._loop(context, embedder)
            self.state = EngineState.STOPPED
        except Exception as exc:
            log.exception("engine %s: failed", self.config.id)
            self.failure = str(exc)
            self.state = EngineState.FAILED
        finally:
            self._fail_everything()
            if embedder is not None:
                embedder.close()
            if context is not None:
                context.close()
            # The model itself stays loaded until the process exits: greenlets may still be turning
            # already-delivered tokens into text with its vocabulary.
            self._exited.release()

    def _warm_up(self, context: DecodeContext, embedder: Embedder | None) -> None:
        """One tiny decode, so the first request does not pay for lazy allocations."""
        assert self.vocab is not None
        tokens = self.vocab.tokenize("Hello", add_special=True)
        context.clear_batch()
        for position, token in enumerate(tokens):
            context.add(token, position, 0, position == len(tokens) - 1)
        context.decode()
        context.forget(0)
        if embedder is not None:
            embedder.embed((tuple(tokens),))

    def _loop(self, context: DecodeContext, embedder: Embedder | None) -> None:
        while not self._stopping:
            self.last_progress = time.monotonic()
            idle = (
                self._embeddings.job is None
                and all(slot.job is None for slot in self._slots)
                and not len(self._scheduler)
                and not len(self._embeddings.scheduler)
            )
            self._take_inbox(context, block=idle)
            self._apply_drain()
            self._drop_cancelled_and_expired()
            self._admit(context)
            self._publish()  # before the work, so that a step that hangs shows its jobs as pending
            if self._embeddings.job is not None and embedder is not None:
                self._embeddings.step(embedder)
            if any(slot.computing for slot in self._slots):
                self._step(context)
            self._publish()

    def _publish(self) -> None:
        busy = [slot for slot in self._slots if slot.job is not None]
        self._stats.publish(
            busy=len(busy),
            prefilling=sum(1 for slot in busy if slot.prefilling),
            kv_cells=sum(len(slot.cached) for slot in self._slots),
            queued=len(self._scheduler) + len(self._embeddings.scheduler),
            jobs_per_second=self._drain.per_second,
            tenants={
                tenant: TenantLoad(
                    self._scheduler.running(tenant) + self._embeddings.scheduler.running(tenant),
                    self._scheduler.queued(tenant) + self._embeddings.scheduler.queued(tenant),
                    counter,
                )
                for tenant, counter in self._scheduler.counters().items()
            },
        )

    def _take_inbox(self, context: DecodeContext, *, block: bool) -> None:
        """Take every new job; each gets a free slot at once if there is one, so only jobs that must
        wait count against the queue's size."""
        try:
            item = self._inbox.get(timeout=IDLE_WAIT) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._accept(item)
                    self._admit(context)
                item = self._inbox.get_nowait()
        except _queue.Empty:
            pass

    def _accept(self, job: Job) -> None:
        if self._drain_deadline is not None:
            job.sink.push(SHUTTING_DOWN)
            return
        if isinstance(job.spec, EmbeddingSpec):
            scheduler, free = self._embeddings.scheduler, self._embeddings.free
        else:
            scheduler, free = self._scheduler, sum(1 for slot in self._slots if slot.job is None)
        try:
            scheduler.submit(job, tenant=job.tenant, timeout=self._queue_timeout, free_slots=free)
        except TenantQueueFullError:
            self._stats.rejected += 1
            waiting = scheduler.queued(job.tenant)
            job.sink.push(Rejected(RejectReason.TENANT_QUEUE_FULL, self._drain_of(job.tenant).retry_after(waiting)))
        except QueueFullError:
            self._stats.rejected += 1
            job.sink.push(Rejected(RejectReason.QUEUE_FULL, self._drain.retry_after(len(scheduler))))

    def _record_finished(self, job: Job) -> None:
        """Count a finished job in the drain rates that Retry-After estimates come from."""
        self._drain.record_finished()
        self._drain_of(job.tenant).record_finished()

    def _drain_of(self, tenant: str) -> DrainRate:
        """How fast this tenant's jobs finish: its queue drains at its share of the engine, not all of it."""
        drain = self._tenant_drain.get(tenant)
        if drain is None:
            drain = self._tenant_drain[tenant] = DrainRate(self._clock)
        return drain

    def _apply_drain(self) -> None:
        """While draining nothing waits, since a slot may not free before the deadline; at the deadline
        whatever still runs ends, and its client gets an error rather than a cut connection."""
        if self._drain_deadline is None:
            return
        for scheduler in (self._scheduler, self._embeddings.scheduler):
            for job in scheduler.jobs():
                scheduler.remove(job)
                job.sink.push(SHUTTING_DOWN)
        if time.monotonic() < self._drain_deadline:
            return
        for slot in self._slots:
            if slot.job is not None:
                self._retire(slot, FinishReason.CANCELLED)
        if self._embeddings.job is not None:
            self._embeddings.end(FinishReason.CANCELLED)

    def _drop_cancelled_and_expired(self) -> None:
        for scheduler in (self._scheduler, self._embeddings.scheduler):
            for job in scheduler.jobs():
                if job.cancelled:
                    scheduler.remove(job)
                    self._stats.cancelled += 1
                    job.sink.push(Finished(FinishReason.CANCELLED, job.engine_seconds))
            for job in scheduler.expired():
                self._stats.rejected += 1
                job.sink.push(Rejected(RejectReason.QUEUE_TIMEOUT, self._drain.retry_after(len(scheduler))))
        if self._embeddings.job is not None and self._embeddings.job.cancelled:
            self._embeddings.end(FinishReason.CANCELLED)
        for slot in self._slots:
            if slot.job is not None and slot.job.stop_reason is not None:
                self._retire(slot, slot.job.stop_reason)

    def _admit(self, context: DecodeContext) -> None:
        self._embeddings.admit()
        self._resolve_donors(context)
        free = [slot for slot in self._slots if slot.job is None]
        while free:
            job = self._scheduler.next()
            if job is None:
                return
            assert isinstance(job.spec, GenerationSpec)
            spec = job.spec
            # Reuse the longest cached prefix; the last prompt token is always decoded again for logits.
            slot = slot_for(self._slots, free, spec.prompt, MIN_SHARED_PREFIX)
            free.remove(slot)
            self._admissions += 1
            slot.admitted = self._admissions
            reuse = context.forget(slot.index, min(common_prefix(slot.cached, spec.prompt), len(spec.prompt) - 1))
            del slot.cached[reuse:]
            slot.job, slot.spec, slot.prefilled, slot.generated = job, spec, reuse, 0
            slot.sampler = self._sampler(job)
            self._stats.cached_prompt_tokens += reuse
            # Charged now rather than as it is decoded, so that slots freed together are not all given to
            # one tenant before its prompt shows in its counter. Reused tokens cost nothing to compute.
            self._scheduler.charge(job, prompt_tokens=len(spec.prompt) - reuse)
            job.sink.push(Admitted(cached_tokens=reuse))
            donor, shared = self._best_donor(slot)
            if shared >= reuse + MIN_SHARED_PREFIX:
                slot.donor, slot.shared = donor, shared
                self._resolve_donors(context)

    def _sampler(self, job: Job) -> Sampler | None:
        """The sequence's sampler, with the grammar the request side compiled; None for greedy decoding
        without a grammar (a numpy argmax in ``_sample``)."""
        assert self.vocab is not None and isinstance(job.spec, GenerationSpec)
        if job.grammar is None and job.spec.sampling.greedy:
            return None
        return Sampler(job.spec.sampling, self._scratch_for(self.vocab), job.grammar)

    def _scratch_for(self, vocab: Vocabulary) -> Scratch:
        """The vocabulary-sized buffers every sampler of this thread shares (they run one at a time)."""
        if self._scratch is None:
            self._scratch = Scratch(vocab.size)
        return self._scratch

    def _best_donor(self, slot: Slot) -> tuple[Slot | None, int]:
        """The other slot that holds, or is computing, the longest prefix of ``slot``'s prompt.

        ``n`` choices of one request, and requests with one long system prompt, then compute their
        common prefix once: the other slots copy its KV cells instead of decoding it again.
        """
        assert slot.spec is not None
        prompt = slot.spec.prompt
        best: tuple[Slot | None, int] = (None, 0)
        for other in self._slots:
            if other is slot or other.donor is not None:
                continue
            source = other.spec.prompt if other.spec is not None and other.prefilling else other.cached
            shared = min(common_prefix(source, prompt), len(prompt) - 1)
            if shared > best[1]:
                best = (other, shared)
        return best

    def _resolve_donors(self, context: DecodeContext) -> None:
        """Copy the prefix into slots whose donor has computed it (or has stopped computing it); those
        slots then feed the rest of their prompt themselves."""
        for slot in self._slots:
            donor = slot.donor
            if donor is None or slot.spec is None:
                continue
            if donor.spec is not None and donor.prefilling and len(donor.cached) < slot.shared:
                continue  # the donor is still computing it (checked before the scan, which runs each step)
            available = min(common_prefix(donor.cached, slot.spec.prompt), slot.shared)
            if available < slot.shared and donor.spec is not None and donor.prefilling:
                continue  # the donor is still computing it
            slot.donor = None
            if available > slot.prefilled:
                context.copy_sequence(donor.index, slot.index, available)
                slot.cached[:] = donor.cached[:available]
                self._stats.cached_prompt_tokens += available - slot.prefilled
                assert slot.job is not None
                slot.job.sink.push(PrefixCopied(cached_tokens=available - slot.prefilled))
                slot.prefilled = available

    def _step(self, context: DecodeContext) -> None:
        active = [slot for slot in self._slots if slot.computing]
        self._drill({slot.spec.fault for slot in active if slot.spec is not None})
        started = time.perf_counter()
        outbox: list[tuple[Job, Token | FinishReason]] = []
        self._outbox = outbox
        try:
            fed = self._fill_batch(context, active)
            batch_size = context.batch_size
            try:
                context.decode()
            except LlamaError as error:
                self._decode_one_by_one(context, fed, error)
            else:
                self._sample_outputs(context, fed)
            seconds = time.perf_counter() - started
            self._stats.record_step(seconds, batch_size)
            charge_step(seconds, [entry.job for entry in fed], [entry.tokens for entry in fed])
        finally:
            self._outbox = None
            for job, event in outbox:
                self._tell(job, event)
        self._resolve_donors(context)

    def _drill(self, faults: set[Fault | None]) -> None:
        """The engine-wide failures fault drills ask for (a sequence's own is fed in ``_fill_batch``)."""
        if Fault.ENGINE in faults:
            raise InjectedFault("fault drill: the engine thread fails")
        while Fault.STALL in faults and not self._stopping:
            time.sleep(IDLE_WAIT)

    def _fill_batch(self, context: DecodeContext, active: Sequence[Slot]) -> list[Fed]:
        """Put the next token of every generating slot, then prompt chunks of prefilling ones up to the
        batch's capacity, into a cleared batch; each slot's ``output_row`` says which logits are its."""
        assert self.vocab is not None
        context.clear_batch()
        fed = []
        for slot in active:
            assert slot.job is not None and slot.spec is not None
            fed.append(Fed(slot, slot.job, 0 if slot.prefilling else 1, len(slot.cached), slot.prefilled))
            slot.output_row = -1
            if not slot.prefilling:
                slot.output_row = context.outputs
                # A fault drill's token id outside the vocabulary, which llama.cpp refuses for this batch.
                token = self.vocab.size if slot.spec.fault is Fault.SEQUENCE else slot.next_token
                context.add(token, len(slot.cached), slot.index, True)
                slot.cached.append(slot.next_token)
        budget = context.capacity - context.batch_size
        for entry in fed:
            slot = entry.slot
            if budget <= 0:
                break
            if not slot.prefilling:
                continue
            assert slot.spec is not None
            prompt = slot.spec.prompt
            chunk_end = min(len(prompt), slot.prefilled + budget)
            if chunk_end == len(prompt):
                slot.output_row = context.outputs  # only the chunk's last token asks for logits
            for position in range(slot.prefilled, chunk_end):
                context.add(prompt[position], position, slot.index, position == len(prompt) - 1)
            slot.cached.extend(prompt[slot.prefilled : chunk_end])
            entry.tokens = chunk_end - slot.prefilled
            budget -= chunk_end - slot.prefilled
            self._stats.prompt_tokens += chunk_end - slot.prefilled
            slot.prefilled = chunk_end
        return fed

    def _sample_outputs(self, context: DecodeContext, fed: Sequence[Fed]) -> None:
        logits = context.logits()
        for entry in fed:
            if entry.slot.output_row >= 0 and entry.slot.job is entry.job:
                self._sample(logits[entry.slot.output_row], entry.slot)

    def _decode_one_by_one(self, context: DecodeContext, fed: Sequence[Fed], error: LlamaError) -> None:
        """A decode failed, and llama.cpp does not say for which sequence's input: undo the step and decode
        each sequence's part alone, so that only the sequences whose own decode fails end (with an error)."""
        log.warning("engine %s: %s; decoding its %d sequences one by one", self.config.id, error, len(fed))
        for entry in fed:
            self._undo(context, entry)
        for entry in fed:
            if entry.slot.job is not entry.job:
                continue  # retired by the undo
            self._fill_batch(context, [entry.slot])
            try:
                context.decode()
            except LlamaError as own:
                log.error("engine %s: job %d stopped: %s", self.config.id, entry.job.id, own)
                self._undo(context, entry)
                if entry.slot.job is entry.job:
                    self._retire(entry.slot, FinishReason.ERROR)
                continue
            self._sample_outputs(context, [entry])

    def _undo(self, context: DecodeContext, entry: Fed) -> None:
        """Take back what ``entry`` put into the KV cache this step (cells a failed decode may have left)."""
        slot = entry.slot
        kept = context.forget(slot.index, entry.cached_before)
        del slot.cached[kept:]
        self._stats.prompt_tokens -= slot.prefilled - entry.prefilled_before
        slot.prefilled = min(entry.prefilled_before, kept)
        if kept < entry.cached_before and slot.job is entry.job:
            self._retire(slot, FinishReason.ERROR)  # its cache could not be cut back: it cannot go on

    def _tell(self, job: Job, event: Token | FinishReason) -> None:
        """Push ``event`` to the job now, or at the end of the step that is sampling."""
        if self._outbox is not None:
            self._outbox.append((job, event))
        elif isinstance(event, FinishReason):
            job.sink.push(Finished(event, job.engine_seconds, job.failure))
        else:
            job.sink.push(event)

    def _sample(self, logits: np.ndarray, slot: Slot) -> None:
        assert slot.job is not None and slot.spec is not None
        assert self.vocab is not None
        if slot.sampler is None:
            token = greedy_token(logits, slot.spec.sampling.logit_bias)
        else:
            try:
                token = slot.sampler.sample(logits)
            except (GrammarError, SamplingError) as exc:  # this sequence's own row: it alone ends
                log.error("engine %s: job %d stopped: %s", self.config.id, slot.job.id, exc)
                if isinstance(exc, GrammarBudgetExhausted):
                    slot.job.failure = str(exc)
                self._retire(slot, FinishReason.ERROR)
                return
        logprob = None
        if slot.spec.top_logprobs is not None:
            logprob = token_logprob(logits, token, slot.spec.top_logprobs, self._scratch_for(self.vocab))
        slot.generated += 1
        slot.next_token = token
        self._stats.generated_tokens += 1
        self._scheduler.charge(slot.job, generated_tokens=1)
        self._tell(slot.job, Token(token, logprob))
        if self.vocab.is_end_of_generation(token):
            self._retire(slot, FinishReason.STOP)
        elif slot.generated >= slot.spec.max_tokens or len(slot.cached) + 1 >= self.config.context_length:
            self._retire(slot, FinishReason.LENGTH)

    def _retire(self, slot: Slot, reason: FinishReason) -> None:
        assert slot.job is not None
        self._tell(slot.job, reason)
        if reason is FinishReason.CANCELLED:
            self._stats.cancelled += 1
        self._scheduler.release(slot.job)
        self._record_finished(slot.job)
        if slot.sampler is not None:
            slot.sampler.close()
        slot.job, slot.spec, slot.sampler, slot.output_row, slot.donor = None, None, None, -1, None

    def _fail_everything(self) -> None:
        """Leave no waiting client behind when the thread ends, however it ends."""
        for slot in self._slots:
            if slot.job is not None:
                self._retire(slot, FinishReason.ERROR if self.state == EngineState.FAILED else FinishReason.CANCELLED)
        if self._embeddings.job is not None:
            self._embeddings.end(FinishReason.ERROR if self.state == EngineState.FAILED else FinishReason.CANCELLED)
        for job in self._scheduler.jobs() + self._embeddings.scheduler.jobs():
            job.sink.push(SHUTTING_DOWN)
        try:
            while True:
                item = self._inbox.get_nowait()
                if item is not None:
                    item.sink.push(SHUTTING_DOWN)
        except _queue.Empty:
            pass
