"""Releasing the loading thread's OpenMP threads before the engine's worker thread runs the model."""

from __future__ import annotations

import os
import time

import pytest
import torch
from test_aligner import make_aligner

from inferaligner.serve import ContinuousEngine
from inferaligner.serve.openmp import release_openmp_threads


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_release_ends_the_calling_threads_pool_and_a_later_operator_starts_one() -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("one OpenMP thread: no pool to end")
    torch.ones(1 << 22).add_(1)  # a parallel region: this thread now has a pool
    before = _threads()
    assert release_openmp_threads()
    deadline = time.time() + 5
    while _threads() >= before and time.time() < deadline:
        time.sleep(0.01)
    assert _threads() <= before - (torch.get_num_threads() - 1)
    assert torch.equal(torch.ones(1 << 22).add_(1), torch.full((1 << 22,), 2.0))  # operators still run
    assert release_openmp_threads()  # and the pool they started can be ended again


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_starting_an_engine_ends_the_starting_threads_pool() -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("one OpenMP thread: no pool to end")
    engine = ContinuousEngine(make_aligner(), max_batch=2)
    torch.ones(1 << 22).add_(1)
    before = _threads()
    engine.start()  # one worker thread more, this thread's pool ended
    try:
        time.sleep(0.1)
        assert _threads() <= before + 1 - (torch.get_num_threads() - 1)
    finally:
        engine.stop()
