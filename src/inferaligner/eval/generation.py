"""Batched generation with an on-disk cache, so an interrupted evaluation resumes where it stopped.

Each finished completion is appended to a JSON-lines file keyed by a hash of (prompt, settings), flushed batch
by batch; a rerun with the same settings reads those back and generates only what is missing. Answers that do not
depend on the gate (the target's own, and the rows a plan already chose to act on) are keyed without it and get
the current gate's decisions, so a new gate does not make them run again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from inferaligner.aligner import Completion, InferAligner
from inferaligner.gate import GateDecision
from inferaligner.settings import DEFAULT_REFUSAL, Mode


def settings_key(aligner: InferAligner, max_new_tokens: int, tag: str = "", gate: bool = True) -> dict[str, Any]:
    """Everything that changes a completion: model, mode, alpha, layers, the gate (unless `gate` is False: the
    answer does not depend on it), decoding. Without the gate in mode `off` (the target's own answers): only model,
    system prompt and decoding."""
    how = aligner.describe()
    if how["mode"] == Mode.OFF.value and not gate:  # the target's own answers: no steering, no gate
        return {"model": how["model"], "mode": how["mode"], "system": how["system"], "max_new_tokens": max_new_tokens,
                "tag": tag}  # fmt: skip
    keep = ("model", "mode", "alpha", "scale", "layers", *(("gate",) if gate else ()), "system")
    key = {**{k: how[k] for k in keep}, "max_new_tokens": max_new_tokens, "tag": tag}
    # Added only when set, so caches written before these were settings stay valid.
    if how["refusal"] != DEFAULT_REFUSAL:
        key["refusal"] = how["refusal"]
    if how["aligned_model"] is not None:
        key["aligned_model"] = how["aligned_model"]
    if how["vectors_id"] is not None:
        key["vectors_id"] = how["vectors_id"]
    if how["loop_span"] and how["mode"] != Mode.SIMPLE.value:
        key["loop_span"] = how["loop_span"]
    return key


def _key(prompt: str, settings: dict[str, Any], image: Any = None) -> str:
    item: Any = prompt if image is None else [prompt, _image_id(image)]
    return hashlib.sha256(json.dumps([item, settings], sort_keys=True).encode()).hexdigest()[:24]


def _image_id(image: Any) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return hashlib.sha256(image.tobytes()).hexdigest()[:16]


def generate_cached(
    aligner: InferAligner,
    prompts: Sequence[str],
    cache: Path | None,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    tag: str = "",
    desc: str = "generating",
    progress: bool = True,
    images: Sequence[Any] | None = None,
    processor: Any = None,
    gate_independent: bool = False,
) -> list[Completion]:
    """Greedy completions for `prompts`, in order, reusing and extending the cache file.

    With `images` (one per prompt, or None) and the model's `processor`, prompts go through `MultimodalAligner`.
    Answers of an aligner in mode `off`, or any with `gate_independent` (rows a plan already chose), are cached
    without the gate in their key; mode `off` rows then carry the current gate's decisions (`gate_all`).
    """
    unsteered = aligner.settings.mode is Mode.OFF and images is None
    settings = settings_key(aligner, max_new_tokens, tag, gate=not (unsteered or gate_independent))
    pictures = list(images) if images is not None else [None] * len(prompts)
    keys = [_key(p, settings, image) for p, image in zip(prompts, pictures, strict=True)]
    by_key = dict(zip(keys, pictures, strict=True))
    multimodal = None
    if images is not None:
        from inferaligner.multimodal import MultimodalAligner

        multimodal = MultimodalAligner(aligner, processor)
    done: dict[str, Completion] = {}
    if cache is not None and cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption
            gate = GateDecision(**row["gate"]) if row["gate"] else None
            done[row["key"]] = Completion(row["prompt"], row["completion"], gate, row["intervened"])
    todo = sorted(
        {k: p for k, p in zip(keys, prompts, strict=True) if k not in done}.items(), key=lambda kv: len(kv[1])
    )
    if todo:
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(todo), desc=desc, disable=not progress, unit="prompt")
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            texts = [p for _, p in chunk]
            if multimodal is not None:
                chunk_images = [by_key[k] for k, _ in chunk]
                results = multimodal.complete(texts, chunk_images, max_new_tokens=max_new_tokens, batch_size=batch_size)
            else:
                results = aligner.complete(texts, max_new_tokens=max_new_tokens, batch_size=batch_size)
            lines = []
            for (key, _), completion in zip(chunk, results, strict=True):
                done[key] = completion
                lines.append(json.dumps({"key": key, **completion.as_dict()}))
            if cache is not None:
                with cache.open("a", encoding="utf-8") as handle:
                    handle.write("\n".join(lines) + "\n")
            bar.update(len(chunk))
        bar.close()
    completions = [done[k] for k in keys]
    if unsteered and aligner.gate is not None:
        decisions = gate_all(aligner, prompts, batch_size)
        completions = [Completion(c.prompt, c.text, g, False) for c, g in zip(completions, decisions, strict=True)]
    return completions


def gate_all(aligner: InferAligner, prompts: Sequence[str], batch_size: int = 32) -> list[GateDecision]:
    """The gate's decision for every prompt (one partial forward pass per batch, no generation)."""
    decisions: list[GateDecision] = []
    for start in range(0, len(prompts), batch_size):
        found = aligner.gate_decisions(**aligner.encode(prompts[start : start + batch_size]))
        if found is None:
            raise ValueError("This aligner has no gate: give it the target's vectors.")
        decisions += found
    return decisions


def gated_completions(
    aligner: InferAligner,
    prompts: Sequence[str],
    plain: Sequence[Completion],
    cache: Path | None,
    **kwargs: Any,
) -> list[Completion]:
    """Completions of a gated aligner, generating only the prompts its plan changes.

    Rows the plan passes come out token-identical to plain generation (tests/test_aligner.py checks this for
    mixed batches), so they are taken from `plain`, the target's own completions of the same prompts.
    """
    plan = aligner.plan(gate_all(aligner, prompts, kwargs.get("batch_size", 32)), len(prompts))
    changed = [i for i, row in enumerate(plan) if row.intervened]
    answers = generate_cached(aligner, [prompts[i] for i in changed], cache, gate_independent=True, **kwargs)
    acted = dict(zip(changed, (a.text for a in answers), strict=True))
    return [Completion(prompt, acted[i], plan[i].gate, True) if i in acted else
            Completion(prompt, plain[i].text, plan[i].gate, False) for i, prompt in enumerate(prompts)]  # fmt: skip
