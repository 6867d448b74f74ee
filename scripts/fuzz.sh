#!/usr/bin/env bash
# cargo-fuzz targets of the file formats and the spec validator (fuzz/), on the stable toolchain
# (no sanitizer: `-s none`; panics, overflows in debug assertions, timeouts and OOMs are findings).
#
#   scripts/fuzz.sh smoke [SECONDS]   build, then SECONDS (default 20) per target   (make test)
#   scripts/fuzz.sh soak  [SECONDS]   SECONDS (default $FUZZ_SOAK_SECONDS or 600) per target (make soak)
#
# Prints the executions of each target and fails on any crash, timeout or out-of-memory. The
# working corpus (fuzz/corpus/, ignored) grows across runs; it starts from fuzz/seeds/ and the
# real files of the repository (test fixtures, sample FineTuneJobs). A finding is saved under
# fuzz/artifacts/TARGET/ (reproduce with `cargo fuzz run -s none TARGET FILE`).
set -euo pipefail

mode=${1:-smoke}
case "$mode" in
smoke) secs=${2:-20} ;;
soak) secs=${2:-${FUZZ_SOAK_SECONDS:-600}} ;;
*)
	echo "usage: $0 smoke|soak [seconds-per-target]" >&2
	exit 2
	;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
tools="$HOME/.cache/finetune-operator/tools"
export PATH="$tools/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "fuzz: installing cargo-fuzz into $tools (cached for later runs)" >&2
	cargo install cargo-fuzz --locked --root "$tools"
fi

targets=(dataset_reader spec_validator checkpoint_manifest safetensors_header)
cd "$root/fuzz"
# The instrumented build has its own target folder, kept in the cache like the Kubernetes
# binaries so a fresh clone reuses the instrumented dependencies (FUZZ_TARGET_DIR to move it).
target_dir=${FUZZ_TARGET_DIR:-${CACHE_DIR:-$HOME/.cache/finetune-operator}/fuzz-target}

t0=$(date +%s)
if ! cargo fuzz build -s none --target-dir "$target_dir" >build.log 2>&1; then
	cat build.log >&2
	exit 1
fi
echo "fuzz: build of ${#targets[@]} targets in $(($(date +%s) - t0)) s"

# Seeds: committed ones plus real files of the repository.
seed_real() {
	local t=$1 dir=$2
	case "$t" in
	dataset_reader)
		for f in "$root"/trainer/tests/fixtures/*.csv; do
			{ printf '\x00'; head -c 65536 "$f"; } >"$dir/real-csv-$(basename "$f")"
		done
		;;
	spec_validator)
		for f in "$root"/manifests/samples/*.yaml "$root"/crds/tests/fixtures/*.yaml; do
			[ -f "$f" ] && cp "$f" "$dir/real-$(basename "$f")"
		done
		;;
	*) ;;
	esac
}

fail=0
summary=()
for t in "${targets[@]}"; do
	corpus="corpus/$t"
	mkdir -p "$corpus" "artifacts/$t"
	cp -n seeds/"$t"/* "$corpus"/ 2>/dev/null || true
	seed_real "$t" "$corpus"
	log="artifacts/$t/last-run.log"
	set +e
	cargo fuzz run -s none --target-dir "$target_dir" "$t" "$corpus" -- \
		-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
		-print_final_stats=1 >"$log" 2>&1
	rc=$?
	set -e
	execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
	line=$(printf '%-20s executions=%-10s seconds=%s corpus=%s rc=%s' "$t" "${execs:-?}" "$secs" "$(find "$corpus" -type f | wc -l)" "$rc")
	echo "fuzz: $line"
	summary+=("$line")
	if [ "$rc" -ne 0 ] || [ -z "$execs" ]; then
		echo "fuzz: $t FAILED (rc=$rc); last lines of $log:" >&2
		tail -40 "$log" >&2
		fail=1
	fi
done
printf '%s\n' "${summary[@]}" >"$root/fuzz/artifacts/summary-$mode.txt"
if [ "$fail" -ne 0 ]; then
	echo "fuzz: FAILED" >&2
	exit 1
fi
echo "fuzz: $mode passed: ${#targets[@]} targets, no crash, in $(($(date +%s) - t0)) s"
