"""InferAligner on a tiny LLaVA built locally (CLIP vision tower + projector + Llama language model)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image
from tiny import tiny_llava, tiny_llava_processor, tiny_model, tiny_tokenizer

from inferaligner.aligner import InferAligner
from inferaligner.errors import InferAlignerError
from inferaligner.models import decoder_layers
from inferaligner.multimodal import ImageError, MultimodalAligner, load_image
from inferaligner.prompts import builtin_prompts
from inferaligner.vectors import extract_safety_vectors

PROMPTS = builtin_prompts("harmful", "calibration")[:3] + builtin_prompts("everyday", "calibration")[:3]
GEN = {"max_new_tokens": 8, "min_new_tokens": 8}


def colour_image(colour: str) -> Image.Image:
    return Image.new("RGB", (40, 32), colour)


def make(images: list) -> tuple[MultimodalAligner, dict[str, torch.Tensor]]:
    """Vectors from the LLaVA itself on text prompts; the gate's threshold splits the mixed batch."""
    model, processor = tiny_llava(), tiny_llava_processor()
    harmful, harmless = builtin_prompts("harmful"), builtin_prompts("harmless")
    vectors = extract_safety_vectors(model, processor.tokenizer, harmful[:8], harmless[:8], progress=False)
    steering = extract_safety_vectors(model, processor.tokenizer, harmful[8:16], harmless[8:16], progress=False)
    aligner = InferAligner(
        model, processor.tokenizer, target_vectors=vectors, aligned_vectors=steering, alpha=30.0, steer_layers=[1, 2]
    )
    mm = MultimodalAligner(aligner, processor)
    batch = mm.encode(PROMPTS, images)
    scores = sorted(d.score for d in aligner.gate_decisions(**batch))
    aligner.gate = dataclasses.replace(aligner.gate, bias=aligner.gate.bias - (scores[2] + scores[3]) / 2)
    return mm, batch


def test_vectors_from_an_image_text_model_say_so() -> None:
    model, processor = tiny_llava(), tiny_llava_processor()
    vectors = extract_safety_vectors(model, processor.tokenizer, PROMPTS[:3], PROMPTS[3:], progress=False)
    assert vectors.provenance.source == "image-text model, text prompts"
    assert vectors.num_layers == 4 and decoder_layers(model) is model.model.language_model.layers


def test_mixed_image_batch_keeps_unfired_rows_identical() -> None:
    images = [colour_image(c) for c in ("red", "blue", "green", "white", "black", "yellow")]
    mm, batch = make(images)
    model = mm.aligner.model
    plain = model.generate(**batch, **GEN, do_sample=False, pad_token_id=0)
    steered, plan = mm.aligner.generate(**batch, **GEN, do_sample=False, return_plan=True)
    decisions = [row.gate for row in plan]
    fired = [d.fired for d in decisions]
    assert 0 < sum(fired) < len(fired)
    for row, row_fired in enumerate(fired):
        assert torch.equal(steered[row], plain[row]) != row_fired


def test_hooks_sit_on_the_language_model_and_the_vision_tower_is_untouched() -> None:
    images = [colour_image("red")] * 6
    mm, batch = make(images)
    model = mm.aligner.model
    mm.aligner.gate = dataclasses.replace(mm.aligner.gate, bias=1e6)  # every row fires
    seen: dict[str, list[torch.Tensor]] = {"plain": [], "steered": []}
    current = ["plain"]
    vision = model.model.vision_tower
    hooks_before = [len(m._forward_hooks) for m in vision.modules()]  # transformers may keep some of its own
    handle = vision.register_forward_hook(lambda _m, _a, out: seen[current[0]].append(out.last_hidden_state.clone()))
    calls = {"language": 0}

    def count(*_args: object) -> None:
        calls["language"] += 1

    lm_handle = model.model.language_model.layers[1].register_forward_pre_hook(count)
    weights = {name: p.clone() for name, p in vision.named_parameters()}
    model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    current[0] = "steered"
    steered_hooks = []
    original = torch.nn.Module.register_forward_hook

    def spy(module, hook, *args, **kwargs):  # record where steering hooks are attached
        steered_hooks.append(module)
        return original(module, hook, *args, **kwargs)

    torch.nn.Module.register_forward_hook = spy
    try:
        mm.aligner.generate(**batch, max_new_tokens=2, do_sample=False)
    finally:
        torch.nn.Module.register_forward_hook = original
        handle.remove()
        lm_handle.remove()
    language_layers = list(model.model.language_model.layers)
    assert steered_hooks and all(any(m is layer for layer in language_layers) for m in steered_hooks)
    assert torch.equal(seen["plain"][0], seen["steered"][0])  # vision features identical
    assert all(torch.equal(p, weights[n]) for n, p in vision.named_parameters())
    assert [len(m._forward_hooks) for m in vision.modules()] == hooks_before and calls["language"] > 0


