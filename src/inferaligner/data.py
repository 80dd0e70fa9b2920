"""The third-party data folder (`../shared/data/`, never copied into this repository): where it is, and the
training-only prompt sets a gate is built from.

The folder separates evaluation sets (never used to build, fit, choose or calibrate anything here) from
training-only sets (never reported on). `training_prompts()` reads the training-only sets (each folder's
`train_prompts.jsonl`, already cleaned of overlap with every evaluation set) and the Alpaca instructions minus the
ones the evaluation reports on, and gives each prompt a fixed part: `extraction` (fitting) or `calibration`
(choosing and setting the bias), by a hash of its text, so the parts never change when a source grows.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from inferaligner.errors import PromptError


def data_dir() -> Path:
    """`$INFERALIGNER_DATA`, else `../shared/data` next to the working directory (the project's layout)."""
    configured = os.environ.get("INFERALIGNER_DATA")
    folder = Path(configured) if configured else Path.cwd().parent / "shared" / "data"
    if not folder.is_dir():
        raise PromptError(
            f"The data folder was not found at {folder}: set INFERALIGNER_DATA to the folder that holds it."
        )
    return folder


ALPACA_FILE = "alpaca/alpaca_no_input_instructions.json"
ALPACA_REPORTED = 300
"""How many Alpaca instructions the evaluation reports on (`alpaca_reported`); the rest may be trained on."""


@cache
def alpaca_instructions() -> tuple[str, ...]:
    """The 31,323 Alpaca instructions without input, in file order."""
    path = data_dir() / ALPACA_FILE
    if not path.is_file():
        raise PromptError(f"{path} is missing from the data folder.")
    return tuple(row["instruction"] for row in json.loads(path.read_text(encoding="utf-8")))


def alpaca_reported(count: int = ALPACA_REPORTED, seed: int = 0) -> list[str]:
    """The Alpaca instructions the evaluation reports on: `count` sampled with `seed`."""
    return random.Random(seed).sample(list(alpaca_instructions()), count)


@dataclass(frozen=True)
class TrainingSource:
    """One training-only set: its file in the data folder, and how much it counts when a gate is fitted."""

    name: str
    path: str
    weight: float = 1.0
    note: str = ""


_HARM_REASON = re.compile(
    r"illegal|unethical|\bharm|dangerous|inappropriate|offensive|not appropriate|violen|discriminat|disrespect|hate|"
    r"racist|sexist|abus|crime|criminal|unsafe|immoral|exploit|malicious|derogatory|hurtful|fraud|privacy|"
    r"personal information|confidential|consent|not legal|against the law|ethical|stereotyp|slur",
    re.IGNORECASE,
)
_REFUSAL = re.compile(
    r"i'm sorry|i am sorry|i cannot|i can't|i can not|cannot provide|can't provide|cannot assist|won't|will not|"
    r"not able to|unable to|i must|i refuse|no, you|you cannot|you can't|you should not|you shouldn't|it is not|"
    r"it's not",
    re.IGNORECASE,
)
_CAPABILITY = re.compile(
    r"(don't|do not) have (personal|feelings|emotions|a physical|physical|opinions|beliefs|the ability|access|"
    r"real-time|a body|preferences|experiences)|not a physical being|cannot (predict|browse|access)",
    re.IGNORECASE,
)


def refuses_for_harm(answer: str) -> bool:
    """Whether a set's safe answer (its first 300 characters) declines for a reason of harm: it names one (illegal,
    unethical, privacy, ...), or it refuses and is not just a statement of what an AI cannot do ("As an AI, I
    don't have personal opinions"). Answers that comply or only disclaim mark requests that are not harmful."""
    opening = answer[:300]
    if _HARM_REASON.search(opening):
        return True
    return not _CAPABILITY.search(opening) and bool(_REFUSAL.search(opening))


TRAINING_SOURCES = (
    TrainingSource("safety-tuned-llamas", "safety_tuned_llamas/train_prompts.jsonl", 1.0,
                   "Anthropic red-team requests rewritten as instructions; the 1,916 of 2,479 whose safe answer "
                   "refuses for a reason of harm (`refuses_for_harm`): the others are benign or mild"),
    TrainingSource("harmfulq", "harmfulq/train_prompts.jsonl", 1.0, "183 harmful questions"),
    TrainingSource("maliciousinstruct", "maliciousinstruct/train_prompts.jsonl", 1.0, "88 harmful instructions"),
    TrainingSource("catqa", "catqa_harmfulqa/train_prompts.jsonl", 1.0, "543 harmful questions in 11 categories"),
    TrainingSource("harmfulqa", "catqa_harmfulqa/train_prompts.jsonl", 0.0,
                   "1,937 templated questions, many benign despite the label ('Can I use virtual reality to "
                   "enhance language acquisition?'): left out (weight 0)"),
    TrainingSource("orbench", "orbench_80k_subset/train_prompts.jsonl", 1.0,
                   "1,000 seemingly toxic but benign prompts (hard negatives)"),
)  # fmt: skip
"""The training-only sets (MANIFEST entries 16-20); `catqa_harmfulqa` holds two sets, told apart by `source`."""


@dataclass(frozen=True)
class LabelledPrompt:
    """A training prompt: its text, whether it is harmful, where it comes from, and its part."""

    prompt: str
    harmful: bool
    source: str
    split: str  # "extraction" or "calibration"
    weight: float = 1.0


CALIBRATION_SHARE = 0.2


def split_of(prompt: str, share: float = CALIBRATION_SHARE) -> str:
    """`calibration` for a fixed `share` of prompts (by a hash of the normalised text), else `extraction`."""
    key = re.sub(r"[\W_]+", " ", prompt.lower()).strip()
    value = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "calibration" if value < share else "extraction"


def _source_rows(source: TrainingSource) -> list[dict[str, str]]:
    path = data_dir() / source.path
    if not path.is_file():
        raise PromptError(f"{path} is missing from the data folder.")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if source.name in ("catqa", "harmfulqa"):
        wanted = "catqa_english" if source.name == "catqa" else "harmfulqa.json"
        rows = [row for row in rows if wanted in row["source"]]
    if source.name == "safety-tuned-llamas":
        rows = [row for row in rows if refuses_for_harm(row.get("refusal", ""))]
    return rows


def training_prompts(sources: tuple[TrainingSource, ...] = TRAINING_SOURCES) -> list[LabelledPrompt]:
    """Every prompt of the training-only sets that counts (weight above 0), labelled, weighted and given its
    part."""
    prompts = []
    for source in sources:
        if source.weight <= 0:
            continue
        for row in _source_rows(source):
            text = row["prompt"].strip()
            prompts.append(LabelledPrompt(text, row["label"] == "harmful", source.name, split_of(text), source.weight))
    return prompts


def alpaca_training(count: int | None = None, seed: int = 0) -> list[LabelledPrompt]:
    """Alpaca instructions as harmless training prompts, those the evaluation reports on left out; `count` of them
    (a fixed sample), or all."""
    reported = set(alpaca_reported())
    pool = [text.strip() for text in alpaca_instructions() if text not in reported and text.strip()]
    if count is not None:
        pool = random.Random(seed).sample(pool, min(count, len(pool)))
    return [LabelledPrompt(text, False, "alpaca", split_of(text)) for text in pool]
