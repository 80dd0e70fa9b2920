"""Which gate generalizes: the paper's mean-difference direction or a logistic probe, at the last prompt token or
averaged over the prompt, on the demo target.

Every gate is built and chosen exactly as `inferaligner extract` does (the built-in gate sets plus 64 of the
domain's training prompts per split; the layer chosen on the calibration split: the mean difference by balanced
accuracy, the probe by its AUROC against each group of held-out harmless prompts, averaged), each with two biases:
its own (the midpoint, or the probe's fitted bias) and the shipped rule (fire on 95% of the held-out harmful
prompts); the probe also with the rule at 90% and 97.5%, to show the trade-off the shipped rule sits on. Then each
is measured on sets it was not built from: AdvBench (520), the jailbreak set (500), XSTest safe and unsafe
prompts, 300 Alpaca instructions and the 300 held-out arithmetic problems. No evaluation set is used to build or
choose anything.

    python bench/gate_pooling.py            # about 15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from inferaligner import zoo
from inferaligner.activations import prompt_activations
from inferaligner.eval import datasets, tasks
from inferaligner.eval.jailbreak import jailbreak_set
from inferaligner.gate import calibrate_bias_tpr, choose_gate_layer, layer_metrics, midpoint_bias, search_probe
from inferaligner.prompts import format_chats, gate_group_sizes, gate_sets
from inferaligner.zoo.recipes import DOMAIN_GATE_PROMPTS, RECIPES

TPR = 0.95  # the shipped rule: fire on 95% of the held-out harmful prompts


def build_sets() -> tuple[dict[str, tuple[list[str], list[str]]], list[int]]:
    """The demo target's gate sets per split, (harmful, harmless), as `extract` builds them (the built-in sets plus
    64 arithmetic training prompts on the harmless side), and the calibration split's harmless groups."""
    domain = RECIPES["target"].domain() if RECIPES["target"].domain else []
    build = {}
    for split, extra in (("extraction", domain[:DOMAIN_GATE_PROMPTS]), ("calibration", domain[-DOMAIN_GATE_PROMPTS:])):
        harmful, harmless = gate_sets(split)  # type: ignore[arg-type]
        build[split] = (harmful, harmless + extra)
    return build, [*gate_group_sizes("calibration"), len(domain[-DOMAIN_GATE_PROMPTS:])]


def unseen_sets() -> dict[str, list[str]]:
    """The sets a gate is measured on; none is used to build or choose it."""
    return {
        "AdvBench": datasets.advbench(),
        "jailbreak": jailbreak_set(50)[0],
        "XSTest unsafe": datasets.xstest("unsafe"),
        "XSTest safe": datasets.xstest("safe"),
        "Alpaca": datasets.alpaca(300),
        "arithmetic": tasks.arithmetic_task().prompts,
    }


def write_result(path: Path, started: float, sizes: dict[str, int], rows: list[dict[str, object]]) -> None:
    """Write a gate bench's rows with the machine, the wall time since `started` and the measured sets' sizes."""
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "seconds": round(time.perf_counter() - started, 1),
        "sizes": sizes,
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path} in {result['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gate_pooling.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    model, tokenizer = zoo.load("target")
    build, groups = build_sets()
    unseen = unseen_sets()
    rows = []
    for pooling in ("last", "mean"):

        def acts(prompts: list[str], pooling: str = pooling) -> torch.Tensor:
            texts = format_chats(tokenizer, prompts)
            return prompt_activations(model, tokenizer, texts, pooling=pooling, batch_size=8, progress=False)

        (harm, safe), (cal_harm, cal_safe) = (
            (acts(h), acts(s)) for h, s in (build["extraction"], build["calibration"])
        )
        measured = {name: acts(prompts) for name, prompts in unseen.items()}
        diff = harm.mean(0) - safe.mean(0)
        directions = diff / diff.norm(dim=-1, keepdim=True)

        def project(a: torch.Tensor, d: torch.Tensor = directions) -> torch.Tensor:
            return torch.einsum("nld,ld->nl", a, d)

        bias = midpoint_bias(project(harm), project(safe))
        cal = layer_metrics(project(cal_harm), project(cal_safe), bias)
        layer = choose_gate_layer(cal.accuracy, cal.separation)
        cal_scores = project(cal_harm)[:, layer]
        gates = {
            ("mean-difference", "midpoint"): (layer, directions[layer], float(bias[layer])),
            ("mean-difference", "tpr 0.95"): (layer, directions[layer], calibrate_bias_tpr(cal_scores, TPR)),
        }
        search = search_probe(harm, safe, cal_harm, cal_safe, groups=groups)
        gates[("probe", "probe's own")] = (search.layer, search.direction, search.bias)
        for tpr in (0.9, TPR, 0.975):  # the shipped rule and one stricter, one looser: the trade-off it sits on
            tpr_bias = calibrate_bias_tpr(cal_harm[:, search.layer] @ search.direction, tpr)
            gates[("probe", f"tpr {tpr:g}")] = (search.layer, search.direction, tpr_bias)
        for (kind, rule), (layer, direction, b) in gates.items():
            fire = {name: float((a[:, layer] @ direction + b > 0).float().mean()) for name, a in measured.items()}
            held_out = {
                "harmful": float((cal_harm[:, layer] @ direction + b > 0).float().mean()),
                "harmless": float((cal_safe[:, layer] @ direction + b > 0).float().mean()),
            }
            rows.append(
                {
                    "pooling": pooling,
                    "direction": kind,
                    "bias": rule,
                    "layer": layer,
                    "calibration_fire_rate": held_out,
                    "fire_rate": fire,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    write_result(args.out, started, {name: len(p) for name, p in unseen.items()}, rows)


if __name__ == "__main__":
    main()
