"""Safety-related vectors: per-layer harmful-minus-harmless directions with their provenance, as safetensors."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.activations import prompt_activations
from inferaligner.errors import PromptError, VectorFileError, VectorMismatchError
from inferaligner.gate import (
    POOLINGS,
    Gate,
    GateHead,
    calibrate_bias,
    calibrate_bias_tpr,
    choose_gate_layer,
    layer_metrics,
    midpoint_bias,
    search_probe,
)
from inferaligner.models import decoder_layers, has_vision, model_fingerprint, text_config
from inferaligner.prompts import format_chats
from inferaligner.strength import residual_norms
from inferaligner.version import __version__

FORMAT = "inferaligner.safety_vectors"
FORMAT_VERSION = 1
MEAN_DIFFERENCE = "mean-difference"
TEACHER_FITTED = "teacher-fitted"
PROBE = "probe"
MLP = "mlp"
LAYER_CONVENTION = "block_output"
"""Layer `l` is the output of decoder block `l` (0-based), i.e. Hugging Face `hidden_states[l + 1]`."""


@dataclass(frozen=True)
class Provenance:
    """Where a set of vectors came from."""

    model_name: str
    model_type: str
    fingerprint: str
    hidden_size: int
    num_layers: int
    n_harmful: int
    n_harmless: int
    data_hash: str
    layer_convention: str = LAYER_CONVENTION
    normalisation: str = "unit"
    source: str = "text model"  # or "image-text model, text prompts"
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    library_version: str = ""
    method: str = MEAN_DIFFERENCE  # or TEACHER_FITTED: fitted on this model to reproduce `teacher`'s answers
    teacher: str = ""

    @classmethod
    def of(
        cls, model: PreTrainedModel, num_layers: int, n_harmful: int, n_harmless: int, data: str, **extra: str
    ) -> Provenance:
        """The provenance of vectors taken from `model` (name, type, fingerprint, shape, source, library version)."""
        config = text_config(model)
        return cls(
            model_name=str(getattr(model, "name_or_path", "") or config.model_type),
            model_type=config.model_type,
            fingerprint=model_fingerprint(model),
            hidden_size=config.hidden_size,
            num_layers=num_layers,
            n_harmful=n_harmful,
            n_harmless=n_harmless,
            data_hash=data,
            source="image-text model, text prompts" if has_vision(model) else "text model",
            library_version=__version__,
            **extra,
        )

    def describe(self) -> str:
        return (
            f"{self.model_name} ({self.model_type}, {self.num_layers} layers x {self.hidden_size}, {self.fingerprint})"
        )


@dataclass(frozen=True)
class GateSpec:
    """A gate stored with target vectors: the layer it reads, its bias, how the bias was chosen, and which direction
    it projects on (`mean-difference`: the layer's safety-related vector; `probe`: a logistic-regression direction
    stored in the file as `gate_direction`)."""

    layer: int
    bias: float
    rule: str = "midpoint"  # how the bias was set: "midpoint", "probe" (the probe's own), "fpr" or "tpr"
    target_fpr: float | None = None
    direction: str = MEAN_DIFFERENCE
    pooling: str = "last"  # how the gate layer's output is pooled over the prompt: "last" token, "mean" or "turns"
    target_tpr: float | None = None  # rule "tpr": the fraction of calibration harmful prompts the gate fires on
    earlier_margin: float = 0.0  # "turns": how much more an earlier turn must score to fire (`gate.Gate`)
    data: str = ""  # what the gate was fitted and chosen on (for a turns gate: sources, counts, hash)


@dataclass(frozen=True)
class SafetyVectors:
    """Unit safety-related vectors `v_l` for every layer, with raw norms, biases, metrics and provenance.

    `metrics` maps names such as "extraction.accuracy" or "calibration.auroc" to one value per layer.
    """

    directions: torch.Tensor
    norms: torch.Tensor
    bias: torch.Tensor
    provenance: Provenance
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    gate: GateSpec | None = None
    gate_direction: torch.Tensor | None = None  # the probe's direction when `gate.direction == "probe"`
    gate_head: GateHead | None = None  # the gate's MLP when `gate.direction == "mlp"`
    residual_norms: torch.Tensor | None = None  # each layer's typical residual norm on the source model (strength)

    @property
    def num_layers(self) -> int:
        return self.directions.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.directions.shape[1]

    @property
    def fitted(self) -> bool:
        """Teacher-fitted steering vectors (`inferaligner.fit`): raw strengths, only some layers non-zero."""
        return self.provenance.method == TEACHER_FITTED

    @property
    def kind(self) -> str:
        """What these vectors are: "mean-difference" (`extract`) or "teacher-fitted" (`fit`)."""
        return self.provenance.method

    def is_own_gate_of(self, target: SafetyVectors) -> bool:
        """Whether these mean-difference vectors are the target's own: the same file, or vectors of the model of the
        same name (a model built from a config has no name of its own and is not compared)."""
        if self.fitted:
            return False  # fitted on the target on purpose, from another model's answers
        name, other = self.provenance.model_name, target.provenance.model_name
        named = name not in ("", self.provenance.model_type)
        return self.content_id() == target.content_id() or (named and name == other)

    def describe_kind(self) -> str:
        """What the file holds, in words: its kind, source model, layers and gate."""
        layers = self.fitted_layers
        span = f"layers {layers}" if self.fitted else f"{self.num_layers} layers"
        article = {MLP: "an MLP", PROBE: "a probe"}.get(self.gate.direction, "a mean-difference") if self.gate else ""
        gate = f", with {article} gate at layer {self.gate.layer}" if self.gate else ""
        return f"{self.kind} vectors of {self.provenance.model_name} ({span}{gate})"

    @property
    def fitted_layers(self) -> list[int]:
        """The layers that carry a fitted vector (all layers for mean-difference vectors)."""
        return [i for i, n in enumerate(self.norms.tolist()) if n > 0] if self.fitted else list(range(self.num_layers))

    def content_id(self) -> str:
        """A short hash of the stored directions and norms: two files with the same id steer alike."""
        digest = hashlib.sha256(self.directions.detach().float().cpu().contiguous().numpy().tobytes())
        digest.update(self.norms.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def make_gate(self, layer: int | None = None, bias: float | None = None) -> Gate:
        """The gate these vectors define: the stored gate, else the best extraction layer at the midpoint bias."""
        if layer is None:
            layer = self.gate.layer if self.gate else self.best_layer()
        if not 0 <= layer < self.num_layers:
            raise VectorMismatchError(f"Gate layer {layer} is outside 0..{self.num_layers - 1}.")
        stored = self.gate if self.gate is not None and self.gate.layer == layer else None
        if bias is None:
            bias = stored.bias if stored else float(self.bias[layer])
        probe = self.gate_direction if stored and self.gate_direction is not None else None
        direction = probe if probe is not None else self.directions[layer]
        pooling, margin = (stored.pooling, stored.earlier_margin) if stored else ("last", 0.0)
        head = self.gate_head if stored else None
        return Gate(None if head else direction.clone(), float(bias), layer, pooling, margin, head)

    def best_layer(self) -> int:
        """The layer that best separates held-out prompts (extraction prompts if none were held out)."""
        prefix = "calibration" if "calibration.accuracy" in self.metrics else "extraction"
        return choose_gate_layer(self.metrics[f"{prefix}.accuracy"], self.metrics[f"{prefix}.separation"])

    def check_fits(self, model: PreTrainedModel, role: str = "vectors") -> None:
        """Raise `VectorMismatchError`, naming both sides, if these vectors do not fit `model`."""
        config = text_config(model)
        shape = (config.num_hidden_layers, config.hidden_size)
        if shape != (self.num_layers, self.hidden_size):
            name = getattr(model, "name_or_path", "") or config.model_type
            raise VectorMismatchError(
                f"The {role} come from {self.provenance.describe()} but the model {name} has {shape[0]} layers x "
                f"{shape[1]}: extract vectors from a model of the same family and size."
            )

    def _gate_tensors(self) -> dict[str, torch.Tensor]:
        """The stored gate's own tensors, named as in the file: a probe's direction, an MLP's head."""
        tensors = {"gate_direction": self.gate_direction} if self.gate_direction is not None else {}
        return tensors | {f"gate_head.{k}": v for k, v in (self.gate_head.tensors() if self.gate_head else {}).items()}

    def check_finite(self, role: str = "vectors") -> None:
        """Raise `VectorFileError` if any stored number (directions, norms, biases, gate) is NaN or infinite."""
        tensors = {"directions": self.directions, "norms": self.norms, "bias": self.bias, **self._gate_tensors()}
        if self.residual_norms is not None:
            tensors["residual_norms"] = self.residual_norms
        bad = [name for name, value in tensors.items() if not bool(torch.isfinite(value).all())]
        if self.gate is not None and not math.isfinite(self.gate.bias):
            bad.append("gate bias")
        if self.gate is not None and not math.isfinite(self.gate.earlier_margin):
            bad.append("gate earlier-turn margin")
        if bad:
            raise VectorFileError(
                f"The {role} from {self.provenance.describe()} hold non-finite values in "
                f"{', '.join(bad)}: the file is corrupt; extract it again."
            )
        if self.gate is not None and self.gate.earlier_margin < 0:
            raise VectorFileError(
                f"The {role} from {self.provenance.describe()} hold a negative earlier-turn margin "
                f"({self.gate.earlier_margin}): the file is corrupt; extract it again."
            )

    def check_compatible(self, other: SafetyVectors, roles: tuple[str, str] = ("steering", "gate")) -> None:
        """Raise if two vector sets come from models of different shape (aligned and target must share a base)."""
        if (self.num_layers, self.hidden_size) != (other.num_layers, other.hidden_size):
            raise VectorMismatchError(
                f"The {roles[0]} vectors come from {self.provenance.describe()} and the {roles[1]} vectors from "
                f"{other.provenance.describe()}: the aligned and target models must share one base model."
            )

    def with_gate(
        self, gate: GateSpec, direction: torch.Tensor | None = None, head: GateHead | None = None
    ) -> SafetyVectors:
        """These vectors with another stored gate (`direction` for a probe gate, `head` for an MLP gate, else the
        layer's own vector)."""
        if (gate.direction == PROBE) != (direction is not None) or (gate.direction == MLP) != (head is not None):
            raise VectorFileError("A probe gate needs its direction and an MLP gate its head; no other gate has one.")
        return replace(self, gate=gate, gate_direction=direction, gate_head=head)

    def save(self, path: str | Path) -> Path:
        """Write the vectors as safetensors; provenance, gate and format go into the header as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"directions": self.directions, "norms": self.norms, "bias": self.bias}
        tensors |= {f"metrics.{name}": value for name, value in self.metrics.items()} | self._gate_tensors()
        if self.residual_norms is not None:
            tensors["residual_norms"] = self.residual_norms
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "provenance": json.dumps(asdict(self.provenance)),
            "gate": json.dumps(asdict(self.gate) if self.gate else None),
        }
        save_file({k: v.float().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
        return path

    def _check_shapes(self, path: Path) -> None:
        """Raise `VectorFileError` unless every stored tensor has the shape the file's own numbers say."""
        if self.directions.ndim != 2 or self.directions.shape[0] != self.provenance.num_layers:
            raise VectorFileError(f"{path} is corrupt: its directions do not match its stated shape.")
        per_layer = {"norms": self.norms, "bias": self.bias, **self.metrics}
        if self.residual_norms is not None:
            per_layer["residual_norms"] = self.residual_norms
        short = [name for name, values in per_layer.items() if tuple(values.shape) != (self.num_layers,)]
        if short:
            raise VectorFileError(
                f"{path} is corrupt: {', '.join(short)} should hold one value per layer ({self.num_layers})."
            )
        probe = self.gate is not None and self.gate.direction == PROBE
        if probe != (self.gate_direction is not None) or (
            self.gate_direction is not None and self.gate_direction.shape != (self.hidden_size,)
        ):
            raise VectorFileError(f"{path} is corrupt: its probe gate and gate direction do not match.")
        head, mlp = self.gate_head, self.gate is not None and self.gate.direction == MLP
        fits = head is None or (
            head.hidden_weight.shape == (len(head.hidden_bias), self.hidden_size)
            and head.output_weight.shape == head.hidden_bias.shape
        )
        if mlp != (head is not None) or not fits:
            raise VectorFileError(f"{path} is corrupt: its MLP gate and gate head do not match.")

    @classmethod
    def load(cls, path: str | Path) -> SafetyVectors:
        """Read a file written by `save`; anything else raises `VectorFileError` saying what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise VectorFileError(f"Vector file {path} does not exist.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            hint = "create one with `inferaligner extract`"
            raise VectorFileError(f"{path} is not a safetensors file ({exc}); {hint}.") from exc
        _check_format(path, metadata)
        try:
            provenance = Provenance(**json.loads(metadata["provenance"]))
            gate = json.loads(metadata.get("gate") or "null")
            vectors = cls(
                directions=tensors["directions"],
                norms=tensors["norms"],
                bias=tensors["bias"],
                provenance=provenance,
                metrics={k.removeprefix("metrics."): v for k, v in tensors.items() if k.startswith("metrics.")},
                gate=GateSpec(**gate) if gate else None,
                gate_direction=tensors.get("gate_direction"),
                gate_head=GateHead(
                    **{k.removeprefix("gate_head."): v for k, v in tensors.items() if k.startswith("gate_head.")}
                )
                if "gate_head.output_weight" in tensors
                else None,
                residual_norms=tensors.get("residual_norms"),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise VectorFileError(f"{path} is an incomplete vector file (missing {exc}); extract it again.") from exc
        vectors._check_shapes(path)
        return vectors


def _check_format(path: Path, metadata: dict[str, str]) -> None:
    """Raise `VectorFileError` unless the header says this is a vector file this library can read."""
    if metadata.get("format") != FORMAT:
        raise VectorFileError(f"{path} is not an InferAligner vector file; create one with `inferaligner extract`.")
    version = metadata.get("format_version", "0")
    if not version.isdigit():
        raise VectorFileError(f"{path} is corrupt: its format_version '{version}' is not a number.")
    if int(version) > FORMAT_VERSION:
        raise VectorFileError(f"{path} was written by a newer inferaligner; upgrade the library to read it.")


def data_hash(*prompt_sets: Sequence[str]) -> str:
    """A short hash of the exact prompts used, in order."""
    return hashlib.sha256(json.dumps([list(s) for s in prompt_sets]).encode()).hexdigest()[:16]


def extract_safety_vectors(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    calibration: tuple[Sequence[str], Sequence[str]] | None = None,
    harmless_groups: Sequence[int] | None = None,
    gate_fpr: float | None = None,
    gate_tpr: float | None = None,
    gate: str = MEAN_DIFFERENCE,
    pooling: str = "last",
    system: str | None = None,
    batch_size: int = 16,
    layers_path: str | None = None,
    progress: bool = True,
) -> SafetyVectors:
    """Safety-related vectors of `model`: `v_l = normalise(mean a_l(harmful) - mean a_l(harmless))`.

    Instructions are wrapped in the model's chat template. With `calibration` (held-out harmful and harmless
    prompts) the per-layer gate metrics are also measured there, and the gate layer is chosen on them; with
    `gate_fpr` the stored gate bias is set so that at most that fraction of calibration harmless prompts fire; with
    `gate_tpr`, so that at least that fraction of calibration harmful prompts fire.
    `gate="probe"` (needs `calibration`) stores a logistic-regression gate instead, fitted on the prompts'
    activations pooled as `pooling` says ("last" token or "mean" over the prompt), at the layer and strength of
    regularisation that rank the calibration prompts best (`gate.search_probe`; `harmless_groups` says how many
    consecutive calibration harmless prompts each group holds, e.g. one per prompt set).
    """
    _check_extraction(bool(harmful and harmless), calibration is not None, gate_fpr, gate_tpr, gate, pooling)
    layers = decoder_layers(model, layers_path)

    def activations(prompts: Sequence[str], desc: str, how: str = "last") -> torch.Tensor:
        texts = format_chats(tokenizer, prompts, system)
        return prompt_activations(
            model, tokenizer, texts, pooling=how, batch_size=batch_size, layers=layers, progress=progress, desc=desc
        )

    harmful_acts = activations(harmful, "harmful prompts")
    harmless_acts = activations(harmless, "harmless prompts")
    difference = harmful_acts.mean(0) - harmless_acts.mean(0)
    norms = difference.norm(dim=-1)
    if bool((norms == 0).any()):
        raise PromptError("Harmful and harmless prompts give identical activations; use two different prompt sets.")
    directions = difference / norms[:, None]

    def projections(acts: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nld,ld->nl", acts, directions)

    harmful_proj, harmless_proj = projections(harmful_acts), projections(harmless_acts)
    bias = midpoint_bias(harmful_proj, harmless_proj)
    metrics = _prefixed("extraction", layer_metrics(harmful_proj, harmless_proj, bias).as_dict())
    stored: GateSpec | None = None
    gate_direction = None
    if calibration is not None:
        cal_harmful_acts = activations(calibration[0], "calibration harmful")
        cal_harmless_acts = activations(calibration[1], "calibration harmless")
        cal_harmful, cal_harmless = projections(cal_harmful_acts), projections(cal_harmless_acts)
        cal = layer_metrics(cal_harmful, cal_harmless, bias)
        metrics |= _prefixed("calibration", cal.as_dict())
        if gate == PROBE:
            if pooling != "last":
                harmful_acts, harmless_acts = (
                    activations(harmful, "harmful prompts", pooling),
                    activations(harmless, "harmless prompts", pooling),
                )
                cal_harmful_acts, cal_harmless_acts = (
                    activations(calibration[0], "calibration harmful", pooling),
                    activations(calibration[1], "calibration harmless", pooling),
                )
            search = search_probe(
                harmful_acts, harmless_acts, cal_harmful_acts, cal_harmless_acts, groups=harmless_groups, tpr=gate_tpr
            )
            metrics["probe.calibration_auroc"] = search.auroc
            stored = _probe_gate(search, cal_harmless_acts, pooling, gate_fpr, gate_tpr)
            gate_direction = search.direction
        else:
            stored = _mean_difference_gate(cal, cal_harmful, cal_harmless, bias, gate_fpr, gate_tpr)
    provenance = Provenance.of(model, len(layers), len(harmful), len(harmless), data_hash(harmful, harmless))
    return SafetyVectors(
        directions,
        norms,
        bias,
        provenance,
        metrics,
        stored,
        gate_direction,
        residual_norms=residual_norms(model, tokenizer, layers),
    )


def _check_extraction(
    has_prompts: bool, calibrated: bool, gate_fpr: float | None, gate_tpr: float | None, gate: str, pooling: str
) -> None:
    """Raise `PromptError` for options `extract_safety_vectors` cannot honour."""
    if not has_prompts:
        raise PromptError("Extraction needs at least one harmful and one harmless prompt.")
    if (gate_fpr is not None or gate_tpr is not None) and not calibrated:
        raise PromptError("Calibrating the gate bias to a false- or true-positive rate needs calibration prompts.")
    if gate_fpr is not None and gate_tpr is not None:
        raise PromptError("Set the gate bias by a false-positive rate or by a true-positive rate, not both.")
    if gate not in (MEAN_DIFFERENCE, PROBE):
        raise PromptError(f"Unknown gate '{gate}': use '{MEAN_DIFFERENCE}' or '{PROBE}'.")
    if gate == PROBE and not calibrated:
        raise PromptError("A probe gate is chosen on held-out prompts: give calibration prompts.")
    if pooling not in POOLINGS:
        raise PromptError(f"Unknown pooling '{pooling}': use one of {', '.join(POOLINGS)}.")


def _probe_gate(
    search: Any, cal_harmless_acts: torch.Tensor, pooling: str, gate_fpr: float | None, gate_tpr: float | None
) -> GateSpec:
    """The stored probe gate: the search's layer and bias, or the bias at `gate_fpr` of the calibration harmless."""
    if gate_fpr is not None:
        bias = calibrate_bias(cal_harmless_acts[:, search.layer] @ search.direction, gate_fpr)
        return GateSpec(search.layer, bias, "fpr", gate_fpr, PROBE, pooling, gate_tpr)
    rule = "probe" if gate_tpr is None else "tpr"
    return GateSpec(search.layer, search.bias, rule, gate_fpr, PROBE, pooling, gate_tpr)


