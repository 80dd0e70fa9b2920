"""Load test of `inferaligner serve` on loopback: continuous batching vs whole batches vs one at a time, under a
closed loop of clients and under Poisson arrivals; then a full queue, a disconnect storm, a hang-up storm, SIGTERM.

Each phase starts its own server process (the shipped demo pair) on a free 127.0.0.1 port and stops it after.
1. throughput: 32 concurrent clients send 256 streamed chat requests in all (harmful and harmless built-in prompts,
   greedy, --max-tokens each), each client sending its next request when its last one is answered; then the same
   requests sent at Poisson arrival times (--rate requests/s), whatever is still running. Each once with
   `--scheduler continuous --max-batch 16`, `--scheduler batch --max-batch 16` and `--scheduler batch --max-batch 1`:
   requests/s, tokens/s, time to first token p50/p95, latency p50/p95, requests lost.
   Phases `continuous32` and `continuous32-whole-prompts`: 32 seats, with and without the prefix cache.
   With `today` (and `--today-src`): the same against the server before this issue, from another checkout.
   With `ray`: the same against `serve --ray --replicas 2 --cpus-per-replica 1` (a local Ray instance); with
   `ray-kill`: 128 requests from clients that retry failures (up to 3 times), one replica killed 15 s in.
2. queue full: 64 simultaneous requests against --max-queue 8 --max-batch 4: some 429s, every request answered.
3. disconnect storm: 32 streams dropped after their first event; then the server must be healthy and idle.
4. hang-up storm: 32 non-streaming requests whose clients give up after 1 s; the server must be idle soon after.
5. SIGTERM under load: 16 requests in flight, then SIGTERM: every one answered, exit status 0.
All request loops are bounded in count and time and stop by themselves. Every server runs with an API key, so every
request also passes the key check.

    python bench/serve_load.py [--requests 256] [--clients 32] [--max-tokens 32] [--rate 1.2]
                               [--phases continuous,batched,serial,poisson,queue,...] [--serial-requests 64]
                               [--today-src CHECKOUT]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from inferaligner.prompts import builtin_prompts

DEADLINE_S = 1800  # the whole benchmark stops by itself after this
KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PHASES = (
    "continuous",
    "continuous32",
    "continuous32-whole-prompts",
    "batched",
    "batched32",
    "serial",
    "today",
    "poisson",
    "ray",
    "ray-kill",
    "queue",
    "disconnect",
    "hangup",
    "sigterm",
)
TODAY = "the server before issue 15 (whole batches, max 16)"
RAY = ("--ray", "--replicas", "2", "--cpus-per-replica", "1", "--scheduler", "continuous", "--max-batch", "16")
RAY_LABEL = "Ray Serve, 2 replicas (continuous, max 16 each)"
SCHEDULES = {  # phase: (label, server options)
    "continuous": ("continuous (max 16)", ("--scheduler", "continuous", "--max-batch", "16")),
    "continuous32": ("continuous (max 32)", ("--scheduler", "continuous", "--max-batch", "32")),
    "continuous32-whole-prompts": (
        "continuous (max 32), no prefix cache",
        ("--scheduler", "continuous", "--max-batch", "32", "--no-prefix-cache"),
    ),
    "batched": ("whole batches (max 16)", ("--scheduler", "batch", "--max-batch", "16")),
    "batched32": ("whole batches (max 32)", ("--scheduler", "batch", "--max-batch", "32")),
    "serial": ("one at a time", ("--scheduler", "batch", "--max-batch", "1")),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Launched:
    """A server process listening on loopback `port`: healthy (`GET /health`) on entry, stopped on exit."""

    def __init__(self, port: int, command: list[str], env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    def __enter__(self) -> Launched:
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.process.stderr.read().decode() if self.process.stderr else "server died")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not start in 300 s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


class ServerProcess(Launched):
    def __init__(self, *options: str, source: Path | None = None) -> None:
        """`inferaligner serve` with `options`; `source`: another checkout whose `src` is served instead."""
        port = free_port()
        command = [sys.executable, "-m", "inferaligner.cli", "serve", "--port", str(port), "--api-key", KEY, *options]
        env = {**os.environ, "PYTHONPATH": str(source.resolve() / "src")} if source is not None else None
        super().__init__(port, command, env)


def body(prompt: str, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "inferaligner-demo",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


class Tally:
    """What the clients saw: per request its latency and time to first token, tokens, and failures."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.first_tokens: list[float] = []
        self.tokens = 0
        self.failures: list[str] = []
        self.retried = 0

    async def send(self, http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, retries: int = 0) -> None:
        """One streamed chat request, timed from when it is first sent; an attempt that fails (an HTTP error
        status, an error event, a dropped connection) is sent again, up to `retries` times."""
        started = time.perf_counter()
        for attempt in range(retries + 1):
            failure = await self._attempt(http, url, prompt, max_tokens, started)
            if failure is None:
                return
            if attempt == retries:
                self.failures.append(failure)
                return
            self.retried += 1
            await asyncio.sleep(0.5 * (attempt + 1))

    async def _attempt(
        self, http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, started: float
    ) -> str | None:
        """One attempt: `None` when answered in full, else what went wrong."""
        first, tokens = None, 0
        try:
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body(prompt, max_tokens, True)) as reply:
                if reply.status_code != 200:
                    return f"{reply.status_code}: {(await reply.aread())[:200]!r}"
                async for line in reply.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return str(chunk["error"])[:200]
                    if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                        first = time.perf_counter() - started
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        except httpx.HTTPError as exc:
            return repr(exc)
        self.tokens += tokens
        self.latencies.append(time.perf_counter() - started)
        if first is not None:
            self.first_tokens.append(first)
        return None

    def summary(self, requests: int, seconds: float) -> dict[str, Any]:
        return {
            "requests": requests,
            "ok": len(self.latencies),
            "lost": requests - len(self.latencies),
            "failures": self.failures[:5],
            "seconds": round(seconds, 1),
            "requests_per_s": round(len(self.latencies) / seconds, 3),
            "tokens_per_s": round(self.tokens / seconds, 1),
            "ttft_p50_s": percentile(self.first_tokens, 0.5),
            "ttft_p95_s": percentile(self.first_tokens, 0.95),
            "latency_p50_s": percentile(self.latencies, 0.5),
            "latency_p95_s": percentile(self.latencies, 0.95),
            "retried": self.retried,
        }


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[round(q * (len(ordered) - 1))], 2) if ordered else None


