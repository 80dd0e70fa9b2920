from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch
from tiny import tiny_tokenizer

from inferaligner.errors import PromptError, PromptTooLongError
from inferaligner.prompts import (
    builtin_prompts,
    builtin_records,
    encode,
    format_chat,
    load_prompts,
    position_ids,
)


@pytest.mark.parametrize("kind, size", [("harmful", 160), ("harmless", 160), ("everyday", 320)])
def test_builtin_sets_have_fixed_splits_and_categories(kind: str, size: int) -> None:
    records = builtin_records(kind)
    assert len(records) == size
    assert Counter(r.split for r in records) == {"extraction": size // 2 - 16, "calibration": size // 2 + 16}
    categories = Counter(r.category for r in records)
    assert len(categories) == size // 16 and set(categories.values()) == {16}
    if kind != "everyday":
        assert {"violence", "weapons", "cybercrime", "fraud", "drugs", "self_harm", "hate", "privacy"} <= set(
            categories
        )
    assert len({r.prompt for r in records}) == size
    assert len(builtin_prompts(kind, "calibration")) == size // 2 + 16


@pytest.mark.parametrize("kind, size", [("harmful-styles", 294), ("lookalike", 258)])
def test_style_and_lookalike_sets_are_split_and_distinct(kind: str, size: int) -> None:
    records = builtin_records(kind)
    assert len(records) == size and len({r.prompt for r in records}) == size
    splits = Counter(r.split for r in records)
    assert abs(splits["extraction"] - splits["calibration"]) <= 2 and len({r.category for r in records}) >= 7
    others = {p for k in ("harmful", "harmless", "everyday") for p in builtin_prompts(k, "all")}  # type: ignore[arg-type]
    assert not {r.prompt for r in records} & others
    for category in {r.category for r in records}:  # every kind is both built from and held out
        assert {r.split for r in records if r.category == category} == {"extraction", "calibration"}, category


def test_roleplay_sets_frame_their_base_set_and_keep_its_splits() -> None:
    from inferaligner.prompts import OVERRIDE_FRAMES, ROLEPLAY_FRAMES, gate_sets

    harmful, everyday = builtin_records("harmful-roleplay"), builtin_records("everyday-roleplay")
    for framed, base in ((harmful, builtin_records("harmful")), (everyday, builtin_records("everyday"))):
        assert [r.split for r in framed] == [r.split for r in base]
        assert all(b.prompt in f.prompt and f.prompt != b.prompt for f, b in zip(framed, base, strict=True))
    overrides = [ROLEPLAY_FRAMES[i].split("{prompt}")[0] for i in OVERRIDE_FRAMES]
    assert any(r.prompt.startswith(tuple(overrides)) for r in harmful)
    assert not any(r.prompt.startswith(tuple(overrides)) for r in everyday)  # rule-breaking frames are attacks
    harmful_side, harmless_side = gate_sets("calibration")
    assert builtin_prompts("harmful-styles", "calibration")[0] in harmful_side
    assert builtin_prompts("lookalike", "calibration")[0] in harmless_side
    assert not set(harmful_side) & set(harmless_side)


def test_every_frame_holds_the_request_once() -> None:
    from inferaligner.prompts import OVERRIDE_FRAMES, ROLEPLAY_FRAMES

    for frame in ROLEPLAY_FRAMES:
        assert frame.count("{prompt}") == 1 and "REQ" in frame.format(prompt="REQ")  # no stray braces
    assert set(OVERRIDE_FRAMES) < set(range(len(ROLEPLAY_FRAMES)))


def test_harmless_set_matches_harmful_topics() -> None:
    harmful = Counter(r.category for r in builtin_records("harmful"))
    harmless = Counter(r.category for r in builtin_records("harmless"))
    assert harmful == harmless
    assert not set(builtin_prompts("harmful", "all")) & set(builtin_prompts("harmless", "all"))
    assert not set(builtin_prompts("everyday", "all")) & set(builtin_prompts("harmless", "all"))
    assert not {r.category for r in builtin_records("everyday")} & set(harmful)


def test_builtin_spec_and_errors() -> None:
    assert load_prompts("builtin:harmless:calibration") == builtin_prompts("harmless", "calibration")
    assert len(load_prompts("builtin:harmful", limit=5)) == 5
    with pytest.raises(PromptError, match="Unknown split"):
        load_prompts("builtin:harmful:train")
    with pytest.raises(PromptError, match="Unknown built-in set"):
        load_prompts("builtin:nasty")


def test_loaders_read_every_format(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first\n\n  second  \n")
    (tmp_path / "b.jsonl").write_text('{"goal": "x1"}\n\n{"goal": "x2"}\n')
    (tmp_path / "c.json").write_text(json.dumps(["j1", "j2"]))
    (tmp_path / "d.csv").write_text('id,question\n1,q1\n2,"q, 2"\n')
    (tmp_path / "e.jsonl").write_text('{"text": "t", "mine": "m1"}\n')
    assert load_prompts(tmp_path / "a.txt") == ["first", "second"]
    assert load_prompts(tmp_path / "b.jsonl") == ["x1", "x2"]
    assert load_prompts(tmp_path / "c.json") == ["j1", "j2"]
    assert load_prompts(tmp_path / "d.csv") == ["q1", "q, 2"]
    assert load_prompts(tmp_path / "e.jsonl", column="mine") == ["m1"]


def test_empty_file_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(PromptError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "empty.csv").write_text("prompt\n")
    with pytest.raises(PromptError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.csv")


def test_bad_column_lists_the_columns(tmp_path) -> None:
    (tmp_path / "d.csv").write_text("id,body\n1,hello\n")
    with pytest.raises(PromptError, match=r"its columns are: id, body\. Pass --column"):
        load_prompts(tmp_path / "d.csv")
    with pytest.raises(PromptError, match="no column 'missing'"):
        load_prompts(tmp_path / "d.csv", column="missing")


def test_malformed_files(tmp_path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(PromptError, match=r"bad\.jsonl:2 is not valid JSON"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(PromptError, match=r"use a \.txt, \.jsonl"):
        load_prompts(tmp_path / "x.parquet")
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(tmp_path / "nothing.txt")


def test_format_chat_uses_the_template() -> None:
    text = format_chat(tiny_tokenizer(), "Hi there", system="Be brief.")
    assert (
        text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )


def test_format_chat_falls_back_with_a_warning(caplog) -> None:
    tokenizer = tiny_tokenizer(chat_template=False)
    tokenizer.name_or_path = "no-template-test"
    with caplog.at_level(logging.WARNING):
        assert format_chat(tokenizer, "Hi") == "User: Hi\nAssistant:"
        format_chat(tokenizer, "Again")
    assert sum("no chat template" in r.message for r in caplog.records) == 1


def test_encode_left_pads_and_counts_positions_over_real_tokens() -> None:
    tokenizer = tiny_tokenizer()
    batch = encode(tokenizer, ["short", "a much longer prompt than the first"])
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].all()
    assert batch["position_ids"][0, -1] == mask[0].sum() - 1
    assert torch.equal(position_ids(torch.tensor([[0, 0, 1, 1]])), torch.tensor([[0, 0, 0, 1]]))


def test_encode_rejects_prompts_longer_than_the_context() -> None:
    tokenizer = tiny_tokenizer()
    with pytest.raises(PromptTooLongError, match="more than the model's context of 16"):
        encode(tokenizer, ["word " * 40], max_tokens=16)
    with pytest.raises(PromptTooLongError, match="plus 100 new tokens"):
        encode(tokenizer, ["word"], max_tokens=50, reserve=100)
