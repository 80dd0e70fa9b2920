from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from inferaligner.aligner import InferAligner
from inferaligner.errors import InferAlignerError, PromptTooLongError, VectorFileError, VectorMismatchError
from inferaligner.prompts import builtin_prompts
from inferaligner.settings import DEFAULT_REFUSAL, Mode, SettingsError
from inferaligner.vectors import GateSpec, extract_safety_vectors

PROMPTS = builtin_prompts("harmful", "calibration")[:4] + builtin_prompts("harmless", "calibration")[:4]
GEN = {"max_new_tokens": 10, "min_new_tokens": 10}


def make_aligner(
    model_type: str = "llama", mode: str = "inferaligner", pooling: str | None = None, **kwargs
) -> InferAligner:
    """A tiny target with its own vectors and a differently seeded 'aligned' twin; the gate (read with `pooling`
    when given) splits PROMPTS."""
    tokenizer = tiny_tokenizer()
    target = tiny_model(model_type, seed=0)
    harmful, harmless = builtin_prompts("harmful")[:12], builtin_prompts("harmless")[:12]
    target_vectors = extract_safety_vectors(target, tokenizer, harmful, harmless, progress=False)
    aligned_vectors = extract_safety_vectors(
        tiny_model(model_type, seed=1), tokenizer, harmful, harmless, progress=False
    )
    kwargs.setdefault("steer_layers", [1, 2])
    aligner = InferAligner(
        target,
        tokenizer,
        target_vectors=target_vectors,
        aligned_vectors=aligned_vectors,
        mode=mode,
        alpha=8.0,
        **kwargs,
    )
    if pooling is not None:
        aligner.gate = dataclasses.replace(aligner.gate, pooling=pooling)
    # Random weights separate nothing; put the gate's threshold at the median score so half the rows fire.
    scores = torch.tensor([d.score for d in aligner.gate_decisions(**_batch(aligner))])
    aligner.gate = dataclasses.replace(aligner.gate, bias=aligner.gate.bias - float(scores.median()) + 1e-4)
    return aligner


def _batch(aligner: InferAligner, prompts=PROMPTS) -> dict[str, torch.Tensor]:
    batch = aligner.encode(prompts)
    return batch


def _plain(aligner: InferAligner, batch, **kwargs) -> torch.Tensor:
    pad = aligner.tokenizer.pad_token_id
    return aligner.model.generate(**batch, **GEN, pad_token_id=pad, **kwargs)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2", "qwen3"])
def test_mixed_batch_unfired_rows_are_token_identical(model_type: str) -> None:
    aligner = make_aligner(model_type)
    batch = _batch(aligner)
    assert bool((batch["attention_mask"] == 0).any()), "the batch must be left padded"
    plain = _plain(aligner, batch, do_sample=False)
    steered, plan = aligner.generate(**batch, **GEN, do_sample=False, return_plan=True)
    fired = [row.gate.fired for row in plan]
    assert 0 < sum(fired) < len(fired)
    for row, row_fired in enumerate(fired):
        if row_fired:
            assert not torch.equal(steered[row], plain[row]), f"row {row} fired but was not steered"
        else:
            assert torch.equal(steered[row], plain[row]), f"row {row} did not fire but changed"


def test_mixed_batch_under_a_turns_gate_keeps_unfired_rows_token_identical() -> None:
    aligner = make_aligner(pooling="turns")
    assert aligner.reader is not None and aligner.gating.startswith("each turn read alone")
    batch = _batch(aligner)
    plain = _plain(aligner, batch, do_sample=False)
    steered, plan = aligner.generate(**batch, **GEN, do_sample=False, return_plan=True)
    fired = [row.gate.fired for row in plan]
    assert 0 < sum(fired) < len(fired)
    for row, row_fired in enumerate(fired):
        assert torch.equal(steered[row], plain[row]) != row_fired, f"row {row}: fired {row_fired}"


