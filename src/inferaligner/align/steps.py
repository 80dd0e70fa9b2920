"""Resumable steps: each step's inputs are hashed into its key; a step whose key and outputs are unchanged since it
finished is skipped, and `force` redoes named steps. A step is marked finished only after it returns, so an
interrupted one runs again and nothing finished is lost."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferaligner.errors import InferAlignerError
from inferaligner.models import file_digest

__all__ = ["Steps", "file_digest", "key_of"]

STATE = "steps.json"


def key_of(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Steps:
    """The steps of one run in `work` (their record in `work/steps.json`); `log` receives one line per event."""

    work: Path
    names: tuple[str, ...]
    force: frozenset[str] = frozenset()
    log: Callable[[str], None] = print
    record: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.force) - set(self.names))
        if unknown:
            raise InferAlignerError(f"--force takes steps among {', '.join(self.names)}, not {', '.join(unknown)}.")
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / STATE
        try:
            self.record = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            self.record = {}  # a record cut short: every step is checked again

    def done(self, name: str, inputs: dict[str, Any], outputs: Iterable[Path]) -> bool:
        """Whether `name` finished with these inputs and its outputs are still there (and not forced)."""
        entry = self.record.get(name)
        return (
            name not in self.force
            and entry is not None
            and entry.get("key") == key_of(inputs)
            and all(Path(p).is_file() for p in outputs)
        )

    def run(self, name: str, inputs: dict[str, Any], outputs: Iterable[Path], work: Callable[[], Any]) -> bool:
        """Run `work` unless the step is done; returns whether it ran."""
        outputs = list(outputs)
        if self.done(name, inputs, outputs):
            seconds = self.record[name].get("seconds", 0)
            self.log(f"{name}: done before ({seconds:.0f} s then), skipped")
            return False
        self.log(f"{name}: running")
        started = time.perf_counter()
        work()
        missing = [str(p) for p in outputs if not Path(p).is_file()]
        if missing:
            raise InferAlignerError(f"Step {name} did not write {', '.join(missing)}.")
        seconds = time.perf_counter() - started
        self.record[name] = {"key": key_of(inputs), "seconds": round(seconds, 1), "finished": _now()}
        self._save()
        self.log(f"{name}: finished in {seconds:.0f} s")
        return True

    def seconds(self) -> dict[str, float]:
        return {name: float(self.record[name].get("seconds", 0)) for name in self.names if name in self.record}

    def _save(self) -> None:
        path = self.work / STATE
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps(self.record, indent=2))
        staging.replace(path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
