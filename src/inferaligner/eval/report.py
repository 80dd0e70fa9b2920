"""Reports from `results.json`: Markdown tables laid out like the paper's, and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inferaligner.errors import InferAlignerError
from inferaligner.eval.judges import degenerate_share

JUDGE = "refusal-phrases-v1"


def completion_stem(method: str, task: str) -> str:
    """File name (without suffix) of one method's completions on one task in an output folder's `completions/`."""
    return "--".join("".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) for name in (method, task))


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _metric(results: dict[str, Any], method: str, task: str, key: str) -> float | None:
    return results["methods"].get(method, {}).get(task, {}).get(key)


def safety_table(domains: dict[str, dict[str, Any]], judge: str = JUDGE) -> str:
    """Rows: methods. Columns: for each domain, harmful ASR / jailbreak ASR / utility accuracy (%)."""
    labels = _labels(domains)
    header = "| method | " + " | ".join(f"{d}: ASR / jailbreak ASR / accuracy" for d in domains) + " |"
    lines = [header, "|---|" + "---|" * len(domains)]
    for method, label in labels.items():
        cells = []
        for results in domains.values():
            asr = _metric(results, method, "harmful", f"asr[{judge}]")
            if asr is None:
                asr = _metric(results, method, "mm_harmful", f"asr[{judge}]")
            jailbreak = _metric(results, method, "jailbreak", f"asr[{judge}]")
            accuracy = _metric(results, method, "utility", "accuracy")
            if accuracy is None:
                accuracy = _metric(results, method, "mm_utility", "accuracy")
            cells.append(f"{_pct(asr)} / {_pct(jailbreak)} / {_pct(accuracy)}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def content_table(domains: dict[str, dict[str, Any]], judge: str = JUDGE) -> str:
    """The ASR split in two: completions that comply with content, and degenerate ones (repetition, no words)
    that a phrase judge counts as attack successes although they carry nothing harmful (%)."""
    labels = _labels(domains)
    columns = [f"{domain}: {task} content / degenerate" for domain in domains for task in ("harmful", "jailbreak")]
    header = "| method | " + " | ".join(columns) + " |"
    lines = [header, "|---|" + "---|" * 2 * len(domains)]
    for method, label in labels.items():
        cells = []
        for results in domains.values():
            for task in ("harmful", "jailbreak"):
                asr = _metric(results, method, task, f"asr[{judge}]")
                degenerate = _metric(results, method, task, f"degenerate[{judge}]")
                content = None if asr is None or degenerate is None else asr - degenerate
                cells.append(f"{_pct(content)} / {_pct(degenerate)}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _labels(domains: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Every method of any run, in the order first seen, with its label."""
    labels: dict[str, str] = {}
    for results in domains.values():
        labels |= {m: results["labels"].get(m, m) for m in results["methods"] if m not in labels}
    return labels


def over_refusal_table(results: dict[str, Any], judge: str = JUDGE) -> str:
    """Rows: methods. Columns: refusal rate and gate fire rate on XSTest safe prompts and on harmless instructions."""
    lines = ["| method | XSTest safe: refused | gate fired | harmless: refused | gate fired |", "|---|---|---|---|---|"]
    for method in results["methods"]:
        label = results["labels"].get(method, method)
        cells = [
            _pct(_metric(results, method, task, key))
            for task in ("xstest", "harmless")
            for key in (f"refusal[{judge}]", "gate_fire_rate")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: dict[str, Any], out_dir: Path, domain: str) -> None:
    """table.md and the plots for one run."""
    judges = results["run"]["judges"]
    parts = [f"# InferAligner evaluation: {domain}", "", safety_table({domain: results}, judges[0]), "",
             "Attack successes split into content / degenerate text (%):", "", content_table({domain: results},
             judges[0]), "", "Over-refusal (%):", "", over_refusal_table(results, judges[0])]  # fmt: skip
    agreement = {m: _metric(results, m, "harmful", "judge_agreement") for m in results["methods"]}
    if any(v is not None for v in agreement.values()):
        parts += ["", f"Judge agreement on harmful prompts ({' vs '.join(judges)}):", ""]
        parts += [f"- {results['labels'][m]}: {_pct(v)}%" for m, v in agreement.items() if v is not None]
    gate = results.get("gate_quality")
    if gate:
        parts += ["", f"Gate at layer {gate['layer']}: TPR {_pct(gate['tpr'])}% on harmful prompts, FPR "
                  f"{_pct(gate['fpr'])}% on harmless instructions."]  # fmt: skip
    parts += ["", f"Judge: {judges[0]}. Run took {results['run']['seconds']:.0f} s on {results['run']['machine']}."]
    (out_dir / "table.md").write_text("\n".join(parts) + "\n")
    plot(results, out_dir, judges[0])


