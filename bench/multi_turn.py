"""Multi-turn chat traffic with and without the prefix cache: time to first token per turn, and the cache's hit rate.

Clients hold five-turn conversations with `inferaligner serve` (the shipped demo pair, gated): each conversation has
a system message (the side-by-side load's four kinds, "You are a helpful assistant." the most common), and each turn
sends the whole history with the server's own earlier answers, as a chat client does; one conversation in eight
asks something harmful at its third turn (the gate fires, the row is steered). One phase per `--clients` count (1
and 8 by default, each on conversations of its own): that many conversations run at once, each sending its next
turn when its last is answered (greedy, `--max-tokens`); at one client a turn's time to first token is its own
work, at eight it also waits for the other rows' steps. The same conversations run against the server with its
prefix cache (`--prefix-cache-mb`) and without (`--no-prefix-cache`), each started fresh, the order rotated between
repeats.

Reports, per server and repeat: time to first token p50/p95 per turn and over turns 2-5, latency, the prompt tokens
taken from the cache (`usage.prompt_tokens_details.cached_tokens`) and the server's own `/metrics` (hit rate,
memory); then the ratio without/with per repeat, and whether the answers are the same text.

    python bench/multi_turn.py [--repeats 2] [--clients 1 8] [--conversations 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from serve_load import AUTH, ServerProcess  # bench/, this script's folder

sys.path.insert(0, str(Path(__file__).resolve().parent / "hf_serve"))
from side_by_side import prompt_pools, send  # the side-by-side load's requests, system messages and client

TURNS = 5
DEADLINE_S = 3600


def conversations(count: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """`count` conversations: a system message and five user turns (one in eight asks something harmful third)."""
    draw = random.Random(seed)
    benign, harmful, systems = prompt_pools()
    made = []
    for i in range(count):
        turns = [draw.choice(benign) for _ in range(TURNS)]
        if i % 8 == 7:
            turns[2] = draw.choice(harmful)
        made.append((draw.choice(systems), turns))
    return made


async def turn(http: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed, greedy chat turn (`side_by_side.send`): its text, time to first content, latency and cached
    prompt tokens."""
    answer = await send(http, url, "inferaligner-demo", messages, max_tokens, headers=AUTH, usage=True)
    details = answer.usage.get("prompt_tokens_details") or {}
    return {
        "text": answer.text,
        "first": answer.first,
        "latency": answer.latency,
        "prompt_tokens": answer.usage.get("prompt_tokens", 0),
        "cached_tokens": details.get("cached_tokens", 0),
    }


async def run(url: str, convs: list[tuple[str, list[str]]], clients: int, max_tokens: int) -> list[list[dict]]:
    """Every conversation, `clients` at a time; per conversation, its turns' results."""
    results: list[list[dict]] = [[] for _ in convs]
    queue = iter(range(len(convs)))
    async with httpx.AsyncClient(timeout=DEADLINE_S, limits=httpx.Limits(max_connections=None)) as http:

        async def client() -> None:
            for i in queue:
                system, users = convs[i]
                messages = [{"role": "system", "content": system}]
                for user in users:
                    messages.append({"role": "user", "content": user})
                    answer = await turn(http, url, messages, max_tokens)
                    results[i].append(answer)
                    messages.append({"role": "assistant", "content": answer["text"]})

        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), DEADLINE_S)
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[round(q * (len(ordered) - 1))], 3)


