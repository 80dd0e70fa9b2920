"""The demo pair, shipped small: LoRA adapters on the embedded SmolLM2-135M-Instruct plus their vector files.

- `aligned`: safety fine-tuned (refuses harmful requests, saying why; answers harmless ones as the base does).
- `target`: fine-tuned on generated arithmetic word problems, with no safety data (the "domain model").
- `gemma-target`: the same recipe on the Gemma 3 270M base model (a second family), with the folder `inferaligner
  align` made for it, the SmolLM2 `aligned` model teaching (`aligned/`).

`load("target")` returns the base with the adapter merged; `inferaligner.loading.load("zoo:target")` does the same.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.errors import InferAlignerError
from inferaligner.loading import register_scheme
from inferaligner.models import load_model, set_model_name
from inferaligner.settings import SteeringSettings

NAMES = ("aligned", "target")
SECOND_FAMILY = ("gemma-target",)
"""Shipped targets of another family, each with the folder `inferaligner align` made for it (`aligned/`)."""


def artifact_dir(name: str) -> Path:
    """Folder of a shipped adapter: adapter weights and config, `card.json`, and `vectors.safetensors` (the demo
    pair) or `aligned/` (a second-family target)."""
    if name not in (*NAMES, *SECOND_FAMILY):
        raise InferAlignerError(f"Unknown demo model '{name}': choose one of {', '.join((*NAMES, *SECOND_FAMILY))}.")
    folder = Path(str(resources.files("inferaligner.zoo").joinpath("artifacts", name)))
    if not (folder / "adapter_config.json").is_file():
        raise InferAlignerError(
            f"The '{name}' adapter is not in {folder}: build it with `inferaligner zoo build {name}`."
        )
    return folder


def card(name: str) -> dict[str, Any]:
    """The JSON card of a shipped adapter: recipe, seed, data hash, build time, loss, base fingerprint."""
    return json.loads((artifact_dir(name) / "card.json").read_text())


def vectors_path(name: str) -> Path:
    """The safety vectors extracted from a shipped model (for `target`, with its calibrated gate)."""
    return artifact_dir(name) / "vectors.safetensors"


def load(name: str, **load_kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A shipped adapter (by name) or a built one (a folder from `inferaligner zoo build`), merged into its base.

    The base is the model named in the adapter's card: the embedded SmolLM2, or another zoo model.
    """
    from peft import PeftModel

    folder = Path(name) if Path(name).is_dir() else artifact_dir(name)
    if not (folder / "card.json").is_file():
        raise InferAlignerError(f"{folder} holds no adapter card: build it with `inferaligner zoo build`.")
    base_name = json.loads((folder / "card.json").read_text())["base_model"]
    if base_name.startswith("zoo:"):
        base, tokenizer = load(base_name.removeprefix("zoo:"), **load_kwargs)
    else:
        base, tokenizer = load_model(base_name, **load_kwargs)
    model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    set_model_name(model, f"zoo:{name}")
    return model.eval(), tokenizer


SETTINGS = {"default": "settings.json", "mean-difference": "settings-mean-difference.json"}
"""The demo pair's steering settings: `default` (teacher-fitted vectors, chosen by `inferaligner calibrate`) and
`mean-difference` (the paper's vectors: the aligned model's mean differences, as tuned by `bench/demo_pair.py`)."""


def settings_path(name: str = "default") -> Path:
    """The file of the demo pair's named steering settings in `artifacts/`."""
    if name not in SETTINGS:
        raise InferAlignerError(f"Unknown demo settings '{name}': choose one of {', '.join(SETTINGS)}.")
    path = Path(str(resources.files("inferaligner.zoo").joinpath("artifacts", SETTINGS[name])))
    if not path.is_file():
        raise InferAlignerError(f"{path} is missing: run `inferaligner calibrate` for the demo pair.")
    return path


def aligned_dir(name: str) -> Path:
    """The folder `inferaligner align` made for a shipped second-family target."""
    return artifact_dir(name) / "aligned"


def shipped_alignment(model: str, steering: str = "default") -> dict[str, Path]:
    """What a shipped model brings when it is named with `zoo:NAME` and no vectors are given: the target its own
    gate (`target_vectors`) and the demo pair's named steering settings (`settings`); a second-family target its
    aligned folder's gate and settings; other names bring nothing."""
    name = model.removeprefix("zoo:")
    if model == f"zoo:{name}" and name in SECOND_FAMILY:
        return {
            "target_vectors": aligned_dir(name) / "gate.safetensors",
            "settings": aligned_dir(name) / "settings.json",
        }
    if model != "zoo:target":
        return {}
    return {"target_vectors": vectors_path("target"), "settings": settings_path(steering)}


def settings(name: str = "default") -> SteeringSettings:
    """The demo pair's steering settings (vectors, alpha, layers, scale) from `artifacts/`."""
    return SteeringSettings.load(settings_path(name))


register_scheme("zoo", load)  # `inferaligner.load("zoo:target")` and every `--model zoo:NAME`
