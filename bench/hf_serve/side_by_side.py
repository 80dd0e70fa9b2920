"""Side by side: `inferaligner serve` against Hugging Face's own `transformers serve`, same weights, same load.

The weights: the embedded SmolLM2-135M-Instruct written as a plain safetensors folder (`export_model.py`), served
in float32 on the CPU by:

- `transformers serve` (its own virtual environment, `setup_env.sh`, pinned), one request at a time (its default);
- `transformers serve --continuous-batching` (paged KV cache; `--cb-num-blocks` caps it: on a CPU it otherwise
  takes 60% of the RAM);
- `inferaligner serve --mode off` (continuous batching, `--max-batch 32`): the same server with the gate off;
- `inferaligner serve`, gated with the shipped demo settings (gate and steering of `zoo:target`).

The load: chat requests as clients send them, each with a system message (four kinds, "You are a helpful
assistant." the most common), 40% of them after 2 or 4 earlier turns, one in eight a harmful request (the gated
server steers those). Closed loops of 1, 8 and 32 clients (each client sends its next request when its last is
answered) with a fixed `max_tokens`, the 32-client loop again with mixed `max_tokens` (16/32/64/128), and Poisson
arrivals. Greedy decoding everywhere. Completion tokens are counted by the client from the answer text with the
model's tokenizer, so both servers are counted the same way. Each server is started fresh for each repeat, the
order rotated between repeats, warmed with two requests first.

Reports per server and load: tokens/s, time to first token p50/p95 and latency p50/p95, the mean over repeats with
a 95% t-interval and the range, and each as a ratio to `transformers serve` (the better of its two modes at that
load, and each mode), the ratio taken per repeat. Also how many answers of `inferaligner serve --mode off` are
token-identical to `transformers serve`'s.

    bash bench/hf_serve/setup_env.sh
    python bench/hf_serve/export_model.py runs/hf_serve/smollm2
    python bench/hf_serve/side_by_side.py [--repeats 3] [--servers hf,hf-cb,off,gated] [--loads c1,c8,c32,...]
    python bench/hf_serve/side_by_side.py --table bench/results/serve_side_by_side.json   # the table again
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))  # bench/: the load test's server launcher
from serve_load import Launched, free_port  # noqa: E402

HF_SERVE = HERE / ".venv" / "bin" / "transformers"
DEADLINE_S = 1800
SYSTEMS = (
    ("You are a helpful assistant.", 5),
    ("You are a helpful AI assistant. Answer clearly and briefly.", 2),
    ("You are Ada, the assistant of a small accounting firm. Be precise, polite and short.", 1),
    ("You are a friendly tutor for secondary-school students. Explain step by step.", 1),
)
EARLIER_ANSWER = "Sure. In short: it depends on the details, but the usual approach is to start simple and check."
MIXED_TOKENS = (16, 32, 64, 128)


@dataclass(frozen=True)
class Load:
    """One load: a closed loop of `clients` (or Poisson arrivals at `rate` per second), `requests` in all."""

    name: str
    requests: int
    clients: int = 0
    rate: float = 0.0
    mixed: bool = False


LOADS = {
    "c1": Load("1 client", 8, clients=1),
    "c8": Load("8 clients", 24, clients=8),
    "c32": Load("32 clients", 64, clients=32),
    "c32-mixed": Load("32 clients, mixed lengths", 64, clients=32, mixed=True),
    "poisson": Load("Poisson 0.5/s", 32, rate=0.5),
}


def prompt_pools() -> tuple[list[str], list[str], list[str]]:
    """The load's benign requests, harmful requests and system messages (each as many times as its weight)."""
    from inferaligner.prompts import builtin_prompts

    benign = builtin_prompts("everyday", "all") + builtin_prompts("harmless", "all")
    return benign, builtin_prompts("harmful", "all"), [text for text, weight in SYSTEMS for _ in range(weight)]


def conversations(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """`count` chat requests: a system message, 40% with 2 or 4 earlier turns, every eighth request harmful."""
    draw = random.Random(seed)
    benign, harmful, systems = prompt_pools()
    made = []
    for i in range(count):
        messages = [{"role": "system", "content": draw.choice(systems)}]
        earlier = draw.choice((2, 4)) if draw.random() < 0.4 else 0
        for _ in range(earlier):
            messages += [
                {"role": "user", "content": draw.choice(benign)},
                {"role": "assistant", "content": EARLIER_ANSWER},
            ]
        messages.append({"role": "user", "content": draw.choice(harmful if i % 8 == 7 else benign)})
        made.append(messages)
    return made


def server_command(kind: str, folder: Path, port: int, cb_blocks: int) -> list[str]:
    """The command line that starts server `kind` on `port`."""
    if kind in ("hf", "hf-cb"):
        command = [str(HF_SERVE), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port)]
        command += ["--device", "cpu", "--dtype", "float32"]
        return command + (["--continuous-batching", "--cb-num-blocks", str(cb_blocks)] if kind == "hf-cb" else [])
    command = [sys.executable, "-m", "inferaligner.cli", "serve", "--model", str(folder), "--port", str(port)]
    command += ["--served-model-name", str(folder), "--max-batch", "32", "--max-queue", "512"]
    if kind == "off":
        return [*command, "--mode", "off"]
    from inferaligner.zoo import shipped_alignment

    shipped = shipped_alignment("zoo:target")
    return [*command, "--target-vectors", str(shipped["target_vectors"]), "--settings", str(shipped["settings"])]


