#!/usr/bin/env bash
# PyTorch peers for the throughput bench (optional, not in CI). Creates its own venv under
# ~/.cache/finetune-operator/bench-venv with torch, transformers and peft from PyPI, then runs
#   run-pytorch.sh            the hand-written PyTorch Llama (torch_ref.py)
#   run-pytorch.sh hf full    transformers' LlamaForCausalLM (hf_peers.py)
#   run-pytorch.sh hf lora    transformers + PEFT LoRA r=16 on q,v
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator/bench-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  # From PyPI by default (the CUDA wheels' extra libraries are downloaded but unused here);
  # set TORCH_INDEX_URL to a CPU-only index where one is reachable.
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$venv/bin/pip" install --quiet torch --index-url "$TORCH_INDEX_URL"
  else
    "$venv/bin/pip" install --quiet torch
  fi
fi
"$venv/bin/python" -c 'import transformers, peft' 2>/dev/null \
  || "$venv/bin/pip" install --quiet transformers peft
if [ "${1:-}" = hf ]; then
  exec "$venv/bin/python" "$here/hf_peers.py" "${2:-full}"
fi
exec "$venv/bin/python" "$here/torch_ref.py"
