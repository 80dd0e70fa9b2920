"""GPU check: per-row gating is exact on CUDA, and InferAligner costs no measurable throughput at 7B scale.

1. Correctness on CUDA (float32 and bfloat16): in a mixed, left-padded batch, rows whose gate is off come out
   token-identical to plain `generate`; rows whose gate fires differ; no hook is left behind.
2. Speed: a LLaMA-2-7B-shaped model (random weights in bfloat16: timing does not depend on the weights), plain
   `generate` vs InferAligner with every gate off vs every gate on (16 steered layers), batch 1, 8 and 32,
   128 new tokens, greedy, the loop stop off (every row makes the same tokens); runs interleaved with the order
   rotating, median of --repeats.
`--tiny --device cpu` runs both steps small on a CPU (the test suite does, so that the script keeps running).

    python bench/gpu_speed.py [--repeats 5] [--out bench/results/gpu_speed.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from rounds import synced, timed_rounds  # bench/, this script's folder
from tiny import tiny_model, tiny_tokenizer

from inferaligner.aligner import InferAligner
from inferaligner.prompts import builtin_prompts
from inferaligner.vectors import Provenance, SafetyVectors, extract_safety_vectors

SHAPES = {  # hidden, feed-forward, layers, heads, vocabulary
    "7b": (4096, 11008, 32, 32, 32000),
    "tiny": (64, 128, 8, 4, 1000),
}


def correctness(dtype: torch.dtype, device: str) -> dict[str, object]:
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", sharp=True).to(device, dtype)
    vectors = extract_safety_vectors(
        model, tokenizer, builtin_prompts("harmful")[:8], builtin_prompts("harmless")[:8], progress=False
    )
    # Mode "self" steers with the target's own vectors (passing them as the aligned model's is refused).
    aligner = InferAligner(model, tokenizer, target_vectors=vectors, mode="self", alpha=20.0, steer_layers=[1, 2])
    prompts = builtin_prompts("harmful", "calibration")[:4] + builtin_prompts("everyday", "calibration")[:4]
    batch = aligner.encode(prompts)
    scores = sorted(d.score for d in aligner.gate_decisions(**batch))
    aligner.gate = dataclasses.replace(aligner.gate, bias=aligner.gate.bias - (scores[3] + scores[4]) / 2)
    gen = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    plain = model.generate(**batch, **gen)
    steered, plan = aligner.generate(**batch, **gen, return_plan=True)
    decisions = [row.gate for row in plan]
    rows = [(d.fired, torch.equal(steered[i], plain[i])) for i, d in enumerate(decisions)]
    ok = all(same != fired for fired, same in rows) and any(f for f, _ in rows) and not all(f for f, _ in rows)
    hooks = sum(len(layer._forward_hooks) for layer in aligner.layers)
    return {"dtype": str(dtype), "rows (fired, identical)": rows, "passed": ok and hooks == 0}


def speed(shape: str, device: str, repeats: int, new_tokens: int, batch_sizes: list[int]) -> list[dict[str, object]]:
    hidden, ffn, depth, heads, vocabulary = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocabulary,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    tokenizer = tiny_tokenizer()
    directions = torch.nn.functional.normalize(torch.randn(depth, hidden), dim=-1)
    provenance = Provenance(f"random-{shape}", "llama", "-", hidden, depth, 64, 64, "-")
    vectors = SafetyVectors(directions, torch.ones(depth), torch.zeros(depth), provenance)
    aligner = InferAligner(
        model,
        tokenizer,
        target_vectors=vectors,
        mode="self",  # the target's own vectors steer: same cost as mode "inferaligner", no aligned model needed
        alpha=4.0,
        steer_layers=list(range(depth // 4, depth * 3 // 4)),  # 8-23 of 32
        gate_layer=depth * 7 // 16,  # 14 of 32: a fired batch runs blocks 8-14 again
        loop_span=0,  # random weights repeat themselves: the loop stop would end fired rows early
    )
    gates = {
        "gate off": dataclasses.replace(aligner.gate, bias=-1e9),
        "gate on": dataclasses.replace(aligner.gate, bias=1e9),
    }
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    rows = []
    for size in batch_sizes:
        ids = torch.randint(100, vocabulary - 1, (size, 64), device=device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def run(method: str, batch: dict[str, torch.Tensor] = batch) -> float:
            synced(device)
            started = time.perf_counter()
            if method == "plain":
                model.generate(**batch, **gen)
            else:
                aligner.gate = gates[method]
                aligner.generate(**batch, **gen)
            synced(device)
            return time.perf_counter() - started

        methods = ["plain", "gate off", "gate on"]
        times = timed_rounds(methods, run, repeats)
        base = statistics.median(times["plain"])
        for method in methods:
            median = statistics.median(times[method])
            rate = size * new_tokens / median
            runs = [round(t, 3) for t in times[method]]
            rows.append(
                {
                    "batch": size,
                    "method": method,
                    "median_s": round(median, 3),
                    "tokens_per_s": round(rate, 1),
                    "relative_to_plain": round(base / median, 4),
                    "runs": runs,
                }
            )
            print(f"batch {size:2d}  {method:8s}  {rate:8.1f} tok/s  {base / median:6.1%} of plain", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small LLaMA instead of the 7B shape (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_speed.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    shape = "tiny" if args.tiny else "7b"
    checks = [correctness(dtype, args.device) for dtype in (torch.float32, torch.bfloat16)]
    for check in checks:
        print("correctness", json.dumps(check), flush=True)
    rows = speed(shape, args.device, args.repeats, args.new_tokens, args.batch_sizes)
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__,
        "correctness": checks,
        "model": f"LLaMA-2-{shape} shape, random weights, bfloat16",
        "new_tokens": args.new_tokens,
        "throughput": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
