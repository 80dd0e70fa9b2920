"""The prefix cache: a tree of token prefixes whose keys and values the server computed before.

Real chat traffic repeats itself at the start: the chat template's opening, a client's system message, and every
earlier turn of a conversation, which comes back with each new turn. `PrefixTree` keeps, for prefixes the server has
run (prompts once prefilled, and prompts with their answers once generated), each layer's keys and values, so that a
request that starts with one prefills only what follows it.

It is a radix tree over token ids: each node holds the keys and values of its own run of tokens, given everything
above it. Two trees share one memory budget: the unsteered one and the steered one. A steered row is steered at
every position, so its cache is that of a steered run of its whole prompt, and only a steered prefix can stand in for
it. A gate read inside the prefill that pools over the whole prompt also needs the prefix's gate-layer outputs; the
unsteered tree keeps them where a prefill read them (`hidden`), and such prefills only take prefixes that have them.
When the tree is over its budget the least recently used leaves are dropped first.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

KeysValues = torch.Tensor  # [layers, 2, kv heads, tokens, head dim]: keys at 0 and values at 1 of dimension 1


@dataclass(eq=False)
class _Node:
    tokens: list[int]
    kv: KeysValues | None  # None for a root
    hidden: torch.Tensor | None  # [tokens, hidden]: the gate layer's outputs, where a prefill read them
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    used: int = 0

    @property
    def nbytes(self) -> int:
        sizes = (t.numel() * t.element_size() for t in (self.kv, self.hidden) if t is not None)
        return sum(sizes)


@dataclass(frozen=True)
class Hit:
    """How much of a prompt a tree holds: the nodes on its path, each with how many of its tokens are used."""

    path: tuple[tuple[_Node, int], ...] = ()

    @property
    def length(self) -> int:
        return sum(used for _, used in self.path)

    def kv(self) -> KeysValues | None:
        """The prefix's keys and values, or `None` for an empty hit."""
        if not self.path:
            return None
        parts = [node.kv[:, :, :, :used] for node, used in self.path if node.kv is not None]
        return torch.cat(parts, dim=3) if len(parts) > 1 else parts[0]

    def hidden(self) -> torch.Tensor | None:
        """The prefix's gate-layer outputs [tokens, hidden], or `None` for an empty hit."""
        if not self.path:
            return None
        parts = [node.hidden[:used] for node, used in self.path if node.hidden is not None]
        return torch.cat(parts) if len(parts) > 1 else parts[0]


MISS = Hit()


