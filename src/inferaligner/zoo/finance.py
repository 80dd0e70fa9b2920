"""The finance domain: Financial PhraseBank sentences classified for an investor as positive, negative or neutral.

The data is third-party (read from ../shared/data), so a finance target is built by the evaluation, never shipped.
"""

from __future__ import annotations

import random

from inferaligner.data import data_dir
from inferaligner.errors import PromptError

FPB_LABELS = ("negative", "neutral", "positive")


def financial_phrasebank(agreement: str = "AllAgree") -> list[tuple[str, str]]:
    """(sentence, label) pairs of Financial PhraseBank v1.0 at the given annotator agreement (latin-1 file)."""
    path = data_dir() / "financial_phrasebank" / f"Sentences_{agreement}.txt"
    if not path.is_file():
        raise PromptError(f"{path} is missing from the evaluation data.")
    pairs = []
    for line in path.read_text(encoding="latin-1").splitlines():
        sentence, _, label = line.rpartition("@")
        if sentence and label in FPB_LABELS:
            pairs.append((sentence.strip(), label))
    return pairs


def fpb_split(test_size: int = 300, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A fixed shuffle of the AllAgree sentences: (train, test), disjoint."""
    pairs = financial_phrasebank()
    random.Random(seed).shuffle(pairs)
    return pairs[test_size:], pairs[:test_size]


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
