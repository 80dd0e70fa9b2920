"""The `inferaligner` command: one verb per job."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from inferaligner.errors import InferAlignerError

log = logging.getLogger("inferaligner")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_layers(spec: str) -> list[int]:
    """'5-12' or '3,4,9' or '2-4,8' into a sorted list of layer indices."""
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                layers.update(range(low, high + 1))
            elif part.strip():
                layers.add(int(part))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{spec}' is not a layer list such as '5-12' or '3,4,9'.") from exc
    return sorted(layers)


def _model_options(parser: argparse.ArgumentParser) -> None:
    from inferaligner.models import EMBEDDED_MODEL

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=EMBEDDED_MODEL, help="hub id, local folder, .gguf file (default: %(default)s)"
    )
    group.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    group.add_argument("--layers-path", help="dotted path of the decoder-block list, for unknown families")
    group.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model")


def _aligner_options(parser: argparse.ArgumentParser) -> None:
    from inferaligner.aligner import DEFAULT_ALPHA, Mode

    _model_options(parser)
    group = parser.add_argument_group("alignment")
    group.add_argument("--target-vectors", type=Path, help="the target model's own vectors (they define the gate)")
    group.add_argument("--aligned-vectors", type=Path, help="the aligned model's vectors (the steering vectors)")
    group.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.INFERALIGNER.value)
    group.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="steering strength (default: %(default)s)")
    group.add_argument("--layers", type=parse_layers, help="steered layers, e.g. '5-20' (default: automatic)")
    group.add_argument("--gate-layer", type=int, help="layer the gate reads (default: from the vector file)")
    group.add_argument("--gate-bias", type=float, help="gate bias; higher is stricter (default: from the file)")
    group.add_argument("--system", help="system prompt for the chat template")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=0)


def _build_aligner(args: argparse.Namespace):
    from inferaligner.aligner import InferAligner
    from inferaligner.models import load_model
    from inferaligner.vectors import SafetyVectors

    target = SafetyVectors.load(args.target_vectors) if args.target_vectors else None
    aligned = SafetyVectors.load(args.aligned_vectors) if args.aligned_vectors else None
    _status(f"loading {args.model}")
    model, tokenizer = load_model(
        args.model, dtype=DTYPES[args.dtype], device=args.device, trust_remote_code=args.trust_remote_code
    )
    return InferAligner(
        model,
        tokenizer,
        target_vectors=target,
        aligned_vectors=aligned,
        mode=args.mode,
        alpha=args.alpha,
        steer_layers=args.layers,
        gate_layer=args.gate_layer,
        gate_bias=args.gate_bias,
        system=args.system,
        layers_path=args.layers_path,
    )


def _generation_kwargs(args: argparse.Namespace) -> dict[str, object]:
    if args.max_new_tokens < 1:
        raise InferAlignerError("--max-new-tokens must be at least 1.")
    torch.manual_seed(args.seed)
    if args.sample:
        return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    return {"do_sample": False}


def _status(message: str) -> None:
    print(f"[inferaligner] {message}", file=sys.stderr, flush=True)


def cmd_extract(args: argparse.Namespace) -> int:
    from inferaligner.models import load_model
    from inferaligner.prompts import load_prompt_sources
    from inferaligner.vectors import extract_safety_vectors

    harmful = load_prompt_sources(args.harmful, args.column, args.limit)
    harmless = load_prompt_sources(args.harmless, args.column, args.limit)
    calibration = None
    if not args.no_calibration:
        calibration = (
            load_prompt_sources(args.calib_harmful, args.column, args.limit),
            load_prompt_sources(args.calib_harmless, args.column, args.limit),
        )
    _status(f"loading {args.model}")
    model, tokenizer = load_model(
        args.model, dtype=DTYPES[args.dtype], device=args.device, trust_remote_code=args.trust_remote_code
    )
    started = time.perf_counter()
    vectors = extract_safety_vectors(
        model,
        tokenizer,
        harmful,
        harmless,
        calibration=calibration,
        gate_fpr=args.gate_fpr,
        system=args.system,
        batch_size=args.batch_size,
        layers_path=args.layers_path,
    )
    path = vectors.save(args.out)
    seconds = time.perf_counter() - started
    gate = vectors.gate or None
    where = f"gate layer {gate.layer}, bias {gate.bias:.3f}" if gate else f"best layer {vectors.best_layer()}"
    _status(
        f"wrote {path} ({vectors.num_layers} layers, {len(harmful)}+{len(harmless)} prompts, {where}) in {seconds:.1f}s"
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from inferaligner.prompts import load_prompts

    prompts = list(args.prompt)
    if args.file:
        prompts += load_prompts(args.file, args.column)
    if not prompts:
        raise InferAlignerError("Give prompts as arguments or with --file.")
    aligner = _build_aligner(args)
    kwargs = _generation_kwargs(args)
    completions = aligner.complete(
        prompts,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=not args.json,
        **kwargs,
    )
    for completion in completions:
        if args.json:
            print(json.dumps({**completion.as_dict(), "mode": aligner.mode.value}), flush=True)
        else:
            print(_gate_line(completion.gate, completion.intervened))
            print(f"> {completion.prompt}\n{completion.text}\n")
    return 0


def _gate_line(gate: object, intervened: bool) -> str:
    if gate is None:
        return "[gate: none]"
    state = "FIRED" if gate.fired else "off"  # type: ignore[attr-defined]
    action = ", answer steered" if intervened else ""
    return f"[gate {state}: score {gate.score:+.3f} at layer {gate.layer}{action}]"  # type: ignore[attr-defined]


def cmd_chat(args: argparse.Namespace) -> int:
    aligner = _build_aligner(args)
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
            gate, pieces = aligner.stream(prompt, max_new_tokens=args.max_new_tokens, **kwargs)
        except InferAlignerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        print(_gate_line(gate, bool(gate and gate.fired and aligner.mode.value != "off")), file=sys.stderr)
        print("bot> ", end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from inferaligner.vectors import SafetyVectors, describe

    vectors = SafetyVectors.load(args.file)
    summary = describe(vectors)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"vectors from {vectors.provenance.describe()}")
    prov = vectors.provenance
    print(
        f"  {prov.n_harmful} harmful + {prov.n_harmless} harmless prompts (data {prov.data_hash}), "
        f"layer convention {prov.layer_convention}, created {prov.created}"
    )
    if vectors.gate:
        g = vectors.gate
        print(f"  gate: layer {g.layer}, bias {g.bias:.4f} ({g.rule}{f', fpr {g.target_fpr}' if g.target_fpr else ''})")
    names = sorted(vectors.metrics)
    print("layer  norm    " + "  ".join(f"{n:>22}" for n in names))
    for layer in range(vectors.num_layers):
        values = "  ".join(f"{float(vectors.metrics[n][layer]):>22.3f}" for n in names)
        print(f"{layer:>5}  {float(vectors.norms[layer]):6.2f}  {values}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferaligner",
        description="Inference-time harmlessness for fine-tuned LLMs: gated cross-model safety steering.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    extract = verbs.add_parser("extract", help="extract safety vectors (and a gate) from a model")
    _model_options(extract)
    extract.add_argument("--out", type=Path, required=True, help="vector file to write (.safetensors)")
    sets = "files or built-in sets (builtin:<harmful|harmless|everyday>[:<extraction|calibration|all>])"
    extract.add_argument(
        "--harmful", nargs="+", default=["builtin:harmful:extraction"], help=f"harmful prompts: {sets}"
    )
    extract.add_argument(
        "--harmless",
        nargs="+",
        default=["builtin:harmless:extraction", "builtin:everyday:extraction"],
        help="harmless prompts (default: topic-matched and everyday built-in sets)",
    )
    extract.add_argument(
        "--calib-harmful",
        nargs="+",
        default=["builtin:harmful:calibration"],
        help="held-out harmful prompts for the gate's metrics",
    )
    extract.add_argument(
        "--calib-harmless",
        nargs="+",
        default=["builtin:harmless:calibration", "builtin:everyday:calibration"],
        help="held-out harmless prompts for the gate's metrics and --gate-fpr",
    )
    extract.add_argument("--no-calibration", action="store_true", help="skip the held-out gate measurements")
    extract.add_argument("--gate-fpr", type=float, help="set the gate bias for this false-positive rate")
    extract.add_argument("--column", help="column / field holding the prompt in csv, json and jsonl files")
    extract.add_argument("--limit", type=int, help="use at most this many prompts per set")
    extract.add_argument("--system", help="system prompt for the chat template")
    extract.add_argument("--batch-size", type=int, default=16)
    extract.set_defaults(run=cmd_extract)

    generate = verbs.add_parser("generate", help="answer prompts with the target model under InferAligner")
    _aligner_options(generate)
    generate.add_argument("prompt", nargs="*", help="user instructions")
    generate.add_argument("--file", help="read more prompts from a file (txt, jsonl, json, csv)")
    generate.add_argument("--column", help="column / field holding the prompt")
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    generate.set_defaults(run=cmd_generate)

    chat = verbs.add_parser("chat", help="chat interactively with the target model under InferAligner")
    _aligner_options(chat)
    chat.set_defaults(run=cmd_chat)

    inspect = verbs.add_parser("inspect", help="show a vector file's provenance, gate and per-layer metrics")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=cmd_inspect)
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
