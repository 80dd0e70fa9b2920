"""GPU check of the image-text path on a LLaVA-1.5-7B-shaped model (random weights; no checkpoint is reachable).

CLIP ViT-L/14 at 336 px (576 image tokens) + projector + a LLaMA-7B-shaped language model, in bfloat16:
1. a mixed batch of eight image + question prompts (pictures the project draws): rows whose gate is off are
   token-identical to plain `generate`, fired rows differ;
2. steering hooks sit on language-model blocks only, the vision tower's output and weights are unchanged, and no
   hook is left behind;
3. generation time, plain vs InferAligner with every gate off / on, batch 1 and 8, 64 new tokens (median of
   --repeats, order rotating; the loop stop off, so every row makes the same tokens). CUDA runs use deterministic
   kernels unless --nondeterministic.
`--shape tiny` runs the same checks on a tiny LLaVA on any device (to try the script on a CPU).

    python bench/gpu_multimodal.py [--shape 7b] [--device cuda] [--out bench/results/gpu_multimodal.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from rounds import synced, timed_rounds  # bench/, this script's folder
from tiny import IMAGE_CHAT, tiny_tokenizer

from inferaligner.aligner import InferAligner
from inferaligner.eval.pictures import picture_questions
from inferaligner.multimodal import MultimodalAligner
from inferaligner.prompts import builtin_prompts
from inferaligner.vectors import extract_safety_vectors

SHAPES = {  # (vision hidden, vision layers, vision heads, image px, text hidden, text ffn, text layers, text heads)
    "tiny": (32, 2, 4, 28, 32, 64, 4, 4),
    "7b": (1024, 24, 16, 336, 4096, 11008, 32, 32),
}


def build(shape: str, device: str, dtype: torch.dtype) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    v_hidden, v_layers, v_heads, pixels, t_hidden, t_ffn, t_layers, t_heads = SHAPES[shape]
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    size = {"shortest_edge": pixels}
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(size=size, crop_size={"height": pixels, "width": pixels}),
        tokenizer=tokenizer,
        patch_size=14,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=IMAGE_CHAT,
    )
    vision = CLIPVisionConfig(
        hidden_size=v_hidden,
        intermediate_size=4 * v_hidden,
        num_hidden_layers=v_layers,
        num_attention_heads=v_heads,
        image_size=pixels,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=t_hidden,
        intermediate_size=t_ffn,
        num_hidden_layers=t_layers,
        num_attention_heads=t_heads,
        vocab_size=max(32064, image_id + 1),
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_id, vision_feature_select_strategy="default"
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    with torch.no_grad():  # sharper next-token distributions, so that steering changes greedy tokens
        model.get_output_embeddings().weight.mul_(8.0)
    return model, processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_multimodal.json"))
    parser.add_argument("--nondeterministic", action="store_true", help="leave CUDA's fast nondeterministic kernels on")
    args = parser.parse_args()
    if not args.nondeterministic:  # bit-exact comparisons need reproducible kernels (random weights make near-ties)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.perf_counter()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, processor = build(args.shape, args.device, dtype)
    layers = model.model.language_model.layers
    harmful, harmless = builtin_prompts("harmful"), builtin_prompts("harmless")
    vectors = extract_safety_vectors(model, processor.tokenizer, harmful[:8], harmless[:8], progress=False)
    # Steering vectors from other prompts stand in for an aligned model's (the target's own are refused).
    steering = extract_safety_vectors(model, processor.tokenizer, harmful[8:16], harmless[8:16], progress=False)
    steer = list(range(len(layers) // 4, len(layers) * 3 // 4))
    aligner = InferAligner(
        model,
        processor.tokenizer,
        target_vectors=vectors,
        aligned_vectors=steering,
        alpha=8.0,
        steer_layers=steer,
        steer_scale="raw",
        loop_span=0,  # random weights repeat themselves: the loop stop would end fired rows early
    )
    mm = MultimodalAligner(aligner, processor)
    questions, _, pictures = picture_questions(8)
    prompts = builtin_prompts("harmful", "calibration")[:4] + questions[:4]
    batch = mm.encode(prompts, pictures)
    scores = sorted(d.score for d in aligner.gate_decisions(**batch))
    aligner.gate = dataclasses.replace(aligner.gate, bias=aligner.gate.bias - (scores[3] + scores[4]) / 2)

    # 1-2. Exactness of unfired rows; where the hooks sit; the vision tower untouched.
    gen = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    vision = model.model.vision_tower
    seen: list[torch.Tensor] = []
    spy = vision.register_forward_hook(lambda _m, _a, out: seen.append(out.last_hidden_state.float().cpu()))
    weights = {name: p.detach().clone() for name, p in vision.named_parameters()}
    plain = model.generate(**batch, **gen)
    attached: list[torch.nn.Module] = []
    original = torch.nn.Module.register_forward_hook

    def record(module: torch.nn.Module, *hook_args: object, **hook_kwargs: object) -> object:
        attached.append(module)
        return original(module, *hook_args, **hook_kwargs)

    torch.nn.Module.register_forward_hook = record  # type: ignore[method-assign]
    try:
        steered, plan = aligner.generate(**batch, **gen, return_plan=True)
    finally:
        torch.nn.Module.register_forward_hook = original  # type: ignore[method-assign]
        spy.remove()
    decisions = [row.gate for row in plan]
    rows = [(d.fired, torch.equal(steered[i], plain[i])) for i, d in enumerate(decisions)]
    repeat = model.generate(**batch, **gen)
    aligner.gate = dataclasses.replace(aligner.gate, bias=aligner.gate.bias - 1e9)
    all_off = aligner.generate(**batch, **gen)
    aligner.gate = dataclasses.replace(aligner.gate, bias=aligner.gate.bias + 1e9)
    prompt_len = batch["input_ids"].shape[1]
    first_difference = [
        int((steered[i, prompt_len:] != plain[i, prompt_len:]).nonzero()[0]) if not same else None
        for i, (_, same) in enumerate(rows)
    ]
    language = {id(layer) for layer in layers}
    checks = {
        "plain generate is deterministic": torch.equal(repeat, plain),
        "all gates off equals plain": torch.equal(all_off, plain),
        "unfired rows identical, fired rows differ": all(same != fired for fired, same in rows),
        "batch is mixed": 0 < sum(f for f, _ in rows) < len(rows),
        "gate and steering hooks on language-model blocks only": bool(attached)
        and all(id(m) in language for m in attached),
        "vision output unchanged": torch.equal(seen[0], seen[-1]),
        "vision weights unchanged": all(torch.equal(p, weights[n]) for n, p in vision.named_parameters()),
        "no hook left behind": sum(len(layer._forward_hooks) for layer in layers) == 0,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}", flush=True)

    # 3. Time.
    timing = []
    base_gate = aligner.gate
    gates = {"gate off": -1e9, "gate on": 1e9}
    for size in (1, 8):
        sub = {key: value[:size] for key, value in batch.items()}

        def run(method: str, sub: dict[str, torch.Tensor] = sub) -> float:
            synced(args.device)
            began = time.perf_counter()
            if method == "plain":
                model.generate(**sub, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
            else:
                aligner.gate = dataclasses.replace(base_gate, bias=gates[method])
                aligner.generate(**sub, max_new_tokens=64, min_new_tokens=64, do_sample=False)
            synced(args.device)
            return time.perf_counter() - began

        methods = ["plain", "gate off", "gate on"]
        times = timed_rounds(methods, run, args.repeats)
        base = statistics.median(times["plain"])
        for method in methods:
            median = statistics.median(times[method])
            timing.append(
                {
                    "batch": size,
                    "method": method,
                    "median_s": round(median, 3),
                    "relative_to_plain": round(base / median, 4),
                    "runs": [round(t, 3) for t in times[method]],
                }
            )
            print(f"batch {size}  {method:8s}  {median:7.3f} s  {base / median:6.1%} of plain", flush=True)
        aligner.gate = base_gate
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {
        "device": device,
        "torch": torch.__version__,
        "deterministic": not args.nondeterministic,
        "shape": args.shape,
        "rows (fired, identical)": rows,
        "first differing new token": first_difference,
        "checks": checks,
        "passed": all(checks.values()),
        "timing": timing,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'all checks passed' if result['passed'] else 'CHECKS FAILED'}; wrote {args.out}")


if __name__ == "__main__":
    main()
