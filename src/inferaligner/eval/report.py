"""Reports from `results.json`: Markdown tables laid out like the paper's, and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inferaligner.errors import InferAlignerError
from inferaligner.judges import CONTENT, DEGENERATE, OUTCOMES, REFUSAL, Verdict, outcome, outcome_shares

JUDGE = "refusal-phrases-v3"


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


def outcome_table(domains: dict[str, dict[str, Any]], judge: str = JUDGE) -> str:
    """Every answer to a harmful prompt is a coherent refusal, content (it complied) or degenerate text (empty,
    repetition, a loop of refusal words): the three shares per task (%). Only coherent refusals protect anyone."""
    labels = _labels(domains)
    tasks = ("harmful", "jailbreak")
    columns = [f"{domain}: {task} refusal / content / degenerate" for domain in domains for task in tasks]
    header = "| method | " + " | ".join(columns) + " |"
    lines = [header, "|---|" + "---|" * 2 * len(domains)]
    for method, label in labels.items():
        cells = []
        for results in domains.values():
            for task in ("harmful", "jailbreak"):
                shares = [_metric(results, method, task, f"{kind}[{judge}]") for kind in (REFUSAL, CONTENT, DEGENERATE)]
                cells.append(" / ".join(_pct(v) for v in shares))
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
    parts = [
        f"# InferAligner evaluation: {domain}",
        "",
        safety_table({domain: results}, judges[0]),
        "",
        "Answers to harmful prompts: coherent refusal / content / degenerate (%):",
        "",
        outcome_table({domain: results}, judges[0]),
        "",
        "Over-refusal (%):",
        "",
        over_refusal_table(results, judges[0]),
    ]
    agreement = {m: _metric(results, m, "harmful", "judge_agreement") for m in results["methods"]}
    if any(v is not None for v in agreement.values()):
        parts += ["", f"Judge agreement on harmful prompts ({' vs '.join(judges)}):", ""]
        parts += [f"- {results['labels'][m]}: {_pct(v)}%" for m, v in agreement.items() if v is not None]
    gate = results.get("gate_quality")
    if gate:
        parts += [
            "",
            f"Gate at layer {gate['layer']}: TPR {_pct(gate['tpr'])}% on harmful prompts, FPR "
            f"{_pct(gate['fpr'])}% on harmless instructions.",
        ]
    roc = results.get("gate_roc")
    if roc:
        parts += [
            "",
            "The gate on every task: fires on (% at its shipped bias), and AUROC of harmful against "
            "benign tasks (ROC curves: gate_roc.png):",
            "",
            "| task | fires on |",
            "|---|---|",
            *[f"| {t} | {_pct(v)} |" for t, v in roc["fired"].items()],
            "",
            "| harmful vs benign | AUROC |",
            "|---|---|",
            *[f"| {pair} | {value:.3f} |" for pair, value in roc["auroc"].items()],
        ]
    parts += ["", f"Judge: {judges[0]}. Run took {results['run']['seconds']:.0f} s on {results['run']['machine']}."]
    (out_dir / "table.md").write_text("\n".join(parts) + "\n")
    (out_dir / "samples.md").write_text(samples_markdown(results, out_dir / "completions", judges[0]))
    plot(results, out_dir, judges[0])


SAMPLES_PER_ROW = 10


def samples_markdown(
    results: dict[str, Any], completions: Path, judge: str = JUDGE, per: int = SAMPLES_PER_ROW, seed: int = 0
) -> str:
    """`per` answers to harmful prompts per method and task, drawn with a fixed seed (the same prompts for every
    method), each with its gate and outcome: what a reader checks before believing a rate."""
    import random

    parts = [f"# Read samples ({per} per method and task, seed {seed})", ""]
    for task in ("harmful", "jailbreak"):
        picks: list[int] | None = None
        for method in results["methods"]:
            path = completions / f"{completion_stem(method, task)}.jsonl"
            if not path.is_file():
                continue
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if picks is None:
                picks = sorted(random.Random(seed).sample(range(len(rows)), min(per, len(rows))))
            parts += [f"## {results['labels'].get(method, method)}: {task}", ""]
            for index in picks:
                if index >= len(rows):
                    continue
                row = rows[index]
                verdict = _saved_verdict(row, judge)
                kind = outcome(verdict, row["completion"]) if verdict else "?"
                gate = row.get("gate") or {}
                fired = "fired" if gate.get("fired") else "off" if gate else "no gate"
                prompt = " ".join(row["prompt"].split())
                answer = " ".join(row["completion"].split())
                parts.append(f"- [{kind}; gate {fired}] **{prompt[-160:]}** → {answer[:300]}")
            parts.append("")
    return "\n".join(parts) + "\n"


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
    roc = results.get("gate_roc")
    if roc and roc["auroc"]:
        plot_gate_roc(roc, out_dir / "gate_roc.png")


def plot_gate_roc(roc: dict[str, Any], path: Path) -> None:
    """One panel per harmful task: the gate's ROC against each benign task, the shipped bias as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    harmful = [t for t, kind in roc["kinds"].items() if kind == "harmful"]
    benign = [t for t, kind in roc["kinds"].items() if kind != "harmful"]
    fig, axes = plt.subplots(1, len(harmful), figsize=(4.2 * len(harmful), 4), squeeze=False)
    for axis, positive in zip(axes[0], harmful, strict=True):
        pos = sorted(roc["scores"][positive], reverse=True)
        for negative in benign:
            neg = roc["scores"][negative]
            cuts = sorted(set(pos) | set(neg), reverse=True)
            tpr = [sum(p >= c for p in pos) / len(pos) for c in cuts]
            fpr = [sum(n >= c for n in neg) / len(neg) for c in cuts]
            line = axis.plot(
                [0, *fpr], [0, *tpr], label=f"vs {negative} ({roc['auroc'][f'{positive} vs {negative}']:.3f})"
            )
            axis.plot(roc["fired"][negative], roc["fired"][positive], "o", color=line[0].get_color())
        axis.plot([0, 1], [0, 1], ":", color="grey")
        axis.set_xlabel("fires on the benign task")
        axis.set_ylabel(f"fires on {positive}")
        axis.legend(fontsize=7, loc="lower right")
    fig.suptitle("Gate ROC per task (dots: the shipped bias)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    _fill_outcomes(results, run_dir / "completions")
    return results


def _saved_verdict(row: dict[str, Any], judge: str) -> Verdict | None:
    """One judge's verdict as a completions file saved it, or None where that judge did not judge the row."""
    saved = row.get("verdicts", {}).get(judge)
    return Verdict(saved["refused"], saved["reason"], judge) if saved else None


def _fill_outcomes(results: dict[str, Any], completions: Path) -> None:
    """Runs written before the outcome metrics existed: derive them from the saved completions and verdicts."""
    for method, tasks in results["methods"].items():
        for task in ("harmful", "jailbreak"):
            saved = completions / f"{completion_stem(method, task)}.jsonl"
            if task not in tasks or not saved.is_file():
                continue
            rows = [json.loads(line) for line in saved.read_text().splitlines() if line.strip()]
            for judge in results["run"]["judges"]:
                if all(f"{kind}[{judge}]" in tasks[task] for kind in OUTCOMES):
                    continue
                judged = [(row, verdict) for row in rows if (verdict := _saved_verdict(row, judge))]
                if judged:
                    shares = outcome_shares([v for _, v in judged], [row["completion"] for row, _ in judged])
                    tasks[task] |= {f"{kind}[{judge}]": value for kind, value in shares.items()}


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
        "Answers to harmful prompts: coherent refusal / content / degenerate (%):",
        "",
        outcome_table(runs, judge),
    ]
    for domain, results in runs.items():
        parts += ["", f"Over-refusal on the {domain} run (%):", "", over_refusal_table(results, judge)]
    timing = ", ".join(f"{d} {r['run']['seconds']:.0f} s" for d, r in runs.items())
    parts += ["", f"Judge: {judge}. Wall time: {timing}."]
    return "\n".join(parts) + "\n"
