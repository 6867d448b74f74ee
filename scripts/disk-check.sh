#!/usr/bin/env bash
# Prints the free disk where the build and the caches live, and warns at once when a cold
# `make lint test` may not fit (a full disk otherwise shows only as a linker's bus error or "No
# space left on device" half an hour in). It never fails the run: the estimate has a margin.
#
#   scripts/disk-check.sh before|after
#
# NEED_GIB (default 10) is what a cold run writes, with a margin: measured in session 8 from a
# fresh clone and an empty cache, target/ 3.1 GB (7.1 GB before dependencies lost their debug
# info and incremental compilation was turned off), the cache 2.9 GB (the CUDA check's and the
# fuzzers' target folders, cargo-deny, the Kubernetes binaries), the crate registry 0.6 GB
# (RELIABILITY.md, "CI disk").
set -euo pipefail
phase=${1:-before}
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${CACHE_DIR:-$HOME/.cache/finetune-operator}
need=${NEED_GIB:-10}
free_gib() { df -Pk "$1" 2>/dev/null | awk 'NR==2 {printf "%d", $4 / 1048576}'; }
used() { du -sh "$1" 2>/dev/null | cut -f1 || true; }
echo "disk ($phase): $(free_gib "$root") GiB free at $root; target/ $(used "$root/target"), cache $(used "$cache"), /tmp $(free_gib /tmp) GiB free"
if [ "$phase" = before ] && [ ! -d "$root/target/debug" ] && [ "$(free_gib "$root")" -lt "$need" ]; then
	echo "disk: WARNING: a cold 'make lint test' writes up to $need GiB; only $(free_gib "$root") GiB free at $root" >&2
fi
