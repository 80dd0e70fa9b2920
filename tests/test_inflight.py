"""One-pass gating: the gate read inside generate's prefill gives the tokens of the two-pass path, in fewer passes."""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager

import pytest
import torch
from test_aligner import GEN, PROMPTS, make_aligner
from transformers import TextIteratorStreamer

from inferaligner.aligner import InferAligner
from inferaligner.prompts import position_ids


def _prompt_passes(aligner: InferAligner, width: int, block: int = 0):
    """Counts the runs of `block` over the whole prompt (at block 0: gate passes and prefills)."""
    calls: list[int] = []

    def count(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == width:
            calls.append(1)

    @contextmanager
    def counting():
        handle = aligner.layers[block].register_forward_pre_hook(count, with_kwargs=True)
        try:
            yield calls
        finally:
            handle.remove()

    return counting()


def _two_pass(aligner: InferAligner, batch, **kwargs):
    return aligner.generate(**batch, plan=aligner.decide(**batch), **kwargs)


def _one_pass_aligner(model_type: str = "llama", **kwargs) -> InferAligner:
    """Gate at block 0, steering blocks 1-3: every steered layer lies above the gate."""
    return make_aligner(model_type, steer_layers=[1, 2, 3], gate_layer=0, **kwargs)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_one_pass_gives_the_two_pass_tokens_in_one_pass(model_type: str) -> None:
    aligner = _one_pass_aligner(model_type)
    assert aligner.gating == "one pass"
    batch = aligner.encode(PROMPTS)
    width = batch["input_ids"].shape[1]
    expected = _two_pass(aligner, batch, **GEN, do_sample=False)
    with _prompt_passes(aligner, width) as passes:
        output, plan = aligner.generate(**batch, **GEN, do_sample=False, return_plan=True)
    assert len(passes) == 1
    assert 0 < sum(row.gate.fired for row in plan) < len(plan)
    assert plan == aligner.decide(**batch)
    assert torch.equal(output, expected)
    plain = aligner.model.generate(**batch, **GEN, do_sample=False, pad_token_id=aligner.tokenizer.pad_token_id)
    for row, planned in enumerate(plan):
        assert torch.equal(output[row], plain[row]) != planned.gate.fired
    assert all(not layer._forward_hooks for layer in aligner.layers)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "qwen3"])
def test_steered_layers_below_the_gate_run_again_in_the_same_pass_only_when_a_row_fires(model_type: str) -> None:
    """Blocks 1-2 run a second time, steered, inside the one prefill; the cache holds one run's keys and values."""
    aligner = make_aligner(model_type, steer_layers=[1, 2], gate_layer=2)
    assert aligner.gating == "one pass, blocks 1-2 again when a row fires"
    batch = aligner.encode(PROMPTS)
    width = batch["input_ids"].shape[1]
    expected = _two_pass(aligner, batch, **GEN, do_sample=False)
    with (
        _prompt_passes(aligner, width) as passes,
        _prompt_passes(aligner, width, block=1) as replayed,
        _prompt_passes(aligner, width, block=3) as above,
    ):
        output, plan = aligner.generate(**batch, **GEN, do_sample=False, return_plan=True)
    assert 0 < sum(row.gate.fired for row in plan) < len(plan)
    assert (len(passes), len(replayed), len(above)) == (1, 2, 1)
    assert torch.equal(output, expected)
    plain = aligner.model.generate(**batch, **GEN, do_sample=False, pad_token_id=aligner.tokenizer.pad_token_id)
    for row, planned in enumerate(plan):
        assert torch.equal(output[row], plain[row]) != planned.gate.fired
    quiet = variant_with_bias(aligner, 1e9)
    with _prompt_passes(quiet, width) as passes, _prompt_passes(quiet, width, block=1) as replayed:
        output = quiet.generate(**batch, **GEN, do_sample=False)
    assert (len(passes), len(replayed)) == (1, 1)
    assert torch.equal(output, aligner.model.generate(**batch, **GEN, do_sample=False, pad_token_id=0))
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in aligner.layers)


