"""The gate's read of a prompt: each turn on its own, as a lone request, so nothing around it can move the verdict.

A `"turns"` gate does not read a turn where it stands: a system message, earlier turns or a completion frame would
shift its activations through attention (measured: 5 to 17 points of XSTest's fire rate under one system message),
and the gate would judge the wrapping as much as the request. `RequestReader` reads each turn's own tokens
(`inferaligner.turns`) after the chat template's opening, exactly as if the turn were a bare one-turn chat, up to
the gate layer, and returns the mean block output over those tokens. The opening's keys and values are computed once
and reused, and each turn's features are kept by their token ids (a bounded cache), so a conversation's earlier
turns are read once. This read is a short pass of its own (the turns' tokens, blocks 0 to the gate layer) before
generation; generation then runs with the plan known, steered from its first token where the gate fired. The server
reads new turns inside its prefill instead, as extra rows of that pass (`inflight.TurnRows`), keeping their features
here (`remember`).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.capture import capture_layers
from inferaligner.models import block_hidden, has_sliding_window
from inferaligner.prompts import pad_rows, position_ids
from inferaligner.turns import chat_opening


class RequestReader:
    """Features of turns read as lone requests: the mean output of block `layer` (or of each of several blocks) over
    each turn's tokens, placed after the chat template's opening. Not thread-safe: callers hold the aligner's lock."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layers: nn.ModuleList,
        layer: int | Sequence[int],
        *,
        cache_size: int = 4096,
        batch_tokens: int = 4096,
    ) -> None:
        self.model, self.tokenizer, self.layers = model, tokenizer, layers
        self.read_layers = [layer] if isinstance(layer, int) else sorted(set(layer))
        self.layer = self.read_layers[-1]  # the pass stops after it
        self.cache_size, self.batch_tokens = cache_size, batch_tokens
        self.opening = chat_opening(tokenizer)
        self._known: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._opening_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        # A plain key/value cache can hold the opening for every row; sliding-window layers cannot, so such models
        # run the opening with each batch instead.
        self._reuse_opening = bool(self.opening) and not has_sliding_window(model)
        parameters = inspect.signature(type(model).forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def read(self, prompts: Sequence[Sequence[Sequence[int]]]) -> list[torch.Tensor]:
        """For each prompt (its turns' token ids, in order) the features of its turns: [turns, hidden], float32 on
        the CPU, or [turns, layers, hidden] when several layers are read (no rows for a prompt without turns)."""
        found, unread = self.split(prompts)
        for batch in self._batches(unread):
            for turn, features in zip(batch, self._run(batch), strict=True):
                found[turn] = features
                self._remember(turn, features)
        return self.gather(prompts, found)

    def gather(
        self, prompts: Sequence[Sequence[Sequence[int]]], found: dict[tuple[int, ...], torch.Tensor]
    ) -> list[torch.Tensor]:
        """Each prompt's turns' features from `found` (every turn's), shaped as `read` returns them."""
        shape = (0, int(self.model.config.get_text_config().hidden_size))
        if len(self.read_layers) > 1:
            shape = (0, len(self.read_layers), shape[1])
        return [
            torch.stack([found[tuple(t)] for t in turns if t]) if any(turns) else torch.zeros(shape)
            for turns in prompts
        ]

    def split(
        self, prompts: Sequence[Sequence[Sequence[int]]]
    ) -> tuple[dict[tuple[int, ...], torch.Tensor], list[tuple[int, ...]]]:
        """The features already known of these prompts' turns, and the turns not read yet (each once, in order)."""
        wanted = list(dict.fromkeys(tuple(turn) for turns in prompts for turn in turns if turn))
        known = {turn: self._known[turn] for turn in wanted if turn in self._known}
        for turn in known:
            self._known.move_to_end(turn)
        return known, [turn for turn in wanted if turn not in known]

    def remember(self, turn: Sequence[int], features: torch.Tensor) -> None:
        """Keep a turn's features (read elsewhere, as `read` reads them), the oldest dropped beyond `cache_size`."""
        self._remember(tuple(turn), features.float().cpu())

    def _remember(self, turn: tuple[int, ...], features: torch.Tensor) -> None:
        self._known[turn] = features
        while len(self._known) > self.cache_size:
            self._known.popitem(last=False)

    def _batches(self, turns: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
        """Turns grouped by length, at most `batch_tokens` padded tokens a batch."""
        batches: list[list[tuple[int, ...]]] = []
        for turn in sorted(turns, key=len):
            if batches and (len(batches[-1]) + 1) * len(turn) <= self.batch_tokens:
                batches[-1].append(turn)
            else:
                batches.append([turn])
        return batches

    def _run(self, turns: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """One pass over these turns (after the opening), stopped at the gate layer; the mean over each turn."""
        device = self.device
        skip = len(self.opening) if self._reuse_opening else 0
        rows = [list(turn) for turn in turns] if self._reuse_opening else [self.opening + list(turn) for turn in turns]
        inputs = pad_rows(self.tokenizer, rows, device)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        own = torch.zeros_like(mask)  # the turn's own tokens: the last len(turn) positions of each row
        for index, turn in enumerate(turns):
            own[index, -len(turn) :] = 1
        kwargs: dict[str, object] = {"use_cache": self._reuse_opening}
        if self._reuse_opening:
            mask = torch.cat([mask.new_ones(len(rows), skip), mask], dim=1)
            kwargs[self._cache_name] = self._opening_for(len(rows))
        positions = position_ids(mask)[:, skip:]

        def read(_layer: int, output: object) -> torch.Tensor:
            return own_means(block_hidden(output), own)

        with torch.inference_mode(), capture_layers(self.layers, self.read_layers, read, stop=True) as captured:
            self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        if len(self.read_layers) == 1:
            return list(captured[self.layer])
        return list(torch.stack([captured[layer] for layer in self.read_layers], dim=1))

    def _opening_for(self, rows: int) -> DynamicCache:
        """A fresh cache holding the opening's keys and values (blocks 0 to the gate layer) for `rows` rows."""
        if self._opening_cache is None:
            tokens = torch.tensor([self.opening], device=self.device)
            cache = DynamicCache()
            with torch.inference_mode(), capture_layers(self.layers, [self.layer], _nothing, stop=True):
                self.model(
                    input_ids=tokens,
                    attention_mask=torch.ones_like(tokens),
                    position_ids=position_ids(torch.ones_like(tokens)),
                    use_cache=True,
                    **{self._cache_name: cache},
                )
            self._opening_cache = [(layer.keys, layer.values) for layer in cache.layers[: self.layer + 1]]
        cache = DynamicCache()
        for index, (keys, values) in enumerate(self._opening_cache):
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), index)
        return cache


def own_means(hidden: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Each row's mean block output [rows, hidden] over the positions `own` [rows, positions] marks, in float32, on
    the CPU: a turn's features."""
    weights = own.to(device=hidden.device, dtype=torch.float32)[:, :, None]
    return ((hidden.float() * weights).sum(1) / weights.sum(1)).cpu()


def _nothing(_layer: int, _output: object) -> None:
    """Read nothing: the pass only fills the cache."""
