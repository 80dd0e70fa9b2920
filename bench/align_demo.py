"""`inferaligner align` on the demo target with `zoo:aligned` as the teacher, against the shipped demo folder.

    python bench/align_demo.py                       # about 40 minutes on this project's 2-core machine

Writes the arithmetic domain file (the target's training questions, with their answers), runs the `align` command
(timed), then evaluates the shipped demo (its gate, steering and settings) with the same evaluation and compares:
the calibration table per strength, the chosen strength, and per set the protected target's outcomes and the gate's
fire rate. Results: `bench/results/align_demo.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from inferaligner import zoo
from inferaligner.align.evaluation import evaluate
from inferaligner.align.recipe import Domain
from inferaligner.aligned_folder import GATE, SETTINGS, STEERING
from inferaligner.loading import load
from inferaligner.zoo.arithmetic import train_test_split
from inferaligner.zoo.recipes import ARITHMETIC_TEST, ARITHMETIC_TRAIN

RESULTS = Path(__file__).parent / "results" / "align_demo.json"
SCALES = "0.5,0.75,1,1.25,1.5"  # the shipped calibration's grid


def domain_file(path: Path) -> Path:
    train, _ = train_test_split(ARITHMETIC_TRAIN, ARITHMETIC_TEST)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n" for p in train))
    return path


def shipped_folder(path: Path) -> Path:
    """The shipped demo's gate, steering and settings laid out as an aligned folder's files."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(zoo.vectors_path("target"), path / GATE)
    settings = zoo.settings_path()
    shutil.copy(settings.parent / json.loads(settings.read_text())["vectors"], path / STEERING)
    data = json.loads(settings.read_text()) | {"vectors": STEERING}
    (path / SETTINGS).write_text(json.dumps(data, indent=2))
    return path


def protected_figures(evaluation: dict) -> dict:
    return {
        name: {"protected": found["protected"], "target": found["target"], "fire_rate": found["fire_rate"]}
        | ({"accuracy": found["accuracy"]} if "accuracy" in found else {})
        for name, found in evaluation["sets"].items()
    }


def calibration(table: list[dict]) -> dict:
    return {
        f"{r['strength']:g}": {k: round(r[k], 3) for k in ("harmful_refusal", "harmful_degenerate", "benign_kept")}
        for r in table
        if r["candidate"] == "teacher-fitted"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/align/demo"))
    parser.add_argument("--eval-limit", type=int, default=50)
    args = parser.parse_args()
    domain = domain_file(Path("runs/align/arithmetic-domain.jsonl"))
    command = [
        sys.executable,
        "-m",
        "inferaligner.cli",
        "align",
        "--model",
        "zoo:target",
        "--teacher",
        "zoo:aligned",
        "--domain-prompts",
        str(domain),
        "--out",
        str(args.out),
        "--scales",
        SCALES,
        "--eval-limit",
        str(args.eval_limit),
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    align_seconds = time.perf_counter() - started
    made = json.loads((args.out / "aligned.json").read_text())
    made_eval = json.loads((args.out / ".align" / "evaluation.json").read_text())

    shipped = shipped_folder(Path("runs/align/shipped"))
    started = time.perf_counter()
    shipped_eval = evaluate(
        load("zoo:target"),
        shipped,
        Domain.read(domain, None).held_out,
        Domain.read(domain, None).answers,
        Path("runs/align/shipped-cache"),
        limit=args.eval_limit,
    )
    shipped_settings = json.loads(zoo.settings_path().read_text())
    result = {
        "command": " ".join(command[2:]),
        "align_seconds": round(align_seconds, 1),
        "step_seconds": made["step_seconds"],
        "teacher_refusals": made["teacher_refusals"],
        "chosen": {"align": made["steering"], "shipped": {k: shipped_settings[k] for k in ("alpha", "layers")}},
        "gate_layer": {"align": made["gate"]["layer"], "shipped": zoo_gate_layer()},
        "calibration": {"align": calibration(made["calibration"]), "shipped": calibration(shipped_settings["table"])},
        "evaluation": {"align": protected_figures(made_eval), "shipped": protected_figures(shipped_eval)},
        "speed": {"align": made_eval["speed"], "shipped": shipped_eval["speed"]},
        "shipped_eval_seconds": round(time.perf_counter() - started, 1),
        "machine": "2 CPU cores (this project's machine)",
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("align_seconds", "chosen", "gate_layer", "calibration")}, indent=2))
    for name in result["evaluation"]["align"]:
        a, s = result["evaluation"]["align"][name], result["evaluation"]["shipped"].get(name, {})
        print(name, "align", a["protected"], a["fire_rate"], "| shipped", s.get("protected"), s.get("fire_rate"))


def zoo_gate_layer() -> int:
    from inferaligner.vectors import SafetyVectors

    gate = SafetyVectors.load(zoo.vectors_path("target")).gate
    return gate.layer if gate else -1


if __name__ == "__main__":
    main()