def test_mixed_batch_with_sampling_under_a_fixed_seed() -> None:
    aligner = make_aligner("llama")
    batch = _batch(aligner)
    sampling = {"do_sample": True, "temperature": 0.3, "top_k": 0, "top_p": 1.0}
    torch.manual_seed(123)
    plain = _plain(aligner, batch, **sampling)
    torch.manual_seed(123)
    steered, plan = aligner.generate(**batch, **GEN, **sampling, return_plan=True)
    for row, planned in enumerate(plan):
        assert torch.equal(steered[row], plain[row]) != planned.gate.fired


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_gate_is_read_at_the_last_real_token_under_either_padding(pooling: str) -> None:
    aligner = make_aligner("llama")
    aligner.gate = dataclasses.replace(aligner.gate, pooling=pooling)
    left = aligner.gate_decisions(**_batch(aligner))
    singles = [aligner.gate_decisions(**_batch(aligner, [p]))[0] for p in PROMPTS]
    tokenizer = aligner.tokenizer
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    right = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    right_decisions = aligner.gate_decisions(right["input_ids"], right["attention_mask"])
    for a, b, c in zip(left, singles, right_decisions, strict=True):
        assert a.fired == b.fired == c.fired
        assert a.score == pytest.approx(b.score, abs=1e-4) and a.score == pytest.approx(c.score, abs=1e-4)


def test_hooks_are_removed_after_generate_and_after_errors() -> None:
    aligner = make_aligner("llama")
    aligner.generate(**_batch(aligner), **GEN)
    assert all(not layer._forward_hooks for layer in aligner.layers)
    with pytest.raises(Exception):  # noqa: B017 - any generate() error
        aligner.generate(**_batch(aligner), max_new_tokens=-3)
    assert all(not layer._forward_hooks for layer in aligner.layers)


def test_modes() -> None:
    batch_prompts = PROMPTS
    reference = make_aligner("llama", mode="off")
    plain = reference.complete(batch_prompts, **GEN)
    fired = [c.gate.fired for c in plain]
    assert not any(c.intervened for c in plain) and 0 < sum(fired) < len(fired)

    for mode in ("inferaligner", "self"):
        results = make_aligner("llama", mode=mode).complete(batch_prompts, **GEN)
        for got, base, row_fired in zip(results, plain, fired, strict=True):
            assert got.intervened == row_fired
            assert (got.text == base.text) != row_fired

    always = make_aligner("llama", mode="always").complete(batch_prompts, **GEN)
    assert all(c.intervened for c in always) and all(a.text != b.text for a, b in zip(always, plain, strict=True))

    simple = make_aligner("llama", mode="simple").complete(batch_prompts, max_new_tokens=150)
    plain_long = reference.complete(batch_prompts, max_new_tokens=150)
    for got, base, row_fired in zip(simple, plain_long, fired, strict=True):
        assert got.text == (DEFAULT_REFUSAL if row_fired else base.text)


def test_simple_mode_batch_where_every_row_fires() -> None:
    aligner = make_aligner("llama", mode="simple")
    aligner.gate = dataclasses.replace(aligner.gate, bias=1e6)
    results = aligner.complete(PROMPTS[:2], max_new_tokens=200)
    assert [c.text for c in results] == [DEFAULT_REFUSAL] * 2


def test_beam_search_keeps_rows_apart() -> None:
    aligner = make_aligner("llama")
    batch = _batch(aligner)
    plain = _plain(aligner, batch, num_beams=2, do_sample=False)
    steered, plan = aligner.generate(**batch, **GEN, num_beams=2, do_sample=False, return_plan=True)
    for row, planned in enumerate(plan):
        assert torch.equal(steered[row], plain[row]) != planned.gate.fired


def test_stream_yields_the_same_text_as_complete() -> None:
    aligner = make_aligner("llama")
    for prompt in PROMPTS[:2] + PROMPTS[-2:]:
        row, pieces = aligner.stream(prompt, **GEN)
        completion = aligner.complete([prompt], **GEN)[0]
        assert row.gate == completion.gate and row.intervened == completion.intervened
        assert "".join(pieces).strip() == completion.text


