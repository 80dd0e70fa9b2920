"""The folder `inferaligner align` writes: everything needed to protect one target model, as safetensors and JSON.

    aligned.json          what the folder is: the target's name and fingerprint, the teacher, the figures
    gate.safetensors      the target's own vectors and its turns gate
    steering.safetensors  the teacher-fitted steering vectors
    settings.json         the calibrated strength and layers (a steering settings file)
    README.md             the model card; report.html, align.log: the evidence and the run

`InferAligner.from_pretrained(DIR)`, `--aligned DIR` (generate, chat, serve, eval) and `inspect DIR` read it. It can be
pushed to a model hub as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferaligner.errors import InferAlignerError

FORMAT = "inferaligner.aligned"
MANIFEST = "aligned.json"
GATE = "gate.safetensors"
STEERING = "steering.safetensors"
SETTINGS = "settings.json"


def is_aligned_folder(path: str | Path) -> bool:
    """Whether `path` is a folder that `align` wrote (it holds `aligned.json`)."""
    return (Path(path) / MANIFEST).is_file()


@dataclass(frozen=True)
class AlignedFolder:
    """A folder from `align`, checked: its manifest names the format and its vector and settings files exist."""

    path: Path
    model: str
    fingerprint: str
    manifest: dict[str, Any]

    @property
    def gate(self) -> Path:
        return self.path / GATE

    @property
    def steering(self) -> Path:
        return self.path / STEERING

    @property
    def settings(self) -> Path:
        return self.path / SETTINGS

    @classmethod
    def load(cls, path: str | Path) -> AlignedFolder:
        folder = Path(path)
        if not folder.is_dir():
            raise InferAlignerError(f"{folder} is not a folder from `inferaligner align`.")
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InferAlignerError(
                f"{folder} holds no {MANIFEST}: it is not a folder from `inferaligner align`."
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InferAlignerError(f"{folder / MANIFEST} is not valid JSON ({exc}).") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise InferAlignerError(f"{folder / MANIFEST} is not an aligned folder's manifest (format {FORMAT}).")
        missing = [name for name in (GATE, STEERING, SETTINGS) if not (folder / name).is_file()]
        if missing:
            raise InferAlignerError(
                f"{folder} lacks {', '.join(missing)}: the align run did not finish; run it again to resume."
            )
        model, fingerprint = manifest.get("model"), manifest.get("model_fingerprint")
        if not isinstance(model, str) or not isinstance(fingerprint, str):
            raise InferAlignerError(f"{folder / MANIFEST} does not name its target model and fingerprint.")
        return cls(folder, model, fingerprint, manifest)

    def check_model(self, name: str, fingerprint: str) -> None:
        """An error naming both sides when the model is not of the shape the folder was aligned for."""
        if fingerprint != self.fingerprint:
            raise InferAlignerError(
                f"{self.path} was aligned for {self.model} (fingerprint {self.fingerprint}), not for {name} "
                f"(fingerprint {fingerprint}): align this model with `inferaligner align --model {name}`."
            )


def write_manifest(folder: Path, data: dict[str, Any]) -> Path:
    """Write `aligned.json` (the format tag first)."""
    path = folder / MANIFEST
    path.write_text(json.dumps({"format": FORMAT, "version": 1, **data}, indent=2) + "\n", encoding="utf-8")
    return path
