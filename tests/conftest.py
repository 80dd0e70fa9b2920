"""Shared fixtures: tiny models, a tiny tokenizer, the embedded model and the third-party data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _single_thread_determinism() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data, or a clean skip where it is absent."""
    if not DATA.is_dir():
        pytest.skip(f"third-party evaluation data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted once and cached)."""
    from inferaligner.models import load_model

    return load_model()