async def throughput(url: str, prompts: list[str], clients: int, max_tokens: int, retries: int = 0) -> dict[str, Any]:
    """A closed loop: `clients` clients, each sending its next request once its last one is answered."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    tally = Tally()

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            await tally.send(http, url, queue.get_nowait(), max_tokens, retries)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, headers=AUTH, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(clients))), DEADLINE_S)
    return tally.summary(len(prompts), time.perf_counter() - started)


async def poisson(url: str, prompts: list[str], rate: float, max_tokens: int, seed: int = 0) -> dict[str, Any]:
    """An open loop: requests sent at Poisson arrival times (`rate` per second), whatever is still running."""
    draw = random.Random(seed)
    tally = Tally()

    async def arrive(http: httpx.AsyncClient, at: float, prompt: str) -> None:
        await asyncio.sleep(at)
        await tally.send(http, url, prompt, max_tokens)

    times = list(itertools.accumulate(draw.expovariate(rate) for _ in prompts))
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=DEADLINE_S, headers=AUTH, limits=httpx.Limits(max_connections=None)) as http:
        await asyncio.wait_for(
            asyncio.gather(*(arrive(http, t, p) for t, p in zip(times, prompts, strict=True))), DEADLINE_S
        )
    return tally.summary(len(prompts), time.perf_counter() - started) | {"rate": rate}


async def replicas(url: str, count: int, exclude: frozenset[str] = frozenset(), timeout: float = 600) -> set[str]:
    """The server ids of `count` different replicas (other than `exclude`), as /health answers them."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10) as http:
        while len(seen) < count and time.monotonic() < deadline:
            try:
                server = (await http.get(f"{url}/health")).json()["server"]
                if server not in exclude:
                    seen.add(server)
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            await asyncio.sleep(0.1)
    return seen


