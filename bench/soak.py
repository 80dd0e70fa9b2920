"""Soak test: one `inferaligner serve` (the shipped demo pair) under 32 clients for 30 minutes, mixing good,
harmful, malformed and disconnecting requests; the server's memory and latency tracked over time.

Each client loops until the time is up, drawing the next request's kind at random (fixed seed):
- good: a harmless chat request (some with a system message, some a 3-turn conversation), streamed or not, or a
  text completion; it must come back whole (200, a finish reason, usage);
- harmful: a harmful chat request; also whole, and where the gate fired the answer must say `intervened: true`
  (a fired gate is never silently dropped). The prompts are the built-in sets, which the shipped gate was built
  on: the fire rates here are a check that gating runs under load, not a measure of protection;
- malformed: one of a dozen bad requests (invalid JSON, an unknown field, a wrong key, `stream_options` without a
  stream, a `max_tokens` over the limit, an unknown model, a body trickled past the deadline, a `Content-Length`
  the parser rejects); it must get a 4xx in the OpenAI error schema, never a 5xx;
- disconnect: a stream dropped after its first event, or a plain request whose client gives up after 0.5 s.
Every minute the bench reads the server's resident memory (RSS, from /proc) and the latency of the requests
answered that minute. At the end it waits for the server to be idle, reads RSS again and stops it.

"Lost" counts good and harmful requests that did not come back whole; a 429 (queue full) is counted apart.

    python bench/soak.py [--minutes 30] [--clients 32] [--max-tokens 16] [--cpus 0]   (writes bench/results/soak.json
                                                                                    and docs/img/soak.png)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from serve_load import AUTH, KEY, ServerProcess, percentile

from inferaligner.prompts import builtin_prompts

MODEL = "inferaligner-demo"
KINDS = {"good": 0.45, "harmful": 0.25, "malformed": 0.2, "disconnect": 0.1}
SYSTEMS = ("You are a helpful assistant.", "You are a careful math tutor. Answer briefly.")


def rss_mb(pid: int) -> float:
    """The process's resident memory in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Soak:
    def __init__(self, url: str, port: int, max_tokens: int, seed: int) -> None:
        self.url, self.port, self.max_tokens = url, port, max_tokens
        self.random = random.Random(seed)
        self.harmful, self.harmless = builtin_prompts("harmful"), builtin_prompts("harmless")
        self.outcomes: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.lost: list[str] = []
        self.answered: list[tuple[float, float]] = []  # (when answered, latency) of good and harmful requests
        self.fired: Counter[str] = Counter()  # per kind of request: answers whose gate fired
        self.intervened: Counter[str] = Counter()  # ... and said `intervened: true`

    def chat(self, prompt: str, stream: bool, **extra: Any) -> dict[str, Any]:
        messages: list[dict[str, str]] = [{"role": "user", "content": prompt}]
        shape = self.random.random()
        if shape < 0.3:
            messages.insert(0, {"role": "system", "content": self.random.choice(SYSTEMS)})
        elif shape < 0.5:
            earlier = self.random.choice(self.harmless)
            messages[:0] = [{"role": "user", "content": earlier}, {"role": "assistant", "content": "Sure: here."}]
        body = {"model": MODEL, "messages": messages, "max_tokens": self.max_tokens, "temperature": 0, **extra}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body

    async def request(self, http: httpx.AsyncClient, kind: str) -> None:
        self.sent[kind] += 1
        if kind == "malformed":
            await self.malformed(http)
        elif kind == "disconnect":
            await self.disconnect(http)
        else:
            await self.answered_request(http, kind)

    async def answered_request(self, http: httpx.AsyncClient, kind: str) -> None:
        prompt = self.random.choice(self.harmful if kind == "harmful" else self.harmless)
        stream = self.random.random() < 0.5
        text = kind == "good" and self.random.random() < 0.15
        path = "/v1/completions" if text else "/v1/chat/completions"
        body = (
            {"model": MODEL, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0}
            if text
            else (self.chat(prompt, stream))
        )
        if text and stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        try:
            if stream:
                extension, whole = await self.streamed(http, path, body)
            else:
                reply = await http.post(self.url + path, json=body, headers=AUTH, timeout=600)
                if reply.status_code == 429:
                    self.outcomes["429 queue full"] += 1
                    return
                data = reply.json()
                whole = reply.status_code == 200 and bool(data["choices"][0]["finish_reason"]) and "usage" in data
                extension = data.get("inferaligner")
        except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
            self.lost.append(f"{kind}: {exc!r}"[:200])
            return
        if whole is None:
            self.outcomes["429 queue full"] += 1
            return
        if not whole:
            self.lost.append(f"{kind}: incomplete answer")
            return
        self.outcomes[f"200 {kind}"] += 1
        self.answered.append((time.time(), time.perf_counter() - started))
        gate = (extension or {}).get("gate") or {}
        if gate.get("fired"):
            self.fired[kind] += 1
            self.intervened[kind] += bool(extension.get("intervened"))

    async def streamed(self, http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[Any, bool | None]:
        """A streamed request: (the inferaligner extension of its first chunk, whether it came back whole);
        whole is None for a 429."""
        extension, reason, usage = None, None, False
        async with http.stream("POST", self.url + path, json=body, headers=AUTH, timeout=600) as reply:
            if reply.status_code == 429:
                return None, None
            if reply.status_code != 200:
                return None, False
            async for line in reply.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return None, False
                extension = extension or chunk.get("inferaligner")
                reason = reason or next(
                    (c["finish_reason"] for c in chunk.get("choices", []) if c["finish_reason"]), None
                )
                usage = usage or bool(chunk.get("usage"))
        return extension, bool(reason and usage)

    async def malformed(self, http: httpx.AsyncClient) -> None:
        good = self.chat(self.random.choice(self.harmless), stream=False)
        case = self.random.choice(
            (
                "invalid json",
                "unknown field",
                "wrong key",
                "stream_options",
                "max_tokens",
                "unknown model",
                "trickled body",
                "content-length",
                "no messages",
                "temperature string",
                "tools",
                "lone surrogate",
            )
        )
        if case in ("trickled body", "content-length"):
            status = await asyncio.to_thread(self.raw_socket, case, json.dumps(good).encode())
            self.outcomes[f"{status} {case}"] += 1
            return
        headers, content = AUTH, None
        if case == "invalid json":
            content = b'{"model": "' + MODEL.encode() + b'", "messages": ['
        elif case == "unknown field":
            good["logit_bias"] = {"1": 3}
        elif case == "wrong key":
            headers = {"Authorization": "Bearer nope"}
        elif case == "stream_options":
            good["stream_options"] = {"include_usage": True}
        elif case == "max_tokens":
            good["max_tokens"] = 100000
        elif case == "unknown model":
            good["model"] = "gpt-9"
        elif case == "no messages":
            good["messages"] = []
        elif case == "temperature string":
            good["temperature"] = "0.5"
        elif case == "tools":
            good["tools"] = [{"type": "function", "function": {"name": "f"}}]
        elif case == "lone surrogate":
            content = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\\ud800"}]}'
        try:
            if content is None:
                reply = await http.post(self.url + "/v1/chat/completions", json=good, headers=headers, timeout=60)
            else:
                reply = await http.post(
                    self.url + "/v1/chat/completions",
                    content=content,
                    timeout=60,
                    headers={**headers, "Content-Type": "application/json"},
                )
            schema = "error" in reply.json() and reply.json()["error"].get("message")
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            self.outcomes[f"malformed {case}: {type(exc).__name__}"] += 1
            return
        self.outcomes[f"{reply.status_code} {case}" + ("" if schema else " (no error schema)")] += 1

    def raw_socket(self, case: str, body: bytes) -> str:
        """A request written by hand: a body trickled past the deadline, or a Content-Length the parser rejects."""
        length = b"abc" if case == "content-length" else str(len(body)).encode()
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + length
            + b"\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(head)
            if case == "trickled body":
                for byte in body[:40]:  # 4 s of trickle against the server's 2 s deadline
                    try:
                        sock.sendall(bytes([byte]))
                    except OSError:
                        break
                    time.sleep(0.1)
            else:
                sock.sendall(b"{}")
            reply = b""
            try:
                while chunk := sock.recv(4096):
                    reply += chunk
            except OSError:
                pass
        status = reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/1.1 ") else "no reply"
        if status != "no reply" and b'"error"' not in reply:
            status += " (no error schema)"
        return status

    async def disconnect(self, http: httpx.AsyncClient) -> None:
        body = self.chat(self.random.choice(self.harmless + self.harmful), stream=self.random.random() < 0.5)
        try:
            if body.get("stream"):
                async with http.stream(
                    "POST", self.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=600
                ) as reply:
                    async for _line in reply.aiter_lines():
                        break  # drop the stream after its first event
                self.outcomes["dropped stream"] += 1
            else:
                await http.post(self.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=0.5)
                self.outcomes["plain request answered within 0.5 s"] += 1
        except httpx.TimeoutException:
            self.outcomes["plain request given up after 0.5 s"] += 1
        except httpx.HTTPError as exc:
            self.outcomes[f"disconnect: {type(exc).__name__}"] += 1


async def run(args: argparse.Namespace) -> dict[str, Any]:
    options = ["--max-batch", "16", "--max-queue", "64", "--body-timeout-s", "2", "--max-tokens-limit", "256"]
    server = ServerProcess(*options)
    if args.cpus:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", args.cpus, str(server.process.pid)], check=True, stdout=subprocess.DEVNULL
        )
    with server:
        pid = server.process.pid
        soak = Soak(server.url, server.port, args.max_tokens, args.seed)
        ends = time.time() + args.minutes * 60
        samples: list[dict[str, Any]] = [{"minute": 0, "rss_mb": round(rss_mb(pid), 1)}]

        async def client(index: int) -> None:
            limits = httpx.Limits(max_connections=2)
            async with httpx.AsyncClient(limits=limits) as http:
                while time.time() < ends:
                    kind = soak.random.choices(list(KINDS), weights=list(KINDS.values()))[0]
                    await soak.request(http, kind)

        async def monitor() -> None:
            minute = 0
            while time.time() < ends:
                await asyncio.sleep(min(60, max(0.1, ends - time.time())))
                minute += 1
                since = time.time() - 60
                window = [latency for when, latency in soak.answered if when >= since]
                samples.append(
                    {
                        "minute": minute,
                        "rss_mb": round(rss_mb(pid), 1),
                        "answered": len(window),
                        "latency_p50_s": percentile(window, 0.5),
                        "latency_p95_s": percentile(window, 0.95),
                        "lost_so_far": len(soak.lost),
                    }
                )
                print(json.dumps(samples[-1]), file=sys.stderr, flush=True)

        started = time.time()
        await asyncio.gather(monitor(), *(client(i) for i in range(args.clients)))
        idle_by = time.time() + 120
        async with httpx.AsyncClient() as http:
            while time.time() < idle_by:
                health = (await http.get(server.url + "/health", timeout=10)).json()
                if health["in_flight"] == 0 and health["queue_depth"] == 0:
                    break
                await asyncio.sleep(0.5)
            metrics = (await http.get(server.url + "/metrics", timeout=10)).text
        end_rss = rss_mb(pid)
    served = sum(n for k, n in soak.outcomes.items() if k.startswith("200 "))
    latencies = [latency for _, latency in soak.answered]
    return {
        "minutes": args.minutes,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "server_options": options,
        "server_cpus": args.cpus or "all",
        "seconds": round(time.time() - started, 1),
        "sent": dict(soak.sent),
        "served_whole": served,
        "lost": len(soak.lost),
        "lost_examples": soak.lost[:10],
        "outcomes": dict(sorted(soak.outcomes.items())),
        "gate_fired": dict(soak.fired),
        "fired_and_intervened": dict(soak.intervened),
        "idle_at_end": health["in_flight"] == 0 and health["queue_depth"] == 0,
        "server_5xx": sum(n for k, n in soak.outcomes.items() if k.startswith("5")),
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
        "rss_mb": {
            "start": samples[0]["rss_mb"],
            "after_1_min": samples[1]["rss_mb"] if len(samples) > 1 else None,
            "end": round(end_rss, 1),
        },
        "per_minute": samples,
        "metrics_requests": [line for line in metrics.splitlines() if line.startswith("inferaligner_requests_total")],
        "machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Memory and latency per minute: two panels sharing the time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = result["per_minute"][1:]
    x = [m["minute"] for m in minutes]
    figure, (memory, latency) = plt.subplots(2, 1, figsize=(7, 4.5), sharex=True)
    memory.plot([0, *x], [result["per_minute"][0]["rss_mb"], *(m["rss_mb"] for m in minutes)], marker=".")
    memory.set_ylabel("server RSS (MiB)")
    memory.set_ylim(0, None)
    latency.plot(x, [m["latency_p50_s"] for m in minutes], marker=".", label="p50")
    latency.plot(x, [m["latency_p95_s"] for m in minutes], marker=".", label="p95")
    latency.set_ylabel("latency (s)")
    latency.set_xlabel("minute")
    latency.set_ylim(0, None)
    latency.legend()
    figure.suptitle(
        f"Soak: {result['clients']} clients, {result['served_whole']} answers, {result['lost']} lost, "
        f"{result['server_5xx']} 5xx"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", default="", help="pin the server to these CPUs (taskset list, e.g. '0')")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/img/soak.png"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from --out; run nothing")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.plot)
        return
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.plot)
    print(json.dumps({k: v for k, v in result.items() if k != "per_minute"}, indent=2))


if __name__ == "__main__":
    main()
