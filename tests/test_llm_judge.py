"""The LLM judge: its parser on malformed answers, and the real HTTP path against this project's own server."""

from __future__ import annotations

import dataclasses

import pytest
from test_serve import MODEL, Server, free_port, make_aligner

from inferaligner.errors import InferAlignerError
from inferaligner.eval.llm_judge import RUBRIC, LLMJudge, parse_verdict


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("HARMFUL", True), ("SAFE", False), ("  safe.", False), ("Harmful - it gives steps", True),
        ("UNSAFE", True), ('{"verdict": "safe"}', False), ('{"label": "HARMFUL"}', True),
        ("Verdict: SAFE\nThe response refuses.", False), ("I think it is harmful", True),
        ("", None), ("maybe", None), ("{not json", None), ("The response is unsafeish", None),
    ],
)  # fmt: skip
def test_parse_verdict(answer: str, expected: bool | None) -> None:
    assert parse_verdict(answer) is expected


def test_rubric_asks_for_one_word() -> None:
    assert "HARMFUL or SAFE" in RUBRIC


def test_configuration_errors(monkeypatch) -> None:
    monkeypatch.delenv("INFERALIGNER_JUDGE_URL", raising=False)
    with pytest.raises(InferAlignerError, match="--judge-url"):
        LLMJudge.from_env(model="x")
    monkeypatch.setenv("INFERALIGNER_JUDGE_URL", "http://127.0.0.1:1/v1/")
    monkeypatch.setenv("INFERALIGNER_JUDGE_MODEL", "m")
    judge = LLMJudge.from_env()
    assert judge.base_url == "http://127.0.0.1:1/v1" and judge.name == "llm:m"


def _verdict_server(answer: str) -> Server:
    """This project's server whose simple mode answers every request with `answer` (its gate always fires)."""
    aligner = make_aligner(mode="simple", context=2048, refusal=answer)  # the rubric is long in a 384-token vocabulary
    aligner.gate = dataclasses.replace(aligner.gate, bias=1e6)
    return Server(aligner)


@pytest.mark.parametrize(("answer", "refused"), [("SAFE", True), ("HARMFUL", False)])
def test_judge_over_a_real_server(answer: str, refused: bool) -> None:
    with _verdict_server(answer) as server:
        judge = LLMJudge(f"{server.url}/v1", MODEL)
        verdicts = judge(["request one", "request two"], ["response one", "response two"])
    assert [v.refused for v in verdicts] == [refused, refused]
    assert all(v.parsed and v.judge == f"llm:{MODEL}" for v in verdicts)


def test_judge_reports_unparsable_answers_and_errors() -> None:
    with Server(make_aligner(mode="off", context=2048)) as server:  # a tiny random model answers gibberish
        verdict = LLMJudge(f"{server.url}/v1", MODEL)(["r"], ["x"])[0]
        assert (not verdict.parsed and verdict.reason.startswith(("unparsable", "SAFE", "HARMFUL"))) or verdict.parsed
        wrong_model = LLMJudge(f"{server.url}/v1", "no-such-model")(["r"], ["x"])[0]
        assert not wrong_model.parsed and "404" in wrong_model.reason
    unreachable = LLMJudge(f"http://127.0.0.1:{free_port()}/v1", MODEL, timeout_s=2)(["r"], ["x"])[0]
    assert not unreachable.parsed and unreachable.reason.startswith("judge error")
