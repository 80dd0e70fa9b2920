"""Timing rounds for the benches: every method once to warm up, then `repeats` rounds with the order rotated by one
each round, so that drift on the machine (other load, clocks, caches) falls on every method alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def synced(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a clock read next times it all."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """`items` starting at position `round_index` (modulo their number), wrapping round."""
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


def timed_rounds(
    methods: Sequence[str], run: Callable[[str], float], repeats: int, warm: Sequence[str] | None = None
) -> dict[str, list[float]]:
    """Each method's times (`run(method)` returns seconds) over `repeats` rotated rounds, after one untimed run of
    each method in `warm` (all of them by default)."""
    for method in methods if warm is None else warm:
        run(method)
    times: dict[str, list[float]] = {method: [] for method in methods}
    for round_index in range(repeats):
        for method in rotated(methods, round_index):
            times[method].append(run(method))
    return times
