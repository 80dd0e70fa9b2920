"""Where the refusals that teacher-fitted vectors learn come from: a model, an OpenAI-compatible endpoint, or a file.

A teacher only has to write answers: the target learns where its own residual stream must go to give them
(`inferaligner.fit`), so the teacher need not share the target's family or size, nor run on this machine. Whatever
the source, only coherent refusals (`judges.is_coherent_refusal`) are kept, and `Taught` says how many.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from inferaligner.errors import InferAlignerError, PromptError
from inferaligner.judges import is_coherent_refusal

ANSWER_FIELDS = ("answer", "refusal", "response", "output", "completion")
"""The fields a teacher file's answer may sit in, tried in this order (`--teacher-answer-field` picks one)."""
PROMPT_FIELDS = ("prompt", "instruction", "question")


class TeacherError(InferAlignerError):
    """A teacher that cannot teach: unreachable, answering garbage, or refusing too little."""


class Teacher(Protocol):
    """Writes answers to prompts."""

    description: str

    def identity(self) -> dict[str, Any]:
        """What its answers depend on (the align step's content address)."""
        ...

    def prompts(self, default: Sequence[str]) -> list[str]:
        """The harmful prompts it teaches: `default`, or its own (a file teacher)."""
        ...

    def answer(self, prompts: Sequence[str], *, system: str | None, max_new_tokens: int, progress: bool) -> list[str]:
        """One answer per prompt, in order."""
        ...


@dataclass(frozen=True)
class Taught:
    """A teacher's answers: every one (`answers`, aligned with `prompts`) and which were kept as coherent refusals."""

    description: str
    prompts: list[str]
    answers: list[str]
    kept: list[bool]

    @property
    def refusals(self) -> list[tuple[str, str]]:
        return [(p, a) for p, a, k in zip(self.prompts, self.answers, self.kept, strict=True) if k]

    def as_rows(self) -> list[dict[str, Any]]:
        return [
            {"prompt": p, "answer": a, "kept": k} for p, a, k in zip(self.prompts, self.answers, self.kept, strict=True)
        ]

    @classmethod
    def from_rows(cls, description: str, rows: Sequence[dict[str, Any]]) -> Taught:
        """The answers `as_rows` wrote."""
        return cls(description, [r["prompt"] for r in rows], [r["answer"] for r in rows], [r["kept"] for r in rows])


def teach(
    teacher: Teacher,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    max_new_tokens: int = 64,
    min_refusals: int = 8,
    progress: bool = True,
) -> Taught:
    """The teacher's answers to its prompts (`prompts` unless it brings its own), judged; an error when fewer than
    `min_refusals` are coherent refusals (a teacher that never refuses cannot teach refusing)."""
    asked = teacher.prompts(prompts)
    if not asked:
        raise PromptError("The teacher has no harmful prompts to answer.")
    answers = teacher.answer(asked, system=system, max_new_tokens=max_new_tokens, progress=progress)
    kept = [is_coherent_refusal(a) for a in answers]
    if sum(kept) < min_refusals:
        raise TeacherError(
            f"{teacher.description} refused {sum(kept)} of {len(asked)} harmful prompts coherently; at least "
            f"{min_refusals} are needed to fit on: use a safety-aligned teacher."
        )
    return Taught(teacher.description, list(asked), answers, kept)


@dataclass
class ModelTeacher:
    """A local or hub model (any name `inferaligner.loading.load` takes), answering greedily."""

    name: str
    load: Callable[[str], Any]  # name -> inferaligner.loading.Loaded
    batch_size: int = 16

    @property
    def description(self) -> str:
        return f"the model {self.name}"

    def identity(self) -> dict[str, Any]:
        return {"kind": "model", "name": self.name}

    def prompts(self, default: Sequence[str]) -> list[str]:
        return list(default)

    def answer(self, prompts: Sequence[str], *, system: str | None, max_new_tokens: int, progress: bool) -> list[str]:
        from inferaligner.aligner import InferAligner

        loaded = self.load(self.name)
        plain = InferAligner(loaded.model, loaded.tokenizer, mode="off", system=system)
        done = plain.complete(prompts, max_new_tokens=max_new_tokens, batch_size=self.batch_size, progress=progress)
        return [c.text for c in done]


