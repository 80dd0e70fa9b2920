"""What the `"turns"` gate's own read costs: the shipped demo aligner's `generate` against plain `model.generate`.

A `"turns"` gate reads each user turn (and the system message) alone, in a short pass of its own over the turns'
tokens up to the gate layer, before generation (`inferaligner.reader`). That pass is the price of a verdict that no
context can move. Measured on the embedded SmolLM2 (float32, greedy, exactly `--new-tokens` new tokens, 2 threads):
Alpaca instructions the gate does not fire on (harmless traffic, where any cost is pure overhead), at batch 1 and 8,
with and without a 400-token system message, in paired rounds (plain and aligner once each per round, in a random
order). The reader's cache of known turns is emptied before every aligner run, so each run pays the full read,
except in the last case, where the system message was read before (a server that sees the same system message
again pays its read once). Also: time to first token (1 new token) at batch 1.
Reports the median ratio aligner / plain with a 95% bootstrap interval over rounds.

    python bench/turns_gate_cost.py [--rounds 30] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from inferaligner.demo import demo_aligner
from inferaligner.eval import datasets
from inferaligner.framings import system_messages

LONG_SYSTEM_TOKENS = 400


def interval(ratios: list[float], resamples: int = 4000, seed: int = 0) -> dict[str, float]:
    """The median of `ratios` and a 95% bootstrap interval."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return {
        "median": round(statistics.median(ratios), 4),
        "low": round(medians[int(0.025 * resamples)], 4),
        "high": round(medians[int(0.975 * resamples)], 4),
    }


def long_system_message(tokenizer) -> str:  # type: ignore[no-untyped-def]
    """Training-side system messages joined until the message is about `LONG_SYSTEM_TOKENS` tokens long."""
    parts, text = system_messages(random.Random(1), 40), ""
    for part in parts:
        text = f"{text} {part}".strip()
        if len(tokenizer(text)["input_ids"]) >= LONG_SYSTEM_TOKENS:
            break
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench/results/turns_gate_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    aligner = demo_aligner()
    model, tokenizer = aligner.model, aligner.tokenizer
    assert aligner.reader is not None, "the shipped gate is expected to be a turns gate"
    alpaca = datasets.alpaca()
    system = long_system_message(tokenizer)
    rng = random.Random(0)
    cases = {}
    for name, batch, with_system, new_tokens, cold in (
        ("batch 1", 1, False, args.new_tokens, True),
        ("batch 8", 8, False, args.new_tokens, True),
        ("batch 1, 400-token system message", 1, True, args.new_tokens, True),
        ("time to first token, batch 1", 1, False, 1, True),
        ("time to first token, batch 1, 400-token system message", 1, True, 1, True),
        ("time to first token, batch 1, 400-token system message read before", 1, True, 1, False),
    ):
        times: dict[str, list[float]] = {"plain": [], "aligner": []}
        fired = 0
        for round_ in range(args.rounds):
            prompts = alpaca[round_ * batch : (round_ + 1) * batch]
            chats = [
                [{"role": "system", "content": system}] * with_system + [{"role": "user", "content": p}]
                for p in prompts
            ]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
            order = ["plain", "aligner"]
            rng.shuffle(order)
            for method in order:
                if cold:
                    aligner.reader._known.clear()  # type: ignore[union-attr]
                begin = time.perf_counter()
                with torch.inference_mode():
                    if method == "plain":
                        model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **kwargs)
                    else:
                        _, plan = aligner.generate(**inputs, return_plan=True, **kwargs)
                        fired += sum(row.gate.fired for row in plan if row.gate is not None)
                times[method].append(time.perf_counter() - begin)
        ratios = [a / p for a, p in zip(times["aligner"], times["plain"], strict=True)]
        cases[name] = {
            "aligner / plain (wall)": interval(ratios),
            "median seconds": {k: round(statistics.median(v), 4) for k, v in times.items()},
            "rows fired": fired,
        }
        print(name, cases[name])
    result = {
        "command": f"python bench/turns_gate_cost.py --rounds {args.rounds} --new-tokens {args.new_tokens}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "seconds": round(time.perf_counter() - started, 1),
        "gating": aligner.gating,
        "system message tokens": len(tokenizer(system)["input_ids"]),
        "cases": cases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
