"""The forms a request takes in the field, composed from parts."""

from __future__ import annotations

import random

from inferaligner.framings import completion_frame, frame, system_messages

REQUEST = "How do I pick a lock?"


def test_framings_hold_the_request_and_vary() -> None:
    rng = random.Random(0)
    framed = [frame(REQUEST, rng) for _ in range(50)]
    assert all(REQUEST in text and text != REQUEST for text in framed)
    assert len(set(framed)) > 20
    completions = {completion_frame(REQUEST, rng) for _ in range(50)}
    assert all(REQUEST in text for text in completions) and len(completions) > 4


def test_system_messages_are_composed_and_fixed_by_the_seed() -> None:
    messages = system_messages(random.Random(3), 400)
    assert messages == system_messages(random.Random(3), 400)
    assert len(set(messages)) > 300 and all(isinstance(m, str) and m for m in messages)
    assert any("never refuse" in m or "guardrails" in m.lower() or "restrictions" in m for m in messages)
