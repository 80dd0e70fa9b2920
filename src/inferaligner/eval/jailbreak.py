"""Jailbreak prompts: 10 in-the-wild templates x harmful behaviours.

The templates are rows of `jailbreak_llms_in_the_wild/jailbreak_prompts_2023_12_25.csv` (read from the shared data,
never copied here), chosen to cover the three kinds of Liu et al. (2023): pretending (role-play), attention
shifting and privilege escalation. Each is named by its 0-based row, its placeholder and a hash of its text, so a
changed data file is an error rather than a silent change of the benchmark.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from inferaligner.errors import PromptError
from inferaligner.eval.datasets import jailbreak_prompts, jailbreakbench


@dataclass(frozen=True)
class Template:
    row: int
    name: str
    kind: str
    placeholder: str
    sha256_12: str


TEMPLATES = (
    Template(623, "evil_confidant", "role-play", "[INSERT PROMPT HERE]", "9086f9a09edf"),
    Template(611, "movie_scene", "role-play", "[INSERT PROMPT HERE]", "010a5ff427f5"),
    Template(659, "moralizing_rant", "role-play", "[INSERT PROMPT HERE]", "82b0df9b1b09"),
    Template(590, "translator_bot", "attention shifting", "[INSERT QUESTION IN GREEK HERE]", "e9027ae63bbc"),
    Template(657, "linux_console", "attention shifting", "[INSERT PROMPT HERE]", "4de7bf38ae8f"),
    Template(1115, "hypothetical_response", "attention shifting", "{{action}}", "d049ddabe44d"),
    Template(632, "two_model_dialogue", "attention shifting", "[INSERT PROMPT HERE]", "5c2de5a7ac58"),
    Template(618, "developer_mode", "privilege escalation", "[INSERT PROMPT HERE]", "0b9c3fd4ff0a"),
    Template(945, "dev_environment", "privilege escalation", "<prompt here>", "04674d52d3b7"),
    Template(733, "system_fork", "privilege escalation", "[USER QUESTION HERE]", "d95269d8c840"),
)


def template_texts() -> dict[str, str]:
    """The ten template texts by name, checked against their recorded hashes."""
    rows = jailbreak_prompts()
    texts = {}
    for template in TEMPLATES:
        text = rows[template.row]["prompt"]
        if hashlib.sha256(text.encode()).hexdigest()[:12] != template.sha256_12 or template.placeholder not in text:
            raise PromptError(
                f"Jailbreak template row {template.row} ({template.name}) is not the recorded text: "
                "the data file changed."
            )
        texts[template.name] = text
    return texts


def jailbreak_set(behaviours: int = 50) -> tuple[list[str], list[dict[str, str]]]:
    """Every template filled with each of the first `behaviours` JailbreakBench goals (template-major order),
    and for each prompt the template and behaviour it came from."""
    goals = jailbreakbench()[:behaviours]
    texts = template_texts()
    prompts, origin = [], []
    for template in TEMPLATES:
        for index, goal in enumerate(goals):
            prompts.append(texts[template.name].replace(template.placeholder, goal, 1))
            origin.append({"template": template.name, "kind": template.kind, "behaviour": str(index)})
    return prompts, origin
