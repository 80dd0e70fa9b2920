"""Continuous batching: requests join the running batch at the next decoding step and leave when they finish.

The worker runs one decoding step at a time for every running row. Between steps it admits waiting requests (up to
`max_batch` rows in all): they are prefilled together, each row's gate read on its own prompt inside that pass
(`InferAligner.prefill`; a plan that steers at or below the gate layer runs those blocks again in it, or, where it
cannot, prefills its rows again under the plan), and their key/value caches are joined to the running batch's
(`RunningBatch`). Requests that open with the chat template's opening are prefilled as one group from its cached
keys and values (`serve.prefix`), the others whole, as a second group. Each row keeps its gate for its whole
answer: every step runs under the plan of the rows running then, so a steered row is steered at every position and
an unsteered row is not touched (its tokens are the ones `generate` gives it alone; its numbers differ from those
only by the rounding of a wider, padded batch). Rows leave at their end (EOS, stop string, token limit, the loop
stop, a client that left) and free their seat for the next step.

Why not `transformers`' own continuous batching (`generate_batch`, its manager and paged attention): it packs every
request's tokens into one sequence and keeps the token-to-request map inside its batch processor, so a per-row
steering shift and a gate read on each prompt's pooled activations would have to reach into that private state; it
also switches the model's attention implementation for as long as it runs, while the same model serves the
aligner's other paths. Rows here are kept as a left-padded batch over a `DynamicCache`, which every decoder model
in `transformers` reads, with the same hooks the rest of InferAligner steers through.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from inferaligner.aligner import InferAligner
from inferaligner.loopstop import repeats
from inferaligner.models import has_sliding_window
from inferaligner.plan import Action, Plan, RowPlan
from inferaligner.prompts import pad_rows, position_ids
from inferaligner.serve.engine import (
    BatchEngine,
    Engine,
    Failed,
    Job,
    eos_ids,
    finish,
    gate_turns,
    read_token,
    report_plan,
)
from inferaligner.serve.prefix import SharedPrefix
from inferaligner.serve.settings import SCHEDULERS
from inferaligner.turns import chat_opening

log = logging.getLogger("inferaligner.serve")


# Generation-config settings that change decoding beyond temperature, top-k and top-p, with their neutral values:
# `generate` applies them, the continuous scheduler does not, so a model that sets one is served in whole batches.
UNSUPPORTED_GENERATION = {
    "repetition_penalty": (None, 1.0),
    "min_p": (None,),
    "typical_p": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "min_new_tokens": (None, 0),
    "min_length": (None, 0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "encoder_repetition_penalty": (None, 1.0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
}


def continuous_unsupported(aligner: InferAligner) -> str | None:
    """Why this aligner cannot be served by continuous batching, or `None` when it can."""
    config = aligner.model.generation_config
    changed = [key for key, neutral in UNSUPPORTED_GENERATION.items() if getattr(config, key, None) not in neutral]
    if changed:
        return f"the model's generation config sets {', '.join(changed)}, which this scheduler does not apply"
    if aligner.aligned_model is not None:
        return "mode 'aligned' answers fired rows with a second model"
    if has_sliding_window(aligner.model):
        return "the model has sliding-window attention layers"
    if getattr(aligner.model.config, "is_encoder_decoder", False):
        return "the model is an encoder-decoder"
    return None


@dataclass
class Row:
    """One running request: its job, its plan, the token it feeds next and that token's position."""

    job: Job
    plan: RowPlan
    next_token: int
    position: int


class RunningBatch:
    """The running rows' key/value cache and attention mask, left-padded to one width."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache, self.mask = cache, mask

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def join(self, other: RunningBatch) -> None:
        """Append `other`'s rows below these, the narrower side padded on the left."""
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(other.mask, width, dim=1)])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows, and drop the leading columns that are padding in every row kept."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]
        start = int((mask.cumsum(1) == 0).sum(1).min()) if len(rows) else 0
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        self.mask = mask[:, start:]

    def grow(self) -> torch.Tensor:
        """The mask for the next step: one more real column per row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], dim=1)
        return self.mask


def _opening(aligner: InferAligner) -> list[int]:
    """The chat template's opening (`turns.chat_opening`), or none where the template cannot render it."""
    try:
        return chat_opening(aligner.tokenizer)
    except Exception as exc:  # a template that refuses a lone user turn, say: nothing to cache
        log.warning("prefix cache off: the chat template's opening could not be rendered (%s)", exc)
        return []