def _mean_difference_gate(
    cal: Any,
    cal_harmful: torch.Tensor,
    cal_harmless: torch.Tensor,
    bias: torch.Tensor,
    gate_fpr: float | None,
    gate_tpr: float | None,
) -> GateSpec:
    """The paper's gate at the best calibration layer: the midpoint bias, or one set by a false/true-positive rate."""
    layer = choose_gate_layer(cal.accuracy, cal.separation)
    if gate_fpr is not None:
        return GateSpec(layer, calibrate_bias(cal_harmless[:, layer], gate_fpr), "fpr", gate_fpr)
    if gate_tpr is not None:
        return GateSpec(layer, calibrate_bias_tpr(cal_harmful[:, layer], gate_tpr), "tpr", target_tpr=gate_tpr)
    return GateSpec(layer=layer, bias=float(bias[layer]))


def _prefixed(prefix: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": value for name, value in values.items()}


def describe(vectors: SafetyVectors) -> dict[str, Any]:
    """A JSON-friendly summary: provenance, gate and per-layer metrics."""
    return {
        "provenance": asdict(vectors.provenance),
        "gate": asdict(vectors.gate) if vectors.gate else None,
        "metrics": {name: [round(v, 4) for v in value.tolist()] for name, value in vectors.metrics.items()},
        "norms": [round(v, 4) for v in vectors.norms.tolist()],
        "kind": vectors.kind,
        "residual_norms": None
        if vectors.residual_norms is None
        else [round(v, 2) for v in vectors.residual_norms.tolist()],
    }
