#!/usr/bin/env bash
# Local demo: fetch the real data and tokenizer, build (and cache) the pretrained tiny base, then
# fine-tune it on the Amazon review snippets with finetune-trainer and print the report.
#   scripts/demo-tiny.sh [WORK_DIR]      (default ~/.cache/finetune-operator/demo)
# Env: TRAINER (binary; default target/release/finetune-trainer), RAYON_NUM_THREADS (default 1:
# on a busy 2-core machine one thread beats two for these small tensors).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
assets="$("$root/scripts/fetch-assets.sh")"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator"
work="${1:-$cache/demo-local}"
bin="${TRAINER:-$root/target/release/finetune-trainer}"
mkdir -p "$work"
# The same cached base as `make demo` (same arguments, so the cache is shared): pretrained on the
# NYT snippets after the first 400, which `make demo` keeps for its forgetting check.
tail -n +401 "$assets/nyt_general.txt" > "$cache/pretrain-general.txt"
MIMALLOC_PURGE_DELAY=-1 "$bin" init-tiny --out "$cache/tiny-base" --tokenizer "$assets/tokenizer.json" \
  --pretrain-text "$cache/pretrain-general.txt"
sed -e "s|@ASSETS@|$assets|g" -e "s|@WORK@|$work|g" -e "s|$work/tiny-base|$cache/tiny-base|" "$root/trainer/examples/demo-tiny.yaml" > "$work/trainer-config.yaml"
rm -rf "$work/checkpoints" "$work/output"
MIMALLOC_PURGE_DELAY=-1 RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}" /usr/bin/time -v "$bin" train --config "$work/trainer-config.yaml" --resume never 2> >(tee "$work/train.log" >&2)
"$bin" report "$work/output"