def plot(results: dict[str, Any], out_dir: Path, judge: str = JUDGE) -> None:
    """asr.png (ASR per method), over_refusal.png (over-refusal vs ASR), gate_layers.png (per-layer accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"])
    labels = [results["labels"][m] for m in methods]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.4
    for offset, task in ((-width / 2, "harmful"), (width / 2, "jailbreak")):
        values = [100 * (_metric(results, m, task, f"asr[{judge}]") or 0) for m in methods]
        ax.bar([i + offset for i in range(len(methods))], values, width, label=f"{task} ASR")
    ax.set_xticks(range(len(methods)), labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("attack success rate (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "asr.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = "osD^vP*Xh<>"  # a legend rather than labels on the points: methods often coincide
    for index, (method, label) in enumerate(zip(methods, labels, strict=True)):
        x = _metric(results, method, "xstest", f"refusal[{judge}]")
        y = _metric(results, method, "harmful", f"asr[{judge}]")
        if x is not None and y is not None:
            ax.scatter(100 * x, 100 * y, marker=markers[index % len(markers)], s=60, alpha=0.7, label=label)
    ax.legend(fontsize=7)
    ax.set_xlabel("over-refusal: XSTest safe prompts refused (%)")
    ax.set_ylabel("harmful ASR (%)")
    ax.set_title("Lower left is better")
    fig.tight_layout()
    fig.savefig(out_dir / "over_refusal.png", dpi=120)
    plt.close(fig)

    gate = results.get("gate_quality")
    if gate:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(gate["per_layer_accuracy"], "o-", label="balanced accuracy (midpoint bias)")
        ax.plot(gate["per_layer_auroc"], "s-", label="AUROC")
        ax.axvline(gate["layer"], color="grey", linestyle=":", label=f"gate layer {gate['layer']}")
        ax.set_xlabel("layer")
        ax.set_ylim(0.4, 1.02)
        ax.set_title("Target's own vectors: harmful vs harmless")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "gate_layers.png", dpi=120)
        plt.close(fig)


def load_results(run_dir: Path) -> dict[str, Any]:
    """The `results.json` of one `inferaligner eval` output folder."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise InferAlignerError(f"no results.json in {run_dir}: run `inferaligner eval --out {run_dir}` first")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InferAlignerError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(results, dict) or not {"methods", "labels", "run"} <= set(results):
        raise InferAlignerError(f"{path} is not an `inferaligner eval` results file (no methods, labels and run)")
    _fill_degenerate(results, run_dir / "completions")
    return results


def _fill_degenerate(results: dict[str, Any], completions: Path) -> None:
    """Runs written before the `degenerate[...]` metric existed: derive it from the saved verdicts."""
    for method, tasks in results["methods"].items():
        for task in ("harmful", "jailbreak"):
            saved = completions / f"{completion_stem(method, task)}.jsonl"
            if task not in tasks or not saved.is_file():
                continue
            rows = [json.loads(line) for line in saved.read_text().splitlines() if line.strip()]
            for judge in results["run"]["judges"]:
                reasons = [row["verdicts"][judge]["reason"] for row in rows if judge in row.get("verdicts", {})]
                if f"degenerate[{judge}]" not in tasks[task] and reasons:
                    tasks[task][f"degenerate[{judge}]"] = degenerate_share(reasons)


def combined_report(run_dirs: Sequence[Path]) -> str:
    """The paper's layout over several runs (one domain each, named by its recorded domain or folder), then each run's
    over-refusal table and wall time."""
    runs = {}
    for run_dir in run_dirs:
        results = load_results(run_dir)
        runs[results["run"].get("domain") or run_dir.name] = results
    judge = next(iter(runs.values()))["run"]["judges"][0]
    parts = [
        "Harmful ASR / jailbreak ASR / domain accuracy (%):",
        "",
        safety_table(runs, judge),
        "",
        "Attack successes split into content / degenerate text (%):",
        "",
        content_table(runs, judge),
    ]
    for domain, results in runs.items():
        parts += ["", f"Over-refusal on the {domain} run (%):", "", over_refusal_table(results, judge)]
    timing = ", ".join(f"{d} {r['run']['seconds']:.0f} s" for d, r in runs.items())
    parts += ["", f"Judge: {judge}. Wall time: {timing}."]
    return "\n".join(parts) + "\n"
