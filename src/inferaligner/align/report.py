"""`report.html`: one self-contained page (inline SVG plots, no script, no network) with the evidence of an align
run: the gate's ROC and score histograms per set, the calibration curve, outcomes per set, utility, speed and
samples side by side."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inferaligner.align.card import OUTCOME_HEADER, SET_LABELS, outcome_rows, pct

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; text-align: left; }
table.samples { table-layout: fixed; width: 100%; } table.samples th:nth-child(2) { width: 4em; }
td.text { vertical-align: top; white-space: pre-wrap; overflow-wrap: anywhere; }
.warn { background: #fff3cd; border: 1px solid #e0c060; padding: .5em 1em; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
.fired { color: #a00; font-weight: bold; }
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
HARMFUL = ("harmful",)


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"
    matplotlib.rcParams["svg.hashsalt"] = "inferaligner"
    import matplotlib.pyplot as plt

    return plt


def roc_points(positive: Sequence[float], negative: Sequence[float]) -> tuple[list[float], list[float], float]:
    """The ROC curve (false-positive rates, true-positive rates) of scores, and its area."""
    thresholds = sorted(set(positive) | set(negative), reverse=True)
    fpr, tpr = [0.0], [0.0]
    for t in thresholds:
        tpr.append(sum(s >= t for s in positive) / len(positive))
        fpr.append(sum(s >= t for s in negative) / len(negative))
    fpr.append(1.0)
    tpr.append(1.0)
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    return fpr, tpr, area


def _scores(found: dict[str, Any]) -> list[float]:
    return [s for s in found["scores"] if s is not None]


def gate_figure(sets: dict[str, Any]) -> str:
    """ROC of each harmful set against every benign prompt, and the score histogram of every set."""
    plt = _pyplot()
    fig, (roc, hist) = plt.subplots(1, 2, figsize=(10, 3.8))
    benign = [s for f in sets.values() if f["kind"] not in HARMFUL for s in _scores(f)]
    for name, found in sets.items():
        scores = _scores(found)
        if found["kind"] in HARMFUL and benign and scores:
            fpr, tpr, area = roc_points(scores, benign)
            roc.plot(fpr, tpr, label=f"{SET_LABELS.get(name, name)}: AUROC {area:.3f}")
        if scores:
            hist.hist(scores, bins=30, alpha=0.5, label=SET_LABELS.get(name, name))
    roc.plot([0, 1], [0, 1], ":", color="grey")
    roc.set(xlabel="benign prompts the gate fires on", ylabel="harmful prompts it fires on", title="gate ROC")
    hist.axvline(0, color="black", lw=1)
    hist.set(xlabel="gate score (fires above 0)", ylabel="prompts", title="gate scores per set")
    for ax in (roc, hist):
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _svg(fig)


def calibration_figure(rows: Sequence[dict[str, Any]], chosen: float) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [r["strength"] for r in rows]
    ax.plot(x, [100 * r["harmful_refusal"] for r in rows], "o-", label="harmful: coherent refusals")
    ax.plot(x, [100 * r["harmful_degenerate"] for r in rows], "x:", label="harmful: degenerate")
    ax.plot(x, [100 * r["benign_kept"] for r in rows], "s-", label="look-alikes: answers kept")
    ax.axvline(chosen, color="grey", ls="--", label=f"chosen: {chosen:g}")
    ax.set(xlabel="strength (every prompt steered)", ylabel="% of held-out prompts", title="calibration")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _svg(fig)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _samples(name: str, found: dict[str, Any]) -> str:
    rows = []
    for s in found["samples"]:
        fired = '<span class="fired">fired</span>' if s["fired"] else "off"
        cells = [html.escape(s["prompt"][:400]), html.escape(s["target"]), html.escape(s["protected"])]
        rows.append(
            f'<tr><td class="text">{cells[0]}</td><td>{fired}</td><td class="text">{cells[1]}</td>'
            f'<td class="text">{cells[2]}</td></tr>'
        )
    header = "<tr><th>prompt</th><th>gate</th><th>target alone</th><th>protected</th></tr>"
    return f"<h3>{html.escape(SET_LABELS.get(name, name))}</h3><table class='samples'>{header}{''.join(rows)}</table>"


def _utility(sets: dict[str, Any]) -> str:
    rows = []
    for name, found in sets.items():
        if found["kind"] in HARMFUL:
            continue
        acc = found.get("accuracy") or {}
        rows.append(
            [
                SET_LABELS.get(name, name),
                pct(acc.get("target")),
                pct(acc.get("protected")),
                pct(found["target"]["refusal"]),
                pct(found["protected"]["refusal"]),
                pct(found["unchanged"]),
            ]
        )
    header = ["set", "accuracy alone (%)", "accuracy protected (%)", "refused alone (%)", "refused protected (%)"]
    return _table([*header, "answers unchanged (%)"], rows)


def _speed(speed: dict[str, Any] | None) -> str:
    if not speed:
        return "<p>Not measured.</p>"
    rows = [
        [label, f"{speed[label]['tokens_per_second']:g}", f"{speed[label]['seconds']:g}"]
        for label in ("target", "protected")
    ]
    note = (
        f"<p>{speed['prompts']} benign prompts in one batch, {speed['max_new_tokens']} new tokens, greedy, on the "
        f"machine that ran align: protected runs at {100 * speed['ratio']:.1f}% of the target's speed.</p>"
    )
    return _table(["", "tokens/s", "seconds"], rows) + note


def render(summary: dict[str, Any], evaluation: dict[str, Any]) -> str:
    sets = evaluation.get("sets", {})
    steering, refusals = summary["steering"], summary["teacher_refusals"]
    warnings = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in summary.get("warnings", []))
    calibration = summary["calibration"]
    cal_rows = [
        [
            f"{r['strength']:g}",
            pct(r["harmful_refusal"]),
            pct(r["harmful_content"]),
            pct(r["harmful_degenerate"]),
            pct(r["benign_kept"]),
            "yes" if r["strength"] == steering["alpha"] else "",
        ]
        for r in calibration
    ]
    cal_header = ["strength", "refusal (%)", "content (%)", "degenerate (%)", "look-alikes kept (%)", "chosen"]
    parts = [
        f"<h1>{html.escape(summary['model'])}, protected by InferAligner</h1>",
        warnings,
        f"<p>Teacher: {html.escape(summary['teacher'])} ({refusals['kept']} of {refusals['asked']} answers kept as "
        f"coherent refusals). Steering: {html.escape(steering['kind'])} vectors on layers {steering['layers']}, "
        f"strength {steering['alpha']:g}. Built {html.escape(summary['built'])} in {summary['run_seconds']:.0f} s.</p>",
        "<h2>Gate</h2>",
        f"<figure id='gate'>{gate_figure(sets)}</figure>" if sets else "<p>No evaluation.</p>",
        "<h2>Calibration</h2>",
        f"<figure id='calibration'>{calibration_figure(calibration, steering['alpha'])}</figure>",
        _table(cal_header, cal_rows),
        "<h2>Outcomes per set</h2>",
        _table(OUTCOME_HEADER, outcome_rows(evaluation)),
        "<h2>Utility</h2>",
        _utility(sets),
        "<h2>Speed</h2>",
        _speed(evaluation.get("speed")),
        "<h2>Samples</h2>",
        *(_samples(name, found) for name, found in sets.items()),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>InferAligner report: {html.escape(summary['model'])}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )


def write(path: Path, summary: dict[str, Any], evaluation: dict[str, Any]) -> Path:
    path.write_text(render(summary, evaluation), encoding="utf-8")
    return path
