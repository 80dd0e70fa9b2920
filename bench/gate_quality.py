"""How well a model's own activations separate harmful from harmless prompts (the gate's raw material).

For each model: vectors from the built-in extraction split (64 harmful vs 64 topic-matched [+ 64 everyday]
harmless), measured on the calibration split (96 harmful vs 96 topic-matched and 96 everyday harmless) with the
paper's midpoint bias. Reported per harmless set, at the chosen gate layer and at the best layer, for two choices
of the harmless extraction set. A linear probe (logistic regression on the same extraction prompts) bounds what
any direction at that layer could do.

    python bench/gate_quality.py [--models smollm2-135m-instruct zoo:target zoo:aligned]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from inferaligner.activations import prompt_activations
from inferaligner.gate import choose_gate_layer, layer_metrics, midpoint_bias
from inferaligner.loading import load_model
from inferaligner.prompts import builtin_prompts, format_chats


def probe_accuracy(
    train_pos: torch.Tensor, train_neg: torch.Tensor, test_pos: torch.Tensor, test_neg: torch.Tensor
) -> float:
    """Balanced held-out accuracy of an L2-regularised logistic regression on standardised activations."""
    features = torch.cat([train_pos, train_neg])
    labels = torch.cat([torch.ones(len(train_pos)), torch.zeros(len(train_neg))])
    mean, std = features.mean(0), features.std(0) + 1e-6
    weights = torch.zeros(features.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights, bias], max_iter=300)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = ((features - mean) / std) @ weights + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) + 1e-2 * weights.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        tpr = ((((test_pos - mean) / std) @ weights + bias) > 0).float().mean()
        tnr = ((((test_neg - mean) / std) @ weights + bias) <= 0).float().mean()
    return float((tpr + tnr) / 2)


def measure(name: str) -> dict[str, object]:
    model, tokenizer = load_model(name)

    def acts(kind: str, split: str) -> torch.Tensor:
        return prompt_activations(
            model, tokenizer, format_chats(tokenizer, builtin_prompts(kind, split)), progress=False
        )

    data = {
        (kind, split): acts(kind, split)
        for kind in ("harmful", "harmless", "everyday")
        for split in ("extraction", "calibration")
    }
    report: dict[str, object] = {}
    for label, harmless_sets in (
        ("topic-matched", ("harmless",)),
        ("topic-matched + everyday", ("harmless", "everyday")),
    ):
        harmful = data[("harmful", "extraction")]
        harmless = torch.cat([data[(k, "extraction")] for k in harmless_sets])
        diff = harmful.mean(0) - harmless.mean(0)
        directions = diff / diff.norm(dim=-1, keepdim=True)

        def project(x: torch.Tensor, directions: torch.Tensor = directions) -> torch.Tensor:
            return torch.einsum("nld,ld->nl", x, directions)

        bias = midpoint_bias(project(harmful), project(harmless))
        cal_harmful = project(data[("harmful", "calibration")])
        cal_harmless = torch.cat([project(data[(k, "calibration")]) for k in ("harmless", "everyday")])
        overall = layer_metrics(cal_harmful, cal_harmless, bias)
        layer = choose_gate_layer(overall.accuracy, overall.separation)
        per_set = {
            k: layer_metrics(cal_harmful, project(data[(k, "calibration")]), bias) for k in ("harmless", "everyday")
        }
        probe = probe_accuracy(
            harmful[:, layer],
            data[("harmless", "extraction")][:, layer],
            data[("harmful", "calibration")][:, layer],
            data[("harmless", "calibration")][:, layer],
        )
        report[label] = {
            "gate_layer": layer,
            "balanced_accuracy": round(float(overall.accuracy[layer]), 3),
            "auroc": round(float(overall.auroc[layer]), 3),
            "tpr": round(float(overall.tpr[layer]), 3),
            "fpr_topic_matched": round(float(per_set["harmless"].fpr[layer]), 3),
            "fpr_everyday": round(float(per_set["everyday"].fpr[layer]), 3),
            "accuracy_vs_topic_matched": round(float(per_set["harmless"].accuracy[layer]), 3),
            "best_layer_accuracy_vs_topic_matched": round(float(per_set["harmless"].accuracy.max()), 3),
            "probe_accuracy_vs_topic_matched": round(probe, 3),
        }
        print(f"{name:24s} harmless = {label:26s} " + ", ".join(f"{k} {v}" for k, v in report[label].items()))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "zoo:target", "zoo:aligned"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gate_quality.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    results = {name: measure(name) for name in args.models}
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out} in {results['seconds']} s")


if __name__ == "__main__":
    main()