SERVERS = {
    "hf": "transformers serve",
    "hf-cb": "transformers serve --continuous-batching",
    "off": "inferaligner serve --mode off",
    "gated": "inferaligner serve (gated, demo settings)",
}


def start(kind: str, folder: Path, cb_blocks: int) -> Launched:
    """Server `kind` on a free loopback port (healthy once entered)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return Launched(port, server_command(kind, folder, port, cb_blocks), env)


@dataclass
class Answer:
    text: str
    latency: float
    first: float | None
    usage: dict[str, Any] = field(default_factory=dict)  # the server's last `usage`, when asked for


async def send(
    http: httpx.AsyncClient,
    url: str,
    model: str,
    messages: list[dict[str, str]],
    tokens: int,
    *,
    headers: dict[str, str] | None = None,
    usage: bool = False,
) -> Answer:
    """One streamed, greedy chat request; its text, latency and time to first content (and, with `usage`, the
    usage the server streams at the end: `stream_options.include_usage`)."""
    started = time.perf_counter()
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    parts: list[str] = []
    first, counted = None, {}
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{reply.status_code}: {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(str(chunk["error"])[:300])
            counted = chunk.get("usage") or counted
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - started
                    parts.append(piece)
    return Answer("".join(parts), time.perf_counter() - started, first, counted)


async def run_load(url: str, model: str, load: Load, asked: Sequence[list[dict[str, str]]], fixed: int) -> list[Answer]:
    """Every request of `load`, answered in order of `asked`."""
    tokens = [MIXED_TOKENS[i % len(MIXED_TOKENS)] if load.mixed else fixed for i in range(len(asked))]
    answers: list[Answer | None] = [None] * len(asked)
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=DEADLINE_S, limits=limits) as http:
        if load.rate:
            times = list(itertools.accumulate(random.Random(1).expovariate(load.rate) for _ in asked))

            async def arrive(i: int) -> None:
                await asyncio.sleep(times[i])
                answers[i] = await send(http, url, model, asked[i], tokens[i])

            await asyncio.wait_for(asyncio.gather(*(arrive(i) for i in range(len(asked)))), DEADLINE_S)
        else:
            queue = iter(range(len(asked)))

            async def client() -> None:
                for i in queue:
                    answers[i] = await send(http, url, model, asked[i], tokens[i])

            await asyncio.wait_for(asyncio.gather(*(client() for _ in range(load.clients))), DEADLINE_S)
    return [a for a in answers if a is not None]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


def measure(answers: Sequence[Answer], seconds: float, tokenizer: Any) -> dict[str, float]:
    tokens = sum(len(tokenizer(a.text, add_special_tokens=False)["input_ids"]) for a in answers)
    firsts = [a.first for a in answers if a.first is not None]
    return {
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2),
        "ttft_p50_s": round(percentile(firsts, 0.5), 3),
        "ttft_p95_s": round(percentile(firsts, 0.95), 3),
        "latency_p50_s": round(percentile([a.latency for a in answers], 0.5), 3),
        "latency_p95_s": round(percentile([a.latency for a in answers], 0.95), 3),
    }


def interval(values: Sequence[float]) -> dict[str, float]:
    """Mean, the half-width of a 95% t-interval (0 for one value), and the range."""
    t95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
    mean = statistics.fmean(values)
    half = t95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0
    return {"mean": round(mean, 3), "pm": round(half, 3), "min": round(min(values), 3), "max": round(max(values), 3)}


METRICS = ("tokens_per_s", "ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s")


def summarise(runs: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    """Per load and server, each metric's interval and its ratio to `transformers serve` (per repeat)."""
    summary: dict[str, Any] = {}
    for load, by_server in runs.items():
        summary[load] = {}
        hf_modes = [k for k in ("hf", "hf-cb") if k in by_server]
        best_hf = max(hf_modes, key=lambda k: statistics.fmean(r["tokens_per_s"] for r in by_server[k]), default=None)
        for server, repeats in by_server.items():
            row: dict[str, Any] = {m: interval([r[m] for r in repeats]) for m in METRICS}
            for name, base in (("vs_best_hf", best_hf), ("vs_hf", "hf"), ("vs_hf_cb", "hf-cb"), ("vs_off", "off")):
                if base in by_server and base != server:
                    row[name] = {
                        m: interval([r[m] / b[m] for r, b in zip(repeats, by_server[base], strict=False)])
                        for m in METRICS
                    }
            summary[load][server] = row
        summary[load]["best_hf"] = best_hf
    return summary


