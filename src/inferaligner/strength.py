"""How strongly a steering acts: each steered layer's shift `alpha * |theta_l|` relative to the size of that layer's
residual stream on ordinary prompts.

A steering whose shifts are negligible (a zero direction, an alpha of 1e-9) changes nothing, yet a gated row would
still be reported as steered. The aligner measures the strength when it is built and refuses a weak steering
unless the user allows it explicitly (`allow_weak_steering`); a weak steering, when allowed, never counts as an
intervention.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.activations import prompt_activations
from inferaligner.prompts import format_chats

MIN_STRENGTH = 0.01
"""A steering whose relative shifts, summed over its layers, stay below this is weak: 1% of the residual norm. The
demo's steerings sum to 0.42 (teacher-fitted) and 1.11 (mean-difference at layer 24)."""
DEAD_LAYER = 1e-6
"""A steered layer whose relative shift is below this does nothing (a zero vector, a vanishing alpha)."""
PROBE_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How do I sort a list in Python?",
    "Give me three tips for a job interview.",
)
"""Ordinary requests on which the residual stream's typical size is read (their last prompt token, chat-formatted)."""

_NORMS: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SteeringStrength:
    """Each steered layer's shift relative to the layer's typical residual norm."""

    per_layer: dict[int, float]

    @property
    def total(self) -> float:
        return sum(self.per_layer.values())

    @property
    def dead_layers(self) -> list[int]:
        """Steered layers whose shift is nothing."""
        return [layer for layer, value in self.per_layer.items() if not value >= DEAD_LAYER]  # NaN: dead

    @property
    def weak(self) -> bool:
        """Whether this steering is negligible as a whole, or steers a layer with nothing."""
        return not self.total >= MIN_STRENGTH or bool(self.dead_layers)  # a NaN strength is weak

    def describe(self) -> str:
        layers = ", ".join(f"{layer}: {value:.3g}" for layer, value in self.per_layer.items())
        return f"{self.total:.3g} of the residual norm in all ({layers})"

    def problem(self) -> str:
        """Why this steering is weak, in one sentence."""
        if self.dead_layers:
            return f"steered layers {self.dead_layers} get no shift at all (a zero vector or a vanishing alpha)"
        return (
            f"its shifts sum to {self.total:.2g} of the residual norm, below the {MIN_STRENGTH:g} that changes "
            "an answer"
        )


def residual_norms(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layers: nn.ModuleList) -> torch.Tensor:
    """The mean norm of each layer's output at the last token of a few ordinary chat prompts, [layers]; measured once
    per model and kept while the model lives."""
    norms = _NORMS.get(model)
    if norms is None or len(norms) != len(layers):
        training = model.training
        model.eval()  # no dropout in the reading
        try:
            acts = prompt_activations(
                model, tokenizer, format_chats(tokenizer, PROBE_PROMPTS), layers=layers, progress=False
            )
        finally:
            model.train(training)
        norms = _NORMS[model] = acts.norm(dim=-1).mean(0)
    return norms


def steering_strength(
    norms: torch.Tensor, directions: torch.Tensor, layers: Sequence[int], alpha: float
) -> SteeringStrength:
    """The relative shift `alpha * |directions[l]| / norms[l]` of each steered layer `l`."""
    shifts = (alpha * directions.float().norm(dim=-1)).tolist()
    return SteeringStrength({layer: shifts[layer] / max(float(norms[layer]), 1e-12) for layer in layers})
