"""`ServeSettings`: everything `inferaligner serve` can be told besides the aligner, with its default. The one place
server defaults live: the command line's help texts read them, config files are checked against them, and the app,
the engines and Ray Serve take them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any

from inferaligner.errors import InferAlignerError

SCHEDULERS = ("continuous", "batch")
DEMO_NAME = "inferaligner-demo"
"""The model id clients send to the demo pair (`inferaligner serve` without a model)."""
API_KEY_VARIABLE = "INFERALIGNER_API_KEY"


@dataclass(frozen=True)
class ServeSettings:
    """The server's settings; built once, checked when built (one-line errors), never changed."""

    served_model_name: str = DEMO_NAME
    host: str = "127.0.0.1"
    port: int = 8000
    scheduler: str = "continuous"  # continuous batching; "batch": each batch runs to its end
    prefix_cache_mb: float = 256.0  # the continuous scheduler's prefix cache (`serve.prefix`); 0: none
    pass_cost_tokens: int = 0  # a forward pass's fixed cost in prompt tokens (continuous scheduler); 0: measured
    max_batch: int = 8
    batch_wait_ms: float = 10.0  # how long an idle server waits for company for its first request
    max_queue: int = 64
    max_tokens_limit: int = 512
    default_max_tokens: int = 0  # 0: 256, or the limit if that is lower
    api_key: str | None = None
    allow_client_disable: bool = False
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0
    retry_after_s: int = 1
    ray: bool = False
    replicas: int = 1
    max_replicas: int = 0  # 0: no autoscaling
    cpus_per_replica: float = 1.0
    ray_address: str = ""  # "": a local Ray instance

    def __post_init__(self) -> None:
        for field in fields(self):
            _check_kind(field.name, getattr(self, field.name), field.default)
        if self.api_key is not None and not self.api_key.strip():
            raise InferAlignerError("The API key is empty: give a real key, or leave --api-key out to serve without.")
        if not 1 <= self.port <= 65535:
            raise InferAlignerError(f"--port must be a TCP port (1-65535), not {self.port}.")
        if self.scheduler not in SCHEDULERS:
            raise InferAlignerError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {self.scheduler!r}.")
        if self.max_batch < 1 or self.max_queue < 1 or not 0 <= self.batch_wait_ms < math.inf:
            raise InferAlignerError(
                f"The server needs --max-batch >= 1 (got {self.max_batch}), --max-queue >= 1 (got {self.max_queue}) "
                f"and a batch wait of 0 ms or more (got {self.batch_wait_ms:g})."
            )
        self._check_continuous()
        if self.max_tokens_limit < 1 or not 0 <= self.default_max_tokens <= self.max_tokens_limit:
            raise InferAlignerError(
                f"The default max_tokens ({self.default_max_tokens}) must lie in 1..the limit "
                f"({self.max_tokens_limit}), or be 0 (256, or the limit if lower)."
            )
        if self.max_body_bytes < 1024 or not 0 < self.body_timeout_s < math.inf:
            raise InferAlignerError(
                "The body limit must be at least 1024 bytes and the body timeout a positive number of seconds."
            )
        if self.replicas < 1 or (self.max_replicas and self.max_replicas < self.replicas) or self.cpus_per_replica <= 0:
            raise InferAlignerError(
                f"Ray Serve needs --replicas >= 1 (got {self.replicas}), --max-replicas >= --replicas (got "
                f"{self.max_replicas}) and --cpus-per-replica > 0 (got {self.cpus_per_replica})."
            )

    def _check_continuous(self) -> None:
        if not 0 <= self.prefix_cache_mb < math.inf:
            raise InferAlignerError(
                f"--prefix-cache-mb must be 0 (no prefix cache) or more, and finite, not {self.prefix_cache_mb:g}."
            )
        if self.pass_cost_tokens < 0:
            raise InferAlignerError(
                f"--pass-cost-tokens must be 0 (measured at start) or more, not {self.pass_cost_tokens}."
            )

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ServeSettings:
        """The settings among `options` (others are ignored; `None` means the default); the API key comes from
        $INFERALIGNER_API_KEY when not given."""
        given = {f.name: options[f.name] for f in fields(cls) if options.get(f.name) is not None}
        if "api_key" not in given and os.environ.get(API_KEY_VARIABLE) is not None:
            given["api_key"] = os.environ[API_KEY_VARIABLE]
        return cls(**given)

    @property
    def max_tokens_default(self) -> int:
        """max_tokens for a request that gives none."""
        return self.default_max_tokens or min(256, self.max_tokens_limit)

    @property
    def batch_wait_s(self) -> float:
        return self.batch_wait_ms / 1000

    def engine_options(self) -> dict[str, Any]:
        """`make_engine`'s keywords: the batching limits, the prefix cache and a pass's cost."""
        return {
            "max_batch": self.max_batch,
            "batch_wait_s": self.batch_wait_s,
            "max_queue": self.max_queue,
            "prefix_cache_mb": self.prefix_cache_mb,
            "pass_cost_tokens": self.pass_cost_tokens,
        }


def _check_kind(name: str, value: Any, default: Any) -> None:
    """A value of the kind its default has (a float field takes an int; `None` only where the default is)."""
    if value is None and default is None:
        return
    kinds: tuple[type, ...] = (int, float) if isinstance(default, float) else (type(default),)
    if default is None:
        kinds = (str,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and not isinstance(default, bool)):
        raise InferAlignerError(f"'{name}' must be {_KIND_NAMES.get(kinds, 'a text')}, not {value!r}.")


_KIND_NAMES = {(int,): "a whole number", (int, float): "a number", (bool,): "true or false", (str,): "a text"}

DEFAULTS = ServeSettings()
