"""The one way from options to an `InferAligner`: the CLI's verbs, the demo, eval, the server and its Ray replicas all
build here.

Options are a mapping with the CLI's names (`model`, `target_vectors`, `aligned_vectors`, `settings` (a steering
settings file from `calibrate`), `aligned_model`, `dtype`, `device`, `trust_remote_code`, and any
`AlignerSettings` field), and `aligned` (a folder from `inferaligner align`). Given options win over the settings
file, which wins over the defaults; an aligned folder, or a shipped `zoo:` model, fills in the model and vectors it
holds when none are given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from inferaligner import zoo
from inferaligner.aligned_folder import AlignedFolder
from inferaligner.aligner import InferAligner
from inferaligner.errors import InferAlignerError
from inferaligner.loading import Loaded, load
from inferaligner.models import EMBEDDED_MODEL, model_fingerprint
from inferaligner.settings import AlignerSettings, SteeringSettings, resolve
from inferaligner.vectors import SafetyVectors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Alignment:
    """An aligner's settings and vectors, resolved from options, before any model is loaded."""

    settings: AlignerSettings
    target_vectors: SafetyVectors | None
    aligned_vectors: SafetyVectors | None


def with_shipped(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options, with what an aligned folder (`aligned`: its model, gate and settings) or a shipped `zoo:` model
    brings (its gate; the demo's steering settings in the modes that steer with them, unless other steering vectors
    are given) filling the ones not given."""
    if options.get("aligned"):
        folder = AlignedFolder.load(options["aligned"])
        shipped = {"model": folder.model, "target_vectors": folder.gate, "settings": folder.settings}
    else:
        shipped = zoo.shipped_alignment(str(options.get("model") or ""))
    steers_with_aligned = options.get("mode") in (None, "inferaligner", "always")  # the settings are for those
    if options.get("aligned_vectors") or options.get("settings") or not steers_with_aligned:
        shipped.pop("settings", None)
    return {**options, **{k: v for k, v in shipped.items() if not options.get(k)}}


def alignment(options: Mapping[str, Any]) -> Alignment:
    """The settings and vector files the options name, each checked (a settings file's vectors must be the kind it
    says); the steering vectors are `aligned_vectors`, else the settings file's."""
    options = with_shipped(options)
    steering = SteeringSettings.load(options["settings"]) if options.get("settings") else None
    settings = resolve(options, steering)
    target = SafetyVectors.load(options["target_vectors"]) if options.get("target_vectors") else None
    if options.get("aligned_vectors"):
        aligned = SafetyVectors.load(options["aligned_vectors"])
    else:
        aligned = steering.load_vectors() if steering else None
    return Alignment(settings, target, aligned)


def dtype(options: Mapping[str, Any]) -> torch.dtype:
    """The `dtype` option (a name, or a torch dtype), float32 when not given."""
    given = options.get("dtype") or "float32"
    if isinstance(given, torch.dtype):
        return given
    if given not in DTYPES:
        raise InferAlignerError(f"dtype must be one of {', '.join(DTYPES)}, not {given!r}.")
    return DTYPES[given]


def load_model(
    options: Mapping[str, Any], name: str | None = None, status: Callable[[str], None] | None = None
) -> Loaded:
    """The model named by `name` (default: the `model` option, else the embedded model), loaded as the `dtype` /
    `device` options say. The target of an `aligned` folder must have the shape it was aligned for."""
    target = name is None
    name = str(name or options.get("model") or EMBEDDED_MODEL)
    if status is not None:
        status(f"loading {name}")
    loaded = load(
        name,
        dtype=dtype(options),
        device=options.get("device") or "cpu",
        trust_remote_code=bool(options.get("trust_remote_code")),
    )
    if target and options.get("aligned"):
        AlignedFolder.load(options["aligned"]).check_model(name, model_fingerprint(loaded.model))
    return loaded


def build(options: Mapping[str, Any], status: Callable[[str], None] | None = None) -> tuple[InferAligner, Any]:
    """The aligner the options describe, and the model's processor (image-text models; else `None`). Every setting
    and file is checked before the model loads."""
    options = with_shipped(options)
    resolved = alignment(options)
    loaded = load_model(options, status=status)
    aligned = options.get("aligned_model")
    aligned_model = load_model(options, aligned, status).model if aligned else None
    aligner = InferAligner(
        loaded.model,
        loaded.tokenizer,
        target_vectors=resolved.target_vectors,
        aligned_vectors=resolved.aligned_vectors,
        aligned_model=aligned_model,
        settings=resolved.settings,
    )
    return aligner, loaded.processor


def build_aligner(options: Mapping[str, Any]) -> InferAligner:
    """`build` without the processor: what a server replica serves."""
    return build(options)[0]
