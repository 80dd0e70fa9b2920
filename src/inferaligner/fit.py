"""Teacher-fitted steering vectors: the aligned model shows the answer, the frozen target learns where to go.

The paper's steering vectors are the aligned model's mean activation differences. On small or strongly fine-tuned
targets they do not transfer (docs/results/efficacy.md). Here the aligned model supplies its *answers* instead: for
prompts `P` with the aligned model's greedy answers `y` (its refusals of harmful requests, and optionally its answers to
benign look-alikes), one vector `θ_l` per steered layer is fitted on the frozen target so that the steered target
reproduces them, by teacher forcing:

    min_θ  Σ_P  −log p(y | P; x_l ← x_l + θ_l for l ∈ L, every position)

Only `θ` trains. Inference is unchanged: `x_l += α·g·θ_l`, with `α = 1` the fitted strength.

The blocks below the lowest steered layer never see `θ`, so their outputs are computed once per example and
cached; during fitting those blocks are stood in for by the cache, and a step runs only the upper blocks. With
right padding and causal attention, a real token's states do not depend on what else is in its batch.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.aligner import InferAligner
from inferaligner.capture import capture_layers
from inferaligner.errors import InferAlignerError, PromptError
from inferaligner.judges import has_refusal_phrase
from inferaligner.models import block_hidden, decoder_layers, text_config, with_block_hidden
from inferaligner.prompts import ROLEPLAY_FRAMES, format_chats
from inferaligner.strength import residual_norms
from inferaligner.vectors import TEACHER_FITTED, Provenance, SafetyVectors, data_hash

DEFAULT_FIT_LAYERS = (0.4, 0.53, 0.67, 0.8)
"""Steered layers as fractions of the depth (layers 12, 16, 20, 24 of SmolLM2's 30)."""


@dataclass(frozen=True)
class TeacherExample:
    """A prompt and the answer the steered target should give; `harmful` says which side of the data it is on."""

    prompt: str
    answer: str
    harmful: bool = True


@dataclass(frozen=True)
class FitSettings:
    """How the vectors are fitted (the defaults were chosen by measurement, docs/results/efficacy.md)."""

    layers: tuple[int, ...] | None = None  # None: DEFAULT_FIT_LAYERS of the model's depth
    steps: int = 80
    learning_rate: float = 0.05
    batch_size: int = 8
    max_answer_tokens: int = 64
    seed: int = 0
    cache_lower_blocks: bool = True  # run the blocks below the lowest steered layer once, not at every step

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.max_answer_tokens < 1:
            raise InferAlignerError("steps, batch size and answer length must be at least 1.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InferAlignerError(f"The learning rate must be a positive number, not {self.learning_rate}.")


@dataclass
class FitResult:
    """The fitted vectors and the training curve."""

    vectors: SafetyVectors
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def default_layers(num_layers: int) -> tuple[int, ...]:
    """`DEFAULT_FIT_LAYERS` for a model of this depth, first and last block excluded."""
    picked = sorted({min(num_layers - 2, max(1, round(f * num_layers))) for f in DEFAULT_FIT_LAYERS})
    return tuple(picked)


def with_roleplay(examples: Sequence[TeacherExample], frames: Sequence[str] = ROLEPLAY_FRAMES) -> list[TeacherExample]:
    """`examples` plus each harmful one put into a role-play frame (`frames`, by default `prompts.ROLEPLAY_FRAMES`,
    in turn) with the same answer, so the vectors also refuse requests dressed up as fiction or "developer mode"."""
    if not frames:
        raise PromptError("Give at least one role-play frame (or leave role-play out).")
    harmful = [e for e in examples if e.harmful]
    framed = [
        TeacherExample(frames[i % len(frames)].format(prompt=e.prompt), e.answer, True) for i, e in enumerate(harmful)
    ]
    return [*examples, *framed]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def cut_after_refusal(answer: str) -> str:
    """The answer up to the end of its opening refusal: from the start through the first sentence that carries a
    refusal phrase and any refusal sentences right after it. What follows ("If you're worried about X, I can help
    you ...") is dropped: a small target copies such offers into places where they read as help. An answer with no
    refusal sentence comes back unchanged."""
    sentences = _SENTENCE_END.split(answer.strip())
    refusing = [has_refusal_phrase(s) for s in sentences]
    if True not in refusing:
        return answer
    end = refusing.index(True)
    while end + 1 < len(sentences) and refusing[end + 1]:
        end += 1
    return " ".join(sentences[: end + 1])


def refusals_only(examples: Sequence[TeacherExample]) -> list[TeacherExample]:
    """`examples` with each harmful one's answer cut after its opening refusal (`cut_after_refusal`)."""
    return [replace(e, answer=cut_after_refusal(e.answer)) if e.harmful else e for e in examples]


def teacher_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    keep: Callable[[str], bool] | None = None,
    harmful: bool = True,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = True,
) -> list[TeacherExample]:
    """The aligned model's greedy answers to `prompts`, as examples; `keep` filters them (e.g. refusals only)."""
    teacher = InferAligner(model, tokenizer, mode="off", system=system)
    answers = teacher.complete(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    return [TeacherExample(a.prompt, a.text, harmful) for a in answers if a.text and (keep is None or keep(a.text))]


def fit_steering_vectors(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TeacherExample],
    settings: FitSettings = FitSettings(),
    *,
    teacher_name: str = "",
    system: str | None = None,
    layers_path: str | None = None,
    progress: bool = True,
) -> FitResult:
    """Fit one steering vector per layer in `settings.layers` on the frozen `model` (see the module docstring).

    The model's weights are not changed; hooks are removed before returning.
    """
    if not any(e.harmful for e in examples):
        raise PromptError("Fitting needs at least one harmful prompt with the aligned model's refusal.")
    blocks = decoder_layers(model, layers_path)
    layer_ids = settings.layers if settings.layers is not None else default_layers(len(blocks))
    bad = [i for i in layer_ids if not 0 <= i < len(blocks)]
    if bad:
        raise InferAlignerError(f"Fit layers {bad} are outside 0..{len(blocks) - 1}.")
    started = time.perf_counter()
    device = next(model.parameters()).device
    hidden = text_config(model).hidden_size
    theta = nn.Parameter(torch.zeros(len(layer_ids), hidden, device=device, dtype=torch.float32))
    batches = _training_batches(tokenizer, examples, settings.max_answer_tokens, system)

    def hook_for(index: int) -> Callable[..., object]:
        def hook(_module: nn.Module, _args: object, output: object) -> object:
            states = block_hidden(output)
            return with_block_hidden(output, states + theta[index].to(states.dtype))

        return hook

    low = min(layer_ids)
    prefix = (
        _LowerBlocks(model, blocks, low, batches, tokenizer.pad_token_id or 0)
        if (settings.cache_lower_blocks and low > 0)
        else None
    )
    handles = [blocks[layer].register_forward_hook(hook_for(i)) for i, layer in enumerate(layer_ids)]
    optimiser = torch.optim.Adam([theta], lr=settings.learning_rate)
    draws = _draws(len(batches), settings.batch_size, random.Random(settings.seed))
    losses: list[float] = []
    with _frozen(model):
        if prefix is not None:
            prefix.stand_in()
        try:
            for _ in tqdm(range(settings.steps), desc="fitting steering vectors", disable=not progress, unit="step"):
                chosen = next(draws)
                inputs = _collate([batches[i] for i in chosen], tokenizer.pad_token_id or 0, device)
                if prefix is not None:
                    prefix.select(chosen, inputs["input_ids"].shape[1])
                loss = teacher_forcing_loss(model, inputs)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
        finally:
            if prefix is not None:
                prefix.restore()
            for handle in handles:
                handle.remove()
    full = torch.zeros(len(blocks), hidden)
    full[list(layer_ids)] = theta.detach().float().cpu()
    vectors = _as_vectors(model, full, examples, teacher_name)
    vectors = replace(vectors, residual_norms=residual_norms(model, tokenizer, blocks))
    return FitResult(vectors, losses, time.perf_counter() - started)


@contextmanager
def _frozen(model: PreTrainedModel) -> Iterator[None]:
    """The model in eval mode with every weight frozen; both restored on exit."""
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(model.parameters(), requires, strict=True):
            parameter.requires_grad_(flag)
        model.train(was_training)


def _draws(count: int, batch_size: int, generator: random.Random) -> Iterator[list[int]]:
    """Batches of example indices without end: each pass over the examples shuffled anew, batches carried across."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(count))
            generator.shuffle(fresh)
            order += fresh
        chosen, order = order[:batch_size], order[batch_size:]
        yield chosen


class _LowerBlocks:
    """The outputs of the blocks below `low` for every example, computed once; while standing in, those blocks are
    replaced by stubs that hand the cached output of the selected examples to block `low`."""

    def __init__(
        self,
        model: PreTrainedModel,
        blocks: nn.ModuleList,
        low: int,
        batches: Sequence[tuple[list[int], list[int]]],
        pad: int,
        chunk: int = 16,
    ) -> None:
        self.blocks, self.low = blocks, low
        self.originals = list(blocks[:low])
        self.current: torch.Tensor | None = None  # the selected examples' cached outputs, handed to block `low`
        self.returns_tuple = False
        device = next(model.parameters()).device
        self.states: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, len(batches), chunk):
                pairs = batches[start : start + chunk]
                inputs = _collate(pairs, pad, device)
                with capture_layers(blocks, [low - 1], _whole_output, stop=True) as captured:
                    model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                output = captured[low - 1]
                self.returns_tuple = isinstance(output, tuple)
                hidden = block_hidden(output)
                self.states += [hidden[row, : len(p) + len(a)].clone() for row, (p, a) in enumerate(pairs)]

    def select(self, chosen: Sequence[int], width: int) -> None:
        """Make the cached outputs of these examples (right-padded to `width`) what the stubs hand on."""
        rows = [self.states[i] for i in chosen]
        padded = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
        for row, states in enumerate(rows):
            padded[row, : len(states)] = states
        self.current = padded

    def stand_in(self) -> None:
        for index in range(self.low):
            self.blocks[index] = _Stub(self.originals[index], self, last=index == self.low - 1)

    def restore(self) -> None:
        for index, original in enumerate(self.originals):
            self.blocks[index] = original


class _Stub(nn.Module):
    """A decoder block below the steered layers while fitting: the last one returns the cached output, the others
    pass their input on. Attributes the model reads from its blocks come from the real block."""

    def __init__(self, original: nn.Module, cache: _LowerBlocks, last: bool) -> None:
        super().__init__()
        self.__dict__["_original"], self.__dict__["_cache"], self.__dict__["_last"] = original, cache, last

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> object:
        cache: _LowerBlocks = self.__dict__["_cache"]
        out = cache.current if self.__dict__["_last"] else hidden_states
        return (out,) if cache.returns_tuple else out

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)


def _training_batches(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[TeacherExample], max_answer: int, system: str | None
) -> list[tuple[list[int], list[int]]]:
    """Per example: the chat-formatted prompt's ids and the answer's ids (ending with the end-of-turn token)."""
    if not examples:
        raise PromptError("Fitting needs at least one teacher example.")
    texts = format_chats(tokenizer, [e.prompt for e in examples], system)
    add_special = not getattr(tokenizer, "chat_template", None)
    end = tokenizer.eos_token_id
    pairs = []
    for text, example in zip(texts, examples, strict=True):
        prompt = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"][:max_answer]
        if end is not None and len(answer) < max_answer:
            answer = [*answer, end]
        pairs.append((prompt, answer))
    return pairs


def teacher_forcing_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean cross-entropy of the model's next-token predictions on a collated batch's answer tokens."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), inputs["labels"][:, 1:].flatten(), ignore_index=-100
    )


def _collate(pairs: Sequence[tuple[list[int], list[int]]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids, mask and labels (-100 on prompt and padding: the loss covers the answer only)."""
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(pairs):
        sequence = prompt + answer
        ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt) : len(sequence)] = torch.tensor(answer)
        mask[row, : len(sequence)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _as_vectors(
    model: PreTrainedModel, full: torch.Tensor, examples: Sequence[TeacherExample], teacher: str
) -> SafetyVectors:
    norms = full.norm(dim=-1)
    directions = torch.where(norms[:, None] > 0, full / norms.clamp_min(1e-12)[:, None], torch.zeros_like(full))
    provenance = Provenance.of(
        model,
        full.shape[0],
        sum(e.harmful for e in examples),
        sum(not e.harmful for e in examples),
        data_hash([e.prompt for e in examples], [e.answer for e in examples]),
        normalisation="raw",
        method=TEACHER_FITTED,
        teacher=teacher,
    )
    return SafetyVectors(directions, norms, torch.zeros(full.shape[0]), provenance)


def _whole_output(_layer: int, output: object) -> object:
    """A block's output as it returns it (a tensor, or a tuple with extras)."""
    return output