@dataclass
class FileTeacher:
    """A JSONL file of `{prompt, answer}` rows (the answer may also sit in a field of `ANSWER_FIELDS`): it brings
    its own prompts; `limit` of them are used, drawn with a fixed seed."""

    path: Path
    answer_field: str | None = None
    limit: int | None = 320
    seed: int = 0
    rows: list[tuple[str, str]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.rows = _read_pairs(Path(self.path), self.answer_field)
        if self.limit is not None and len(self.rows) > self.limit:
            self.rows = random.Random(self.seed).sample(self.rows, self.limit)

    @property
    def description(self) -> str:
        return f"the answers in {Path(self.path).name}"

    def identity(self) -> dict[str, Any]:
        return {"kind": "file", "rows": _digest(json.dumps(self.rows))}

    def prompts(self, default: Sequence[str]) -> list[str]:
        return [p for p, _ in self.rows]

    def answer(self, prompts: Sequence[str], *, system: str | None, max_new_tokens: int, progress: bool) -> list[str]:
        answers = dict(self.rows)
        return [answers[p] for p in prompts]


def _read_pairs(path: Path, answer_field: str | None) -> list[tuple[str, str]]:
    """The (prompt, answer) rows of a teacher file, each line checked."""
    if not path.is_file():
        raise PromptError(f"Teacher file {path} does not exist.")
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PromptError(f"{path}:{number} is not a JSON object: a teacher file is JSONL.") from None
        if not isinstance(row, dict):
            raise PromptError(f"{path}:{number} is not a JSON object: a teacher file is JSONL.")
        pairs.append(_pair(row, answer_field, f"{path}:{number}"))
    if not pairs:
        raise PromptError(f"Teacher file {path} holds no rows.")
    return list(dict(pairs).items())  # one answer per prompt: the last


def _pair(row: dict[str, Any], answer_field: str | None, where: str) -> tuple[str, str]:
    prompt = next((row[k] for k in PROMPT_FIELDS if isinstance(row.get(k), str)), None)
    fields = (answer_field,) if answer_field else ANSWER_FIELDS
    answer = next((row[k] for k in fields if isinstance(row.get(k), str)), None)
    if not prompt or answer is None:
        wanted = f"'{answer_field}'" if answer_field else " / ".join(ANSWER_FIELDS)
        raise PromptError(f"{where} needs a 'prompt' and an answer ({wanted}) as strings.")
    return prompt, answer


@dataclass
class EndpointTeacher:
    """A model behind an OpenAI-compatible `/v1/chat/completions`, greedy. The key is read from the environment
    variable `key_env` (none sent when unset); requests are spaced to `per_second`, retried with back-off on
    connection errors, 429 and 5xx, and each answer is appended to `cache` as it arrives (an interrupted run loses
    nothing it was given)."""

    url: str
    model: str
    key_env: str = "OPENAI_API_KEY"
    per_second: float = 4.0
    retries: int = 4
    timeout: float = 60.0
    workers: int = 4
    cache: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _next_slot: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise TeacherError(f"The teacher URL must start with http:// or https://, not {self.url!r}.")
        if not self.model:
            raise TeacherError("An endpoint teacher needs its model's name (--teacher-model).")
        if not self.per_second > 0 or self.retries < 0 or self.workers < 1:
            raise TeacherError("The teacher's rate must be positive, its retries and workers counts.")

    @property
    def description(self) -> str:
        return f"{self.model} at {self.url}"

    def identity(self) -> dict[str, Any]:
        return {"kind": "endpoint", "url": self.url, "model": self.model}

    def prompts(self, default: Sequence[str]) -> list[str]:
        return list(default)

    def answer(self, prompts: Sequence[str], *, system: str | None, max_new_tokens: int, progress: bool) -> list[str]:
        keys = [self._key(p, system, max_new_tokens) for p in prompts]
        cached = self._cached()
        missing = [(k, p) for k, p in zip(keys, prompts, strict=True) if k not in cached]
        with (
            tqdm(total=len(missing), desc="teacher answers", disable=not progress, unit="answer") as bar,
            ThreadPoolExecutor(self.workers) as pool,
        ):
            for key, text in pool.map(lambda kp: (kp[0], self._ask(kp[1], system, max_new_tokens)), missing):
                cached[key] = text
                self._append(key, text)
                bar.update()
        return [cached[k] for k in keys]

    def _key(self, prompt: str, system: str | None, max_new_tokens: int) -> str:
        return _digest(json.dumps([self.url, self.model, system, max_new_tokens, prompt]))

    def _cached(self) -> dict[str, str]:
        found: dict[str, str] = {}
        if self.cache is None or not self.cache.is_file():
            return found
        for line in self.cache.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                found[row["key"]] = row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by an interruption
        return found

    def _append(self, key: str, text: str) -> None:
        if self.cache is not None:
            with self._lock, self.cache.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "answer": text}) + "\n")

    def _wait_turn(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + 1 / self.per_second
        time.sleep(max(0.0, slot - now))

    def _ask(self, prompt: str, system: str | None, max_new_tokens: int) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        body = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens, "temperature": 0}
        for attempt in range(self.retries + 1):
            self._wait_turn()
            try:
                return _answer_text(self._post(body), self.description)
            except _Transient as exc:
                if attempt == self.retries:
                    raise TeacherError(
                        f"The teacher endpoint {self.url} did not answer after {self.retries + 1} tries: {exc}"
                    ) from None
                time.sleep(exc.retry_after if exc.retry_after is not None else min(8.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def _post(self, body: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(
            self.url.rstrip("/") + "/chat/completions" if not self.url.endswith("/chat/completions") else self.url,
            data=json.dumps(body).encode(),
            headers=headers,
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 429 or exc.code >= 500:
                raise _Transient(f"HTTP {exc.code}", _retry_after(exc.headers.get("Retry-After"))) from None
            detail = exc.read()[:200].decode(errors="replace")
            raise TeacherError(
                f"The teacher endpoint {self.url} refused the request (HTTP {exc.code}: {detail}); check the model "
                f"name and the key in ${self.key_env}."
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise _Transient(str(getattr(exc, "reason", exc)), None) from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TeacherError(
                f"{self.description} answered something that is not JSON: {raw[:120]!r}. Is it an OpenAI-compatible "
                "endpoint (its base URL ends in /v1)?"
            ) from None


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    try:
        return min(30.0, max(0.0, float(value))) if value else None
    except ValueError:
        return None


def _answer_text(payload: Any, who: str) -> str:
    """The message text of a chat completion; anything else is an error that shows what came back."""
    try:
        text = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        text = None
    if not isinstance(text, str):
        raise TeacherError(f"{who} answered garbage, not a chat completion: {json.dumps(payload)[:160]}")
    return text


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