@dataclass
class TreeStats:
    """What the tree has served since it was made."""

    lookups: int = 0  # rows prefilled with the tree on
    hits: int = 0  # of those, rows that took a cached prefix
    prompt_tokens: int = 0
    cached_tokens: int = 0
    evicted: int = 0  # nodes dropped for the budget

    def count(self, prompt_tokens: int, cached_tokens: int) -> None:
        """Count one prefilled row: its prompt's length and how much of it came from the tree."""
        self.lookups += 1
        self.hits += bool(cached_tokens)
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens

    @property
    def hit_rate(self) -> float:
        """The share of prompt tokens taken from the tree instead of being prefilled."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class PrefixTree:
    """Keys and values of token prefixes, unsteered and steered, under a memory budget (least recently used leaves
    are dropped first). Used by one thread (the server's worker)."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"A prefix cache needs a budget above 0 bytes, not {budget_bytes}.")
        self.budget_bytes = budget_bytes
        self.roots = {False: _Node([], None, None, None), True: _Node([], None, None, None)}
        self.nbytes = 0
        self.nodes = 0  # kept as a count: the server's metrics read it from another thread
        self.stats = TreeStats()
        self._clock = itertools.count(1)

    def match(
        self, ids: Sequence[int], *, steered: bool = False, hidden: bool = False, limit: int | None = None
    ) -> Hit:
        """The longest prefix of `ids` the tree holds (at most `limit` tokens, and never the last token: a prefill
        needs at least one). `hidden`: only prefixes whose gate-layer outputs are kept."""
        limit = min(len(ids) - 1, limit if limit is not None else len(ids))
        node, position, path = self.roots[steered], 0, []
        while position < limit:
            child = node.children.get(ids[position])
            if child is None or (hidden and child.hidden is None):
                break
            used = _common(child.tokens, ids[position:limit])
            path.append((child, used))
            position += used
            if used < len(child.tokens):
                break
            node = child
        stamp = next(self._clock)
        for child, _ in path:
            child.used = stamp
        return Hit(tuple(path))

    def insert(
        self,
        ids: Sequence[int],
        kv_from: Callable[[int], KeysValues],
        *,
        steered: bool = False,
        hidden: torch.Tensor | None = None,
    ) -> None:
        """Keep the keys and values of `ids` (`kv_from(start)` gives those of `ids[start:]`, computed only for what
        the tree lacks); `hidden` [len(ids), hidden], the gate layer's outputs, fills in nodes that lack them."""
        node, position, stamp = self.roots[steered], 0, next(self._clock)
        while position < len(ids):
            child = node.children.get(ids[position])
            if child is None:
                break
            used = _common(child.tokens, ids[position:])
            if used < len(child.tokens):
                child = self._split(child, used)
            if hidden is not None and child.hidden is None:
                child.hidden = hidden[position : position + used].clone()
                self.nbytes += child.hidden.numel() * child.hidden.element_size()
            child.used = stamp
            node, position = child, position + used
        if position < len(ids):
            kv = kv_from(position).contiguous()
            rest = hidden[position:].clone() if hidden is not None else None
            leaf = _Node(list(ids[position:]), kv, rest, node, used=stamp)
            node.children[leaf.tokens[0]] = leaf
            self.nbytes += leaf.nbytes
            self.nodes += 1
        self._evict()

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node` after its first `at` tokens; returns the new upper part (the lower part keeps the children)."""
        assert node.parent is not None and node.kv is not None and 0 < at < len(node.tokens)
        upper = _Node(
            node.tokens[:at],
            node.kv[:, :, :, :at].clone(),
            node.hidden[:at].clone() if node.hidden is not None else None,
            node.parent,
            {node.tokens[at]: node},
            node.used,
        )
        node.parent.children[upper.tokens[0]] = upper
        self.nodes += 1
        node.tokens, node.kv, node.parent = node.tokens[at:], node.kv[:, :, :, at:].clone(), upper
        node.hidden = node.hidden[at:].clone() if node.hidden is not None else None
        return upper

    def _evict(self) -> None:
        """Drop least recently used leaves (a parent left without children becomes one) until within the budget."""
        if self.nbytes <= self.budget_bytes:
            return
        walked = [n for root in self.roots.values() for n in self._walk(root)]
        order = {id(n): i for i, n in enumerate(walked)}  # ties in `used` go in walk order
        leaves = [(n.used, order[id(n)], n) for n in walked if not n.children and n.parent is not None]
        heapq.heapify(leaves)
        while self.nbytes > self.budget_bytes and leaves:
            _, _, oldest = heapq.heappop(leaves)
            parent = oldest.parent
            assert parent is not None
            del parent.children[oldest.tokens[0]]
            self.nbytes -= oldest.nbytes
            self.nodes -= 1
            self.stats.evicted += 1
            if not parent.children and parent.parent is not None:
                heapq.heappush(leaves, (parent.used, order[id(parent)], parent))

    def _walk(self, node: _Node) -> Iterator[_Node]:
        yield node
        for child in node.children.values():
            yield from self._walk(child)


def _common(tokens: Sequence[int], ids: Sequence[int]) -> int:
    """How many leading tokens the two share."""
    count = 0
    for a, b in zip(tokens, ids, strict=False):
        if a != b:
            break
        count += 1
    return count


def batch_cache(hits: Sequence[Hit]) -> tuple[DynamicCache, int]:
    """A cache holding each row's cached prefix, left-padded to the longest (its width, returned too)."""
    width = max((hit.length for hit in hits), default=0)
    cache = DynamicCache()
    if width == 0:
        return cache, 0
    kvs = [hit.kv() for hit in hits]
    reference = next(kv for kv in kvs if kv is not None)
    rows = []
    for kv in kvs:
        if kv is None:
            kv = reference.new_zeros(*reference.shape[:3], 0, reference.shape[4])
        rows.append(F.pad(kv, (0, 0, width - kv.shape[3], 0)))
    stacked = torch.stack(rows, dim=2)  # [layers, 2, rows, heads, width, dim]
    for layer in range(stacked.shape[0]):
        cache.update(stacked[layer, 0], stacked[layer, 1], layer)
    return cache, width


def batch_hidden(hits: Sequence[Hit], width: int) -> torch.Tensor | None:
    """Each row's cached gate-layer outputs, left-padded to `width` [rows, width, hidden]; `None` when `width` is 0."""
    if width == 0:
        return None
    hiddens = [hit.hidden() for hit in hits]
    reference = next(hidden for hidden in hiddens if hidden is not None)
    rows = []
    for hidden in hiddens:
        hidden = hidden if hidden is not None else reference[:0]
        rows.append(F.pad(hidden, (0, 0, width - len(hidden), 0)))
    return torch.stack(rows)


def row_kv(cache: DynamicCache, row: int, columns: torch.Tensor) -> KeysValues:
    """One row's keys and values at these cache columns, from a batch cache: [layers, 2, heads, columns, dim]."""
    return torch.stack(
        [
            torch.stack([layer.keys[row].index_select(1, columns), layer.values[row].index_select(1, columns)])
            for layer in cache.layers
        ]
    )


def write_rows(cache: DynamicCache, rows: Sequence[int], kvs: Sequence[KeysValues], width: int) -> None:
    """Overwrite, in place, each row's cached prefix (the first `width` columns, left-padded) with `kvs`."""
    for row, kv in zip(rows, kvs, strict=True):
        start = width - kv.shape[3]
        for index, layer in enumerate(cache.layers):
            layer.keys[row, :, start:width] = kv[index, 0]
            layer.values[row, :, start:width] = kv[index, 1]