@pytest.mark.parametrize(
    ("model_type", "options"),
    [
        ("gemma3_text", {}),
        ("llama", {"output_hidden_states": True, "return_dict_in_generate": True}),
        ("llama", {"generation_config": "hidden states"}),
    ],
)
def test_fired_batches_run_again_where_blocks_cannot_be_replayed(model_type: str, options) -> None:
    """Sliding-window caches drop old entries, and collected hidden states (asked for in the call or in a generation
    config) would gain entries: a fired batch stops at the gate layer and is generated again with the plan."""
    aligner = make_aligner(model_type, steer_layers=[1, 2], gate_layer=2)
    if not options:
        assert aligner.gating == "one pass unless a row fires"
    if options.get("generation_config"):
        config = copy.deepcopy(aligner.model.generation_config)
        config.update(output_hidden_states=True, return_dict_in_generate=True)
        options = {"generation_config": config}
    batch = aligner.encode(PROMPTS)
    expected = _two_pass(aligner, batch, **GEN, do_sample=False, **options)
    with _prompt_passes(aligner, batch["input_ids"].shape[1]) as passes:
        output = aligner.generate(**batch, **GEN, do_sample=False, **options)
    assert len(passes) == 2  # stopped at the gate layer, then generated with the plan
    if isinstance(output, torch.Tensor):
        assert torch.equal(output, expected)
    else:
        assert torch.equal(output.sequences, expected.sequences)
        assert len(output.hidden_states[0]) == len(expected.hidden_states[0]) == len(aligner.layers) + 1


def test_mode_always_runs_the_blocks_below_the_gate_twice_in_one_pass() -> None:
    aligner = make_aligner("llama", mode="always", steer_layers=[1, 2], gate_layer=2)
    assert aligner.gating == "one pass, blocks 1-2 twice"
    batch = aligner.encode(PROMPTS)
    with _prompt_passes(aligner, batch["input_ids"].shape[1]) as passes:
        output, plan = aligner.generate(**batch, **GEN, do_sample=False, return_plan=True)
    assert len(passes) == 1 and all(row.action.name == "STEER" for row in plan)
    assert torch.equal(output, _two_pass(aligner, batch, **GEN, do_sample=False))


def variant_with_bias(aligner: InferAligner, lowered: float) -> InferAligner:
    other = aligner.variant()
    other.gate = dataclasses.replace(aligner.gate, bias=aligner.gate.bias - lowered)
    return other


def test_simple_mode_refusals_stop_the_pass_and_answer_as_before() -> None:
    aligner = _one_pass_aligner(mode="simple")
    assert aligner.gating == "one pass unless a row fires"
    batch = aligner.encode(PROMPTS)
    output, plan = aligner.generate(**batch, **GEN, do_sample=False, return_plan=True)
    assert plan.refuses
    assert torch.equal(output, _two_pass(aligner, batch, **GEN, do_sample=False))


def test_one_pass_with_several_sequences_per_prompt() -> None:
    aligner = _one_pass_aligner()
    batch = aligner.encode(PROMPTS[2:6])
    beams = {**GEN, "num_beams": 2, "num_return_sequences": 2, "do_sample": False}
    assert torch.equal(aligner.generate(**batch, **beams), _two_pass(aligner, batch, **beams))


def test_one_pass_in_bfloat16() -> None:
    aligner = _one_pass_aligner()
    aligner.model.to(torch.bfloat16)
    batch = aligner.encode(PROMPTS)
    assert torch.equal(
        aligner.generate(**batch, **GEN, do_sample=False), _two_pass(aligner, batch, **GEN, do_sample=False)
    )


@pytest.mark.parametrize(
    "layers", [{"steer_layers": [1, 2, 3], "gate_layer": 0}, {"steer_layers": [1, 2], "gate_layer": 2}]
)
def test_stream_and_on_plan_see_the_plan_before_any_token(layers) -> None:
    aligner = make_aligner("llama", **layers)
    batch = aligner.encode(PROMPTS)
    seen: list = []

    class Recorder(TextIteratorStreamer):
        def put(self, value):
            seen.append(("token", len(plans)))
            super().put(value)

    plans: list = []
    streamer = Recorder(aligner.tokenizer, skip_prompt=True)
    output = aligner.generate(
        **{k: v[:1] for k, v in batch.items()}, **GEN, do_sample=False, streamer=streamer, on_plan=plans.append
    )
    text = "".join(streamer)
    assert len(plans) == 1 and all(known == 1 for _, known in seen)
    assert seen and text == aligner.tokenizer.decode(output[0, batch["input_ids"].shape[1] :])
    for prompt in PROMPTS[:4]:
        row, pieces = aligner.stream(prompt, max_new_tokens=10, min_new_tokens=10)
        [expected] = aligner.complete([prompt], max_new_tokens=10, min_new_tokens=10)
        assert row.gate == expected.gate and "".join(pieces).strip() == expected.text


