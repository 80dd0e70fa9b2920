"""Same behaviour before and after a refactor: the server's answers and the eval's figures from another checkout and
from this one, compared field by field.

1. Server: `inferaligner serve` (the demo pair) from each checkout answers the same fixed requests: chat (plain and
   streamed, bare, under a system message, after an earlier turn, harmful and harmless), text completions and
   log-probabilities, greedy. Compared: the answer text, finish reason, usage, the gate (fired, score, layer) and
   `intervened`, and the log-probabilities (ids and timestamps differ by design and are left out).
2. Eval: `inferaligner eval --demo arithmetic --methods target,inferaligner,simple --limit N` from each checkout;
   every figure of `results.json` (per method and task) compared.

    git worktree add /tmp/before <commit>
    python bench/same_behaviour.py --before /tmp/before [--limit 10] [--out bench/results/same_behaviour.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from serve_load import AUTH, ServerProcess

from inferaligner.prompts import builtin_prompts

MODEL = "inferaligner-demo"


def requests() -> list[tuple[str, dict[str, Any]]]:
    """The fixed requests: (path, body)."""
    harmful, harmless = builtin_prompts("harmful", "calibration")[:4], builtin_prompts("harmless", "calibration")[:4]
    system = {"role": "system", "content": "You are a helpful assistant."}
    earlier = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]
    out: list[tuple[str, dict[str, Any]]] = []
    for prompt in harmful + harmless:
        for history in ([], [system], earlier):
            body = {
                "model": MODEL,
                "messages": [*history, {"role": "user", "content": prompt}],
                "max_tokens": 24,
                "temperature": 0,
            }
            out.append(("/v1/chat/completions", body))
        out.append(("/v1/chat/completions", {**out[-1][1], "stream": True, "stream_options": {"include_usage": True}}))
        out.append(
            ("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 2})
        )
    out.append(("/v1/chat/completions", {**out[0][1], "logprobs": True, "top_logprobs": 3}))
    return out


def comparable(path: str, body: dict[str, Any], reply: httpx.Response) -> Any:
    """What must not change: the status and, for answers, everything but ids and timestamps."""
    if reply.status_code != 200:
        return {"status": reply.status_code, "error": reply.json().get("error")}
    if body.get("stream"):
        chunks = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
        for chunk in chunks:
            chunk.pop("id"), chunk.pop("created")
            chunk.get("inferaligner", {}).pop("server", None)
        return chunks
    data = reply.json()
    data.pop("id"), data.pop("created")
    data["inferaligner"].pop("server")
    return data


def serve_answers(source: Path | None) -> list[Any]:
    # One request at a time: no batching effects.
    with ServerProcess("--max-batch", "1", source=source) as server, httpx.Client(headers=AUTH, timeout=300) as http:
        return [comparable(path, body, http.post(server.url + path, json=body)) for path, body in requests()]


def eval_figures(source: Path | None, limit: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str((source or Path.cwd()).resolve() / "src")}
    env.setdefault("INFERALIGNER_DATA", str(Path.cwd().resolve().parent / "shared" / "data"))
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            "-m",
            "inferaligner.cli",
            "eval",
            "--demo",
            "arithmetic",
            "--methods",
            "target,inferaligner,simple",
            "--limit",
            str(limit),
            "--out",
            out,
        ]
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads((Path(out) / "results.json").read_text())["methods"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the other checkout (a git worktree)")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/same_behaviour.json"))
    args = parser.parse_args()
    started = time.time()
    before, after = serve_answers(args.before), serve_answers(None)
    same = [a == b for a, b in zip(before, after, strict=True)]
    eval_before, eval_after = eval_figures(args.before, args.limit), eval_figures(None, args.limit)
    commit = subprocess.run(
        ["git", "-C", str(args.before), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "before": commit,
        "after": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "server_requests": len(same),
        "server_identical": sum(same),
        "server_differences": [i for i, s in enumerate(same) if not s],
        "eval_limit": args.limit,
        "eval_identical": eval_before == eval_after,
        "eval_methods": sorted(eval_after),
        "seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
