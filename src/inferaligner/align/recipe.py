"""`inferaligner align`: from a target model, a teacher and the deployment's own prompts to an aligned folder.

The steps, each resumable (`steps.Steps`): `check` (the target can be aligned, the domain prompts are benign),
`gate` (the target's turns gate, the domain's prompts on the harmless side), `teacher` (its answers to harmful
prompts, coherent refusals kept), `fit` (steering vectors fitted on the frozen target), `calibrate` (the strength,
on held-out built-in prompts), `evaluate` (a short evaluation on the public sets and held-out domain prompts). The
card, the report and the manifest are written anew at the end of every run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferaligner.align.steps import Steps, file_digest
from inferaligner.aligned_folder import GATE, SETTINGS, STEERING, AlignedFolder, write_manifest
from inferaligner.errors import InferAlignerError, PromptError
from inferaligner.gate import DEFAULT_GATE_TPR
from inferaligner.loading import Loaded
from inferaligner.models import model_fingerprint, set_model_name
from inferaligner.teachers import Taught, Teacher, teach

STEP_NAMES = ("check", "gate", "teacher", "fit", "calibrate", "evaluate")
TEACH_PROMPTS = ("builtin:harmful:extraction", "builtin:harmful-styles:extraction")
CALIBRATION_HARMFUL = (
    "builtin:harmful:calibration",
    "builtin:harmful-styles:calibration",
    "builtin:harmful-roleplay:calibration",
)
CALIBRATION_BENIGN = ("builtin:lookalike:calibration",)
DOMAIN_GATE_PROMPTS = 64  # per part: as the demo's gate (`zoo.recipes`)
HELD_OUT_SHARE = 0.2  # of the domain prompts, kept from the gate for the evaluation
MIN_DOMAIN_PROMPTS = 4
MAX_HARMFUL_DOMAIN = 0.5  # a domain file more harmful than this (as the target reads it) is refused
CHECK_PROMPTS = 96  # per side, and of the domain's, for that check
WEAK_REFUSAL = 0.8  # below this share of coherent refusals at the chosen strength, the card warns
REFUSAL_GOAL = 0.9  # the calibration tries stronger settings while the strongest is chosen and refuses less
WIDEN_FACTORS = (4 / 3, 5 / 3)  # each widening round tries these multiples of the strongest strength so far


@dataclass(frozen=True)
class AlignOptions:
    """What `align` builds from; `load` options (`dtype`, `device`, `trust_remote_code`) go to the model loader."""

    model: str
    teacher: Teacher
    domain: Path
    out: Path
    column: str | None = None
    public: bool = True
    system: str | None = None
    answer_tokens: int = 64
    fit_steps: int = 80
    scales: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5)
    widen: int = 2  # calibration rounds above `scales` while the strongest is chosen and under `REFUSAL_GOAL`
    gate_tpr: float = DEFAULT_GATE_TPR  # the gate fires on this share of the held-out harmful training prompts
    limit: int | None = None  # prompts per built-in set (teacher and calibration); None: all
    eval_limit: int = 50
    min_refusals: int = 16
    force: frozenset[str] = frozenset()
    load: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    on_start: Callable[[Run], None] | None = None  # called once the target is loaded (the CLI prints an estimate)


@dataclass(frozen=True)
class Domain:
    """The deployment's own prompts: most teach the gate, a share is held out for the evaluation (with the expected
    answers, when the file gives them)."""

    gate: list[str]
    held_out: list[str]
    answers: list[str | None]

    @classmethod
    def read(cls, path: Path, column: str | None) -> Domain:
        from inferaligner.prompts import load_prompts

        if not Path(path).is_file():
            raise PromptError(f"Domain file {path} does not exist.")
        prompts = load_prompts(path, column)
        if len(prompts) < MIN_DOMAIN_PROMPTS:
            raise PromptError(
                f"{path} holds {len(prompts)} prompts: give at least {MIN_DOMAIN_PROMPTS} of your deployment's "
                "benign requests (a few hundred is better)."
            )
        answers = _answers(Path(path), prompts)
        step = max(2, round(1 / HELD_OUT_SHARE))
        held = [i for i in range(len(prompts)) if i % step == step - 1]
        return cls(
            [p for i, p in enumerate(prompts) if i % step != step - 1],
            [prompts[i] for i in held],
            [answers[i] for i in held],
        )


def _answers(path: Path, prompts: Sequence[str]) -> list[str | None]:
    """The expected answer of each prompt in a JSONL domain file (its `answer` field), else None."""
    if path.suffix != ".jsonl":
        return [None] * len(prompts)
    found: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("answer") is not None:
            found[str(row.get("prompt", ""))] = str(row["answer"])
    return [found.get(p) for p in prompts]


@dataclass
class Run:
    """One align run: the options, the steps' record, the loaded target."""

    options: AlignOptions
    log: Callable[[str], None]
    steps: Steps = field(init=False)
    loaded: Loaded | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.steps = Steps(self.work, STEP_NAMES, self.options.force, self.log)

    @property
    def out(self) -> Path:
        return self.options.out

    @property
    def work(self) -> Path:
        return self.options.out / ".align"

    def target(self) -> Loaded:
        if self.loaded is None:
            from inferaligner.loading import load

            self.log(f"loading the target {self.options.model}")
            self.loaded = load(self.options.model, **self.options.load)
            set_model_name(self.loaded.model, self.options.model)
        return self.loaded

    @functools.cached_property
    def model_inputs(self) -> dict[str, Any]:
        """What a step's result depends on of the target: its name, shape and a sample of its weights (a model
        retrained in place gets new steps)."""
        model = self.target().model
        return {"model": self.options.model, "fingerprint": model_fingerprint(model), "weights": weights_sample(model)}

    @functools.cached_property
    def public(self) -> bool:
        """Whether the gate also learns from the data folder's training-only sets (asked for, and the folder is
        there; without it, a note)."""
        if not self.options.public:
            return False
        from inferaligner.data import data_dir

        try:
            data_dir()
        except PromptError as exc:
            self.log(f"note: {exc} The gate learns from the built-in sets and the domain's prompts only.")
            return False
        return True


