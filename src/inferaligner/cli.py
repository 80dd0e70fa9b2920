"""The `inferaligner` command: one verb per job."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from inferaligner.errors import InferAlignerError

if TYPE_CHECKING:
    from inferaligner.aligner import InferAligner
    from inferaligner.loading import Loaded

log = logging.getLogger("inferaligner")

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # `inferaligner.build.DTYPES`' names (that module loads the library)
MAX_LAYER = 4095  # a layer number above this is a typo (or an attempt to expand a huge range)


def parse_layers(spec: str) -> list[int]:
    """'5-12' or '3,4,9' or '2-4,8' into a sorted list of layer indices; an empty item ('1,,2'), an empty or
    backwards range ('9-5') or anything but whole numbers is an error."""
    layers: set[int] = set()
    example = "a list of layer numbers such as '5-12' or '3,4,9'"
    for part in spec.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise argparse.ArgumentTypeError(f"'{spec}' is not {example}.")
        if dash and int(high) < int(low):
            raise argparse.ArgumentTypeError(f"'{spec}': the range {part.strip()} runs backwards; write {high}-{low}.")
        if int(high if dash else low) > MAX_LAYER:
            raise argparse.ArgumentTypeError(f"'{spec}': layer numbers stop at {MAX_LAYER}; no model has more.")
        layers.update(range(int(low), int(high if dash else low) + 1))
    return sorted(layers)


def positive_int(spec: str) -> int:
    """An integer of at least 1."""
    try:
        value = int(spec)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{spec}' is not a whole number.") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}.")
    return value


def output_file(spec: str) -> Path:
    """A file path that can be written: not a folder, inside a folder that exists or can be made (checked before
    any work is done, so a long job never fails at its end)."""
    path = Path(spec)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"'{spec}' is a folder; give a file name.")
    ancestor = path.resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write '{spec}': {ancestor} is not a writable folder.")
    return path


class Parser(argparse.ArgumentParser):
    """argparse, with errors as the one line `error: ...` and exit status 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog.removeprefix('inferaligner ')}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _floats(spec: str) -> list[float]:
    """'0.75,1,1.25' into floats."""
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{spec}' is not a comma-separated list of numbers.") from exc


def _gate_rate_options(parser: argparse.ArgumentParser) -> None:
    from inferaligner.gate import DEFAULT_GATE_TPR

    parser.add_argument(
        "--no-public",
        dest="public",
        action="store_false",
        help="build the turns gate from the built-in sets and your --domain prompts only, "
        "without the data folder's training-only sets ($INFERALIGNER_DATA, ../shared/data)",
    )

    parser.add_argument(
        "--gate-tpr",
        type=_fraction,
        default=DEFAULT_GATE_TPR,
        help="set the gate bias so it fires on this fraction of the held-out harmful prompts "
        "(default: %(default)s; 0: keep the probe's own bias, or the midpoint)",
    )
    parser.add_argument(
        "--gate-fpr",
        type=_below_one,
        help="instead, set it so at most this fraction of the held-out harmless prompts fire",
    )


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction between 0 and 1")
    return value


def _below_one(text: str) -> float:
    value = _fraction(text)
    if value == 1:
        raise argparse.ArgumentTypeError("a false-positive rate of 1 would fire on everything: give less than 1")
    return value


def _model_options(parser: argparse.ArgumentParser, default: str | None = "embedded") -> None:
    """--model and how to load it; `default` None means the verb has its own (the demo pair for `serve`)."""
    from inferaligner.models import EMBEDDED_MODEL

    group = parser.add_argument_group("model")
    if default is None:
        group.add_argument("--model", help="target model (default: the shipped demo pair)")
    else:
        group.add_argument(
            "--model",
            default=EMBEDDED_MODEL,
            help="hub id, local folder, .gguf file or zoo:NAME (default: %(default)s)",
        )
    group.add_argument("--device", default=None if default is None else "cpu", help="torch device (default: cpu)")
    group.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), default=None if default is None else "float32", help="default: float32"
    )
    group.add_argument("--layers-path", help="dotted path of the decoder-block list, for unknown families")
    group.add_argument(
        "--trust-remote-code", action="store_true", default=None, help="run code shipped with a hub model"
    )


def _alignment_options(parser: argparse.ArgumentParser, modes: bool = True) -> None:
    """The aligner's options, shared by every verb that builds one. All default to None: `settings.resolve` fills
    in the --settings file's values, then the library's defaults."""
    from inferaligner.settings import DEFAULT_ALPHA, AlignerSettings, Mode, SteerScale

    group = parser.add_argument_group("alignment")
    group.add_argument("--target-vectors", type=Path, help="the target model's own vectors (they define the gate)")
    group.add_argument(
        "--aligned-vectors",
        type=Path,
        help="the steering vectors: the aligned model's mean "
        "differences (`extract`) or vectors fitted from its answers (`fit`)",
    )
    group.add_argument(
        "--settings",
        type=Path,
        help="steering settings from `calibrate` (vectors, alpha, layers, scale); options given here win",
    )
    group.add_argument(
        "--aligned-model",
        help="the aligned model itself, for mode 'aligned' (it answers the rows "
        "whose gate fires; a fine-tune of the target's base)",
    )
    if modes:
        group.add_argument("--mode", choices=[m.value for m in Mode], help=f"default: {AlignerSettings().mode.value}")
    group.add_argument(
        "--alpha",
        type=float,
        help="steering strength (default: the settings', else 1 for "
        f"teacher-fitted vectors, their fitted strength, and {DEFAULT_ALPHA:g} for mean-difference "
        "ones)",
    )
    group.add_argument(
        "--layers",
        dest="steer_layers",
        type=parse_layers,
        help="steered layers, e.g. '5-20' (default: the settings', else automatic)",
    )
    scales = [s.value for s in SteerScale]
    group.add_argument(
        "--steer-scale",
        choices=scales,
        help="alpha x unit vectors (paper) or alpha x raw vectors (default for fitted ones)",
    )
    group.add_argument("--gate-layer", type=int, help="layer the gate reads (default: from the vector file)")
    group.add_argument("--gate-bias", type=float, help="gate bias; higher is stricter (default: from the file)")
    group.add_argument("--system", help="system prompt for the chat template")
    group.add_argument("--refusal", help="the fixed answer of mode 'simple'")
    group.add_argument(
        "--loop-span",
        type=int,
        help="end a steered answer at its first repeated run of this many tokens (default 8; 0: never)",
    )
    group.add_argument(
        "--allow-weak-steering",
        action="store_true",
        default=None,
        help="run a steering whose shifts are negligible (by default refused: it would not protect); "
        "its rows are never reported as intervened",
    )


