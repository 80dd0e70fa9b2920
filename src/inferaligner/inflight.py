"""One-pass gating: the gate is read inside `generate`'s own prefill, so no separate gate pass runs.

A hook on the gate layer takes each row's prompt activation the first time the layer runs (the prefill), decides
the gate and makes the plan before any later block runs. What happens next depends on where the steered layers lie:

- all of them above the gate layer: the steering hooks on those layers read the row gates just set, so fired rows
  are steered in the same pass and nothing runs twice;
- some at or below it: those blocks have already run unsteered, so a plan that steers any row stops the pass there
  (`Replan`) and the caller generates again with the plan; a plan that steers nothing carries on, in one pass.

Plans that refuse or delegate rows also stop the pass (their rows are answered some other way). Stopping costs a
`generate` call's set-up and the prompt's forward pass up to the gate layer; callers pass no cache of their own
(`InferAligner` keeps prefix caches, chunked prefill and assisted decoding on the separate gate pass).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from inferaligner.gate import Gate, pool
from inferaligner.models import block_hidden
from inferaligner.plan import Plan
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


class InFlightGate:
    """Hooks that read the gate in the prefill of the next forward pass and act on the plan in the same pass.

    `make_plan(decisions)` turns the gate's decisions into the batch's plan; `steering` (hooks on the steered
    layers, all above the gate, with zero gates until the plan is known) steers the plan's steered rows, or is `None`
    when some steered layer lies at or below the gate (a plan that steers then stops the pass).
    `on_plan(plan)` is called as soon as the pass goes on with the plan.
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
    ) -> None:
        self.gate, self.mask, self.make_plan = gate, mask, make_plan
        self.steering, self.on_plan, self.streamer = steering, on_plan, streamer
        self.plan: Plan | None = None
        self._handle = layers[gate.layer].register_forward_hook(self._read)

    def _read(self, _module: nn.Module, _args: Any, output: Any) -> None:
        self._handle.remove()  # the prefill only: decoding steps pay nothing
        hidden = block_hidden(output)
        rows = len(self.mask)
        if hidden.shape[1] != self.mask.shape[1] or hidden.shape[0] % rows:
            raise Replan(None)
        hidden = hidden[:: hidden.shape[0] // rows]  # sequences expanded per prompt (beams, samples) are alike
        plan = self.make_plan(self.gate.decide(pool(hidden, self.mask.to(hidden.device), self.gate.pooling)))
        self.plan = plan
        if plan.refuses or plan.delegates or (plan.steers and self.steering is None):
            raise Replan(plan)
        if self.steering is not None:
            if plan.steers:
                self.steering.row_gates = plan.steer_gates()
            else:
                self.steering.remove()
        if self.on_plan is not None:
            self.on_plan(plan)
        if self.streamer is not None:
            self.streamer.release()

    def remove(self) -> None:
        """Detach the gate hook (the steering hooks belong to the caller)."""
        self._handle.remove()

    def __enter__(self) -> InFlightGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
