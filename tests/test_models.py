from __future__ import annotations

import pytest
import torch
from tiny import ARCHITECTURES, tiny_llava, tiny_model, tiny_tokenizer
from torch import nn

from inferaligner.errors import InferAlignerError
from inferaligner.models import (
    EMBEDDED_MODEL,
    UnsupportedModelError,
    block_hidden,
    decoder_layers,
    embedded_gguf_path,
    load_model,
    model_fingerprint,
    with_block_hidden,
)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_decoder_layers_found_for_every_family(model_type: str) -> None:
    model = tiny_model(model_type, layers=3)
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == 3


def test_decoder_layers_of_llava_are_the_language_models() -> None:
    model = tiny_llava()
    layers = decoder_layers(model)
    assert layers is model.model.language_model.layers
    assert all(not any(layer is v for v in model.model.vision_tower.modules()) for layer in layers)


def test_unknown_family_error_says_how_to_name_layers() -> None:
    model = tiny_model("llama")
    model.model.blocks = model.model.layers
    del model.model.layers
    with pytest.raises(UnsupportedModelError, match="layers_path="):
        decoder_layers(model)
    assert decoder_layers(model, "model.blocks") is model.model.blocks


def test_layers_path_must_name_a_module_list() -> None:
    with pytest.raises(UnsupportedModelError, match="does not name a ModuleList"):
        decoder_layers(tiny_model("llama"), "model.norm")


def test_fingerprint_depends_on_shape_not_weights() -> None:
    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(tiny_model("llama", hidden=64))


def test_block_output_helpers_keep_the_return_type() -> None:
    hidden = torch.zeros(1, 2, 3)
    assert block_hidden((hidden, "cache")) is hidden
    assert with_block_hidden((hidden, "cache"), hidden + 1)[1] == "cache"
    assert torch.equal(with_block_hidden(hidden, hidden + 1), hidden + 1)


def test_load_model_from_a_local_folder(tmp_path) -> None:
    tiny_model("qwen2").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path)
    assert model.config.model_type == "qwen2"
    assert not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


def test_missing_model_gives_a_clear_error(tmp_path) -> None:
    with pytest.raises(InferAlignerError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(InferAlignerError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")


def test_embedded_model_file_is_installed() -> None:
    path = embedded_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_embedded_model_is_converted_once_then_loaded_from_cache(monkeypatch, smollm2) -> None:
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained.__func__

    def refuse_gguf(cls, *args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF file was converted again instead of read from the cache"
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(refuse_gguf))
    model, tokenizer = load_model(EMBEDDED_MODEL)
    assert model.name_or_path == EMBEDDED_MODEL
    assert model.config.num_hidden_layers == 30 and tokenizer.chat_template
