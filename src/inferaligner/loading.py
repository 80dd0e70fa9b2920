"""Load any model by name: hub ids, folders, GGUF files, the embedded default, image-text models with their
processors, and names of a registered scheme (`zoo:NAME`: the demo models, registered by `inferaligner.zoo`, which
sits above this module). A loader returns everything it loads."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner import models
from inferaligner.errors import InferAlignerError
from inferaligner.models import EMBEDDED_MODEL, PACKAGED_MODELS, load_config, prepare_tokenizer

SchemeLoader = Callable[..., tuple[PreTrainedModel, PreTrainedTokenizerBase]]
_SCHEMES: dict[str, SchemeLoader] = {}


def register_scheme(scheme: str, loader: SchemeLoader) -> None:
    """Let `load` take names `SCHEME:NAME`, loaded by `loader(NAME, dtype=..., device=...)`."""
    _SCHEMES[scheme] = loader


@dataclass(frozen=True)
class Loaded:
    """A loaded model, its tokenizer, and for image-text models its processor (`None` for text models)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    processor: Any = None


def load(
    name_or_path: str | os.PathLike[str] = EMBEDDED_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> Loaded:
    """Load a model in eval mode on `device`: `zoo:NAME` (a shipped or built demo model), an image-text model
    (with its processor), or anything `models.load_model` takes."""
    check_device(device)
    name = str(name_or_path)
    scheme, colon, rest = name.partition(":")
    if colon and scheme in _SCHEMES:
        model, tokenizer = _SCHEMES[scheme](rest, dtype=dtype, device=device)
        return Loaded(model, tokenizer)
    has_config = name not in PACKAGED_MODELS and not name.endswith(".gguf")
    if has_config and getattr(load_config(name, trust_remote_code=trust_remote_code), "vision_config", None):
        return load_image_text(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    model, tokenizer = models.load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return Loaded(model, tokenizer)


def check_device(device: str | torch.device) -> None:
    """Raise a one-line error for a device this machine does not have."""
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InferAlignerError(f"'{device}' is not a torch device (use cpu, cuda, cuda:1, mps).") from exc
    have = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(where.type, lambda: True)
    if not have():
        raise InferAlignerError(f"Device '{device}' is not available on this machine; use --device cpu.")
    if where.type == "cuda" and where.index is not None and where.index >= torch.cuda.device_count():
        raise InferAlignerError(f"Device '{device}' does not exist: this machine has {torch.cuda.device_count()} GPUs.")


def load_model(
    name_or_path: str | os.PathLike[str] = EMBEDDED_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`load`, as the (model, tokenizer) pair that most callers want."""
    loaded = load(name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return loaded.model, loaded.tokenizer


def load_image_text(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> Loaded:
    """An image-text model (LLaVA and kin) and its processor (left padding, a pad token), in eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = {"trust_remote_code": trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(str(name_or_path), **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(
            str(name_or_path), dtype=dtype, use_safetensors=True, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise InferAlignerError(f"Cannot load image-text model '{name_or_path}': {exc}".splitlines()[0]) from exc
    prepare_tokenizer(processor.tokenizer)
    return Loaded(model.to(device).eval(), processor.tokenizer, processor)
