"""The per-row plan: the one mapping from (mode, gate, allowed) to what happens to a row."""

from __future__ import annotations

import pytest
import torch

from inferaligner.gate import GateDecision
from inferaligner.plan import Action, make_plan
from inferaligner.settings import Mode

FIRED, QUIET = GateDecision(True, 1.0, 2), GateDecision(False, -1.0, 2)


@pytest.mark.parametrize(("mode", "actions"), [
    (Mode.INFERALIGNER, [Action.STEER, Action.PASS, Action.PASS]),
    (Mode.SELF, [Action.STEER, Action.PASS, Action.PASS]),
    (Mode.SIMPLE, [Action.REFUSE, Action.PASS, Action.PASS]),
    (Mode.ALWAYS, [Action.STEER, Action.STEER, Action.PASS]),
    (Mode.ALIGNED, [Action.DELEGATE, Action.PASS, Action.PASS]),
    (Mode.OFF, [Action.PASS, Action.PASS, Action.PASS]),
])  # fmt: skip
def test_every_mode(mode: Mode, actions: list[Action]) -> None:
    plan = make_plan(mode, [FIRED, QUIET, FIRED], 3, "No.", allowed=[True, True, False])
    assert [r.action for r in plan] == actions
    assert [r.intervened for r in plan] == [a is not Action.PASS for a in actions]
    assert [r.gate for r in plan] == [FIRED, QUIET, FIRED]
    assert [r.answer for r in plan] == ["No." if a is Action.REFUSE else None for a in actions]


def test_always_mode_intervenes_on_rows_whose_gate_did_not_fire() -> None:
    row = make_plan(Mode.ALWAYS, [QUIET], 1, "No.")[0]
    assert row.intervened and not row.gate.fired


def test_no_gate_and_helpers() -> None:
    plan = make_plan(Mode.ALWAYS, None, 2, "No.")
    assert plan.steers and not plan.refuses and [r.gate for r in plan] == [None, None]
    assert torch.equal(make_plan(Mode.SELF, [FIRED, QUIET], 2, "No.").steer_gates(2), torch.tensor([1.0, 1, 0, 0]))
    assert [r.gate for r in make_plan(Mode.SELF, [FIRED, QUIET], 2, "No.").select([1])] == [QUIET]
    with pytest.raises(ValueError, match="1 gate decisions for 2 rows"):
        make_plan(Mode.SELF, [FIRED], 2, "No.")
