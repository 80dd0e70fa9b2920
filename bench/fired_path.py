"""What a fired row costs in the shipped layout: the demo aligner's `generate` with every row fired, with no row
fired, and plain `model.generate`.

The shipped gate is a `"turns"` gate (layer 16; steering at 12, 16, 20, 24): it reads each turn alone in a short pass
of its own before generation, so the plan is known before the prefill and a fired row is generated in one steered
pass, whether its steered layers lie below the gate or above it (no block runs twice, no second prefill). This bench
measures that: Alpaca instructions under "You are a helpful assistant.", batch 8 with exactly `--new-tokens` new
tokens, and time to first token (1 new token) at batch 1, in paired rounds (plain, no row fired, every row fired;
once each per round, in a random order). "Fired" forces the gate to fire on every row (its bias raised); the loop
stop is off in both aligner runs, so every row generates the same number of tokens. The reader's cache of known turns
is emptied before each aligner run (each pays its whole read; the system message is read again every time).
Reports median ratios with 95% bootstrap intervals: fired / no row fired (what firing adds) and each / plain.

    python bench/fired_path.py [--rounds 20] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from turns_gate_cost import interval  # bench/, this script's folder

from inferaligner.demo import demo_aligner
from inferaligner.eval import datasets

SYSTEM = "You are a helpful assistant."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench/results/fired_path.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    quiet = demo_aligner(loop_span=0)
    assert quiet.reader is not None and quiet.gate is not None, "the shipped gate is expected to be a turns gate"
    fired = quiet.variant()
    fired.gate = dataclasses.replace(quiet.gate, bias=quiet.gate.bias + 1e9)
    model, tokenizer = quiet.model, quiet.tokenizer
    alpaca = datasets.alpaca()
    rng = random.Random(0)
    cases = {}
    for name, batch, new_tokens in (
        (f"batch 8, {args.new_tokens} new tokens", 8, args.new_tokens),
        ("time to first token, batch 1", 1, 1),
    ):
        times: dict[str, list[float]] = {"plain": [], "no row fired": [], "every row fired": []}
        counts = {"no row fired": 0, "every row fired": 0}
        for round_ in range(args.rounds):
            prompts = alpaca[round_ * batch : (round_ + 1) * batch]
            chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in prompts]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
            order = list(times)
            rng.shuffle(order)
            for method in order:
                begin = time.perf_counter()
                with torch.inference_mode():
                    if method == "plain":
                        model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **kwargs)
                    else:
                        aligner = fired if method == "every row fired" else quiet
                        aligner.reader._known.clear()  # type: ignore[union-attr]
                        _, plan = aligner.generate(**inputs, return_plan=True, **kwargs)
                        counts[method] += sum(row.gate.fired for row in plan if row.gate is not None)
                times[method].append(time.perf_counter() - begin)
        ratio = {
            "every row fired / no row fired": [
                f / q for f, q in zip(times["every row fired"], times["no row fired"], strict=True)
            ],
            "every row fired / plain": [f / p for f, p in zip(times["every row fired"], times["plain"], strict=True)],
            "no row fired / plain": [q / p for q, p in zip(times["no row fired"], times["plain"], strict=True)],
        }
        cases[name] = {
            "time ratios (wall)": {k: interval(v) for k, v in ratio.items()},
            "median seconds": {k: round(statistics.median(v), 4) for k, v in times.items()},
            "rows fired": counts,
        }
        print(name, json.dumps(cases[name]), flush=True)
    result = {
        "command": f"python bench/fired_path.py --rounds {args.rounds} --new-tokens {args.new_tokens}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "seconds": round(time.perf_counter() - started, 1),
        "gating": quiet.gating,
        "gate layer": quiet.gate.layer,
        "steered layers": quiet.steer_layers,
        "cases": cases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
