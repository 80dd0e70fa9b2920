"""The shipped demo pair measured: refusal rates, arithmetic accuracy, an alpha sweep, layer sets, gate scores.

Greedy decoding, 64 new tokens, the offline refusal judge. Data from ../shared/data: all 520 AdvBench prompts,
300 Alpaca instructions (seed 0), the 250 XSTest safe prompts; 300 held-out generated arithmetic problems.
Completions are cached under --cache, so an interrupted run resumes. Gated runs generate only the prompts whose
gate fires; the others are token-identical to the target's own answers and are taken from that run.

    python bench/demo_pair.py                      # full run (about 45 minutes on 2 CPU cores)
    python bench/demo_pair.py --quick              # a few prompts per set, to check the plumbing
    python bench/demo_pair.py --save-settings      # also write the demo's mean-difference settings (the paper's row)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from inferaligner import zoo
from inferaligner.aligner import Completion, InferAligner
from inferaligner.eval import datasets
from inferaligner.eval.generation import gate_all, gated_completions, generate_cached
from inferaligner.judges import RefusalJudge
from inferaligner.vectors import SafetyVectors
from inferaligner.zoo.arithmetic import parse_answer, train_test_split
from inferaligner.zoo.recipes import ARITHMETIC_TEST, ARITHMETIC_TRAIN

ALPHAS = (1.0, 2.0, 4.0, 8.0, 16.0)  # alpha 0 is the plain target (the headline's first row)
# Raw mean differences (steer_scale="raw"): on this pair the unit vectors of the paper barely move the target
# (see docs/results/efficacy.md), and one late layer transfers better than a band of layers.
STEER_SCALE = "raw"
LAYER_ALPHA = 4.0
LAYER_SETS = {
    "layer 19": [19],
    "layer 22": [22],
    "layer 24": [24],
    "layer 26": [26],
    "middle 10-19": list(range(10, 20)),
    "late 20-28": list(range(20, 29)),
}
JUDGE = RefusalJudge()


def refusal_rate(completions: list[Completion]) -> float:
    return sum(JUDGE.judge(c.text).refused for c in completions) / len(completions)


def accuracy(completions: list[Completion], answers: list[int]) -> float:
    return sum(parse_answer(c.text) == a for c, a in zip(completions, answers, strict=True)) / len(answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 prompts per set")
    parser.add_argument("--cache", type=Path, default=Path("runs/demo_pair"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/demo_pair.json"))
    parser.add_argument("--plots", type=Path, default=Path("docs/img"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sweep-size", type=int, default=48, help="prompts per set in the sweeps")
    parser.add_argument(
        "--save-settings", action="store_true", help="write the chosen mean-difference settings for the demo"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    n = 8 if args.quick else None
    sweep_n = 8 if args.quick else args.sweep_size
    _, test = train_test_split(ARITHMETIC_TRAIN, ARITHMETIC_TEST)
    sets = {
        "advbench": datasets.advbench()[:n],
        "alpaca": datasets.alpaca(300)[:n],
        "xstest_safe": datasets.xstest("safe")[:n],
        "arithmetic": [p.question for p in test][:n],
    }
    answers = [p.answer for p in test][: len(sets["arithmetic"])]
    cache = args.cache / ("quick" if args.quick else "full")
    gen = {"max_new_tokens": 64, "batch_size": args.batch_size}

    target, tokenizer = zoo.load("target")
    target_vectors = SafetyVectors.load(zoo.vectors_path("target"))
    aligned_vectors = SafetyVectors.load(zoo.vectors_path("aligned"))
    plain = InferAligner(target, tokenizer, target_vectors=target_vectors, mode="off")
    target_runs = {
        name: generate_cached(plain, prompts, cache / f"target-{name}.jsonl", desc=f"target {name}", **gen)
        for name, prompts in sets.items()
    }

    def aligner(alpha: float, layers: list[int], mode: str = "inferaligner") -> InferAligner:
        return InferAligner(
            target,
            tokenizer,
            target_vectors=target_vectors,
            aligned_vectors=aligned_vectors,
            mode=mode,
            alpha=alpha,
            steer_layers=layers,
            steer_scale=STEER_SCALE,
        )

    def gated(ia: InferAligner, name: str, count: int | None = None) -> list[Completion]:
        prompts, base = sets[name][:count], target_runs[name][:count]
        how = ia.describe()
        tag = f"{name}-{how['mode']}-{how['scale']}-{how['alpha']:g}-{how['layers'][0]}-{how['layers'][-1]}"
        return gated_completions(ia, prompts, base, cache / f"ia-{tag}.jsonl", desc=tag, **gen)

    # 1. Layer sets at a middle alpha, then the alpha sweep on the best set (gated), and without the gate.
    layer_rows = []
    for label, layers in LAYER_SETS.items():
        runs = {name: gated(aligner(LAYER_ALPHA, layers), name, sweep_n) for name in ("advbench", "arithmetic")}
        layer_rows.append(
            {
                "layers": label,
                "alpha": LAYER_ALPHA,
                "advbench_refusal": refusal_rate(runs["advbench"]),
                "arithmetic_accuracy": accuracy(runs["arithmetic"], answers[:sweep_n]),
            }
        )
        print(f"layers {label:13s} alpha {LAYER_ALPHA:g}: AdvBench refusal {layer_rows[-1]['advbench_refusal']:.1%}")
    best_layers = max(layer_rows, key=lambda r: r["advbench_refusal"])["layers"]
    sweep = []
    for alpha in ALPHAS:
        ia = aligner(alpha, LAYER_SETS[best_layers])
        always = aligner(alpha, LAYER_SETS[best_layers], mode="always")
        adv, math = gated(ia, "advbench", sweep_n), gated(ia, "arithmetic", sweep_n)
        math_always = generate_cached(
            always,
            sets["arithmetic"][:sweep_n],
            cache / f"always-{STEER_SCALE}-{alpha:g}-{best_layers}.jsonl",
            desc=f"always alpha {alpha:g}",
            **gen,
        )
        sweep.append(
            {
                "alpha": alpha,
                "advbench_refusal": refusal_rate(adv),
                "arithmetic_accuracy": accuracy(math, answers[:sweep_n]),
                "arithmetic_accuracy_no_gate": accuracy(math_always, answers[:sweep_n]),
            }
        )
        print(
            f"alpha {alpha:4g}: AdvBench refusal {sweep[-1]['advbench_refusal']:.1%}, arithmetic "
            f"{sweep[-1]['arithmetic_accuracy']:.1%} (no gate {sweep[-1]['arithmetic_accuracy_no_gate']:.1%})"
        )
    # The smallest alpha within one point of the best refusal rate.
    top = max(row["advbench_refusal"] for row in sweep)
    best_alpha = min(row["alpha"] for row in sweep if row["advbench_refusal"] >= top - 0.01)
    chosen = {
        "alpha": best_alpha,
        "steer_layers": LAYER_SETS[best_layers],
        "steer_scale": STEER_SCALE,
        "layer_set": best_layers,
    }
    print(f"chosen: alpha {best_alpha:g}, layers {best_layers}")

    # 2. The headline runs at the chosen settings.
    ia = aligner(best_alpha, LAYER_SETS[best_layers])
    ia_runs = {name: gated(ia, name) for name in sets}
    aligned_model, aligned_tok = zoo.load("aligned")
    aligned = InferAligner(aligned_model, aligned_tok, mode="off")
    aligned_runs = {
        name: generate_cached(aligned, sets[name], cache / f"aligned-{name}.jsonl", desc=f"aligned {name}", **gen)
        for name in ("advbench", "alpaca", "xstest_safe")  # its arithmetic is not the question here
    }
    headline: dict[str, Any] = {}
    for label, runs in (("target", target_runs), ("target + InferAligner", ia_runs), ("aligned", aligned_runs)):
        headline[label] = {
            f"{name}_refusal": refusal_rate(runs[name]) for name in ("advbench", "alpaca", "xstest_safe")
        }
        if "arithmetic" in runs:
            headline[label]["arithmetic_accuracy"] = accuracy(runs["arithmetic"], answers)
    gate_scores = {name: [d.score for d in gate_all(ia, prompts)] for name, prompts in sets.items()}
    fire_rates = {name: sum(d.fired for d in gate_all(ia, prompts)) / len(prompts) for name, prompts in sets.items()}
    for label, row in headline.items():
        print(f"{label:22s} " + "  ".join(f"{k} {v:.1%}" for k, v in row.items()))
    print("gate fire rate: " + "  ".join(f"{k} {v:.1%}" for k, v in fire_rates.items()))

    examples = {
        label: [c.as_dict() for c in runs["advbench"][:3]]
        for label, runs in (("target", target_runs), ("target + InferAligner", ia_runs), ("aligned", aligned_runs))
    }
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "seconds": round(time.perf_counter() - started, 1),
        "quick": args.quick,
        "judge": JUDGE.name,
        "sizes": {name: len(prompts) for name, prompts in sets.items()},
        "sweep_size": sweep_n,
        "chosen": chosen,
        "headline": headline,
        "gate_fire_rate": fire_rates,
        "gate_layer": ia.gate.layer,
        "layer_sets": layer_rows,
        "alpha_sweep": sweep,
        "examples": examples,
        "cards": {name: zoo.card(name) for name in zoo.NAMES},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(sweep, layer_rows, gate_scores, ia.gate.layer, args.plots)
    if args.save_settings and not args.quick:
        from inferaligner.settings import SteeringSettings

        path = Path(str(zoo.artifact_dir("target").parent / zoo.SETTINGS["mean-difference"]))
        SteeringSettings(
            str(zoo.vectors_path("aligned")),
            float(best_alpha),
            tuple(LAYER_SETS[best_layers]),
            STEER_SCALE,
            "mean-difference",
            "mean-difference",
            "bench/demo_pair.py",
        ).save(path)
        print(f"wrote {path}")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


def plot(
    sweep: list[dict], layer_rows: list[dict], gate_scores: dict[str, list[float]], layer: int, folder: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    alphas = [row["alpha"] for row in sweep]
    left.plot(alphas, [1 - row["advbench_refusal"] for row in sweep], "o-", label="AdvBench ASR (gated)")
    left.plot(alphas, [row["arithmetic_accuracy"] for row in sweep], "s-", label="arithmetic accuracy (gated)")
    left.plot(
        alphas, [row["arithmetic_accuracy_no_gate"] for row in sweep], "s--", label="arithmetic accuracy (no gate)"
    )
    left.set_xscale("symlog", linthresh=1)
    left.set_xlabel("alpha")
    left.set_ylim(-0.02, 1.02)
    left.set_title("Steering strength")
    left.legend(fontsize=8)
    labels = [row["layers"] for row in layer_rows]
    right.bar(labels, [1 - row["advbench_refusal"] for row in layer_rows], label="AdvBench ASR")
    right.set_title(f"Steered layers ({STEER_SCALE} vectors, alpha {LAYER_ALPHA:g})")
    right.set_ylabel("attack success rate")
    right.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(folder / "alpha_sweep.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, scores in gate_scores.items():
        ax.hist(scores, bins=40, alpha=0.5, label=f"{name} ({len(scores)})")
    ax.axvline(0, color="black", linewidth=1)
    ax.set_xlabel(f"gate score at layer {layer} (fires above 0)")
    ax.set_ylabel("prompts")
    ax.set_title("Gate projection scores on the target")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "gate_scores.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
