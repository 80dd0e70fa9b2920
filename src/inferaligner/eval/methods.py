"""The rows of the comparison: the target alone, prompt defences, other models, and InferAligner with ablations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.aligner import InferAligner
from inferaligner.errors import InferAlignerError
from inferaligner.eval.defences import GOAL_PRIORITY, SELF_REMINDER, PromptDefence
from inferaligner.settings import AlignerSettings, Mode
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
    "aligned-answers": "+ aligned model answers fired rows",
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
        return self.aligner.settings.mode.gated

    def wrap(self, prompts: Sequence[str]) -> list[str]:
        return [self.defence.wrap(p) for p in prompts] if self.defence else list(prompts)


def build_methods(
    names: Sequence[str],
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target_vectors: SafetyVectors,
    aligned_vectors: SafetyVectors,
    settings: AlignerSettings,
    *,
    extra_models: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] | None = None,
    paper: tuple[SafetyVectors, AlignerSettings] | None = None,
) -> list[Method]:
    """Methods in the order asked ("target" always first, since gated rows reuse its answers), each row's aligner
    built from `settings` with its own mode.

    `paper` gives the mean-difference vectors and their settings for the row "inferaligner-paper", shown beside
    InferAligner when its steering vectors are teacher-fitted. `extra_models["aligned"]` is the aligned model that
    answers fired rows in the row "aligned-answers".
    """
    extra_models = extra_models or {}
    unknown = [n for n in names if n not in LABELS]
    if unknown:
        raise InferAlignerError(f"Unknown methods {unknown}: choose from {', '.join(LABELS)}.")
    ordered = ["target", *[n for n in names if n != "target"]]
    vectors = {"target_vectors": target_vectors, "aligned_vectors": aligned_vectors}
    modes = {"inferaligner": Mode.INFERALIGNER, "always": Mode.ALWAYS, "self": Mode.SELF, "simple": Mode.SIMPLE}
    methods = []
    for name in ordered:
        if name in EXTRA_MODELS:
            if name not in extra_models:
                raise InferAlignerError(f"Method '{name}' needs its model: pass --model-{name} PATH.")
            model, tok = extra_models[name]
            plain = AlignerSettings(mode=Mode.OFF, system=settings.system)  # another model: no vectors, no gate
            methods.append(Method(name, InferAligner(model, tok, settings=plain)))
        elif name == "inferaligner-paper":
            if paper is None:
                raise InferAlignerError("Method 'inferaligner-paper' needs the paper's vectors: pass --paper-settings.")
            vectors_md, paper_settings = paper
            methods.append(
                Method(
                    name,
                    InferAligner(
                        target,
                        tokenizer,
                        target_vectors=target_vectors,
                        aligned_vectors=vectors_md,
                        settings=paper_settings,
                        mode=Mode.INFERALIGNER,
                    ),
                )
            )
        elif name == "aligned-answers":
            if "aligned" not in extra_models:
                raise InferAlignerError("Method 'aligned-answers' needs the aligned model: pass --aligned-model PATH.")
            aligner = InferAligner(
                target,
                tokenizer,
                settings=settings,
                mode=Mode.ALIGNED,
                aligned_model=extra_models["aligned"][0],
                **vectors,
            )
            methods.append(Method(name, aligner))
        elif name in ("target", "self-reminder", "goal-priority"):
            defence = {"self-reminder": SELF_REMINDER, "goal-priority": GOAL_PRIORITY}.get(name)
            row = InferAligner(target, tokenizer, settings=settings, mode=Mode.OFF, **vectors)
            methods.append(Method(name, row.variant(system=defence.system) if defence else row, defence))
        else:
            aligner = InferAligner(target, tokenizer, settings=settings, mode=modes[name], **vectors)
            methods.append(Method(name, aligner))
    return methods
