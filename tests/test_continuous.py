"""Continuous batching: rows join and leave between decoding steps, each answered as if it ran alone."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch
from test_serve import HARMFUL, HARMLESS, make_aligner
from tiny import tiny_model, tiny_tokenizer

from inferaligner.aligner import InferAligner
from inferaligner.serve import BatchEngine, ContinuousEngine, make_engine
from inferaligner.serve.continuous import RunningBatch, choose_tokens
from inferaligner.serve.engine import Done, Failed, Job, TextDelta

OTHER = "Tell me about the moon, in a few words."


def alone(aligner: InferAligner, prompt: str, max_tokens: int) -> tuple[list[int], list[float]]:
    """The tokens `generate` gives this prompt on its own, under its own plan (greedy), and their log-probabilities."""
    return alone_ids(aligner, aligner.encode([prompt])["input_ids"][0].tolist(), max_tokens)


def alone_ids(aligner: InferAligner, ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """`alone` for a prompt given as token ids."""
    tensor = torch.tensor([ids], device=aligner.device)
    batch = {"input_ids": tensor, "attention_mask": torch.ones_like(tensor)}
    out = aligner.generate(
        **batch,
        plan=aligner.decide(**batch),
        max_new_tokens=max_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, len(ids) :].tolist()[: len(out.scores)]  # alone: its steps only
    if new and new[-1] == aligner.tokenizer.eos_token_id:
        new = new[:-1]
    logprobs = [float(torch.log_softmax(step[0], -1)[token]) for step, token in zip(out.scores, new, strict=False)]
    return new, logprobs


def assert_as_if_alone(job: Job, aligner: InferAligner, prompt: str) -> None:
    """Same tokens, and the same log-probability for each (so that a change too small to flip a token shows)."""
    tokens, logprobs = alone(aligner, prompt, job.max_tokens)
    assert job.tokens == tokens
    assert [entry.logprob for entry in job.logprobs] == pytest.approx(logprobs[: len(tokens)], abs=1e-4)


async def run_jobs(engine, aligner: InferAligner, first: tuple[str, int], later: list[tuple[str, int, float]]):
    """Start `first`, wait for its first text, then submit `later` (prompt, max tokens, temperature) while it runs;
    returns every job once all are done, and the running-batch sizes the engine reported."""
    loop = asyncio.get_running_loop()
    sizes: list[int] = []
    engine.on_batch.append(sizes.append)

    def job(prompt: str, max_tokens: int, temperature: float = 0.0) -> Job:
        ids = aligner.encode([prompt])["input_ids"][0].tolist()
        return Job(ids, max_tokens, temperature, 0.5, [], True, loop, top_logprobs=5)

    engine.start()
    try:
        head = job(*first)
        engine.submit(head)
        while not isinstance(await head.events.get(), TextDelta):
            pass
        jobs = [head, *(job(*spec) for spec in later)]
        for each in jobs[1:]:
            engine.submit(each)
        for each in jobs:
            while not isinstance(event := await asyncio.wait_for(each.events.get(), 60), Done):
                assert not isinstance(event, Failed), event.message
    finally:
        engine.stop()
    return jobs, sizes


@pytest.fixture
def slow_model(monkeypatch):
    """Slows every forward pass of an aligner's model, so that requests sent after the first token still find the
    first request running."""

    def slow(aligner: InferAligner) -> InferAligner:
        forward = aligner.model.forward

        def slowed(*args, **kwargs):
            time.sleep(0.01)
            return forward(*args, **kwargs)

        monkeypatch.setattr(aligner.model, "forward", slowed)
        return aligner

    return slow


@pytest.mark.parametrize("options", [{}, {"gate_layer": 0, "steer_layers": [1, 2, 3]}])  # blocks run again / not
def test_requests_joining_mid_generation_answer_as_if_alone(options, slow_model) -> None:
    aligner = slow_model(make_aligner(**options))
    engine = ContinuousEngine(aligner, max_batch=4, batch_wait_s=0.0)
    later = [(HARMFUL, 20, 0.0), (OTHER, 16, 0.0), (HARMLESS, 10, 1.0)]
    jobs, sizes = asyncio.run(run_jobs(engine, aligner, (HARMLESS, 40), later))
    assert sizes == [1, 4]  # the three joined the first request's batch while it ran
    head, harmful, other, sampled = jobs
    assert harmful.intervened and not head.intervened and not other.intervened
    for job, prompt in ((head, HARMLESS), (harmful, HARMFUL), (other, OTHER)):
        assert_as_if_alone(job, aligner, prompt)
        assert job.finish_reason == ("length" if len(job.tokens) == job.max_tokens else "stop")
    assert head.finish_reason == "length" and len(sampled.tokens) <= 10  # a sampled row beside them changes nothing
    # Its log-probabilities are the model's own, before temperature and top-p: finite for every alternative.
    assert sampled.logprobs and all(math.isfinite(p) for e in sampled.logprobs for _, p in (*e.top, ("", e.logprob)))


@pytest.mark.parametrize("family", ["gpt2", "qwen3", "gpt_neox"])
def test_other_families_join_mid_generation_unchanged(family, slow_model) -> None:
    aligner = slow_model(InferAligner(tiny_model(family, sharp=True), tiny_tokenizer(), mode="off"))
    jobs, sizes = asyncio.run(
        run_jobs(
            ContinuousEngine(aligner, max_batch=4, batch_wait_s=0.0),
            aligner,
            (HARMLESS, 30),
            [(OTHER, 12, 0.0), (HARMFUL, 12, 0.0)],
        )
    )
    assert sizes == [1, 3]
    for job, prompt in zip(jobs, (HARMLESS, OTHER, HARMFUL), strict=True):
        assert_as_if_alone(job, aligner, prompt)


def test_a_bad_request_fails_alone_and_the_engine_serves_on() -> None:
    aligner = make_aligner()
    engine = ContinuousEngine(aligner, max_batch=4, batch_wait_s=0.5)

    async def scenario() -> tuple[list[list[object]], list[int]]:
        loop = asyncio.get_running_loop()
        good = aligner.encode([HARMLESS])["input_ids"][0].tolist()
        bad = [len(aligner.tokenizer) + 1000]  # no such token: its prefill fails
        jobs = [Job(ids, 8, 0.0, 1.0, [], True, loop) for ids in (good, bad, good)]
        engine.start()
        events: list[list[object]] = [[] for _ in jobs]
        try:
            for job in jobs:
                engine.submit(job)
            for job, seen in zip(jobs, events, strict=True):
                while not isinstance(event := await asyncio.wait_for(job.events.get(), 60), Done):
                    seen.append(event)
        finally:
            engine.stop()
        return events, [len(job.tokens) for job in jobs]

    events, lengths = asyncio.run(scenario())
    assert any(isinstance(e, Failed) for e in events[1]) and lengths[1] == 0
    for seen, length in zip(events[::2], lengths[::2], strict=True):
        assert not any(isinstance(e, Failed) for e in seen) and length > 0


def test_a_group_that_fails_before_joining_is_retried_one_request_at_a_time(monkeypatch) -> None:
    import inferaligner.serve.continuous as continuous

    aligner = make_aligner()
    choose = continuous.choose_tokens

    def fragile(logits, jobs, top_k):  # type: ignore[no-untyped-def]
        if any(job.max_tokens == 7 for job in jobs):  # the marked request breaks its group's token choice
            raise RuntimeError("probability tensor contains inf or nan")
        return choose(logits, jobs, top_k)

    monkeypatch.setattr(continuous, "choose_tokens", fragile)
    engine = ContinuousEngine(aligner, max_batch=4, batch_wait_s=0.5)

    async def scenario() -> list[Job]:
        loop = asyncio.get_running_loop()
        jobs = [
            Job(aligner.encode([prompt])["input_ids"][0].tolist(), tokens, 0.0, 1.0, [], True, loop)
            for prompt, tokens in ((HARMLESS, 12), (OTHER, 7), (HARMFUL, 12))
        ]
        engine.start()
        try:
            for job in jobs:
                engine.submit(job)
            for job in jobs:
                while not isinstance(await asyncio.wait_for(job.events.get(), 60), Done):
                    pass
        finally:
            engine.stop()
        return jobs

    good, bad, steered = asyncio.run(scenario())
    assert bad.finish_reason == "stop" and not bad.tokens  # failed alone
    for job, prompt in ((good, HARMLESS), (steered, HARMFUL)):
        assert job.tokens == alone(aligner, prompt, 12)[0]  # prefilled once: two rows would write twice


@pytest.mark.parametrize("prefix_cache", [False, True])
@pytest.mark.parametrize(
    ("options", "replay", "passes"),
    [({"gate_layer": 0, "steer_layers": [1, 2, 3]}, True, (1, 1)), ({}, True, (1, 1)), ({}, False, (2, 1))],
)
def test_the_gate_is_read_inside_the_prefill(options, replay, passes, prefix_cache, monkeypatch) -> None:
    """One pass over each prompt: steered layers above the gate are steered in it, and blocks from a steered layer
    at or below the gate to the gate run again inside it; where they cannot, a fired row is prefilled a second
    time, under its plan, and answers the same. With the prefix cache, each engine first runs the chat template's
    opening twice (unsteered and steered), once for all requests."""
    aligner = make_aligner(**options)
    if not replay:
        monkeypatch.setattr(aligner, "_replay_from", lambda _kwargs: None)
    prompts: list[int] = []

    def count(_module, args, kwargs):  # type: ignore[no-untyped-def]
        if (args[0] if args else kwargs["hidden_states"]).shape[1] > 1:
            prompts.append(1)

    handle = aligner.layers[0].register_forward_pre_hook(count, with_kwargs=True)
    try:
        for prompt, expected in zip((HARMFUL, HARMLESS), passes, strict=True):
            before = len(prompts)
            engine = ContinuousEngine(aligner, max_batch=2, batch_wait_s=0.0, prefix_cache_mb=64 if prefix_cache else 0)
            jobs, _ = asyncio.run(run_jobs(engine, aligner, (prompt, 4), []))
            assert len(prompts) - before == expected + (2 if prefix_cache else 0)
            assert jobs[0].intervened == (prompt == HARMFUL)
            assert jobs[0].tokens == alone(aligner, prompt, 4)[0]
    finally:
        handle.remove()


def test_running_batch_joins_left_padded_and_trims_padding_when_rows_leave() -> None:
    from transformers import DynamicCache

    def batch(lengths: list[int], width: int) -> RunningBatch:
        cache = DynamicCache()
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        for row, length in enumerate(lengths):
            mask[row, width - length :] = 1
        keys = torch.randn(len(lengths), 2, width, 4) * mask[:, None, :, None]
        cache.update(keys, keys.clone(), 0)
        return RunningBatch(cache, mask)

    running, joining = batch([3], 3), batch([5, 2], 5)
    before = running.cache.layers[0].keys.clone()
    running.join(joining)
    assert running.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert torch.equal(running.cache.layers[0].keys[0, :, 2:], before[0]) and running.cache.layers[0].keys.shape[2] == 5
    running.keep([0, 2])  # the only row without padding leaves: two leading columns are padding in both others
    assert running.mask.tolist() == [[1, 1, 1], [0, 1, 1]] and running.cache.layers[0].keys.shape == (2, 2, 3, 4)
    assert torch.equal(running.cache.layers[0].keys[0], before[0])
    running.keep([])
    assert running.mask.shape[0] == 0


def test_choose_tokens_keeps_greedy_rows_greedy_beside_sampled_ones() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    loop = asyncio.new_event_loop()
    try:
        jobs = [Job([1], 4, t, p, [], True, loop) for t, p in ((0.0, 1.0), (1.0, 1e-6), (0.7, 0.9))]
    finally:
        loop.close()
    tokens = choose_tokens(logits, jobs, top_k=50)
    assert tokens[:2] == logits[:2].argmax(-1).tolist()  # greedy, and a nucleus of one token
    probs, order = torch.sort(torch.softmax(logits[2] / 0.7, -1), descending=True)
    nucleus = set(order[(probs.cumsum(0) - probs) <= 0.9].tolist())
    draws = {choose_tokens(logits, jobs, top_k=50)[2] for _ in range(50)}
    assert draws <= nucleus and len(draws) > 1  # sampled, within the top-p set


def test_make_engine_falls_back_to_whole_batches_where_continuous_cannot_serve() -> None:
    assert isinstance(make_engine(make_aligner()), ContinuousEngine)
    assert isinstance(make_engine(make_aligner(), "batch"), BatchEngine)
    teacher = tiny_model("llama", sharp=True, seed=1)
    assert isinstance(make_engine(make_aligner(mode="aligned", aligned_model=teacher)), BatchEngine)
    sliding = InferAligner(tiny_model("gemma3_text"), tiny_tokenizer(), mode="off")
    assert isinstance(make_engine(sliding), BatchEngine)
    with pytest.raises(ValueError, match="Unknown scheduler"):
        make_engine(make_aligner(), "fifo")
    penalised = make_aligner()
    penalised.model.generation_config.repetition_penalty = 1.3  # `generate` applies it; this scheduler would not
    assert isinstance(make_engine(penalised), BatchEngine)
