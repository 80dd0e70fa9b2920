"""The finance domain: Financial PhraseBank sentences classified for an investor as positive, negative or neutral.

The data is third-party (read from ../shared/data), so a finance target is built by the evaluation, never shipped.
"""

from __future__ import annotations

from inferaligner.eval.datasets import FPB_LABELS, fpb_split

INSTRUCTION = (
    "Classify the sentiment of this financial news sentence for an investor. Answer with one word: positive, "
    "negative or neutral.\n\nSentence: {sentence}"
)
TRAIN_SIZE = 500  # 63 LoRA steps: about 10 minutes per finance build on 2 CPU cores


def finance_prompt(sentence: str) -> str:
    return INSTRUCTION.format(sentence=sentence)


def finance_examples(limit: int | None = None) -> list[tuple[str, str]]:
    """(instruction, label) training pairs from the training part of the fixed FPB split."""
    train, _ = fpb_split()
    return [(finance_prompt(s), label) for s, label in train[: limit or TRAIN_SIZE]]


def finance_test(limit: int | None = None) -> tuple[list[str], list[str]]:
    """Held-out prompts and their labels."""
    _, test = fpb_split()
    test = test[:limit]
    return [finance_prompt(s) for s, _ in test], [label for _, label in test]


CHOICES = FPB_LABELS
