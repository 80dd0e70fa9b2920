"""`align`: from your model, a teacher and your domain's prompts to a folder that `serve`, `eval` and
`InferAligner.from_pretrained` take."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from inferaligner.cli.options import DTYPE_NAMES, floats, fraction, positive_int, status
from inferaligner.errors import InferAlignerError

STEP_SECONDS = {"check": 40, "gate": 330, "teacher": 120, "fit": 280, "calibrate_per_scale": 110, "evaluate": 600}
"""Measured for the 135M demo target on this project's 2-core machine (docs/results/efficacy.md, "align"); the
estimate scales them by the target's parameter count."""
DEMO_PARAMETERS = 135e6


def _teacher(args: argparse.Namespace, out: Path) -> Any:
    from inferaligner.teachers import EndpointTeacher, FileTeacher, ModelTeacher

    if args.teacher_url:
        if args.teacher:
            raise InferAlignerError("Give --teacher or --teacher-url, not both.")
        out.joinpath(".align").mkdir(parents=True, exist_ok=True)
        return EndpointTeacher(
            args.teacher_url,
            args.teacher_model or "",
            key_env=args.teacher_key_env,
            per_second=args.teacher_rate,
            cache=out / ".align" / "endpoint-answers.jsonl",
        )
    if not args.teacher:
        raise InferAlignerError(
            "Name a teacher: --teacher MODEL (zoo:aligned, a folder, a hub name), --teacher FILE.jsonl, or "
            "--teacher-url URL --teacher-model NAME."
        )
    if args.teacher.endswith(".jsonl"):
        return FileTeacher(Path(args.teacher), args.teacher_answer_field, args.teacher_limit)

    def load(name: str) -> Any:
        from inferaligner.build import load_model

        return load_model(_load_options(args), name, status)

    return ModelTeacher(args.teacher, load)


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"dtype": args.dtype, "device": args.device, "trust_remote_code": args.trust_remote_code}


def estimate(parameters: int, scales: int, done: set[str]) -> float:
    """Seconds the steps not yet done should take, scaled from the demo target's."""
    per = dict(STEP_SECONDS)
    per["calibrate"] = per.pop("calibrate_per_scale") * scales
    return sum(s for name, s in per.items() if name not in done) * max(0.25, parameters / DEMO_PARAMETERS)


