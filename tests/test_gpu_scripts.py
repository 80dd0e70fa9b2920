"""The GPU scripts in `bench/` run only where a GPU is lent: each runs here, small, on the CPU, so that it keeps running
(a script that stopped before its first check went unnoticed once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_script(name: str, *arguments: str, out: Path) -> dict:
    command = [sys.executable, str(BENCH / name), *arguments, "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())


def test_gpu_serving_runs_every_step(tmp_path: Path) -> None:
    result = run_script("gpu_serving.py", "--tiny", "--device", "cpu", "--repeats", "1", out=tmp_path / "serving.json")
    assert [found["answers equal to generate alone"] for found in result["exactness"].values()] == ["10 of 10"] * 2
    assert [row["prefix_cache_mb"] for row in result["multi_turn"]] == [0.0, 4096.0, 4096.0, 4096.0]
    assert [row["gate"] for row in result["multi_turn"][2:]] == ["turns, read apart", "turns, read inside"]
    assert all(row["cached_share"] > 0.5 for row in result["multi_turn"][1:]) and len(result["fired_path"]) == 8


def test_gpu_speed_checks_exactness_and_times_every_method(tmp_path: Path) -> None:
    arguments = ("--tiny", "--device", "cpu", "--repeats", "1", "--new-tokens", "4", "--batch-sizes", "1", "2")
    result = run_script("gpu_speed.py", *arguments, out=tmp_path / "speed.json")
    assert [check["passed"] for check in result["correctness"]] == [True, True]
    assert [(row["batch"], row["method"]) for row in result["throughput"]] == [
        (size, method) for size in (1, 2) for method in ("plain", "gate off", "gate on")
    ]


def test_gpu_multimodal_passes_its_checks(tmp_path: Path) -> None:
    arguments = ("--shape", "tiny", "--device", "cpu", "--repeats", "1")
    result = run_script("gpu_multimodal.py", *arguments, out=tmp_path / "multimodal.json")
    assert result["passed"], result["checks"]
    assert len(result["timing"]) == 6
