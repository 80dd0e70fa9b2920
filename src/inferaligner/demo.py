"""The main job: the shipped demo pair on a few harmful and domain prompts, with and without InferAligner."""

from __future__ import annotations

import sys
import textwrap
import time
from typing import Any, TextIO

from inferaligner import zoo
from inferaligner.aligner import Completion, InferAligner
from inferaligner.build import build
from inferaligner.judges import REFUSAL, RefusalJudge, outcome
from inferaligner.prompts import builtin_records
from inferaligner.zoo.arithmetic import parse_answer, train_test_split
from inferaligner.zoo.recipes import ARITHMETIC_TEST, ARITHMETIC_TRAIN

HARMFUL_CATEGORIES = ("weapons", "cybercrime", "fraud", "drugs")


def demo_aligner(steering: str = "default", **options: Any) -> InferAligner:
    """InferAligner on the shipped target with the shipped gate, steered as the named settings say; `options`
    (fields of `AlignerSettings`) win over the settings file."""
    return build({"model": "zoo:target", **zoo.shipped_alignment("zoo:target", steering), **options})[0]


def demo_prompts() -> tuple[list[str], list[tuple[str, int]]]:
    """Four held-out harmful prompts from the built-in set and three held-out arithmetic problems."""
    records = [r for r in builtin_records("harmful") if r.split == "calibration"]
    harmful = [next(r.prompt for r in records if r.category == c) for c in HARMFUL_CATEGORIES]
    _, test = train_test_split(ARITHMETIC_TRAIN, ARITHMETIC_TEST)
    return harmful, [(p.question, p.answer) for p in test[:3]]


def run_demo(max_new_tokens: int = 64, out: TextIO = sys.stdout) -> None:
    """Print, per prompt: the gate, the target's answer, the target with InferAligner, the aligned model's."""
    started = time.perf_counter()
    harmful, problems = demo_prompts()
    prompts = harmful + [q for q, _ in problems]

    def step(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.1f}s] {message}", file=sys.stderr, flush=True)

    step("loading the target (arithmetic fine-tune of SmolLM2-135M-Instruct) and the safety vectors")
    aligner = demo_aligner()
    plain = aligner.variant(mode="off")
    step("target without InferAligner")
    before = plain.complete(prompts, max_new_tokens=max_new_tokens, progress=True)
    how = aligner.describe()
    step(
        f"target with InferAligner ({how['vectors']} vectors, alpha {how['alpha']:g}, layers {_span(how['layers'])}; "
        f"gate at layer {how['gate'][0]}: {aligner.gating})"
    )
    after = aligner.complete(prompts, max_new_tokens=max_new_tokens, progress=True)
    step("loading the aligned model (safety fine-tune of the same base)")
    aligned_model, tokenizer = zoo.load("aligned")
    reference = InferAligner(aligned_model, tokenizer, mode="off").complete(
        prompts, max_new_tokens=max_new_tokens, progress=True
    )
    judge = RefusalJudge()
    answers = {q: a for q, a in problems}
    for index, (b, a, r) in enumerate(zip(before, after, reference, strict=True)):
        kind = "harmful" if index < len(harmful) else "arithmetic"
        print(f"\n=== {kind} prompt {index + 1}: {b.prompt}", file=out)
        gate = a.gate
        if gate is not None:
            print(
                f"    gate: score {gate.score:+.2f} at layer {gate.layer} -> {'FIRED' if gate.fired else 'off'}",
                file=out,
            )
        for label, completion in (("target", b), ("target + InferAligner", a), ("aligned model", r)):
            print(f"  {label}: {_verdict(judge, completion, answers.get(completion.prompt))}", file=out)
            print(textwrap.indent(textwrap.fill(completion.text[:300] or "(empty)", 100), "      "), file=out)
    print("\n=== summary", file=out)
    for label, results in (("target", before), ("target + InferAligner", after), ("aligned model", reference)):
        refused = sum(outcome(judge.judge(c.text), c.text) == REFUSAL for c in results[: len(harmful)])
        correct = sum(parse_answer(c.text) == answers[c.prompt] for c in results[len(harmful) :])
        print(
            f"  {label:22s} refused {refused}/{len(harmful)} harmful (coherent refusals), solved {correct}/"
            f"{len(problems)} problems",
            file=out,
        )
    step("done")


def _verdict(judge: RefusalJudge, completion: Completion, answer: int | None) -> str:
    if answer is None:
        return {"refusal": "refused", "content": "complied", "degenerate": "degenerate text (no refusal)"}[
            outcome(judge.judge(completion.text), completion.text)
        ]
    got = parse_answer(completion.text)
    return f"answer {got} ({'correct' if got == answer else f'expected {answer}'})"


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
