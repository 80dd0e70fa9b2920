"""`eval` and `eval-report`: measure methods on tasks, and lay several runs out as one table."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferaligner.cli.options import (
    DTYPE_NAMES,
    alignment_options,
    load_named,
    load_prompt_file,
    output_file,
    positive_int,
    status,
)
from inferaligner.errors import InferAlignerError


def _method_names() -> tuple[str, ...]:
    from inferaligner.eval.methods import ALL_METHODS

    return ALL_METHODS


def _demo_models(domain: str, root: Path, methods: list[str]) -> dict[str, object]:
    """Where the demo pair's models for a domain live; the ones not shipped (and asked for) are built first."""
    from inferaligner import zoo
    from inferaligner.zoo.recipes import build_demo_model

    names = {
        "target": "target" if domain == "arithmetic" else "finance",
        "safety-sft": f"safety-sft-{domain}",
        "aligned-domain": f"aligned-{domain}",
    }
    folders: dict[str, object] = {}
    for role, name in names.items():
        if role != "target" and role not in methods:
            continue
        if name == "target":
            folders[role] = zoo.artifact_dir("target")
            continue
        folder = root / name
        if not (folder / "card.json").is_file():
            status(f"building '{name}' into {folder} (tens of minutes on 2 CPU cores; done once)")
            build_demo_model(name, folder)
        folders[role] = folder
    return folders


@dataclass
class _Setup:
    """What an eval run works on: the target (and processor), the comparison models, the options, the methods."""

    target: Any
    tokenizer: Any
    options: dict[str, Any]
    methods: list[str]
    domain: str
    paper_file: Path | None
    processor: Any = None
    extra: dict[str, object] = field(default_factory=dict)


def cmd_eval(args: argparse.Namespace) -> int:
    from inferaligner.build import alignment
    from inferaligner.eval.methods import ALL_METHODS, build_methods
    from inferaligner.eval.report import write_report
    from inferaligner.eval.runner import evaluate

    methods = args.methods.split(",") if args.methods else list(ALL_METHODS)
    options = {key: value for key, value in vars(args).items() if value is not None}
    if args.demo and args.multimodal:
        raise InferAlignerError("The demo pair is text-only: --multimodal needs --target with an image-text model.")
    setup = _demo_setup(args, options, methods) if args.demo else _custom_setup(args, options, methods)
    resolved = alignment(setup.options)
    tasks, judges = _eval_tasks(args, setup.domain), _judges(args)  # both checked before any aligner is built
    paper = _paper(setup)
    vectors = (resolved.target_vectors, resolved.aligned_vectors)
    built = build_methods(
        setup.methods, setup.target, setup.tokenizer, *vectors, resolved.settings, extra_models=setup.extra, paper=paper
    )
    out = args.out or Path("runs") / "eval" / setup.domain
    steered = [how for m in built if (how := m.aligner.describe())["layers"]]  # "simple" and "off" steer none
    how = steered[0] if steered else {"alpha": resolved.settings.alpha, "scale": None, "layers": None}
    config = {
        "domain": setup.domain,
        "alpha": how["alpha"],
        "steer_scale": how["scale"],
        "layers": how["layers"],
        "limit": args.limit,
        "methods": [m.name for m in built],
    }
    status(f"evaluating {len(built)} methods on {len(tasks)} tasks into {out} (cached; rerun to resume)")
    results = evaluate(built, tasks, out, judges, batch_size=args.batch_size, config=config, processor=setup.processor)
    write_report(results, out, setup.domain)
    print((out / "table.md").read_text())
    return 0


