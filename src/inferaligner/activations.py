"""Residual-stream activations of each prompt after every decoder block: at its last token, or averaged over it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.capture import capture_layers
from inferaligner.gate import pool
from inferaligner.models import block_hidden, context_length, decoder_layers
from inferaligner.prompts import encode


def prompt_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    pooling: str = "last",
    batch_size: int = 16,
    layers: nn.ModuleList | None = None,
    progress: bool = True,
    desc: str = "activations",
) -> torch.Tensor:
    """Activations `a_l(P)` of shape [prompts, layers, hidden], float32 on the CPU.

    `texts` are already chat-formatted. Layer `l` is the output of decoder block `l` (HF `hidden_states[l + 1]`),
    read at each prompt's last token (`pooling="last"`, the paper) or averaged over its tokens (`"mean"`).
    Prompts are batched by length with left padding.
    """
    layers = layers if layers is not None else decoder_layers(model)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    device = next(model.parameters()).device
    mask = torch.empty(0)

    def read(_layer: int, output: object) -> torch.Tensor:
        return pool(block_hidden(output), mask, pooling).float().cpu()

    rows: list[torch.Tensor] = []
    every = range(len(layers))
    with torch.inference_mode(), capture_layers(layers, every, read) as captured:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            batch = encode(tokenizer, chunk, max_tokens=context_length(model))
            mask = batch["attention_mask"].to(device)
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            rows.append(torch.stack([captured[layer] for layer in every], dim=1))
    stacked = torch.cat(rows)
    result = torch.empty_like(stacked)
    result[torch.tensor(order)] = stacked
    return result