def prefix_metrics(url: str) -> dict[str, float]:
    """The server's `inferaligner_prefix_cache_*` series."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = {}
    for line in text.splitlines():
        if line.startswith("inferaligner_prefix_cache_"):
            name, value = line.split()
            found[name.removeprefix("inferaligner_prefix_cache_")] = float(value)
    return found


def summary(results: list[list[dict]], seconds: float) -> dict[str, Any]:
    by_turn = {
        str(t + 1): {
            "ttft_p50_s": percentile([c[t]["first"] for c in results if c[t]["first"] is not None], 0.5),
            "ttft_p95_s": percentile([c[t]["first"] for c in results if c[t]["first"] is not None], 0.95),
            "prompt_tokens_mean": round(statistics.fmean(c[t]["prompt_tokens"] for c in results), 1),
            "cached_tokens_mean": round(statistics.fmean(c[t]["cached_tokens"] for c in results), 1),
        }
        for t in range(TURNS)
    }
    later = [c[t] for c in results for t in range(1, TURNS)]
    firsts = [a["first"] for a in later if a["first"] is not None]
    prompt = sum(a["prompt_tokens"] for c in results for a in c)
    cached = sum(a["cached_tokens"] for c in results for a in c)
    return {
        "seconds": round(seconds, 1),
        "turns_2_to_5": {
            "ttft_p50_s": percentile(firsts, 0.5),
            "ttft_p95_s": percentile(firsts, 0.95),
            "latency_p50_s": percentile([a["latency"] for a in later], 0.5),
            "latency_p95_s": percentile([a["latency"] for a in later], 0.95),
        },
        "all_turns_latency_p50_s": percentile([a["latency"] for c in results for a in c], 0.5),
        "cached_share_of_prompt_tokens": round(cached / prompt, 4) if prompt else 0.0,
        "by_turn": by_turn,
    }


SERVERS = {"tree": "prefix cache", "none": "no prefix cache"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="one phase per count, in order")
    parser.add_argument("--conversations", type=int, default=16, help="per phase (other conversations each phase)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--prefix-cache-mb", type=float, default=256.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/multi_turn.json"))
    args = parser.parse_args()
    phases = {clients: conversations(args.conversations, seed=phase) for phase, clients in enumerate(args.clients)}
    options = {
        "tree": ["--prefix-cache-mb", f"{args.prefix_cache_mb:g}"],
        "none": ["--no-prefix-cache"],
    }
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {name: {c: [] for c in phases} for name in SERVERS}
    texts: dict[str, dict[int, list[list[str]]]] = {name: {c: [] for c in phases} for name in SERVERS}
    began = time.time()
    for repeat in range(args.repeats):
        order = list(SERVERS) if repeat % 2 == 0 else list(reversed(SERVERS))
        for name in order:
            with ServerProcess("--max-batch", str(args.max_batch), "--max-queue", "512", *options[name]) as server:
                asyncio.run(run(server.url, conversations(2, seed=99), 2, 4))  # warm-up, other conversations
                for clients, convs in phases.items():
                    started = time.perf_counter()
                    results = asyncio.run(run(server.url, convs, clients, args.max_tokens))
                    row = summary(results, time.perf_counter() - started)
                    row["server_metrics"] = prefix_metrics(server.url) if name == "tree" else {}
                    runs[name][clients].append(row)
                    texts[name][clients] += [a["text"] for c in results for a in c]
                    print(f"repeat {repeat + 1}, {SERVERS[name]}, {clients} clients: {row['turns_2_to_5']}", flush=True)
    ratios = {
        f"{clients} clients": [
            round(none["turns_2_to_5"]["ttft_p50_s"] / tree["turns_2_to_5"]["ttft_p50_s"], 2)
            for tree, none in zip(runs["tree"][clients], runs["none"][clients], strict=True)
        ]
        for clients in phases
    }
    same = {}
    for clients in phases:
        pairs = list(zip(texts["tree"][clients], texts["none"][clients], strict=True))
        same[f"{clients} clients"] = f"{sum(a == b for a, b in pairs)} of {len(pairs)}"
    result = {
        "command": "python bench/multi_turn.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(began)),
        "seconds": round(time.time() - began, 1),
        "conversations_per_phase": args.conversations,
        "turns": TURNS,
        "max_tokens": args.max_tokens,
        "runs": {SERVERS[name]: {f"{c} clients": rows for c, rows in by.items()} for name, by in runs.items()},
        "ttft_p50_turns_2_to_5_without_over_with": ratios,
        "same_answers": same,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
