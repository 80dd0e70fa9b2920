"""Readers for the third-party evaluation sets in `../shared/data/` (never copied into this repository)."""

from __future__ import annotations

import csv

from inferaligner.data import alpaca_reported, data_dir
from inferaligner.errors import PromptError


def _csv(relative: str) -> list[dict[str, str]]:
    path = data_dir() / relative
    if not path.is_file():
        raise PromptError(f"{path} is missing from the evaluation data.")
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def advbench() -> list[str]:
    """The 520 AdvBench harmful behaviours (`goal` column)."""
    return [row["goal"] for row in _csv("advbench/harmful_behaviors.csv")]


def alpaca(count: int = 300, seed: int = 0) -> list[str]:
    """`count` Alpaca instructions without input, sampled with `seed` from the 31,323 in the set (the ones the
    gate's training leaves out: `inferaligner.data.alpaca_reported`)."""
    return alpaca_reported(count, seed)


def xstest(label: str = "safe") -> list[str]:
    """XSTest v2 prompts with the given label ("safe": 250 benign look-alikes; "unsafe": 200 contrasts)."""
    return [row["prompt"] for row in _csv("xstest/xstest_prompts.csv") if row["label"] == label]


def jailbreakbench() -> list[str]:
    """The 100 JailbreakBench harmful behaviours (`Goal` column)."""
    return [row["Goal"] for row in _csv("jailbreakbench/jbb_behaviors_harmful.csv")]


def jailbreak_prompts() -> list[dict[str, str]]:
    """The 1,405 in-the-wild jailbreak prompts (rows of the CSV, in file order)."""
    return _csv("jailbreak_llms_in_the_wild/jailbreak_prompts_2023_12_25.csv")
