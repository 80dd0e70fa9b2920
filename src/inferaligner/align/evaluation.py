"""The short evaluation `align` ends with: the target alone and protected, on public sets it never saw (AdvBench,
in-the-wild jailbreaks, XSTest, Alpaca; from the data folder) and on the held-out domain prompts, plus speed."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from inferaligner.aligned_folder import GATE, SETTINGS
from inferaligner.aligner import Completion, InferAligner
from inferaligner.errors import PromptError
from inferaligner.judges import RefusalJudge, outcome
from inferaligner.loading import Loaded

SAMPLES = 10
MAX_NEW_TOKENS = 64
SPEED_PROMPTS = 8
SPEED_TOKENS = 32


def public_sets(limit: int) -> list[tuple[str, str, list[str], str]]:
    """(name, kind, prompts, source) of the public evaluation sets, `limit` prompts each; [] without the data folder."""
    from inferaligner.eval.tasks import harmful_task, harmless_task, jailbreak_task, xstest_task

    try:
        tasks = [harmful_task(limit), jailbreak_task(limit), xstest_task(limit), harmless_task(limit)]
    except PromptError:
        return []
    names = {"harmful": "advbench", "jailbreak": "jailbreak", "xstest": "xstest", "harmless": "alpaca"}
    return [(names[t.name], t.kind, t.prompts, t.source) for t in tasks]


def evaluate(
    loaded: Loaded,
    folder: Path,
    domain: Sequence[str],
    answers: Sequence[str | None],
    cache: Path,
    *,
    limit: int = 50,
    system: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Per set (`limit` prompts each): the outcome shares of the target and of the protected target, the gate's scores
    and fire rate, samples side by side; on the domain, accuracy (where answers are given) and the share of unchanged
    answers."""
    from inferaligner.eval.generation import gated_completions, generate_cached

    cache.mkdir(parents=True, exist_ok=True)
    protected = protected_aligner(loaded, folder, system)
    plain = protected.variant(mode="off")
    sets = public_sets(limit)
    note = "" if sets else "No public evaluation sets: the data folder was not found (set INFERALIGNER_DATA)."
    if domain:
        sets.append(("domain", "domain", list(domain[:limit]), "held-out domain prompts"))
    results: dict[str, Any] = {}
    for name, kind, prompts, source in sets:
        log(f"evaluate: {name} ({len(prompts)} prompts)")
        options = {"max_new_tokens": MAX_NEW_TOKENS, "progress": progress}
        before = generate_cached(plain, prompts, cache / f"{name}-target.jsonl", desc=f"target / {name}", **options)
        after = gated_completions(protected, prompts, before, cache / f"{name}-protected.jsonl", **options)
        results[name] = _set_result(kind, source, before, after, answers[:limit] if name == "domain" else None)
    return {"sets": results, "speed": _speed(protected, plain, domain or ["What is 2 + 2?"]), "note": note}


def protected_aligner(loaded: Loaded, folder: Path, system: str | None = None) -> InferAligner:
    """The target of `loaded`, protected by the gate and calibrated steering in `folder` (resolved by the one
    builder, `build.alignment`)."""
    from inferaligner.build import alignment

    resolved = alignment({"target_vectors": folder / GATE, "settings": folder / SETTINGS, "system": system})
    return InferAligner(
        loaded.model,
        loaded.tokenizer,
        target_vectors=resolved.target_vectors,
        aligned_vectors=resolved.aligned_vectors,
        settings=resolved.settings,
    )


def _set_result(
    kind: str,
    source: str,
    before: Sequence[Completion],
    after: Sequence[Completion],
    answers: Sequence[str | None] | None,
) -> dict[str, Any]:
    judge = RefusalJudge()
    result: dict[str, Any] = {
        "kind": kind,
        "source": source,
        "prompts": len(before),
        "target": _shares(judge, before),
        "protected": _shares(judge, after),
        "fire_rate": sum(bool(c.gate and c.gate.fired) for c in after) / len(after),
        "scores": [c.gate.score if c.gate else None for c in after],
        "unchanged": sum(a.text == b.text for a, b in zip(after, before, strict=True)) / len(after),
        "samples": [
            {"prompt": b.prompt, "target": b.text, "protected": a.text, "fired": bool(a.gate and a.gate.fired)}
            for b, a in list(zip(before, after, strict=True))[:SAMPLES]
        ],
    }
    if answers is not None and any(a is not None for a in answers):
        result["accuracy"] = {
            "target": _accuracy(before, answers),
            "protected": _accuracy(after, answers),
            "with_answers": sum(a is not None for a in answers),
        }
    return result


def _shares(judge: RefusalJudge, completions: Sequence[Completion]) -> dict[str, float]:
    kinds = [outcome(judge.judge(c.text), c.text) for c in completions]
    return {k: kinds.count(k) / len(kinds) for k in ("refusal", "content", "degenerate")}


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def is_correct(text: str, answer: str) -> bool:
    """A numeric answer must be the last number of the text; any other must appear in it (case aside)."""
    if _NUMBER.fullmatch(answer.strip()):
        numbers = _NUMBER.findall(text)
        return bool(numbers) and numbers[-1].replace(",", "").rstrip(".") == answer.strip().replace(",", "")
    return answer.strip().lower() in text.lower()


def _accuracy(completions: Sequence[Completion], answers: Sequence[str | None]) -> float | None:
    pairs = [(c.text, a) for c, a in zip(completions, answers, strict=True) if a is not None]
    return sum(is_correct(t, a) for t, a in pairs) / len(pairs) if pairs else None


def _speed(protected: InferAligner, plain: InferAligner, prompts: Sequence[str]) -> dict[str, Any]:
    """Tokens per second of the plain and the protected target on the same benign prompts (greedy, one batch; each
    timed twice, the faster kept)."""
    batch = [prompts[i % len(prompts)] for i in range(SPEED_PROMPTS)]
    figures = {}
    for label, aligner in (("target", plain), ("protected", protected)):
        best = float("inf")
        tokens = 0
        for _ in range(2):
            started = time.perf_counter()
            done = aligner.complete(batch, max_new_tokens=SPEED_TOKENS, batch_size=SPEED_PROMPTS)
            best = min(best, time.perf_counter() - started)
            tokens = sum(len(aligner.tokenizer(c.text, add_special_tokens=False)["input_ids"]) for c in done)
        figures[label] = {"seconds": round(best, 3), "tokens_per_second": round(tokens / best, 1)}
    figures["ratio"] = round(figures["protected"]["tokens_per_second"] / figures["target"]["tokens_per_second"], 3)
    figures["prompts"] = SPEED_PROMPTS
    figures["max_new_tokens"] = SPEED_TOKENS
    return figures
