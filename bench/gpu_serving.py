"""GPU check for serving (issue 31): the prefix cache and the fired path, in process, on a lent GPU.

The model is LLaMA-2-7B-shaped with random weights in bfloat16 (timing does not depend on the weights; no checkpoint
can be downloaded on the lent machine) and the tests' tiny ChatML tokenizer (its vocabulary is the model's).

1. Exactness on CUDA: a tiny sharp model serves two turns of four conversations (system messages, fired and unfired
   rows in one batch) through the continuous engine with its prefix cache; every answer must equal `generate` on the
   whole prompt alone.
2. Multi-turn time to first token: 8 conversations of 5 turns, 8 at once, through the continuous engine with and
   without the prefix cache (no gate); then with the cache under a turns gate, its new turns read in a pass of
   their own and read inside the prefill (extra rows, whatever their padding); p50 over turns 2-5 and the share of
   prompt tokens taken from the cache.
3. The fired path: `generate`, batch 8 x 64 new tokens and time to first token at batch 1 (256 prompt tokens),
   plain against the aligner with every row fired, for the three gate layouts: a `"turns"` gate (the shipped
   kind: read first, then one steered pass), a gate read inside the prefill with every steered layer above it (one
   pass), and one with steering from below it (blocks run again inside the pass).

    python bench/gpu_serving.py [--out bench/results/gpu_serving.json]     # on the GPU machine, < 5 minutes
    python bench/gpu_serving.py --tiny --device cpu --out /tmp/gpu.json    # the same steps, small, anywhere
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from rounds import synced, timed_rounds  # bench/, this script's folder
from tiny import tiny_tokenizer

from inferaligner.aligner import InferAligner
from inferaligner.prompts import builtin_prompts, chat_token_ids
from inferaligner.serve import ContinuousEngine
from inferaligner.serve.continuous import PASS_COST_TOKENS
from inferaligner.serve.engine import Done, Failed, Job
from inferaligner.vectors import Provenance, SafetyVectors

SYSTEMS = ("You are a helpful assistant.", "Be brief and precise.")


def random_model(tiny: bool, device: str, vocab: int) -> LlamaForCausalLM:
    shape = (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4}
        if tiny
        else {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}
    )
    config = LlamaConfig(**shape, vocab_size=vocab, max_position_embeddings=4096, pad_token_id=0, eos_token_id=2)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float32 if device == "cpu" else torch.bfloat16).eval()
    return model


def aligner_for(model: LlamaForCausalLM, tokenizer, gate_layer: int, steer: list[int], pooling: str) -> InferAligner:  # type: ignore[no-untyped-def]
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size

    def vectors(name: str) -> SafetyVectors:
        directions = torch.nn.functional.normalize(torch.randn(layers, hidden), dim=-1)
        provenance = Provenance(name, "llama", "-", hidden, layers, 64, 64, "-")
        return SafetyVectors(directions, torch.ones(layers), torch.zeros(layers), provenance)

    aligner = InferAligner(
        model,
        tokenizer,
        target_vectors=vectors("random target"),
        aligned_vectors=vectors("random aligned"),
        alpha=4.0,
        steer_layers=steer,
        gate_layer=gate_layer,
        loop_span=0,
    )
    aligner.gate = dataclasses.replace(aligner.gate, pooling=pooling)
    return aligner


async def finished(jobs: list[Job]) -> None:
    for job in jobs:
        while not isinstance(event := await asyncio.wait_for(job.events.get(), 600), Done):
            if isinstance(event, Failed):
                raise RuntimeError(event.message)


def conversations(aligner: InferAligner, count: int) -> list[tuple[list[int], list[str]]]:
    texts = builtin_prompts("everyday", "all") + builtin_prompts("harmless", "all")
    made = []
    for i in range(count):
        system = aligner.tokenizer(f"<|im_start|>system\n{SYSTEMS[i % 2]}<|im_end|>\n")["input_ids"]
        made.append((system, [texts[(7 * i + t) % len(texts)] for t in range(5)]))
    return made


def multi_turn(aligner: InferAligner, prefix_mb: float, max_tokens: int, turns: str = "-") -> dict[str, object]:
    """8 five-turn conversations at once; each turn continues the last turn's tokens with the answer. `turns`: how a
    turns gate reads new turns ("apart": a pass of their own; "inside": extra rows of the prefill, always)."""
    pass_cost = 10**6 if turns == "inside" else PASS_COST_TOKENS
    engine = ContinuousEngine(
        aligner, max_batch=32, batch_wait_s=0.0, prefix_cache_mb=prefix_mb, pass_cost_tokens=pass_cost
    )
    engine._turns_in_prefill = turns != "apart"
    if aligner.reader is not None:
        aligner.reader._known.clear()
    tokenizer = aligner.tokenizer
    convs = conversations(aligner, 8)

    async def run() -> list[list[Job]]:
        loop = asyncio.get_running_loop()
        engine.start()
        try:

            async def talk(system: list[int], users: list[str]) -> list[Job]:
                ids, jobs = list(system), []
                for user in users:
                    ids += tokenizer(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
                    job = Job(list(ids), max_tokens, 0.0, 1.0, [], True, loop)
                    engine.submit(job)
                    await finished([job])
                    jobs.append(job)
                    ids += job.tokens + tokenizer("<|im_end|>\n")["input_ids"]
                return jobs

            return await asyncio.gather(*(talk(*c) for c in convs))
        finally:
            engine.stop()

    started = time.perf_counter()
    results = asyncio.run(run())
    later = [job for jobs in results for job in jobs[1:]]
    firsts = [job.token_times[0] - job.created for job in later if job.token_times]
    prompt = sum(len(job.prompt_ids) for jobs in results for job in jobs)
    cached = sum(job.cached_tokens for jobs in results for job in jobs)
    return {
        "gate": "turns, read " + turns if aligner.gate is not None else "none (mode off)",
        "prefix_cache_mb": prefix_mb,
        "seconds": round(time.perf_counter() - started, 2),
        "ttft_p50_turns_2_to_5_s": round(statistics.median(firsts), 4),
        "cached_share": round(cached / prompt, 4),
        "prompt_tokens_mean": round(prompt / sum(len(j) for j in results), 1),
    }


def fired_path(model: LlamaForCausalLM, tokenizer, device: str, repeats: int, tiny: bool) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    depth = model.config.num_hidden_layers
    quarter = depth // 4
    layouts = {
        "turns gate (shipped kind), steering from below it": (depth // 2, list(range(quarter, 3 * quarter)), "turns"),
        "in-prefill gate, steering above it": (quarter, list(range(quarter + 1, 3 * quarter)), "last"),
        "in-prefill gate, steering from below it": (depth // 2, list(range(quarter, 3 * quarter)), "last"),
    }
    aligners = {}
    for name, (gate, steer, pooling) in layouts.items():
        aligner = aligner_for(model, tokenizer, gate, steer, pooling)
        aligner.gate = dataclasses.replace(aligner.gate, bias=aligner.gate.bias + 1e9)  # every row fires
        aligners[name] = aligner
    rows = []
    length = 64 if tiny else 256
    for label, size, new in (("batch 8, 64 new tokens", 8, 64), ("time to first token, batch 1", 1, 1)):
        words = " ".join(builtin_prompts("everyday", "all"))
        user = tokenizer(words)["input_ids"][: length - 8]
        ids = chat_token_ids(tokenizer, [{"role": "user", "content": tokenizer.decode(user)}])
        batch = {"input_ids": torch.tensor([ids] * size, device=device)}
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        gen = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}

        def run(method: str, batch: dict[str, torch.Tensor] = batch, gen: dict[str, int | bool] = gen) -> float:
            synced(device)
            began = time.perf_counter()
            with torch.inference_mode():
                if method == "plain":
                    model.generate(**batch, **gen)
                else:
                    aligner = aligners[method]
                    if aligner.reader is not None:
                        aligner.reader._known.clear()
                    aligner.generate(**batch, **gen)
            synced(device)
            return time.perf_counter() - began

        methods = ["plain", *aligners]
        times = timed_rounds(methods, run, repeats)
        plain = statistics.median(times["plain"])
        for method in methods:
            median = statistics.median(times[method])
            rows.append(
                {
                    "case": label,
                    "method": method,
                    "gating": aligners[method].gating if method in aligners else "-",
                    "median_s": round(median, 4),
                    "plain_time_over_this": round(plain / median, 4),
                }
            )
            print(f"{label:30s} {method:52s} {median * 1000:9.1f} ms  {plain / median:7.2%} of plain", flush=True)
    return rows


def exactness(device: str) -> dict[str, object]:
    """The prefix cache's exactness scenario of `tests/test_prefix.py` on this device: two turns of five
    conversations, fired and unfired rows in one batch, each answer against `generate` on its whole prompt alone; a
    gate read at the last token, and a turns gate reading each turn as an extra row of the prefill."""
    from test_continuous import alone_ids
    from test_prefix import two_turns
    from test_serve import make_aligner

    found = {}
    for pooling in ("last", "turns"):  # read inside the prefill at the last token; each turn as an extra row
        aligner = make_aligner(pooling=pooling)
        aligner.model.to(device)
        if pooling == "turns":
            aligner.gate = dataclasses.replace(aligner.gate, earlier_margin=1e6)
        engine = ContinuousEngine(aligner, max_batch=4, batch_wait_s=0.5, prefix_cache_mb=64, pass_cost_tokens=10**6)
        turn_one, turn_two, first_ids, seconds = two_turns(engine, forget_turns=True)
        jobs, prompts = turn_one + turn_two, first_ids + seconds
        same = sum(job.tokens == alone_ids(aligner, ids, 10)[0] for job, ids in zip(jobs, prompts, strict=True))
        found[pooling] = {
            "answers equal to generate alone": f"{same} of {len(jobs)}",
            "fired": sum(job.intervened for job in jobs),
            "cached tokens, second turn": [job.cached_tokens for job in turn_two],
            "prompt tokens, second turn": [len(ids) for ids in seconds],
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a smoke run of every step)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_serving.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = random_model(args.tiny, args.device, len(tokenizer))
    plain_aligner = aligner_for(model, tokenizer, model.config.num_hidden_layers // 2, [1], "turns")
    turns = [multi_turn(plain_aligner.variant(mode="off"), mb, 32) for mb in (0.0, 4096.0)]
    turns += [multi_turn(plain_aligner, 4096.0, 32, read) for read in ("apart", "inside")]
    for row in turns:
        print("multi-turn", json.dumps(row), flush=True)
    result = {
        "command": "python bench/gpu_serving.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": "LLaMA-2-7B-shaped, random weights, bfloat16" if not args.tiny else "tiny LLaMA, float32",
        "multi_turn": turns,
        "ttft_without_over_with": round(turns[0]["ttft_p50_turns_2_to_5_s"] / turns[1]["ttft_p50_turns_2_to_5_s"], 2),
        "fired_path": fired_path(model, tokenizer, args.device, args.repeats, args.tiny),
        "exactness": exactness(args.device),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
