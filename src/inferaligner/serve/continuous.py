"""Continuous batching: requests join the running batch at the next decoding step and leave when they finish.

The worker runs one decoding step at a time for every running row. Between steps it admits waiting requests (up to
`max_batch` rows in all): they are prefilled together, each row's gate read on its own prompt inside that pass
(`InferAligner.prefill`; a plan that steers at or below the gate layer runs those blocks again in it, or, where it
cannot, prefills its rows again under the plan), and their key/value caches are joined to the running batch's
(`RunningBatch`). A `"turns"` gate reads each new turn alone in the same pass, as an extra row that stops at the
gate layer (`inflight.TurnRows`), so gating costs no pass of its own. Each row prefills only what follows the longest
prefix of its prompt that the prefix cache holds for its plan (`serve.prefix`: the chat template's opening, system
messages, earlier turns and their answers); its prompt, and at its end its answer, go into that cache. Each row
keeps its gate for its whole answer: every step runs under the plan of the rows running then, so a steered row is
steered at every position and an unsteered row is not touched (its tokens are the ones `generate` gives it alone;
its numbers differ from those only by the rounding of a wider, padded batch). Rows leave at their end (EOS, stop
string, token limit, the loop stop, a client that left) and free their seat for the next step.

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
import statistics
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from inferaligner.aligner import InferAligner
from inferaligner.capture import capture_layers
from inferaligner.inflight import Replan, TurnRows
from inferaligner.loopstop import repeats
from inferaligner.models import block_hidden, has_sliding_window
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
from inferaligner.serve.prefix import MISS, Hit, PrefixTree, batch_cache, batch_hidden, row_kv, write_rows
from inferaligner.serve.settings import DEFAULTS, SCHEDULERS
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


PASS_COST_TOKENS = 64
"""A forward pass's fixed cost in prompt tokens: what splitting a prefill into groups pays per group, and what reading
turns in a pass of their own costs; the engine's default, and the floor of what the server measures at start. On the
2-core CPU for the embedded SmolLM2 it measures 24-33 (`measure_pass_cost`); reading the weights sets it, so a GPU's
is far larger."""


def measure_pass_cost(model: torch.nn.Module, tokens: int = 128, repeats: int = 3) -> int:
    """A forward pass's fixed cost in prompt tokens on this model and device: a 1-token pass's time over the time of
    each further token (from a `tokens`-token pass), medians of `repeats` after a warm-up; 1 to 100,000."""
    device = next(model.parameters()).device
    vocab = int(model.config.get_text_config().vocab_size)
    ids = torch.randint(min(100, vocab - 1), vocab, (1, tokens), device=device)

    def median_s(width: int) -> float:
        times = []
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            model(input_ids=ids[:, :width], use_cache=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - began)
        return statistics.median(times[1:])

    with torch.inference_mode():
        one, many = median_s(1), median_s(tokens)
    per_token = (many - one) / (tokens - 1)
    return int(min(max(one / per_token, 1), 100_000)) if per_token > 0 else 100_000


def shortest_first_groups(lengths: Sequence[int], pass_cost: int = PASS_COST_TOKENS) -> list[list[int]]:
    """Indices of `lengths` (uncached tokens per request) in prefill groups, shortest first, that minimise the mean
    wait for a first token: a group costs `pass_cost` plus its rows times its longest length (left padding), and
    delays its own rows and every later group's."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    rows = len(order)
    best: list[float] = [0.0] * (rows + 1)  # best[i]: the least total wait of rows i.. given they start at i
    cut = [rows] * (rows + 1)
    for start in range(rows - 1, -1, -1):
        best[start] = float("inf")
        for end in range(start, rows):  # the group start..end, padded to lengths[order[end]]
            cost = (pass_cost + (end - start + 1) * lengths[order[end]]) * (rows - start) + best[end + 1]
            if cost < best[start]:
                best[start], cut[start] = cost, end + 1
    groups, start = [], 0
    while start < rows:
        groups.append(order[start : cut[start]])
        start = cut[start]
    return groups


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