def weights_sample(model: Any, per_tensor: int = 4096) -> str:
    """A hash of the first `per_tensor` values of every weight tensor: cheap even for large models, and different
    for any fine-tune."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().flatten()[:per_tensor].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def align(options: AlignOptions, log: Callable[[str], None] = print) -> AlignedFolder:
    """Run (or resume) every step and write the folder; returns it, checked."""
    from inferaligner.align import card, report

    started = time.perf_counter()
    run = Run(options, log)
    options.out.mkdir(parents=True, exist_ok=True)
    domain = Domain.read(options.domain, options.column)
    _check_template(run)
    if options.on_start is not None:
        options.on_start(run)
    _check_step(run, domain)
    _gate_step(run, domain)
    taught = _teacher_step(run)
    _fit_step(run, taught)
    _calibrate_step(run)
    evaluation = _evaluate_step(run, domain)
    summary = _manifest(run, domain, taught, evaluation, time.perf_counter() - started)
    card.write(options.out, summary, evaluation)
    report.write(options.out / "report.html", summary, evaluation)
    log(f"wrote {options.out} (card: README.md, report: report.html)")
    return AlignedFolder.load(options.out)


def _check_template(run: Run) -> None:
    tokenizer = run.target().tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise InferAlignerError(
            f"{run.options.model} has no chat template: InferAligner reads and steers chat requests. Give the "
            "tokenizer one (chat_template in tokenizer_config.json) and run align again."
        )


def _spread(items: Sequence[str], count: int) -> list[str]:
    """At most `count` of `items`, evenly spaced."""
    step = max(1, -(-len(items) // count))
    return list(items[::step])


def _check_step(run: Run, domain: Domain) -> None:
    """The domain's prompts must read as benign to the target: a gate taught that harmful requests are the
    deployment's normal traffic would let them through. Read (up to `CHECK_PROMPTS` of them) with the mean-difference
    direction of the built-in sets (the domain left out), at the target's most separating layer, midpoint bias."""
    out = run.work / "check.json"
    asked = _spread(domain.gate + domain.held_out, CHECK_PROMPTS)
    inputs = {**run.model_inputs, "domain": asked}

    def work() -> None:
        from dataclasses import replace

        from inferaligner.aligner import InferAligner
        from inferaligner.eval.generation import gate_all
        from inferaligner.prompts import gate_sets
        from inferaligner.vectors import GateSpec, extract_safety_vectors

        loaded = run.target()
        harmful, harmless = gate_sets("extraction")
        vectors = extract_safety_vectors(
            loaded.model,
            loaded.tokenizer,
            _spread(harmful, CHECK_PROMPTS),
            _spread(harmless, CHECK_PROMPTS),
            progress=run.options.progress,
        )
        layer = vectors.best_layer()
        vectors = replace(vectors, gate=GateSpec(layer=layer, bias=float(vectors.bias[layer])))
        reader = InferAligner(loaded.model, loaded.tokenizer, target_vectors=vectors, mode="off")
        fired = [d.fired for d in gate_all(reader, asked)]
        out.write_text(json.dumps({"domain_prompts": len(fired), "read_as_harmful": sum(fired)}))

    run.steps.run("check", inputs, [out], work)
    found = json.loads(out.read_text())
    share = found["read_as_harmful"] / max(1, found["domain_prompts"])
    if share > MAX_HARMFUL_DOMAIN:
        raise PromptError(
            f"{found['read_as_harmful']} of {found['domain_prompts']} prompts in {run.options.domain} read as harmful "
            "requests to the target: the domain file teaches the gate what is benign, so give it your deployment's "
            "ordinary requests only."
        )


