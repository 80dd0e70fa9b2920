"""The per-row plan: what InferAligner does to each prompt of a batch, decided once from the mode and the gate.

Every consumer (generation, streaming, choice scoring, the server, image-text prompts) acts on a `Plan`; none of
them re-derives what a mode means. `make_plan` is the only place that maps (mode, gate decision, allowed) to an
action.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from inferaligner.gate import GateDecision
from inferaligner.settings import Mode


class Action(str, Enum):
    """What happens to one row."""

    PASS = "pass"  # plain generation, bit-for-bit
    STEER = "steer"  # generated with the steering vectors added
    REFUSE = "refuse"  # answered with the fixed refusal (simple mode), not generated


@dataclass(frozen=True)
class RowPlan:
    """One row's action, the gate decision behind it, and the fixed answer of a refused row."""

    action: Action
    gate: GateDecision | None
    answer: str | None = None

    @property
    def intervened(self) -> bool:
        """Whether InferAligner changes this row's answer (steers it, or replaces it with the refusal)."""
        return self.action is not Action.PASS


@dataclass(frozen=True)
class Plan:
    """The plan of a batch, one `RowPlan` per row."""

    rows: tuple[RowPlan, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[RowPlan]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> RowPlan:
        return self.rows[index]

    @property
    def steers(self) -> bool:
        return any(r.action is Action.STEER for r in self.rows)

    @property
    def refuses(self) -> bool:
        return any(r.action is Action.REFUSE for r in self.rows)

    def steer_gates(self, repeat: int = 1) -> torch.Tensor:
        """1.0 per steered row, else 0.0, each row repeated `repeat` times (several sequences per prompt)."""
        gates = torch.tensor([1.0 if r.action is Action.STEER else 0.0 for r in self.rows])
        return gates.repeat_interleave(repeat) if repeat > 1 else gates

    def select(self, indices: Sequence[int]) -> Plan:
        """The plan of some rows, in the order given."""
        return Plan(tuple(self.rows[i] for i in indices))


def make_plan(
    mode: Mode,
    decisions: Sequence[GateDecision] | None,
    rows: int,
    refusal: str,
    allowed: Sequence[bool] | None = None,
) -> Plan:
    """Each row's action: `off` passes every row; `always` steers every row; the gated modes act where the gate
    fired (`simple` by refusing, the others by steering). Rows with `allowed[i]` false always pass."""
    if decisions is not None and len(decisions) != rows:
        raise ValueError(f"{len(decisions)} gate decisions for {rows} rows.")
    if allowed is not None and len(allowed) != rows:
        raise ValueError(f"{len(allowed)} allowed flags for {rows} rows.")
    plans = []
    for row in range(rows):
        gate = decisions[row] if decisions is not None else None
        if (allowed is not None and not allowed[row]) or mode is Mode.OFF:
            plans.append(RowPlan(Action.PASS, gate))
        elif mode is Mode.ALWAYS:
            plans.append(RowPlan(Action.STEER, gate))
        elif gate is not None and gate.fired:
            refuse = mode is Mode.SIMPLE
            plans.append(RowPlan(Action.REFUSE if refuse else Action.STEER, gate, refusal if refuse else None))
        else:
            plans.append(RowPlan(Action.PASS, gate))
    return Plan(tuple(plans))
