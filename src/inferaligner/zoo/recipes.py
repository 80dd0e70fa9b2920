"""Recipes for the demo pair built from the embedded SmolLM2-135M-Instruct: an aligned model and a math target.

Each recipe fine-tunes a LoRA adapter with a fixed seed on data this project writes or generates, saves it in
half precision with a JSON card, and extracts the model's safety vectors next to it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.gate import DEFAULT_GATE_TPR
from inferaligner.models import model_fingerprint
from inferaligner.zoo.arithmetic import train_test_split
from inferaligner.zoo.safety_data import safety_examples
from inferaligner.zoo.train import TrainConfig, lora_finetune

Examples = list[tuple[str, str]]


@dataclass(frozen=True)
class Recipe:
    """How one adapter is made: its training data, its hyper-parameters and which blocks it may change."""

    name: str
    description: str
    make_examples: Callable[[PreTrainedModel, PreTrainedTokenizerBase, int, int | None], Examples]
    train: TrainConfig
    layers_fraction: float = 1.0  # LoRA on the first fraction of decoder blocks only
    base: str = "smollm2-135m-instruct"  # or "zoo:aligned": start from another recipe's model
    shipped: bool = True  # False: built from third-party data by the evaluation, never committed
    domain: Callable[[], list[str]] | None = None  # the domain's own training prompts: benign traffic for the gate
    vectors: bool = True  # extract its vectors and gate after training (False: `inferaligner align` makes them)


def _safety(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int, limit: int | None) -> Examples:
    return safety_examples(model, tokenizer, seed, limit=limit)


ARITHMETIC_TRAIN = 1200
ARITHMETIC_TEST = 300
SAFETY_SAMPLES = 100


def _arithmetic(_model: PreTrainedModel, _tok: PreTrainedTokenizerBase, _seed: int, limit: int | None) -> Examples:
    train, _ = train_test_split(ARITHMETIC_TRAIN, ARITHMETIC_TEST)
    return [(p.question, p.solution) for p in train[:limit]]


def _finance(_model: PreTrainedModel, _tok: PreTrainedTokenizerBase, _seed: int, limit: int | None) -> Examples:
    from inferaligner.zoo.finance import finance_examples

    return finance_examples(limit)


def _arithmetic_prompts() -> list[str]:
    return [q for q, _ in _arithmetic(None, None, 0, None)]  # type: ignore[arg-type]


def _finance_prompts() -> list[str]:
    return [q for q, _ in _finance(None, None, 0, None)]  # type: ignore[arg-type]


def _safety_samples(seed: int, count: int) -> Examples:
    """`count` harmful training requests, spread over the categories, with composed refusals."""
    import random

    from inferaligner.zoo.safety_data import compose_refusal, harmful_requests

    rng = random.Random(seed)
    harmful = harmful_requests()
    per_category = harmful[:: max(1, len(harmful) // count)][:count]
    return [(prompt, compose_refusal(category, rng)) for category, prompt in per_category]


def _with_safety(domain: Callable[..., Examples]) -> Callable[..., Examples]:
    """The paper's Safety SFT data: the domain data plus about 100 safety samples, shuffled together."""

    def make(model: PreTrainedModel, tok: PreTrainedTokenizerBase, seed: int, limit: int | None) -> Examples:
        import random

        examples = domain(model, tok, seed, limit) + _safety_samples(seed, min(SAFETY_SAMPLES, limit or SAFETY_SAMPLES))
        random.Random(seed).shuffle(examples)
        return examples

    return make


RECIPES: dict[str, Recipe] = {
    "aligned": Recipe(
        name="aligned",
        description=(
            "Safety fine-tuning: 320 harmful requests answered with composed refusals that say why; 320 harmless "
            "requests and 120 benign look-alikes answered by the base model itself (self-distillation). LoRA on "
            "the first two thirds of the blocks, so the refusal is carried by the residual stream that the "
            "unchanged upper blocks read."
        ),
        make_examples=_safety,
        train=TrainConfig(epochs=2.0, batch_size=8, learning_rate=3e-4, seed=0),
        layers_fraction=2 / 3,
    ),
    "target": Recipe(
        name="target",
        description=(
            f"Domain fine-tuning on {ARITHMETIC_TRAIN} generated multi-step arithmetic word problems with worked "
            "solutions ending 'The answer is N.'; no safety data."
        ),
        make_examples=_arithmetic,
        train=TrainConfig(epochs=1.0, batch_size=8, learning_rate=3e-4, seed=0),
        domain=_arithmetic_prompts,
    ),
    "gemma-target": Recipe(
        name="gemma-target",
        description=(
            f"The target's recipe on a second family: the Gemma 3 270M base model fine-tuned on the same "
            f"{ARITHMETIC_TRAIN} arithmetic word problems in Gemma's turn markup; no safety data. Its gate and "
            "steering come from `inferaligner align`."
        ),
        make_examples=_arithmetic,
        train=TrainConfig(epochs=1.0, batch_size=8, learning_rate=3e-4, seed=0),
        base="gemma3-270m",
        domain=_arithmetic_prompts,
        vectors=False,
    ),
}
_DOMAIN_TRAIN = TrainConfig(epochs=1.0, batch_size=8, learning_rate=3e-4, seed=0)
# Built by `inferaligner eval --demo DOMAIN` when asked for, not shipped: the paper's comparison rows per domain.
RECIPES |= {
    "finance": Recipe(
        name="finance", description="Domain fine-tuning on 500 Financial PhraseBank sentences (AllAgree, fixed "
        "split) labelled positive / negative / neutral; no safety data.", make_examples=_finance,
        train=_DOMAIN_TRAIN, shipped=False, domain=_finance_prompts,
    ),
    "safety-sft-arithmetic": Recipe(
        name="safety-sft-arithmetic", description="Safety SFT: the arithmetic training data plus 100 safety "
        "samples (harmful requests with composed refusals).", make_examples=_with_safety(_arithmetic),
        train=_DOMAIN_TRAIN, shipped=False,
    ),
    "safety-sft-finance": Recipe(
        name="safety-sft-finance", description="Safety SFT: the finance training data plus 100 safety samples.",
        make_examples=_with_safety(_finance), train=_DOMAIN_TRAIN, shipped=False, domain=_finance_prompts,
    ),
    "aligned-arithmetic": Recipe(
        name="aligned-arithmetic", description="The aligned model fine-tuned on the arithmetic training data (the "
        "paper's '-CHAT' row).", make_examples=_arithmetic, train=_DOMAIN_TRAIN, base="zoo:aligned", shipped=False,
        domain=_arithmetic_prompts,
    ),
    "aligned-finance": Recipe(
        name="aligned-finance", description="The aligned model fine-tuned on the finance training data.",
        make_examples=_finance, train=_DOMAIN_TRAIN, base="zoo:aligned", shipped=False, domain=_finance_prompts,
    ),
}  # fmt: skip


