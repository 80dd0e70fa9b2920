"""`serve`: the OpenAI-compatible server, its options and config file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferaligner.errors import InferAlignerError

if TYPE_CHECKING:
    pass

from inferaligner.cli.options import (
    alignment_options,
    build_aligner,
    model_options,
    parse_layers,
    positive_int,
    status,
)

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
        status(
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
    status(
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
    status(
        f"deploying '{config.model_name}' on Ray Serve: {options['replicas']} replica(s), "
        f"{options['scheduler']} batching"
    )
    rayserve.run(app, str(options["host"]), int(options["port"]), options["ray_address"] or None, status=status)
    return 0


def add_parsers(verbs: Any) -> None:
    """Register this module's verbs."""

    serve = verbs.add_parser("serve", help="serve an OpenAI-compatible API with InferAligner (default: demo pair)")
    serve.add_argument("--config", type=Path, help="JSON file with any of the options below (options win)")
    model_options(serve, default=None)
    alignment_options(serve)
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