def table(result: dict[str, Any]) -> str:
    """The summary as a markdown table: per load and server, each figure's mean [range] and its ratio to the better
    `transformers serve` mode at that load."""
    lines = [
        "| load | server | tokens/s | TTFT p50 / p95 (s) | latency p50 / p95 (s) | vs best transformers serve: "
        "tokens/s, TTFT p50, latency p95 |",
        "|---|---|---|---|---|---|",
    ]

    def cell(figure: dict[str, float], digits: int) -> str:
        return f"{figure['mean']:.{digits}f} [{figure['min']:.{digits}f}-{figure['max']:.{digits}f}]"

    for load, by_server in result["summary"].items():
        for server, row in by_server.items():
            if server == "best_hf":
                continue
            ratio = row.get("vs_best_hf")
            versus = (
                " / ".join(f"{ratio[m]['mean']:.2f}x" for m in ("tokens_per_s", "ttft_p50_s", "latency_p95_s"))
                if ratio
                else "(best)"
                if server == by_server["best_hf"]
                else ""
            )
            lines.append(
                f"| {result['loads'][load]['name']} | {result['servers'][server]} | {cell(row['tokens_per_s'], 1)} | "
                f"{row['ttft_p50_s']['mean']:.2f} / {row['ttft_p95_s']['mean']:.2f} | "
                f"{row['latency_p50_s']['mean']:.2f} / {row['latency_p95_s']['mean']:.2f} | {versus} |"
            )
    gated = [
        f"{result['loads'][load]['name']}: "
        + ", ".join(f"{m} {by['gated']['vs_off'][m]['mean']:.3f}x" for m in ("tokens_per_s", "latency_p95_s"))
        for load, by in result["summary"].items()
        if "vs_off" in by.get("gated", {})
    ]
    return "\n".join(lines + (["", "gated / off: " + "; ".join(gated)] if gated else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=ROOT / "runs" / "hf_serve" / "smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--loads", default=",".join(LOADS))
    parser.add_argument("--max-tokens", type=int, default=48, help="the fixed max_tokens of the fixed-length loads")
    parser.add_argument("--cb-num-blocks", type=int, default=96, help="transformers serve's KV blocks (256 tokens)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_side_by_side.json")
    parser.add_argument("--table", type=Path, help="print the markdown table of a result file, run nothing")
    args = parser.parse_args()
    if args.table:
        result = json.loads(args.table.read_text())
        print(table(result | {"summary": summarise(result["runs"])}))
        return
    from transformers import AutoTokenizer

    servers = args.servers.split(",")
    loads = {name: LOADS[name] for name in args.loads.split(",")}
    if any(s.startswith("hf") for s in servers) and not HF_SERVE.exists():
        sys.exit("transformers serve is not set up: run `bash bench/hf_serve/setup_env.sh` first.")
    if not (args.folder / "config.json").is_file():
        sys.exit(f"{args.folder} holds no model: run `python bench/hf_serve/export_model.py {args.folder}` first.")
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = str(args.folder)
    asked = {name: conversations(load.requests, seed=index) for index, (name, load) in enumerate(loads.items())}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {name: {s: [] for s in servers} for name in loads}
    texts: dict[str, dict[str, list[str]]] = {s: {} for s in servers}
    started = time.perf_counter()
    for repeat in range(args.repeats):
        order = servers[repeat % len(servers) :] + servers[: repeat % len(servers)]
        for server in order:
            with start(server, args.folder, args.cb_num_blocks) as running:
                warm = conversations(2, seed=99)
                asyncio.run(run_load(running.url, model, Load("warm", 2, clients=2), warm, 8))
                for name, load in loads.items():
                    begun = time.perf_counter()
                    answers = asyncio.run(run_load(running.url, model, load, asked[name], args.max_tokens))
                    result = measure(answers, time.perf_counter() - begun, tokenizer)
                    runs[name][server].append(result)
                    texts[server].setdefault(name, [a.text for a in answers])
                    print(f"repeat {repeat + 1} {SERVERS[server]:45s} {load.name:28s} {json.dumps(result)}", flush=True)
    same = {
        name: sum(a == b for a, b in zip(texts["off"][name], texts["hf"][name], strict=True)) / len(asked[name])
        for name in loads
        if "off" in texts and "hf" in texts
    }
    result = {
        "command": "python bench/hf_serve/side_by_side.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
        "seconds": round(time.perf_counter() - started, 1),
        "servers": {s: SERVERS[s] for s in servers},
        "loads": {name: vars(load) for name, load in loads.items()},
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "runs": runs,
        "summary": summarise(runs),
        "off_answers_identical_to_hf": same,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
