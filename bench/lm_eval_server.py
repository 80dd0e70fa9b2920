"""lm-evaluation-harness, a client nobody here wrote, against the running server, and the same task in-process.

Starts `inferaligner serve` (the demo pair: the arithmetic target under InferAligner, with an API key) on a free
loopback port, writes a local lm-eval task (the project's own held-out arithmetic problems, no download), and runs
`lm_eval --model local-chat-completions --apply_chat_template` from its own virtual environment
(`bash bench/peers/setup_envs.sh lm-eval`). Then answers the same prompts in-process with the same aligner, greedy,
scores them with the same rule (lm-eval's regex filter, first match, exact match) and compares score and answers.

    python bench/lm_eval_server.py [--limit 40] [--concurrent 4] [--out bench/results/lm_eval_server.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serve_load import AUTH, KEY, ServerProcess

from inferaligner.demo import demo_aligner
from inferaligner.eval.tasks import arithmetic_task

ROOT = Path(__file__).resolve().parent.parent
LM_EVAL = ROOT / ".bench-venvs" / "lm-eval" / "bin" / "lm_eval"
ANSWER = r"The answer is (-?[0-9,]+)"
MAX_TOKENS = 64
TASK = """task: inferaligner_arithmetic
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  max_gen_toks: {max_tokens}
  do_sample: false
  temperature: 0
filter_list:
  - name: answer
    filter:
      - function: regex
        regex_pattern: "{pattern}"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def extract(text: str) -> str:
    """lm-eval's regex filter: the first match's group, else "[invalid]"."""
    found = re.findall(ANSWER, text)
    return found[0].strip() if found else "[invalid]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--concurrent", type=int, default=4, help="lm-eval's concurrent requests")
    parser.add_argument("--out", type=Path, default=Path("bench/results/lm_eval_server.json"))
    args = parser.parse_args()
    if not LM_EVAL.exists():
        sys.exit(f"no lm-eval environment at {LM_EVAL.parent.parent}: run bash bench/peers/setup_envs.sh lm-eval")

    task = arithmetic_task(args.limit)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = folder / "arithmetic.jsonl"
        data.write_text(
            "".join(
                json.dumps({"question": q, "answer": str(a)}) + "\n"
                for q, a in zip(task.prompts, task.answers, strict=True)
            )
        )
        (folder / "tasks").mkdir()
        (folder / "tasks" / "arithmetic.yaml").write_text(
            TASK.format(data=data, max_tokens=MAX_TOKENS, pattern=ANSWER.replace("\\", "\\\\"))
        )
        with ServerProcess() as server:  # the demo pair, with an API key
            name = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"][0]["id"]
            model_args = (
                f"model={name},base_url={server.url}/v1/chat/completions,"
                f"num_concurrent={args.concurrent},max_retries=1,tokenized_requests=False"
            )
            command = [
                str(LM_EVAL),
                "--model",
                "local-chat-completions",
                "--model_args",
                model_args,
                "--tasks",
                "inferaligner_arithmetic",
                "--include_path",
                str(folder / "tasks"),
                "--apply_chat_template",
                "--output_path",
                str(folder / "out"),
                "--log_samples",
            ]
            env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
            client_started = time.perf_counter()
            subprocess.run(command, check=True, env=env)
            client_s = time.perf_counter() - client_started
        results = json.loads(next((folder / "out").rglob("results_*.json")).read_text())
        samples = [json.loads(line) for line in next((folder / "out").rglob("samples_*.jsonl")).open()]
    served_score = results["results"]["inferaligner_arithmetic"]["exact_match,answer"]
    served = {s["doc"]["question"]: s["resps"][0][0] for s in samples}

    aligner = demo_aligner()
    local = aligner.complete(task.prompts, max_new_tokens=MAX_TOKENS, batch_size=1)
    hits = [extract(c.text) == str(a) for c, a in zip(local, task.answers, strict=True)]
    local_score = sum(hits) / len(hits)
    same = sum(served[c.prompt].strip() == c.text for c in local)
    result = {
        "client": "lm-eval 0.4.13, local-chat-completions, --apply_chat_template",
        "task": f"{len(task.prompts)} held-out arithmetic problems, greedy, {MAX_TOKENS} tokens, exact match on "
        f"'{ANSWER}'",
        "served_exact_match": served_score,
        "in_process_exact_match": round(local_score, 4),
        "identical_answers": same,
        "prompts": len(task.prompts),
        "lm_eval_seconds": round(client_s, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