def test_stream_in_simple_mode_streams_the_refusal() -> None:
    aligner = make_aligner("llama", mode="simple")
    aligner.gate = dataclasses.replace(aligner.gate, bias=1e6)
    row, pieces = aligner.stream(PROMPTS[0], max_new_tokens=200)
    assert row.gate.fired and row.intervened and "".join(pieces).strip() == DEFAULT_REFUSAL


def test_mode_requirements_and_mismatches() -> None:
    tokenizer, model = tiny_tokenizer(), tiny_model("llama")
    harmful, harmless = builtin_prompts("harmful")[:4], builtin_prompts("harmless")[:4]
    target_vectors = extract_safety_vectors(model, tokenizer, harmful, harmless, progress=False)
    with pytest.raises(InferAlignerError, match="needs the aligned model's vectors"):
        InferAligner(model, tokenizer, target_vectors=target_vectors, mode=Mode.INFERALIGNER)
    with pytest.raises(InferAlignerError, match="needs the target's own vectors"):
        InferAligner(model, tokenizer, aligned_vectors=target_vectors, mode="simple")
    other = extract_safety_vectors(tiny_model("llama", layers=6), tokenizer, harmful, harmless, progress=False)
    with pytest.raises(VectorMismatchError, match=r"aligned vectors come from .*6 layers"):
        InferAligner(model, tokenizer, target_vectors=target_vectors, aligned_vectors=other, steer_layers=[1])
    with pytest.raises(SettingsError, match=r"mode must be one of .*'sideways'"):
        InferAligner(model, tokenizer, mode="sideways")
    InferAligner(model, tokenizer, mode="off").complete(["hello"], max_new_tokens=2)


def test_prompt_longer_than_the_context_is_refused_before_generation() -> None:
    aligner = make_aligner("llama")
    with pytest.raises(PromptTooLongError, match="context of 256"):
        aligner.complete(["word " * 300], max_new_tokens=4)
    with pytest.raises(PromptTooLongError, match="plus 250 new tokens"):
        aligner.complete(["a short prompt"], max_new_tokens=250)


def test_raw_scale_steers_with_the_unnormalised_differences() -> None:
    unit = make_aligner("llama")
    raw = make_aligner("llama", steer_scale="raw")
    vectors = raw.steering_vectors
    torch.testing.assert_close(raw.steer_directions, vectors.directions * vectors.norms[:, None])
    torch.testing.assert_close(unit.steer_directions, vectors.directions)
    with pytest.raises(SettingsError, match="steer_scale must be one of 'unit', 'raw'"):
        make_aligner("llama", steer_scale="huge")


def _vectors_with(vectors, **tensors):
    return dataclasses.replace(vectors, **tensors)


