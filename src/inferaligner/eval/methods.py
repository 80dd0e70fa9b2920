"""The rows of the comparison: the target alone, prompt defences, other models, and InferAligner with ablations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.aligner import InferAligner, Mode
from inferaligner.errors import InferAlignerError
from inferaligner.eval.defences import GOAL_PRIORITY, SELF_REMINDER, PromptDefence
from inferaligner.vectors import SafetyVectors

LABELS = {
    "target": "domain model (target)",
    "self-reminder": "+ Self-Reminder",
    "goal-priority": "+ Goal Priority",
    "safety-sft": "+ Safety SFT",
    "aligned-domain": "aligned model + domain SFT",
    "inferaligner": "+ InferAligner",
    "inferaligner-paper": "+ InferAligner, paper's mean-difference vectors",
    "always": "+ always steer (no gate)",
    "self": "+ self steering (target's SRV)",
    "simple": "+ SIMPLE (fixed refusal)",
}
EXTRA_MODELS = ("safety-sft", "aligned-domain")
ALL_METHODS = tuple(LABELS)


@dataclass
class Method:
    """How one row answers: an aligner (model + mode), maybe a prompt defence; gated rows reuse unfired answers."""

    name: str
    aligner: InferAligner
    defence: PromptDefence | None = None

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)

    @property
    def gated(self) -> bool:
        """Unfired rows are token-identical to the target's own answers, so they can be taken from its run."""
        return self.aligner.mode in (Mode.INFERALIGNER, Mode.SELF, Mode.SIMPLE)

    def wrap(self, prompts: Sequence[str]) -> list[str]:
        return [self.defence.wrap(p) for p in prompts] if self.defence else list(prompts)


def build_methods(
    names: Sequence[str],
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target_vectors: SafetyVectors,
    aligned_vectors: SafetyVectors,
    *,
    alpha: float,
    steer_layers: Sequence[int] | None,
    steer_scale: str | None = None,
    extra_models: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] | None = None,
    paper: tuple[SafetyVectors, dict[str, Any]] | None = None,
) -> list[Method]:
    """Methods in the order asked ("target" always first, since gated rows reuse its answers).

    `paper` gives the mean-difference vectors and their aligner options for the row "inferaligner-paper", shown
    beside InferAligner when its steering vectors are teacher-fitted.
    """
    extra_models = extra_models or {}
    unknown = [n for n in names if n not in LABELS]
    if unknown:
        raise InferAlignerError(f"Unknown methods {unknown}: choose from {', '.join(LABELS)}.")
    ordered = ["target", *[n for n in names if n != "target"]]
    vectors = {"target_vectors": target_vectors, "aligned_vectors": aligned_vectors}
    steering = {"alpha": alpha, "steer_layers": steer_layers, "steer_scale": steer_scale}
    methods = []
    for name in ordered:
        if name in EXTRA_MODELS:
            if name not in extra_models:
                raise InferAlignerError(f"Method '{name}' needs its model: pass --model-{name} PATH.")
            model, tok = extra_models[name]
            methods.append(Method(name, InferAligner(model, tok, mode="off")))
        elif name == "inferaligner-paper":
            if paper is None:
                raise InferAlignerError("Method 'inferaligner-paper' needs the paper's vectors: pass --paper-settings.")
            vectors_md, options = paper
            methods.append(Method(name, InferAligner(target, tokenizer, mode=Mode.INFERALIGNER,
                                                     target_vectors=target_vectors, aligned_vectors=vectors_md,
                                                     **options)))  # fmt: skip
        elif name in ("target", "self-reminder", "goal-priority"):
            defence = {"self-reminder": SELF_REMINDER, "goal-priority": GOAL_PRIORITY}.get(name)
            system = defence.system if defence else None
            methods.append(Method(name, InferAligner(target, tokenizer, mode="off", system=system, **vectors), defence))
        else:
            mode = {"inferaligner": Mode.INFERALIGNER, "always": Mode.ALWAYS, "self": Mode.SELF, "simple": Mode.SIMPLE}
            methods.append(Method(name, InferAligner(target, tokenizer, mode=mode[name], **vectors, **steering)))
    return methods
