from __future__ import annotations

import json
import random

import pytest
import torch
from peft import PeftModel
from tiny import tiny_model, tiny_tokenizer

from inferaligner.zoo import recipes
from inferaligner.zoo.arithmetic import TEMPLATES, generate_problems, parse_answer, train_test_split
from inferaligner.zoo.safety_data import compose_refusal, harmful_requests, harmless_requests, trim_to_sentence
from inferaligner.zoo.train import TrainConfig, lora_finetune, tokenize_example


def test_problems_are_exact_and_train_test_disjoint() -> None:
    train, test = train_test_split(400, 100)
    assert len({p.question for p in train} & {p.question for p in test}) == 0
    for problem in train + test:
        assert parse_answer(problem.solution) == problem.answer >= 0
        assert problem.solution.endswith(f"The answer is {problem.answer}.")
    assert generate_problems(20, seed=5) == generate_problems(20, seed=5)
    assert len({type(t) for t in TEMPLATES}) == 1 and len(TEMPLATES) >= 8


@pytest.mark.parametrize(
    ("text", "expected"),
    [("so 3 + 4 = 7. The answer is 7.", 7), ("The answer is $1,250", 1250), ("maybe 12 or 15", 15), ("none", None)],
)
def test_parse_answer(text: str, expected: int | None) -> None:
    assert parse_answer(text) == expected


def test_training_data_is_the_projects_own_and_complete() -> None:
    harmful = harmful_requests()
    assert len(harmful) == 320 and len({c for c, _ in harmful}) == 10
    assert len(harmless_requests()) == 440
    from inferaligner.prompts import builtin_prompts

    evaluation = set(builtin_prompts("harmful", "all") + builtin_prompts("harmless", "all"))
    assert not evaluation & ({p for _, p in harmful} | set(harmless_requests()))


def test_refusals_are_varied_and_say_why() -> None:
    rng = random.Random(0)
    refusals = [compose_refusal("weapons", rng) for _ in range(50)]
    assert len(set(refusals)) > 40
    parts = json.loads(recipes.safety_examples.__globals__["DATA"].joinpath("refusal_parts.json").read_text())
    assert all(any(reason in r for reason in parts["reasons"]["weapons"]) for r in refusals)


def test_trim_to_sentence() -> None:
    assert trim_to_sentence("One. Two! Three is cut") == "One. Two!"
    assert trim_to_sentence("no end at all") == "no end at all"


def test_tokenize_example_masks_the_prompt() -> None:
    tokenizer = tiny_tokenizer()
    ids, labels = tokenize_example(tokenizer, "Add 2 and 3.", "The answer is 5.", max_length=512)
    answer = tokenizer("The answer is 5.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert labels[-len(answer) :] == answer and set(labels[: -len(answer)]) == {-100}
    assert ids[-len(answer) :] == answer


def test_lora_finetune_lowers_the_loss_on_its_data() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    examples = [(p.question, p.solution) for p in generate_problems(8, seed=1)]
    config = TrainConfig(max_steps=30, batch_size=8, learning_rate=2e-2, warmup_steps=1)

    def loss(m) -> float:
        ids, labels = zip(*(tokenize_example(tokenizer, q, a, 512) for q, a in examples[:1]), strict=True)
        with torch.no_grad():
            return float(m(input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss)

    before = loss(model)
    peft_model, result = lora_finetune(model, tokenizer, examples, config, progress=False)
    assert isinstance(peft_model, PeftModel) and result.steps == 30
    # A random tiny model has near-uniform logits (its lm_head is tiny), so the achievable drop is small.
    assert loss(peft_model) < before - 0.1


def _lora_layers(model) -> set[str]:
    return {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("name", ["aligned", "target"])
def test_recipe_runs_a_few_steps_on_a_tiny_model(name: str, tmp_path) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    peft_model, card = recipes.build(
        recipes.RECIPES[name], model, tokenizer, tmp_path, limit=4, max_steps=2, progress=False
    )
    assert _lora_layers(peft_model) == ({"0", "1", "2"} if name == "aligned" else {"0", "1", "2", "3"})
    assert card["steps"] == 2 and card["recipe"] == name and len(card["data_hash"]) == 16
    saved = json.loads((tmp_path / "card.json").read_text())
    assert saved == card
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert weights and all(w.dtype == torch.float16 for w in weights.values())
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    assert isinstance(reloaded, PeftModel)


def test_demo_vectors_add_the_domain_prompts_and_store_a_turns_gate() -> None:
    from tiny import tiny_model, tiny_tokenizer

    from inferaligner.prompts import gate_sets
    from inferaligner.zoo.recipes import DOMAIN_GATE_PROMPTS, RECIPES, demo_vectors

    model = tiny_model("llama", context=2048)
    vectors = demo_vectors(RECIPES["target"], model, tiny_tokenizer(), public=False, progress=False)
    harmful, harmless = gate_sets("extraction")
    assert vectors.provenance.n_harmful == len(harmful)
    assert vectors.provenance.n_harmless == len(harmless) + DOMAIN_GATE_PROMPTS  # the arithmetic problems
    gate = vectors.gate
    assert gate is not None and gate.direction in ("probe", "mlp") and gate.pooling == "turns"
    assert "domain" in gate.data and gate.earlier_margin >= 0 and gate.target_tpr == 0.95


def test_every_domain_target_gives_its_gate_its_own_prompts() -> None:
    from inferaligner.zoo.recipes import RECIPES

    # a gate that never saw the deployment's traffic fires on it (the finance target's did, on 2.7% of its items)
    assert all(RECIPES[name].domain is not None for name in ("target", "finance"))
