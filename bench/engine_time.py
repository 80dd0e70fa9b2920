"""Where the continuous engine's time goes: a forward pass's fixed cost, and a loaded engine with and without a gate.

1. One forward pass of the embedded SmolLM2 (`logits_to_keep=1`, median of 5) at a few widths: rows x new tokens.
   The fixed part (a 1-token pass) against the per-token part is what `continuous.PASS_COST_TOKENS` stands for.
2. The side-by-side load (`bench/hf_serve/side_by_side.py`: 64 chat requests with system messages, some after
   earlier turns, one in eight harmful; 48 tokens, greedy), 32 at once, through the continuous engine in process
   with its prefix cache: the model with no gate, then the demo aligner (gated; its turns gate reading new turns as
   extra rows of the prefill), then the demo aligner reading them in a pass of their own before it (as before that
   change). Two more runs take the turns' reads out: every turn of the load read before the run starts (the reader
   knows them all), once with the demo gate and once with a gate that never fires (its bias lowered: the same
   tokens as the no-gate run, so what is left is the gating machinery itself). Wall time, and the worker's time in
   grouping admitted requests (`_groups`, with the separate reads of turns: all of them when read apart, those of
   groups the prefill would not read well else), prefills (`_prefill`, with any in-prefill reads) and decoding steps
   (`_step`), timed by wrapping them.

   With `--repeats N` the five runs are repeated N times, the order rotated; wall times are reported per repeat and
   as medians, each gated run over the no-gate run of its own repeat.

    python bench/engine_time.py [--repeats 1] [--out bench/results/engine_time.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "hf_serve"))
from rounds import rotated  # bench/, this script's folder
from side_by_side import conversations  # the side-by-side load

from inferaligner.aligner import InferAligner
from inferaligner.demo import demo_aligner
from inferaligner.prompts import chat_token_ids
from inferaligner.serve import ContinuousEngine
from inferaligner.serve.engine import Done, Job, gate_turns

WIDTHS = ((1, 1), (1, 30), (8, 30), (1, 240))
TIMED = ("_groups", "_prefill", "_step")


def forward_ms(model: Any, rows: int, tokens: int, repeats: int = 5) -> float:
    ids = torch.randint(100, 1000, (rows, tokens))
    times = []
    with torch.inference_mode():
        model(input_ids=ids, logits_to_keep=1)  # warm-up
        for _ in range(repeats):
            began = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            times.append(time.perf_counter() - began)
    return round(statistics.median(times) * 1000, 1)


def loaded(
    aligner: InferAligner, requests: int, clients: int, turns_apart: bool = False, read_before: bool = False
) -> dict[str, Any]:
    """The load through a fresh engine (`turns_apart`: a turns gate reads in a pass of its own; `read_before`: every
    turn of the load is read before the clock starts); wall time, tokens and the worker's time per timed method."""
    engine = ContinuousEngine(aligner, max_batch=32, batch_wait_s=0.0)
    engine._turns_in_prefill = not turns_apart
    asked = conversations(requests)
    if aligner.reader is not None:
        aligner.reader._known.clear()  # each run reads every turn anew
        if read_before:
            jobs = [Job(chat_token_ids(aligner.tokenizer, m), 48, 0.0, 1.0, [], True, None) for m in asked]
            aligner.gate_decisions(None, turns=gate_turns(aligner, jobs))
    spent: dict[str, float] = collections.defaultdict(float)
    for name in TIMED:
        method = getattr(engine, name)

        def timed(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - began

        setattr(engine, name, functools.wraps(method)(timed))

    async def run() -> tuple[float, list[Job]]:
        loop = asyncio.get_running_loop()
        jobs: list[Job] = []
        queue = iter(asked)

        async def client() -> None:
            for messages in queue:
                job = Job(chat_token_ids(aligner.tokenizer, messages), 48, 0.0, 1.0, [], True, loop)
                engine.submit(job)
                while not isinstance(await job.events.get(), Done):
                    pass
                jobs.append(job)

        engine.start()
        try:
            began = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            return time.perf_counter() - began, jobs
        finally:
            engine.stop()

    wall, jobs = asyncio.run(run())
    return {
        "gating": aligner.gating,
        "turns_read_in_prefill": aligner.reader is not None and engine._turns_in_prefill,
        "wall_s": round(wall, 2),
        "tokens": sum(len(job.tokens) for job in jobs),
        "fired": sum(job.intervened for job in jobs),
        "cached_prompt_share": round(sum(j.cached_tokens for j in jobs) / sum(len(j.prompt_ids) for j in jobs), 3),
        "worker_s": {name.strip("_"): round(spent[name], 2) for name in TIMED},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine_time.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    gated = demo_aligner()
    plain = InferAligner(gated.model, gated.tokenizer, mode="off")
    passes = {f"{rows} x {tokens}": forward_ms(gated.model, rows, tokens) for rows, tokens in WIDTHS}
    print("forward pass, ms:", passes, flush=True)
    silent = gated.variant()
    assert silent.gate is not None
    silent.gate = dataclasses.replace(silent.gate, bias=silent.gate.bias - 1e9)
    configs = [
        ("no gate", plain, False, False),
        ("gated (demo)", gated, False, False),
        ("gated, turns read apart", gated, True, False),
        ("gated, turns read before", gated, False, True),
        ("never fires, turns read before", silent, False, True),
    ]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in configs}
    for repeat in range(args.repeats):
        for name, aligner, apart, before in rotated(configs, repeat):
            runs[name].append(loaded(aligner, args.requests, args.clients, apart, before))
            print(f"repeat {repeat + 1}", name, json.dumps(runs[name][-1]), flush=True)

    def over_no_gate(name: str) -> dict[str, Any]:
        each = [run["wall_s"] / base["wall_s"] for run, base in zip(runs[name], runs["no gate"], strict=True)]
        return {"median": round(statistics.median(each), 3), "each": [round(x, 3) for x in each]}

    result = {
        "command": "python bench/engine_time.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "forward_pass_ms": passes,
        "load": {"requests": args.requests, "clients": args.clients, "runs": runs},
        "median_wall_s": {name: statistics.median(run["wall_s"] for run in runs[name]) for name in runs},
        "over_no_gate_wall": {name: over_no_gate(name) for name in runs if name != "no gate"},
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
