"""The prefix cache: chat requests prefill only what follows the chat template's opening, and answer the same."""

from __future__ import annotations

import asyncio

import pytest
from test_continuous import OTHER, assert_as_if_alone, run_jobs, slow_model  # noqa: F401 (a fixture)
from test_serve import HARMFUL, HARMLESS, make_aligner
from tiny import tiny_model, tiny_tokenizer

from inferaligner.aligner import InferAligner
from inferaligner.prompts import chat_token_ids
from inferaligner.serve import ContinuousEngine, continuous
from inferaligner.serve.engine import Done, Failed, Job
from inferaligner.serve.prefix import SharedPrefix
from inferaligner.turns import chat_opening


def test_the_opening_is_what_every_chat_prompt_starts_with() -> None:
    for tokenizer in (tiny_tokenizer(), tiny_tokenizer(chat_template=False)):
        opening = chat_opening(tokenizer)
        prompts = [chat_token_ids(tokenizer, [{"role": "user", "content": text}]) for text in (HARMFUL, OTHER)]
        assert opening and all(ids[: len(opening)] == opening for ids in prompts)
        assert prompts[0][len(opening)] != prompts[1][len(opening)]  # the longest common start
    assert tiny_tokenizer().decode(chat_opening(tiny_tokenizer())) == "<|im_start|>user\n"


def prefill_widths(aligner: InferAligner) -> list[int]:
    """Records how many positions each forward pass over more than one token feeds the first block."""
    widths: list[int] = []

    def record(_module, args, kwargs):  # type: ignore[no-untyped-def]
        width = (args[0] if args else kwargs["hidden_states"]).shape[1]
        if width > 1:
            widths.append(width)

    aligner.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    return widths


@pytest.mark.parametrize(
    ("options", "replay"),
    [
        ({}, True),  # steered layers at and above the gate: blocks 1-2 run again for a fired row
        ({"gate_layer": 0, "steer_layers": [1, 2, 3]}, True),  # every steered layer above the gate
        ({}, False),  # blocks cannot run again: a fired row is prefilled again under its plan
        ({"pooling": "mean"}, True),  # the gate pools over the whole prompt, the cached opening included
        ({"mode": "always"}, True),  # every row steered
        ({"mode": "always", "gate": False}, True),  # every row steered, no gate: the opening swapped before the pass
    ],
)
def test_rows_that_skip_the_opening_answer_as_if_alone(options, replay, slow_model, monkeypatch) -> None:  # noqa: F811
    aligner = make_aligner(**{k: v for k, v in options.items() if k != "gate"})
    if options.get("gate") is False:
        aligner = InferAligner(
            aligner.model, aligner.tokenizer, aligned_vectors=aligner.aligned_vectors, settings=aligner.settings
        )
        assert aligner.gate is None
    aligner = slow_model(aligner)
    if not replay:
        monkeypatch.setattr(aligner, "_replay_from", lambda _kwargs: None)
    widths = prefill_widths(aligner)
    engine = ContinuousEngine(aligner, max_batch=4, batch_wait_s=0.0)
    later = [(HARMFUL, 12, 0.0), (OTHER, 12, 0.0), (HARMLESS, 8, 0.0)]
    jobs, sizes = asyncio.run(run_jobs(engine, aligner, (HARMLESS, 24), later))
    built, *prefills = widths[:]  # the engine's passes only (the checks below run the model too)
    # The three joined the first request's batch while it ran (steered, it may have met the loop stop by then).
    assert sizes == [1, 4] or (options.get("mode") == "always" and sizes == [1, 3])
    for job, prompt in zip(jobs, (HARMLESS, HARMFUL, OTHER, HARMLESS), strict=True):
        assert_as_if_alone(job, aligner, prompt)
        alone = aligner.decide(**aligner.encode([prompt]))[0].gate
        if alone is not None:
            assert job.gate.score == pytest.approx(alone.score, abs=1e-4)  # read over the whole prompt
    assert jobs[1].intervened and (jobs[0].intervened == (options.get("mode") == "always"))
    opening = len(chat_opening(aligner.tokenizer))
    longest = max(len(job.prompt_ids) for job in jobs)
    assert built == opening and prefills[0] == opening  # the opening, run once unsteered and once steered
    assert prefills[1:] and all(width <= longest - opening for width in prefills[1:])


