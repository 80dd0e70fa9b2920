"""Tiny random-weight models and a tiny tokenizer, built locally in milliseconds, for unit tests."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from inferaligner.prompts import builtin_prompts

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 384
ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
)


@functools.cache
def _trained_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = builtin_prompts("harmful", "all") + builtin_prompts("harmless", "all")
    tok.train_from_iterator(text, trainer)
    return tok


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (384 tokens) with a ChatML template, left padding and a pad token."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_trained_tokenizer(),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        padding_side="left",
    )
    if chat_template:
        tokenizer.chat_template = CHATML
    return tokenizer


def tiny_config(model_type: str, layers: int = 4, hidden: int = 32, context: int = 256):
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 4}
    if model_type == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=hidden, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=context, **ids
        )
    kwargs = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=context,
        **ids,
    )
    if model_type == "gpt_neox":
        kwargs.pop("num_key_value_heads")
    if model_type in ("gemma", "gemma2", "gemma3_text", "qwen3"):
        kwargs["head_dim"] = hidden // 4
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", seed: int = 0, sharp: bool = False, **kwargs: int) -> PreTrainedModel:
    """A randomly initialised causal LM of the given family, in eval mode.

    `sharp` scales the output head up so greedy choices have wide margins and do not flip on rounding noise.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kwargs)).eval()
    if sharp:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(40.0)
    return model


IMAGE_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llava_processor(chat_template: bool = True):
    """A LLaVA processor: 28-pixel images (4 patch tokens each) and the tiny tokenizer plus an <image> token."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=14,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=IMAGE_CHAT if chat_template else None,
    )


def tiny_llava(seed: int = 0, sharp: bool = True) -> LlavaForConditionalGeneration:
    """A LLaVA model: a 2-layer CLIP vision tower, a projector and a 4-layer Llama language model."""
    torch.manual_seed(seed)
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB + 1,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=VOCAB, vision_feature_select_strategy="default"
    )
    model = LlavaForConditionalGeneration(config).eval()
    if sharp:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(40.0)
    return model
