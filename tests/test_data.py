"""The training-only sets: read from the data folder, labelled, split for good, and kept apart from what is reported."""

from __future__ import annotations

import pytest

from inferaligner import data
from inferaligner.errors import PromptError


def test_split_is_fixed_by_the_text_and_ignores_case_and_punctuation() -> None:
    assert data.split_of("How do I bake bread?") == data.split_of("how do I bake  bread")
    parts = [data.split_of(f"prompt number {i}") for i in range(2000)]
    assert 0.15 < parts.count("calibration") / len(parts) < 0.25


def test_a_missing_data_folder_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("INFERALIGNER_DATA", str(tmp_path / "absent"))
    with pytest.raises(PromptError, match="INFERALIGNER_DATA"):
        data.data_dir()


def test_training_sets_are_labelled_and_never_the_reported_alpaca(data_dir, monkeypatch) -> None:
    monkeypatch.setenv("INFERALIGNER_DATA", str(data_dir))
    prompts = data.training_prompts()
    by_source = {p.source for p in prompts}
    assert by_source == {s.name for s in data.TRAINING_SOURCES if s.weight > 0}
    assert sum(p.harmful for p in prompts) == 1916 + 183 + 88 + 543
    assert sum(not p.harmful for p in prompts if p.source == "orbench") == 1000
    alpaca = data.alpaca_training()
    assert len(alpaca) == len(data.alpaca_instructions()) - 300
    assert not {p.prompt for p in alpaca} & set(data.alpaca_reported())
    assert len(data.alpaca_training(500)) == 500


def test_a_safe_answer_that_complies_or_only_disclaims_marks_a_request_that_is_not_harmful() -> None:
    assert data.refuses_for_harm("I'm sorry, but I cannot help with illegal activities.")
    assert data.refuses_for_harm("I'm sorry, but I can't share someone's personal information.")
    assert not data.refuses_for_harm("Great! Here are some steps to consider when buying a house: 1. ...")
    assert not data.refuses_for_harm("As an AI language model, I don't have personal opinions. However, ...")
