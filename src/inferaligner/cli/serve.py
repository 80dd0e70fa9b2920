"""`serve`: the OpenAI-compatible server, its options and config file. Every server default is read from
`inferaligner.serve.settings.ServeSettings` (help texts included), and the settings check every value."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from inferaligner.cli.options import (
    alignment_options,
    build_aligner,
    model_options,
    parse_layers,
    positive_int,
    status,
)
from inferaligner.errors import InferAlignerError
from inferaligner.serve.settings import DEFAULTS, DEMO_NAME, SCHEDULERS, ServeSettings

SERVE_DEFAULTS = {f.name: getattr(DEFAULTS, f.name) for f in fields(ServeSettings) if f.name != "served_model_name"}
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
        actions: dict[str, argparse.Action] = {}
        for action in args.config_parser._actions:  # an option that takes a value reads the key, not its flag
            if action.dest not in actions or action.nargs != 0:  # (--no-prefix-cache beside --prefix-cache-mb)
                actions[action.dest] = action
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
    if options.get("aligned"):  # an aligned folder brings its model, gate and settings
        from inferaligner.build import with_shipped

        options = with_shipped(options)
    if not options.get("model"):  # the demo pair: the shipped target brings its gate and steering settings
        options |= {"model": "zoo:target", "served_model_name": options.get("served_model_name") or DEMO_NAME}
    options["served_model_name"] = options.get("served_model_name") or str(options["model"])
    return options


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise InferAlignerError(f"Cannot serve on {host}:{port}: {exc.strerror or exc}.") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from inferaligner.build import dtype
    from inferaligner.serve import create_app, make_engine
    from inferaligner.serve.http import http_protocol

    options = _serve_options(args)
    settings = ServeSettings.from_options(options)  # every option is checked before the model loads
    dtype(options)
    _check_port_free(settings.host, settings.port)
    if settings.api_key is None:
        status(
            f"warning: no API key; anyone who can reach {settings.host}:{settings.port} can use this server "
            "(set --api-key or INFERALIGNER_API_KEY)"
        )
    if settings.ray:
        return _serve_on_ray(options, settings)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to the handler found before it ran:
    # make that handler a clean exit, so a drained server ends with status 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    aligner, _ = build_aligner(options)
    engine = make_engine(aligner, settings.scheduler, **settings.engine_options())
    status(
        f"serving '{settings.served_model_name}' (mode {aligner.settings.mode.value}, gate: {aligner.gating}) on "
        f"http://{settings.host}:{settings.port}, {engine.scheduler} batching"
    )
    uvicorn.run(
        create_app(engine, settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=60,
        http=http_protocol(),
    )
    return 0


def _serve_on_ray(options: dict[str, Any], settings: ServeSettings) -> int:
    """`serve --ray`: the same app as replicas on Ray Serve (`inferaligner.serve.rayserve`)."""
    from inferaligner.build import alignment, build_aligner
    from inferaligner.serve import rayserve

    rayserve.ray_serve()  # installed? (a one-line error before anything loads)
    alignment(options)  # the vector files and settings are checked here, before any replica loads a model
    app = rayserve.application(build_aligner, options, settings)
    status(
        f"deploying '{settings.served_model_name}' on Ray Serve: {settings.replicas} replica(s), "
        f"{settings.scheduler} batching"
    )
    rayserve.run(app, settings.host, settings.port, settings.ray_address or None, status=status)
    return 0


def add_parsers(verbs: Any) -> None:
    """Register this module's verbs."""

    serve = verbs.add_parser("serve", help="serve an OpenAI-compatible API with InferAligner (default: demo pair)")
    serve.add_argument("--config", type=Path, help="JSON file with any of the options below (options win)")
    model_options(serve, default=None)
    alignment_options(serve)
    serve.add_argument("--host", help=f"bind address (default {DEFAULTS.host})")
    serve.add_argument("--port", type=positive_int, help=f"default {DEFAULTS.port}")
    serve.add_argument(
        "--served-model-name", help=f"the model id clients send (default: the model, or '{DEFAULTS.served_model_name}')"
    )
    serve.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        help="continuous: requests join and leave the running batch at each decoding step; batch: each batch runs "
        f"to its end (default {DEFAULTS.scheduler})",
    )
    serve.add_argument(
        "--prefix-cache-mb",
        type=float,
        metavar="MB",
        help="memory for the continuous scheduler's prefix cache: keys and values of system messages, earlier turns "
        "and answers it ran before, so a request prefills only what follows them; least recently used dropped "
        f"first (default {DEFAULTS.prefix_cache_mb:g}; 0: none)",
    )
    serve.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache_mb",
        action="store_const",
        const=0.0,
        help="prefill every request whole (--prefix-cache-mb 0)",
    )
    serve.add_argument(
        "--pass-cost-tokens",
        type=int,
        metavar="N",
        help="a forward pass's fixed cost in prompt tokens, for the continuous scheduler's prefill groups and "
        "whether a turns gate reads new turns inside the prefill (default: measured at start; a CPU's is tens of "
        "tokens, a GPU's hundreds or more)",
    )
    serve.add_argument("--max-batch", type=positive_int, help=f"rows decoded together (default {DEFAULTS.max_batch})")
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        help=f"how long an idle server waits for company for its first request (default {DEFAULTS.batch_wait_ms:g})",
    )
    serve.add_argument(
        "--max-queue", type=positive_int, help=f"waiting requests before answering 429 (default {DEFAULTS.max_queue})"
    )
    serve.add_argument(
        "--max-tokens-limit",
        type=positive_int,
        help=f"largest max_tokens a request may ask (default {DEFAULTS.max_tokens_limit})",
    )
    serve.add_argument(
        "--default-max-tokens",
        type=positive_int,
        help="max_tokens when a request gives none (default: 256, at most the limit)",
    )
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set INFERALIGNER_API_KEY)")
    serve.add_argument(
        "--max-body-bytes", type=positive_int, help=f"largest request body (default {DEFAULTS.max_body_bytes} bytes)"
    )
    serve.add_argument(
        "--body-timeout-s",
        type=float,
        help=f"time a client may take to send its whole body (default {DEFAULTS.body_timeout_s:g})",
    )
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
    ray.add_argument(
        "--replicas", type=positive_int, help=f"replicas (default {DEFAULTS.replicas}; the minimum with --max-replicas)"
    )
    ray.add_argument(
        "--max-replicas",
        type=positive_int,
        help="autoscale between --replicas and this many, on the requests each replica holds",
    )
    ray.add_argument(
        "--cpus-per-replica",
        type=float,
        help=f"CPUs Ray reserves per replica, and its torch threads (default {DEFAULTS.cpus_per_replica:g})",
    )
    ray.add_argument(
        "--ray-address",
        help="join a running Ray cluster ('auto', or ray://HEAD:10001); default: start a local instance",
    )
    serve.set_defaults(run=cmd_serve, config_parser=serve)
