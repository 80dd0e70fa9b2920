"""`generate` and `chat`: the target model under InferAligner, from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from inferaligner.cli.options import (
    alignment_options,
    build_aligner,
    generation_kwargs,
    generation_options,
    model_options,
    positive_int,
)
from inferaligner.errors import InferAlignerError


def cmd_generate(args: argparse.Namespace) -> int:
    from inferaligner.prompts import load_prompts

    prompts = list(args.prompt)
    if args.file:
        prompts += load_prompts(args.file, args.column)
    if not prompts:
        raise InferAlignerError("Give prompts as arguments or with --file.")
    kwargs = generation_kwargs(args)
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
                f"{aligner.describe()['model']} is a text-only model and cannot take images; use an image-text model."
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
    kwargs = generation_kwargs(args)
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


def add_parsers(verbs: Any) -> None:
    """Register this module's verbs."""

    generate = verbs.add_parser("generate", help="answer prompts with the target model under InferAligner")
    model_options(generate)
    alignment_options(generate)
    generation_options(generate)
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
    model_options(chat)
    alignment_options(chat)
    generation_options(chat)
    chat.set_defaults(run=cmd_chat)
