"""Core speed on the embedded SmolLM2: generation throughput with and without InferAligner, and extraction time.

Throughput: plain `model.generate` vs InferAligner with every gate off vs every gate on (steering 15 layers),
batch 1 and 8, exactly N new tokens each, greedy. Runs are interleaved, the order rotating each repeat, and both
the median and the fastest run are reported (this machine is shared, so single runs vary by 10-20%).
The gate pass (the one fixed cost: an unsteered forward pass of the prompt up to the gate layer) is timed alone.
Extraction: 64 harmful + 64 harmless built-in prompts, vectors for all 30 layers.

    python bench/core_speed.py [--repeats 3] [--new-tokens 128] [--out bench/results/core_speed.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rounds import timed_rounds  # bench/, this script's folder

from inferaligner.aligner import InferAligner
from inferaligner.models import load_model
from inferaligner.prompts import builtin_prompts
from inferaligner.vectors import extract_safety_vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=Path("bench/results/core_speed.json"))
    args = parser.parse_args()

    model, tokenizer = load_model()
    started = time.perf_counter()
    vectors = extract_safety_vectors(
        model, tokenizer, builtin_prompts("harmful"), builtin_prompts("harmless"), progress=False
    )
    extraction_s = time.perf_counter() - started
    print(f"extraction of 64 + 64 prompts, {vectors.num_layers} layers: {extraction_s:.1f} s")

    # Mode "self" steers with the target's own vectors: the gate and steering cost what they do in mode
    # "inferaligner", and no aligned model is needed (its own vectors as the aligned model's are refused there).
    aligner = InferAligner(model, tokenizer, target_vectors=vectors, mode="self", steer_layers=list(range(8, 23)))
    gate_off = dataclasses.replace(aligner.gate, bias=-1e9)
    gate_on = dataclasses.replace(aligner.gate, bias=1e9)
    prompts = builtin_prompts("everyday", "calibration")
    n = args.new_tokens
    gen = {
        "max_new_tokens": n,
        "min_new_tokens": n,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }

    def run(method: str, batch: dict[str, torch.Tensor]) -> float:
        started = time.perf_counter()
        if method == "plain":
            out = model.generate(**batch, **gen)
        else:
            aligner.gate = gate_on if method == "gate on" else gate_off
            out = aligner.generate(**batch, **gen)
        seconds = time.perf_counter() - started
        assert out.shape[1] - batch["input_ids"].shape[1] == n
        return seconds

    methods = ["plain", "gate off", "gate on"]
    rows = []
    for size in args.batch_sizes:
        batch = aligner.encode(prompts[:size])
        times = timed_rounds(methods, lambda method, batch=batch: run(method, batch), args.repeats, warm=["plain"])
        plain_median, plain_best = statistics.median(times["plain"]), min(times["plain"])
        gate_pass = []  # the fixed cost of InferAligner: one unsteered forward pass of the prompt up to l0
        for _ in range(args.repeats):
            started = time.perf_counter()
            aligner.gate_decisions(**batch)
            gate_pass.append(time.perf_counter() - started)
        gate_pass_s = statistics.median(gate_pass)
        print(
            f"batch {size}  gate pass (to layer {aligner.gate.layer}) {gate_pass_s * 1000:.0f} ms, "
            f"{gate_pass_s / plain_median:.1%} of a plain run"
        )
        for method in methods:
            median, best = statistics.median(times[method]), min(times[method])
            rows.append(
                {
                    "batch": size,
                    "method": method,
                    "median_s": round(median, 3),
                    "tokens_per_s": round(size * n / median, 2),
                    "relative_to_plain_median": round(plain_median / median, 4),
                    "relative_to_plain_best": round(plain_best / best, 4),
                    "runs": [round(t, 3) for t in times[method]],
                    "gate_pass_s": round(gate_pass_s, 4),
                }
            )
            print(
                f"batch {size}  {method:8s}  {size * n / median:7.1f} tok/s  "
                f"{plain_median / median:6.1%} of plain (median)  {plain_best / best:6.1%} (fastest runs)"
            )
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": "smollm2-135m-instruct (float32)",
        "new_tokens": n,
        "repeats": args.repeats,
        "extraction_64_64_s": round(extraction_s, 2),
        "throughput": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
