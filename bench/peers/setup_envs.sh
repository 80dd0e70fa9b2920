#!/usr/bin/env bash
# Create (idempotently) one virtual environment per third-party tool the benchmarks run: the steering peers
# (bench/peers/peer_speed.py) and lm-evaluation-harness (bench/lm_eval_server.py).
#   bash bench/peers/setup_envs.sh            # the two steering peers
#   bash bench/peers/setup_envs.sh lm-eval    # just one
# Venvs live in .bench-venvs/<peer> at the repo root. torch==2.13.0 resolves to the local CPU wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
# steering-vectors requires transformers<5; use the same transformers for repeng so the two are comparable.
TRANSFORMERS="transformers==4.57.6"

declare -A PEER_PKGS=(
  [steering-vectors]="steering-vectors==0.12.2"
  [repeng]="repeng==0.4.0 numpy<2"
  [lm-eval]="lm-eval[api]==0.4.13"
)

peers=("$@")
[ ${#peers[@]} -eq 0 ] && peers=(steering-vectors repeng)

for peer in "${peers[@]}"; do
  [ -n "${PEER_PKGS[$peer]:-}" ] || { echo "unknown peer: $peer" >&2; exit 2; }
  venv="$ROOT/.bench-venvs/$peer"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  log="$venv/pip-install.log"
  # shellcheck disable=SC2086  # PEER_PKGS holds several words on purpose
  if ! "$venv/bin/python" -m pip install -q "$TORCH" "$TRANSFORMERS" safetensors ${PEER_PKGS[$peer]} >"$log" 2>&1; then
    cat "$log" >&2; exit 1
  fi
  "$venv/bin/python" -c 'import torch; assert "+cpu" in torch.__version__ or not torch.version.cuda, torch.__version__'
  echo "== $peer ($venv)"
  "$venv/bin/python" -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(torch|transformers|safetensors|tokenizers|numpy|steering[-_]vectors|repeng|lm[-_]eval)==' || true
done
