"""Load test of `inferaligner serve` on loopback: dynamic batching vs one-at-a-time, a full queue, a disconnect storm.

Each phase starts its own server process (the shipped demo pair) on a free 127.0.0.1 port and stops it after.
1. throughput: 32 concurrent clients send 256 chat requests in all (harmful and harmless built-in prompts, greedy,
   --max-tokens each); once with --max-batch 16 and once with --max-batch 1; latency p50/p95, requests/s, tokens/s.
2. queue full: 64 simultaneous requests against --max-queue 8 --max-batch 4: some 429s, every request answered.
3. disconnect storm: 32 streams dropped after their first event; then the server must be healthy and idle.
4. hang-up storm: 32 non-streaming requests whose clients give up after 1 s; the server must be idle soon after.
5. SIGTERM under load: 16 requests in flight, then SIGTERM: every one answered, exit status 0.
All request loops are bounded in count and time and stop by themselves. Every server runs with an API key, so every
request also passes the key check.

    python bench/serve_load.py [--requests 256] [--clients 32] [--max-tokens 32] [--phases batched,serial,...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
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
PHASES = ("batched", "serial", "queue", "disconnect", "hangup", "sigterm")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "inferaligner.cli", "serve", "--port", str(self.port), "--api-key", KEY,
                   *options]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> ServerProcess:
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


def body(prompt: str, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"model": "inferaligner-demo", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}  # fmt: skip


async def throughput(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict[str, Any]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    latencies: list[float] = []
    failures: list[str] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            started = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/chat/completions", json=body(prompt, max_tokens))
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    continue
                tokens += response.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - started)
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, headers=AUTH) as http:
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(clients))), DEADLINE_S)
    seconds = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "requests": len(prompts), "ok": len(latencies), "failed": len(failures), "failures": failures[:5],
        "seconds": round(seconds, 1), "requests_per_s": round(len(latencies) / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "latency_p50_s": round(statistics.median(ordered), 2) if ordered else None,
        "latency_p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 2) if ordered else None,
    }  # fmt: skip


async def burst(url: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=600, headers=AUTH) as http:
        responses = await asyncio.wait_for(
            asyncio.gather(*(http.post(f"{url}/v1/chat/completions", json=body(p, max_tokens)) for p in prompts),
                           return_exceptions=True), DEADLINE_S)  # fmt: skip
    codes = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in responses]
    retry = {r.headers.get("retry-after") for r in responses if isinstance(r, httpx.Response) and r.status_code == 429}
    return {"sent": len(prompts), "ok": codes.count(200), "busy_429": codes.count(429),
            "other": [c for c in codes if c not in (200, 429)], "retry_after": sorted(retry)}  # fmt: skip


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
    return {"requests": len(prompts), "clients_gave_up": outcomes.count("client gave up"), "idle_after_s": idle_after,
            "next_request_status": check.status_code}  # fmt: skip


async def sigterm_under_load(server: ServerProcess, prompts: list[str]) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=600, headers=AUTH) as http:
        sent = [asyncio.create_task(http.post(f"{server.url}/v1/chat/completions", json=body(p, 64)))
                for p in prompts]  # fmt: skip
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
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve_load.json"))
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {', '.join(PHASES)}")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    pool = builtin_prompts("harmful", "all") + builtin_prompts("everyday", "all") + builtin_prompts("harmless", "all")
    prompts = [pool[(i * 7) % len(pool)] for i in range(args.requests)]
    common = ["--max-queue", str(args.requests)]
    result: dict[str, Any] = {"machine": f"{platform.machine()}, 2-core VM", "clients": args.clients,
                              "requests": args.requests, "max_tokens": args.max_tokens}  # fmt: skip
    started = time.perf_counter()
    for phase, label, batch in (("batched", "batched (max 16)", "16"), ("serial", "one at a time", "1")):
        if phase in phases:
            with ServerProcess("--max-batch", batch, *common) as server:
                result[label] = asyncio.run(throughput(server.url, prompts, args.clients, args.max_tokens))
            print(label, json.dumps(result[label]))
    if {"batched", "serial"} <= phases:
        speedup = result["batched (max 16)"]["tokens_per_s"] / result["one at a time"]["tokens_per_s"]
        result["speedup"] = round(speedup, 2)
        print(f"throughput with batching: {result['speedup']}x one-at-a-time")
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