def test_bad_settings_and_tensors_fail_when_the_aligner_is_built() -> None:
    base = make_aligner("llama")
    model, tokenizer, target, aligned = base.model, base.tokenizer, base.target_vectors, base.aligned_vectors
    with pytest.raises(SettingsError, match=r"steer_layers \[100, 200\] are outside this model's layers 0..3"):
        InferAligner(model, tokenizer, target_vectors=target, aligned_vectors=aligned, steer_layers=[1, 100, 200])
    with pytest.raises(VectorMismatchError, match="Gate layer 9 is outside"):
        InferAligner(model, tokenizer, target_vectors=target, aligned_vectors=aligned, gate_layer=9)
    with pytest.raises(SettingsError, match="gate_bias must be a finite number"):
        InferAligner(model, tokenizer, target_vectors=target, aligned_vectors=aligned, gate_bias=float("nan"))
    with pytest.raises(SettingsError, match="alpha must be a finite number"):
        InferAligner(model, tokenizer, target_vectors=target, aligned_vectors=aligned, alpha=float("inf"))
    broken = target.directions.clone()
    broken[2, 0] = float("nan")
    with pytest.raises(VectorFileError, match="non-finite values in directions"):
        InferAligner(model, tokenizer, target_vectors=_vectors_with(target, directions=broken), aligned_vectors=aligned)
    with pytest.raises(VectorFileError, match=r"aligned vectors .* non-finite values in norms"):
        InferAligner(
            model,
            tokenizer,
            target_vectors=target,
            aligned_vectors=_vectors_with(aligned, norms=aligned.norms * float("inf")),
        )
    for margin, message in (
        (float("nan"), "non-finite values in gate earlier-turn margin"),
        (-1.0, "negative earlier-turn margin"),
    ):
        gate = GateSpec(layer=1, bias=0.0, pooling="turns", earlier_margin=margin)
        with pytest.raises(VectorFileError, match=message):
            InferAligner(model, tokenizer, target_vectors=_vectors_with(target, gate=gate), aligned_vectors=aligned)
    with pytest.raises(SettingsError, match="there is no gate"):
        InferAligner(model, tokenizer, mode="off", gate_layer=1)


def test_a_gate_score_that_is_not_finite_fires_and_is_logged(caplog) -> None:
    aligner = make_aligner("llama")
    decisions = aligner.gate.decide(torch.full((2, 32), float("nan")))
    assert [d.fired for d in decisions] == [True, True]
    assert decisions[0].as_dict()["score"] is None and "treated as fired" in caplog.text


def test_steered_context_hooks_only_inside_and_variants_share_the_lock() -> None:
    aligner = make_aligner("llama")
    plan = aligner.decide(**_batch(aligner))
    assert plan.steers
    with aligner.steered(plan):
        assert sum(len(layer._forward_hooks) for layer in aligner.layers) == len(aligner.steer_layers)
    assert all(not layer._forward_hooks for layer in aligner.layers)
    off = aligner.variant(mode="off")
    assert off._lock is aligner._lock and off.settings.mode is Mode.OFF and off.settings.alpha == 8.0
    with off.steered(off.decide(**_batch(aligner))):
        assert all(not layer._forward_hooks for layer in aligner.layers)


def test_aligned_mode_hands_fired_rows_to_the_aligned_model() -> None:
    base = make_aligner("llama")
    teacher = tiny_model("llama", seed=1)
    aligner = InferAligner(
        base.model, base.tokenizer, target_vectors=base.target_vectors, aligned_model=teacher, mode="aligned"
    )
    aligner.gate = base.gate
    batch = _batch(aligner)
    output, plan = aligner.generate(**batch, **GEN, do_sample=False, return_plan=True)
    pad = aligner.tokenizer.pad_token_id
    plain = aligner.model.generate(**batch, **GEN, do_sample=False, pad_token_id=pad)
    taught = teacher.generate(**batch, **GEN, do_sample=False, pad_token_id=pad)
    fired = [row.gate.fired for row in plan]
    assert 0 < sum(fired) < len(fired) and all(r.intervened == f for r, f in zip(plan, fired, strict=True))
    for row, row_fired in enumerate(fired):
        width = output.shape[1]
        expected = taught[row] if row_fired else plain[row]
        assert torch.equal(output[row, : len(expected)], expected[:width]), row
    row, pieces = aligner.stream(PROMPTS[0], **GEN)
    assert "".join(pieces).strip() == aligner.complete([PROMPTS[0]], **GEN)[0].text
    with pytest.raises(InferAlignerError, match="needs the aligned model itself"):
        InferAligner(base.model, base.tokenizer, target_vectors=base.target_vectors, mode="aligned")
    with pytest.raises(VectorMismatchError, match="same base"):
        InferAligner(
            base.model,
            base.tokenizer,
            target_vectors=base.target_vectors,
            mode="aligned",
            aligned_model=tiny_model("llama", layers=6),
        )
