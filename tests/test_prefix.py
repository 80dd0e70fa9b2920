"""The prefix cache: a request prefills only what follows the longest prefix the server ran before (the chat
template's opening, system messages, earlier turns and their answers), and answers the same."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from test_continuous import OTHER, alone_ids, assert_as_if_alone, run_jobs, slow_model  # noqa: F401 (a fixture)
from test_serve import HARMFUL, HARMLESS, make_aligner
from tiny import tiny_model, tiny_tokenizer

from inferaligner.aligner import InferAligner
from inferaligner.inflight import TurnRows
from inferaligner.prompts import chat_token_ids
from inferaligner.reader import RequestReader
from inferaligner.serve import ContinuousEngine, continuous
from inferaligner.serve.engine import Done, Failed, Job
from inferaligner.serve.prefix import MISS, PrefixTree, batch_cache
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
    assert sizes == [2]  # admitted together: one row over the opening's cache, one prompt prefilled whole
    assert_as_if_alone(with_system, system, HARMLESS)
    assert_as_if_alone(harmful, aligner, HARMFUL)


def test_a_long_prompt_is_prefilled_apart_from_short_ones_admitted_with_it() -> None:
    aligner = make_aligner()
    engine = ContinuousEngine(aligner, max_batch=4, batch_wait_s=0.5)
    widths = prefill_widths(aligner)
    texts = [HARMLESS, OTHER, "Count with me: " + " ".join(str(i) for i in range(60))]
    prompts = [aligner.encode([text])["input_ids"][0].tolist() for text in texts]
    jobs, sizes = submitted_together(engine, prompts)
    assert sizes == [3]  # admitted together, joined together
    opening = len(chat_opening(aligner.tokenizer))
    # After the opening's two runs: the two short prompts in one pass (padded to the longer), then the long one.
    assert widths[2:] == [max(map(len, prompts[:2])) - opening, len(prompts[2]) - opening]
    for job, text in zip(jobs, texts, strict=True):
        assert_as_if_alone(job, aligner, text)


@pytest.mark.parametrize("texts", [(HARMFUL, HARMLESS), (HARMLESS,)])
def test_requests_that_fail_over_a_cached_prefix_are_retried_whole(texts, monkeypatch) -> None:
    aligner = make_aligner()

    def failing(hits):  # type: ignore[no-untyped-def]
        if any(hit.length for hit in hits):
            raise RuntimeError("out of memory")  # every prefill over a cached prefix fails
        return batch_cache(hits)

    monkeypatch.setattr(continuous, "batch_cache", failing)
    engine = ContinuousEngine(aligner, max_batch=4, batch_wait_s=0.5)
    widths = prefill_widths(aligner)
    prompts = [aligner.encode([text])["input_ids"][0].tolist() for text in texts]
    jobs, sizes = submitted_together(engine, prompts)
    assert sizes[: len(texts)] == list(range(1, len(texts) + 1))  # one request at a time after the failure
    assert engine.tree is not None and sorted(widths[-len(texts) :]) == sorted(map(len, prompts))  # each whole
    for job, prompt in zip(jobs, texts, strict=True):
        assert_as_if_alone(job, aligner, prompt)


@pytest.mark.parametrize("failing", ["rendered", "run"])
def test_an_opening_that_cannot_be_rendered_or_run_leaves_the_cache_to_learn_from_requests(
    failing, monkeypatch
) -> None:
    aligner = InferAligner(tiny_model("llama", sharp=True), tiny_tokenizer(), mode="off")

    def broken(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("the template wants a system turn" if failing == "rendered" else "out of memory")

    if failing == "rendered":
        monkeypatch.setattr(continuous, "chat_opening", broken)
    else:
        monkeypatch.setattr(ContinuousEngine, "_run_opening", broken)
    engine = ContinuousEngine(aligner, max_batch=2, batch_wait_s=0.0)
    jobs, _ = asyncio.run(run_jobs(engine, aligner, (HARMLESS, 6), [(OTHER, 6, 0.0)]))
    assert engine.tree is not None and engine.tree.stats.lookups == 2
    assert jobs[1].cached_tokens == len(chat_opening(aligner.tokenizer))  # learnt from the first request
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


def kv_of(ids: list[int]) -> torch.Tensor:
    """Stand-in keys and values that say which token each position holds: [layers 2, 2, heads 1, tokens, dim 1]."""
    return torch.tensor(ids, dtype=torch.float32).view(1, 1, 1, -1, 1).expand(2, 2, 1, -1, 1).clone()


def insert(tree: PrefixTree, ids: list[int], **options) -> None:  # type: ignore[no-untyped-def]
    tree.insert(ids, lambda start: kv_of(ids[start:]), **options)


def test_the_tree_finds_the_longest_held_prefix_and_keeps_shared_starts_once() -> None:
    tree = PrefixTree(1 << 20)
    insert(tree, [1, 2, 3, 4, 5])
    insert(tree, [1, 2, 3, 9])  # shares [1, 2, 3]: the first node is split there
    assert tree.nodes == 3 and tree.nbytes == kv_of([1, 2, 3, 4, 5, 9]).numel() * 4
    for ids, length in (([1, 2, 3, 4, 5, 6], 5), ([1, 2, 3, 4, 7], 4), ([1, 2, 3, 9, 8], 4), ([2, 1], 0)):
        hit = tree.match(ids)
        assert hit.length == length
        if length:
            assert hit.kv()[0, 0, 0, :, 0].tolist() == ids[:length]  # the keys of exactly those tokens
    assert tree.match([1, 2, 3, 4, 5]).length == 4  # never the last token: a prefill needs one
    assert tree.match([1, 2, 3, 4, 5, 6], limit=2).length == 2
    assert tree.match([1, 2, 3, 4, 5, 6], steered=True).length == 0  # the steered tree is another tree
    insert(tree, [1, 2, 3, 4, 5, 6, 7])  # only what is new is asked for
    assert tree.nodes == 4 and tree.match([1, 2, 3, 4, 5, 6, 7, 8]).length == 7


def test_gate_outputs_are_kept_where_a_prefill_read_them_and_filled_in_later() -> None:
    tree = PrefixTree(1 << 20)
    insert(tree, [1, 2, 3, 4])  # an answer: no gate-layer outputs
    assert tree.match([1, 2, 3, 4, 5], hidden=True).length == 0
    insert(tree, [1, 2, 3, 4, 5, 6], hidden=torch.arange(6.0)[:, None])
    hit = tree.match([1, 2, 3, 4, 5, 6, 7], hidden=True)
    assert hit.length == 6 and hit.hidden()[:, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_the_least_recently_used_leaves_go_first_when_over_budget() -> None:
    one = kv_of([0]).numel() * 4  # bytes per token here
    tree = PrefixTree(6 * one)
    insert(tree, [1, 2, 3, 4])
    insert(tree, [1, 2, 8, 9])  # split: [1, 2] -> [3, 4], [8, 9]: six tokens, at the budget
    tree.match([1, 2, 3, 4, 5])  # [3, 4] used last
    insert(tree, [7, 7])  # over: the oldest leaf, [8, 9], goes
    assert tree.match([1, 2, 8, 9, 1]).length == 2 and tree.match([1, 2, 3, 4, 5]).length == 4
    assert tree.nbytes == 6 * one and tree.stats.evicted == 1 and tree.nodes == 3  # [1, 2], [3, 4], [7, 7] left
    with pytest.raises(ValueError, match="budget"):
        PrefixTree(0)


def conversation_ids(aligner: InferAligner, messages: list[dict[str, str]]) -> list[int]:
    return chat_token_ids(aligner.tokenizer, messages)


@pytest.mark.parametrize(
    ("options", "replay"),
    [
        ({}, True),  # the gate read inside the prefill at its last token; blocks 1-2 run again for a fired row
        ({"pooling": "mean"}, True),  # it pools over the cached prefix too (its gate-layer outputs are kept)
        ({}, False),  # blocks cannot run again: a fired row is prefilled again under its plan
        ({"pooling": "turns"}, True),  # new turns read alone as extra rows of the prefill; blocks 1-2 again if fired
    ],
)
def test_conversations_over_the_tree_answer_token_for_token_as_uncached(options, replay, monkeypatch) -> None:
    """Two turns of four conversations (system messages, harmful and harmless requests, steered and unsteered rows
    in one batch): the second turn reuses the first turn's prompt and answer, and every answer is the one
    `generate` gives the whole prompt alone."""
    aligner = make_aligner(**options)
    if options.get("pooling") == "turns":
        aligner.gate = dataclasses.replace(aligner.gate, earlier_margin=1e6)  # the request's own read decides
    if not replay:
        monkeypatch.setattr(aligner, "_replay_from", lambda _kwargs: None)
    # A pass that costs this much is never worth running apart: a turns gate reads every new turn inside the prefill.
    engine = ContinuousEngine(aligner, max_batch=8, batch_wait_s=0.5, pass_cost_tokens=10**6)
    turn_one, turn_two, first_ids, seconds = two_turns(engine, forget_turns=True)
    assert engine._turns_in_prefill  # a turns gate's reads stayed inside the prefill
    steered = [job.intervened for job in turn_one + turn_two]
    assert any(steered) and not all(steered)
    for job, ids in zip(turn_one + turn_two, first_ids + seconds, strict=True):
        tokens, logprobs = alone_ids(aligner, ids, 10)
        assert job.tokens == tokens  # and the same numbers, so that a change too small to flip a token shows
        assert [entry.logprob for entry in job.logprobs] == pytest.approx(logprobs, abs=1e-4)
    either_tree = options.get("pooling") == "turns"
    reused = 0
    for job, before, ids in zip(turn_two, turn_one, first_ids, strict=True):
        # The same kind of cache as the first turn: its prompt reused, and the answer tokens fed too, unless the gate
        # pools over every position (answers' gate-layer outputs are not kept). A gate that reads the prompt's own
        # rows starts every row on the unsteered tree: a fired row takes its steered prefix only as far as that tree
        # holds it. A turns gate reads other rows, so a row starts on whichever tree holds more of it.
        if job.intervened == before.intervened and (either_tree or not job.intervened):
            answer = 0 if options.get("pooling") == "mean" else len(before.tokens) - 1
            assert job.cached_tokens >= len(ids) + answer
            reused += 1
        else:  # the chat template's opening at least
            assert job.cached_tokens > 0
    assert reused
    assert engine.tree is not None and engine.tree.stats.hits >= 6


def two_turns(
    engine: ContinuousEngine, *, forget_turns: bool = False
) -> tuple[list[Job], list[Job], list[list[int]], list[list[int]]]:
    """Two turns of five conversations through `engine` (system messages; harmful and harmless requests, submitted
    together): the jobs of each turn and their prompts. The second turn continues the very tokens of the first,
    answer included. `forget_turns`: a turns gate forgets the turns it read before the second turn, so it reads them
    again there as it reads new ones. Also run on a GPU by `bench/gpu_serving.py`."""
    aligner = engine.aligner
    systems = [None, "Be brief.", "Be brief.", "You are a helpful assistant.", None]
    requests = [HARMFUL, HARMLESS, HARMFUL, OTHER, OTHER]
    firsts = [
        ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        for system, text in zip(systems, requests, strict=True)
    ]
    first_ids = [conversation_ids(aligner, messages) for messages in firsts]
    follow_ups = [HARMLESS, HARMFUL, OTHER, HARMFUL, HARMLESS]

    def next_turn(ids: list[int], job: Job, follow_up: str) -> list[int]:
        tail = aligner.tokenizer("<|im_end|>\n<|im_start|>user\n" + follow_up + "<|im_end|>\n<|im_start|>assistant\n")
        return [*ids, *job.tokens, *tail["input_ids"]]

    async def both_turns() -> tuple[list[Job], list[Job], list[list[int]]]:
        loop = asyncio.get_running_loop()
        engine.start()
        try:
            one = await together(engine, loop, first_ids)
            seconds = [next_turn(*args) for args in zip(first_ids, one, follow_ups, strict=True)]
            if forget_turns and aligner.reader is not None:
                aligner.reader._known.clear()
            return one, await together(engine, loop, seconds), seconds
        finally:
            engine.stop()

    turn_one, turn_two, seconds = asyncio.run(both_turns())
    return turn_one, turn_two, first_ids, seconds


async def together(engine: ContinuousEngine, loop: asyncio.AbstractEventLoop, prompts: list[list[int]]) -> list[Job]:
    """Submit these prompts at once (greedy, 10 tokens) to a running engine; the jobs once all are done."""
    jobs = [Job(ids, 10, 0.0, 1.0, [], True, loop, top_logprobs=1) for ids in prompts]
    for job in jobs:
        engine.submit(job)
    for job in jobs:
        while not isinstance(event := await asyncio.wait_for(job.events.get(), 60), Done):
            assert not isinstance(event, Failed), event.message
    return jobs


def test_turns_read_inside_the_prefill_are_the_reads_of_a_pass_of_their_own(monkeypatch) -> None:
    """A turns gate reads each new turn as an extra row of the prefill: no pass of its own runs, and each turn's
    features are the ones the reader's own pass gives (to rounding)."""
    aligner = make_aligner(pooling="turns")
    passes = []
    run = RequestReader._run
    monkeypatch.setattr(RequestReader, "_run", lambda self, turns: passes.append(len(turns)) or run(self, turns))
    engine = ContinuousEngine(aligner, max_batch=8, batch_wait_s=0.5, pass_cost_tokens=10**6)
    turn_one, turn_two, _, _ = two_turns(engine, forget_turns=True)
    assert engine._turns_in_prefill and passes == []
    inside = dict(aligner.reader._known)
    assert len(inside) == 5  # two system messages, three requests (the follow-ups ask them again)
    own = RequestReader(aligner.model, aligner.tokenizer, aligner.layers, aligner.gate.layer)
    for turn, features in zip(inside, own.read([[turn] for turn in inside]), strict=True):
        assert torch.allclose(inside[turn], features[0], atol=1e-4)
    decisions = aligner.gate_decisions(None, turns=[job.turns for job in turn_one + turn_two])
    assert [job.gate.score for job in turn_one + turn_two] == pytest.approx([d.score for d in decisions], abs=1e-3)


