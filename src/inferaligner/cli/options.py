"""What the verbs share: option groups, argument types, loading the model and building the aligner."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

if TYPE_CHECKING:
    from inferaligner.aligner import InferAligner
    from inferaligner.loading import Loaded


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


def floats(spec: str) -> list[float]:
    """'0.75,1,1.25' into floats."""
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{spec}' is not a comma-separated list of numbers.") from exc


def gate_rate_options(parser: argparse.ArgumentParser) -> None:
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
        type=fraction,
        default=DEFAULT_GATE_TPR,
        help="set the gate bias so it fires on this fraction of the held-out harmful prompts "
        "(default: %(default)s; 0: keep the probe's own bias, or the midpoint)",
    )
    parser.add_argument(
        "--gate-fpr",
        type=below_one,
        help="instead, set it so at most this fraction of the held-out harmless prompts fire",
    )


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction between 0 and 1")
    return value


def below_one(text: str) -> float:
    value = fraction(text)
    if value == 1:
        raise argparse.ArgumentTypeError("a false-positive rate of 1 would fire on everything: give less than 1")
    return value


def model_options(parser: argparse.ArgumentParser, default: str | None = "embedded") -> None:
    """--model and how to load it; `default` None means the verb has its own (the demo pair for `serve`)."""
    from inferaligner.models import EMBEDDED_MODEL

    group = parser.add_argument_group("model")
    if default is None:
        group.add_argument("--model", help="target model (default: the shipped demo pair)")
    else:
        group.add_argument(
            "--model",
            help=f"hub id, local folder, .gguf file or zoo:NAME (default: --aligned's, else {EMBEDDED_MODEL})",
        )
    group.add_argument("--device", default=None if default is None else "cpu", help="torch device (default: cpu)")
    group.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), default=None if default is None else "float32", help="default: float32"
    )
    group.add_argument("--layers-path", help="dotted path of the decoder-block list, for unknown families")
    group.add_argument(
        "--trust-remote-code", action="store_true", default=None, help="run code shipped with a hub model"
    )


def alignment_options(parser: argparse.ArgumentParser, modes: bool = True) -> None:
    """The aligner's options, shared by every verb that builds one. All default to None: `settings.resolve` fills
    in the --settings file's values, then the library's defaults."""
    from inferaligner.settings import DEFAULT_ALPHA, AlignerSettings, Mode, SteerScale

    group = parser.add_argument_group("alignment")
    group.add_argument(
        "--aligned",
        type=Path,
        help="a folder from `inferaligner align`: its model, gate and calibrated steering (options given here win)",
    )
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
    group.add_argument(
        "--gate-bias",
        type=float,
        help="gate bias, added to the score (fires above 0): higher fires more often (default: from the file)",
    )
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


def generation_options(parser: argparse.ArgumentParser) -> None:
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=positive_int, default=256)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=0)


def load_named(options: Mapping[str, Any], name: str | None = None) -> Loaded:
    """The model named by `name` (default: the --model option), loaded as the --dtype / --device options say."""
    from inferaligner.build import load_model

    return load_model(options, name, status)


def build_aligner(options: Mapping[str, Any]) -> tuple[InferAligner, Any]:
    """The aligner the options describe, and the model's processor (image-text models; else None)."""
    from inferaligner.build import build

    return build(options, status)


def generation_kwargs(args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(args.seed)
    if args.sample:
        return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    return {"do_sample": False}


def status(message: str) -> None:
    print(f"[inferaligner] {message}", file=sys.stderr, flush=True)


def gate_rates(args: argparse.Namespace) -> dict[str, float | None]:
    """`--gate-fpr` when given (it wins), else `--gate-tpr` (0: neither, the direction's own bias)."""
    if args.gate_fpr is not None:
        return {"gate_fpr": args.gate_fpr, "gate_tpr": None}
    return {"gate_fpr": None, "gate_tpr": args.gate_tpr or None}


def load_prompt_file(path: Path) -> list[str]:
    from inferaligner.prompts import load_prompts

    return load_prompts(path)
