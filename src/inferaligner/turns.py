"""Which prompt tokens the gate reads: the text of each user and system turn, found in the token ids themselves.

The gate judges the request, not its wrapping. A prompt is split into *segments*, one per turn the gate reads (each
user turn, the system turn) plus any text outside a turn (a raw completion prompt is one such segment); the chat
template's own tokens (turn headers, turn ends, the whitespace around them) and the assistant's earlier answers are
read by nobody. The gate scores each segment on its own, so a system message, earlier turns or padding cannot
dilute the request: they only reach it through attention, as in any forward pass.

`TurnFormat.of(tokenizer)` learns, once, how the tokenizer's chat template marks turns, by rendering a sentinel text
in each role: a role's header is the run of tokens from the special token that opens the turn up to the text, and
the turn end is the run from the text to the next special token. Only special tokens can start a header, and text
from users never holds one (`prompts.defuse_special_tokens`), so nobody can fake a turn boundary by typing it.
A template without special tokens (or no template) gives no format: the whole prompt is then one segment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.prompts import chat_token_ids

READ_ROLES = ("user", "system")
"""The roles whose text the gate reads; the assistant's turns (earlier answers) are not read."""

_SENTINEL = "Zqxvbrtlkm"
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TurnFormat:
    """How a chat template marks turns in token ids: each role's header (starting with a special token, trailing
    whitespace left out) and the ids of the tokens that end a turn."""

    headers: dict[str, tuple[int, ...]]
    end: tuple[int, ...]
    specials: frozenset[int]
    tokenizer: PreTrainedTokenizerBase = field(repr=False, compare=False)
    _blank: dict[int, bool] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> TurnFormat | None:
        """The format of this tokenizer's chat template, or `None` when turns cannot be told apart in its ids
        (no template, or one whose turns are not opened by special tokens). Cached on the tokenizer."""
        cached = getattr(tokenizer, "_inferaligner_turns", False)
        if cached is not False:
            return cached
        found = _learn(tokenizer)
        with contextlib.suppress(AttributeError):  # a tokenizer that takes no new attributes: learn again
            tokenizer._inferaligner_turns = found  # type: ignore[attr-defined]
        return found

    def _is_blank(self, token: int) -> bool:
        if token not in self._blank:
            self._blank[token] = not self.tokenizer.decode([token]).strip()
        return self._blank[token]

    def _header_at(self, ids: Sequence[int], start: int) -> str | None:
        for role, header in sorted(self.headers.items(), key=lambda item: -len(item[1])):
            if tuple(ids[start : start + len(header)]) == header:
                return role
        return None

    def segments(self, ids: Sequence[int], roles: Sequence[str] = READ_ROLES) -> list[int]:
        """For each token: 0 when the gate does not read it, else the 1-based number of the segment it belongs to
        (a turn of one of `roles`, or a run of text outside any turn)."""
        out = [0] * len(ids)
        count, position, inside = 0, 0, None  # inside: the role of the open turn, or None between turns
        open_segment = 0
        while position < len(ids):
            token = ids[position]
            role = self._header_at(ids, position) if token in self.specials else None
            if role is not None:  # a turn opens: skip its header and the blank tokens after it
                position += len(self.headers[role])
                while position < len(ids) and self._is_blank(ids[position]):
                    position += 1
                inside, open_segment = role, 0
                continue
            if inside is not None and tuple(ids[position : position + len(self.end)]) == self.end:
                position += len(self.end)
                inside, open_segment = None, 0
                continue
            if token in self.specials or (open_segment == 0 and self._is_blank(token)):
                position += 1  # template tokens, and the blanks between turns, are never read
                continue
            if inside is None or inside in roles:
                if open_segment == 0:
                    count += 1
                    open_segment = count
                out[position] = open_segment
            position += 1
        return out


def _learn(tokenizer: PreTrainedTokenizerBase) -> TurnFormat | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    specials = special_ids(tokenizer)
    for back in (1, 2):
        spans = {role: _role_span(tokenizer, role, specials, back) for role in _ROLES}
        found = {role: span for role, span in spans.items() if span is not None}
        if "user" not in found or not found["user"][1]:
            return None
        if "system" in found and found["system"][0] == found["user"][0]:
            del found["system"]  # a template that writes the system text into the user turn: read with it
        headers = {role: header for role, (header, _) in found.items()}
        # A header must tell its role: where two coincide (both just "<|end_header_id|>"), take each back to the
        # special token before it, which brings the role's name in.
        if len(set(headers.values())) == len(headers):
            return TurnFormat(headers, found["user"][1], specials, tokenizer)
    return None


def special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The ids of the tokenizer's special tokens (its named ones and every added token marked special)."""
    return frozenset(
        {int(i) for i in getattr(tokenizer, "all_special_ids", ())}
        | {int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    )


def _role_span(
    tokenizer: PreTrainedTokenizerBase, role: str, specials: frozenset[int], back: int = 1
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The header (from the `back`-th special token before the text, trailing blanks left out) and the turn end
    (up to and including the first special token after the text) of a sentinel turn of `role`."""
    before = [{"role": "user", "content": "Hello"}] if role == "assistant" else []
    after = [{"role": "user", "content": "Hello"}] if role == "system" else []
    messages = [*before, {"role": role, "content": _SENTINEL}, *after]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that takes no turn of this role
        return None
    where = text.find(_SENTINEL)
    if where < 0 or not getattr(tokenizer, "is_fast", False):
        return None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if a < where + len(_SENTINEL) and b > where]
    if not inside:
        return None
    first, last = inside[0], inside[-1]
    start, seen = first, 0
    while start > 0 and seen < back:
        start -= 1
        if ids[start] in specials:
            seen += 1
    if seen < back:
        return None
    header = list(ids[start:first])
    while header and not tokenizer.decode([header[-1]]).strip():
        header.pop()
    stop = last + 1
    while stop < len(ids) and ids[stop] not in specials:
        stop += 1
    if stop >= len(ids):
        return None
    return tuple(header), tuple(ids[last + 1 : stop + 1])


def segment_tensor(rows: Sequence[Sequence[int]], width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-token segment numbers of several prompts, left-padded with 0 to `width` columns: [rows, width]."""
    out = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            out[index, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
    return out.to(device)


def prompt_segments(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sequence[int]], *, chat: bool = True
) -> list[list[int]]:
    """The segments of each prompt (token ids): chat prompts split by `TurnFormat`, others (`chat=False`, or a
    tokenizer whose turns cannot be told apart) one segment of every non-special token."""
    turns = TurnFormat.of(tokenizer) if chat else None
    if turns is not None:
        return [turns.segments(row) for row in rows]
    specials = special_ids(tokenizer)
    return [[0 if token in specials else 1 for token in row] for row in rows]


def prompt_turns(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], *, chat: bool = True) -> list[list[int]]:
    """The token ids of each segment of one prompt (`prompt_segments`), in order: what the gate reads."""
    segments = prompt_segments(tokenizer, [ids], chat=chat)[0]
    turns: list[list[int]] = [[] for _ in range(max(segments, default=0))]
    for token, segment in zip(ids, segments, strict=True):
        if segment:
            turns[segment - 1].append(int(token))
    return turns


def chat_opening(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens every one-turn chat prompt starts with (the template's default system turn, if any, and the user
    turn's header; without a template, the fallback format's "User:"): the longest common start of two rendered
    chats."""
    first, second = (chat_token_ids(tokenizer, [{"role": "user", "content": text}]) for text in ("Hi", "Bye"))
    common = 0
    while common < min(len(first), len(second)) and first[common] == second[common]:
        common += 1
    return first[:common]
