"""Multiple choice by log-likelihood, with InferAligner applied exactly as in generation.

Each (prompt, choice) pair is scored as the summed log-probability of the choice's tokens after the chat-formatted
prompt. The gate is read on the prompt alone; rows whose gate fires are scored under the steering hooks. In
simple mode a fired row answers with the fixed refusal, so it picks no choice (`None`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from inferaligner.aligner import InferAligner, Mode
from inferaligner.gate import GateDecision
from inferaligner.prompts import format_chats, position_ids
from inferaligner.steer import add_steering


def choose(
    aligner: InferAligner,
    prompts: Sequence[str],
    choices: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[list[str | None], list[GateDecision | None]]:
    """The most likely choice for each prompt, and the gate's decision on it."""
    scores, gates = choice_scores(aligner, prompts, choices, batch_size=batch_size, progress=progress)
    picks: list[str | None] = []
    for row_scores, decision in zip(scores, gates, strict=True):
        if aligner.mode is Mode.SIMPLE and decision is not None and decision.fired:
            picks.append(None)
        else:
            picks.append(choices[max(range(len(choices)), key=row_scores.__getitem__)])
    return picks, gates


def choice_scores(
    aligner: InferAligner,
    prompts: Sequence[str],
    choices: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[list[list[float]], list[GateDecision | None]]:
    """Per prompt, the summed log-probability of each choice after it (steered where the gate fires), and the
    gate's decision."""
    tokenizer = aligner.tokenizer
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    tail = max(map(len, choice_ids))
    # Only the last positions' logits are needed: models that can skip the rest of the vocabulary projection do.
    keep = (
        {"logits_to_keep": tail + 1} if "logits_to_keep" in inspect.signature(aligner.model.forward).parameters else {}
    )
    scores: list[list[float]] = []
    gates: list[GateDecision | None] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="scoring", disable=not progress, unit="batch"):
        chunk = list(prompts[start : start + batch_size])
        batch = aligner.encode(chunk)
        decisions = aligner.gate_decisions(**batch)
        row_gates = aligner.row_gates(decisions, len(chunk))
        texts = format_chats(tokenizer, chunk, aligner.system)
        prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        rows = [p + c for p in prompt_ids for c in choice_ids]
        width = max(map(len, rows))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=aligner.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=aligner.device)
        directions = aligner.steer_directions
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask), **keep}
        with torch.inference_mode():
            if directions is not None and bool(row_gates.any()):
                gates_per_row = row_gates.repeat_interleave(len(choices))
                with add_steering(aligner.layers, directions, aligner.steer_layers, aligner.alpha, gates_per_row):
                    logits = aligner.model(**inputs).logits
            else:
                logits = aligner.model(**inputs).logits
        # The last `tail` positions predict every choice token (choices are right-aligned).
        logprobs = torch.log_softmax(logits[:, -tail - 1 : -1].float(), dim=-1)
        flat = []
        for row, ids_row in enumerate(rows):
            count = len(choice_ids[row % len(choices)])
            targets = torch.tensor(ids_row[-count:], device=logprobs.device)
            flat.append(float(logprobs[row, tail - count :].gather(1, targets[:, None]).sum()))
        scores += [flat[i * len(choices) : (i + 1) * len(choices)] for i in range(len(chunk))]
        gates += decisions if decisions else [None] * len(chunk)
    return scores, gates
