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


REFUSAL = "I can't help with that. It could hurt people, so I won't provide it."


def align_inputs(root: Path) -> dict:
    """A tiny target saved as a folder, a JSONL teacher of refusals and an arithmetic domain file with answers."""
    import json

    from tiny import tiny_model, tiny_tokenizer

    from inferaligner.prompts import builtin_prompts

    model = root / "model"
    tiny_model("llama", context=2048).save_pretrained(model)  # room for the long role-play frames
    tiny_tokenizer().save_pretrained(model)
    teacher = root / "teacher.jsonl"
    rows = [{"prompt": p, "answer": REFUSAL} for p in builtin_prompts("harmful", "extraction")[:40]]
    teacher.write_text("".join(json.dumps(r) + "\n" for r in rows))
    domain = root / "domain.jsonl"
    rows = [{"prompt": f"What is {i} plus {2 * i}?", "answer": str(3 * i)} for i in range(20)]
    domain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": model, "teacher": teacher, "domain": domain}


QUICK = {"public": False, "limit": 8, "fit_steps": 3, "scales": (1.0,), "widen": 1, "eval_limit": 4, "min_refusals": 4}
"""`align` options that make a tiny run take seconds."""


@pytest.fixture(scope="session")
def aligned_run(tmp_path_factory):
    """One tiny `align` run (JSONL teacher), shared: its inputs, its folder and its log lines."""
    from inferaligner.align import AlignOptions, align
    from inferaligner.teachers import FileTeacher

    root = tmp_path_factory.mktemp("align")
    inputs = align_inputs(root)
    lines: list[str] = []
    options = AlignOptions(
        model=str(inputs["model"]),
        teacher=FileTeacher(inputs["teacher"]),
        domain=inputs["domain"],
        out=root / "aligned",
        progress=False,
        **QUICK,
    )
    folder = align(options, lines.append)
    return {**inputs, "root": root, "folder": folder, "options": options, "log": lines}
