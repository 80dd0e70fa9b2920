"""The `inferaligner` command: one verb per job, each verb group in its own module (`options` holds what they
share)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from inferaligner.cli import align, evaluate, generate, serve, vectors, zoo
from inferaligner.cli.options import DTYPE_NAMES, Parser, parse_layers
from inferaligner.errors import InferAlignerError

__all__ = ["DTYPE_NAMES", "build_parser", "main", "parse_layers"]


def build_parser() -> argparse.ArgumentParser:
    """The command line: every verb group's parsers, in the order a newcomer meets them."""
    parser = Parser(
        prog="inferaligner",
        description="Inference-time harmlessness for fine-tuned LLMs: gated cross-model safety steering.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for group in (align, vectors, generate, serve, evaluate, zoo):
        group.add_parsers(verbs)
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
