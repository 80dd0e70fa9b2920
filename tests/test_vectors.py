from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny import ARCHITECTURES, tiny_model, tiny_tokenizer

from inferaligner.activations import prompt_activations
from inferaligner.errors import PromptError, VectorFileError, VectorMismatchError
from inferaligner.models import model_fingerprint
from inferaligner.prompts import builtin_prompts, format_chats
from inferaligner.vectors import LAYER_CONVENTION, SafetyVectors, extract_safety_vectors

HARMFUL = builtin_prompts("harmful")[:8]
HARMLESS = builtin_prompts("harmless")[:8]


def _extract(model_type: str = "llama", **kwargs) -> SafetyVectors:
    return extract_safety_vectors(tiny_model(model_type, **kwargs), tiny_tokenizer(), HARMFUL, HARMLESS, progress=False)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_vectors_have_one_unit_direction_per_layer_and_provenance(model_type: str) -> None:
    model = tiny_model(model_type)
    vectors = extract_safety_vectors(model, tiny_tokenizer(), HARMFUL, HARMLESS, progress=False)
    assert vectors.directions.shape == (4, 32)
    torch.testing.assert_close(vectors.directions.norm(dim=-1), torch.ones(4))
    assert vectors.norms.shape == vectors.bias.shape == (4,) and bool((vectors.norms > 0).all())
    prov = vectors.provenance
    assert (prov.model_type, prov.num_layers, prov.hidden_size) == (model.config.model_type, 4, 32)
    assert prov.fingerprint == model_fingerprint(model)
    assert (prov.n_harmful, prov.n_harmless, prov.layer_convention) == (8, 8, LAYER_CONVENTION)
    assert set(vectors.metrics) >= {"extraction.accuracy", "extraction.auroc", "extraction.separation"}