def _gate_step(run: Run, domain: Domain) -> None:
    out = run.out / GATE
    inputs = {
        **run.model_inputs,
        "domain": domain.gate,
        "public": run.public,
        "per_part": DOMAIN_GATE_PROMPTS,
        "tpr": run.options.gate_tpr,
    }

    def work() -> None:
        from inferaligner.gate_training import target_vectors

        loaded = run.target()
        vectors = target_vectors(
            loaded.model,
            loaded.tokenizer,
            domain.gate,
            public=run.public,
            gate_tpr=run.options.gate_tpr,
            per_part=DOMAIN_GATE_PROMPTS,
            progress=run.options.progress,
        )
        vectors.save(out)

    run.steps.run("gate", inputs, [out], work)


def _teacher_step(run: Run) -> Taught:
    from inferaligner.prompts import load_prompt_sources

    out = run.work / "teacher.jsonl"
    prompts = load_prompt_sources(list(TEACH_PROMPTS), None, run.options.limit)
    inputs = {
        "teacher": run.options.teacher.identity(),
        "prompts": prompts,
        "system": run.options.system,
        "answer_tokens": run.options.answer_tokens,
    }

    def work() -> None:
        taught = teach(
            run.options.teacher,
            prompts,
            system=run.options.system,
            max_new_tokens=run.options.answer_tokens,
            min_refusals=run.options.min_refusals,
            progress=run.options.progress,
        )
        out.write_text("".join(json.dumps(row) + "\n" for row in taught.as_rows()), encoding="utf-8")

    run.steps.run("teacher", inputs, [out], work)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    taught = Taught.from_rows(run.options.teacher.description, rows)
    run.log(f"teacher: {sum(taught.kept)} of {len(rows)} answers are coherent refusals (kept)")
    return taught


def _fit_step(run: Run, taught: Taught) -> None:
    out = run.out / STEERING
    inputs = {**run.model_inputs, "teacher": file_digest(run.work / "teacher.jsonl"), "steps": run.options.fit_steps}
    inputs |= {"system": run.options.system, "answer_tokens": run.options.answer_tokens}

    def work() -> None:
        from inferaligner.fit import FitSettings, TeacherExample, fit_steering_vectors, refusals_only, with_roleplay

        examples = with_roleplay(refusals_only([TeacherExample(p, a) for p, a in taught.refusals]))
        loaded = run.target()
        settings = FitSettings(steps=run.options.fit_steps, max_answer_tokens=run.options.answer_tokens)
        result = fit_steering_vectors(
            loaded.model,
            loaded.tokenizer,
            examples,
            settings,
            teacher_name=run.options.teacher.description,
            system=run.options.system,
            progress=run.options.progress,
        )
        result.vectors.save(out)
        run.log(f"fit: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} over {len(result.losses)} steps")

    run.steps.run("fit", inputs, [out], work)


