#!/usr/bin/env bash
# Create (idempotently) the virtual environment that runs Hugging Face's own server, `transformers serve`, for the
# side-by-side serving benchmark. It is kept apart from the project's .venv so its server extras cannot move the
# project's pins.
#   bash bench/hf_serve/setup_env.sh          # create or check bench/hf_serve/.venv
#   FORCE=1 bash bench/hf_serve/setup_env.sh  # reinstall even if the pins are unchanged
# torch==2.13.0 resolves to the local CPU wheel; never let pip pull a CUDA torch. The other pins are the project's
# (constraints.txt), which is also passed as a constraint file so transitive packages land on the same versions.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
VENV="$HERE/.venv"

# transformers is the one /work/main/.venv runs; its `serving` extra needs fastapi, starlette, uvicorn, pydantic,
# openai, rich and accelerate, all pinned here.
PINS=(
  "torch==2.13.0"
  "transformers[serving]==5.24.0"
  "tokenizers==0.23.3"
  "safetensors==0.8.0"
  "huggingface_hub==2.4.0"
  "accelerate==1.15.0"
  "numpy==2.4.6"
  "fastapi==0.165.0"
  "starlette==1.10.0"
  "pydantic==2.14.4"
  "uvicorn==0.54.0"
  "openai==3.57.0"
  "httpx==0.28.1"
  "rich==15.0.0"
)

stamp="$VENV/.pins"
want="$(printf '%s\n' "${PINS[@]}")"
if [ -z "${FORCE:-}" ] && [ -x "$VENV/bin/transformers" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "== hf_serve ($VENV): already set up with the same pins"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
log="$VENV/pip-install.log"
if ! "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" "${PINS[@]}" >"$log" 2>&1; then
  cat "$log" >&2; exit 1
fi
"$VENV/bin/python" -c 'import torch; assert "+cpu" in torch.__version__ or not torch.version.cuda, torch.__version__'
"$VENV/bin/python" -c 'import fastapi, uvicorn, openai, transformers.cli.serve'  # the server's imports resolve
printf '%s\n' "${PINS[@]}" >"$stamp"
echo "== hf_serve ($VENV)"
"$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(torch|transformers|tokenizers|safetensors|huggingface[-_]hub|accelerate|numpy|fastapi|starlette|pydantic|uvicorn|openai|httpx|rich)==' || true
