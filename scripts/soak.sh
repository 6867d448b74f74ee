#!/usr/bin/env bash
# `make soak`: the long reliability runs that do not fit in `make test` (RELIABILITY.md §4).
#   1. 1,000 FineTuneJobs with their (Pending) trainer pods held for SOAK_MINUTES (default 30)
#      against the local control plane: operator memory slope, reconciles and API writes per idle
#      job per hour (target ≈ 0), HTTP 409 conflicts on status writes (target 0);
#   2. the long fuzzing run of every fuzz target (scripts/fuzz.sh soak).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${SOAK_MINUTES:-30}"
jobs="${SOAK_JOBS:-1000}"
cargo build --workspace --bins
echo "== soak: ${jobs} jobs held for ${minutes} min"
target_dir="${CARGO_TARGET_DIR:-target}"
BENCH_IDLE_SECONDS=$((minutes * 60)) BENCH_SAMPLE_SECONDS=60 \
	"${target_dir}/debug/operator-bench" --jobs "${jobs}"
echo "== soak: long fuzzing run"
scripts/fuzz.sh soak