def submitted_together(engine: ContinuousEngine, prompts: list[list[int]]) -> tuple[list[Job], list[int]]:
    """Submit these prompts at once (greedy, 10 tokens) to an engine that waits for company; returns the jobs once
    done and the running-batch sizes the engine reported."""
    sizes: list[int] = []
    engine.on_batch.append(sizes.append)

    async def scenario() -> list[Job]:
        loop = asyncio.get_running_loop()
        jobs = [Job(ids, 10, 0.0, 1.0, [], True, loop, top_logprobs=1) for ids in prompts]
        for job in jobs:
            engine.submit(job)
        engine.start()
        try:
            for job in jobs:
                while not isinstance(event := await asyncio.wait_for(job.events.get(), 60), Done):
                    assert not isinstance(event, Failed), event.message
        finally:
            engine.stop()
        return jobs

    return asyncio.run(scenario()), sizes


def test_prompts_without_the_opening_are_prefilled_whole_beside_those_with_it() -> None:
    aligner = make_aligner()
    system = aligner.variant(system="Be brief.")  # its prompts open with a system turn
    system.gate = aligner.gate
    own = system.encode([HARMLESS])["input_ids"][0].tolist()
    assert own[: len(chat_opening(aligner.tokenizer))] != chat_opening(aligner.tokenizer)
    chat = aligner.encode([HARMFUL])["input_ids"][0].tolist()
    engine = ContinuousEngine(aligner, max_batch=4, batch_wait_s=0.5)
    (with_system, harmful), sizes = submitted_together(engine, [own, chat])
    assert sizes == [2]  # admitted together: one group over the opening's cache, one prompt prefilled whole
    assert_as_if_alone(with_system, system, HARMLESS)
    assert_as_if_alone(harmful, aligner, HARMFUL)


@pytest.mark.parametrize("texts", [(HARMFUL, HARMLESS), (HARMLESS,)])
def test_requests_that_fail_over_the_cached_opening_are_retried_whole(texts, monkeypatch) -> None:
    aligner = make_aligner()

    def failing(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("out of memory")

    monkeypatch.setattr(SharedPrefix, "cache", failing)  # every prefill over the opening fails
    engine = ContinuousEngine(aligner, max_batch=4, batch_wait_s=0.5)
    widths = prefill_widths(aligner)
    prompts = [aligner.encode([text])["input_ids"][0].tolist() for text in texts]
    jobs, sizes = submitted_together(engine, prompts)
    assert sizes[: len(texts)] == list(range(1, len(texts) + 1))  # one request at a time after the failure
    assert engine.prefix_cache and widths[-len(texts) :] == [len(ids) for ids in prompts]  # each prefilled whole
    for job, prompt in zip(jobs, texts, strict=True):
        assert_as_if_alone(job, aligner, prompt)


@pytest.mark.parametrize("failing", ["rendered", "run"])
def test_an_opening_that_cannot_be_rendered_or_run_turns_the_prefix_cache_off(failing, monkeypatch) -> None:
    aligner = InferAligner(tiny_model("llama", sharp=True), tiny_tokenizer(), mode="off")

    def broken(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("the template wants a system turn" if failing == "rendered" else "out of memory")

    if failing == "rendered":
        monkeypatch.setattr(continuous, "chat_opening", broken)
    else:
        monkeypatch.setattr(SharedPrefix, "build", broken)
    engine = ContinuousEngine(aligner, max_batch=2, batch_wait_s=0.0)
    jobs, _ = asyncio.run(run_jobs(engine, aligner, (HARMLESS, 6), [(OTHER, 6, 0.0)]))
    assert not engine.prefix_cache
    for job, prompt in zip(jobs, (HARMLESS, OTHER), strict=True):
        assert_as_if_alone(job, aligner, prompt)


def test_a_lone_request_that_failed_whole_is_not_tried_again(monkeypatch) -> None:
    aligner = make_aligner()
    bad = len(aligner.tokenizer) + 1000  # no such token: its prefill fails
    tried: list[int] = []
    forward = aligner.model.forward

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        if bool((kwargs["input_ids"] == bad).any()):
            tried.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(aligner.model, "forward", counted)
    engine = ContinuousEngine(aligner, max_batch=4, batch_wait_s=0.0)
    loop = asyncio.new_event_loop()
    try:
        job = Job([bad, bad], 4, 0.0, 1.0, [], True, loop)
        engine.start()
        engine.submit(job)

        async def events() -> list[object]:
            seen = []
            while not isinstance(event := await asyncio.wait_for(job.events.get(), 60), Done):
                seen.append(event)
            return seen

        seen = loop.run_until_complete(events())
    finally:
        engine.stop()
        loop.close()
    assert any(isinstance(event, Failed) for event in seen) and tried == [1]  # not a chat prompt: prefilled once
