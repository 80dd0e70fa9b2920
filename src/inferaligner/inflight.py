"""One-pass gating: the gate is read inside `generate`'s own prefill, so no separate gate pass runs.

A hook on the gate layer takes each row's prompt activation the first time the layer runs (the prefill), decides
the gate and makes the plan before any later block runs. What happens next depends on where the steered layers lie:

- all of them above the gate layer: the steering hooks on those layers read the row gates just set, so fired rows
  are steered in the same pass and nothing runs twice;
- some at or below it: those blocks have already run unsteered. A plan that steers a row runs the blocks from the
  lowest steered layer up to the gate layer once more, on their recorded inputs, now steered (`BlockReplay`), drops
  the key/value entries the first run of those blocks wrote, and the pass goes on from the gate layer with the
  replayed output: one pass, plus a few blocks when a row fires. Where those blocks cannot be replayed safely
  (a cache other than a plain `DynamicCache`, as in sliding-window models, or a block not fed by the one before
  it), such a plan stops the pass there (`Replan`) and the caller generates again with the plan. A plan that
  steers nothing carries on, in one pass.

A `"turns"` gate reads each turn alone: where the caller adds the turns not read yet as extra rows below the prompts
(`TurnRows`: each turn after the chat template's opening, as `reader.RequestReader` reads it), their features come
from the gate layer of the same pass, and the extra rows are dropped there: the blocks above it see the prompts only.

Plans that refuse or delegate rows also stop the pass (their rows are answered some other way). Stopping costs a
`generate` call's set-up and the prompt's forward pass up to the gate layer. `generate` callers pass no cache of
their own (`InferAligner` keeps prefix caches, chunked prefill and assisted decoding on the separate gate pass);
the serving engine's prefills may continue a cached prompt opening (`prefix_hidden`, `before_steering`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.streamers import BaseStreamer

from inferaligner.errors import InferAlignerError
from inferaligner.gate import Gate, GateDecision, pool
from inferaligner.models import block_hidden, with_block_hidden
from inferaligner.plan import Plan
from inferaligner.reader import RequestReader, own_means
from inferaligner.steer import SteeringHandle


class Replan(Exception):
    """The plan needs more than the pass in flight can do; it stops at the gate layer. `plan` is `None` when the
    gate could not be read there (the model changed the prompt's length)."""

    def __init__(self, plan: Plan | None) -> None:
        super().__init__("the plan needs another pass")
        self.plan = plan


class HeldStreamer(BaseStreamer):
    """Passes tokens on to `streamer` only once the plan is known, so a stopped pass leaves it untouched."""

    def __init__(self, streamer: BaseStreamer) -> None:
        self.streamer = streamer
        self.held: list[torch.Tensor] = []
        self.open = False

    def release(self) -> None:
        self.open = True
        for value in self.held:
            self.streamer.put(value)
        self.held.clear()

    def put(self, value: torch.Tensor) -> None:
        if self.open:
            self.streamer.put(value)
        else:
            self.held.append(value)

    def end(self) -> None:
        self.release()
        self.streamer.end()


class BlockReplay:
    """Records what blocks `first`..`last` are called with in the next forward pass, so that they can be run once
    more on the same inputs (`run_again`), with whatever steering hooks are set by then.

    The key/value entries the first run wrote into a `DynamicCache` are dropped before each block runs again, so the
    cache ends as if the blocks had run once, steered. `replayable` is False when that cannot be done safely: a
    cache layer of another kind (sliding window, static, quantized, offloaded), a block whose input is not the
    previous block's output, or one that wrote elsewhere than this pass's positions of its own cache layer.
    """

    def __init__(self, layers: nn.ModuleList, first: int, last: int) -> None:
        self.layers, self.first, self.last = layers, first, last
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.caches: list[Cache] = []  # the caches the blocks were handed, each once
        self._sound = True  # each block fed by the previous one, and appending to its own cache layer only
        self._start: torch.Tensor | None = None  # block `first`'s input
        self._previous: torch.Tensor | None = None  # the last recorded block's output
        self._lengths: list[list[int]] = []  # each cache's layer lengths before the block now running
        self._handles = []
        for index in range(first, last + 1):
            self._handles.append(layers[index].register_forward_pre_hook(self._record, with_kwargs=True))
            self._handles.append(layers[index].register_forward_hook(self._follow))

    def _record(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            self._sound = False
        elif not self.calls:
            self._start = hidden.clone()
        elif hidden is not self._previous:
            self._sound = False
        caches = list({id(v): v for v in (*args, *kwargs.values()) if isinstance(v, Cache)}.values())
        if kwargs.get("use_cache") and not caches:
            self._sound = False  # a cache the block reaches some other way: its entries could not be taken back
        if self.calls and [id(c) for c in caches] != [id(c) for c in self.caches]:
            self._sound = False
        self.caches = caches
        self._lengths = [_layer_lengths(cache) for cache in caches]
        self.calls.append((args, kwargs))

    def _follow(self, _module: nn.Module, _args: Any, output: Any) -> None:
        self._previous = block_hidden(output)
        index, added = self.first + len(self.calls) - 1, self._previous.shape[1]
        for cache, before in zip(self.caches, self._lengths, strict=True):
            after = _layer_lengths(cache)
            before = before + [0] * (len(after) - len(before))  # a cache may add its layers as blocks first write
            if after != [n + added if i == index else n for i, n in enumerate(before)]:
                self._sound = False  # the block wrote elsewhere than its own layer, or not the pass's positions

    @property
    def replayable(self) -> bool:
        """Whether every block ran once, fed by the one before, appending this pass's positions to its own layer of
        a plain `DynamicCache` held on its device (checked once the blocks have run: a cache may add its layers as
        they run)."""
        if not self._sound or len(self.calls) != self.last - self.first + 1:
            return False
        if any(getattr(cache, "offloading", False) for cache in self.caches):
            return False  # offloaded layers have moved off the device by now
        return all(
            _plain_dynamic_layer(cache, index) for cache in self.caches for index in range(self.first, self.last + 1)
        )

    def run_again(self) -> Any:
        """Blocks `first`..`last` once more from `first`'s recorded input; returns block `last`'s new output."""
        self.remove()
        assert self.replayable and self._start is not None
        hidden, output = self._start, None
        for index, (args, kwargs) in zip(range(self.first, self.last + 1), self.calls, strict=True):
            for cache in self.caches:  # drop what the first run of this block appended
                layer = cache.layers[index]
                layer.keys = layer.keys[..., : -hidden.shape[1], :]
                layer.values = layer.values[..., : -hidden.shape[1], :]
            if args:
                output = self.layers[index](hidden, *args[1:], **kwargs)
            else:
                output = self.layers[index](**{**kwargs, "hidden_states": hidden})
            hidden = block_hidden(output)
        return output

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _layer_lengths(cache: Cache) -> list[int]:
    return [layer.get_seq_length() for layer in getattr(cache, "layers", ())]


def _plain_dynamic_layer(cache: Cache, index: int) -> bool:
    """Whether `cache` keeps block `index`'s keys and values in a plain `DynamicLayer` (grown by concatenation)."""
    layers = getattr(cache, "layers", None)
    return layers is not None and index < len(layers) and type(layers[index]) is DynamicLayer


@dataclass
class TurnRows:
    """Turns read alone as extra rows of a pass: the batch holds `rows` prompts, then one row per turn in `turns`
    (the chat template's opening, cached or not, then the turn's tokens, which `own` [turns, new positions] marks).
    `prompts` gives each prompt's turns; `known` the features of those read before; `cache` is the pass's cache."""

    rows: int
    turns: list[tuple[int, ...]]
    own: torch.Tensor
    prompts: Sequence[Sequence[Sequence[int]]]
    known: dict[tuple[int, ...], torch.Tensor]
    reader: RequestReader
    cache: Cache | None = None
    _cut: list[Any] = field(default_factory=list, repr=False)

    @property
    def total(self) -> int:
        return self.rows + len(self.turns)

    def decide(self, gate: Gate, hidden: torch.Tensor) -> list[GateDecision]:
        """The prompts' decisions from the gate layer's output [total, positions, hidden]: the extra rows' features
        (kept by the reader) with those known before."""
        if hidden.shape[0] != self.total or hidden.shape[1] != self.own.shape[1]:
            raise InferAlignerError("The gate cannot read turns whose length the model changes.")
        features = dict(self.known)
        for turn, read in zip(self.turns, own_means(hidden[self.rows :], self.own), strict=True):
            features[turn] = read
            self.reader.remember(turn, read)
        return gate.decide_turns(self.reader.gather(self.prompts, features))

    def drop(self, layers: nn.ModuleList, after: int, output: Any) -> Any:
        """Block `after`'s output without the extra rows, the cache's higher layers cut to the prompts' rows too,
        and hooks that cut every later block's per-row arguments (mask, positions) the same way."""
        for index, layer in enumerate(getattr(self.cache, "layers", ())):
            if index > after and getattr(layer, "keys", None) is not None and layer.keys.shape[0] == self.total:
                layer.keys, layer.values = layer.keys[: self.rows], layer.values[: self.rows]
        for index in range(after + 1, len(layers)):
            self._cut.append(layers[index].register_forward_pre_hook(self._cut_arguments, with_kwargs=True))
        return with_block_hidden(output, block_hidden(output)[: self.rows])

    def _cut_arguments(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return tuple(self._first_rows(a) for a in args), {k: self._first_rows(v) for k, v in kwargs.items()}

    def _first_rows(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value[: self.rows] if value.ndim >= 2 and value.shape[0] == self.total else value
        if isinstance(value, (tuple, list)):
            return type(value)(self._first_rows(v) for v in value)
        if isinstance(value, dict):
            return {k: self._first_rows(v) for k, v in value.items()}
        return value

    def remove(self) -> None:
        for handle in self._cut:
            handle.remove()
        self._cut.clear()


class InFlightGate:
    """Hooks that read the gate in the prefill of the next forward pass and act on the plan in the same pass.

    `make_plan(decisions)` turns the gate's decisions into the batch's plan; `steering` (hooks on the steered
    layers, with zero gates until the plan is known) steers the plan's steered rows. When some steered layer lies at
    or below the gate, `replay_from` names the lowest one: a plan that steers then runs the blocks from there to the
    gate layer again (`BlockReplay`), or stops the pass when they cannot be replayed or `steering` is `None`.
    `on_plan(plan)` is called as soon as the pass goes on with the plan.

    A pass that continues a cached prefix (the prompt's first tokens already in the cache) gives that prefix's
    gate-layer outputs as `prefix_hidden` ([prefix, hidden], or [rows, prefix, hidden] for prefixes of each row's
    own, left-padded), so the gate pools over the whole prompt; `mask` then covers the prefix too.
    `before_steering(plan)` is called once the plan is known, before the pass goes on and any block runs steered, so
    the caller can hand each row the prefix of its plan's kind (or raise `Replan(plan)` when it has none).
    A `"turns"` gate reads `turn_rows` (extra rows below the prompts, dropped at the gate layer) instead of pooling.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        gate: Gate,
        mask: torch.Tensor,
        make_plan: Any,
        steering: SteeringHandle | None,
        on_plan: Any = None,
        streamer: HeldStreamer | None = None,
        replay_from: int | None = None,
        prefix_hidden: torch.Tensor | None = None,
        before_steering: Callable[[Plan], None] | None = None,
        turn_rows: TurnRows | None = None,
    ) -> None:
        self.gate, self.mask, self.make_plan, self.turn_rows = gate, mask, make_plan, turn_rows
        self.layers = layers
        self.steering, self.on_plan, self.streamer = steering, on_plan, streamer
        self.prefix_hidden, self.before_steering = prefix_hidden, before_steering
        self.plan: Plan | None = None
        self._replay = BlockReplay(layers, replay_from, gate.layer) if replay_from is not None else None
        self._handle = layers[gate.layer].register_forward_hook(self._read)

    def _read(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        self._handle.remove()  # the prefill only: decoding steps pay nothing
        replay, self._replay = self._replay, None
        if replay is not None:
            replay.remove()
        hidden = block_hidden(output)
        if self.turn_rows is not None:
            plan = self.make_plan(self.turn_rows.decide(self.gate, hidden))
        else:
            plan = self.make_plan(self.gate.decide(self._pooled(hidden)))
        self.plan = plan
        # Steered rows need the steering hooks, and the blocks at or below the gate (if any are steered) run again.
        cannot_steer = self.steering is None or (replay is not None and not replay.replayable)
        if plan.refuses or plan.delegates or (plan.steers and cannot_steer):
            raise Replan(plan)
        if self.before_steering is not None:
            self.before_steering(plan)
        replayed = self._steer(plan, replay) if self.steering is not None else None
        if self.turn_rows is not None:
            replayed = self.turn_rows.drop(self.layers, self.gate.layer, output if replayed is None else replayed)
            if self.steering is not None and plan.steers:
                self.steering.row_gates = plan.steer_gates()
        if self.on_plan is not None:
            self.on_plan(plan)
        if self.streamer is not None:
            self.streamer.release()
        return replayed

    def _pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """The gate layer's output pooled per prompt (a cached prefix's outputs put in front); `Replan(None)` when
        the model changed the prompt's length."""
        rows = len(self.mask)
        if self.prefix_hidden is not None:
            prefix = self.prefix_hidden.to(device=hidden.device, dtype=hidden.dtype)
            if prefix.ndim == 2:  # one prefix shared by every row
                prefix = prefix.expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([prefix, hidden], dim=1)
        if hidden.shape[1] != self.mask.shape[1] or hidden.shape[0] % rows:
            raise Replan(None)
        hidden = hidden[:: hidden.shape[0] // rows]  # sequences expanded per prompt (beams, samples) are alike
        return pool(hidden, self.mask.to(hidden.device), self.gate.pooling)

    def _steer(self, plan: Plan, replay: BlockReplay | None) -> Any:
        """Give the steering hooks the plan's rows (or remove them when none steers); run the replayed blocks."""
        assert self.steering is not None
        if not plan.steers:
            self.steering.remove()
            return None
        gates = plan.steer_gates()
        if self.turn_rows is not None:  # the extra rows run unsteered up to the gate layer, where they are dropped
            gates = torch.cat([gates, gates.new_zeros(len(self.turn_rows.turns))])
        self.steering.row_gates = gates
        return replay.run_again() if replay is not None else None

    def remove(self) -> None:
        """Detach the gate hook and any recording hooks (the steering hooks belong to the caller)."""
        self._handle.remove()
        if self._replay is not None:
            self._replay.remove()
        if self.turn_rows is not None:
            self.turn_rows.remove()

    def __enter__(self) -> InFlightGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
