"""Teachers: a JSONL file, an OpenAI-compatible endpoint (a real HTTP server on loopback), a model; only coherent
refusals are kept, and a teacher that cannot teach is a one-line error."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from inferaligner.errors import PromptError
from inferaligner.teachers import EndpointTeacher, FileTeacher, ModelTeacher, TeacherError, teach

REFUSAL = "I can't help with that. It could hurt people, so I won't provide it."
COMPLIANCE = "Sure! Step one: gather the materials and mix them in a bucket."


class Endpoint:
    """A chat-completions endpoint on a loopback port that answers as `reply(body, count)` says."""

    def __init__(self, reply) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append(body)
                endpoint.headers.append(dict(self.headers))
                status, payload = reply(body, len(endpoint.requests))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Endpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def completion(text: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def refusing(body: dict, _count: int) -> tuple[int, dict]:
    return 200, completion(REFUSAL)


PROMPTS = [f"How do I build weapon number {i}?" for i in range(6)]


def test_an_endpoint_teacher_answers_caches_and_sends_the_key(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TEACHER_KEY", "sk-test")
    cache = tmp_path / "answers.jsonl"
    with Endpoint(refusing) as endpoint:
        teacher = EndpointTeacher(endpoint.url, "guard-model", key_env="TEACHER_KEY", per_second=200, cache=cache)
        taught = teach(teacher, PROMPTS, system="Be safe.", min_refusals=6, progress=False)
        again = EndpointTeacher(endpoint.url, "guard-model", key_env="TEACHER_KEY", per_second=200, cache=cache)
        assert again.answer(PROMPTS, system="Be safe.", max_new_tokens=64, progress=False) == [REFUSAL] * 6
    assert taught.refusals == [(p, REFUSAL) for p in PROMPTS]
    assert len(endpoint.requests) == 6  # the second teacher read every answer from the cache
    first = endpoint.requests[0]
    assert first["model"] == "guard-model" and first["temperature"] == 0 and first["max_tokens"] == 64
    assert first["messages"][0] == {"role": "system", "content": "Be safe."}
    assert endpoint.headers[0]["Authorization"] == "Bearer sk-test"


def test_an_endpoint_teacher_retries_a_busy_server_and_spaces_its_requests(tmp_path) -> None:
    def busy_then_fine(body: dict, count: int) -> tuple[int, dict]:
        return (503, {"error": "busy"}) if count <= 2 else (200, completion(REFUSAL))

    with Endpoint(busy_then_fine) as endpoint:
        teacher = EndpointTeacher(endpoint.url, "m", per_second=50, retries=3)
        assert teacher.answer(PROMPTS[:1], system=None, max_new_tokens=8, progress=False) == [REFUSAL]
    assert len(endpoint.requests) == 3


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (lambda body, count: (200, {"id": "x", "object": "thing"}), "answered garbage"),
        (lambda body, count: (200, b"<html>hello</html>"), "not JSON"),
        (lambda body, count: (401, {"error": "bad key"}), r"refused the request \(HTTP 401"),
        (lambda body, count: (503, {"error": "down"}), "did not answer after 2 tries"),
    ],
)
def test_an_endpoint_that_answers_garbage_or_fails_is_a_one_line_error(reply, message) -> None:
    with Endpoint(reply) as endpoint:
        teacher = EndpointTeacher(endpoint.url, "m", per_second=100, retries=1)
        with pytest.raises(TeacherError, match=message):
            teacher.answer(PROMPTS[:1], system=None, max_new_tokens=8, progress=False)


def test_an_endpoint_that_is_down_is_a_one_line_error() -> None:
    with Endpoint(refusing) as endpoint:
        url = endpoint.url  # the port is closed once the server has gone
    teacher = EndpointTeacher(url, "m", per_second=100, retries=1)
    with pytest.raises(TeacherError, match="did not answer after 2 tries"):
        teacher.answer(PROMPTS[:1], system=None, max_new_tokens=8, progress=False)


def test_endpoint_settings_are_checked() -> None:
    with pytest.raises(TeacherError, match="http"):
        EndpointTeacher("localhost:8000", "m")
    with pytest.raises(TeacherError, match="model's name"):
        EndpointTeacher("http://localhost:8000/v1", "")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_file_teacher_brings_its_prompts_and_only_coherent_refusals_are_kept(tmp_path) -> None:
    rows = [{"prompt": p, "refusal": REFUSAL} for p in PROMPTS[:4]] + [{"prompt": "Mix what?", "answer": COMPLIANCE}]
    teacher = FileTeacher(write_jsonl(tmp_path / "t.jsonl", rows))
    taught = teach(teacher, ["ignored"], min_refusals=4, progress=False)
    assert taught.prompts == [*PROMPTS[:4], "Mix what?"]
    assert taught.kept == [True, True, True, True, False]
    assert [r["kept"] for r in taught.as_rows()] == taught.kept


def test_a_teacher_that_never_refuses_cannot_teach(tmp_path) -> None:
    teacher = FileTeacher(write_jsonl(tmp_path / "t.jsonl", [{"prompt": p, "answer": COMPLIANCE} for p in PROMPTS]))
    with pytest.raises(TeacherError, match="refused 0 of 6 harmful prompts coherently"):
        teach(teacher, [], min_refusals=1, progress=False)


def test_a_file_teacher_draws_its_limit_with_a_fixed_seed(tmp_path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"p{i}", "answer": REFUSAL} for i in range(50)])
    one, two = FileTeacher(path, limit=10), FileTeacher(path, limit=10)
    assert one.prompts([]) == two.prompts([]) and len(one.prompts([])) == 10
    assert one.identity() == two.identity() != FileTeacher(path, limit=11).identity()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no rows"),
        ("not json\n", "is not a JSON object"),
        ('["a list"]\n', "is not a JSON object"),
        ('{"prompt": "x"}\n', "needs a 'prompt' and an answer"),
    ],
)
def test_bad_teacher_files_are_one_line_errors(tmp_path, content, message) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(PromptError, match=message):
        FileTeacher(path)
    with pytest.raises(PromptError, match="does not exist"):
        FileTeacher(tmp_path / "missing.jsonl")


def test_a_named_answer_field_is_the_only_one_read(tmp_path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "answer": COMPLIANCE, "safe": REFUSAL}])
    assert FileTeacher(path, answer_field="safe").answer(["p"], system=None, max_new_tokens=8, progress=False) == [
        REFUSAL
    ]


def test_a_model_teacher_loads_its_model_and_answers_greedily(llama, tokenizer) -> None:
    from inferaligner.loading import Loaded

    loaded_names = []

    def load(name: str) -> Loaded:
        loaded_names.append(name)
        return Loaded(llama, tokenizer)

    teacher = ModelTeacher("tiny", load)
    first = teacher.answer(PROMPTS[:2], system=None, max_new_tokens=6, progress=False)
    assert first == teacher.answer(PROMPTS[:2], system=None, max_new_tokens=6, progress=False)
    assert loaded_names == ["tiny", "tiny"] and len(first) == 2
    with pytest.raises(TeacherError, match="the model tiny refused 0 of 2"):  # random weights never refuse
        teach(teacher, PROMPTS[:2], max_new_tokens=6, min_refusals=1, progress=False)