@dataclass
class PrefillInputs:
    """A prefill's new tokens (left-padded) and positions, with a cache of the rows' cached prefixes (`hits`,
    left-padded to `width`) and a mask over both."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: DynamicCache
    width: int
    hits: list[Hit]
    apart: list[int] = field(default_factory=list)  # rows set apart once planned, to be prefilled again

    def select(self, rows: Sequence[int]) -> PrefillInputs:
        """These rows after the pass (its extra rows, or rows set apart, dropped), less the leading columns of the
        cached part that are padding in each of them; `apart` kept where every row is."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]
        start = min(int((mask.cumsum(1) == 0).sum(1).min()), self.width) if len(index) else 0
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        first_rows = list(rows) == list(range(len(index)))
        return PrefillInputs(
            self.ids[index],
            mask[:, start:],
            self.positions[index],
            self.cache,
            self.width - start,
            [self.hits[i] for i in rows],
            [i for i in self.apart if i < len(index)] if first_rows else [],
        )


def _row_kv(cache: DynamicCache, row: int, columns: torch.Tensor, start: int) -> torch.Tensor:
    """A row's keys and values from its `start`-th real column on (`PrefixTree.insert`'s `kv_from`)."""
    return row_kv(cache, row, columns[start:])


def _copied_hidden(_layer: int, output: object) -> torch.Tensor:
    """A block's hidden states, copied: a steering hook on the same block adds to them in place afterwards."""
    return block_hidden(output).detach().clone()


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

    def __init__(
        self,
        aligner: InferAligner,
        *,
        prefix_cache_mb: float = DEFAULTS.prefix_cache_mb,
        pass_cost_tokens: int = PASS_COST_TOKENS,
        **limits: object,
    ) -> None:
        reason = continuous_unsupported(aligner)
        if reason is not None:
            raise ValueError(f"Continuous batching cannot serve this aligner: {reason}.")
        super().__init__(aligner, **limits)  # type: ignore[arg-type]
        self.rows: list[Row] = []
        self.batch: RunningBatch | None = None
        # A forward pass's fixed cost, in prompt tokens; 0: measured by the worker before its first prefill.
        if pass_cost_tokens < 0:
            raise ValueError(f"pass_cost_tokens must be 0 (measure it) or more, not {pass_cost_tokens}.")
        self.pass_cost_tokens = pass_cost_tokens
        self.tree = PrefixTree(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        # The opening's tokens now, before the server's threads share the tokenizer; the worker runs them into the
        # tree before its first prefill.
        self._opening = _opening(aligner) if self.tree is not None else []
        self._eos = eos_ids(aligner)
        self._can_steer = aligner.steer_directions is not None and bool(aligner.steer_layers)
        # A gate read inside the prefill that pools over every position needs a cached prefix's gate-layer outputs.
        gate = aligner.gate
        self._in_flight = gate is not None and aligner.reader is None
        self._turns_in_prefill = True  # a "turns" gate reads new turns inside the prefill (until that fails once)
        self._needs_hidden = self._in_flight and gate is not None and gate.pooling != "last"
        # transformers 5.x renames the forward's `past_key_values` to `cache`; pass whichever this version reads.
        parameters = inspect.signature(type(aligner.model).forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"
        self._keeps_logits = "logits_to_keep" in parameters

    def _work(self) -> None:
        if self.pass_cost_tokens == 0:
            self._measure_pass_cost()
        with torch.inference_mode():
            while True:
                fresh = self._collect(self.max_batch - len(self.rows), block=not self.rows)
                if fresh is None:
                    return
                if fresh:
                    self._admit(fresh)
                if self.rows:
                    self._step_safely()

    def _measure_pass_cost(self) -> None:
        """`measure_pass_cost` on the worker's thread, as it will run the model, and `PASS_COST_TOKENS` at least: a
        pass's cost per request leaves out what splitting a batch costs in throughput (measured on this CPU: the
        measured 24-33 tokens cut eight clients' time to first token but lost 32 clients' throughput against 64);
        the default where measuring fails."""
        try:
            measured = measure_pass_cost(self.aligner.model)
            self.pass_cost_tokens = max(measured, PASS_COST_TOKENS)
            log.info("a forward pass costs %d prompt tokens (measured); taking %d", measured, self.pass_cost_tokens)
        except Exception as exc:
            self.pass_cost_tokens = PASS_COST_TOKENS
            log.warning("the pass cost could not be measured (%s); taking %d tokens", exc, PASS_COST_TOKENS)

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
            groups = self._groups(live, whole) if live else []
        except Exception as exc:  # the plan could not be made (a "turns" gate's read failed)
            log.exception("planning %d requests failed", len(live))
            groups = []
            self._recover(live, whole, exc)
        for group, plan in groups:
            try:
                self._prefill(group, plan, whole)
            except Exception as exc:
                log.exception("prefill of %d requests failed", len(group))
                self._recover(group, whole, exc)
        with self._condition:
            self._running = len(self.rows)
        if live and self.rows:
            for observe in self.on_batch:
                observe(len(self.rows))

    def _groups(self, jobs: list[Job], whole: bool) -> list[tuple[list[Job], Plan | None]]:
        """The requests in prefill groups (`shortest_first_groups` of their uncached lengths), each with its plan where
        it is known before the prefill (`_plan_first`): each group is one left-padded prefill, so a long prompt (or
        one the prefix cache lacks for its plan) does not make the short ones beside it pay its length. A turns gate
        reads here, in one pass, the new turns of the groups whose prefill would not read them well (`_read_apart`).
        """
        tree = None if whole else self._seeded_tree()
        plan = self._plan_first(jobs, [job.aligned for job in jobs])
        if plan is None:
            hits = [self._start(tree, job)[0] for job in jobs]
        else:
            hits = [self._match(tree, job, steered=self._steers(row)) for job, row in zip(jobs, plan, strict=True)]
        uncached = [len(job.prompt_ids) - hit.length for job, hit in zip(jobs, hits, strict=True)]
        groups = shortest_first_groups(uncached, self.pass_cost_tokens)
        if plan is None and self.aligner.reader is not None:
            self._read_apart([[jobs[i] for i in group] for group in groups], [[hits[i] for i in g] for g in groups])
        return [([jobs[i] for i in group], plan.select(group) if plan is not None else None) for group in groups]

    def _recover(self, live: list[Job], whole: bool, exc: Exception) -> None:
        """After a failed prefill: try again, alone and whole, each request that has no answer yet and is not
        running; tell every other one that failed."""
        running = {id(row.job) for row in self.rows}
        retry = [job for job in live if job.finish_reason is None and not job.tokens and id(job) not in running]
        if len(live) == 1 and (whole or not live[0].cached_tokens):
            retry = []  # tried alone, whole: the failure is this request's
        for job in retry:
            self._admit([job], whole=True)
        for job in live:
            if job.finish_reason is None and id(job) not in running and job not in retry:
                job.emit(Failed(f"generation failed: {exc}"))
                finish([job])

    def _prefill(self, jobs: list[Job], plan: Plan | None, whole: bool = False) -> None:
        """Gate, plan and prefill new requests as one group, each over the longest prefix of its prompt that the
        prefix cache holds for its plan (none when `whole`), then join them to the running batch.

        Without a gate `plan` is known before, and under a `"turns"` gate where every turn has been read
        (`_plan_first`). Else the gate is read inside the prefill (`_gated_prefill`), the rows running over their
        unsteered prefixes (or steered ones: `_start`); a row the plan wants on the other kind of prefix takes it
        from the tree, and one the tree lacks it for is set apart and prefilled again under the plan (all of the
        group's rows, when the pass stopped)."""
        tree = None if whole else self._seeded_tree()
        allowed = [job.aligned for job in jobs]
        starts = [self._start(tree, job) for job in jobs] if plan is None else []
        if plan is None and self.aligner.reader is not None:  # the group is known now: read its turns inside or apart
            plan = self._plan_first(jobs, allowed, [hit for hit, _ in starts])
        if plan is not None:
            self._planned_prefill(tree, jobs, plan)
            return
        logits, plan, first, read = self._gated_prefill(tree, jobs, allowed, starts)
        if logits is None:
            self._planned_prefill(tree, jobs, plan, first, read)
            return
        report_plan(jobs, plan)
        apart = first.apart
        keep = [i for i in range(len(jobs)) if i not in apart]
        if apart:
            first, logits = first.select(keep), logits[keep]
            read = read[keep] if read is not None else None
        kept, kept_plan = [jobs[i] for i in keep], plan.select(keep)
        if tree is not None:
            self._remember_prompts(tree, kept, kept_plan, first, first, read, list(range(len(keep))))
        self._join(kept, kept_plan, first, logits)
        if apart:
            self._planned_prefill(tree, [jobs[i] for i in apart], plan.select(apart))

    def _planned_prefill(
        self,
        tree: PrefixTree | None,
        jobs: list[Job],
        plan: Plan,
        first: PrefillInputs | None = None,
        read: torch.Tensor | None = None,
    ) -> None:
        """Prefill the rows the plan generates, each over the cached prefix of its plan's kind, and join them; the
        rows the plan answers itself finish here. `first`, `read`: a stopped pass's rows and gate-layer outputs."""
        report_plan(jobs, plan)
        generated = [i for i, row in enumerate(plan) if row.answer is None]
        finish([job for i, job in enumerate(jobs) if i not in generated])
        if not generated:
            return
        jobs, plan = [jobs[i] for i in generated], plan.select(generated)
        hits = [self._match(tree, job, steered=self._steers(row)) for job, row in zip(jobs, plan, strict=True)]
        rows = self._inputs(jobs, hits)
        kwargs = self._forward_kwargs(rows.mask, rows.positions, rows.cache, prefill=True)
        with self.aligner.steered(plan):
            logits = self.aligner.model(input_ids=rows.ids, attention_mask=rows.mask, **kwargs).logits[:, -1]
        if tree is not None:
            self._remember_prompts(tree, jobs, plan, rows, first, read, generated)
        self._join(jobs, plan, rows, logits)

    def _join(self, jobs: list[Job], plan: Plan, rows: PrefillInputs, logits: torch.Tensor) -> None:
        """Prefilled rows join the running batch with their first tokens."""
        tokens = choose_tokens(logits, jobs, self.aligner.model.generation_config.top_k)
        # Nothing joins the running batch until here, so a failure above leaves it as it was.
        joined = RunningBatch(rows.cache, rows.mask)
        if self.batch is None or not self.rows:
            self.batch = joined
        else:
            self.batch.join(joined)
        lengths = rows.mask.sum(1).tolist()
        new_rows = [Row(job, row, -1, int(length)) for job, row, length in zip(jobs, plan, lengths, strict=True)]
        self.rows.extend(new_rows)
        self._take(new_rows, tokens, logits)

    def _gated_prefill(
        self, tree: PrefixTree | None, jobs: list[Job], allowed: list[bool], starts: list[tuple[Hit, bool]]
    ) -> tuple[torch.Tensor | None, Plan, PrefillInputs, torch.Tensor | None]:
        """The prefill with the gate read inside it, each row over its `_start`, new turns read as extra rows: the last
        position's logits (`None` when the pass stopped: its rows are to be prefilled again under the plan), the
        plan, the rows (`apart`: those to prefill again) and what the gate layer gave (where the tree keeps it)."""
        aligner = self.aligner
        known, turns = self._split_turns(jobs)
        first = self._inputs(jobs, [hit for hit, _ in starts], [self._turn_row(tree, turn) for turn in turns])
        kwargs = self._forward_kwargs(first.mask, first.positions, first.cache, prefill=True)
        steered = [on_steered for _, on_steered in starts]
        kwargs["before_steering"] = functools.partial(self._steer_prefixes, tree, jobs, first, steered)
        if turns:
            kwargs["turn_rows"] = self._turn_rows(jobs, known, turns, first)
        else:
            kwargs["prefix_hidden"] = self._prefix_hidden(first)
        try:
            with self._reading_gate(tree is not None and self._needs_hidden) as reading:
                output, plan = aligner.prefill(first.ids, first.mask, allowed=allowed, **kwargs)
        except Exception as exc:
            if not turns:
                raise
            # The turns could not be read as extra rows of this model's pass: read them in passes of their own.
            log.warning("reading turns inside the prefill failed (%s); reading them in a pass of their own", exc)
            self._turns_in_prefill = False
            plan = self._plan_first(jobs, allowed)
            assert plan is not None
            return None, plan, first, None
        if turns and output is not None:  # the extra rows were dropped at the gate layer: drop them below it too
            first = first.select(range(len(jobs)))
        read = reading.get(aligner.gate.layer) if aligner.gate is not None else None
        return output.logits[:, -1] if output is not None else None, plan, first, read

    def _plan_first(self, jobs: list[Job], allowed: list[bool], starts: Sequence[Hit] | None = None) -> Plan | None:
        """The plan before the prefill where the gate does not read inside it: without a gate the mode plans alone,
        and a `"turns"` gate plans from the turns it has read, reading the others in a short pass of its own; `None`
        for a gate read inside the prefill, and for turns the prefill is to read (`_reads_inside`; `starts`: the
        group's cached prefixes, not yet known when `None`)."""
        aligner = self.aligner
        if self._in_flight:
            return None
        unread = self._unread_turns(jobs)
        if unread and (starts is None or self._reads_inside(jobs, starts, unread)):
            return None
        decisions = aligner.gate_decisions(None, turns=gate_turns(aligner, jobs)) if aligner.gate else None
        return aligner.plan(decisions, len(jobs), allowed)

    def _read_apart(self, groups: list[list[Job]], starts: list[list[Hit]]) -> None:
        """Read, in one pass of the reader's own, the new turns of every group whose prefill would not read them
        (`_reads_inside`); those groups then plan before their prefill."""
        apart = []
        for members, hits in zip(groups, starts, strict=True):
            unread = self._unread_turns(members)
            if unread and not self._reads_inside(members, hits, unread):
                apart += members
        if apart:
            self.aligner.gate_decisions(None, turns=gate_turns(self.aligner, apart))

    def _unread_turns(self, jobs: list[Job]) -> list[tuple[int, ...]]:
        """The turns of these requests that a `"turns"` gate has not read yet, where the prefill reads them (none
        for other gates: their plan comes before the prefill, or from inside it)."""
        return self._split_turns(jobs)[1]

    def _split_turns(self, jobs: list[Job]) -> tuple[dict[tuple[int, ...], torch.Tensor], list[tuple[int, ...]]]:
        """The features a `"turns"` gate has read of these requests' turns, and `_unread_turns`."""
        turns = gate_turns(self.aligner, jobs)
        if turns is None or not self._turns_in_prefill:
            return {}, []
        return self.aligner.split_turns(turns)

    def _reads_inside(self, jobs: list[Job], starts: Sequence[Hit], unread: list[tuple[int, ...]]) -> bool:
        """Whether the prefill should read these turns as extra rows: each such row is as wide as the widest new
        prompt (left padding), so they pay where that costs less than a pass of their own (`pass_cost_tokens` plus
        the turns' own tokens, the reader grouping turns of like length)."""
        new = max(len(job.prompt_ids) - hit.length for job, hit in zip(jobs, starts, strict=True))
        width = max(new, *(len(turn) for turn in unread))
        inside = len(unread) * width + (width - new) * len(jobs)
        return inside <= self.pass_cost_tokens + sum(len(turn) for turn in unread)

    def _turn_row(self, tree: PrefixTree | None, turn: tuple[int, ...]) -> tuple[list[int], Hit]:
        """An extra prefill row reading `turn` alone: the chat template's opening (from the tree where it holds it),
        then the turn, as `reader.RequestReader` reads it."""
        assert self.aligner.reader is not None
        opening = self.aligner.reader.opening
        ids = [*opening, *turn]
        hit = tree.match(ids, steered=False, limit=len(opening)) if tree is not None and opening else MISS
        return ids, hit

    def _turn_rows(
        self,
        jobs: list[Job],
        known: dict[tuple[int, ...], torch.Tensor],
        turns: list[tuple[int, ...]],
        first: PrefillInputs,
    ) -> TurnRows:
        """What the prefill's gate reads of its extra rows (`inflight.TurnRows`): each turn's tokens, last in a row;
        `known`: the features of the requests' turns read before."""
        reader, prompts = self.aligner.reader, gate_turns(self.aligner, jobs)
        assert reader is not None and prompts is not None
        own = torch.zeros(len(turns), first.ids.shape[1], dtype=torch.long, device=first.ids.device)
        for index, turn in enumerate(turns):
            own[index, -len(turn) :] = 1
        return TurnRows(len(jobs), turns, own, prompts, known, reader, first.cache)

    def _steers(self, row: RowPlan) -> bool:
        """Whether this row's cache is a steered one."""
        return row.action is Action.STEER and self._can_steer

    def _match(self, tree: PrefixTree | None, job: Job, *, steered: bool) -> Hit:
        if tree is None:
            return MISS
        return tree.match(job.prompt_ids, steered=steered, hidden=self._needs_hidden and not steered)

    def _inputs(self, jobs: list[Job], hits: list[Hit], extra: Sequence[tuple[list[int], Hit]] = ()) -> PrefillInputs:
        """The rows' uncached tokens, left-padded, after a cache of their cached prefixes (left-padded too); `extra`
        rows (token ids and their cached prefix) go below the requests' rows."""
        for job, hit in zip(jobs, hits, strict=True):
            job.cached_tokens = hit.length  # first: a failure below retries the request whole (`_recover`)
        rows = [(list(job.prompt_ids), hit) for job, hit in zip(jobs, hits, strict=True)] + list(extra)
        hits = [hit for _, hit in rows]
        cache, width = batch_cache(hits)
        inputs = pad_rows(self.aligner.tokenizer, [ids[hit.length :] for ids, hit in rows], self.aligner.device)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        cached = torch.tensor([[0] * (width - h.length) + [1] * h.length for h in hits], dtype=mask.dtype)
        mask = torch.cat([cached.to(mask.device), mask], dim=1)  # the mask covers the cached prefixes too
        return PrefillInputs(ids, mask, position_ids(mask)[:, width:], cache, width, hits)

    def _prefix_hidden(self, rows: PrefillInputs) -> torch.Tensor | None:
        """What the in-prefill gate reads of the cached prefixes: their gate-layer outputs where it pools over them,
        else zeros (a gate that reads the last token never looks at them)."""
        if rows.width == 0:
            return None
        if self._needs_hidden:
            return batch_hidden(rows.hits, rows.width)
        hidden = int(self.aligner.model.config.get_text_config().hidden_size)
        return torch.zeros(1, 1, hidden, device=self.aligner.device).expand(len(rows.hits), rows.width, hidden)

    def _start(self, tree: PrefixTree | None, job: Job) -> tuple[Hit, bool]:
        """Where a row starts when its plan comes from inside the prefill, and whether that prefix is a steered one:
        the unsteered tree's longest prefix, or, when the prefill reads new turns as extra rows (the prompt's own
        rows then feed no gate), the steered tree's where it holds more (a conversation steered so far)."""
        plain = self._match(tree, job, steered=False)
        if tree is None or not self._can_steer or self.aligner.reader is None or not self._turns_in_prefill:
            return plain, False
        steered = self._match(tree, job, steered=True)
        return (steered, True) if steered.length > plain.length else (plain, False)

    def _steer_prefixes(
        self, tree: PrefixTree | None, jobs: list[Job], rows: PrefillInputs, starts: Sequence[bool], plan: Plan
    ) -> None:
        """Once an in-prefill gate has planned, before anything runs steered: give each row the prefix of its plan's
        kind. A row the cache lacks it for, or one that started on a steered prefix the plan does not steer, is set
        apart (`rows.apart`: the pass goes on, and it is prefilled again under the plan); `Replan` (the pass stops)
        when that is every row."""
        hits = rows.hits
        kinds = [self._steers(row) for row in plan]
        apart = [i for i, (start, kind) in enumerate(zip(starts, kinds, strict=True)) if start and not kind]
        steered = [i for i, kind in enumerate(kinds) if kind and not starts[i] and hits[i].length]
        found = [tree.match(jobs[i].prompt_ids, steered=True, limit=hits[i].length) for i in steered] if tree else []
        swap = [(i, hit) for i, hit in zip(steered, found, strict=True) if hit.length == hits[i].length]
        apart += [i for i, hit in zip(steered, found, strict=True) if hit.length < hits[i].length]
        if len(apart) == len(plan):
            raise Replan(plan)
        rows.apart = sorted(apart)
        if swap:
            write_rows(rows.cache, [i for i, _ in swap], [hit.kv() for _, hit in swap], rows.width)  # type: ignore[misc]

    def _reading_gate(self, wanted: bool) -> AbstractContextManager[dict[int, torch.Tensor]]:
        """The gate layer's outputs of the next pass, copied (`capture_layers`), where `wanted`; else nothing."""
        gate = self.aligner.gate
        if not wanted or gate is None:
            return nullcontext({})
        return capture_layers(self.aligner.layers, [gate.layer], _copied_hidden)

    def _remember_prompts(
        self,
        tree: PrefixTree,
        jobs: list[Job],
        plan: Plan,
        rows: PrefillInputs,
        first: PrefillInputs | None,
        read: torch.Tensor | None,
        generated: list[int],
    ) -> None:
        """Keep each prefilled prompt's keys and values (and, for an unsteered row the in-prefill gate read, its
        gate-layer outputs: its cached prefix's, then the first pass's over the rest) in the tree."""
        for i, (job, row) in enumerate(zip(jobs, plan, strict=True)):
            steered = self._steers(row)
            hidden = None
            if read is not None and first is not None and not steered:
                j = generated[i]  # the row in the first pass
                new = read[j][first.mask[j, first.width :].bool()]
                known = first.hits[j].hidden()
                hidden = torch.cat([known, new]) if known is not None else new
            columns = rows.mask[i].nonzero().flatten()
            tree.insert(
                job.prompt_ids, functools.partial(_row_kv, rows.cache, i, columns), steered=steered, hidden=hidden
            )
            tree.stats.count(len(job.prompt_ids), job.cached_tokens)

    def _seeded_tree(self) -> PrefixTree | None:
        """The prefix tree, holding the chat template's opening from the first call on (run unsteered and, when the
        aligner steers, steered); `None` when prefix caching is off."""
        if self.tree is not None and self._opening:
            opening, self._opening = self._opening, []
            try:
                self._run_opening(opening)
                log.info(
                    "prefix cache: %d MiB; the chat template's opening (%d tokens) run into it",
                    self.tree.budget_bytes >> 20,
                    len(opening),
                )
            except Exception as exc:
                log.warning("prefix cache: the chat template's opening could not be run (%s)", exc)
        return self.tree

    def _run_opening(self, opening: list[int]) -> None:
        assert self.tree is not None
        ids = torch.tensor([opening], device=self.aligner.device)
        mask = torch.ones_like(ids)
        kinds = (False, True) if self._can_steer else (False,)
        for steered in kinds:
            cache = DynamicCache()
            kwargs = self._forward_kwargs(mask, position_ids(mask), cache, prefill=True)
            plan = Plan((RowPlan(Action.STEER if steered else Action.PASS, None),))
            with self.aligner.steered(plan), self._reading_gate(not steered and self._needs_hidden) as read:
                self.aligner.model(input_ids=ids, attention_mask=mask, **kwargs)
            columns = torch.arange(len(opening), device=ids.device)
            gate = self.aligner.gate
            hidden = read[gate.layer][0] if gate is not None and read else None
            self.tree.insert(opening, functools.partial(_row_kv, cache, 0, columns), steered=steered, hidden=hidden)

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

    def _remember_answers(self, leaving: list[int]) -> None:
        """Keep each leaving row's keys and values (its prompt and the answer tokens it was fed) in the tree: the
        next turn of its conversation starts with them."""
        assert self.tree is not None and self.batch is not None
        for i in leaving:
            row = self.rows[i]
            columns = self.batch.mask[i].nonzero().flatten()
            ids = [*row.job.prompt_ids, *row.job.tokens][: len(columns)]
            if len(ids) == len(columns) and len(ids) > len(row.job.prompt_ids):
                kv_from = functools.partial(_row_kv, self.batch.cache, i, columns)
                self.tree.insert(ids, kv_from, steered=self._steers(row.plan))

    def _leave(self) -> None:
        """Finished rows leave the batch and get their last event."""
        staying = [i for i, row in enumerate(self.rows) if row.job.finish_reason is None]
        if len(staying) == len(self.rows):
            return
        if self.batch is not None:
            if self.tree is not None:
                self._remember_answers([i for i, row in enumerate(self.rows) if row.job.finish_reason is not None])
            self.batch.keep(staying)
        leaving = [row.job for row in self.rows if row.job.finish_reason is not None]
        self.rows = [self.rows[i] for i in staying]
        with self._condition:
            self._running = len(self.rows)
        finish(leaving)


def make_engine(
    aligner: InferAligner,
    scheduler: str = "continuous",
    *,
    prefix_cache_mb: float = DEFAULTS.prefix_cache_mb,
    pass_cost_tokens: int = DEFAULTS.pass_cost_tokens,
    **limits: object,
) -> Engine:
    """The serving engine for `scheduler`; "continuous" falls back to "batch" (with a warning) for an aligner it
    cannot serve (`continuous_unsupported`). `prefix_cache_mb`: the continuous scheduler's prefix cache
    (`serve.prefix`; 0: none); `pass_cost_tokens`: a forward pass's fixed cost in prompt tokens (0: measured)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler '{scheduler}'; choose one of {', '.join(SCHEDULERS)}.")
    if scheduler == "continuous":
        reason = continuous_unsupported(aligner)
        if reason is None:
            return ContinuousEngine(
                aligner, prefix_cache_mb=prefix_cache_mb, pass_cost_tokens=pass_cost_tokens, **limits
            )
        log.warning("continuous batching is off: %s; serving whole batches instead", reason)
    return BatchEngine(aligner, **limits)  # type: ignore[arg-type]
