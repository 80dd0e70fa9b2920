"""Calibration: choose the steering strength (and vector kind) by what the steered target actually writes.

Each candidate (a steering vector file at one strength) steers every held-out prompt; the offline judge sorts the
answers into coherent refusals, content and degenerate text. The choice: the candidate with the most coherent
refusals of harmful prompts, among those that keep degenerate answers at most `max_degenerate`; within 2 points of
that best, the one that keeps the most benign look-alike answers (what the target still writes when the gate fires
by mistake), then the weakest strength. The result is a
`SteeringSettings` file that `generate`, `serve`, `eval` and the demo read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from inferaligner.aligner import InferAligner
from inferaligner.errors import InferAlignerError
from inferaligner.judges import CONTENT, DEGENERATE, REFUSAL, RefusalJudge, outcome_shares
from inferaligner.settings import DEFAULT_LOOP_SPAN, SteeringSettings, SteerScale
from inferaligner.vectors import SafetyVectors

DEFAULT_SCALES = (0.75, 1.0, 1.25, 1.5)
DEFAULT_ALPHAS = (4.0, 8.0)  # the paper's strengths for its unit mean-difference vectors
NEAR_BEST = 0.02
MAX_DEGENERATE = 0.03  # the bar for degenerate answers (loops, repeated words)


@dataclass(frozen=True)
class Candidate:
    """One steering vector file to try, at several strengths."""

    name: str
    vectors: SafetyVectors
    path: Path
    layers: tuple[int, ...]
    scale: str
    strengths: tuple[float, ...]


def candidate(
    name: str,
    path: Path,
    strengths: Sequence[float] | None = None,
    layers: Sequence[int] | None = None,
    scale: str = SteerScale.UNIT.value,
    kind: str | None = None,
) -> Candidate:
    """A candidate from a vector file: teacher-fitted vectors steer their own layers at raw scale; mean-difference
    vectors steer `layers` (required) at `scale` ("unit": the paper) with the paper's strengths by default. `kind`:
    the kind the file must hold (a one-line error names both otherwise)."""
    bad = [s for s in strengths or () if not (math.isfinite(s) and s > 0)]
    if bad:
        raise InferAlignerError(f"Steering strengths must be positive numbers, not {bad}.")
    vectors = SafetyVectors.load(path)
    if kind is not None and vectors.kind != kind:
        raise InferAlignerError(f"{path} should hold {kind} vectors but holds {vectors.describe_kind()}.")
    if vectors.fitted:
        return Candidate(
            name, vectors, path, tuple(vectors.fitted_layers), SteerScale.RAW.value, tuple(strengths or DEFAULT_SCALES)
        )
    if not layers:
        raise InferAlignerError(f"Give the steered layers for the mean-difference vectors in {path}.")
    return Candidate(name, vectors, path, tuple(layers), scale, tuple(strengths or DEFAULT_ALPHAS))


def calibrate(
    model: Any,
    tokenizer: Any,
    candidates: Sequence[Candidate],
    harmful: Sequence[str],
    benign: Sequence[str],
    *,
    max_new_tokens: int = 48,
    max_degenerate: float = MAX_DEGENERATE,
    batch_size: int = 16,
    system: str | None = None,
    loop_span: int = DEFAULT_LOOP_SPAN,
    progress: bool = True,
) -> tuple[SteeringSettings, list[dict[str, Any]]]:
    """Measure every candidate strength on the held-out prompts (every input steered, with the system prompt and
    loop stop used at inference) and choose one.

    Returns the chosen settings and the table: per candidate and strength, the shares of coherent refusals,
    content and degenerate answers on `harmful`, and of kept answers (content) and refusals on `benign`.
    """
    if not harmful or not benign or not candidates:
        raise InferAlignerError("Calibration needs harmful and benign prompts and at least one candidate.")
    judge = RefusalJudge()
    rows: list[dict[str, Any]] = []
    runs = [(c, s) for c in candidates for s in c.strengths]
    for cand, strength in tqdm(runs, desc="calibrating", disable=not progress, unit="setting"):
        started = time.perf_counter()
        # A weak strength is measured like any other (it is what it writes); an aligner refuses to use it later.
        aligner = InferAligner(
            model,
            tokenizer,
            aligned_vectors=cand.vectors,
            mode="always",
            alpha=strength,
            steer_layers=list(cand.layers),
            steer_scale=cand.scale,
            system=system,
            loop_span=loop_span,
            allow_weak_steering=True,
        )
        shares = {}
        for name, prompts in (("harmful", harmful), ("benign", benign)):
            texts = [a.text for a in aligner.complete(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)]
            shares[name] = outcome_shares(judge(prompts, texts), texts)
        rows.append(
            {
                "candidate": cand.name,
                "kind": cand.vectors.provenance.method,
                "strength": strength,
                "layers": list(cand.layers),
                "scale": cand.scale,
                "harmful_refusal": shares["harmful"][REFUSAL],
                "harmful_content": shares["harmful"][CONTENT],
                "harmful_degenerate": shares["harmful"][DEGENERATE],
                "benign_kept": shares["benign"][CONTENT],
                "benign_refusal": shares["benign"][REFUSAL],
                "benign_degenerate": shares["benign"][DEGENERATE],
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    chosen = choose(rows, max_degenerate)
    cand = next(c for c in candidates if c.name == chosen["candidate"])
    settings = SteeringSettings(
        str(cand.path),
        float(chosen["strength"]),
        cand.layers,
        cand.scale,
        cand.vectors.provenance.method,
        cand.name,
        table=rows,
    )
    return settings, rows


def choose(rows: Sequence[dict[str, Any]], max_degenerate: float = MAX_DEGENERATE) -> dict[str, Any]:
    """The row to use: most coherent harmful refusals among rows within the degenerate limit (all rows if none
    is); within `NEAR_BEST` of that, the most kept benign answers, then the weakest strength."""
    allowed = [r for r in rows if max(r["harmful_degenerate"], r["benign_degenerate"]) <= max_degenerate] or list(rows)
    best = max(r["harmful_refusal"] for r in allowed)
    near = [r for r in allowed if r["harmful_refusal"] >= best - NEAR_BEST]
    return max(near, key=lambda r: (r["benign_kept"], -r["strength"]))


def table_markdown(rows: Sequence[dict[str, Any]], chosen: SteeringSettings | None = None) -> str:
    """The calibration table: harmful refusal / content / degenerate, benign kept / refused (%)."""
    lines = [
        "| candidate | strength | harmful: refusal / content / degenerate | benign: kept / refused / degenerate |"
        " chosen |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mark = "**yes**" if chosen and (r["candidate"], r["strength"]) == (chosen.candidate, chosen.alpha) else ""
        harmful = " / ".join(f"{100 * r[k]:.0f}" for k in ("harmful_refusal", "harmful_content", "harmful_degenerate"))
        benign = " / ".join(f"{100 * r[k]:.0f}" for k in ("benign_kept", "benign_refusal", "benign_degenerate"))
        lines.append(f"| {r['candidate']} | {r['strength']:g} | {harmful} | {benign} | {mark} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Coherent refusals (harmful) and kept answers (benign) against strength, one line pair per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for name in dict.fromkeys(r["candidate"] for r in rows):
        mine = [r for r in rows if r["candidate"] == name]
        x = [r["strength"] for r in mine]
        axes[0].plot(x, [100 * r["harmful_refusal"] for r in mine], "o-", label=f"{name}: coherent refusals")
        axes[0].plot(x, [100 * r["harmful_degenerate"] for r in mine], "x:", label=f"{name}: degenerate")
        axes[1].plot(x, [100 * r["benign_kept"] for r in mine], "o-", label=f"{name}: answers kept")
    axes[0].set_title("harmful prompts (held out)")
    axes[1].set_title("benign look-alikes (held out)")
    for ax in axes:
        ax.set_xlabel("strength (alpha)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("% of answers, every input steered")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