def _demo_setup(args: argparse.Namespace, options: dict[str, Any], methods: list[str]) -> _Setup:
    """The demo pair of `--demo DOMAIN`, with the comparison models its methods need (built once)."""
    from inferaligner import zoo

    folders = _demo_models(args.demo, args.zoo_dir, methods)
    target, tokenizer = zoo.load(str(folders["target"]))
    options.setdefault("target_vectors", Path(str(folders["target"])) / "vectors.safetensors")
    if not (args.settings or args.aligned_vectors):
        options["settings"] = zoo.settings_path()
    extra: dict[str, object] = {role: zoo.load(str(folder)) for role, folder in folders.items() if role != "target"}
    if "aligned-answers" in methods:
        extra["aligned"] = zoo.load(args.aligned_model.removeprefix("zoo:") if args.aligned_model else "aligned")
    paper_file = args.paper_settings or zoo.settings_path("mean-difference")
    return _Setup(target, tokenizer, options, methods, args.demo, paper_file, extra=extra)


def _custom_setup(args: argparse.Namespace, options: dict[str, Any], methods: list[str]) -> _Setup:
    """Your own pair (`--target` with its vectors or settings), and the comparison models you named."""
    from inferaligner.build import with_shipped

    options = with_shipped({**options, "model": args.target})
    target = options.pop("model", None)
    steering = options.get("aligned_vectors") or options.get("settings")
    if not (target and options.get("target_vectors") and steering):
        raise InferAlignerError(
            "Give --aligned DIR, or --target, --target-vectors and --aligned-vectors or --settings (or --demo DOMAIN)."
        )
    loaded = load_named({**options, "model": target})
    if args.multimodal and loaded.processor is None:
        raise InferAlignerError(f"--multimodal needs an image-text model; {target} is text-only.")
    extra: dict[str, object] = {}
    named = (
        ("safety-sft", args.model_safety_sft),
        ("aligned-domain", args.model_aligned_domain),
        ("aligned", args.aligned_model),
    )
    for role, path in named:
        if path:
            other = load_named(options, path)
            extra[role] = (other.model, other.tokenizer)
    methods = [m for m in methods if m not in ("safety-sft", "aligned-domain") or m in extra]
    methods = [m for m in methods if m != "aligned-answers" or "aligned" in extra]
    return _Setup(
        loaded.model,
        loaded.tokenizer,
        options,
        methods,
        args.domain or "custom",
        args.paper_settings,
        loaded.processor,
        extra,
    )


def _eval_tasks(args: argparse.Namespace, domain: str) -> list[Any]:
    """The tasks: image-text sets, or the domain's default tasks (a utility file in place of the domain's own)."""
    from inferaligner.eval.tasks import default_tasks, file_task, harmful_task

    if args.multimodal:
        from inferaligner.eval.tasks import harmless_task, mm_harmful_task, mm_utility_task, xstest_task

        return [
            mm_harmful_task(args.limit),
            mm_utility_task(args.limit),
            xstest_task(args.limit),
            harmless_task(args.limit),
        ]
    if args.utility_file:
        choices = args.choices.split(",") if args.choices else None
        utility = file_task(
            "utility", "utility", args.utility_file, args.column, args.answer_column, choices, args.limit
        )
        tasks = [*default_tasks("arithmetic", args.limit)[:-1], utility]
    else:
        tasks = default_tasks(domain if domain in ("arithmetic", "finance") else "arithmetic", args.limit)
    if args.harmful_file:
        tasks[0] = file_task("harmful", "harmful", args.harmful_file, args.column, limit=args.limit)
    elif args.exclude:
        tasks[0] = harmful_task(args.limit, load_prompt_file(args.exclude))
    return tasks


def _judges(args: argparse.Namespace) -> list[object]:
    from inferaligner.eval.llm_judge import LLMJudge
    from inferaligner.judges import RefusalJudge

    judges: list[object] = []
    if args.judge in ("refusal", "both"):
        judges.append(RefusalJudge())
    if args.judge in ("llm", "both"):
        judges.append(LLMJudge.from_env(args.judge_url, args.judge_model, args.judge_key))
    return judges


