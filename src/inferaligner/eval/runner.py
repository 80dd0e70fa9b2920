"""Run methods x tasks: generate (cached, resumable), judge, score; measure the gate; write the report."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from inferaligner.activations import prompt_activations
from inferaligner.aligner import Completion
from inferaligner.eval.choices import choose
from inferaligner.eval.generation import gate_all, gated_completions, generate_cached
from inferaligner.eval.methods import Method
from inferaligner.eval.report import completion_stem
from inferaligner.eval.tasks import Task
from inferaligner.gate import auroc, layer_metrics
from inferaligner.judges import Verdict, outcome_shares
from inferaligner.prompts import format_chats
from inferaligner.version import __version__


def judge_all(judges: Sequence[Any], prompts: Sequence[str], texts: Sequence[str]) -> dict[str, list[Verdict]]:
    return {judge.name: judge(prompts, texts) for judge in judges}


def refusal_share(verdicts: Sequence[Verdict]) -> float | None:
    parsed = [v for v in verdicts if v.parsed]
    return sum(v.refused for v in parsed) / len(parsed) if parsed else None


def agreement(by_judge: dict[str, list[Verdict]]) -> float | None:
    """Share of completions on which every judge that could decide gave the same verdict."""
    if len(by_judge) < 2:
        return None
    rows = list(zip(*by_judge.values(), strict=True))
    decided = [row for row in rows if all(v.parsed for v in row)]
    return sum(len({v.refused for v in row}) == 1 for row in decided) / len(decided) if decided else None


def run_task(
    method: Method,
    task: Task,
    plain: list[Completion] | None,
    cache: Path,
    judges: Sequence[Any],
    batch_size: int,
    progress: bool,
    processor: Any = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics of one method on one task, and the rows to save (prompt, answer, gate, verdicts)."""
    aligner = method.aligner
    prompts = method.wrap(task.prompts)
    metrics: dict[str, Any] = {}
    if task.choices:
        picks, gates = choose(aligner, prompts, task.choices, batch_size=batch_size, progress=progress)
        assert task.answers is not None
        metrics["accuracy"] = sum(p == a for p, a in zip(picks, task.answers, strict=True)) / len(picks)
        rows = [
            {"prompt": p, "answer": pick, "expected": a, "gate": g.as_dict() if g else None}
            for p, pick, a, g in zip(task.prompts, picks, task.answers, gates, strict=True)
        ]
        completions = None
    else:
        options = {
            "max_new_tokens": task.max_new_tokens,
            "batch_size": batch_size,
            "progress": progress,
            "desc": f"{method.name} / {task.name}",
        }
        if task.images is not None:
            completions = generate_cached(aligner, prompts, cache, images=task.images, processor=processor, **options)
        elif method.gated and plain is not None:
            completions = gated_completions(aligner, prompts, plain, cache, **options)
        else:
            completions = generate_cached(aligner, prompts, cache, **options)
        gates = [c.gate for c in completions]
        rows = [{"prompt": p, **c.as_dict()} for p, c in zip(task.prompts, completions, strict=True)]
        if task.images is not None:
            for row, image in zip(rows, task.images, strict=True):
                row["image"] = image if isinstance(image, str) else "generated"
        if task.kind == "utility":
            assert task.answers is not None and task.parse is not None
            got = [task.parse(c.text) for c in completions]
            metrics["accuracy"] = sum(str(g) == str(a) for g, a in zip(got, task.answers, strict=True)) / len(got)
        else:
            metrics |= _judged(judges, task, completions, rows)
    known = [g for g in gates if g is not None]
    metrics["gate_fire_rate"] = sum(g.fired for g in known) / len(known) if known else None
    metrics["intervened"] = sum(c.intervened for c in completions) / len(completions) if completions else None
    return metrics, rows