def _fresh_cache(prefix: SharedPrefix | None, rows: int, gates: torch.Tensor | None = None) -> DynamicCache:
    """A cache for a prefill: empty, or holding the prefix (steered where `gates` is 1)."""
    return prefix.cache(rows, gates) if prefix is not None else DynamicCache()


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.ndim - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)


def choose_tokens(logits: torch.Tensor, jobs: Sequence[Job], top_k: int | None) -> list[int]:
    """Each row's next token: greedy, or sampled after temperature, top-k and top-p, as its job asks."""
    scores = logits.float()
    temperature = torch.tensor([job.sampling[0] or 1.0 for job in jobs], device=scores.device)
    sampled = torch.tensor([job.sampling[0] > 0 for job in jobs], device=scores.device)
    if not bool(sampled.any()):
        return scores.argmax(-1).tolist()
    warped = scores / temperature[:, None]
    if top_k:
        kth = torch.topk(warped, min(top_k, warped.shape[-1])).values[:, -1:]
        warped = warped.masked_fill(warped < kth, float("-inf"))
    top_p = torch.tensor([job.sampling[1] for job in jobs], device=scores.device)
    ordered, order = torch.sort(warped, descending=True)
    probs = torch.softmax(ordered, -1)
    outside = probs.cumsum(-1) - probs > top_p[:, None]  # the tokens after the nucleus has its mass
    warped = warped.scatter(1, order, ordered.masked_fill(outside, float("-inf")))
    warped = torch.where(sampled[:, None], warped, scores)
    drawn = torch.multinomial(torch.softmax(warped, -1), 1).squeeze(1)
    return torch.where(sampled, drawn, scores.argmax(-1)).tolist()