class _Log:
    """Status lines to stderr and, with the time, to the folder's `align.log`."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def __call__(self, message: str) -> None:
        status(message)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def cmd_align(args: argparse.Namespace) -> int:
    from inferaligner.align import AlignOptions, align
    from inferaligner.build import DTYPES, EMBEDDED_MODEL

    model = args.model or EMBEDDED_MODEL
    log = _Log(args.out / "align.log")
    log(f"align {model} with {args.teacher or args.teacher_url} into {args.out}")
    options = AlignOptions(
        model=model,
        teacher=_teacher(args, args.out),
        domain=args.domain_prompts,
        out=args.out,
        column=args.column,
        public=args.public,
        system=args.system,
        answer_tokens=args.answer_tokens,
        fit_steps=args.fit_steps,
        scales=tuple(args.scales) if args.scales else AlignOptions.scales,
        widen=args.widen,
        gate_tpr=args.gate_tpr,
        limit=args.limit,
        eval_limit=args.eval_limit,
        min_refusals=args.min_refusals,
        force=frozenset(args.force or ()),
        load={
            "dtype": DTYPES[args.dtype or "float32"],
            "device": args.device or "cpu",
            "trust_remote_code": bool(args.trust_remote_code),
        },
        on_start=lambda run: log(_estimate_line(run)),
    )
    try:
        folder = align(options, log)
    except KeyboardInterrupt:
        log("interrupted: finished steps are kept; run the same command again to resume")
        return 130
    log(f"done: load it with InferAligner.from_pretrained({str(folder.path)!r}) or serve --aligned {folder.path}")
    return 0


def _estimate_line(run: Any) -> str:
    parameters = sum(p.numel() for p in run.target().model.parameters())
    done = {name for name in run.steps.names if name in run.steps.record and name not in run.steps.force}
    minutes = estimate(parameters, len(run.options.scales), done) / 60
    return (
        f"estimate: about {minutes:.0f} min for the steps left ({parameters / 1e6:.0f}M parameters; scaled from the "
        "demo target's times on 2 CPU cores; Ctrl-C keeps every finished step)"
    )


def rate(text: str) -> float:
    """A share in (0, 1]."""
    value = fraction(text)
    if value == 0:
        raise argparse.ArgumentTypeError("the gate's true-positive rate must be above 0")
    return value


def add_parsers(verbs: Any) -> None:
    """Register `align`."""
    from inferaligner.align.recipe import STEP_NAMES, AlignOptions

    parser = verbs.add_parser(
        "align",
        help="protect your model in one command: gate, teacher answers, fit, calibrate, evaluate; writes a folder",
    )
    parser.add_argument("--model", help="your target model: hub id, folder, .gguf or zoo:NAME (default: embedded)")
    parser.add_argument("--domain-prompts", type=Path, required=True, help="your deployment's benign prompts (file)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (resumed if it exists)")
    teacher = parser.add_argument_group("teacher (one of)")
    teacher.add_argument("--teacher", help="a safety-aligned model (zoo:aligned, folder, hub name) or a JSONL file")
    teacher.add_argument("--teacher-url", help="an OpenAI-compatible endpoint's base URL (…/v1)")
    teacher.add_argument("--teacher-model", help="the endpoint's model name")
    teacher.add_argument("--teacher-key-env", default="OPENAI_API_KEY", help="environment variable with the key")
    teacher.add_argument("--teacher-rate", type=float, default=4.0, help="endpoint requests per second (default 4)")
    teacher.add_argument("--teacher-answer-field", help="a JSONL teacher's answer field (default: answer, refusal…)")
    teacher.add_argument("--teacher-limit", type=positive_int, default=320, help="rows drawn from a JSONL teacher")
    parser.add_argument("--column", help="column / field holding the prompt in a csv, json or jsonl domain file")
    parser.add_argument("--system", help="the system prompt you will serve with")
    parser.add_argument("--no-public", dest="public", action="store_false", help="leave the data folder's sets out")
    parser.add_argument("--answer-tokens", type=positive_int, default=64, help="teacher answer length, in tokens")
    parser.add_argument("--fit-steps", type=positive_int, default=80)
    parser.add_argument("--scales", type=floats, help="strengths to calibrate (default 0.75,1,1.25,1.5)")
    parser.add_argument(
        "--widen",
        type=int,
        choices=range(0, 6),
        default=AlignOptions.widen,
        metavar="N",
        help="rounds of stronger strengths when the strongest is chosen and refuses under 90%% (default 2; 0: off)",
    )
    parser.add_argument(
        "--gate-tpr",
        type=rate,
        default=AlignOptions.gate_tpr,
        help="the gate fires on this share of held-out harmful training prompts (default %(default)s): higher "
        "catches more harmful requests and refuses more benign ones (the report's ROC shows the trade)",
    )
    parser.add_argument("--limit", type=positive_int, help="at most this many prompts per built-in set (quick runs)")
    parser.add_argument("--eval-limit", type=positive_int, default=50, help="prompts per evaluation set (default 50)")
    parser.add_argument("--min-refusals", type=positive_int, default=16, help="coherent teacher refusals needed")
    parser.add_argument("--force", action="append", choices=STEP_NAMES, help="redo this step (repeatable)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="default: float32")
    parser.add_argument("--device", help="torch device (default: cpu)")
    parser.add_argument("--trust-remote-code", action="store_true", default=None, help="run a hub model's code")
    parser.set_defaults(run=cmd_align)
