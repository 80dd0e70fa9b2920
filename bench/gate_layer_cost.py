"""What a cheaper turns-gate read would cost in protection: the demo target's gate fitted at lower layers.

The turns gate reads each new turn alone, blocks 0 to the gate layer (16 on the demo target); on a CPU that read is
compute, and it is what keeps gated serving above `--mode off` (issue 31). A gate at a lower layer reads fewer
blocks. This bench rebuilds the shipped gate's data (`gate_training.gate_prompts` with the demo target's arithmetic
prompts, as `inferaligner zoo vectors target` does), reads every prompt once at each of `--layers`, and fits the
gate there the shipped way (`fit_turns_gate`: a probe per L2, an MLP kept where it ranks better, the bias at 95% of
the calibration harmful prompts). Per layer: the calibration part's pairwise AUROC, the fire rate of each calibration
harmless source at that bias, and the read's time on 256 Alpaca training instructions (blocks 0 to the layer; median
of 5, the chat opening cached as the reader caches it), against the layer-16 read.

Everything here is the gate's own calibration part (how the shipped gate was chosen), not an evaluation set: it says
how much ranking a cheaper read gives up, not what a user would see.

    python bench/gate_layer_cost.py [--layers 4 6 8 10 12 14 16] [--out bench/results/gate_layer_cost.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from inferaligner.aligner import InferAligner
from inferaligner.data import alpaca_training
from inferaligner.demo import demo_aligner
from inferaligner.gate_training import domain_parts, fit_turns_gate, gate_prompts, read_prompts, turn_ids
from inferaligner.reader import RequestReader
from inferaligner.zoo.recipes import DOMAIN_GATE_PROMPTS, RECIPES


def read_ms(aligner: InferAligner, turns: list[list[int]], layer: int, repeats: int = 5) -> float:
    """Median time of one reader pass over `turns` (batches as the reader makes them), blocks 0 to `layer`."""
    reader = RequestReader(aligner.model, aligner.tokenizer, aligner.layers, layer, cache_size=0)
    reader.read([[turns[0]]])  # the opening's cache, built once as in serving
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        reader.read([[turn] for turn in turns])
        times.append(time.perf_counter() - began)
    return round(statistics.median(times) * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 6, 8, 10, 12, 14, 16])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gate_layer_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    aligner = demo_aligner()
    model, tokenizer = aligner.model, aligner.tokenizer
    recipe = RECIPES["target"]
    domain = recipe.domain() if recipe.domain else []
    prompts = gate_prompts(domain_parts(domain, DOMAIN_GATE_PROMPTS))
    layers = sorted(set(args.layers))
    features = read_prompts(model, tokenizer, [p.prompt for p in prompts], layers)
    timing_turns = [turn_ids(tokenizer, p.prompt) for p in alpaca_training(256, 1)]
    assert aligner.gate is not None
    shipped = aligner.gate.layer  # 16
    full = read_ms(aligner, timing_turns, shipped)
    rows = []
    for position, layer in enumerate(layers):
        fit = fit_turns_gate(model, tokenizer, prompts, layers=[layer], features=features[:, [position]])
        harmless = {source: rate for source, rate in fit.fire_rates.items() if source != "harmful"}
        ms = full if layer == shipped else read_ms(aligner, timing_turns, layer)
        rows.append(
            {
                "layer": layer,
                "gate": "mlp" if fit.head is not None else "probe",
                "calibration_auroc": round(fit.auroc[layer], 4),
                "probe_auroc": round(fit.linear_auroc, 4),
                "harmful_fire_rate": fit.fire_rates["harmful"],
                "harmless_fire_rate_max": max(harmless.values()),
                "harmless_fire_rates": harmless,
                "read_ms_256_turns": ms,
                "read_vs_layer_16": round(ms / full, 3),
            }
        )
        row = rows[-1]
        print(
            f"layer {layer:2d}  {row['gate']:5s}  AUROC {row['calibration_auroc']:.4f} (probe {row['probe_auroc']:.4f})"
            f"  worst harmless fire {row['harmless_fire_rate_max']:.3f}"
            f"  read {ms:7.1f} ms ({row['read_vs_layer_16']:.2f}x)",
            flush=True,
        )
    result = {
        "command": "python bench/gate_layer_cost.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "prompts": fit.counts,
        "layers": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