def examples_hash(examples: Examples) -> str:
    return hashlib.sha256(json.dumps(examples).encode()).hexdigest()[:16]


def build(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    *,
    limit: int | None = None,
    max_steps: int | None = None,
    progress: bool = True,
) -> tuple[PeftModel, dict[str, Any]]:
    """Run a recipe on `model` (modified in place by the LoRA wrapper) and write the adapter and its card.

    `limit` and `max_steps` shrink the run (tests). Returns the trained peft model and the card.
    """
    started = time.perf_counter()
    fingerprint = model_fingerprint(model)
    examples = recipe.make_examples(model, tokenizer, recipe.train.seed, limit)
    config = recipe.train if max_steps is None else _with(recipe.train, max_steps=max_steps)
    layers = _first_layers(model, recipe.layers_fraction)
    peft_model, result = lora_finetune(model, tokenizer, examples, config, layers=layers, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_adapter(peft_model, out_dir)
    card = {
        "recipe": recipe.name,
        "description": recipe.description,
        "seed": recipe.train.seed,
        "examples": len(examples),
        "data_hash": examples_hash(examples),
        "train": asdict(config),
        "lora_layers": layers,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "train_seconds": result.seconds,
        "build_seconds": round(time.perf_counter() - started, 1),
        "base_model": getattr(model, "name_or_path", "") or recipe.base,
        "base_fingerprint": fingerprint,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2))
    return peft_model, card


def _with(config: TrainConfig, **changes: Any) -> TrainConfig:
    return TrainConfig(**{**asdict(config), **changes})


def _first_layers(model: PreTrainedModel, fraction: float) -> list[int] | None:
    if fraction >= 1.0:
        return None
    count = model.config.get_text_config().num_hidden_layers
    return list(range(max(1, round(count * fraction))))


def save_adapter(peft_model: PeftModel, out_dir: Path) -> None:
    """Save a LoRA adapter with its weights in float16 (half the size; loading casts them back)."""
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = peft_model.get_base_model().name_or_path
    peft_model.save_pretrained(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's empty model-card template; card.json says it all
    weights = out_dir / "adapter_model.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(str(weights)).items()}, str(weights))


def build_demo_model(
    name: str,
    out_dir: Path,
    *,
    base: str | None = None,
    limit: int | None = None,
    max_steps: int | None = None,
    gate_fpr: float | None = None,
    gate_tpr: float | None = DEFAULT_GATE_TPR,
    public: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Build a demo adapter from scratch on the embedded base, then extract its safety vectors into `out_dir`
    (`public`: the gate also learns from the data folder's training-only sets)."""
    from inferaligner.errors import InferAlignerError
    from inferaligner.loading import load_model
    from inferaligner.models import set_model_name

    if name not in RECIPES:
        raise InferAlignerError(f"Unknown recipe '{name}': choose one of {', '.join(RECIPES)}.")
    model, tokenizer = load_model(base or RECIPES[name].base)
    peft_model, card = build(
        RECIPES[name], model, tokenizer, out_dir, limit=limit, max_steps=max_steps, progress=progress
    )
    if not RECIPES[name].vectors:
        return card
    merged = peft_model.merge_and_unload()
    set_model_name(merged, f"zoo:{name}")
    vectors = demo_vectors(
        RECIPES[name], merged, tokenizer, gate_fpr=gate_fpr, gate_tpr=gate_tpr, public=public, progress=progress
    )
    vectors.save(out_dir / "vectors.safetensors")
    return card


DOMAIN_GATE_PROMPTS = 64  # per split: the domain's own training prompts added to the gate's harmless side


def demo_vectors(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    gate_fpr: float | None = None,
    gate_tpr: float | None = DEFAULT_GATE_TPR,
    public: bool = True,
    progress: bool = True,
) -> Any:
    """A demo model's safety vectors and gate. The vectors: the mean differences of the built-in gate sets
    (`prompts.gate_sets`, the domain's own training prompts added to the harmless side). The gate: a turns gate
    (`inferaligner.gate_training`: each turn read alone) built from the built-in sets, the domain's prompts and, with
    `public`, the training-only sets of the data folder; its bias makes it fire on `gate_tpr` of the calibration
    harmful prompts, or on at most `gate_fpr` of the harmless ones when that is given."""
    from inferaligner.gate_training import target_vectors

    domain = recipe.domain() if recipe.domain else []
    return target_vectors(
        model,
        tokenizer,
        domain,
        public=public,
        gate_tpr=gate_tpr,
        gate_fpr=gate_fpr,
        per_part=DOMAIN_GATE_PROMPTS,
        progress=progress,
    )
