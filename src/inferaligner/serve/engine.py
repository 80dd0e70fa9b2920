"""The serving engines' shared parts, and the batch scheduler: each batch runs to its end, its rows gated alone.

`Engine` owns the bounded request queue, the worker thread and the drain on shutdown; a scheduler subclass decides
how queued jobs reach the model. `BatchEngine` takes the oldest waiting job, adds every waiting job with the same
sampling settings (up to `max_batch`, waiting at most `batch_wait_s` for company) and generates the batch with
`generate`, each row's gate read inside the prefill (`InferAligner.try_one_pass`) and its plan reported before its
first token. A stopping criterion reads each new token per row (`read_token`): it streams text deltas to that
request, applies its stop strings and token limit, and ends rows whose client has gone. When a request asks for
log-probabilities, a logits processor keeps each step's log-softmax of the (steered) model's own distribution:
`generate` runs it before temperature, top-k and top-p. The continuous scheduler (`inferaligner.serve.continuous`)
reads tokens and reports log-probabilities the same way.

A batch that fails before any of its rows produced a token is run again one row at a time, so one bad request
fails alone and never takes its batch neighbours with it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from inferaligner.aligner import InferAligner
from inferaligner.errors import InferAlignerError
from inferaligner.gate import GateDecision
from inferaligner.plan import Action, Plan
from inferaligner.prompts import pad_rows
from inferaligner.serve.openmp import release_openmp_threads
from inferaligner.serve.settings import DEFAULTS
from inferaligner.turns import TurnFormat, prompt_turns

log = logging.getLogger("inferaligner.serve")


class QueueFull(Exception):
    """The request queue is at its limit."""


class Draining(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Planned:
    """The job's gate decision and action are known (`job.gate`, `job.intervened`): the first event of a job."""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its log-probability and the most likely alternatives at its step."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New answer text, and the log-probabilities of the tokens it completes (when the request asked)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Failed:
    """Generation failed; `message` says why."""

    message: str


@dataclass(frozen=True)
class Done:
    """The job is over (`job.finish_reason` says how): the last event of a job."""


Event = Planned | TextDelta | Failed | Done


