#!/usr/bin/env bash
# Builds the trainer's CUDA variant on a machine without a GPU, for GPU machines with a CUDA 13
# driver (recipe and the facts behind it: ../shared/notes/gpu-build.md).
#
#   scripts/cuda-build.sh          release build, stripped: target/cuda/finetune-trainer, and
#                                  target/gpu-check/ ready to carry to a GPU machine (the binary
#                                  gzipped and the tokenizer: ~19 MB against the 64 MiB a device
#                                  call may carry, which the bare binary, 63+ MiB, nearly fills)
#   scripts/cuda-build.sh --check  `cargo check --features nccl` only (what CI runs: no link step)
#
# - nvcc: Debian bookworm's `nvidia-cuda-toolkit` (11.8, from non-free), installed once through a
#   private apt list derived from the system's sources (the system's own lists are untouched).
#   nvcc 11.8 cannot target compute_90, so kernels are PTX for sm_80, which Hopper JIT-compiles.
# - CUDA 13 sonames: cudarc reads CUDARC_CUDA_VERSION for its bindings, and the link step finds
#   unversioned links to the CUDA 13 libraries of NVIDIA's PyPI wheels (cached), so the binary
#   needs libcublas.so.13, libcudart.so.13, libcurand.so.10, libnccl.so.2 and libcuda.so.1: what
#   the GPU machines' PyTorch environment and driver provide. NCCL (the `nccl` feature, which
#   implies `cuda`) comes from PyPI's nvidia-nccl-cu13 at 2.30, the version of cudarc's bindings.
# - Its own target directory under the cache (see below).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=build
case "${1:-}" in
  --check) mode=check ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

cache="${CACHE_DIR:-$HOME/.cache/finetune-operator}/cuda"
mkdir -p "$cache"
log() { echo "[cuda-build] $*" >&2; }

# Pinned wheels (any 13.x gives the same sonames; pinned for a reproducible link).
wheels=(nvidia-cublas==13.10.0.20 nvidia-cuda-runtime==13.5.37 nvidia-cuda-nvrtc==13.5.37
        nvidia-curand==10.4.5.25 nvidia-nccl-cu13==2.30.7)

ensure_nvcc() {
  if command -v nvcc >/dev/null 2>&1; then return; fi
  local apt_dir="$cache/apt" sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  mkdir -p "$apt_dir/lists/partial"
  local src=/etc/apt/sources.list.d/debian.sources
  [ -f "$src" ] || { echo "$src missing: cannot derive the non-free list" >&2; exit 1; }
  sed 's/^Components:.*/Components: main contrib non-free/' "$src" > "$apt_dir/debian.sources"
  local opts=(-o "Dir::Etc::sourcelist=$apt_dir/debian.sources" -o Dir::Etc::sourceparts=/dev/null
              -o "Dir::State::Lists=$apt_dir/lists")
  log "installing nvcc (Debian non-free nvidia-cuda-toolkit, a few minutes once)"
  "${sudo[@]}" apt-get "${opts[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get "${opts[@]}" install -y -qq \
    --no-install-recommends nvidia-cuda-toolkit >/dev/null
  command -v nvcc >/dev/null || { echo "nvcc still missing after the install" >&2; exit 1; }
}

# Unversioned links to the CUDA 13 libraries, for the linker.
ensure_link_dir() {
  local links="$cache/link" so missing=0 found
  local libs=(libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libnvrtc.so.13 libcurand.so.10
              libnccl.so.2)
  for so in "${libs[@]}"; do
    [ -n "$(find "$cache/wheels" -name "$so" -print -quit 2>/dev/null)" ] || missing=1
  done
  if [ "$missing" = 1 ]; then
    log "fetching the CUDA 13 libraries from PyPI (${wheels[*]})"
    rm -rf "$cache/whl" "$cache/wheels.partial"
    python3 -m pip download -q --no-deps -d "$cache/whl" "${wheels[@]}"
    for w in "$cache"/whl/*.whl; do python3 -m zipfile -e "$w" "$cache/wheels.partial"; done
    rm -rf "$cache/wheels" && mv "$cache/wheels.partial" "$cache/wheels"
  fi
  mkdir -p "$links"
  for so in "${libs[@]}"; do
    found=$(find "$cache/wheels" -name "$so" -print -quit)
    [ -n "$found" ] || { echo "$so is in none of the wheels (${wheels[*]})" >&2; exit 1; }
    ln -sf "$found" "$links/${so%%.so*}.so"
  done
  echo "$links"
}

ensure_nvcc
export CUDA_COMPUTE_CAP=80 CUDARC_CUDA_VERSION=13000
# The CUDA build's own target directory, in the cache: the CUDA RUSTFLAGS would otherwise rebuild
# the CPU workspace in target/, and candle's CUDA kernels (nvcc, minutes) compile once per machine.
export CARGO_TARGET_DIR="$cache/target"
if [ "$mode" = check ]; then
  # No link step, so no CUDA libraries needed; every target, so the CUDA code paths compile.
  cargo=(cargo check --locked -p finetune-trainer --all-targets --features nccl)
  log "${cargo[*]}"
  RUSTFLAGS="-D warnings" "${cargo[@]}"
  exit 0
fi
links="$(ensure_link_dir)"
export RUSTFLAGS="-L native=$links -C strip=symbols"
cargo=(cargo build --locked --release -p finetune-trainer --bin finetune-trainer --features nccl)
log "${cargo[*]}"
"${cargo[@]}"

mkdir -p target/cuda
install -m 0755 "$CARGO_TARGET_DIR/release/finetune-trainer" target/cuda/finetune-trainer
bin=target/cuda/finetune-trainer
size=$(stat -c %s "$bin")
needed=$(readelf -d "$bin" | awk '/NEEDED/ {gsub(/[][]/, "", $5); print $5}' | tr '\n' ' ')
log "$bin: $((size / 1048576)) MiB; NEEDED: $needed"
for so in libcublas.so.13 libcudart.so.13 libnccl.so.2 libcuda.so.1; do
  case " $needed " in *" $so "*) ;; *) echo "$bin does not link $so" >&2; exit 1 ;; esac
done
# What a GPU check carries (scripts/gpu-check.sh unpacks the binary): the PTX of candle's kernels
# compresses about 4x.
carry=target/gpu-check
mkdir -p "$carry"
gzip -6 -c "$bin" > "$carry/finetune-trainer.gz"
cp "$(scripts/fetch-assets.sh)/tokenizer.json" "$carry/tokenizer.json"
carried=$(du -sb --exclude=out "$carry" | cut -f1)
log "$carry: $((carried / 1048576)) MiB to carry (finetune-trainer.gz, tokenizer.json)"
[ "$carried" -lt $((48 * 1048576)) ] || { echo "$carry is over the 48 MiB a GPU check may carry (64 MiB in all, with room for the rest)" >&2; exit 1; }
echo "$bin"