def test_static_cache_and_torch_compile_keep_the_tokens_without_recompiling() -> None:
    from torch._dynamo.utils import counters

    aligner = _one_pass_aligner()
    batch = aligner.encode(PROMPTS)
    static = {**GEN, "do_sample": False, "cache_implementation": "static"}
    expected = _two_pass(aligner, batch, **GEN, do_sample=False)
    assert torch.equal(aligner.generate(**batch, **static), expected)
    torch._dynamo.reset()
    counters.clear()
    aligner.model.forward = torch.compile(aligner.model.forward, backend="eager", dynamic=False)
    try:
        assert torch.equal(aligner.generate(**batch, **static), expected)
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        assert torch.equal(aligner.generate(**batch, **static), expected)
        assert counters["stats"]["unique_graphs"] == graphs  # no recompilation on a second call
        assert sum(counters["graph_break"].values()) == breaks  # nor a graph break per step or steered layer
    finally:
        del aligner.model.forward
        torch._dynamo.reset()


@pytest.mark.parametrize("option", [{"prefill_chunk_size": 4}, {"prompt_lookup_num_tokens": 3}, {"cache": "fresh"}])
def test_generation_whose_first_pass_is_not_the_whole_prompt_reads_the_gate_apart(option) -> None:
    from transformers import DynamicCache

    aligner = _one_pass_aligner()
    rows = 1 if "prompt_lookup_num_tokens" in option else len(PROMPTS)
    batch = aligner.encode(PROMPTS[:rows])
    fresh = (lambda: {"cache": DynamicCache()}) if "cache" in option else (lambda: option)
    output, plan = aligner.generate(**batch, **GEN, do_sample=False, return_plan=True, **fresh())
    assert plan == aligner.decide(**batch)
    assert torch.equal(output, _two_pass(aligner, batch, **GEN, do_sample=False, **fresh()))
    assert all(not layer._forward_hooks for layer in aligner.layers)


@pytest.mark.parametrize(
    ("model_type", "options", "one_pass"),
    [
        ("llama", {"steer_layers": [1, 2, 3], "gate_layer": 0}, True),
        ("llama", {"steer_layers": [0, 1], "gate_layer": 1}, True),
        ("gemma3_text", {"steer_layers": [0, 1], "gate_layer": 1}, False),
    ],
)
def test_prefill_reads_the_gate_in_its_own_forward_pass(model_type, options, one_pass) -> None:
    aligner = make_aligner(model_type, **options)
    batch = aligner.encode(PROMPTS)
    plan = aligner.decide(**batch)
    assert 0 < sum(row.gate.fired for row in plan) < len(plan)
    positions = position_ids(batch["attention_mask"])
    with aligner.steered(plan), torch.inference_mode():
        expected = aligner.model(**batch, position_ids=positions).logits
    last = len(aligner.layers) - 1  # above the gate: every pass that goes on reaches it once
    with _prompt_passes(aligner, batch["input_ids"].shape[1], block=last) as passes:
        output, planned = aligner.prefill(**batch, position_ids=positions)
    assert planned == plan and len(passes) == (1 if one_pass else 0)
    if one_pass:  # steered in the same pass (blocks at or below the gate run again), the gate's rows alike
        assert torch.allclose(output.logits, expected, atol=1e-5)
    else:  # blocks that cannot run again (sliding window): the pass stopped there, for the caller to run as planned
        assert output is None


def test_a_cache_layer_of_another_kind_stops_a_fired_prefill_at_the_gate_layer() -> None:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class OtherLayer(DynamicLayer):
        """Grows like a `DynamicLayer` but is another kind: a replay cannot vouch for taking its entries back."""

    aligner = make_aligner("llama", steer_layers=[1, 2], gate_layer=2)
    batch = aligner.encode(PROMPTS)
    positions = position_ids(batch["attention_mask"])
    for layer_kind, replayed in ((DynamicLayer, True), (OtherLayer, False)):
        cache = DynamicCache()
        cache.layer_class_to_replicate = layer_kind
        output, plan = aligner.prefill(**batch, position_ids=positions, cache=cache, use_cache=True)
        assert plan.steers and (output is not None) == replayed
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in aligner.layers)
