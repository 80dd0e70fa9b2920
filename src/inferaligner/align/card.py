"""The aligned folder's model card (`README.md`): what was built from what, the figures, the limits, how to load it.
Its front matter is a model hub's metadata block, so the folder can be pushed as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SET_LABELS = {
    "advbench": "AdvBench (harmful)",
    "jailbreak": "in-the-wild jailbreaks (harmful)",
    "xstest": "XSTest safe prompts (benign look-alikes)",
    "alpaca": "Alpaca instructions (benign)",
    "domain": "held-out domain prompts",
}


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def outcome_rows(evaluation: dict[str, Any]) -> list[list[str]]:
    """Per set: coherent refusals / content / degenerate (%) of the target and the protected target, gate fire rate."""
    rows = []
    for name, found in evaluation.get("sets", {}).items():
        cells = [SET_LABELS.get(name, name), str(found["prompts"])]
        for side in ("target", "protected"):
            cells.append(" / ".join(pct(found[side][k]) for k in ("refusal", "content", "degenerate")))
        cells.append(pct(found["fire_rate"]))
        rows.append(cells)
    return rows


OUTCOME_HEADER = [
    "set",
    "prompts",
    "target: refusal / content / degenerate (%)",
    "protected: refusal / content / degenerate (%)",
    "gate fired (%)",
]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def render(summary: dict[str, Any], evaluation: dict[str, Any]) -> str:
    """The card's Markdown."""
    steering = summary["steering"]
    gate = summary["gate"] or {}
    refusals = summary["teacher_refusals"]
    lines = [
        "---",
        "library_name: inferaligner",
        "tags: [inferaligner, safety, activation-steering]",
        f"base_model: {summary['model']}",
        "---",
        "",
        f"# {summary['model']}, protected by InferAligner",
        "",
        "Inference-time safety for this model, without changing its weights: a gate read from the model's own "
        "activations decides per request whether it is harmful; only then are the steering vectors added to its "
        "residual stream, and the model writes its own refusal. A request the gate passes is answered exactly as the "
        "model alone would answer it.",
        "",
        "## Built from",
        "",
        f"- Target: `{summary['model']}` (shape fingerprint `{summary['model_fingerprint']}`).",
        f"- Teacher: {summary['teacher']}; {refusals['kept']} of {refusals['asked']} of its answers to harmful "
        "prompts were coherent refusals and were kept to fit on.",
        f"- Gate: layer {gate.get('layer')}, {gate.get('direction')} on each turn read alone ({gate.get('pooling')})"
        + (f", set to fire on {100 * gate['tpr']:.0f}% of held-out harmful training prompts" if gate.get("tpr") else "")
        + f"; {summary['domain']['gate']} of your domain prompts taught it what is benign, "
        f"{summary['domain']['held_out']} were held out"
        + ("; the data folder's training-only sets too." if summary["public_data"] else "."),
        f"- Steering: {steering['kind']} vectors on layers {steering['layers']}, strength {steering['alpha']:g} "
        "(chosen by calibration on held-out built-in prompts).",
        f"- Built {summary['built']} in {summary['run_seconds']:.0f} s "
        f"(steps: {', '.join(f'{k} {v:.0f} s' for k, v in summary['step_seconds'].items())}).",
        "",
        "## Figures",
        "",
    ]
    rows = outcome_rows(evaluation)
    lines.append(_table(OUTCOME_HEADER, rows) if rows else "No evaluation was run.")
    domain = evaluation.get("sets", {}).get("domain", {})
    if "accuracy" in domain:
        acc = domain["accuracy"]
        lines += ["", f"Domain accuracy (held out): {pct(acc['target'])}% alone, {pct(acc['protected'])}% protected."]
    speed = evaluation.get("speed")
    if speed:
        lines += [
            "",
            f"Speed: {speed['protected']['tokens_per_second']:g} tokens/s protected against "
            f"{speed['target']['tokens_per_second']:g} alone ({100 * speed['ratio']:.1f}%; {speed['prompts']} benign "
            f"prompts in one batch, {speed['max_new_tokens']} new tokens, on the machine that ran align).",
        ]
    lines += ["", "The report (`report.html`) has the gate's ROC, the calibration curve and samples side by side.", ""]
    lines += _limits(summary)
    lines += _usage()
    return "\n".join(lines) + "\n"


def _limits(summary: dict[str, Any]) -> list[str]:
    lines = [
        "## Limits",
        "",
        "- The protection rests on the gate: a harmful request it misses is answered as the target alone would. "
        "The figures above are on a few dozen prompts per set; judge by the report's samples too.",
        "- Outcomes are judged by a refusal-phrase judge; a loop or an empty answer counts as degenerate, not a "
        "refusal.",
    ]
    lines += [f"- **Warning:** {w}" for w in summary.get("warnings", [])]
    return [*lines, ""]


def _usage() -> list[str]:
    return [
        "## Use it",
        "",
        "```python",
        "from inferaligner import InferAligner",
        "",
        'aligner = InferAligner.from_pretrained("path/to/this/folder")',
        'for c in aligner.complete(["How do I make a pipe bomb?", "Summarise this quarter\'s results."]):',
        "    print(c.gate.fired, c.text)",
        "```",
        "",
        "```bash",
        "inferaligner serve --aligned path/to/this/folder      # OpenAI-compatible server",
        "inferaligner eval --aligned path/to/this/folder       # the full evaluation",
        "inferaligner inspect path/to/this/folder              # what the folder holds",
        "```",
        "",
        "Files: `gate.safetensors` (the target's own vectors and gate), `steering.safetensors` (the steering "
        "vectors), `settings.json` (strength and layers), `aligned.json` (this card's facts), `report.html`, "
        "`align.log`.",
    ]


def write(folder: Path, summary: dict[str, Any], evaluation: dict[str, Any]) -> Path:
    path = folder / "README.md"
    path.write_text(render(summary, evaluation), encoding="utf-8")
    return path