def test_direction_is_the_normalised_mean_difference() -> None:

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    vectors = extract_safety_vectors(model, tokenizer, HARMFUL, HARMLESS, progress=False)
    harm = prompt_activations(model, tokenizer, format_chats(tokenizer, HARMFUL), progress=False)
    safe = prompt_activations(model, tokenizer, format_chats(tokenizer, HARMLESS), progress=False)
    diff = harm.mean(0) - safe.mean(0)
    torch.testing.assert_close(vectors.directions, diff / diff.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(vectors.norms, diff.norm(dim=-1))
    projections = torch.einsum("nld,ld->nl", torch.cat([harm, safe]), vectors.directions)
    torch.testing.assert_close(vectors.bias, -projections.mean(0))


def test_save_load_round_trip(tmp_path) -> None:
    vectors = _extract()
    path = vectors.save(tmp_path / "v.safetensors")
    loaded = SafetyVectors.load(path)
    assert torch.equal(loaded.directions, vectors.directions) and torch.equal(loaded.bias, vectors.bias)
    assert loaded.provenance == vectors.provenance
    assert loaded.metrics.keys() == vectors.metrics.keys()
    assert loaded.gate is None


def test_calibration_sets_a_gate_and_heldout_metrics(tmp_path) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    calibration = (
        builtin_prompts("harmful", "calibration")[:10],
        builtin_prompts("harmless", "calibration")[:10],
    )
    vectors = extract_safety_vectors(
        model, tokenizer, HARMFUL, HARMLESS, calibration=calibration, gate_fpr=0.1, progress=False
    )
    assert vectors.gate is not None and vectors.gate.rule == "fpr" and vectors.gate.target_fpr == 0.1
    assert "calibration.auroc" in vectors.metrics
    loaded = SafetyVectors.load(vectors.save(tmp_path / "g.safetensors"))
    assert loaded.gate == vectors.gate
    gate = loaded.make_gate()
    assert gate.layer == vectors.gate.layer and gate.bias == pytest.approx(vectors.gate.bias)
    assert loaded.make_gate(bias=5.0).bias == 5.0


def test_gate_fpr_needs_calibration_prompts() -> None:
    with pytest.raises(PromptError, match="needs calibration prompts"):
        extract_safety_vectors(tiny_model(), tiny_tokenizer(), HARMFUL, HARMLESS, gate_fpr=0.1, progress=False)
    with pytest.raises(PromptError, match="needs calibration prompts"):
        extract_safety_vectors(tiny_model(), tiny_tokenizer(), HARMFUL, HARMLESS, gate_tpr=0.9, progress=False)


@pytest.mark.parametrize("gate", ["probe", "mean-difference"])
def test_a_tpr_gate_fires_on_that_share_of_the_held_out_harmful_prompts(gate: str, tmp_path) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    harmful_cal = builtin_prompts("harmful", "calibration")[:20]
    harmless_cal = builtin_prompts("harmless", "calibration")[:10] + builtin_prompts("everyday", "calibration")[:10]
    vectors = extract_safety_vectors(
        model,
        tokenizer,
        HARMFUL,
        HARMLESS,
        calibration=(harmful_cal, harmless_cal),
        harmless_groups=[10, 10],
        gate_tpr=0.9,
        gate=gate,
        pooling="mean",
        progress=False,
    )
    assert vectors.gate is not None and vectors.gate.rule == "tpr" and vectors.gate.target_tpr == 0.9
    loaded = SafetyVectors.load(vectors.save(tmp_path / "t.safetensors"))
    assert loaded.gate == vectors.gate
    aligner_gate = loaded.make_gate()
    texts = format_chats(tokenizer, harmful_cal)
    pooled = prompt_activations(model, tokenizer, texts, pooling=aligner_gate.pooling, progress=False)
    fired = sum(d.fired for d in aligner_gate.decide(pooled[:, aligner_gate.layer]))
    assert fired == 18  # 90% of 20
    with pytest.raises(PromptError, match="not both"):
        extract_safety_vectors(
            model,
            tokenizer,
            HARMFUL,
            HARMLESS,
            calibration=(harmful_cal, harmless_cal),
            gate_fpr=0.1,
            gate_tpr=0.9,
            progress=False,
        )


def test_empty_or_identical_prompt_sets_are_errors() -> None:
    with pytest.raises(PromptError, match="at least one harmful"):
        extract_safety_vectors(tiny_model(), tiny_tokenizer(), [], HARMLESS, progress=False)
    with pytest.raises(PromptError, match="identical activations"):
        extract_safety_vectors(tiny_model(), tiny_tokenizer(), HARMLESS, HARMLESS, progress=False)


def test_vectors_from_another_shape_are_rejected_naming_both_sides() -> None:
    vectors = _extract(hidden=32)
    other = tiny_model("llama", hidden=64)
    with pytest.raises(VectorMismatchError, match=r"come from .*llama, 4 layers x 32.*has 4 layers x 64"):
        vectors.check_fits(other)
    with pytest.raises(VectorMismatchError, match="must share one base model"):
        vectors.check_compatible(_extract(layers=6))


def test_wrong_files_give_clear_errors(tmp_path) -> None:
    with pytest.raises(VectorFileError, match="does not exist"):
        SafetyVectors.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(VectorFileError, match="not a safetensors file"):
        SafetyVectors.load(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(VectorFileError, match="not an InferAligner vector file"):
        SafetyVectors.load(foreign)
    partial = tmp_path / "partial.safetensors"
    save_file({"directions": torch.zeros(2, 2)}, str(partial), metadata={"format": "inferaligner.safety_vectors"})
    with pytest.raises(VectorFileError, match="incomplete vector file"):
        SafetyVectors.load(partial)


def test_newer_format_versions_are_refused(tmp_path) -> None:
    path = _extract().save(tmp_path / "v.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={**metadata, "format_version": "99"})
    with pytest.raises(VectorFileError, match="newer inferaligner"):
        SafetyVectors.load(path)
    assert json.loads(metadata["provenance"])["num_layers"] == 4


def test_probe_gate_with_mean_pooling_round_trips_and_defines_the_gate(tmp_path) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    calibration = (builtin_prompts("harmful", "calibration")[:8], builtin_prompts("harmless", "calibration")[:8])
    vectors = extract_safety_vectors(
        model, tokenizer, HARMFUL, HARMLESS, calibration=calibration, gate="probe", pooling="mean", progress=False
    )
    assert vectors.gate is not None and (vectors.gate.direction, vectors.gate.pooling) == ("probe", "mean")
    assert vectors.gate_direction is not None and vectors.gate_direction.shape == (32,)
    assert "probe.calibration_auroc" in vectors.metrics
    loaded = SafetyVectors.load(vectors.save(tmp_path / "probe.safetensors"))
    gate = loaded.make_gate()
    assert torch.equal(gate.direction, vectors.gate_direction) and gate.pooling == "mean"
    assert (gate.layer, gate.bias) == (vectors.gate.layer, vectors.gate.bias)
    other = loaded.make_gate(layer=(gate.layer + 1) % 4)  # another layer: its mean-difference vector, last token
    assert torch.equal(other.direction, loaded.directions[other.layer]) and other.pooling == "last"
    with pytest.raises(PromptError, match="held-out prompts"):
        extract_safety_vectors(model, tokenizer, HARMFUL, HARMLESS, gate="probe", progress=False)


def test_a_probe_gate_without_its_direction_is_a_corrupt_file(tmp_path) -> None:
    import dataclasses

    from inferaligner.vectors import GateSpec

    vectors = dataclasses.replace(_extract(), gate=GateSpec(1, 0.0, "probe", None, "probe", "mean"))
    path = vectors.save(tmp_path / "bad.safetensors")
    with pytest.raises(VectorFileError, match="probe gate and gate direction do not match"):
        SafetyVectors.load(path)
    with pytest.raises(VectorFileError, match="A probe gate needs its direction"):
        _extract().with_gate(GateSpec(1, 0.0, "probe", None, "probe"))