async def replica_kill(url: str, prompts: list[str], clients: int, max_tokens: int, after_s: float) -> dict[str, Any]:
    """The closed-loop load with clients that retry failed requests (up to 3 times); one replica's process is
    killed (SIGKILL) `after_s` seconds in. Reports what the clients saw and when Ray had a replacement serving."""
    servers = await replicas(url, 2)
    victim = sorted(servers)[0]
    load = asyncio.create_task(throughput(url, prompts, clients, max_tokens, retries=3))
    await asyncio.sleep(after_s)
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
    killed = time.perf_counter()
    replacement = await replicas(url, 1, exclude=frozenset(servers))
    replaced_after = round(time.perf_counter() - killed, 1) if replacement else None
    return await load | {
        "replicas_before": sorted(servers),
        "killed": victim,
        "killed_after_s": after_s,
        "replacement": sorted(replacement),
        "replacement_serving_after_s": replaced_after,
    }


async def burst(url: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=600, headers=AUTH) as http:
        responses = await asyncio.wait_for(
            asyncio.gather(
                *(http.post(f"{url}/v1/chat/completions", json=body(p, max_tokens)) for p in prompts),
                return_exceptions=True,
            ),
            DEADLINE_S,
        )
    codes = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in responses]
    retry = {r.headers.get("retry-after") for r in responses if isinstance(r, httpx.Response) and r.status_code == 429}
    return {
        "sent": len(prompts),
        "ok": codes.count(200),
        "busy_429": codes.count(429),
        "other": [c for c in codes if c not in (200, 429)],
        "retry_after": sorted(retry),
    }


async def disconnect_storm(url: str, prompts: list[str]) -> dict[str, Any]:
    async def drop(prompt: str) -> None:
        async with (
            httpx.AsyncClient(timeout=120, headers=AUTH) as http,
            http.stream("POST", f"{url}/v1/chat/completions", json=body(prompt, 200, stream=True)) as response,
        ):
            async for _line in response.aiter_lines():
                break  # first event, then hang up

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(drop(p) for p in prompts)), DEADLINE_S)
    async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:
        idle_after = None
        for _ in range(600):
            health = (await http.get(f"{url}/health")).json()
            if health["in_flight"] == 0:
                idle_after = round(time.perf_counter() - started, 2)
                break
            await asyncio.sleep(0.1)
        check = await http.post(f"{url}/v1/chat/completions", json=body("Name three fruits.", 8))
    return {"streams_dropped": len(prompts), "idle_after_s": idle_after, "next_request_status": check.status_code}


async def hangup_storm(url: str, prompts: list[str]) -> dict[str, Any]:
    async def give_up(prompt: str) -> str:
        try:
            async with httpx.AsyncClient(timeout=1.0, headers=AUTH) as http:
                response = await http.post(f"{url}/v1/chat/completions", json=body(prompt, 200))
                return str(response.status_code)
        except httpx.TimeoutException:
            return "client gave up"

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(give_up(p) for p in prompts))
    async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:
        idle_after = None
        for _ in range(1200):
            if (await http.get(f"{url}/health")).json()["in_flight"] == 0:
                idle_after = round(time.perf_counter() - started, 2)
                break
            await asyncio.sleep(0.1)
        check = await http.post(f"{url}/v1/chat/completions", json=body("Name three fruits.", 8))
    return {
        "requests": len(prompts),
        "clients_gave_up": outcomes.count("client gave up"),
        "idle_after_s": idle_after,
        "next_request_status": check.status_code,
    }


