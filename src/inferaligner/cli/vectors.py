"""`extract`, `fit`, `calibrate`, `inspect`: the gate and the steering vectors, and what a file holds."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from inferaligner.cli.options import (
    floats,
    gate_rate_options,
    gate_rates,
    load_named,
    model_options,
    output_file,
    parse_layers,
    positive_int,
    status,
)
from inferaligner.errors import InferAlignerError


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
    loaded = load_named(vars(args))
    model, tokenizer = loaded.model, loaded.tokenizer
    started = time.perf_counter()
    vectors = extract_safety_vectors(
        model,
        tokenizer,
        harmful,
        harmless + domain,
        calibration=calibration,
        harmless_groups=groups,
        **gate_rates(args) if calibration and not turns else {},
        gate=args.gate if calibration and not turns else "mean-difference",  # without held-out prompts: no gate
        pooling="last" if turns else args.pooling,
        system=args.system,
        batch_size=args.batch_size,
        layers_path=args.layers_path,
    )
    if turns:
        from inferaligner.gate_training import fit_turns_gate, with_turns_gate

        rates = gate_rates(args)
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
    status(
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
            status(
                f"note: {exc} The gate is built from the built-in sets (and --domain) only; pass --no-public to say so."
            )
            public = False
    if domain and len(domain) < 2:
        raise InferAlignerError("--domain needs at least two prompts: half teach the gate, half check it.")
    return gate_prompts(domain_parts(domain, len(domain) // 2), public=public)


def cmd_inspect(args: argparse.Namespace) -> int:
    from inferaligner.aligned_folder import AlignedFolder, is_aligned_folder

    if not is_aligned_folder(args.file):
        return _inspect_file(args.file, args.json)
    folder = AlignedFolder.load(args.file)
    if args.json:
        print(json.dumps(folder.manifest, indent=2))
        return 0
    facts = folder.manifest
    steering, refusals = facts.get("steering", {}), facts.get("teacher_refusals", {})
    print(f"aligned folder for {folder.model} (fingerprint {folder.fingerprint}), built {facts.get('built')}")
    print(f"  teacher: {facts.get('teacher')} ({refusals.get('kept')} of {refusals.get('asked')} answers kept)")
    print(f"  steering: alpha {steering.get('alpha')} on layers {steering.get('layers')} ({steering.get('kind')})")
    for warning in facts.get("warnings", []):
        print(f"  warning: {warning}")
    for path in (folder.gate, folder.steering):
        print(f"\n== {path.name}")
        _inspect_file(path, False)
    return 0


def _inspect_file(path: Path, as_json: bool) -> int:
    from inferaligner.strength import steering_strength
    from inferaligner.vectors import SafetyVectors, describe

    vectors = SafetyVectors.load(path)
    vectors.check_finite(f"vectors in {path}")  # a corrupt file is an error, not a table of NaNs
    summary = describe(vectors)
    if as_json:
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
    from inferaligner.fit import FitSettings, fit_steering_vectors, refusals_only, teacher_answers, with_roleplay
    from inferaligner.judges import CONTENT, RefusalJudge, is_coherent_refusal, outcome
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
    status("the aligned model is the teacher")
    loaded = load_named(vars(args), args.aligned)
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
    status(
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
    target = load_named(vars(args))
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
    status(
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
    loaded = load_named(vars(args))
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
    status(
        f"chose {settings.candidate} at strength {settings.alpha:g} on layers {list(settings.layers)}; wrote {out} "
        f"and {picture} in {time.perf_counter() - started:.0f} s"
    )
    return 0


def add_parsers(verbs: Any) -> None:
    """Register this module's verbs."""
    from inferaligner.gate import POOLINGS
    from inferaligner.prompts import GATE_HARMFUL, GATE_HARMLESS, KINDS
    from inferaligner.settings import DEFAULT_LOOP_SPAN, SteerScale
    from inferaligner.vectors import MEAN_DIFFERENCE, PROBE

    extract = verbs.add_parser("extract", help="extract safety vectors (and a gate) from a model")
    model_options(extract)
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
    gate_rate_options(extract)
    extract.add_argument("--column", help="column / field holding the prompt in csv, json and jsonl files")
    extract.add_argument("--limit", type=positive_int, help="use at most this many prompts per set")
    extract.add_argument("--system", help="system prompt for the chat template")
    extract.add_argument("--batch-size", type=positive_int, default=16)
    extract.set_defaults(run=cmd_extract)

    fit = verbs.add_parser("fit", help="fit steering vectors on the target so it answers as the aligned model does")
    model_options(fit)
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
        "docs/results/efficacy.md: it costs refusals about as a weaker strength does)",
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
        "the opening refusal; docs/results/efficacy.md measures both)",
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
    model_options(calibrate)
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
    calibrate.add_argument("--scales", type=floats, help="strengths for the fitted vectors (default 0.75,1,1.25,1.5)")
    calibrate.add_argument("--alphas", type=floats, help="alphas for the mean-difference vectors (default 4,8)")
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

    inspect = verbs.add_parser(
        "inspect", help="show a vector file's provenance, gate and per-layer metrics, or what an aligned folder holds"
    )
    inspect.add_argument("file", type=Path, help="a vector file, or a folder from `align`")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=cmd_inspect)