def test_a_model_whose_pass_cannot_take_the_turn_rows_reads_them_in_a_pass_of_their_own(monkeypatch) -> None:
    """Where dropping the extra rows fails, the engine reads turns in their own pass from then on: answers as alone."""
    aligner = make_aligner(pooling="turns")
    aligner.gate = dataclasses.replace(aligner.gate, earlier_margin=1e6)

    def fails(*_args: object) -> None:
        raise RuntimeError("this model's blocks take no fewer rows")

    monkeypatch.setattr(TurnRows, "drop", fails)
    engine = ContinuousEngine(aligner, max_batch=8, batch_wait_s=0.5, pass_cost_tokens=10**6)
    turn_one, turn_two, first_ids, seconds = two_turns(engine, forget_turns=True)
    assert not engine._turns_in_prefill
    for job, ids in zip(turn_one + turn_two, first_ids + seconds, strict=True):
        assert job.tokens == alone_ids(aligner, ids, 10)[0]


def test_turns_that_would_widen_the_prefill_more_than_a_pass_costs_are_read_apart() -> None:
    """Extra rows are as wide as the widest new prompt: short turns beside a long uncached prompt are read in a pass
    of their own, a new turn about as long as what the prompt adds to its cached conversation inside the prefill."""
    engine = ContinuousEngine(make_aligner(pooling="turns"), pass_cost_tokens=64)
    long_prompt = Job(list(range(3, 203)), 4, 0.0, 1.0, [], True, None)  # type: ignore[arg-type]
    assert not engine._reads_inside([long_prompt], [MISS], [(5,) * 10, (6,) * 12])  # 2 x 200 > 64 + 22
    assert engine._reads_inside([long_prompt], [MISS], [(5,) * 150])  # 200 <= 64 + 150
    short_prompt = Job(list(range(3, 23)), 4, 0.0, 1.0, [], True, None)  # type: ignore[arg-type]
    assert engine._reads_inside([short_prompt], [MISS], [(5,) * 15])  # 20 <= 64 + 15
    assert not engine._reads_inside([short_prompt, long_prompt], [MISS, MISS], [(5,) * 15])  # the long one: 200


def test_a_pass_cost_of_zero_is_measured_by_the_worker_before_its_first_prefill() -> None:
    """`measure_pass_cost` times the model itself: a positive whole number of tokens; an engine told 0 measures it on
    its worker's thread before its first prefill (taking the default where it measures less), and serves as before."""
    aligner = make_aligner()
    measured = continuous.measure_pass_cost(aligner.model, tokens=32, repeats=1)
    assert isinstance(measured, int) and 1 <= measured <= 100_000
    engine = ContinuousEngine(aligner, pass_cost_tokens=0)
    turn_one, _, first_ids, _ = two_turns(engine)
    assert engine.pass_cost_tokens >= continuous.PASS_COST_TOKENS  # measured, and never below the default
    for job, ids in zip(turn_one, first_ids, strict=True):
        assert job.tokens == alone_ids(aligner, ids, 10)[0]
    with pytest.raises(ValueError, match="pass_cost_tokens must be 0"):
        ContinuousEngine(aligner, pass_cost_tokens=-1)