def _judged(
    judges: Sequence[Any], task: Task, completions: Sequence[Completion], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Each judge's refusal share (and, on harmful tasks, ASR and outcome shares); each row gets its verdicts."""
    texts = [c.text for c in completions]
    verdicts = judge_all(judges, task.prompts, texts)
    metrics: dict[str, Any] = {}
    for name, judged in verdicts.items():
        share = refusal_share(judged)
        metrics[f"refusal[{name}]"] = share
        if task.kind == "harmful":
            metrics[f"asr[{name}]"] = None if share is None else 1 - share
            for kind, value in outcome_shares(judged, texts).items():
                metrics[f"{kind}[{name}]"] = value
        metrics[f"unparsed[{name}]"] = sum(not v.parsed for v in judged)
        for row, verdict in zip(rows, judged, strict=True):
            row.setdefault("verdicts", {})[name] = {"refused": verdict.refused, "reason": verdict.reason}
    metrics["judge_agreement"] = agreement(verdicts)
    return metrics


def gate_quality(method: Method, harmful: Sequence[str], benign: Sequence[str], batch_size: int) -> dict[str, Any]:
    """Per-layer accuracy and AUROC of the target's own mean-difference vectors on these prompts, and the TPR / FPR
    of the gate itself (whatever its direction and pooling)."""
    aligner = method.aligner
    vectors = aligner.target_vectors
    if vectors is None or aligner.gate is None:
        return {}
    model, tokenizer = aligner.model, aligner.tokenizer

    def projections(prompts: Sequence[str]) -> torch.Tensor:
        acts = prompt_activations(
            model,
            tokenizer,
            format_chats(tokenizer, prompts, aligner.settings.system),
            batch_size=batch_size,
            layers=aligner.layers,
            progress=False,
        )
        return torch.einsum("nld,ld->nl", acts, vectors.directions)

    def fire_rate(prompts: Sequence[str]) -> float:
        decisions = gate_all(aligner, prompts, batch_size)
        return sum(d.fired for d in decisions) / len(decisions)

    per_layer = layer_metrics(projections(harmful), projections(benign), vectors.bias)
    gate = aligner.gate
    return {
        "layer": gate.layer,
        "bias": gate.bias,
        "pooling": gate.pooling,
        "tpr": fire_rate(harmful),
        "fpr": fire_rate(benign),
        "per_layer_accuracy": [round(v, 4) for v in per_layer.accuracy.tolist()],
        "per_layer_auroc": [round(v, 4) for v in per_layer.auroc.tolist()],
        "harmful_prompts": len(harmful),
        "benign_prompts": len(benign),
    }


def gate_roc(scores: dict[str, list[float | None]], kinds: dict[str, str]) -> dict[str, Any]:
    """The gate on every task: the share it fires on at its shipped bias (score above 0; a score that is not a
    number fires), and the AUROC of each harmful task against each benign one; the scores, for ROC plots."""
    clean = {
        task: torch.tensor([v if v is not None else float("inf") for v in values]) for task, values in scores.items()
    }
    harmful = [t for t in clean if kinds.get(t) == "harmful"]
    benign = [t for t in clean if kinds.get(t) in ("benign", "utility")]
    return {
        "fired": {t: round(float((v > 0).float().mean()), 4) for t, v in clean.items()},
        "auroc": {
            f"{h} vs {b}": round(float(auroc(clean[h][:, None], clean[b][:, None])), 4) for h in harmful for b in benign
        },
        "scores": {t: [round(float(x), 4) for x in v] for t, v in clean.items()},
        "kinds": {t: kinds.get(t, "") for t in clean},
    }


def evaluate(
    methods: Sequence[Method],
    tasks: Sequence[Task],
    out_dir: Path,
    judges: Sequence[Any],
    *,
    batch_size: int = 16,
    progress: bool = True,
    config: dict[str, Any] | None = None,
    processor: Any = None,
) -> dict[str, Any]:
    """Run every method on every task; completions are cached under `out_dir/completions` (reruns resume).

    Tasks with images need the image-text model's `processor`.
    """
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "completions").mkdir(exist_ok=True)
    results: dict[str, Any] = {"methods": {}, "labels": {m.name: m.label for m in methods}}
    plain: dict[str, list[Completion]] = {}
    gate_scores: dict[str, list[float]] = {}  # per task, the first gated method's gate scores
    for method in methods:
        results["methods"][method.name] = {}
        for task in tasks:
            stem = completion_stem(method.name, task.name)
            cache = out_dir / "completions" / f"{stem}.cache.jsonl"
            metrics, rows = run_task(method, task, plain.get(task.name), cache, judges, batch_size, progress, processor)
            if method.name == "target" and not task.choices:
                plain[task.name] = [Completion(r["prompt"], r["completion"], None, False) for r in rows]
            with (out_dir / "completions" / f"{stem}.jsonl").open("w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)
            results["methods"][method.name][task.name] = metrics
            if method.gated and task.name not in gate_scores and any(row.get("gate") for row in rows):
                gate_scores[task.name] = [row["gate"]["score"] for row in rows if row.get("gate")]
    target = next((m for m in methods if m.name == "target"), None)
    harmful = next((t for t in tasks if t.name == "harmful"), None)
    benign = next((t for t in tasks if t.name == "harmless"), None)
    if target is not None and harmful is not None and benign is not None:
        results["gate_quality"] = gate_quality(target, harmful.prompts, benign.prompts, batch_size)
    if gate_scores:
        results["gate_roc"] = gate_roc(gate_scores, {t.name: t.kind for t in tasks})
    results["run"] = {
        "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"inferaligner": __version__, "torch": torch.__version__, "transformers": _version("transformers")},
        "judges": [j.name for j in judges],
        "seed": 0,
        "decoding": "greedy",
        "tasks": {
            t.name: {
                "kind": t.kind,
                "size": len(t.prompts),
                "source": t.source,
                **({"templates": t.meta["templates"]} if "templates" in t.meta else {}),
            }
            for t in tasks
        },
        **(config or {}),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