def _calibrate_step(run: Run) -> None:
    out = run.out / SETTINGS
    inputs = {**run.model_inputs, "steering": file_digest(run.out / STEERING), "scales": run.options.scales}
    inputs |= {"limit": run.options.limit, "system": run.options.system, "widen": run.options.widen}

    def work() -> None:
        from dataclasses import replace

        from inferaligner.calibrate import calibrate, candidate, choose
        from inferaligner.prompts import load_prompt_sources

        harmful = load_prompt_sources(list(CALIBRATION_HARMFUL), None, run.options.limit)
        benign = load_prompt_sources(list(CALIBRATION_BENIGN), None, run.options.limit)
        loaded = run.target()
        scales, rows, rounds = run.options.scales, [], 0
        while True:
            fitted = candidate("teacher-fitted", run.out / STEERING, scales, kind="teacher-fitted")
            settings, new_rows = calibrate(
                loaded.model,
                loaded.tokenizer,
                [fitted],
                harmful,
                benign,
                system=run.options.system,
                progress=run.options.progress,
            )
            rows += new_rows
            scales = wider_scales(rows)
            if not scales or rounds == run.options.widen:
                break
            rounds += 1
            run.log(f"calibrate: the strongest strength is chosen and refuses too little; trying {list(scales)}")
        replace(settings, alpha=float(choose(rows)["strength"]), table=rows).save(out)

    run.steps.run("calibrate", inputs, [out], work)


def wider_scales(rows: Sequence[dict[str, Any]]) -> tuple[float, ...]:
    """Stronger strengths to try next: when the calibration's choice is the strongest strength tried and it refuses
    less than `REFUSAL_GOAL` of the held-out harmful prompts coherently (the vectors want more strength, as a
    teacher of another family may); else none."""
    from inferaligner.calibrate import choose

    chosen = choose(rows)
    top = max(r["strength"] for r in rows)
    if chosen["strength"] < top or chosen["harmful_refusal"] >= REFUSAL_GOAL:
        return ()
    return tuple(round(top * factor, 3) for factor in WIDEN_FACTORS)


def _evaluate_step(run: Run, domain: Domain) -> dict[str, Any]:
    from inferaligner.align.evaluation import evaluate

    out = run.work / "evaluation.json"
    inputs = {
        **run.model_inputs,
        "gate": file_digest(run.out / GATE),
        "settings": file_digest(run.out / SETTINGS),
        "steering": file_digest(run.out / STEERING),
        "domain": [domain.held_out, domain.answers],
        "limit": run.options.eval_limit,
        "system": run.options.system,
    }

    def work() -> None:
        loaded = run.target()
        result = evaluate(
            loaded,
            run.out,
            domain.held_out,
            domain.answers,
            run.work / "cache",
            limit=run.options.eval_limit,
            system=run.options.system,
            progress=run.options.progress,
            log=run.log,
        )
        out.write_text(json.dumps(result, indent=1), encoding="utf-8")

    run.steps.run("evaluate", inputs, [out], work)
    return json.loads(out.read_text(encoding="utf-8"))


def _manifest(run: Run, domain: Domain, taught: Taught, evaluation: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What the folder is, written to `aligned.json`; the card and the report are drawn from it."""
    from inferaligner.settings import SteeringSettings
    from inferaligner.vectors import SafetyVectors

    settings = SteeringSettings.load(run.out / SETTINGS)
    gate = SafetyVectors.load(run.out / GATE).gate
    chosen = next(r for r in settings.table if r["strength"] == settings.alpha)
    warnings = []
    if chosen["harmful_refusal"] < WEAK_REFUSAL:
        warnings.append(
            f"At the chosen strength the steered target refused only {100 * chosen['harmful_refusal']:.0f}% of the "
            "held-out harmful prompts coherently: a stronger teacher or more fit steps may help."
        )
    if evaluation.get("note"):
        warnings.append(evaluation["note"])
    summary = {
        "model": run.options.model,
        "model_fingerprint": run.model_inputs["fingerprint"],
        "teacher": taught.description,
        "teacher_refusals": {"asked": len(taught.prompts), "kept": sum(taught.kept)},
        "domain": {"file": str(run.options.domain), "gate": len(domain.gate), "held_out": len(domain.held_out)},
        "gate": {"layer": gate.layer, "direction": gate.direction, "pooling": gate.pooling, "tpr": gate.target_tpr}
        if gate
        else None,
        "steering": {"alpha": settings.alpha, "layers": list(settings.layers), "kind": settings.kind},
        "calibration": settings.table,
        "public_data": run.public,
        "step_seconds": run.steps.seconds(),
        "run_seconds": round(seconds, 1),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "warnings": warnings,
    }
    write_manifest(run.out, summary)
    for warning in warnings:
        run.log(f"warning: {warning}")
    return summary
