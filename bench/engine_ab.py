"""The two serving schedulers in-process (no HTTP): tokens/s, and how much of the time goes to prefills and steps.

The shipped demo pair, the load bench's prompt mix, `--clients` in-process clients in a closed loop (each submits
its next request when its last one is done), greedy, `--max-tokens` each. The model's forward passes are timed by
kind: prefill (the prompt) or decoding step (one token per running row).

    python bench/engine_ab.py [--requests 128] [--clients 32] [--max-batch 16] [--max-tokens 32]
                              [--schedulers continuous,no-prefix-cache,batch]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from pathlib import Path
from typing import Any

from inferaligner.demo import demo_aligner
from inferaligner.prompts import builtin_prompts, chat_token_ids
from inferaligner.serve import BatchEngine, ContinuousEngine
from inferaligner.serve.engine import Done, Job

SCHEDULERS = {
    "continuous": lambda aligner, **limits: ContinuousEngine(aligner, **limits),
    "no-prefix-cache": lambda aligner, **limits: ContinuousEngine(aligner, prefix_cache_mb=0, **limits),
    "batch": lambda aligner, **limits: BatchEngine(aligner, **limits),
}


def run(scheduler: str, aligner: Any, prompts: list[str], clients: int, max_batch: int, max_tokens: int) -> dict:
    spent: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    forward = aligner.model.forward

    def timed(*args: Any, **kwargs: Any) -> Any:
        kind = "decoding steps" if kwargs["input_ids"].shape[1] == 1 else "prefills"
        started = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            spent[kind][0] += 1
            spent[kind][1] += time.perf_counter() - started

    aligner.model.forward = timed
    engine = SCHEDULERS[scheduler](aligner, max_batch=max_batch, batch_wait_s=0.01, max_queue=len(prompts))
    tokenizer = aligner.tokenizer
    waiting = list(prompts)
    generated = 0

    async def client(loop: asyncio.AbstractEventLoop) -> None:
        nonlocal generated
        while waiting:
            ids = chat_token_ids(tokenizer, [{"role": "user", "content": waiting.pop(0)}])  # as the server does
            job = Job(ids, max_tokens, 0.0, 1.0, [], True, loop)
            engine.submit(job)
            while not isinstance(await job.events.get(), Done):
                pass
            generated += len(job.tokens)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        engine.start()
        started = time.perf_counter()
        await asyncio.gather(*(client(loop) for _ in range(clients)))
        seconds = time.perf_counter() - started
        engine.stop()
        return seconds

    seconds = asyncio.run(main())
    del aligner.model.forward
    return {
        "scheduler": scheduler,
        "max_batch": max_batch,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(generated / seconds, 1),
        "tokens_per_request": round(generated / len(prompts), 1),
        **{
            kind: {"passes": int(count), "seconds": round(total, 1), "ms_each": round(1000 * total / count, 1)}
            for kind, (count, total) in spent.items()
        },
        "outside_the_model_s": round(seconds - sum(total for _, total in spent.values()), 1),
    }


def _schedulers(text: str) -> list[str]:
    names = text.split(",")
    unknown = [name for name in names if name not in SCHEDULERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scheduler {', '.join(unknown)}; choose from {', '.join(SCHEDULERS)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-batch", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--schedulers", default="continuous,batch", type=_schedulers, help=f"comma-separated: {', '.join(SCHEDULERS)}"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine_ab.json"))
    args = parser.parse_args()
    aligner = demo_aligner()  # the pair `inferaligner serve` serves by default
    pool = builtin_prompts("harmful", "all") + builtin_prompts("everyday", "all") + builtin_prompts("harmless", "all")
    prompts = [pool[(i * 7) % len(pool)] for i in range(args.requests)]  # the load bench's mix
    results = []
    for max_batch in args.max_batch:
        for scheduler in args.schedulers:
            results.append(run(scheduler, aligner, prompts, args.clients, max_batch, args.max_tokens))
            print(json.dumps(results[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"requests": args.requests, "clients": args.clients, "runs": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