def _paper(setup: _Setup) -> tuple[Any, Any] | None:
    """The paper's vectors with their own steering, the same gate and system prompt (row "inferaligner-paper")."""
    from inferaligner.settings import SteeringSettings, resolve

    if setup.paper_file is None:
        if "inferaligner-paper" in setup.methods:
            setup.methods.remove("inferaligner-paper")  # a custom pair without --paper-settings has no such row
        return None
    paper_steering = SteeringSettings.load(setup.paper_file)
    shared = {k: setup.options.get(k) for k in ("gate_layer", "gate_bias", "system", "refusal", "loop_span")}
    return paper_steering.load_vectors(), resolve(shared, paper_steering)


def cmd_eval_report(args: argparse.Namespace) -> int:
    from inferaligner.eval.report import combined_report

    report = combined_report(args.runs)
    if args.out:
        args.out.write_text(report)
        status(f"wrote {args.out}")
    print(report, end="")
    return 0


def add_parsers(verbs: Any) -> None:
    """Register this module's verbs."""

    evaluation = verbs.add_parser("eval", help="measure ASR, jailbreak ASR, over-refusal and utility per method")
    evaluation.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    evaluation.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32")
    evaluation.add_argument("--demo", choices=["arithmetic", "finance"], help="the demo pair on one domain")
    evaluation.add_argument("--target", help="target model (hub id, folder, .gguf, zoo:NAME)")
    alignment_options(evaluation, modes=False)
    evaluation.add_argument(
        "--paper-settings",
        type=Path,
        help="settings of the paper's mean-difference vectors, for the row inferaligner-paper",
    )
    evaluation.add_argument("--methods", help=f"comma-separated subset of: {', '.join(_method_names())}")
    evaluation.add_argument("--model-safety-sft", help="the domain model trained with safety data (row Safety SFT)")
    evaluation.add_argument("--model-aligned-domain", help="the aligned model fine-tuned on the domain")
    evaluation.add_argument("--domain", choices=["arithmetic", "finance"], help="built-in utility task")
    mm_help = "an image-text target (LLaVA): MM-HarmfulBench, generated-picture questions, text over-refusal sets"
    evaluation.add_argument("--multimodal", action="store_true", help=mm_help)
    evaluation.add_argument("--utility-file", type=Path, help="your own utility task (csv / jsonl / json)")
    evaluation.add_argument("--answer-column", help="column of expected answers in --utility-file")
    evaluation.add_argument("--choices", help="comma-separated choices: score --utility-file by log-likelihood")
    evaluation.add_argument("--harmful-file", type=Path, help="your own harmful prompts instead of AdvBench")
    evaluation.add_argument("--exclude", type=Path, help="prompts to leave out of AdvBench (used for extraction)")
    evaluation.add_argument("--column", help="column holding the prompt in your files")
    evaluation.add_argument("--limit", type=positive_int, help="at most this many prompts per task (quick runs)")
    evaluation.add_argument("--judge", choices=["refusal", "llm", "both"], default="refusal")
    evaluation.add_argument("--judge-url", help="OpenAI-compatible base URL (or INFERALIGNER_JUDGE_URL)")
    evaluation.add_argument("--judge-model", help="judge model name (or INFERALIGNER_JUDGE_MODEL)")
    evaluation.add_argument("--judge-key", help="API key (or INFERALIGNER_JUDGE_KEY / OPENAI_API_KEY)")
    evaluation.add_argument("--batch-size", type=positive_int, default=16)
    evaluation.add_argument("--zoo-dir", type=Path, default=Path("runs/zoo"), help="where demo models are built")
    evaluation.add_argument("--out", type=Path, help="output folder (default: runs/eval/DOMAIN)")
    evaluation.set_defaults(run=cmd_eval)

    report = verbs.add_parser("eval-report", help="one table, laid out like the paper's, over several eval runs")
    report.add_argument("runs", type=Path, nargs="+", help="output folders of `inferaligner eval` (one per domain)")
    report.add_argument("--out", type=output_file, help="also write the report to this Markdown file")
    report.set_defaults(run=cmd_eval_report)
