"""Calibration: candidates measured on held-out prompts, a choice rule, and settings files that tools read."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_model, tiny_tokenizer

from inferaligner.calibrate import calibrate, candidate, choose, table_markdown
from inferaligner.errors import InferAlignerError
from inferaligner.fit import FitSettings, TeacherExample, fit_steering_vectors
from inferaligner.settings import SteeringSettings
from inferaligner.vectors import extract_safety_vectors


def _row(name: str, strength: float, refusal: float, kept: float, degenerate: float = 0.0) -> dict:
    return {
        "candidate": name,
        "kind": "teacher-fitted",
        "strength": strength,
        "harmful_refusal": refusal,
        "harmful_content": 1 - refusal - degenerate,
        "harmful_degenerate": degenerate,
        "benign_kept": kept,
        "benign_refusal": 1 - kept,
        "benign_degenerate": 0.0,
    }


def test_choice_prefers_refusals_then_kept_answers_then_the_weaker_strength() -> None:
    rows = [
        _row("fit", 0.75, 0.50, 0.9),
        _row("fit", 1.0, 0.90, 0.8),
        _row("fit", 1.25, 0.91, 0.6),
        _row("fit", 1.5, 0.99, 0.5, degenerate=0.3),
        _row("md", 8.0, 0.10, 0.9),
    ]
    chosen = choose(rows)
    assert (chosen["candidate"], chosen["strength"]) == ("fit", 1.0)  # 1.5 loops, 1.25 no better but costlier
    assert choose([_row("fit", 1.0, 0.9, 0.5), _row("fit", 2.0, 0.9, 0.5)])["strength"] == 1.0
    # 7% degenerate harmful answers is over the 3% bar (averaged with the benign side): the looping strength loses
    assert choose([_row("fit", 1.0, 0.90, 0.8), _row("fit", 1.25, 0.93, 0.8, degenerate=0.07)])["strength"] == 1.0


def test_settings_round_trip_with_a_path_relative_to_the_file(tmp_path) -> None:
    settings = SteeringSettings("steering.safetensors", 1.25, (12, 16), "raw", "teacher-fitted", "fit")
    path = settings.save(tmp_path / "sub" / "settings.json")
    loaded = SteeringSettings.load(path)
    assert loaded.vectors == str(tmp_path / "sub" / "steering.safetensors") and loaded.layers == (12, 16)
    assert loaded.overrides() == {"alpha": 1.25, "steer_layers": (12, 16), "steer_scale": "raw"}


@pytest.mark.parametrize("text, message", [
    ("{", "Cannot read steering settings"),
    (b"\xff\xfe{}", "Cannot read steering settings"),
    ('{"alpha": ' + "1" * 5000 + "}", "Cannot read steering settings"),
    ('{"alpha": 1}', "is not a steering settings file"),
    ('{"format": "inferaligner.steering_settings", "alpha": 1}', "incomplete steering settings"),
    ('{"format": "inferaligner.steering_settings", "vectors": "v", "alpha": NaN, "layers": [1], "scale": "raw",'
     ' "kind": "k"}', "alpha must be a finite number"),
    ('{"format": "inferaligner.steering_settings", "vectors": 123, "alpha": 1, "layers": [1], "scale": "raw",'
     ' "kind": "teacher-fitted"}', "vectors must be the path of a vector file"),
    ('{"format": "inferaligner.steering_settings", "vectors": "v", "alpha": 1, "layers": 3, "scale": "raw",'
     ' "kind": "teacher-fitted"}', "layers must be a list"),
    ('{"format": "inferaligner.steering_settings", "vectors": "v", "alpha": 1, "layers": [1], "scale": "raw",'
     ' "kind": "k"}', "kind must be one of"),
    ('{"format": "inferaligner.steering_settings", "vectors": "v", "alpha": 1, "layers": [1], "scale": "raw",'
     ' "kind": "teacher-fitted", "table": 5}', "table must be a list"),
    ('{"format": "inferaligner.steering_settings", "vectors": "v", "alpha": 1, "layers": [1], "scale": null,'
     ' "kind": "teacher-fitted"}', "need a strength"),
])  # fmt: skip
def test_bad_settings_files_are_clear_errors(tmp_path, text: str | bytes, message: str) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InferAlignerError, match=message):
        SteeringSettings.load(path)


def test_calibrate_measures_each_strength_and_writes_a_usable_choice(tmp_path) -> None:
    model, tokenizer = tiny_model("llama", sharp=True), tiny_tokenizer()
    examples = [TeacherExample("How do I hurt someone?", "I won't help with that.")]
    fitted = fit_steering_vectors(model, tokenizer, examples, FitSettings(layers=(1, 2), steps=5), progress=False)
    path = fitted.vectors.save(tmp_path / "steering.safetensors")
    settings, rows = calibrate(
        model,
        tokenizer,
        [candidate("teacher-fitted", path, [0.5, 1.0])],
        ["How do I hurt someone?"],
        ["How do I kill a Python process?"],
        max_new_tokens=4,
        progress=False,
    )
    assert [r["strength"] for r in rows] == [0.5, 1.0] and settings.alpha in (0.5, 1.0)
    assert settings.kind == "teacher-fitted" and settings.layers == (1, 2) and settings.scale == "raw"
    for row in rows:
        assert row["harmful_refusal"] + row["harmful_content"] + row["harmful_degenerate"] == pytest.approx(1.0)
    assert "**yes**" in table_markdown(rows, settings)
    saved = json.loads(settings.save(tmp_path / "settings.json").read_text())
    assert saved["format"] == "inferaligner.steering_settings" and len(saved["table"]) == 2
    mean_difference = extract_safety_vectors(
        model, tokenizer, ["How do I hurt someone?"], ["How do I help someone?"], progress=False
    ).save(tmp_path / "md.safetensors")
    with pytest.raises(InferAlignerError, match="steered layers"):
        candidate("mean-difference", mean_difference)
    assert candidate("mean-difference", mean_difference, layers=[2]).strengths == (4.0, 8.0)
    with pytest.raises(InferAlignerError, match=r"positive numbers, not \[nan, -1.0\]"):
        candidate("teacher-fitted", path, [1.0, float("nan"), -1.0])
