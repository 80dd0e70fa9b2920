"""`demo` and `zoo`: the shipped demo pair, and rebuilding it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from inferaligner.cli.options import (
    gate_rate_options,
    gate_rates,
    output_file,
    positive_int,
    status,
)
from inferaligner.errors import InferAlignerError


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from inferaligner.zoo.recipes import build_demo_model

    out = args.out or Path("runs") / "zoo" / args.name
    status(f"building '{args.name}' into {out} (the full recipe takes tens of minutes on 2 CPU cores)")
    card = build_demo_model(
        args.name, out, limit=args.limit, max_steps=args.max_steps, public=args.public, **gate_rates(args)
    )
    status(
        f"done: {card['steps']} steps on {card['examples']} examples, final loss {card['final_loss']}, "
        f"{card['build_seconds']} s"
    )
    return 0


def cmd_zoo_vectors(args: argparse.Namespace) -> int:
    from inferaligner import zoo
    from inferaligner.zoo.recipes import RECIPES, demo_vectors

    started = time.perf_counter()
    model, tokenizer = zoo.load(args.name)
    vectors = demo_vectors(RECIPES[args.name], model, tokenizer, public=args.public, **gate_rates(args))
    path = vectors.save(args.out or zoo.vectors_path(args.name))
    gate = vectors.gate
    where = f"gate layer {gate.layer} ({gate.direction}, {gate.pooling} pooling)" if gate else "no gate"
    status(f"wrote {path} ({where}) in {time.perf_counter() - started:.0f} s")
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


def add_parsers(verbs: Any) -> None:
    """Register this module's verbs."""

    demo = verbs.add_parser("demo", help="run the shipped demo pair with and without InferAligner (offline)")
    demo.add_argument("--max-new-tokens", type=positive_int, default=64)
    demo.set_defaults(run=cmd_demo)

    zoo = verbs.add_parser("zoo", help="list or rebuild the demo models (aligned, target)")
    zoo_verbs = zoo.add_subparsers(dest="zoo_verb", metavar="ACTION", required=True)
    zoo_verbs.add_parser("list", help="recipes and shipped adapters").set_defaults(run=cmd_zoo_list)
    build = zoo_verbs.add_parser("build", help="rebuild a demo adapter and its vectors from scratch")
    build.add_argument("name", choices=["aligned", "target", "gemma-target"])
    build.add_argument("--out", type=Path, help="output folder (default: runs/zoo/NAME)")
    build.add_argument("--limit", type=positive_int, help="use at most this many examples per data source (quick runs)")
    build.add_argument("--max-steps", type=positive_int, help="stop after this many training steps (quick runs)")
    gate_rate_options(build)
    build.set_defaults(run=cmd_zoo_build)
    vectors = zoo_verbs.add_parser("vectors", help="re-extract a demo model's vectors and gate (no retraining)")
    vectors.add_argument("name", choices=["aligned", "target"])
    vectors.add_argument("--out", type=output_file, help="vector file to write (default: the shipped one)")
    gate_rate_options(vectors)
    vectors.set_defaults(run=cmd_zoo_vectors)