@dataclass
class Job:
    """One request's work and the channel its events go back on."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    aligned: bool
    loop: asyncio.AbstractEventLoop
    top_logprobs: int | None = None  # alternatives per token; None: no log-probabilities
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    gate: GateDecision | None = None
    intervened: bool = False
    planned: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)
    unsent: list[TokenLogprob] = field(default_factory=list)
    created: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)  # when each generated token was read (perf_counter)
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of being prefilled
    chat: bool = True  # a chat prompt (the gate reads its user and system turns), else raw text (read whole)
    turns: list[list[int]] | None = None  # what a "turns" gate reads of the prompt (`gate_turns` fills it in)

    @property
    def sampling(self) -> tuple[float, float]:
        return (self.temperature, self.top_p) if self.temperature > 0 else (0.0, 1.0)

    def send_text(self, text: str) -> None:
        """Emit new text with the log-probabilities gathered since the last text."""
        self.emit(TextDelta(text, tuple(self.unsent)))
        self.unsent = []

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shut down): nobody is listening
            self.cancelled.set()


def read_token(job: Job, token: int, tokenizer: Any, eos_ids: set[int], logprobs: torch.Tensor | None) -> None:
    """One new token of `job`: stream the text it completes, apply the job's stop strings and token limit, and keep
    its log-probability (from `logprobs`, the step's log-softmax for this row) when the job asked for them."""
    if token in eos_ids:
        job.finish_reason = "stop"
        return
    job.tokens.append(token)
    job.token_times.append(time.perf_counter())
    if job.top_logprobs is not None and logprobs is not None:
        entry = _logprob(tokenizer, logprobs, token, job.top_logprobs)
        job.logprobs.append(entry)
        job.unsent.append(entry)
    text = tokenizer.decode(job.tokens, skip_special_tokens=True)
    if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
        text = job.text
    for stop in job.stops:
        cut = text.find(stop)
        if cut >= 0:
            text, job.finish_reason = text[:cut], "stop"
    if len(text) > len(job.text) or (job.unsent and job.finish_reason is not None):
        job.send_text(text[len(job.text) :])
        job.text = text
    if job.finish_reason is None and len(job.tokens) >= job.max_tokens:
        job.finish_reason = "length"
        if job.unsent:
            job.send_text("")


def _logprob(tokenizer: Any, logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    best = torch.topk(logprobs, top) if top else None
    alternatives = (
        tuple(
            (tokenizer.decode([i]), float(v)) for v, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)
        )
        if best is not None
        else ()
    )
    return TokenLogprob(tokenizer.decode([token]), float(logprobs[token]), alternatives)


class _LogprobRecorder(LogitsProcessor):
    """Keeps the log-softmax of each step's scores (the model's own: `generate` applies temperature, top-k and top-p
    after it); changes nothing."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _RowTracker(StoppingCriteria):
    """Reads each step's new token per row: streams text, applies stops and limits, ends cancelled rows."""

    def __init__(
        self,
        jobs: list[Job],
        tokenizer: Any,
        prompt_length: int,
        eos_ids: set[int],
        recorder: _LogprobRecorder | None = None,
    ) -> None:
        self.jobs, self.tokenizer, self.prompt_length, self.eos_ids = jobs, tokenizer, prompt_length, eos_ids
        self.recorder = recorder

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = []
        for row, job in enumerate(self.jobs):
            if job.finish_reason is None:
                if job.cancelled.is_set():
                    job.finish_reason = "cancelled"
                elif input_ids.shape[1] > self.prompt_length:
                    last = (
                        self.recorder.last[row]
                        if self.recorder is not None and self.recorder.last is not None
                        else None
                    )
                    read_token(job, int(input_ids[row, -1]), self.tokenizer, self.eos_ids, last)
            done.append(job.finish_reason is not None)
        return torch.tensor(done, device=input_ids.device)

    def rows_stopped(self, rows: list[int]) -> None:
        """Rows another criterion ended (the loop stop on steered rows): they are finished, as if by EOS."""
        for row in rows:
            if self.jobs[row].finish_reason is None:
                self.jobs[row].finish_reason = "stop"


def check_limits(max_batch: int, batch_wait_s: float, max_queue: int) -> None:
    """Raise a one-line error unless the batching limits make sense."""
    if max_batch < 1 or max_queue < 1 or not 0 <= batch_wait_s < float("inf"):
        raise InferAlignerError(
            f"The server needs --max-batch >= 1 (got {max_batch}), --max-queue >= 1 (got {max_queue}) and a batch "
            f"wait of 0 ms or more (got {batch_wait_s * 1000:g})."
        )


def eos_ids(aligner: InferAligner) -> set[int]:
    """The token ids that end an answer: the generation config's and the tokenizer's."""
    eos = aligner.model.generation_config.eos_token_id
    return (set(eos if isinstance(eos, list) else [eos]) | {aligner.tokenizer.eos_token_id}) - {None}


def gate_turns(aligner: InferAligner, jobs: Sequence[Job]) -> list[list[list[int]]] | None:
    """What a `"turns"` gate reads of each job's whole prompt (`InferAligner.prompt_turns`: a chat's user and system
    turns, a raw prompt whole); `None` for any other gate."""
    if aligner.reader is None:
        return None
    for job in jobs:
        if job.turns is None:
            job.turns = prompt_turns(aligner.tokenizer, job.prompt_ids, chat=job.chat)
    return [job.turns for job in jobs]  # type: ignore[misc]


def report_plan(jobs: Sequence[Job], plan: Plan) -> None:
    """Tell each job its gate decision and action (once), and answer the rows the plan answers itself."""
    for job, row in zip(jobs, plan, strict=True):
        if not job.planned:
            job.gate, job.intervened, job.planned = row.gate, row.intervened, True
            log.info("gate %s (action: %s)", row.gate, row.action.value)
            job.emit(Planned())
        if row.answer is not None:  # a fixed answer needs no generation
            job.emit(TextDelta(row.answer))
            job.text, job.finish_reason = row.answer, "stop"


def finish(jobs: Sequence[Job]) -> None:
    """Send each job its last event."""
    for job in jobs:
        if job.unsent:  # log-probabilities of tokens whose text never grew (e.g. a last partial character)
            job.send_text("")
        job.finish_reason = job.finish_reason or "stop"
        job.emit(Done())


class Engine:
    """The request queue and worker thread around one `InferAligner`; a scheduler subclass runs the model."""

    scheduler = ""

    def __init__(
        self,
        aligner: InferAligner,
        *,
        max_batch: int = DEFAULTS.max_batch,
        batch_wait_s: float = DEFAULTS.batch_wait_s,
        max_queue: int = DEFAULTS.max_queue,
        on_batch: Sequence[Callable[[int], None]] = (),
    ) -> None:
        check_limits(max_batch, batch_wait_s, max_queue)
        self.aligner = aligner
        # What reads the turns is set up here, before the worker and the server's threads share the tokenizer.
        TurnFormat.of(aligner.tokenizer)
        _ = aligner.reader
        self.max_batch, self.batch_wait_s, self.max_queue = max_batch, batch_wait_s, max_queue
        self.on_batch = list(on_batch)  # each is told the size of every batch the engine runs (metrics, tests)
        self._pending: deque[Job] = deque()
        self._condition = threading.Condition()
        self._running = 0
        self._draining = False
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running_rows(self) -> int:
        return self._running

    @property
    def in_flight(self) -> int:
        return len(self._pending) + self._running

    def start(self) -> None:
        """Start the worker thread; the calling thread's idle OpenMP threads are ended first, so the worker's own
        pool has the cores to itself (`inferaligner.serve.openmp`)."""
        release_openmp_threads()
        self._thread = threading.Thread(target=self._work, name="inferaligner-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Take no new requests, finish the queued ones, then end the worker."""
        with self._condition:
            self._draining = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._condition:
            if self._draining:
                raise Draining
            if len(self._pending) >= self.max_queue:
                raise QueueFull
            self._pending.append(job)
            self._condition.notify()

    def _collect(self, capacity: int, *, block: bool, same_sampling: bool = False) -> list[Job] | None:
        """Up to `capacity` waiting jobs, oldest first (with `same_sampling`, only those sampled like the first).
        With `block`, wait for a first job (`None` once draining with nothing queued), then up to `batch_wait_s`
        for company; without, take only the jobs waiting now."""
        with self._condition:
            while block and not self._pending:
                if self._draining:
                    return None
                self._condition.wait(0.5)
            jobs: list[Job] = []
            deadline = time.monotonic() + (self.batch_wait_s if block else 0.0)
            while len(jobs) < capacity:
                match = next(
                    (job for job in self._pending if not (same_sampling and jobs) or job.sampling == jobs[0].sampling),
                    None,
                )
                if match is not None:
                    self._pending.remove(match)
                    jobs.append(match)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._draining:
                    break
                self._condition.wait(remaining)
            self._running += len(jobs)  # counted as running from here, so `in_flight` never misses them
            return jobs

    def _work(self) -> None:
        raise NotImplementedError


class BatchEngine(Engine):
    """Batches of waiting requests, each generated to its end before the next batch starts."""

    scheduler = "batch"

    def _work(self) -> None:
        while (batch := self._collect(self.max_batch, block=True, same_sampling=True)) is not None:
            live = [job for job in batch if not job.cancelled.is_set()]
            for job in batch:
                if job.cancelled.is_set():
                    job.finish_reason = "cancelled"
            try:
                if live:
                    for observe in self.on_batch:
                        observe(len(live))
                    self._run_isolated(live)
            finally:
                finish(batch)
                with self._condition:
                    self._running = 0

    def _run_isolated(self, jobs: list[Job]) -> None:
        """Run a batch; if it fails before any unfinished row produced a token, run those rows one at a time, so
        the failure stays with the request that caused it. Failed rows get a `Failed` event; the worker lives on."""
        try:
            self._run(jobs)
            return
        except Exception as exc:
            log.exception("batch of %d failed", len(jobs))
            open_rows = [job for job in jobs if job.finish_reason is None]
            if len(jobs) == 1 or any(job.tokens for job in open_rows):
                for job in open_rows:
                    job.emit(Failed(f"generation failed: {exc}"))
                return
        for job in open_rows:
            self._run_isolated([job])

    def _run(self, jobs: list[Job]) -> None:
        batch = pad_rows(self.aligner.tokenizer, [job.prompt_ids for job in jobs], self.aligner.device)
        plan = self._generate(jobs, batch, allowed=[job.aligned for job in jobs])
        if plan is None:  # generated in one pass, the gate read inside its prefill
            return
        report_plan(jobs, plan)
        # Rows answered by the aligned model itself (mode "aligned") run as their own sub-batch.
        groups: dict[bool, list[int]] = {}
        for i, row in enumerate(plan):
            if row.answer is None:
                groups.setdefault(row.action is Action.DELEGATE, []).append(i)
        for rows in groups.values():
            self._generate([jobs[i] for i in rows], {k: v[rows] for k, v in batch.items()}, plan=plan.select(rows))

    def _generate(
        self,
        jobs: list[Job],
        batch: dict[str, torch.Tensor],
        *,
        plan: Plan | None = None,
        allowed: list[bool] | None = None,
    ) -> Plan | None:
        """Generate these rows as `plan` says, or, without a plan, in one pass with the gate read inside the
        prefill; returns the plan when that pass had to stop at the gate layer (the caller then acts on it)."""
        aligner, tokenizer = self.aligner, self.aligner.tokenizer
        temperature, top_p = jobs[0].sampling
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        )
        width = batch["input_ids"].shape[1]
        recorder = _LogprobRecorder() if any(job.top_logprobs is not None for job in jobs) else None
        tracker = _RowTracker(jobs, tokenizer, width, eos_ids(aligner), recorder)
        options = {
            "max_new_tokens": max(job.max_tokens for job in jobs),
            "stopping_criteria": StoppingCriteriaList([tracker]),
            "logits_processor": LogitsProcessorList([recorder] if recorder else []),
            **sampling,
        }
        if plan is not None:
            aligner.generate(**batch, plan=plan, **options)
        else:
            output, replan = aligner.try_one_pass(
                **batch,
                allowed=allowed,
                on_plan=lambda done: report_plan(jobs, done),
                turns=gate_turns(aligner, jobs),
                **options,
            )
            if output is None:
                return replan
        return None
