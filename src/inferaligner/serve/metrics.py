"""The server's Prometheus series: requests, latency, time to first token, inter-token latency, tokens, gate
decisions, queue depth, running rows, batch sizes and the prefix cache; one registry per server instance."""

from __future__ import annotations

import itertools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from inferaligner.serve.engine import Engine, Job


class Metrics:
    """Prometheus series for one server instance."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "inferaligner_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "inferaligner_request_latency_seconds",
            "Request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80),
        )
        self.prompt_tokens = Counter("inferaligner_prompt_tokens", "Prompt tokens", registry=self.registry)
        self.completion_tokens = Counter("inferaligner_completion_tokens", "Generated tokens", registry=self.registry)
        self.cached_prompt_tokens = Counter(
            "inferaligner_cached_prompt_tokens", "Prompt tokens taken from the prefix cache", registry=self.registry
        )
        self.gate = Counter("inferaligner_gate_decisions", "Gate decisions", ["fired"], registry=self.registry)
        self.batch = Histogram(
            "inferaligner_batch_size",
            "Rows decoded together: each batch, or the running rows after each join",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.first_token = Histogram(
            "inferaligner_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40),
        )
        self.inter_token = Histogram(
            "inferaligner_inter_token_seconds",
            "Between a request's consecutive generated tokens",
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
        )
        queue = Gauge("inferaligner_queue_depth", "Requests waiting for a batch", registry=self.registry)
        queue.set_function(lambda: engine.queue_depth)
        running = Gauge("inferaligner_running_rows", "Requests being generated now", registry=self.registry)
        running.set_function(lambda: engine.running_rows)
        engine.on_batch.append(self.batch.observe)
        tree = getattr(engine, "tree", None)
        if tree is not None:  # the continuous scheduler's prefix cache (`serve.prefix`)
            for name, help_text, read in (
                ("bytes", "Memory the prefix cache holds", lambda: tree.nbytes),
                ("budget_bytes", "The prefix cache's memory budget", lambda: tree.budget_bytes),
                ("nodes", "Prefixes (tree nodes) the prefix cache holds", lambda: tree.nodes),
                (
                    "hit_rate",
                    "Share of prefilled prompt tokens taken from the prefix cache",
                    lambda: tree.stats.hit_rate,
                ),
                ("hit_requests", "Prefilled requests that took a cached prefix", lambda: tree.stats.hits),
                ("requests", "Requests prefilled with the prefix cache on", lambda: tree.stats.lookups),
                ("evicted_nodes", "Prefixes dropped for the memory budget", lambda: tree.stats.evicted),
            ):
                Gauge(f"inferaligner_prefix_cache_{name}", help_text, registry=self.registry).set_function(read)

    def render(self) -> bytes:
        """The series in Prometheus' text format (reading changes nothing)."""
        return generate_latest(self.registry)

    def finished(self, job: Job) -> None:
        """Count a finished job: its tokens, cached prompt tokens, time to first token, inter-token gaps, gate."""
        self.completion_tokens.inc(len(job.tokens))
        self.cached_prompt_tokens.inc(job.cached_tokens)
        if job.token_times:
            self.first_token.observe(job.token_times[0] - job.created)
            for earlier, later in itertools.pairwise(job.token_times):
                self.inter_token.observe(later - earlier)
        if job.gate is not None:
            self.gate.labels(str(job.gate.fired).lower()).inc()

    def request(self, endpoint: str, status: str, seconds: float) -> None:
        """Count one answered request and its latency."""
        self.requests.labels(endpoint, status).inc()
        self.latency.labels(endpoint).observe(seconds)
