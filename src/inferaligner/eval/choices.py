"""Multiple choice by log-likelihood, with InferAligner applied exactly as in generation.

Each (prompt, choice) pair is scored as the summed log-probability of the choice's tokens after the chat-formatted
prompt. The aligner plans each prompt from its gate (read on the prompt alone); steered rows are scored inside the
aligner's steered context, and a refused row (simple mode) picks no choice (`None`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from inferaligner.aligner import InferAligner
from inferaligner.gate import GateDecision
from inferaligner.plan import Plan
from inferaligner.prompts import pad_rows, position_ids


def choose(
    aligner: InferAligner,
    prompts: Sequence[str],
    choices: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[list[str | None], list[GateDecision | None]]:
    """The most likely choice for each prompt (`None` where the aligner answers with its refusal), and the gate's
    decision on it."""
    scores, plans = choice_scores(aligner, prompts, choices, batch_size=batch_size, progress=progress)
    picks: list[str | None] = []
    for row_scores, row in zip(scores, plans, strict=True):
        if row.answer is not None:
            picks.append(None)
        else:
            picks.append(choices[max(range(len(choices)), key=row_scores.__getitem__)])
    return picks, [row.gate for row in plans]


def choice_scores(
    aligner: InferAligner,
    prompts: Sequence[str],
    choices: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[list[list[float]], Plan]:
    """Per prompt, the summed log-probability of each choice after it (steered where the plan says), and the plan."""
    tokenizer = aligner.tokenizer
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    tail = max(map(len, choice_ids))
    # Only the last positions' logits are needed: models that can skip the rest of the vocabulary projection do.
    keep = (
        {"logits_to_keep": tail + 1} if "logits_to_keep" in inspect.signature(aligner.model.forward).parameters else {}
    )
    scores: list[list[float]] = []
    plans: list[Plan] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="scoring", disable=not progress, unit="batch"):
        chunk = list(prompts[start : start + batch_size])
        batch = aligner.encode(chunk)
        plan = aligner.decide(**batch)
        # The very ids the gate read (chat template, BOS where the model needs one), without their padding.
        prompt_ids = [
            ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        rows = [p + c for p in prompt_ids for c in choice_ids]
        inputs = pad_rows(tokenizer, rows, aligner.device)
        inputs |= {"position_ids": position_ids(inputs["attention_mask"]), **keep}
        with torch.inference_mode(), aligner.steered(plan, repeat=len(choices)):
            logits = aligner.model(**inputs).logits
        # The last `tail` positions predict every choice token (choices are right-aligned).
        logprobs = torch.log_softmax(logits[:, -tail - 1 : -1].float(), dim=-1)
        flat = []
        for row, ids_row in enumerate(rows):
            count = len(choice_ids[row % len(choices)])
            targets = torch.tensor(ids_row[-count:], device=logprobs.device)
            flat.append(float(logprobs[row, tail - count :].gather(1, targets[:, None]).sum()))
        scores += [flat[i * len(choices) : (i + 1) * len(choices)] for i in range(len(chunk))]
        plans.append(plan)
    return scores, Plan(tuple(row for plan in plans for row in plan))
