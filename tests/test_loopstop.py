"""The loop stop: steered rows end at their first repeated run of tokens; other rows are never cut."""

from __future__ import annotations

import pytest
import torch
from test_aligner import PROMPTS, make_aligner

from inferaligner.loopstop import LoopStop
from inferaligner.plan import Action
from inferaligner.settings import AlignerSettings, SettingsError


def test_only_steered_rows_that_repeat_a_run_stop() -> None:
    prompt = [9, 9, 9]
    looping = [*prompt, 1, 2, 3, 4, 5, 1, 2, 3]  # "1 2 3" again
    fresh = [*prompt, 1, 2, 3, 4, 5, 6, 7, 8]
    ids = torch.tensor([looping, looping, fresh])
    stop = LoopStop(len(prompt), 3, lambda: torch.tensor([1.0, 0.0, 1.0]))
    assert stop(ids, torch.zeros(3, 10)).tolist() == [True, False, False]
    assert LoopStop(len(prompt), 3, lambda: None)(ids, torch.zeros(3, 10)).tolist() == [False] * 3
    assert LoopStop(len(prompt), 4, lambda: torch.ones(3))(ids, torch.zeros(3, 10)).tolist() == [False] * 3
    # two sequences per prompt share their prompt's gate
    pairs = LoopStop(len(prompt), 3, lambda: torch.tensor([1.0, 0.0]))
    assert pairs(torch.tensor([looping, fresh, looping, looping]), torch.zeros(4, 10)).tolist() == [
        True,
        False,
        False,
        False,
    ]


def _new_tokens(aligner, prompts: list[str], **kwargs) -> list[list[int]]:
    inputs = aligner.encode(prompts)
    output = aligner.generate(**inputs, max_new_tokens=40, do_sample=False, **kwargs)
    pad = aligner.tokenizer.pad_token_id
    return [[t for t in row.tolist() if t != pad] for row in output[:, inputs["input_ids"].shape[1] :]]


def _first_repeat(tokens: list[int], span: int) -> int | None:
    """Where the first run of `span` tokens that appeared before ends, if any."""
    for end in range(span + 1, len(tokens) + 1):
        last = tokens[end - span : end]
        if any(tokens[i : i + span] == last for i in range(end - span)):
            return end
    return None


@pytest.mark.parametrize("mode", ["always", "inferaligner"])
def test_steered_answers_end_at_their_first_repeat_and_the_others_run_on(mode: str) -> None:
    span = 3
    aligner = make_aligner(mode=mode, loop_span=span)
    plain = _new_tokens(aligner.variant(mode="off"), PROMPTS)
    uncut = _new_tokens(aligner.variant(loop_span=0), PROMPTS)
    cut = _new_tokens(aligner, PROMPTS)
    plan = aligner.decide(**aligner.encode(PROMPTS))
    assert any(row.action is Action.STEER for row in plan)
    for row, full, got, base in zip(plan, uncut, cut, plain, strict=True):
        if row.action is Action.STEER:
            end = _first_repeat(full, span)
            assert got == (full[:end] if end else full)
        else:
            assert got == base  # rows the plan leaves alone are never cut
    assert any(len(g) < len(f) for g, f in zip(cut, uncut, strict=True))  # the tiny model does loop


def test_loop_span_must_be_a_whole_number() -> None:
    assert AlignerSettings(loop_span=0).loop_span == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(SettingsError, match="loop_span must be a whole number"):
            AlignerSettings(loop_span=bad)


def test_repeats_finds_the_newest_run_earlier_in_the_answer() -> None:
    from inferaligner.loopstop import repeats

    assert repeats([5, 6, 7, 5, 6], 2) and not repeats([5, 6, 7, 6, 5], 2)
    assert not repeats([5, 6, 5, 6], 0) and not repeats([5, 6], 2)  # off, or too short to repeat
    assert repeats([1, 1, 1], 2)  # overlapping runs count
