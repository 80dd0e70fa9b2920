"""Building a turns gate: the prompts, the read, the choice on held-out prompts, the bias and the earlier margin."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from inferaligner.data import LabelledPrompt
from inferaligner.errors import PromptError
from inferaligner.gate_training import EARLIER_FPR, fit_turns_gate, gate_prompts, read_prompts, turn_ids
from inferaligner.models import decoder_layers
from inferaligner.reader import RequestReader


def test_builtin_prompts_with_domain_and_system_messages_without_the_data_folder() -> None:
    prompts = gate_prompts([("What is 2 + 2?", "extraction"), ("What is 3 + 3?", "calibration")], public=False)
    sources = {p.source for p in prompts}
    assert {"builtin:harmful", "builtin:lookalike", "domain", "system"} <= sources
    assert all(not p.harmful for p in prompts if p.source in ("domain", "system"))
    assert {p.split for p in prompts} == {"extraction", "calibration"}


def test_public_prompts_come_with_framed_copies(data_dir, monkeypatch) -> None:
    monkeypatch.setenv("INFERALIGNER_DATA", str(data_dir))
    prompts = gate_prompts(alpaca=200)
    sources = {p.source for p in prompts}
    assert {"orbench", "alpaca", "catqa", "orbench+framed", "catqa+override"} <= sources
    assert not any(p.source.endswith("+override") and not p.harmful for p in prompts)


def test_the_read_is_the_reader_s() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    texts = ["How do I bake bread?", "How do I harm someone?"]
    read = read_prompts(model, tokenizer, texts, [1, 2], progress=False)
    reader = RequestReader(model, tokenizer, decoder_layers(model), 2)
    expected = torch.cat(reader.read([[turn_ids(tokenizer, t)] for t in texts]))
    assert read.shape == (2, 2, 32) and torch.allclose(read[:, 1], expected, atol=1e-6)


def test_a_gate_is_chosen_on_the_calibration_part_with_its_bias_and_margin() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    prompts = [p for p in gate_prompts(public=False) if p.source != "system" or len(p.prompt) < 60][::6]
    fit = fit_turns_gate(model, tokenizer, prompts, layers=[1, 2], l2_values=(0.1,), tpr=0.9, progress=False)
    assert fit.layer in (1, 2) and set(fit.auroc) == {1, 2} and fit.rule == "tpr"
    assert fit.fire_rates["harmful"] >= 0.9 and fit.earlier_margin > 0
    features = read_prompts(model, tokenizer, [p.prompt for p in prompts], [fit.layer], progress=False)[:, 0]
    scores = features @ fit.direction + fit.bias
    harmless = torch.tensor([not p.harmful and p.split == "calibration" for p in prompts])
    earlier = (scores[harmless] - fit.earlier_margin > 0).float().mean()
    assert earlier <= EARLIER_FPR + 1 / int(harmless.sum()) < (scores[harmless] > 0).float().mean()
    assert fit.counts["calibration.harmful"] > 0
    by_fpr = fit_turns_gate(
        model, tokenizer, prompts, layers=[fit.layer], l2_values=(0.1,), tpr=None, fpr=0.05, progress=False
    )
    assert by_fpr.rule == "fpr"


def test_bad_gate_data_is_a_clear_error() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    only_harmless = [LabelledPrompt("Hi", False, "x", "extraction"), LabelledPrompt("Bye", False, "x", "calibration")]
    with pytest.raises(PromptError, match="harmful and harmless"):
        fit_turns_gate(model, tokenizer, only_harmless, layers=[1], progress=False)
    with pytest.raises(PromptError, match="not both"):
        fit_turns_gate(model, tokenizer, only_harmless, layers=[1], tpr=0.9, fpr=0.1, progress=False)


def test_an_mlp_head_is_kept_only_when_it_ranks_the_calibration_part_better(tmp_path) -> None:
    from inferaligner.gate_training import fit_mlp_head, pairwise_auroc, with_turns_gate
    from inferaligner.vectors import SafetyVectors, extract_safety_vectors

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4000, 8, generator=generator)
    harmful = features[:, 0] * features[:, 1] > 0  # not linearly separable: an MLP can, a probe cannot
    fit = torch.arange(4000) < 3000
    held = range(3000, 4000)
    groups = {(True, "h"): [i for i in held if harmful[i]], (False, "b"): [i for i in held if not harmful[i]]}
    head, score, _ = fit_mlp_head(features, harmful, torch.ones(4000), fit, groups, units=16)
    assert score > 0.8 and score == pytest.approx(pairwise_auroc(head(features), groups), abs=1e-5)

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    prompts = [p for p in gate_prompts(public=False) if p.source != "system" or len(p.prompt) < 60][::6]
    fit_ = fit_turns_gate(model, tokenizer, prompts, layers=[2], l2_values=(0.1,), progress=False)
    assert (fit_.head is None) == (fit_.auroc[2] == pytest.approx(fit_.linear_auroc))
    vectors = extract_safety_vectors(model, tokenizer, ["a", "b"], ["c", "d"], progress=False)
    stored = with_turns_gate(vectors, fit_, prompts)
    loaded = SafetyVectors.load(stored.save(tmp_path / "v.safetensors"))
    gate, features_ = loaded.make_gate(), torch.randn(3, 32, generator=generator)
    expected = fit_.head(features_) if fit_.head is not None else features_ @ fit_.direction
    assert torch.allclose(gate.scores(features_), expected + fit_.bias, atol=1e-5)
    assert loaded.gate.direction == ("mlp" if fit_.head is not None else "probe")
