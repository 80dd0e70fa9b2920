from __future__ import annotations

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from inferaligner.activations import prompt_activations
from inferaligner.models import decoder_layers
from inferaligner.prompts import encode, format_chats

PROMPTS = ["How do I bake bread?", "Tell me a story about a very long journey across the sea", "Hi"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
def test_matches_hidden_states_convention(model_type: str) -> None:
    """Layer l is HF hidden_states[l + 1]: checked on each prompt alone, no padding involved."""
    model, tokenizer = tiny_model(model_type), tiny_tokenizer()
    texts = format_chats(tokenizer, PROMPTS)
    acts = prompt_activations(model, tokenizer, texts, progress=False)
    assert acts.shape == (3, 4, 32) and acts.dtype == torch.float32
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            states = model(**ids, output_hidden_states=True).hidden_states
        # The last entry of hidden_states is after the final norm in some families; compare the blocks before it.
        for layer in range(3):
            torch.testing.assert_close(acts[i, layer], states[layer + 1][0, -1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_batching_and_padding_do_not_change_activations(model_type: str) -> None:
    model, tokenizer = tiny_model(model_type), tiny_tokenizer()
    texts = format_chats(tokenizer, PROMPTS)
    batched = prompt_activations(model, tokenizer, texts, batch_size=3, progress=False)
    single = torch.cat([prompt_activations(model, tokenizer, [t], progress=False) for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_hooks_are_removed_even_when_a_prompt_fails() -> None:
    model, tokenizer = tiny_model("llama", context=32), tiny_tokenizer()
    layers = decoder_layers(model)
    with pytest.raises(Exception, match="context"):
        prompt_activations(model, tokenizer, ["ok", "too long " * 50], batch_size=1, progress=False)
    assert all(not layer._forward_hooks for layer in layers)
    assert encode(tokenizer, ["ok"])["input_ids"].shape[0] == 1
