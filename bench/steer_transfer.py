"""Does the aligned model's steering vector carry refusal into another model? Steering alone, no gate.

The shipped aligned vectors are added (mode "always") to the embedded base SmolLM2 and to the shipped arithmetic
target, for unit vectors (the paper's choice) and raw mean differences, on several layer sets and strengths.
Reported: the share of AdvBench prompts (every 20th of the 520, 26 prompts) that the refusal judge calls
refused, greedy, 48 new tokens, and one example answer per setting.

    python bench/steer_transfer.py [--out bench/results/steer_transfer.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from inferaligner import zoo
from inferaligner.aligner import InferAligner
from inferaligner.eval import datasets
from inferaligner.judges import RefusalJudge
from inferaligner.models import load_model
from inferaligner.vectors import SafetyVectors

SETTINGS = [  # (scale, layers, alpha)
    ("unit", list(range(10, 20)), 4.0),
    ("unit", list(range(10, 20)), 16.0),
    ("unit", list(range(20, 29)), 16.0),
    ("unit", list(range(20, 29)), 32.0),
    ("raw", [19], 3.0),
    ("raw", [24], 4.0),
    ("raw", list(range(12, 20)), 0.5),
    ("raw", list(range(20, 29)), 1.0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/steer_transfer.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    judge = RefusalJudge()
    prompts = datasets.advbench()[::20]
    aligned_vectors = SafetyVectors.load(zoo.vectors_path("aligned"))
    rows = []
    for label, (model, tokenizer) in (
        ("base SmolLM2", load_model("smollm2-135m-instruct")),
        ("arithmetic target", zoo.load("target")),
    ):
        for scale, layers, alpha in [("unit", [], 0.0), *SETTINGS]:
            mode = "off" if not layers else "always"
            aligner = InferAligner(
                model,
                tokenizer,
                aligned_vectors=aligned_vectors,
                mode=mode,
                alpha=alpha or None,
                steer_layers=layers or None,
                steer_scale=scale,
            )
            answers = aligner.complete(prompts, max_new_tokens=48, batch_size=26)
            refused = sum(judge.judge(a.text).refused for a in answers) / len(answers)
            span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else (str(layers[0]) if layers else "none")
            rows.append(
                {
                    "model": label,
                    "scale": scale if layers else "-",
                    "layers": span,
                    "alpha": alpha,
                    "refused": round(refused, 3),
                    "example": answers[1].text[:120],
                }
            )
            print(
                f"{label:18s} {rows[-1]['scale']:4s} layers {span:6s} alpha {alpha:4g}: refused {refused:.0%}",
                flush=True,
            )
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "prompts": len(prompts),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