class ContinuousEngine(Engine):
    """Per-step scheduling: rows join and leave between decoding steps, each with its own gate and steering."""

    scheduler = "continuous"

    def __init__(self, aligner: InferAligner, *, prefix_cache: bool = True, **limits: object) -> None:
        reason = continuous_unsupported(aligner)
        if reason is not None:
            raise ValueError(f"Continuous batching cannot serve this aligner: {reason}.")
        super().__init__(aligner, **limits)  # type: ignore[arg-type]
        self.rows: list[Row] = []
        self.batch: RunningBatch | None = None
        self.prefix_cache = prefix_cache
        # The opening's tokens now, before the server's threads share the tokenizer; its keys and values are computed
        # by the worker before its first prefill.
        self._opening = _opening(aligner) if prefix_cache else []
        self._prefix: SharedPrefix | None = None
        self._eos = eos_ids(aligner)
        # transformers 5.x renames the forward's `past_key_values` to `cache`; pass whichever this version reads.
        parameters = inspect.signature(type(aligner.model).forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"
        self._keeps_logits = "logits_to_keep" in parameters

    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                fresh = self._collect(self.max_batch - len(self.rows), block=not self.rows)
                if fresh is None:
                    return
                if fresh:
                    self._admit(fresh)
                if self.rows:
                    self._step_safely()

    def _admit(self, jobs: list[Job], whole: bool = False) -> None:
        """Gate, plan and prefill new requests, then join them to the running batch. A group that fails (or a lone
        request that failed over the cached prefix) is tried one request at a time, each prompt prefilled whole, so
        the failure stays with the request that caused it and a fault of the cached prefix fails nobody."""
        live = [job for job in jobs if not job.cancelled.is_set()]
        for job in jobs:
            if job.cancelled.is_set():
                job.finish_reason = "cancelled"
                finish([job])
        try:
            if live:
                self._prefill(live, whole)
        except Exception as exc:
            log.exception("prefill of %d requests failed", len(live))
            self._recover(live, whole, exc)
        with self._condition:
            self._running = len(self.rows)
        if live and self.rows:
            for observe in self.on_batch:
                observe(len(self.rows))

    def _recover(self, live: list[Job], whole: bool, exc: Exception) -> None:
        """After a failed prefill: try again, alone and whole, each request that has no answer yet and is not
        running; tell every other one that failed."""
        running = {id(row.job) for row in self.rows}
        retry = [job for job in live if job.finish_reason is None and not job.tokens and id(job) not in running]
        cached = not whole and self._prefix is not None and self._prefix.fits(live[0].prompt_ids)
        if len(live) == 1 and not cached:
            retry = []  # tried alone, whole: the failure is this request's
        for job in retry:
            self._admit([job], whole=True)
        for job in live:
            if job.finish_reason is None and id(job) not in running and job not in retry:
                job.emit(Failed(f"generation failed: {exc}"))
                finish([job])

    def _prefill(self, jobs: list[Job], whole: bool = False) -> None:
        """Prefill new requests: those that start with the shared prefix as one group, the others (all of them, when
        `whole`) as another."""
        prefix = None if whole else self._shared_prefix()
        fits = [prefix is not None and prefix.fits(job.prompt_ids) for job in jobs]
        for group, used in (
            ([j for j, f in zip(jobs, fits, strict=True) if f], prefix),
            ([j for j, f in zip(jobs, fits, strict=True) if not f], None),
        ):
            if group:
                self._prefill_group(group, used)

    def _shared_prefix(self) -> SharedPrefix | None:
        """The chat template's opening, run once (`serve.prefix`); `None` when prefix caching is off or fails."""
        if self.prefix_cache and self._prefix is None:
            try:
                if self._opening:
                    self._prefix = SharedPrefix.build(self.aligner, self._opening, self._run_prefix)
                    log.info("prefix cache: %d tokens of the chat template's opening", len(self._opening))
            except Exception as exc:
                log.warning("prefix cache off: the chat template's opening could not be run (%s)", exc)
            self.prefix_cache = self._prefix is not None
        return self._prefix

    def _run_prefix(self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> None:
        kwargs = self._forward_kwargs(mask, position_ids(mask), cache, prefill=True)
        self.aligner.model(input_ids=ids, attention_mask=mask, **kwargs)

    def _prefill_group(self, jobs: list[Job], prefix: SharedPrefix | None) -> None:
        aligner = self.aligner
        skip = len(prefix) if prefix is not None else 0
        for job in jobs:
            job.cached_tokens = skip
        inputs = pad_rows(aligner.tokenizer, [job.prompt_ids[skip:] for job in jobs], aligner.device)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        mask = torch.cat([mask.new_ones(len(jobs), skip), mask], dim=1)  # the mask covers the cached prefix too
        positions = position_ids(mask)[:, skip:]
        cache = _fresh_cache(prefix, len(jobs))
        # The gate is read inside this prefill (a "turns" gate: just before it, each turn alone); a plan that needs
        # more (steering at or below the gate layer, fixed answers) stops it at the gate layer, and the rows the plan
        # generates are prefilled again under it.
        kwargs = self._forward_kwargs(mask, positions, cache, prefill=True)
        kwargs["turns"] = gate_turns(aligner, jobs)
        if prefix is not None:
            kwargs.update(prefix_hidden=prefix.gate_hidden, before_steering=functools.partial(prefix.steer, cache))
        output, plan = aligner.prefill(ids, mask, allowed=[job.aligned for job in jobs], **kwargs)
        report_plan(jobs, plan)
        generated = [i for i, row in enumerate(plan) if row.answer is None]
        finish([job for i, job in enumerate(jobs) if i not in generated])
        if not generated:
            return
        if output is None:
            jobs, plan = [jobs[i] for i in generated], plan.select(generated)
            ids, mask, positions = ids[generated], mask[generated], positions[generated]
            cache = _fresh_cache(prefix, len(jobs), plan.steer_gates())
            kwargs = self._forward_kwargs(mask, positions, cache, prefill=True)
            with aligner.steered(plan):
                output = aligner.model(input_ids=ids, attention_mask=mask, **kwargs)
        logits = output.logits[:, -1]
        tokens = choose_tokens(logits, jobs, self.aligner.model.generation_config.top_k)
        # Nothing joins the running batch until here, so a failure above leaves it as it was.
        joined = RunningBatch(cache, mask)
        if self.batch is None or not self.rows:
            self.batch = joined
        else:
            self.batch.join(joined)
        lengths = mask.sum(1).tolist()
        new_rows = [Row(job, row, -1, int(length)) for job, row, length in zip(jobs, plan, lengths, strict=True)]
        self.rows.extend(new_rows)
        self._take(new_rows, tokens, logits)

    def _step_safely(self) -> None:
        try:
            self._step()
        except Exception as exc:  # the running rows have tokens out already: each is told, the worker lives on
            log.exception("decoding step of %d rows failed", len(self.rows))
            for row in self.rows:
                if row.job.finish_reason is None:
                    row.job.emit(Failed(f"generation failed: {exc}"))
            finish([row.job for row in self.rows])
            self.rows, self.batch = [], None
            with self._condition:
                self._running = 0

    def _step(self) -> None:
        """One decoding step for every running row, then the finished rows leave."""
        for row in self.rows:
            if row.job.cancelled.is_set() and row.job.finish_reason is None:
                row.job.finish_reason = "cancelled"
        self._leave()
        if not self.rows or self.batch is None:
            return
        device = self.aligner.device
        ids = torch.tensor([[row.next_token] for row in self.rows], device=device)
        positions = torch.tensor([[row.position] for row in self.rows], device=device)
        mask = self.batch.grow()
        with self.aligner.steered(Plan(tuple(row.plan for row in self.rows))):
            logits = self.aligner.model(
                input_ids=ids, attention_mask=mask, **self._forward_kwargs(mask, positions, self.batch.cache)
            ).logits[:, -1]
        tokens = choose_tokens(logits, [row.job for row in self.rows], self.aligner.model.generation_config.top_k)
        for row in self.rows:
            row.position += 1
        self._take(self.rows, tokens, logits)
        self._leave()

    def _forward_kwargs(
        self, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache, *, prefill: bool = False
    ) -> dict[str, object]:
        """The model's keyword arguments for one step over the running rows (or a prefill of new ones)."""
        kwargs: dict[str, object] = {"position_ids": positions, "use_cache": True, self._cache_name: cache}
        if prefill and self._keeps_logits:  # only the last position's logits are needed
            kwargs["logits_to_keep"] = 1
        return kwargs

    def _take(self, rows: list[Row], tokens: list[int], logits: torch.Tensor) -> None:
        """Hand each row its next token (text, stops, limits, the loop stop). Log-probabilities are the model's
        own distribution at the step (before temperature and top-p), as the batch scheduler reports them."""
        span = self.aligner.settings.loop_span
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.next_token = token
            logprobs = torch.log_softmax(logits[i].float(), -1) if row.job.top_logprobs is not None else None
            read_token(row.job, token, self.aligner.tokenizer, self._eos, logprobs)
            # A row still open has every token it generated in `job.tokens` (an EOS would have ended it).
            if row.job.finish_reason is None and row.plan.action is Action.STEER and repeats(row.job.tokens, span):
                row.job.finish_reason = "stop"

    def _leave(self) -> None:
        """Finished rows leave the batch and get their last event."""
        staying = [i for i, row in enumerate(self.rows) if row.job.finish_reason is None]
        if len(staying) == len(self.rows):
            return
        if self.batch is not None:
            self.batch.keep(staying)
        leaving = [row.job for row in self.rows if row.job.finish_reason is not None]
        self.rows = [self.rows[i] for i in staying]
        with self._condition:
            self._running = len(self.rows)
        finish(leaving)


def make_engine(
    aligner: InferAligner, scheduler: str = "continuous", *, prefix_cache: bool = True, **limits: object
) -> Engine:
    """The serving engine for `scheduler`; "continuous" falls back to "batch" (with a warning) for an aligner it
    cannot serve (`continuous_unsupported`). `prefix_cache`: the continuous scheduler prefills the chat template's
    opening once (`serve.prefix`)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler '{scheduler}'; choose one of {', '.join(SCHEDULERS)}.")
    if scheduler == "continuous":
        reason = continuous_unsupported(aligner)
        if reason is None:
            return ContinuousEngine(aligner, prefix_cache=prefix_cache, **limits)
        log.warning("continuous batching is off: %s; serving whole batches instead", reason)
    return BatchEngine(aligner, **limits)  # type: ignore[arg-type]
