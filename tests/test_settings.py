"""AlignerSettings: the one place the aligner's defaults live; it validates itself, and `resolve` layers a
calibrated settings file and given options over the defaults."""

from __future__ import annotations

import json
import math

import pytest

from inferaligner.settings import (
    AlignerSettings,
    Mode,
    SettingsError,
    SteeringSettings,
    SteerScale,
    resolve,
)


def test_defaults_and_coercion() -> None:
    settings = AlignerSettings(mode="simple", steer_scale="raw", steer_layers=[3, 1, 3])
    assert settings.mode is Mode.SIMPLE and settings.steer_scale is SteerScale.RAW
    assert settings.steer_layers == (1, 3) and settings.alpha is None  # the vectors' own default (test_fit)
    assert AlignerSettings().mode is Mode.INFERALIGNER and AlignerSettings().steer_layers is None


@pytest.mark.parametrize(("options", "message"), [
    ({"alpha": math.nan}, "alpha must be a finite number"),
    ({"alpha": math.inf}, "alpha must be a finite number"),
    ({"alpha": -math.inf}, "alpha must be a finite number"),
    ({"alpha": -1e30}, "alpha must be a positive number"),
    ({"alpha": 0}, "mode 'off'"),
    ({"alpha": True}, "alpha must be a finite number"),
    ({"alpha": "4"}, "alpha must be a finite number"),
    ({"gate_bias": math.nan}, "gate_bias must be a finite number"),
    ({"gate_layer": -1}, "gate_layer must hold layer indices"),
    ({"steer_layers": []}, "non-empty list"),
    ({"steer_layers": "1-2"}, "non-empty list"),
    ({"steer_layers": [1, -2]}, "steer_layers must hold layer indices"),
    ({"steer_layers": [1.5]}, "steer_layers must hold layer indices"),
    ({"mode": "sideways"}, "mode must be one of"),
    ({"steer_scale": "huge"}, "steer_scale must be one of 'unit', 'raw'"),
    ({"refusal": "  "}, "refusal must be a non-empty text"),
])  # fmt: skip
def test_bad_values_are_one_line_errors(options: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        AlignerSettings(**options)


def test_merged_ignores_none_and_rejects_unknown_names() -> None:
    base = AlignerSettings(alpha=2.0)
    assert base.merged(alpha=None, mode="off") == AlignerSettings(alpha=2.0, mode="off")
    with pytest.raises(SettingsError, match="Unknown aligner settings: layers"):
        base.merged(layers=[1])


def test_resolve_layers_file_under_given_options() -> None:
    steering = SteeringSettings("v.safetensors", 1.25, (12, 16), "raw", "teacher-fitted")
    assert resolve({}).alpha is None
    from_file = resolve({"verb": "serve", "port": 80}, steering)  # other options are ignored
    assert (from_file.alpha, from_file.steer_layers, from_file.steer_scale) == (1.25, (12, 16), SteerScale.RAW)
    given = resolve({"alpha": 2.0, "steer_layers": None, "gate_bias": 1.5}, steering)
    assert (given.alpha, given.steer_layers, given.gate_bias) == (2.0, (12, 16), 1.5)


def test_as_dict_is_json() -> None:
    data = AlignerSettings(mode="always", steer_layers=[2], steer_scale="unit").as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["mode"] == "always" and data["steer_layers"] == [2] and data["steer_scale"] == "unit"
    assert AlignerSettings(**{**data, "steer_layers": tuple(data["steer_layers"])}).as_dict() == data