async def sigterm_under_load(server: ServerProcess, prompts: list[str]) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=600, headers=AUTH) as http:
        sent = [asyncio.create_task(http.post(f"{server.url}/v1/chat/completions", json=body(p, 64))) for p in prompts]
        await asyncio.sleep(2.0)
        os.kill(server.process.pid, signal.SIGTERM)
        responses = await asyncio.wait_for(asyncio.gather(*sent, return_exceptions=True), DEADLINE_S)
    codes = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in responses]
    exit_status = await asyncio.to_thread(server.process.wait, 120)
    return {
        "in_flight_at_sigterm": len(prompts),
        "answered_200": codes.count(200),
        "lost": len(codes) - codes.count(200),
        "other": [c for c in codes if c != 200],
        "exit_status": exit_status,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1.2, help="Poisson arrivals per second")
    parser.add_argument(
        "--serial-requests", type=int, default=64, help="requests sent to the one-at-a-time server (it takes ~3 s each)"
    )
    parser.add_argument(
        "--today-src",
        type=Path,
        help="phase `today`: a checkout of the server before issue 15, e.g. `git worktree add /tmp/today ae23701`",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve_load.json"))
    parser.add_argument(
        "--phases",
        default=",".join(p for p in PHASES if p != "today"),
        help=f"comma-separated subset of {', '.join(PHASES)} (default: all but `today`)",
    )
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    pool = builtin_prompts("harmful", "all") + builtin_prompts("everyday", "all") + builtin_prompts("harmless", "all")
    prompts = [pool[(i * 7) % len(pool)] for i in range(args.requests)]
    common = ["--max-queue", str(args.requests)]
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, 2-core VM",
        "clients": args.clients,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rate": args.rate,
        "serial_requests": args.serial_requests,
    }
    if "today" in phases and args.today_src is None:
        parser.error("phase `today` needs --today-src")
    started = time.perf_counter()
    schedules = {**SCHEDULES, "today": (TODAY, ("--max-batch", "16"))}
    for phase, (label, options) in schedules.items():
        if phase not in phases:
            continue
        sent = prompts[: args.serial_requests] if phase == "serial" else prompts
        with ServerProcess(*options, *common, source=args.today_src if phase == "today" else None) as server:
            result[label] = asyncio.run(throughput(server.url, sent, args.clients, args.max_tokens))
            print(label, json.dumps(result[label]), flush=True)
            if "poisson" in phases:
                result[f"{label}, Poisson"] = asyncio.run(poisson(server.url, sent, args.rate, args.max_tokens))
                print(f"{label}, Poisson", json.dumps(result[f"{label}, Poisson"]), flush=True)
    if {"continuous", "batched"} <= phases:
        before, after = result["whole batches (max 16)"], result["continuous (max 16)"]
        result["continuous_vs_batches"] = {
            "throughput": round(after["tokens_per_s"] / before["tokens_per_s"], 2),
            "latency_p95": round(after["latency_p95_s"] / before["latency_p95_s"], 2),
        }
        print("continuous vs whole batches:", json.dumps(result["continuous_vs_batches"]), flush=True)
    if "today" in phases:
        result["today_src"] = subprocess.run(
            ["git", "-C", str(args.today_src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        for label, _ in SCHEDULES.values():
            if label in result:
                result[f"{label} vs {TODAY}"] = {
                    "throughput": round(result[label]["tokens_per_s"] / result[TODAY]["tokens_per_s"], 2),
                    "latency_p95": round(result[label]["latency_p95_s"] / result[TODAY]["latency_p95_s"], 2),
                }
                print(f"{label} vs {TODAY}:", json.dumps(result[f"{label} vs {TODAY}"]), flush=True)
    if phases & {"ray", "ray-kill"}:
        with ServerProcess(*RAY, *common) as server:
            if "ray" in phases:
                result[RAY_LABEL] = asyncio.run(throughput(server.url, prompts, args.clients, args.max_tokens))
                print(RAY_LABEL, json.dumps(result[RAY_LABEL]), flush=True)
                if "poisson" in phases:
                    result[f"{RAY_LABEL}, Poisson"] = asyncio.run(
                        poisson(server.url, prompts, args.rate, args.max_tokens)
                    )
                    print(f"{RAY_LABEL}, Poisson", json.dumps(result[f"{RAY_LABEL}, Poisson"]), flush=True)
            if "ray-kill" in phases:
                result["ray_replica_kill"] = asyncio.run(
                    replica_kill(server.url, prompts[:128], args.clients, args.max_tokens, after_s=15.0)
                )
                print("Ray replica killed under load", json.dumps(result["ray_replica_kill"]), flush=True)
    if "queue" in phases:
        with ServerProcess("--max-batch", "4", "--max-queue", "8") as server:
            result["queue_full"] = asyncio.run(burst(server.url, prompts[:64], 16))
        print("queue full", json.dumps(result["queue_full"]))
    if "disconnect" in phases:
        with ServerProcess("--max-batch", "8") as server:
            result["disconnect_storm"] = asyncio.run(disconnect_storm(server.url, prompts[:32]))
        print("disconnect storm", json.dumps(result["disconnect_storm"]))
    if "hangup" in phases:
        with ServerProcess("--max-batch", "8") as server:
            result["hangup_storm"] = asyncio.run(hangup_storm(server.url, prompts[:32]))
        print("hang-up storm", json.dumps(result["hangup_storm"]))
    if "sigterm" in phases:
        with ServerProcess("--max-batch", "8") as server:
            result["sigterm"] = asyncio.run(sigterm_under_load(server, prompts[:16]))
        print("SIGTERM under load", json.dumps(result["sigterm"]))
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