def test_gate_reads_the_last_token_of_the_multimodal_prompt() -> None:
    images = [colour_image("red")] * 6
    mm = make(images)[0]
    single = mm.encode(PROMPTS[:1], images[:1])
    captured = []
    layer = mm.aligner.layers[mm.aligner.gate.layer]
    handle = layer.register_forward_hook(lambda _m, _a, out: captured.append(out[0, -1]))
    with torch.no_grad():
        mm.aligner.model(**single)
    handle.remove()
    expected = float(captured[0] @ mm.aligner.gate.direction + mm.aligner.gate.bias)
    assert mm.aligner.gate_decisions(**single)[0].score == pytest.approx(expected, abs=1e-4)
    assert (single["input_ids"] == mm.processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 4


def test_complete_with_and_without_images() -> None:
    mm = make([colour_image("red")] * 6)[0]
    results = mm.complete(["What colour is this?", "Tell me a joke."], [colour_image("red"), None], max_new_tokens=4)
    assert len(results) == 2 and all(r.gate is not None for r in results)


def test_real_mm_harmfulbench_images(data_dir) -> None:
    import json

    lines = (data_dir / "mm_harmfulbench" / "questions.jsonl").read_text().splitlines()[:4]
    questions = [json.loads(line)["question"] for line in lines]
    paths = [data_dir / "mm_harmfulbench" / "images" / f"{i}.jpg" for i in range(4)]
    mm = make([colour_image("red")] * 6)[0]
    results = mm.complete(questions, paths, max_new_tokens=4)
    assert [r.prompt for r in results] == questions and all(r.gate is not None for r in results)


def test_image_errors(tmp_path) -> None:
    junk = tmp_path / "broken.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(ImageError, match=r"Cannot read image .*broken\.jpg"):
        load_image(junk)
    with pytest.raises(ImageError, match="Cannot read image"):
        load_image(tmp_path / "missing.png")
    text_only = InferAligner(tiny_model("llama"), tiny_tokenizer(), mode="off")
    mm = MultimodalAligner(text_only, tiny_llava_processor())
    with pytest.raises(ImageError, match="text-only model and cannot take images"):
        mm.encode(["What is this?"], [colour_image("red")])
    with pytest.raises(InferAlignerError, match="2 prompts but 1 images"):
        mm.encode(["a", "b"], [None])


def test_processor_without_chat_template() -> None:
    model = tiny_llava()
    processor = tiny_llava_processor(chat_template=False)
    aligner = InferAligner(model, processor.tokenizer, mode="off")
    with pytest.raises(InferAlignerError, match="no chat template: pass prompt_template"):
        MultimodalAligner(aligner, processor)
    mm = MultimodalAligner(aligner, processor, prompt_template="USER: <image>\n{prompt} ASSISTANT:")
    batch = mm.encode(["What is this?", "Plain text"], [colour_image("blue"), None])
    assert batch["input_ids"].shape[0] == 2


def test_image_tasks_in_the_evaluation(tmp_path, data_dir) -> None:
    from inferaligner.eval.methods import build_methods
    from inferaligner.eval.runner import evaluate
    from inferaligner.eval.tasks import mm_harmful_task, mm_utility_task
    from inferaligner.judges import RefusalJudge

    mm = make([colour_image("red")] * 6)[0]
    aligner = mm.aligner
    methods = build_methods(
        ["target", "inferaligner", "simple"],
        aligner.model,
        aligner.tokenizer,
        aligner.target_vectors,
        aligner.aligned_vectors,
        aligner.settings,
    )
    for method in methods:
        method.aligner.gate = aligner.gate
    tasks = [mm_harmful_task(limit=4), mm_utility_task(limit=4)]
    results = evaluate(methods, tasks, tmp_path, [RefusalJudge()], batch_size=2, progress=False, processor=mm.processor)
    simple = results["methods"]["simple"]["mm_harmful"]
    assert simple["refusal[refusal-phrases-v3]"] == simple["gate_fire_rate"]
    assert 0 <= results["methods"]["target"]["mm_utility"]["accuracy"] <= 1
    again = evaluate(methods, tasks, tmp_path, [RefusalJudge()], batch_size=2, progress=False, processor=mm.processor)
    assert again["methods"] == results["methods"]  # answered from the cache


def test_generated_pictures() -> None:
    from inferaligner.eval.pictures import draw, picture_questions

    questions, answers, images = picture_questions(8)
    assert len(questions) == len(answers) == len(images) == 8
    assert answers[:2] == ["red", "circle"] and images[0] is images[1]
    assert draw("square", "blue").getpixel((168, 168)) == (40, 70, 220)


def test_cli_extracts_from_and_generates_with_an_image_text_model(tmp_path, capsys) -> None:
    import json

    from inferaligner.cli import main

    folder = tmp_path / "tiny-llava"
    tiny_llava().save_pretrained(folder)
    tiny_llava_processor().save_pretrained(folder)
    vectors = tmp_path / "v.safetensors"
    assert main(["extract", "--model", str(folder), "--out", str(vectors), "--limit", "6"]) == 0
    picture = tmp_path / "red.png"
    colour_image("red").save(picture)
    args = [
        "generate",
        "--model",
        str(folder),
        "--target-vectors",
        str(vectors),
        "--mode",
        "self",
        "--layers",
        "1-2",
        "--max-new-tokens",
        "3",
        "--json",
        "--image",
        str(picture),
        "--image",
        "none",
        "What is this?",
        "Hi",
    ]
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["prompt"] for line in lines] == ["What is this?", "Hi"] and all(line["gate"] for line in lines)
    junk = tmp_path / "junk.jpg"
    junk.write_text("x")
    assert main([*args[:-6], "--image", str(junk), "What?"]) == 2
    assert "Cannot read image" in capsys.readouterr().err
