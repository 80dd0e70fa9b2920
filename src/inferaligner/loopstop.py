"""Ends a steered answer when it starts over: the loop stop.

A steered row sometimes says its refusal and then repeats it until the token limit ("I'm not going to help with
this one. ... I'm not going to help with this one. ..."). `LoopStop` is a per-row stopping criterion for
`generate`: a steered row whose newest `span` tokens already appear earlier in its answer is finished there, so
the answer ends after its first round (plus the `span` tokens that began the second). Rows that are not steered
never stop early, so their answers stay token-identical to plain generation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


class LoopStop(StoppingCriteria):
    """Stops each steered row at its first repeated run of `span` new tokens.

    `gates()` returns each prompt's steering gate (non-zero: steered) or `None` while the plan is unknown; rows
    repeated per prompt (several sequences per prompt) share their prompt's gate.
    """

    def __init__(
        self, prompt_length: int, span: int, gates: Callable[[], torch.Tensor | None], listeners: Sequence[Any] = ()
    ) -> None:
        self.prompt_length, self.span, self.gates, self.listeners = prompt_length, span, gates, listeners
        self.stopped: set[int] = set()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        gates = self.gates()
        new = input_ids[:, self.prompt_length :]
        if gates is None or new.shape[1] <= self.span or not bool((gates != 0).any()):
            return done
        steered = (gates != 0).repeat_interleave(len(input_ids) // len(gates))
        for row in torch.nonzero(steered).flatten().tolist():
            done[row] = repeats(new[row].tolist(), self.span)
        fresh = [row for row in torch.nonzero(done).flatten().tolist() if row not in self.stopped]
        if fresh:
            self.stopped.update(fresh)
            for listener in self.listeners:
                listener.rows_stopped(fresh)
        return done


def repeats(tokens: Sequence[int], span: int) -> bool:
    """Whether the newest `span` of these answer tokens already appeared, as a run, earlier in the answer: the loop
    stop's test, applied to each steered row (`LoopStop`, and the server's continuous scheduler); `span` 0: never."""
    if span <= 0 or len(tokens) <= span:
        return False
    last = list(tokens[-span:])
    return any(list(tokens[start : start + span]) == last for start in range(len(tokens) - span))


def with_loop_stop(
    generate_kwargs: dict[str, Any],
    prompt_length: int,
    span: int,
    gates: Callable[[], torch.Tensor | None],
    model_config: Any,
) -> dict[str, Any]:
    """`generate_kwargs` with a `LoopStop` added to the caller's stopping criteria; unchanged when `span` is 0 or
    for beam search (whose beams share one stopping decision). The caller's criteria that track rows themselves
    (a `rows_stopped(rows)` method, as the server's) are told which rows the loop stop ends."""
    config = generate_kwargs.get("generation_config") or model_config
    beams = generate_kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    if span <= 0 or beams > 1:
        return generate_kwargs
    criteria = StoppingCriteriaList(generate_kwargs.get("stopping_criteria") or [])
    listeners = [c for c in criteria if callable(getattr(c, "rows_stopped", None))]
    criteria.append(LoopStop(prompt_length, span, gates, listeners))
    return {**generate_kwargs, "stopping_criteria": criteria}
