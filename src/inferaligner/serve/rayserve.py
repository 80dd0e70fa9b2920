"""Scale-out on Ray Serve: the same engine and OpenAI routes as `inferaligner serve`, as replicas behind Ray's proxy.

Each replica loads its own model, builds its own aligner and engine from the server's options, and serves the app
`create_app` makes, so a request sees exactly what one `inferaligner serve` process would answer: its gate, its
steering, streaming, 429s from the replica's own queue, `/metrics` of the replica that answered. Ray Serve's HTTP
proxy spreads requests over the replicas, and its controller replaces a replica whose process dies; requests that
replica was answering fail with an HTTP error the client can retry (they are not moved).

Needs `pip install 'inferaligner[ray]'`. `inferaligner serve --ray --replicas N` starts a local Ray instance (or joins
one: `--ray-address auto` / `ray://host:10001`) and deploys the application there.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from inferaligner.errors import InferAlignerError
from inferaligner.serve.app import create_app
from inferaligner.serve.continuous import make_engine
from inferaligner.serve.settings import ServeSettings

APP_NAME = "inferaligner"
DRAIN_S = 60.0  # how long a stopping replica may take to finish its requests (as `inferaligner serve` on SIGTERM)


def ray_serve() -> Any:
    """The `ray.serve` module, or a one-line error saying how to install it."""
    try:
        from ray import serve
    except ImportError as exc:
        raise InferAlignerError("Serving on Ray needs Ray Serve: pip install 'inferaligner[ray]'.") from exc
    return serve


class Replica:
    """One replica: a model, its aligner and engine, and the FastAPI app around them (started by the app's
    lifespan, which Ray Serve runs)."""

    def __init__(
        self,
        build: Callable[[Mapping[str, Any]], Any],
        options: Mapping[str, Any],
        settings: ServeSettings,
        threads: int,
    ) -> None:
        import torch

        torch.set_num_threads(max(1, threads))  # replicas on one machine share its cores
        aligner = build(options)
        self.engine = make_engine(aligner, settings.scheduler, **settings.engine_options())
        self.settings = settings

    def __serve_build_asgi_app__(self) -> Any:  # Ray Serve calls this, after __init__, for the replica's app
        return create_app(self.engine, self.settings)


def application(build: Callable[[Mapping[str, Any]], Any], options: Mapping[str, Any], settings: ServeSettings) -> Any:
    """The Ray Serve application: `settings.replicas` replicas, or (with `max_replicas`) between them and
    `max_replicas`, autoscaling on the number of requests each replica holds. Each replica calls `build(options)`
    for its `InferAligner` (a module-level function, so Ray can ship it by name)."""
    serve = ray_serve()
    holds = settings.max_batch + settings.max_queue  # what one replica runs and queues
    scaling: dict[str, Any] = {"num_replicas": settings.replicas}
    if settings.max_replicas:
        scaling = {
            "autoscaling_config": {
                "min_replicas": settings.replicas,
                "max_replicas": settings.max_replicas,
                "target_ongoing_requests": settings.max_batch,
            }
        }
    # Beyond what the replicas hold, Ray's proxy queues at most --max-queue requests more and answers the rest 429
    # with Retry-After, as one server's full queue does (Ray's own error body, not the OpenAI schema). Replicas
    # get as long as one server to drain on shutdown.
    deployment = serve.deployment(
        serve.ingress()(Replica),
        name="InferAligner",
        max_ongoing_requests=holds,
        max_queued_requests=settings.max_queue,
        graceful_shutdown_timeout_s=DRAIN_S,
        backpressure_config={"status_code": 429, "retry_after_s": settings.retry_after_s},
        ray_actor_options={"num_cpus": settings.cpus_per_replica},
        **scaling,
    )
    return deployment.bind(build, dict(options), settings, max(1, int(settings.cpus_per_replica)))


def run(app: Any, host: str, port: int, address: str | None, status: Any = print) -> None:
    """Deploy `app` on Ray (a local instance when `address` is None) with Ray's HTTP proxy on host:port, and serve
    until SIGTERM or Ctrl-C; then this application is deleted (other applications on a shared cluster keep
    running) and a local instance is shut down."""
    import ray

    serve = ray_serve()
    ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        status(f"Ray Serve application '{APP_NAME}' is up on http://{host}:{port} (pid {os.getpid()})")
        while not stop.wait(1.0):
            pass
    finally:
        status("shutting down the Ray Serve application")
        started = time.monotonic()
        if address is None:  # our own local instance: Serve and Ray go with it
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
        status(f"shut down in {time.monotonic() - started:.1f} s")
