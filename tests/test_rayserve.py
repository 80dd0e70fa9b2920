"""`inferaligner serve --ray`: two replicas on a local Ray instance, on loopback; one is killed under load."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_serve import HARMFUL, HARMLESS, free_port, make_aligner

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'inferaligner[ray]')")

KEY = "ray-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny-ray"


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    """The real CLI serving a tiny model (saved to disk) as two Ray Serve replicas."""
    folder = tmp_path_factory.mktemp("ray")
    aligner = make_aligner()
    aligner.model.save_pretrained(folder / "model")
    aligner.tokenizer.save_pretrained(folder / "model")
    aligner.target_vectors.save(folder / "vectors.safetensors")
    aligner.aligned_vectors.save(folder / "aligned.safetensors")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "inferaligner.cli",
        "serve",
        "--ray",
        "--replicas",
        "2",
        "--cpus-per-replica",
        "1",
        "--model",
        str(folder / "model"),
        "--target-vectors",
        str(folder / "vectors.safetensors"),
        "--aligned-vectors",
        str(folder / "aligned.safetensors"),
        "--layers",
        "1,2",
        "--alpha",
        "30",
        "--gate-layer",
        str(aligner.gate.layer),
        "--gate-bias",
        str(aligner.gate.bias),
        "--port",
        str(port),
        "--api-key",
        KEY,
        "--served-model-name",
        MODEL,
        "--max-batch",
        "4",
    ]
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        servers = _wait_for_replicas(url, 2, process, folder / "server.log")
        yield process, url, servers, folder / "server.log"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        log.close()


def _wait_for_replicas(
    url: str,
    count: int,
    process: subprocess.Popen,
    log: Path,
    timeout: float = 300,
    exclude: frozenset[str] = frozenset(),
) -> set[str]:
    """Poll /health until `count` different replicas (other than `exclude`) have answered; their server ids."""
    seen: set[str] = set()
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            reply = httpx.get(f"{url}/health", headers=AUTH, timeout=5)
            if reply.status_code == 200 and reply.json()["server"] not in exclude:
                seen.add(reply.json()["server"])
                if len(seen) >= count:
                    return seen
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"saw {len(seen)} of {count} replicas in {timeout} s:\n{log.read_text()[-3000:]}")


def _chat(url: str, prompt: str, max_tokens: int = 12, attempts: int = 4) -> tuple[dict, int]:
    """A chat request that retries what a client can retry (connection errors, 5xx); the answer and the attempts
    it took. Every attempt has a timeout, so nothing can hang."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    for attempt in range(1, attempts + 1):
        try:
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
            if reply.status_code == 200:
                return reply.json(), attempt
            assert reply.status_code >= 500, reply.text  # only server-side failures are retried
        except (httpx.TransportError, httpx.RemoteProtocolError):
            pass
        time.sleep(0.5 * attempt)
    raise AssertionError(f"no answer after {attempts} attempts")


def test_requests_spread_over_both_replicas_with_the_gate_of_each(ray_server) -> None:
    _, url, servers, _ = ray_server
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: _chat(url, p)[0], [HARMFUL, HARMLESS] * 12))
    answered_by = {reply["inferaligner"]["server"] for reply in replies}
    assert answered_by == servers
    assert all(r["inferaligner"]["gate"]["fired"] == (i % 2 == 0) for i, r in enumerate(replies))
    harmless = {r["choices"][0]["message"]["content"] for r in replies[1::2]}
    assert len(harmless) == 1  # every replica answers the same prompt the same way
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401  # the key is checked on every replica


def test_a_replica_killed_under_load_is_replaced_and_no_request_is_lost(ray_server) -> None:
    process, url, servers, log = ray_server
    victim = sorted(servers)[0]
    host, pid = victim.rsplit(":", 1)
    assert host == socket.gethostname()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        load = [pool.submit(_chat, url, prompt, 48) for prompt in [HARMLESS, HARMFUL] * 12]
        time.sleep(1.0)
        os.kill(int(pid), signal.SIGKILL)
        results = [future.result(timeout=300) for future in load]
    assert len(results) == 24  # every request answered, some after a retry
    retried = sum(attempts > 1 for _, attempts in results)
    print(f"replica {victim} killed under load: 24 of 24 answered, {retried} after a retry")
    survivors = _wait_for_replicas(url, 2, process, log, exclude=frozenset({victim}))  # one of them is new
    assert len(survivors) == 2


def test_sigterm_shuts_the_application_down(ray_server) -> None:
    process, url, _, _ = ray_server
    process.send_signal(signal.SIGTERM)
    assert process.wait(120) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=5)
