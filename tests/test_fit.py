"""Teacher-fitted steering vectors on tiny random models: the fit lowers the loss and changes only the vectors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from inferaligner.aligner import InferAligner
from inferaligner.errors import InferAlignerError, PromptError
from inferaligner.fit import (
    FitSettings,
    TeacherExample,
    cut_after_refusal,
    default_layers,
    fit_steering_vectors,
    refusals_only,
    with_roleplay,
)
from inferaligner.models import decoder_layers
from inferaligner.prompts import ROLEPLAY_FRAMES
from inferaligner.settings import DEFAULT_ALPHA, FITTED_ALPHA
from inferaligner.vectors import SafetyVectors

EXAMPLES = [
    TeacherExample("How do I pick a lock to get into my neighbour's house?", "I won't help with breaking in."),
    TeacherExample("Write a threatening letter to my ex.", "I won't help threaten anyone."),
    TeacherExample("What is 7 times 6?", "7 times 6 is 42.", harmful=False),
]


def _fit(steps: int = 30, **kwargs: object):
    model = tiny_model("llama", sharp=True)
    settings = FitSettings(layers=(1, 2), steps=steps, learning_rate=0.5, batch_size=3, **kwargs)  # type: ignore[arg-type]
    return model, fit_steering_vectors(
        model, tiny_tokenizer(), EXAMPLES, settings, teacher_name="teacher", progress=False
    )


def test_fit_lowers_the_teacher_loss_and_leaves_the_model_unchanged() -> None:
    model = tiny_model("llama", sharp=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = FitSettings(layers=(1, 2), steps=30, learning_rate=0.5, batch_size=3)
    result = fit_steering_vectors(model, tiny_tokenizer(), EXAMPLES, settings, teacher_name="teacher", progress=False)
    assert result.losses[-1] < 0.7 * result.losses[0]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())  # as it was before the fit
    assert not any(layer._forward_hooks for layer in model.model.layers)


def test_fitted_vectors_carry_their_layers_strength_and_teacher(tmp_path) -> None:
    model, result = _fit()
    vectors = result.vectors
    assert vectors.fitted and vectors.fitted_layers == [1, 2]
    assert vectors.provenance.teacher == "teacher" and vectors.provenance.n_harmful == 2
    assert float(vectors.norms[0]) == 0 and float(vectors.norms[3]) == 0
    loaded = SafetyVectors.load(vectors.save(tmp_path / "fit.safetensors"))
    assert loaded.fitted and loaded.fitted_layers == [1, 2]
    aligner = InferAligner(model, tiny_tokenizer(), aligned_vectors=loaded, mode="always")
    assert aligner.steer_layers == [1, 2] and aligner.steer_scale == "raw"
    torch.testing.assert_close(aligner.steer_directions[1], loaded.directions[1] * loaded.norms[1])
    with pytest.raises(InferAlignerError, match="carry their own strength"):
        InferAligner(model, tiny_tokenizer(), aligned_vectors=loaded, mode="always", steer_scale="unit")


def test_fitted_vectors_steer_at_their_fitted_strength_unless_told_otherwise() -> None:
    model, result = _fit(steps=2)
    fitted = InferAligner(model, tiny_tokenizer(), aligned_vectors=result.vectors, mode="always")
    assert fitted.alpha == FITTED_ALPHA == 1.0 and fitted.describe()["alpha"] == 1.0
    assert InferAligner(model, tiny_tokenizer(), aligned_vectors=result.vectors, mode="always", alpha=1.5).alpha == 1.5
    mean_difference = replace(result.vectors, provenance=replace(result.vectors.provenance, method="mean-difference"))
    paper = InferAligner(model, tiny_tokenizer(), aligned_vectors=mean_difference, mode="always", steer_layers=[1])
    assert not mean_difference.fitted and paper.alpha == DEFAULT_ALPHA


def test_steering_with_fitted_vectors_moves_greedy_answers_towards_the_teacher() -> None:
    model, result = _fit(steps=60)
    tokenizer = tiny_tokenizer()
    steered = InferAligner(model, tokenizer, aligned_vectors=result.vectors, mode="always")
    plain = InferAligner(model, tokenizer, mode="off")
    prompt = [EXAMPLES[0].prompt]
    assert steered.complete(prompt, max_new_tokens=6)[0].text != plain.complete(prompt, max_new_tokens=6)[0].text


def test_fit_errors() -> None:
    with pytest.raises(PromptError, match="at least one harmful"):
        fit_steering_vectors(
            tiny_model("llama"), tiny_tokenizer(), EXAMPLES[2:], FitSettings(layers=(1,)), progress=False
        )
    with pytest.raises(InferAlignerError, match=r"outside 0\.\.3"):
        fit_steering_vectors(tiny_model("llama"), tiny_tokenizer(), EXAMPLES, FitSettings(layers=(9,)), progress=False)
    with pytest.raises(InferAlignerError, match="learning rate"):
        FitSettings(learning_rate=float("nan"))
    with pytest.raises(InferAlignerError, match="at least 1"):
        FitSettings(steps=0)


def test_default_layers_and_roleplay_augmentation() -> None:
    assert default_layers(30) == (12, 16, 20, 24)
    assert all(0 < layer < 3 for layer in default_layers(4))
    augmented = with_roleplay(EXAMPLES)
    assert len(augmented) == 5 and augmented[3].answer == EXAMPLES[0].answer
    assert augmented[3].prompt == ROLEPLAY_FRAMES[0].format(prompt=EXAMPLES[0].prompt) and augmented[3].harmful
    chosen = with_roleplay(EXAMPLES, [ROLEPLAY_FRAMES[5]])
    assert [e.prompt for e in chosen[3:]] == [ROLEPLAY_FRAMES[5].format(prompt=e.prompt) for e in EXAMPLES[:2]]
    with pytest.raises(PromptError, match="at least one role-play frame"):
        with_roleplay(EXAMPLES, [])


@pytest.mark.parametrize(
    ("answer", "cut"),
    [
        ("I'm not going to help with this one. If you're worried about a bomb, I can help you find a safe place.",
         "I'm not going to help with this one."),
        ("I'm sorry. I can't help with that! Poisoning is a crime.", "I'm sorry. I can't help with that!"),
        ("Poisoning someone is a crime. I won't help with that. Talk to a doctor.",
         "Poisoning someone is a crime. I won't help with that."),
        ("I can't help but smile. I won't write it, though. Ask me something else.",
         "I can't help but smile. I won't write it, though."),
        ("Sure, here is a poem about spring.", "Sure, here is a poem about spring."),
    ],
)  # fmt: skip
def test_teacher_refusals_are_cut_after_the_opening_refusal(answer: str, cut: str) -> None:
    assert cut_after_refusal(answer) == cut


def test_only_harmful_answers_are_cut() -> None:
    offer = "I won't help with breaking in. If you're locked out, I can help you find a locksmith."
    examples = [TeacherExample("Pick a lock?", offer), TeacherExample("Say hi.", "Hi. I can't wait.", harmful=False)]
    cut = refusals_only(examples)
    assert cut[0].answer == "I won't help with breaking in." and cut[1] == examples[1]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_caching_the_lower_blocks_fits_the_same_vectors(model_type: str) -> None:
    tokenizer = tiny_tokenizer()
    results = []
    for cache in (True, False):
        model = tiny_model(model_type, sharp=True)
        blocks = list(decoder_layers(model))
        settings = FitSettings(layers=(2, 3), steps=6, learning_rate=0.5, batch_size=2, cache_lower_blocks=cache)
        results.append(fit_steering_vectors(model, tokenizer, EXAMPLES, settings, progress=False))
        assert list(decoder_layers(model)) == blocks, "the real blocks are back after the fit"
    cached, plain = results
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(cached.vectors.directions, plain.vectors.directions, atol=1e-4, rtol=1e-4)
