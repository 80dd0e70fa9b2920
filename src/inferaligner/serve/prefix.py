"""The chat template's opening, run through the model once: chat requests prefill only what follows it.

Every chat request starts with the same tokens (the template's system turn and the user turn's header): 24 of the
~46 prompt tokens of a short SmolLM2 chat request. `SharedPrefix` runs them through the model once, unsteered and
steered, and keeps each layer's keys and values; a request that starts with them gets them as its cache and
prefills the rest only.

Two things keep that exact. The gate pools over the whole prompt, so the prefix also keeps its gate-layer outputs,
which the gate reads before the rest's (`prefix_hidden` of `InferAligner.prefill`). A steered row is steered at
every position, the prefix's included, so once the plan is known, and before any block runs steered, each steered
row's prefix entries are swapped for the steered ones (`steer`): its cache is then the one a steered prefill of its
whole prompt would have written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from inferaligner.aligner import InferAligner
from inferaligner.capture import capture_layers
from inferaligner.models import block_hidden
from inferaligner.plan import Action, Plan, RowPlan

Forward = Callable[[torch.Tensor, torch.Tensor, DynamicCache], Any]  # (input ids, attention mask, cache) -> output
KeysValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer, each [1, heads, prefix, head dim]


@dataclass(eq=False)
class SharedPrefix:
    """A prompt prefix's keys and values per layer, unsteered and steered, and its gate-layer outputs."""

    ids: list[int]
    plain: KeysValues
    steered: KeysValues | None  # None when the aligner steers nothing
    gate_hidden: torch.Tensor | None  # [prefix, hidden]; None without a gate

    @classmethod
    def build(cls, aligner: InferAligner, ids: Sequence[int], forward: Forward) -> SharedPrefix:
        """Run `ids` through the model unsteered (reading the gate layer's outputs) and, when the aligner can steer,
        steered at full strength. `forward(ids, mask, cache)` runs one pass as the engine runs its prefills."""
        tokens = torch.tensor([list(ids)], device=aligner.device)
        mask = torch.ones_like(tokens)
        captured: list[torch.Tensor] = []

        def run(action: Action) -> KeysValues:
            cache = DynamicCache()
            gate_layer = [aligner.gate.layer] if action is Action.PASS and aligner.gate is not None else []
            with ExitStack() as stack:
                stack.enter_context(aligner.steered(Plan((RowPlan(action, None),))))
                stack.enter_context(torch.inference_mode())
                if gate_layer:
                    read = stack.enter_context(capture_layers(aligner.layers, gate_layer, _first_row))
                forward(tokens, mask, cache)
            if gate_layer:
                captured.append(read[gate_layer[0]])
            return [(layer.keys, layer.values) for layer in cache.layers]

        plain = run(Action.PASS)
        steered = run(Action.STEER) if aligner.steer_directions is not None and aligner.steer_layers else None
        return cls(list(ids), plain, steered, captured[0] if captured else None)

    def __len__(self) -> int:
        return len(self.ids)

    def fits(self, prompt_ids: Sequence[int]) -> bool:
        """Whether this prompt starts with the prefix and goes on after it."""
        return len(prompt_ids) > len(self.ids) and list(prompt_ids[: len(self.ids)]) == self.ids

    def cache(self, rows: int, gates: torch.Tensor | None = None) -> DynamicCache:
        """A cache of its own holding the prefix for `rows` rows: the steered prefix where `gates` (one per row)
        is 1."""
        cache = DynamicCache()
        for index, (keys, values) in enumerate(self.plain):  # `update` copies: the kept prefix is never written
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), index)
        if gates is not None:
            self._swap(cache, gates)
        return cache

    def steer(self, cache: DynamicCache, plan: Plan) -> None:
        """Give the rows `plan` steers the steered prefix in `cache` (whose first entries are this prefix)."""
        self._swap(cache, plan.steer_gates())

    def _swap(self, cache: DynamicCache, gates: torch.Tensor) -> None:
        """Overwrite, in place, the prefix entries of the rows whose gate is 1 with the steered prefix's (the cache
        is the prefill's own, made by `cache`)."""
        if self.steered is None or not bool(gates.any()):
            return
        size = len(self.ids)
        for layer, (keys, values) in zip(cache.layers, self.steered, strict=True):
            rows = gates.to(layer.keys.device).nonzero().flatten()
            layer.keys[rows, :, :size] = keys
            layer.values[rows, :, :size] = values


def _first_row(_layer: int, output: object) -> torch.Tensor:
    return block_hidden(output)[0].clone()
