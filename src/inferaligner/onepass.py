"""The one-pass machinery: reading the gate inside generation's own prefill (`inflight.InFlightGate`), running the
blocks from the lowest steered layer to the gate again when a row fires (`inflight.BlockReplay`), and the server's
prefill with a cached prefix. `InferAligner` inherits it (`OnePass`); its `generate` and the server's engines call
`try_one_pass` and `prefill`."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.errors import InferAlignerError
from inferaligner.gate import Gate, GateDecision
from inferaligner.inflight import HeldStreamer, InFlightGate, Replan, TurnRows
from inferaligner.loopstop import with_loop_stop
from inferaligner.models import has_sliding_window
from inferaligner.plan import Plan
from inferaligner.reader import RequestReader
from inferaligner.settings import AlignerSettings, Mode
from inferaligner.steer import SteeringHandle, add_steering

# Arguments and config flags under which the model collects each block's output (a block run twice would add one)
_RECORDS_BLOCKS = ("output_hidden_states", "output_attentions", "output_router_logits")

# generate() arguments whose first forward pass is not the whole prompt (or that bring a cache a stopped pass fills)
_NOT_IN_FLIGHT = (
    "pixel_values",
    "image_sizes",
    "past_key_values",
    "cache",
    "inputs_embeds",
    "prefill_chunk_size",
    "prompt_lookup_num_tokens",
    "assistant_model",
    "assistant_early_exit",
)


def _flag(source: Any, key: str) -> bool:
    """Whether `source` (keyword arguments, a generation config or a model config) sets `key`."""
    if isinstance(source, dict):
        return bool(source.get(key))
    return bool(getattr(source, key, False)) if source is not None else False


class OnePass:
    """What `InferAligner` does to read its gate and act on the plan in as few passes as it can."""

    # Set by `InferAligner.__init__`.
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layers: nn.ModuleList
    settings: AlignerSettings
    gate: Gate | None
    steer_layers: list[int]
    alpha: float
    _directions: torch.Tensor | None
    _lock: threading.RLock
    reader: RequestReader | None
    plan: Callable[..., Plan]
    decide: Callable[..., Plan]
    steered: Callable[..., Any]
    gate_decisions: Callable[..., list[GateDecision] | None]

    def _reads_gate_in_flight(self, generate_kwargs: dict[str, Any]) -> bool:
        """Whether `generate` can read the gate inside its own prefill: text prompts whose first forward pass is
        the whole prompt (no image inputs that change its length, no prefix cache the stopped pass would fill, no
        chunked prefill, no assisted or prompt-lookup decoding), under a gate that reads the whole prompt where it
        stands (a `"turns"` gate reads each turn alone, in a pass of its own)."""
        if self.reader is not None:
            return False
        config = self.model.generation_config
        in_config = any(getattr(config, key, None) for key in ("prefill_chunk_size", "prompt_lookup_num_tokens"))
        return not in_config and not any(key in generate_kwargs for key in _NOT_IN_FLIGHT)

    @property
    def gating(self) -> str:
        """How the gate costs: `each turn read alone (blocks 0-l), then one pass` (a `"turns"` gate: a short pass over
        the turns' own tokens up to the gate layer, then generation as planned), `one pass` (read inside generation's
        prefill; steered layers all above the gate),
        `one pass, blocks a-b again when a row fires` (steered layers at or below the gate: a fired batch runs those
        blocks once more, steered), `one pass unless a row fires` (a fired batch stops at the gate layer and runs
        again, as the plan says), `two passes` (mode `always` where blocks cannot run again), or `no gate`."""
        if self.gate is None:
            return "no gate"
        if self.reader is not None:
            return f"each turn read alone (blocks 0-{self.gate.layer}), then one pass"
        if self.settings.mode in (Mode.SIMPLE, Mode.ALIGNED):
            return "one pass unless a row fires"
        if self._steers_after_gate():
            return "one pass"
        replay_from = self._replay_from({})
        if replay_from is not None:
            when = "twice" if self.settings.mode is Mode.ALWAYS else "again when a row fires"
            return f"one pass, blocks {replay_from}-{self.gate.layer} {when}"
        return "two passes" if self.settings.mode is Mode.ALWAYS else "one pass unless a row fires"

    def _steers_after_gate(self) -> bool:
        return self.gate is not None and all(layer > self.gate.layer for layer in self.steer_layers)

    def try_one_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        allowed: Sequence[bool] | None = None,
        on_plan: Callable[[Plan], None] | None = None,
        turns: Sequence[Sequence[Sequence[int]]] | None = None,
        **generate_kwargs: Any,
    ) -> tuple[Any, Plan]:
        """`model.generate` with the gate read inside its own prefill (`inferaligner.inflight`): returns
        `(output, plan)`, or `(None, plan)` when the plan needs what this pass cannot do (refused or delegated
        rows, or steered rows when a steered layer lies at or below the gate layer); the pass then stopped at the
        gate layer and the caller acts on the plan (`generate(..., plan=plan)`). `on_plan(plan)` is called as soon
        as the pass goes on with the plan, before the first new token. Where the prefill is not the whole prompt
        (image inputs, a prefix cache, chunked prefill), and for a `"turns"` gate, the plan comes from a separate gate
        pass (`decide`, `turns` as there) and `(None, plan)` is returned."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        if self.gate is None:  # the plan needs no pass (modes "always" and "off" only steer or pass)
            plan = self.plan(None, len(input_ids), allowed)
            if on_plan is not None:
                on_plan(plan)
            generate_kwargs = self._planned_loop_stop(generate_kwargs, input_ids.shape[1], plan)
            with self.steered(plan):
                return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs), plan
        images = {k: v for k, v in generate_kwargs.items() if k in ("pixel_values", "image_sizes")}
        if not self._reads_gate_in_flight(generate_kwargs):
            return None, self.decide(input_ids, attention_mask, allowed=allowed, turns=turns, **images)
        streamer = generate_kwargs.pop("streamer", None)
        held = HeldStreamer(streamer) if streamer is not None else None
        try:
            with self._gate_in_flight(len(input_ids), attention_mask, allowed, on_plan, held, generate_kwargs) as (
                reading,
                steering,
            ):
                if steering is not None:
                    generate_kwargs = self._loop_stop(generate_kwargs, input_ids.shape[1], lambda: steering.row_gates)
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, streamer=held, **generate_kwargs
                )
        except Replan as stop:
            if stop.plan is None:  # the model changed the prompt's length: read the gate in a pass of its own
                return None, self.decide(input_ids, attention_mask, allowed=allowed)
            return None, stop.plan
        assert reading.plan is not None
        return output, reading.plan

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        allowed: Sequence[bool] | None = None,
        prefix_hidden: torch.Tensor | None = None,
        before_steering: Callable[[Plan], None] | None = None,
        turns: Sequence[Sequence[Sequence[int]]] | None = None,
        turn_rows: TurnRows | None = None,
        **forward_kwargs: Any,
    ) -> tuple[Any, Plan]:
        """One forward pass of the model over these prompts with the gate read inside it, as `try_one_pass` reads
        it inside `generate`'s prefill: returns `(output, plan)`, or `(None, plan)` when the plan needs what this
        pass cannot do (it then stopped at the gate layer; run the pass again inside `steered(plan)`, with a fresh
        cache when one was passed: for a cached prefix, one whose steered rows hold the steered prefix).

        A pass that continues a cached prefix passes that prefix's gate-layer outputs as `prefix_hidden` and an
        `attention_mask` that covers the prefix as well; `before_steering(plan)` runs once the plan is known, before
        anything is steered, for the caller to give each row the cached prefix of its plan's kind
        (`inflight.InFlightGate`).

        A `"turns"` gate reads `turns` (`prompt_turns` of the whole prompts, which a pass that continues a cached
        prefix must give) in a pass of its own first; this pass then runs as the plan says. Or the pass reads them
        itself: `turn_rows` says which extra rows below the prompts hold the turns not read yet (`inflight.TurnRows`);
        the output then has the prompts' rows only."""
        if self.reader is not None and turn_rows is None:
            if turns is None and prefix_hidden is not None:
                raise InferAlignerError("A pass that continues a cached prefix must give the prompts' turns.")
            plan = self.decide(input_ids, attention_mask, allowed=allowed, turns=turns)
            if plan.refuses or plan.delegates:
                return None, plan
        elif self.gate is None:
            plan = self.plan(None, len(input_ids), allowed)
        if self.gate is None or (self.reader is not None and turn_rows is None):
            if before_steering is not None:
                before_steering(plan)
            with self.steered(plan), torch.inference_mode():
                return self.model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs), plan
        try:
            in_flight = self._gate_in_flight(
                turn_rows.rows if turn_rows is not None else len(input_ids),
                attention_mask,
                allowed,
                forward_kwargs=forward_kwargs,
                prefix_hidden=prefix_hidden,
                before_steering=before_steering,
                turn_rows=turn_rows,
            )
            with in_flight as (reading, _), torch.inference_mode():
                output = self.model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
        except Replan as stop:
            if stop.plan is None and prefix_hidden is not None:
                raise InferAlignerError("The gate cannot read a prompt whose length the model changes.") from None
            return None, stop.plan if stop.plan is not None else self.decide(input_ids, attention_mask, allowed=allowed)
        assert reading.plan is not None
        return output, reading.plan

    @contextmanager
    def _gate_in_flight(
        self,
        rows: int,
        attention_mask: torch.Tensor,
        allowed: Sequence[bool] | None,
        on_plan: Callable[[Plan], None] | None = None,
        streamer: HeldStreamer | None = None,
        forward_kwargs: dict[str, Any] | None = None,
        prefix_hidden: torch.Tensor | None = None,
        before_steering: Callable[[Plan], None] | None = None,
        turn_rows: TurnRows | None = None,
    ) -> Iterator[tuple[InFlightGate, SteeringHandle | None]]:
        """The hooks that read the gate inside the next forward pass (`inflight.InFlightGate`), with steering hooks
        that take the plan's row gates when every steered layer lies above the gate, or when the blocks from the
        lowest steered layer to the gate can run again (`forward_kwargs`: the pass's arguments); holds the
        aligner's lock."""
        forward_kwargs = forward_kwargs or {}
        plan_rows = functools.partial(self.plan, rows=rows, allowed=allowed)
        replay_from = self._replay_from(forward_kwargs)
        with self._lock, ExitStack() as hooks:
            steering = None
            can_steer = self._directions is not None and bool(self.steer_layers)
            if not can_steer:
                replay_from = None  # nothing could steer the blocks run again
            if can_steer and (self._steers_after_gate() or replay_from is not None):
                # each row's gate (the extra rows' too), set once the plan is known
                zero = torch.zeros(turn_rows.total if turn_rows is not None else rows)
                steering = hooks.enter_context(
                    add_steering(self.layers, self._directions, self.steer_layers, self.alpha, zero)
                )
            assert self.gate is not None
            gate_reader = InFlightGate(
                self.layers,
                self.gate,
                attention_mask,
                plan_rows,
                steering,
                on_plan,
                streamer,
                replay_from,
                prefix_hidden,
                before_steering,
                turn_rows,
            )
            reading = hooks.enter_context(gate_reader)
            yield reading, steering

    def _replay_from(self, forward_kwargs: dict[str, Any]) -> int | None:
        """The lowest steered layer, when it lies at or below the gate layer and a pass whose plan steers may run the
        blocks from there to the gate layer again (`inflight.BlockReplay`); `None` otherwise."""
        if self.gate is None or not self.steer_layers or self._steers_after_gate():
            return None
        settings = (
            forward_kwargs,
            forward_kwargs.get("generation_config"),
            self.model.generation_config,
            self.model.config,
        )
        if any(_flag(source, key) for source in settings for key in _RECORDS_BLOCKS):
            return None  # the blocks' outputs are being collected: running some twice would add entries
        if has_sliding_window(self.model):
            return None  # its cache layers drop old entries, so the first run's cannot be taken back
        return min(self.steer_layers)

    def _loop_stop(
        self, generate_kwargs: dict[str, Any], prompt_length: int, gates: Callable[[], torch.Tensor | None]
    ) -> dict[str, Any]:
        """`generate_kwargs` with the loop stop for the rows `gates()` steers (`inferaligner.loopstop`)."""
        return with_loop_stop(
            generate_kwargs, prompt_length, self.settings.loop_span, gates, self.model.generation_config
        )

    def _planned_loop_stop(self, generate_kwargs: dict[str, Any], prompt_length: int, plan: Plan) -> dict[str, Any]:
        """`_loop_stop` for the rows a known plan steers (unchanged when it steers none)."""
        if not plan.steers:
            return generate_kwargs
        gates = plan.steer_gates()
        return self._loop_stop(generate_kwargs, prompt_length, lambda: gates)
