#!/usr/bin/env bash
# `make bench`: performance measured as figures and ratios, recorded in BENCHMARKS.md.
#   1. trainer: training throughput on the llama2.c stories15M shape (candle) — and, when
#      BENCH_TORCH=1, the PyTorch reference of the same shape in the same run (benches/torch_ref.py
#      makes its own venv; about 5 GB; not in CI);
#   2. trainer: data preparation rows/s on a generated 1M-row CSV, with peak RSS;
#   3. operator: 1,000 FineTuneJobs created at once against the local control plane — time until
#      all their pods exist, API writes per job, peak RSS, idle writes per job
#      (BENCH_IDLE_SECONDS, default 600).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== trainer: throughput and data preparation"
benches/run.sh
echo "== operator: ${BENCH_JOBS:-1000} jobs at once"
cargo build --workspace --bins
target/debug/operator-bench --jobs "${BENCH_JOBS:-1000}"
