"""Effective strength: a negligible steering is refused when the aligner is built, or, when explicitly allowed,
never reported as an intervention; vector files carry the residual norms that `inspect` reads."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_aligner import PROMPTS, make_aligner
from tiny import tiny_model, tiny_tokenizer

from inferaligner import strength
from inferaligner.aligner import InferAligner
from inferaligner.calibrate import candidate
from inferaligner.errors import InferAlignerError, VectorFileError, VectorMismatchError
from inferaligner.plan import Action
from inferaligner.prompts import builtin_prompts
from inferaligner.settings import SettingsError
from inferaligner.strength import MIN_STRENGTH, residual_norms, steering_strength
from inferaligner.vectors import SafetyVectors, extract_safety_vectors


def _rebuilt(aligner: InferAligner, **options) -> InferAligner:
    return InferAligner(
        aligner.model,
        aligner.tokenizer,
        target_vectors=aligner.target_vectors,
        aligned_vectors=options.pop("aligned_vectors", aligner.aligned_vectors),
        settings=aligner.settings.merged(**options),
    )


def test_a_vanishing_alpha_is_refused_when_the_aligner_is_built() -> None:
    aligner = make_aligner()
    assert aligner.strength is not None and not aligner.strength.weak
    for alpha in (1e-9, 1e-300):
        with pytest.raises(SettingsError, match="would not protect"):
            _rebuilt(aligner, alpha=alpha)


def test_a_zero_vector_on_a_steered_layer_is_refused() -> None:
    aligner = make_aligner()
    vectors = aligner.aligned_vectors
    zero = dataclasses.replace(vectors, directions=vectors.directions.clone().index_fill_(0, torch.tensor([2]), 0.0))
    with pytest.raises(SettingsError, match=r"steered layers \[2\] get no shift at all"):
        _rebuilt(aligner, aligned_vectors=zero)
    everything_zero = dataclasses.replace(vectors, directions=torch.zeros_like(vectors.directions))
    with pytest.raises(SettingsError, match="would not protect"):
        _rebuilt(aligner, aligned_vectors=everything_zero)


def test_an_allowed_weak_steering_steers_but_never_counts_as_an_intervention() -> None:
    aligner = make_aligner()
    weak = _rebuilt(aligner, alpha=1e-9, allow_weak_steering=True)
    weak.gate = aligner.gate
    plan = weak.decide(**weak.encode(PROMPTS))
    fired = [row for row in plan if row.gate.fired]
    assert fired and all(row.action is Action.STEER and not row.intervened for row in fired)
    completions = weak.complete(PROMPTS, max_new_tokens=3)
    assert not any(c.intervened for c in completions) and any(c.gate.fired for c in completions)
    strong = aligner.decide(**aligner.encode(PROMPTS))
    assert all(row.intervened for row in strong if row.gate.fired)


def test_simple_mode_needs_no_strength_and_refusals_count() -> None:
    aligner = make_aligner(mode="simple")
    assert aligner.strength is None
    plan = aligner.decide(**aligner.encode(PROMPTS))
    assert all(row.intervened for row in plan if row.gate.fired)


def test_strength_is_the_shift_over_the_residual_norm() -> None:
    norms = torch.tensor([10.0, 100.0, 0.0])
    directions = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]])
    strength = steering_strength(norms, directions, [0, 1], alpha=2.0)
    assert strength.per_layer == pytest.approx({0: 1.0, 1: 0.02}) and not strength.weak
    assert steering_strength(norms, directions, [1], alpha=0.04).weak  # 0.0004 < MIN_STRENGTH
    assert steering_strength(norms, directions, [], alpha=1.0).total == 0 < MIN_STRENGTH


def test_vector_files_carry_residual_norms(tmp_path) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    vectors = extract_safety_vectors(
        model, tokenizer, builtin_prompts("harmful")[:4], builtin_prompts("harmless")[:4], progress=False
    )
    strength._NORMS.clear()  # measured again here, not read back from the cache the extraction filled
    measured = residual_norms(model, tokenizer, model.model.layers)
    assert vectors.residual_norms is not None and torch.equal(vectors.residual_norms, measured)
    assert bool((measured > 0).all())
    loaded = SafetyVectors.load(vectors.save(tmp_path / "v.safetensors"))
    assert torch.equal(loaded.residual_norms, measured)


def test_the_targets_own_vectors_are_not_steering_vectors() -> None:
    aligner = make_aligner()
    own = aligner.target_vectors
    with pytest.raises(VectorMismatchError, match="steering vectors are the target's own"):
        InferAligner(
            aligner.model, aligner.tokenizer, target_vectors=own, aligned_vectors=own, steer_layers=[1, 2], alpha=8.0
        )
    ablation = InferAligner(
        aligner.model, aligner.tokenizer, target_vectors=own, mode="self", steer_layers=[1, 2], alpha=8.0
    )
    assert ablation.steering_vectors is own


def test_teacher_fitted_vectors_cannot_be_the_gate() -> None:
    aligner = make_aligner()
    own = aligner.target_vectors
    fitted = dataclasses.replace(own, provenance=dataclasses.replace(own.provenance, method="teacher-fitted"))
    with pytest.raises(VectorFileError, match="must come from `extract` on the target, but they hold teacher-fitted"):
        InferAligner(aligner.model, aligner.tokenizer, target_vectors=fitted, mode="simple")


def test_a_calibration_candidate_must_hold_the_kind_it_is_named_for(tmp_path) -> None:
    path = make_aligner().target_vectors.save(tmp_path / "gate.safetensors")
    with pytest.raises(InferAlignerError, match="should hold teacher-fitted vectors but holds mean-difference"):
        candidate("teacher-fitted", path, kind="teacher-fitted")


def test_a_shipped_target_brings_its_gate_and_the_demo_settings() -> None:
    from inferaligner import zoo
    from inferaligner.build import with_shipped as _with_shipped

    assert _with_shipped({"model": "zoo:target"}) == {
        "model": "zoo:target",
        "target_vectors": zoo.vectors_path("target"),
        "settings": zoo.settings_path(),
    }
    own = _with_shipped({"model": "zoo:target", "aligned_vectors": "mine.safetensors", "target_vectors": "t"})
    assert own == {"model": "zoo:target", "aligned_vectors": "mine.safetensors", "target_vectors": "t"}
    assert _with_shipped({"model": "my-org/model"}) == {"model": "my-org/model"}


def test_vectors_of_the_model_of_the_same_name_are_the_targets_own() -> None:
    aligner = make_aligner()
    own, other = aligner.target_vectors, aligner.aligned_vectors

    def named(vectors: SafetyVectors, name: str) -> SafetyVectors:
        return dataclasses.replace(vectors, provenance=dataclasses.replace(vectors.provenance, model_name=name))

    assert named(other, "org/finance").is_own_gate_of(named(own, "org/finance"))
    assert not named(other, "org/chat").is_own_gate_of(named(own, "org/finance"))
    assert not other.is_own_gate_of(own), "models built from a config have no name to compare"
    with pytest.raises(VectorMismatchError, match="steering vectors are the target's own"):
        InferAligner(
            aligner.model,
            aligner.tokenizer,
            target_vectors=named(own, "org/finance"),
            aligned_vectors=named(other, "org/finance"),
            steer_layers=[1, 2],
            alpha=8.0,
        )


def test_from_pretrained_takes_a_steering_settings_file(tmp_path) -> None:
    from inferaligner.settings import SteeringSettings

    aligner = make_aligner()
    aligner.model.save_pretrained(tmp_path / "model")
    aligner.tokenizer.save_pretrained(tmp_path / "model")
    gate = aligner.target_vectors.save(tmp_path / "gate.safetensors")
    steering = aligner.aligned_vectors.save(tmp_path / "aligned.safetensors")
    settings = SteeringSettings(str(steering), 6.0, (1, 2), "unit", "mean-difference").save(tmp_path / "s.json")
    built = InferAligner.from_pretrained(tmp_path / "model", target_vectors=gate, steering=settings)
    assert (built.alpha, built.steer_layers, built.aligned_vectors.content_id()) == (
        6.0,
        [1, 2],
        aligner.aligned_vectors.content_id(),
    )
    assert (
        InferAligner.from_pretrained(tmp_path / "model", target_vectors=gate, steering=settings, alpha=9.0).alpha == 9
    )
