"""What a mode means and how strongly it acts: the aligner's settings, the one place their defaults live.

`AlignerSettings` is a frozen value that validates itself. The CLI, the server's config file, eval and the demo pair
all build it with `resolve`: the defaults, then a steering settings file (`SteeringSettings`, written by
`inferaligner calibrate`), then the options given. Nothing else holds a default for these settings.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

from inferaligner.errors import InferAlignerError

DEFAULT_ALPHA = 4.0  # the paper's strength for its unit mean-difference vectors
FITTED_ALPHA = 1.0  # teacher-fitted vectors' own strength: the one they were fitted at
DEFAULT_REFUSAL = (
    "I can't help with that. The request could lead to real harm to people, so I won't provide it. "
    "If you have a related question that is safe, I'm glad to help."
)
SETTINGS_FORMAT = "inferaligner.steering_settings"
STEERING_KINDS = ("teacher-fitted", "mean-difference")
"""What a settings file's vectors are (`SafetyVectors.kind`); the aligner checks that the file holds that kind."""


class SettingsError(InferAlignerError):
    """A setting is out of range or of the wrong kind."""


class Mode(str, Enum):
    """How the aligner intervenes."""

    INFERALIGNER = "inferaligner"  # steer with the aligned model's vectors when the gate fires (the method)
    SELF = "self"  # steer with the target's own vectors when the gate fires (ablation)
    SIMPLE = "simple"  # answer with a fixed refusal when the gate fires; no aligned model needed
    ALWAYS = "always"  # steer with the aligned model's vectors on every input (no gate; ablation)
    ALIGNED = "aligned"  # the aligned model itself answers when the gate fires (comparison; needs that model)
    OFF = "off"  # plain generation; the gate is still reported when target vectors are given

    @property
    def gated(self) -> bool:
        """Whether the gate decides which rows change (rows it leaves alone are plain generation)."""
        return self in (Mode.INFERALIGNER, Mode.SELF, Mode.SIMPLE, Mode.ALIGNED)


class SteerScale(str, Enum):
    """What alpha multiplies: the unit vectors (the paper) or the raw vectors (teacher-fitted ones carry their
    strength)."""

    UNIT = "unit"
    RAW = "raw"


DEFAULT_LOOP_SPAN = 8
"""A steered answer that repeats a run of this many tokens is ended there (`inferaligner.loopstop`)."""


