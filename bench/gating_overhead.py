"""What InferAligner's gate and steering cost in generation, measured so that 1% shows (issue 14).

On the embedded SmolLM2 (float32, greedy, exactly N new tokens, threads pinned), with vectors extracted from the
built-in prompts. Two layouts of the aligner:

- one pass: gate at layer 8, steering layers 9-22 (every steered layer above the gate): the gate is read inside
  generate's own prefill and fired rows are steered in the same pass;
- layers below the gate: gate at 19, steering 12, 16, 20, 24 (the demo layout of issue 14): one pass while no row
  fires; in a fired batch blocks 12-19 run a second time, steered, inside the same pass (before commit ce457fc
  such a batch stopped at the gate layer and was generated again with the plan).

Methods, run in paired rounds (every method once per round, in a new random order each round): plain
`model.generate`, plain again (the A/A pair: the machine's own noise), gate off, gate on (one pass), and gate on with
layers below the gate. Each ratio is plain's time over the method's time in the same round (>1: faster than plain);
the median over rounds comes with a 95% bootstrap interval (resampling rounds), for wall and CPU time. This machine
is a shared VM whose single runs vary by 5-8%, so a 1% resolution takes about a hundred rounds: the runs are short
(32 new tokens) and many.

Also: time to first token at batch 1 for prompts of 64 / 512 / 2048 tokens, with the previous two-pass path (a
separate gate pass, then generation) beside it; the operators a steered decoding step adds over a plain one (torch
profiler); and, with `--peers`, steering-vectors and repeng steering the same layers with the same vectors, each in
its own virtual environment (`bash bench/peers/setup_envs.sh`), each ratio taken against plain generation in that
environment.

    python bench/gating_overhead.py [--rounds 100 50] [--new-tokens 32] [--peers] [--out ...gating_overhead.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from inferaligner.aligner import InferAligner
from inferaligner.models import EMBEDDED_MODEL, converted_gguf, embedded_gguf_path, load_model
from inferaligner.prompts import builtin_prompts
from inferaligner.vectors import extract_safety_vectors

ROOT = Path(__file__).resolve().parent.parent
ONE_PASS = {"gate_layer": 8, "steer_layers": list(range(9, 23))}
BELOW_GATE = {"gate_layer": 19, "steer_layers": [12, 16, 20, 24]}
PEERS = ("steering-vectors", "repeng")


def interval(ratios: list[float], resamples: int = 4000, seed: int = 0) -> dict[str, float]:
    """Median of paired ratios and its 95% bootstrap interval (resampling rounds)."""
    values = np.asarray(ratios)
    draws = np.random.default_rng(seed).choice(values, size=(resamples, len(values)), replace=True)
    low, high = np.percentile(np.median(draws, axis=1), [2.5, 97.5])
    return {"median": round(float(np.median(values)), 4), "low": round(float(low), 4), "high": round(float(high), 4)}


def timed(call: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def ratios(plain: list[float], other: list[float]) -> list[float]:
    return [p / o for p, o in zip(plain, other, strict=True)]


def summary(runs: dict[str, dict[str, list[float]]], plain: str = "plain") -> dict[str, dict]:
    out = {}
    for method, times in runs.items():
        if method == plain:
            continue
        out[method] = {clock: interval(ratios(runs[plain][clock], times[clock])) for clock in ("wall", "cpu")}
    return out


def paired_rounds(methods: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """One warm-up each, then `rounds` rounds running every method once, in a new random order each round (so no
    method always follows the same one)."""
    for call in methods.values():
        call()
    runs: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in methods}
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        names = list(methods)
        shuffle(names)
        for name in names:
            wall, cpu = timed(methods[name])
            runs[name]["wall"].append(round(wall, 4))
            runs[name]["cpu"].append(round(cpu, 4))
    return runs


def generation_methods(
    aligners: dict[str, InferAligner], batch: dict, gen: dict, two_pass: bool = False
) -> dict[str, Callable[[], object]]:
    one_pass, below = aligners["one pass"], aligners["below gate"]
    gates = {
        "off": dataclasses.replace(one_pass.gate, bias=-1e9),
        "on": dataclasses.replace(one_pass.gate, bias=1e9),
        "below on": dataclasses.replace(below.gate, bias=1e9),
    }

    def ours(aligner: InferAligner, gate: str, separate_pass: bool = False) -> object:
        aligner.gate = gates[gate]
        plan = {"plan": aligner.decide(**batch)} if separate_pass else {}
        return aligner.generate(**batch, **plan, **gen)

    methods = {
        "plain": lambda: one_pass.model.generate(**batch, **gen),
        "plain again": lambda: one_pass.model.generate(**batch, **gen),
        "gate off": lambda: ours(one_pass, "off"),
        "gate on": lambda: ours(one_pass, "on"),
        "gate on, layers below the gate": lambda: ours(below, "below on"),
    }
    if two_pass:  # the path before one-pass gating: a separate gate pass, then generation
        methods["two-pass gate off (before)"] = lambda: ours(one_pass, "off", separate_pass=True)
    return methods


def show(label: str, ratio: dict[str, dict]) -> None:
    print(label)
    for name, clocks in ratio.items():
        wall, cpu = clocks["wall"], clocks["cpu"]
        print(
            f"  {name:32s} wall {wall['median']:7.2%} [{wall['low']:7.2%}, {wall['high']:7.2%}]   "
            f"cpu {cpu['median']:7.2%} [{cpu['low']:7.2%}, {cpu['high']:7.2%}]"
        )


def throughput(
    aligners: dict[str, InferAligner], prompts: list[str], sizes: dict[int, int], n: int, only: list[str] | None
) -> list:
    tokenizer = aligners["one pass"].tokenizer
    gen = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    results = []
    for size, rounds in sizes.items():
        batch = aligners["one pass"].encode(prompts[:size])
        methods = generation_methods(aligners, batch, gen)
        if only:
            methods = {name: call for name, call in methods.items() if name == "plain" or name in only}
        runs = paired_rounds(methods, rounds)
        ratio = summary(runs)
        plain_median = statistics.median(runs["plain"]["wall"])
        show(f"\nbatch {size}: plain {size * n / plain_median:.1f} tok/s (median of {rounds} rounds)", ratio)
        results.append({"batch": size, "rounds": rounds, "ratios_vs_plain": ratio, "runs_s": runs})
    return results


def first_token(aligners: dict[str, InferAligner], lengths: list[int], repeats: int) -> list:
    """Time to first token at batch 1: `generate(max_new_tokens=1)` on prompts of exactly `length` tokens."""
    tokenizer = aligners["one pass"].tokenizer
    every = tokenizer(" ".join(builtin_prompts("everyday", "all")) * 20, add_special_tokens=False)["input_ids"]
    gen = {"max_new_tokens": 1, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    rows = []
    for length in lengths:
        ids = torch.tensor([every[:length]])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        methods = generation_methods(aligners, batch, gen, two_pass=True)
        runs = paired_rounds(methods, repeats)
        medians = {name: round(statistics.median(r["wall"]) * 1000, 1) for name, r in runs.items()}
        ratio = summary(runs)
        show(
            f"\ntime to first token, {length} prompt tokens: "
            + ", ".join(f"{k} {v:.0f} ms" for k, v in medians.items()),
            ratio,
        )
        rows.append({"prompt_tokens": length, "median_ms": medians, "ratios_vs_plain": ratio, "runs_s": runs})
    return rows


def step_operations(aligner: InferAligner, prompts: list[str], n: int) -> dict:
    """Operator calls a steered generation adds over plain generation (gate on, batch 1), per decoding step."""
    from torch.profiler import ProfilerActivity, profile

    batch = aligner.encode(prompts[:1])
    gen = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": aligner.tokenizer.pad_token_id}
    aligner.gate = dataclasses.replace(aligner.gate, bias=1e9)

    def counts(call: Callable[[], object]) -> tuple[Counter, int]:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        events = prof.events()
        ops = Counter(e.name for e in events if e.name.startswith("aten::"))
        allocations = sum(1 for e in events if getattr(e, "cpu_memory_usage", 0) > 0)
        return ops, allocations

    def extra(steps: int) -> tuple[Counter, int]:
        gen["max_new_tokens"] = gen["min_new_tokens"] = steps
        plain, plain_alloc = counts(lambda: aligner.model.generate(**batch, **gen))
        ours, ours_alloc = counts(lambda: aligner.generate(**batch, **gen))
        return Counter({k: ours[k] - plain[k] for k in ours | plain if ours[k] != plain[k]}), ours_alloc - plain_alloc

    # The difference between a long and a short run is what each extra decoding step adds.
    short, short_alloc = extra(2)
    long, long_alloc = extra(2 + n)
    per_step = {k: (long[k] - short[k]) / n for k in long | short if long[k] != short[k]}
    layers = len(aligner.steer_layers)
    result = {
        "steered_layers": layers,
        "extra_ops_per_step": {k: round(v, 3) for k, v in sorted(per_step.items())},
        "extra_allocating_ops_per_step": round((long_alloc - short_alloc) / n, 3),
        "extra_ops_once_per_generate": dict(sorted(short.items())),
    }
    print(
        f"\nper decoding step, steering {layers} layers, over plain: {result['extra_ops_per_step']}; "
        f"allocating ops {result['extra_allocating_ops_per_step']}"
    )
    return result


def peers(aligner: InferAligner, prompts: list[str], sizes: list[int], n: int, repeats: int, threads: int) -> list:
    """steering-vectors and repeng on the same layers, vectors and strength, each in its own environment."""
    model_dir = converted_gguf(embedded_gguf_path())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        vectors, prompt_file = Path(tmp) / "directions.safetensors", Path(tmp) / "prompts.json"
        save_file({"directions": aligner.steer_directions.float().contiguous()}, vectors)
        prompt_file.write_text(json.dumps(prompts))
        for peer in PEERS:
            python = ROOT / ".bench-venvs" / peer / "bin" / "python"
            if not python.exists():
                print(f"{peer}: no environment (run bash bench/peers/setup_envs.sh)")
                continue
            out = Path(tmp) / f"{peer}.json"
            command = [
                str(python),
                str(ROOT / "bench/peers/peer_speed.py"),
                "--peer",
                peer,
                "--model",
                str(model_dir),
                "--vectors",
                str(vectors),
                "--layers",
                *map(str, aligner.steer_layers),
                "--alpha",
                str(aligner.settings.alpha),
                "--batch-sizes",
                *map(str, sizes),
                "--new-tokens",
                str(n),
                "--repeats",
                str(repeats),
                "--prompt-file",
                str(prompt_file),
                "--threads",
                str(threads),
                "--out",
                str(out),
            ]
            print(f"\n{peer}: {' '.join(command[1:3])} ...", flush=True)
            subprocess.run(command, check=True)
            found = json.loads(out.read_text())
            for row in found["batches"]:
                ratio = {
                    clock: interval(ratios(row[f"plain_{clock}"], row[f"peer_{clock}"])) for clock in ("wall", "cpu")
                }
                print(
                    f"  {peer} batch {row['batch']}: wall {ratio['wall']['median']:.2%} "
                    f"[{ratio['wall']['low']:.2%}, {ratio['wall']['high']:.2%}]"
                )
                row["ratio_vs_plain"] = ratio
            results.append(found)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, nargs="+", default=[100, 50], help="paired rounds per batch size")
    parser.add_argument("--methods", nargs="+", help="time only these methods against plain (e.g. 'gate on')")
    parser.add_argument("--no-extras", action="store_true", help="throughput only: no TTFT, operators or peers")
    parser.add_argument("--ttft-lengths", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--ttft-rounds", type=int, default=20)
    parser.add_argument("--peer-rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", action="store_true", help="also time steering-vectors and repeng (their venvs)")
    parser.add_argument(
        "--below-gate-layer",
        type=int,
        default=BELOW_GATE["gate_layer"],
        help="gate layer of the 'layers below the gate' layout (steering 12, 16, 20, 24; the demo "
        "pair's gate reads layer 14)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/gating_overhead.json"))
    args = parser.parse_args()

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(min(args.threads, os.cpu_count() or 1))))
    model, tokenizer = load_model()
    below_gate = {**BELOW_GATE, "gate_layer": args.below_gate_layer}
    vectors = extract_safety_vectors(
        model, tokenizer, builtin_prompts("harmful"), builtin_prompts("harmless"), progress=False
    )
    common = {"target_vectors": vectors, "aligned_vectors": vectors}
    aligners = {
        "one pass": InferAligner(model, tokenizer, **common, **ONE_PASS),
        "below gate": InferAligner(model, tokenizer, **common, **below_gate),
    }
    for name, aligner in aligners.items():
        print(f"{name}: gate layer {aligner.gate.layer}, steered {aligner.steer_layers}: {aligner.gating}")
    prompts = builtin_prompts("everyday", "calibration")
    if len(args.rounds) != len(args.batch_sizes):
        parser.error("give one --rounds value per batch size")
    rows = throughput(
        aligners, prompts, dict(zip(args.batch_sizes, args.rounds, strict=True)), args.new_tokens, args.methods
    )
    ttft = [] if args.no_extras else first_token(aligners, args.ttft_lengths, args.ttft_rounds)
    operations = {} if args.no_extras else step_operations(aligners["one pass"], prompts, 16)
    peer_rows = []
    if args.peers and not args.no_extras:
        peer_rows = peers(
            aligners["one pass"], prompts, args.batch_sizes, args.new_tokens, args.peer_rounds, args.threads
        )
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads pinned, "
        f"torch {torch.__version__}, python {sys.version.split()[0]}",
        "model": f"{EMBEDDED_MODEL} (float32)",
        "new_tokens": args.new_tokens,
        "ttft_rounds": args.ttft_rounds,
        "peer_rounds": args.peer_rounds if args.peers else None,
        "layouts": {"one pass": ONE_PASS, "layers below the gate": below_gate},
        "throughput": rows,
        "time_to_first_token": ttft,
        "steering_step": operations,
        "peers": peer_rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