def _generation_options(parser: argparse.ArgumentParser) -> None:
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=positive_int, default=256)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=0)


def _load(options: Mapping[str, Any], name: str | None = None) -> Loaded:
    """The model named by `name` (default: the --model option), loaded as the --dtype / --device options say."""
    from inferaligner.build import load_model

    return load_model(options, name, _status)


def build_aligner(options: Mapping[str, Any]) -> tuple[InferAligner, Any]:
    """The aligner the options describe, and the model's processor (image-text models; else None)."""
    from inferaligner.build import build

    return build(options, _status)


def _generation_kwargs(args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(args.seed)
    if args.sample:
        return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    return {"do_sample": False}


def _status(message: str) -> None:
    print(f"[inferaligner] {message}", file=sys.stderr, flush=True)


def _gate_rates(args: argparse.Namespace) -> dict[str, float | None]:
    """`--gate-fpr` when given (it wins), else `--gate-tpr` (0: neither, the direction's own bias)."""
    if args.gate_fpr is not None:
        return {"gate_fpr": args.gate_fpr, "gate_tpr": None}
    return {"gate_fpr": None, "gate_tpr": args.gate_tpr or None}


def cmd_extract(args: argparse.Namespace) -> int:
    from inferaligner.prompts import load_prompt_sources, load_prompts
    from inferaligner.vectors import extract_safety_vectors

    harmful = load_prompt_sources(args.harmful, args.column, args.limit)
    harmless = load_prompt_sources(args.harmless, args.column, args.limit)
    domain = load_prompts(args.domain, args.column) if args.domain else []
    turns = args.pooling == "turns" and not args.no_calibration
    if args.pooling == "turns" and args.gate != "probe":
        raise InferAlignerError("A turns gate is a probe: leave --gate at 'probe', or pick --pooling last or mean.")
    calibration, groups = None, None
    if not args.no_calibration:
        held_out = [load_prompts(source, args.column, args.limit) for source in args.calib_harmless]
        calibration = (
            load_prompt_sources(args.calib_harmful, args.column, args.limit),
            [prompt for prompts in held_out for prompt in prompts],
        )
        groups = [len(prompts) for prompts in held_out]  # each source is one group of harmless prompts
    gate_prompts = _turns_gate_prompts(domain, args.public) if turns else []
    loaded = _load(vars(args))
    model, tokenizer = loaded.model, loaded.tokenizer
    started = time.perf_counter()
    vectors = extract_safety_vectors(
        model,
        tokenizer,
        harmful,
        harmless + domain,
        calibration=calibration,
        harmless_groups=groups,
        **_gate_rates(args) if calibration and not turns else {},
        gate=args.gate if calibration and not turns else "mean-difference",  # without held-out prompts: no gate
        pooling="last" if turns else args.pooling,
        system=args.system,
        batch_size=args.batch_size,
        layers_path=args.layers_path,
    )
    if turns:
        from inferaligner.gate_training import fit_turns_gate, with_turns_gate

        rates = _gate_rates(args)
        fit = fit_turns_gate(
            model, tokenizer, gate_prompts, tpr=rates["gate_tpr"], fpr=rates["gate_fpr"], mlp=not args.no_mlp
        )
        vectors = with_turns_gate(vectors, fit, gate_prompts)
    path = vectors.save(args.out)
    seconds = time.perf_counter() - started
    gate = vectors.gate or None
    where = f"gate layer {gate.layer}, bias {gate.bias:.3f}" if gate else f"best layer {vectors.best_layer()}"
    if gate is not None and gate.pooling == "turns":
        where += f", {len(gate_prompts)} gate prompts"
    _status(
        f"wrote {path} ({vectors.num_layers} layers, {len(harmful)}+{len(harmless)} prompts, {where}) in {seconds:.1f}s"
    )
    return 0


def _turns_gate_prompts(domain: list[str], public: bool) -> list[Any]:
    """The turns gate's prompts: the built-in sets, the domain's (half per part) and, with `public`, the data
    folder's training-only sets; without the folder, a one-line note and the built-in sets only."""
    from inferaligner.data import data_dir
    from inferaligner.errors import PromptError
    from inferaligner.gate_training import domain_parts, gate_prompts

    if public:
        try:
            data_dir()
        except PromptError as exc:
            _status(
                f"note: {exc} The gate is built from the built-in sets (and --domain) only; pass --no-public to say so."
            )
            public = False
    if domain and len(domain) < 2:
        raise InferAlignerError("--domain needs at least two prompts: half teach the gate, half check it.")
    return gate_prompts(domain_parts(domain, len(domain) // 2), public=public)


def cmd_generate(args: argparse.Namespace) -> int:
    from inferaligner.prompts import load_prompts

    prompts = list(args.prompt)
    if args.file:
        prompts += load_prompts(args.file, args.column)
    if not prompts:
        raise InferAlignerError("Give prompts as arguments or with --file.")
    kwargs = _generation_kwargs(args)
    images = [None if path.lower() == "none" else path for path in args.image or []]
    if args.image and len(images) != len(prompts):
        raise InferAlignerError(
            f"{len(prompts)} prompts but {len(images)} --image: give one per prompt "
            "(write 'none' for a prompt without an image)."
        )
    aligner, processor = build_aligner(vars(args))
    if args.image:
        from inferaligner.multimodal import MultimodalAligner

        if processor is None:
            raise InferAlignerError(
                f"{args.model} is a text-only model and cannot take images; use an image-text model."
            )
        multimodal = MultimodalAligner(aligner, processor, args.prompt_template)
        completions = multimodal.complete(
            prompts, images, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, **kwargs
        )
    else:
        completions = aligner.complete(
            prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=not args.json, **kwargs
        )
    for completion in completions:
        if args.json:
            print(json.dumps({**completion.as_dict(), "mode": aligner.settings.mode.value}), flush=True)
        else:
            print(_gate_line(completion.gate, completion.intervened))
            print(f"> {completion.prompt}\n{completion.text}\n")
    return 0


def _gate_line(gate: object, intervened: bool) -> str:
    if gate is None:
        return "[gate: none]"
    state = "FIRED" if gate.fired else "off"  # type: ignore[attr-defined]
    action = ", answer changed by InferAligner" if intervened else ""
    return f"[gate {state}: score {gate.score:+.3f} at layer {gate.layer}{action}]"  # type: ignore[attr-defined]


def cmd_chat(args: argparse.Namespace) -> int:
    aligner, _ = build_aligner(vars(args))
    kwargs = _generation_kwargs(args)
    print("Chat with the target model under InferAligner. Empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            prompt = input("you> ").strip()
        except EOFError:
            break
        if not prompt:
            break
        try:
            row, pieces = aligner.stream(prompt, max_new_tokens=args.max_new_tokens, **kwargs)
        except InferAlignerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        print(_gate_line(row.gate, row.intervened), file=sys.stderr)
        print("bot> ", end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from inferaligner.strength import steering_strength
    from inferaligner.vectors import SafetyVectors, describe

    vectors = SafetyVectors.load(args.file)
    vectors.check_finite(f"vectors in {args.file}")  # a corrupt file is an error, not a table of NaNs
    summary = describe(vectors)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{vectors.describe_kind()}")
    prov = vectors.provenance
    print(f"  from {prov.describe()}")
    print(
        f"  {prov.n_harmful} harmful + {prov.n_harmless} harmless prompts (data {prov.data_hash}), "
        f"layer convention {prov.layer_convention}, created {prov.created}"
    )
    residual = vectors.residual_norms
    if vectors.fitted:
        print(
            f"  teacher-fitted steering vectors (teacher: {prov.teacher or 'unknown'}) on layers "
            f"{vectors.fitted_layers}"
        )
        if residual is not None:
            raw = vectors.directions * vectors.norms[:, None]
            strength = steering_strength(residual, raw, vectors.fitted_layers, 1.0)
            print(f"  effective strength at its fitted alpha 1: {strength.describe()}")
    if residual is None:
        print("  effective strength: unknown (the file predates residual norms; the aligner measures it when built)")
    if vectors.gate:
        g = vectors.gate
        target = f", fpr {g.target_fpr}" if g.target_fpr is not None else ""
        target += f", tpr {g.target_tpr}" if g.target_tpr is not None else ""
        rule = f"{g.rule}{target}"
        print(f"  gate: layer {g.layer}, bias {g.bias:.4f} ({rule}), {g.direction} direction, {g.pooling} pooling")
        if g.pooling == "turns":
            print(
                f"  reads each user turn, the system message and a raw prompt alone, as a lone request (a pass over "
                f"their own tokens, blocks 0-{g.layer}, before generation); an earlier turn fires past a margin of "
                f"{g.earlier_margin:.4f}"
            )
            if g.data:
                print(f"  gate data: {g.data}")
        else:
            print(
                f"  one-pass gating: steered layers above {g.layer} are steered inside generation's own pass; "
                f"steering a layer l in 0-{g.layer} makes a batch where a row fires run blocks l-{g.layer} again "
                "(the whole prompt again on sliding-window models)"
            )
    names = sorted(vectors.metrics)
    columns = {name: vectors.metrics[name] for name in names}
    if residual is not None:  # the shift per unit of alpha, relative to the layer's residual norm
        print("  unit/res and raw/res: each layer's shift at alpha 1 over its residual norm (unit and raw scale)")
        columns = {"unit/res": 1 / residual, "raw/res": vectors.norms / residual} | columns
    print("layer  norm    " + "  ".join(f"{n:>22}" for n in columns))
    for layer in range(vectors.num_layers):
        values = "  ".join(f"{float(c[layer]):>22.3f}" for c in columns.values())
        print(f"{layer:>5}  {float(vectors.norms[layer]):6.2f}  {values}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from inferaligner.eval.judges import CONTENT, RefusalJudge, is_coherent_refusal, outcome
    from inferaligner.fit import FitSettings, fit_steering_vectors, refusals_only, teacher_answers, with_roleplay
    from inferaligner.prompts import ROLEPLAY_FRAMES, load_prompt_sources

    if args.frames is not None and args.no_roleplay:
        raise InferAlignerError("--frames picks role-play frames to teach; --no-roleplay teaches none: give one.")
    frames = list(range(len(ROLEPLAY_FRAMES))) if args.frames is None else args.frames
    outside = [i for i in frames if not 0 <= i < len(ROLEPLAY_FRAMES)]
    if outside or not frames:
        raise InferAlignerError(f"--frames takes role-play frame numbers 0-{len(ROLEPLAY_FRAMES) - 1}, not {outside}.")
    harmful = load_prompt_sources(args.harmful, args.column, args.limit)
    benign = load_prompt_sources(args.benign, args.column, args.limit) if args.benign else []
    settings = FitSettings(
        layers=tuple(args.layers) if args.layers else None,
        steps=args.steps,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        max_answer_tokens=args.answer_tokens,
    )
    judge = RefusalJudge()
    started = time.perf_counter()
    _status("the aligned model is the teacher")
    loaded = _load(vars(args), args.aligned)
    teacher, teacher_tok = loaded.model, loaded.tokenizer
    refusals = teacher_answers(
        teacher, teacher_tok, harmful, system=args.system, max_new_tokens=args.answer_tokens, keep=is_coherent_refusal
    )
    answers = (
        teacher_answers(
            teacher,
            teacher_tok,
            benign,
            harmful=False,
            system=args.system,
            max_new_tokens=args.answer_tokens,
            keep=lambda t: outcome(judge.judge(t), t) == CONTENT,
        )
        if benign
        else []
    )
    del teacher, loaded
    _status(
        f"the teacher refused {len(refusals)} of {len(harmful)} harmful prompts coherently (kept) and answered "
        f"{len(answers)} of {len(benign)} benign ones (kept)"
    )
    if not refusals:
        raise InferAlignerError(
            f"{args.aligned} refused none of the harmful prompts coherently: it cannot teach "
            "refusals. Use a safety-aligned model as --aligned."
        )
    examples = [*(refusals if args.whole_refusals else refusals_only(refusals)), *answers]
    if not args.no_roleplay:
        examples = with_roleplay(examples, [ROLEPLAY_FRAMES[i] for i in frames])
    target = _load(vars(args))
    model, tokenizer = target.model, target.tokenizer
    result = fit_steering_vectors(
        model,
        tokenizer,
        examples,
        settings,
        teacher_name=str(args.aligned),
        system=args.system,
        layers_path=args.layers_path,
    )
    path = result.vectors.save(args.out)
    _status(
        f"wrote {path}: layers {result.vectors.fitted_layers}, loss {result.losses[0]:.3f} -> "
        f"{result.losses[-1]:.3f} over {len(result.losses)} steps, {time.perf_counter() - started:.0f} s in all"
    )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from inferaligner.calibrate import calibrate, candidate, plot, table_markdown
    from inferaligner.prompts import load_prompt_sources

    harmful = load_prompt_sources(args.harmful, args.column, args.limit)
    benign = load_prompt_sources(args.benign, args.column, args.limit)
    candidates = [candidate("teacher-fitted", args.steering, args.scales, kind="teacher-fitted")]
    if args.aligned_vectors:
        if not args.mean_difference_layers:
            raise InferAlignerError("--aligned-vectors needs --mean-difference-layers (which layers they steer).")
        candidates.append(
            candidate(
                "mean-difference",
                args.aligned_vectors,
                args.alphas,
                args.mean_difference_layers,
                args.mean_difference_scale,
                kind="mean-difference",
            )
        )
    loaded = _load(vars(args))
    model, tokenizer = loaded.model, loaded.tokenizer
    started = time.perf_counter()
    settings, rows = calibrate(
        model,
        tokenizer,
        candidates,
        harmful,
        benign,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        system=args.system,
        loop_span=args.loop_span,
    )
    out: Path = settings.save(args.out)
    picture = plot(rows, out.with_suffix(".png"))
    print(table_markdown(rows, settings))
    _status(
        f"chose {settings.candidate} at strength {settings.alpha:g} on layers {list(settings.layers)}; wrote {out} "
        f"and {picture} in {time.perf_counter() - started:.0f} s"
    )
    return 0


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from inferaligner.zoo.recipes import build_demo_model

    out = args.out or Path("runs") / "zoo" / args.name
    _status(f"building '{args.name}' into {out} (the full recipe takes tens of minutes on 2 CPU cores)")
    card = build_demo_model(
        args.name, out, limit=args.limit, max_steps=args.max_steps, public=args.public, **_gate_rates(args)
    )
    _status(
        f"done: {card['steps']} steps on {card['examples']} examples, final loss {card['final_loss']}, "
        f"{card['build_seconds']} s"
    )
    return 0


def cmd_zoo_vectors(args: argparse.Namespace) -> int:
    from inferaligner import zoo
    from inferaligner.zoo.recipes import RECIPES, demo_vectors

    started = time.perf_counter()
    model, tokenizer = zoo.load(args.name)
    vectors = demo_vectors(RECIPES[args.name], model, tokenizer, public=args.public, **_gate_rates(args))
    path = vectors.save(args.out or zoo.vectors_path(args.name))
    gate = vectors.gate
    where = f"gate layer {gate.layer} ({gate.direction}, {gate.pooling} pooling)" if gate else "no gate"
    _status(f"wrote {path} ({where}) in {time.perf_counter() - started:.0f} s")
    return 0


def cmd_zoo_list(_args: argparse.Namespace) -> int:
    from inferaligner import zoo
    from inferaligner.zoo.recipes import RECIPES

    for name, recipe in RECIPES.items():
        try:
            info = zoo.card(name)
            shipped = f"shipped, built {info['built']}, loss {info['final_loss']}, data {info['data_hash']}"
        except InferAlignerError:
            shipped = "not built"
        print(f"{name:8s} {shipped}\n         {recipe.description}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from inferaligner.demo import run_demo

    run_demo(max_new_tokens=args.max_new_tokens)
    return 0


SERVE_DEFAULTS = {
    "host": "127.0.0.1", "port": 8000, "scheduler": "continuous", "prefix_cache": True, "max_batch": 8,
    "batch_wait_ms": 10.0,
    "max_queue": 64, "max_tokens_limit": 512, "allow_client_disable": False, "max_body_bytes": 1 << 20,
    "body_timeout_s": 30.0,
    "default_max_tokens": 0,  # 0: 256, or the limit if it is lower
    "ray": False, "replicas": 1, "max_replicas": 0, "cpus_per_replica": 1.0, "ray_address": "",  # 0 / "": none
}  # fmt: skip
NOT_CONFIG = {"run", "verb", "verbose", "config", "config_parser"}
_JSON_KINDS = {
    int: "a whole number",
    positive_int: "a whole number",
    float: "a number",
    str: "a text",
    Path: "a file path (text)",
}


def _config_value(action: argparse.Action, key: str, value: Any, source: Path) -> Any:
    """A config file's value for an option, checked as the command line would check it (type, range, choices);
    a value of the wrong JSON type is a one-line error, never converted."""
    if value is None:
        return None
    default = SERVE_DEFAULTS.get(action.dest)
    if default is not None and type(value) is type(default) and value == default:  # e.g. "max_replicas": 0 (none)
        return value
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise InferAlignerError(f"{source}: '{key}' must be true or false, not {value!r}.")
        return value
    kind = action.type or str
    if kind is parse_layers and isinstance(value, list):
        if not value or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            raise InferAlignerError(f"{source}: '{key}' must be a list of layer numbers (0 or more), not {value!r}.")
        return sorted(set(value))
    wanted = {float: (int, float), int: int, positive_int: int}.get(kind, str)
    if not isinstance(value, wanted) or isinstance(value, bool):
        what = _JSON_KINDS.get(
            kind, "a list of layer numbers or a text such as '5-12'" if kind is parse_layers else "a text"
        )
        raise InferAlignerError(f"{source}: '{key}' must be {what}, not {value!r}.")
    try:
        checked = kind(str(value)) if kind is not str else value
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise InferAlignerError(f"{source}: '{key}': {exc}") from None
    if action.choices is not None and checked not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise InferAlignerError(f"{source}: '{key}' must be one of {choices}, not {value!r}.")
    return checked


def _serve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Server options: defaults, then the --config file (keys: the long option names, with '_' for '-'), then
    options given on the command line. Without --model: the shipped demo pair."""
    known = set(vars(args)) - NOT_CONFIG
    options: dict[str, Any] = dict(SERVE_DEFAULTS)
    if args.config:
        try:
            loaded = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON, a number too long to read
            raise InferAlignerError(f"Cannot read the server config {args.config}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise InferAlignerError(f"{args.config} must hold a JSON object of options.")
        unknown = set(loaded) - known - {"layers"}
        if unknown:
            raise InferAlignerError(f"Unknown keys in {args.config}: {', '.join(sorted(unknown))}.")
        actions = {action.dest: action for action in args.config_parser._actions}
        # A null value means the default: it is left out.
        loaded = {
            actions[key if key != "layers" else "steer_layers"].dest: _config_value(
                actions[key if key != "layers" else "steer_layers"], key, value, args.config
            )
            for key, value in loaded.items()
            if value is not None
        }
        options |= loaded
    options |= {key: value for key, value in vars(args).items() if key in known and value is not None}
    if not options.get("model"):  # the demo pair: the shipped target brings its gate and steering settings
        options |= {"model": "zoo:target", "served_model_name": options.get("served_model_name") or "inferaligner-demo"}
    return options


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise InferAlignerError(f"Cannot serve on {host}:{port}: {exc.strerror or exc}.") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import signal

    import uvicorn

    from inferaligner.build import dtype
    from inferaligner.serve import SCHEDULERS, ServerConfig, create_app, make_engine
    from inferaligner.serve.engine import check_limits
    from inferaligner.serve.http import http_protocol

    options = _serve_options(args)
    if not 1 <= int(options["port"]) <= 65535:
        raise InferAlignerError(f"--port must be a TCP port (1-65535), not {options['port']}.")
    config = ServerConfig(
        model_name=str(options.get("served_model_name") or options["model"]),
        max_tokens_limit=int(options["max_tokens_limit"]),
        default_max_tokens=int(options["default_max_tokens"]) or min(256, int(options["max_tokens_limit"])),
        api_key=options["api_key"] if options.get("api_key") is not None else os.environ.get("INFERALIGNER_API_KEY"),
        allow_client_disable=bool(options["allow_client_disable"]),
        max_body_bytes=int(options["max_body_bytes"]),
        body_timeout_s=float(options["body_timeout_s"]),
    )
    limits = {
        "max_batch": int(options["max_batch"]),
        "batch_wait_s": float(options["batch_wait_ms"]) / 1000,
        "max_queue": int(options["max_queue"]),
    }
    check_limits(**limits)  # every option is checked before the model loads
    if options["scheduler"] not in SCHEDULERS:
        raise InferAlignerError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {options['scheduler']!r}.")
    dtype(options)
    _check_port_free(str(options["host"]), int(options["port"]))
    if config.api_key is None:
        _status(
            f"warning: no API key; anyone who can reach {options['host']}:{options['port']} can use this server "
            "(set --api-key or INFERALIGNER_API_KEY)"
        )
    if options.get("ray"):
        return _serve_on_ray(options, config, limits)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to the handler found before it ran:
    # make that handler a clean exit, so a drained server ends with status 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    aligner, _ = build_aligner(options)
    engine = make_engine(aligner, options["scheduler"], prefix_cache=bool(options["prefix_cache"]), **limits)
    mode = aligner.settings.mode.value
    _status(
        f"serving '{config.model_name}' (mode {mode}, gate: {aligner.gating}) on "
        f"http://{options['host']}:{options['port']}, {engine.scheduler} batching"
    )
    uvicorn.run(
        create_app(engine, config),
        host=str(options["host"]),
        port=int(options["port"]),
        log_level="warning",
        timeout_graceful_shutdown=60,
        http=http_protocol(),
    )
    return 0


def _serve_on_ray(options: dict[str, Any], config: Any, limits: dict[str, Any]) -> int:
    """`serve --ray`: the same app as replicas on Ray Serve (`inferaligner.serve.rayserve`)."""
    from inferaligner.build import alignment, build_aligner
    from inferaligner.serve import rayserve

    rayserve.ray_serve()  # installed? (a one-line error before anything loads)
    alignment(options)  # the vector files and settings are checked here, before any replica loads a model
    app = rayserve.application(
        build_aligner,
        options,
        config,
        limits,
        replicas=int(options["replicas"]),
        max_replicas=int(options["max_replicas"]) or None,
        cpus_per_replica=float(options["cpus_per_replica"]),
    )
    _status(
        f"deploying '{config.model_name}' on Ray Serve: {options['replicas']} replica(s), "
        f"{options['scheduler']} batching"
    )
    rayserve.run(app, str(options["host"]), int(options["port"]), options["ray_address"] or None, status=_status)
    return 0


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
            _status(f"building '{name}' into {folder} (tens of minutes on 2 CPU cores; done once)")
            build_demo_model(name, folder)
        folders[role] = folder
    return folders


def cmd_eval(args: argparse.Namespace) -> int:
    from inferaligner import zoo
    from inferaligner.build import alignment, with_shipped
    from inferaligner.eval.judges import RefusalJudge
    from inferaligner.eval.llm_judge import LLMJudge
    from inferaligner.eval.methods import ALL_METHODS, build_methods
    from inferaligner.eval.report import write_report
    from inferaligner.eval.runner import evaluate
    from inferaligner.eval.tasks import default_tasks, file_task, harmful_task
    from inferaligner.settings import SteeringSettings, resolve

    methods = args.methods.split(",") if args.methods else list(ALL_METHODS)
    options = {key: value for key, value in vars(args).items() if value is not None}
    extra: dict[str, object] = {}
    processor = None
    paper_file = args.paper_settings
    if args.demo and args.multimodal:
        raise InferAlignerError("The demo pair is text-only: --multimodal needs --target with an image-text model.")
    if args.demo:
        folders = _demo_models(args.demo, args.zoo_dir, methods)
        target, tokenizer = zoo.load(str(folders["target"]))
        options.setdefault("target_vectors", Path(str(folders["target"])) / "vectors.safetensors")
        if not (args.settings or args.aligned_vectors):
            options["settings"] = zoo.settings_path()
        paper_file = paper_file or zoo.settings_path("mean-difference")
        extra = {role: zoo.load(str(folder)) for role, folder in folders.items() if role != "target"}
        if "aligned-answers" in methods:
            extra["aligned"] = zoo.load(args.aligned_model.removeprefix("zoo:") if args.aligned_model else "aligned")
        domain = args.demo
    else:
        options = {k: v for k, v in with_shipped({**options, "model": args.target}).items() if k != "model"}
        if not (
            args.target
            and options.get("target_vectors")
            and (options.get("aligned_vectors") or options.get("settings"))
        ):
            raise InferAlignerError(
                "Give --target, --target-vectors and --aligned-vectors or --settings (or --demo DOMAIN)."
            )
        loaded = _load(options, args.target)
        if args.multimodal and loaded.processor is None:
            raise InferAlignerError(f"--multimodal needs an image-text model; {args.target} is text-only.")
        target, tokenizer, processor = loaded.model, loaded.tokenizer, loaded.processor
        for role, path in (
            ("safety-sft", args.model_safety_sft),
            ("aligned-domain", args.model_aligned_domain),
            ("aligned", args.aligned_model),
        ):
            if path:
                other = _load(options, path)
                extra[role] = (other.model, other.tokenizer)
        methods = [m for m in methods if m not in ("safety-sft", "aligned-domain") or m in extra]
        methods = [m for m in methods if m != "aligned-answers" or "aligned" in extra]
        domain = args.domain or "custom"
    resolved = alignment(options)
    settings, target_vectors, aligned_vectors = resolved.settings, resolved.target_vectors, resolved.aligned_vectors
    if args.multimodal:
        from inferaligner.eval.tasks import harmless_task, mm_harmful_task, mm_utility_task, xstest_task

        tasks = [
            mm_harmful_task(args.limit),
            mm_utility_task(args.limit),
            xstest_task(args.limit),
            harmless_task(args.limit),
        ]
    elif args.utility_file:
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
    judges: list[object] = []
    if args.judge in ("refusal", "both"):
        judges.append(RefusalJudge())
    if args.judge in ("llm", "both"):
        judges.append(LLMJudge.from_env(args.judge_url, args.judge_model, args.judge_key))
    paper = None
    if paper_file is not None:  # the paper's vectors with their own steering, the same gate and system prompt
        paper_steering = SteeringSettings.load(paper_file)
        shared = {k: options.get(k) for k in ("gate_layer", "gate_bias", "system", "refusal", "loop_span")}
        paper = (paper_steering.load_vectors(), resolve(shared, paper_steering))
    elif "inferaligner-paper" in methods:
        methods.remove("inferaligner-paper")  # a custom pair without --paper-settings has no such row
    built = build_methods(
        methods, target, tokenizer, target_vectors, aligned_vectors, settings, extra_models=extra, paper=paper
    )
    out = args.out or Path("runs") / "eval" / domain
    steered = [how for m in built if (how := m.aligner.describe())["layers"]]  # "simple" and "off" steer none
    how = steered[0] if steered else {"alpha": settings.alpha, "scale": None, "layers": None}
    config = {
        "domain": domain,
        "alpha": how["alpha"],
        "steer_scale": how["scale"],
        "layers": how["layers"],
        "limit": args.limit,
        "methods": [m.name for m in built],
    }
    _status(f"evaluating {len(built)} methods on {len(tasks)} tasks into {out} (cached; rerun to resume)")
    results = evaluate(built, tasks, out, judges, batch_size=args.batch_size, config=config, processor=processor)
    write_report(results, out, domain)
    print((out / "table.md").read_text())
    return 0


def cmd_eval_report(args: argparse.Namespace) -> int:
    from inferaligner.eval.report import combined_report

    report = combined_report(args.runs)
    if args.out:
        args.out.write_text(report)
        _status(f"wrote {args.out}")
    print(report, end="")
    return 0


def load_prompt_file(path: Path) -> list[str]:
    from inferaligner.prompts import load_prompts

    return load_prompts(path)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="inferaligner",
        description="Inference-time harmlessness for fine-tuned LLMs: gated cross-model safety steering.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    from inferaligner.gate import POOLINGS
    from inferaligner.prompts import GATE_HARMFUL, GATE_HARMLESS, KINDS
    from inferaligner.settings import DEFAULT_LOOP_SPAN, SteerScale
    from inferaligner.vectors import MEAN_DIFFERENCE, PROBE

    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    extract = verbs.add_parser("extract", help="extract safety vectors (and a gate) from a model")
    _model_options(extract)
    extract.add_argument("--out", type=output_file, required=True, help="vector file to write (.safetensors)")
    sets = "files or built-in sets (builtin:<set>[:<extraction|calibration|all>], sets: " + ", ".join(KINDS) + ")"
    extract.add_argument(
        "--harmful",
        nargs="+",
        default=[f"builtin:{k}:extraction" for k in GATE_HARMFUL],
        help=f"harmful prompts: {sets} (default: %(default)s)",
    )
    extract.add_argument(
        "--harmless",
        nargs="+",
        default=[f"builtin:{k}:extraction" for k in GATE_HARMLESS],
        help="harmless prompts; add your own domain's prompts here (default: %(default)s)",
    )
    extract.add_argument(
        "--calib-harmful",
        nargs="+",
        default=[f"builtin:{k}:calibration" for k in GATE_HARMFUL],
        help="held-out harmful prompts for the gate's metrics and choice",
    )
    extract.add_argument(
        "--calib-harmless",
        nargs="+",
        default=[f"builtin:{k}:calibration" for k in GATE_HARMLESS],
        help="held-out harmless prompts for the gate's metrics, choice and --gate-fpr; each "
        "source is one group when the probe is chosen",
    )
    extract.add_argument(
        "--no-calibration",
        action="store_true",
        help="no held-out measurements and no stored gate (for steering-only vectors)",
    )
    extract.add_argument(
        "--gate",
        choices=[MEAN_DIFFERENCE, PROBE],
        default=PROBE,
        help="gate direction: a logistic probe (default) or the paper's mean difference",
    )
    extract.add_argument(
        "--pooling",
        choices=POOLINGS,
        default="turns",
        help="how the gate reads a prompt: each turn alone, as a lone request ('turns', default: "
        "the verdict cannot move with a system message, earlier turns or a completion frame), "
        "or the whole prompt where it stands, at its last token or averaged ('last', 'mean')",
    )
    extract.add_argument(
        "--domain",
        help="your deployment's own benign prompts (a prompt file): half teach a turns "
        "gate your traffic, half check it",
    )
    extract.add_argument(
        "--no-mlp",
        action="store_true",
        help="keep a turns gate a linear probe (by default a small MLP takes its place where it ranks the held-out "
        "prompts better)",
    )
    _gate_rate_options(extract)
    extract.add_argument("--column", help="column / field holding the prompt in csv, json and jsonl files")
    extract.add_argument("--limit", type=positive_int, help="use at most this many prompts per set")
    extract.add_argument("--system", help="system prompt for the chat template")
    extract.add_argument("--batch-size", type=positive_int, default=16)
    extract.set_defaults(run=cmd_extract)

    generate = verbs.add_parser("generate", help="answer prompts with the target model under InferAligner")
    _model_options(generate)
    _alignment_options(generate)
    _generation_options(generate)
    generate.add_argument("prompt", nargs="*", help="user instructions")
    generate.add_argument("--file", help="read more prompts from a file (txt, jsonl, json, csv)")
    generate.add_argument("--column", help="column / field holding the prompt")
    generate.add_argument("--batch-size", type=positive_int, default=8)
    generate.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    generate.add_argument(
        "--image",
        action="append",
        help="image for the i-th prompt (image-text models; repeat per prompt, 'none' for no image)",
    )
    generate.add_argument(
        "--prompt-template", help="for processors without a chat template, e.g. 'USER: <image>\\n{prompt} ASSISTANT:'"
    )
    generate.set_defaults(run=cmd_generate)

    chat = verbs.add_parser("chat", help="chat interactively with the target model under InferAligner")
    _model_options(chat)
    _alignment_options(chat)
    _generation_options(chat)
    chat.set_defaults(run=cmd_chat)

    fit = verbs.add_parser("fit", help="fit steering vectors on the target so it answers as the aligned model does")
    _model_options(fit)
    fit.add_argument("--aligned", required=True, help="the safety-aligned model that teaches (hub id, folder, zoo:)")
    fit.add_argument("--out", type=output_file, required=True, help="steering vector file to write (.safetensors)")
    teach = ["builtin:harmful:extraction", "builtin:harmful-styles:extraction"]
    fit.add_argument(
        "--harmful", nargs="+", default=teach, help="harmful prompts whose refusals are taught (default: %(default)s)"
    )
    fit.add_argument(
        "--benign",
        nargs="*",
        default=[],
        help="benign prompts whose answers the steered target should keep (default: none; measured in "
        "docs/RESULTS.md: it costs refusals about as a weaker strength does)",
    )
    fit.add_argument("--no-roleplay", action="store_true", help="do not also teach the refusals in role-play frames")
    fit.add_argument(
        "--frames",
        type=parse_layers,
        help="role-play frames to teach, by number in prompts.ROLEPLAY_FRAMES (e.g. '0-14,16'; default: all)",
    )
    fit.add_argument(
        "--whole-refusals",
        action="store_true",
        help="teach the teacher's whole refusals, offers after the refusal included (default: cut after "
        "the opening refusal; docs/RESULTS.md measures both)",
    )
    fit.add_argument("--layers", type=parse_layers, help="steered layers (default: 40/53/67/80%% of the depth)")
    fit.add_argument("--steps", type=positive_int, default=80)
    fit.add_argument("--lr", type=float, default=0.05)
    fit.add_argument("--batch-size", type=positive_int, default=8)
    fit.add_argument("--answer-tokens", type=positive_int, default=64, help="teacher answer length, in tokens")
    fit.add_argument("--column", help="column / field holding the prompt in csv, json and jsonl files")
    fit.add_argument("--limit", type=positive_int, help="use at most this many prompts per set")
    fit.add_argument("--system", help="system prompt for the chat template")
    fit.set_defaults(run=cmd_fit)

    calibrate = verbs.add_parser("calibrate", help="choose the steering strength on held-out prompts; write settings")
    _model_options(calibrate)
    calibrate.add_argument("--steering", type=Path, required=True, help="teacher-fitted vectors (from `fit`)")
    calibrate.add_argument("--aligned-vectors", type=Path, help="also try the paper's mean-difference vectors")
    calibrate.add_argument(
        "--mean-difference-layers", type=parse_layers, help="layers the mean-difference vectors steer"
    )
    calibrate.add_argument(
        "--mean-difference-scale",
        choices=[s.value for s in SteerScale],
        default="unit",
        help="unit vectors (the paper) or raw differences",
    )
    calibrate.add_argument("--scales", type=_floats, help="strengths for the fitted vectors (default 0.75,1,1.25,1.5)")
    calibrate.add_argument("--alphas", type=_floats, help="alphas for the mean-difference vectors (default 4,8)")
    calibrate.add_argument(
        "--harmful",
        nargs="+",
        default=[
            "builtin:harmful:calibration",
            "builtin:harmful-styles:calibration",
            "builtin:harmful-roleplay:calibration",
        ],
        help="held-out harmful prompts, plain and inside role-play frames",
    )
    calibrate.add_argument(
        "--benign",
        nargs="+",
        default=["builtin:lookalike:calibration"],
        help="held-out benign look-alikes (answers that should survive steering)",
    )
    calibrate.add_argument(
        "--out", type=output_file, required=True, help="settings file to write (.json; a .png beside it)"
    )
    calibrate.add_argument("--system", help="system prompt for the chat template (the one you will serve with)")
    calibrate.add_argument(
        "--loop-span",
        type=int,
        default=DEFAULT_LOOP_SPAN,
        help="the loop stop you will serve with (default: %(default)s; 0: off)",
    )
    calibrate.add_argument("--max-new-tokens", type=positive_int, default=48)
    calibrate.add_argument("--batch-size", type=positive_int, default=16)
    calibrate.add_argument("--column", help="column / field holding the prompt in csv, json and jsonl files")
    calibrate.add_argument("--limit", type=positive_int, help="use at most this many prompts per set")
    calibrate.set_defaults(run=cmd_calibrate)

    inspect = verbs.add_parser("inspect", help="show a vector file's provenance, gate and per-layer metrics")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=cmd_inspect)

    serve = verbs.add_parser("serve", help="serve an OpenAI-compatible API with InferAligner (default: demo pair)")
    serve.add_argument("--config", type=Path, help="JSON file with any of the options below (options win)")
    _model_options(serve, default=None)
    _alignment_options(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=positive_int, help="default 8000")
    serve.add_argument("--served-model-name", help="the model id clients send")
    serve.add_argument(
        "--scheduler",
        choices=("continuous", "batch"),
        help="continuous: requests join and leave the running batch at each decoding step (default); "
        "batch: each batch runs to its end",
    )
    serve.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_const",
        const=False,
        help="prefill every chat request whole (by default the continuous scheduler runs the chat "
        "template's opening once and prefills only what follows it)",
    )
    serve.add_argument("--max-batch", type=positive_int, help="rows decoded together (default 8)")
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        help="how long an idle server waits for company for its first request (default 10)",
    )
    serve.add_argument("--max-queue", type=positive_int, help="waiting requests before answering 429 (default 64)")
    serve.add_argument(
        "--max-tokens-limit", type=positive_int, help="largest max_tokens a request may ask (default 512)"
    )
    serve.add_argument(
        "--default-max-tokens",
        type=positive_int,
        help="max_tokens when a request gives none (default: 256, at most the limit)",
    )
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set INFERALIGNER_API_KEY)")
    serve.add_argument("--max-body-bytes", type=positive_int, help="largest request body (default 1 MiB)")
    serve.add_argument("--body-timeout-s", type=float, help="time a client may take to send its body (default 30)")
    serve.add_argument(
        "--allow-client-disable",
        action="store_true",
        default=None,
        help='let a request switch InferAligner off with {"inferaligner": {"enabled": false}}',
    )
    ray = serve.add_argument_group("scale-out on Ray Serve (pip install 'inferaligner[ray]')")
    ray.add_argument(
        "--ray",
        action="store_true",
        default=None,
        help="serve the same app as Ray Serve replicas behind Ray's HTTP proxy on --host/--port",
    )
    ray.add_argument("--replicas", type=positive_int, help="replicas (default 1; the minimum with --max-replicas)")
    ray.add_argument(
        "--max-replicas",
        type=positive_int,
        help="autoscale between --replicas and this many, on the requests each replica holds",
    )
    ray.add_argument(
        "--cpus-per-replica", type=float, help="CPUs Ray reserves per replica, and its torch threads (default 1)"
    )
    ray.add_argument(
        "--ray-address",
        help="join a running Ray cluster ('auto', or ray://HEAD:10001); default: start a local instance",
    )
    serve.set_defaults(run=cmd_serve, config_parser=serve)

    evaluation = verbs.add_parser("eval", help="measure ASR, jailbreak ASR, over-refusal and utility per method")
    evaluation.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    evaluation.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32")
    evaluation.add_argument("--demo", choices=["arithmetic", "finance"], help="the demo pair on one domain")
    evaluation.add_argument("--target", help="target model (hub id, folder, .gguf, zoo:NAME)")
    _alignment_options(evaluation, modes=False)
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

    demo = verbs.add_parser("demo", help="run the shipped demo pair with and without InferAligner (offline)")
    demo.add_argument("--max-new-tokens", type=positive_int, default=64)
    demo.set_defaults(run=cmd_demo)

    zoo = verbs.add_parser("zoo", help="list or rebuild the demo models (aligned, target)")
    zoo_verbs = zoo.add_subparsers(dest="zoo_verb", metavar="ACTION", required=True)
    zoo_verbs.add_parser("list", help="recipes and shipped adapters").set_defaults(run=cmd_zoo_list)
    build = zoo_verbs.add_parser("build", help="rebuild a demo adapter and its vectors from scratch")
    build.add_argument("name", choices=["aligned", "target"])
    build.add_argument("--out", type=Path, help="output folder (default: runs/zoo/NAME)")
    build.add_argument("--limit", type=positive_int, help="use at most this many examples per data source (quick runs)")
    build.add_argument("--max-steps", type=positive_int, help="stop after this many training steps (quick runs)")
    _gate_rate_options(build)
    build.set_defaults(run=cmd_zoo_build)
    vectors = zoo_verbs.add_parser("vectors", help="re-extract a demo model's vectors and gate (no retraining)")
    vectors.add_argument("name", choices=["aligned", "target"])
    vectors.add_argument("--out", type=output_file, help="vector file to write (default: the shipped one)")
    _gate_rate_options(vectors)
    vectors.set_defaults(run=cmd_zoo_vectors)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries(args.verbose)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except InferAlignerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    import transformers

    if not verbose:
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