@dataclass(frozen=True)
class AlignerSettings:
    """Everything that decides what the aligner does to a prompt, besides the model and the vectors.

    `steer_layers=None` lets the steering vectors choose (fitted vectors: their own layers; mean-difference vectors:
    where both models separate harmful from harmless); `steer_scale=None` means raw for fitted vectors, else unit;
    `alpha=None` means `FITTED_ALPHA` (1) for fitted vectors, else `DEFAULT_ALPHA` (the paper's 4);
    `gate_layer` / `gate_bias` `None` take the vector file's stored gate. `loop_span`: a steered answer ends at its
    first repeated run of this many tokens (0: never); unsteered rows are never cut. `allow_weak_steering`: build
    even when the steering's shifts are negligible (`inferaligner.strength`); such rows never count as intervened.
    """

    mode: Mode = Mode.INFERALIGNER
    alpha: float | None = None
    steer_layers: tuple[int, ...] | None = None
    steer_scale: SteerScale | None = None
    gate_layer: int | None = None
    gate_bias: float | None = None
    system: str | None = None
    refusal: str = DEFAULT_REFUSAL
    layers_path: str | None = None
    loop_span: int = DEFAULT_LOOP_SPAN  # a steered answer ends at its first repeated run of this many tokens; 0: off
    allow_weak_steering: bool = False  # run a negligible steering anyway (`inferaligner.strength`); never intervenes

    def __post_init__(self) -> None:
        normalised = {
            "mode": _enum(Mode, self.mode, "mode"),
            "steer_scale": None if self.steer_scale is None else _enum(SteerScale, self.steer_scale, "steer_scale"),
            "alpha": None if self.alpha is None else _positive(self.alpha, "alpha"),
            "gate_bias": None if self.gate_bias is None else _number(self.gate_bias, "gate_bias"),
            "gate_layer": None if self.gate_layer is None else _layer(self.gate_layer, "gate_layer"),
            "steer_layers": None if self.steer_layers is None else _layers(self.steer_layers),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        _check_texts(self.refusal, self.system)
        if isinstance(self.loop_span, bool) or not isinstance(self.loop_span, int) or self.loop_span < 0:
            raise SettingsError(f"loop_span must be a whole number of tokens (0: off), not {self.loop_span!r}.")
        if not isinstance(self.allow_weak_steering, bool):
            raise SettingsError(f"allow_weak_steering must be true or false, not {self.allow_weak_steering!r}.")

    def merged(self, **given: Any) -> AlignerSettings:
        """These settings with every given option that is not `None` replacing the current value."""
        unknown = set(given) - {f.name for f in fields(self)}
        if unknown:
            raise SettingsError(f"Unknown aligner settings: {', '.join(sorted(unknown))}.")
        return replace(self, **{k: v for k, v in given.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (enums as their names' values)."""
        data = asdict(self)
        data["mode"] = self.mode.value
        data["steer_scale"] = self.steer_scale.value if self.steer_scale else None
        data["steer_layers"] = list(self.steer_layers) if self.steer_layers is not None else None
        return data


OPTION_NAMES = tuple(f.name for f in fields(AlignerSettings))


def resolve(given: Mapping[str, Any], steering: SteeringSettings | None = None) -> AlignerSettings:
    """The settings: the defaults, then `steering` (a calibrated settings file), then the options in `given` that
    are not `None`. Keys of `given` that are not settings are ignored (the CLI passes all its options)."""
    settings = AlignerSettings()
    if steering is not None:
        settings = settings.merged(**steering.overrides())
    return settings.merged(**{k: v for k, v in given.items() if k in OPTION_NAMES})


@dataclass(frozen=True)
class SteeringSettings:
    """Which vectors steer, where and how strongly: what `inferaligner calibrate` writes and the aligner reads.

    `vectors` is relative to the settings file when the file is loaded from disk.
    """

    vectors: str
    alpha: float
    layers: tuple[int, ...]
    scale: str  # "raw" (teacher-fitted vectors carry their strength) or "unit" (the paper's unit vectors)
    kind: str
    candidate: str = ""
    source: str = "inferaligner calibrate"
    table: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.vectors, str) or not self.vectors.strip():
            raise SettingsError(f"vectors must be the path of a vector file (a text), not {self.vectors!r}.")
        for name in ("candidate", "source"):
            if not isinstance(getattr(self, name), str):
                raise SettingsError(f"{name} must be a text, not {getattr(self, name)!r}.")
        if not isinstance(self.table, list) or not all(isinstance(row, dict) for row in self.table):
            raise SettingsError("table must be a list of objects (the calibration rows).")
        if self.alpha is None or self.scale is None or not self.layers:
            raise SettingsError("Steering settings need a strength (alpha), a scale and steered layers.")
        AlignerSettings(alpha=self.alpha, steer_layers=self.layers, steer_scale=self.scale)  # validates them
        if self.kind not in STEERING_KINDS:
            raise SettingsError(f"kind must be one of {', '.join(map(repr, STEERING_KINDS))}, not {self.kind!r}.")

    def save(self, path: str | Path) -> Path:
        """Write the settings as JSON, with the vector file's path relative to the settings file's folder."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        vectors = Path(self.vectors)
        if vectors.is_absolute() or vectors.exists():
            vectors = Path(os.path.relpath(vectors.resolve(), path.parent.resolve()))
        data = {"format": SETTINGS_FORMAT, **asdict(self), "vectors": vectors.as_posix()}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SteeringSettings:
        """Read a settings file; its `vectors` path is made absolute (it is stored relative to the file)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON, a number too long to read
            raise InferAlignerError(f"Cannot read steering settings {path}: {exc}") from exc
        if not isinstance(data, dict) or data.pop("format", None) != SETTINGS_FORMAT:
            raise InferAlignerError(f"{path} is not a steering settings file; write one with `inferaligner calibrate`.")
        if not isinstance(data.get("layers", []), list):
            raise SettingsError(f"{path}: layers must be a list of layer indices, not {data['layers']!r}.")
        try:
            settings = cls(**{**data, "layers": tuple(data["layers"])})
        except (KeyError, TypeError) as exc:
            raise InferAlignerError(f"{path} is an incomplete steering settings file ({exc}).") from exc
        except SettingsError as exc:
            raise SettingsError(f"{path}: {exc}") from exc
        vectors = Path(settings.vectors)
        return settings if vectors.is_absolute() else replace(settings, vectors=str(path.parent / vectors))

    def load_vectors(self) -> Any:
        """The steering vectors this file names (`SafetyVectors`), checked to be of the kind it says."""
        from inferaligner.vectors import SafetyVectors

        vectors = SafetyVectors.load(self.vectors)
        if vectors.kind != self.kind:
            raise SettingsError(
                f"These steering settings are for {self.kind} vectors, but {self.vectors} holds "
                f"{vectors.describe_kind()}: point 'vectors' at the file calibrate chose."
            )
        return vectors

    def overrides(self) -> dict[str, Any]:
        """The aligner settings this file sets (the vectors themselves are loaded from `vectors`)."""
        return {"alpha": self.alpha, "steer_layers": tuple(self.layers), "steer_scale": self.scale}


def _enum(kind: type[Enum], value: Any, name: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in kind)  # type: ignore[attr-defined]
        raise SettingsError(f"{name} must be one of {choices}, not {value!r}.") from None


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, not {value!r}.")
    return float(value)


def _layer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SettingsError(f"{name} must hold layer indices (integers from 0), not {value!r}.")
    return value


def _positive(value: Any, name: str) -> float:
    number = _number(value, name)
    if number <= 0:
        raise SettingsError(f"{name} must be a positive number, not {number:g} (to steer nothing: mode 'off').")
    return number


def _layers(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise SettingsError("steer_layers must be a non-empty list of layer indices (or unset: automatic).")
    return tuple(sorted({_layer(i, "steer_layers") for i in value}))


def _check_texts(refusal: Any, system: Any) -> None:
    if not isinstance(refusal, str) or not refusal.strip():
        raise SettingsError("refusal must be a non-empty text.")
    if system is not None and not isinstance(system, str):
        raise SettingsError(f"system must be a text, not {system!r}.")
