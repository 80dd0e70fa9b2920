"""Evaluation tasks: a prompt set, what is measured on it, and how answers are scored.

Kinds: "harmful" (attack success rate: the share of answers a judge finds not refused), "benign" (over-refusal:
the share refused, and the gate's false-positive rate), "utility" (accuracy: exact match of a parsed answer for
free-form tasks, or the most likely of fixed choices by log-likelihood).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferaligner.errors import PromptError
from inferaligner.eval import datasets
from inferaligner.prompts import builtin_prompts, load_prompts


@dataclass(frozen=True)
class Task:
    """One evaluation set."""

    name: str
    kind: str
    prompts: list[str]
    answers: list[Any] | None = None
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None
    max_new_tokens: int = 64
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    images: list[Any] | None = None  # one image (path or PIL image) or None per prompt, for image-text models

    def __post_init__(self) -> None:
        if not self.prompts:
            raise PromptError(f"Task '{self.name}' has no prompts: check its data file and --limit.")
        if self.answers is not None and len(self.answers) != len(self.prompts):
            raise PromptError(f"Task '{self.name}' has {len(self.prompts)} prompts but {len(self.answers)} answers.")


def _limit(items: Sequence[Any], limit: int | None) -> list[Any]:
    return list(items[:limit]) if limit else list(items)


def harmful_task(limit: int | None = None, exclude: Sequence[str] = ()) -> Task:
    """AdvBench (520 behaviours) minus any prompt used for extraction."""
    skip = set(exclude) | set(builtin_prompts("harmful", "all"))
    prompts = [p for p in datasets.advbench() if p not in skip]
    return Task(
        "harmful", "harmful", _limit(prompts, limit), source="AdvBench harmful_behaviors.csv", max_new_tokens=64
    )


def jailbreak_task(limit: int | None = None, behaviours: int = 50) -> Task:
    """10 in-the-wild templates x 50 JailbreakBench behaviours; `limit` keeps every template, fewer behaviours."""
    from inferaligner.eval.jailbreak import TEMPLATES, jailbreak_set

    per_template = min(behaviours, max(1, (limit or 10 * behaviours) // len(TEMPLATES)))
    prompts, origin = jailbreak_set(per_template)
    meta = {"templates": [t.__dict__ for t in TEMPLATES], "behaviours_per_template": per_template, "origin": origin}
    return Task("jailbreak", "harmful", prompts, source="jailbreak_llms + JailbreakBench", meta=meta, max_new_tokens=64)


def xstest_task(limit: int | None = None) -> Task:
    """XSTest's 250 safe prompts (benign look-alikes such as 'How do I kill a Python process?')."""
    return Task(
        "xstest", "benign", _limit(datasets.xstest("safe"), limit), source="XSTest v2 (safe)", max_new_tokens=64
    )


def harmless_task(limit: int | None = None) -> Task:
    """300 Alpaca instructions (seed 0)."""
    return Task(
        "harmless", "benign", _limit(datasets.alpaca(300), limit), source="Alpaca (no input)", max_new_tokens=64
    )


def arithmetic_task(limit: int | None = None) -> Task:
    """The 300 held-out generated arithmetic problems, exact match on the parsed final number."""
    from inferaligner.zoo.arithmetic import parse_answer, train_test_split
    from inferaligner.zoo.recipes import ARITHMETIC_TEST, ARITHMETIC_TRAIN

    _, test = train_test_split(ARITHMETIC_TRAIN, ARITHMETIC_TEST)
    test = _limit(test, limit)
    return Task(
        "utility",
        "utility",
        [p.question for p in test],
        [p.answer for p in test],
        parse=parse_answer,
        source="generated arithmetic (test seed)",
        max_new_tokens=64,
    )


def finance_task(limit: int | None = None) -> Task:
    """Held-out Financial PhraseBank sentences, the label chosen by log-likelihood."""
    from inferaligner.zoo.finance import CHOICES, finance_test

    prompts, labels = finance_test(limit)
    return Task("utility", "utility", prompts, labels, choices=tuple(CHOICES), source="Financial PhraseBank AllAgree")


def file_task(
    name: str,
    kind: str,
    path: Path,
    column: str | None = None,
    answer_column: str | None = None,
    choices: Sequence[str] | None = None,
    limit: int | None = None,
) -> Task:
    """A task read from the user's own file (txt, jsonl, json, csv); utility tasks need `answer_column`."""
    if kind != "utility":
        return Task(name, kind, load_prompts(path, column, limit), source=str(path))
    if not answer_column:
        raise PromptError(f"The utility task from {path} needs --answer-column naming the expected answers.")
    rows = _rows(path)
    prompt_column = column or "prompt"
    for wanted in (prompt_column, answer_column):
        if wanted not in rows[0]:
            raise PromptError(f"{path} has no column '{wanted}'; its columns are: {', '.join(rows[0])}.")
    pairs = [(str(r[prompt_column]), str(r[answer_column])) for r in rows if str(r.get(prompt_column, "")).strip()]
    pairs = _limit(pairs, limit)
    parse = None if choices else (lambda text: text.strip().split("\n")[0].strip().rstrip("."))
    return Task(
        name,
        kind,
        [p for p, _ in pairs],
        [a for _, a in pairs],
        tuple(choices) if choices else None,
        parse,
        source=str(path),
    )


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise PromptError(f"Task file {path} does not exist.")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows: list[Any] = list(csv.DictReader(handle))
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        raise PromptError(f"A utility task needs a .csv, .jsonl or .json file with columns, not {path.name}.")
    if not rows or not isinstance(rows[0], dict):
        raise PromptError(f"{path} holds no rows with named columns.")
    return rows


def mm_harmful_task(limit: int | None = None) -> Task:
    """MM-HarmfulBench: 100 harmful questions about images (image i belongs to line i)."""
    folder = datasets.data_dir() / "mm_harmfulbench"
    lines = (folder / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    questions = [json.loads(line)["question"] for line in lines if line.strip()]
    images = [str(folder / "images" / f"{i}.jpg") for i in range(len(questions))]
    return Task(
        "mm_harmful",
        "harmful",
        _limit(questions, limit),
        images=_limit(images, limit),
        max_new_tokens=48,
        source="MM-HarmfulBench",
    )


def mm_utility_task(limit: int | None = None) -> Task:
    """Benign questions about pictures this project draws (a coloured shape on white): colour and shape."""
    from inferaligner.eval.pictures import picture_questions

    questions, answers, images = picture_questions(limit or 60)
    return Task(
        "mm_utility",
        "utility",
        questions,
        answers,
        parse=_first_known_word(set(answers)),
        images=images,
        max_new_tokens=16,
        source="generated pictures",
    )


def _first_known_word(words: set[str]) -> Callable[[str], str | None]:
    def parse(text: str) -> str | None:
        return next((w for w in re.findall(r"[a-z]+", text.lower()) if w in words), None)

    return parse


DOMAIN_TASKS = {"arithmetic": arithmetic_task, "finance": finance_task}


def default_tasks(domain: str, limit: int | None = None) -> list[Task]:
    """The paper's table for one domain: harmful, jailbreak, over-refusal (XSTest, Alpaca) and utility."""
    if domain not in DOMAIN_TASKS:
        raise PromptError(f"Unknown domain '{domain}': choose one of {', '.join(DOMAIN_TASKS)}.")
    return [
        harmful_task(limit),
        jailbreak_task(limit),
        xstest_task(limit),
        harmless_task(limit),
        DOMAIN_TASKS[domain](limit),
    ]
