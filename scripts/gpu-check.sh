#!/usr/bin/env bash
# The GPU check (`make gpu-check`): one prepared run of a few minutes on a GPU machine that has
# CUDA 13, PyTorch, transformers and peft but no Rust and no model hub. Build here first:
#
#   make cuda-build   # also fills target/gpu-check: finetune-trainer.gz and tokenizer.json
#   # carry target/gpu-check (about 19 MB; the bare binary is 63+ MiB of the 64 MiB a call may
#   # carry); run this script there: it unpacks the binary.
#
# It (1) checks CUDA logits against CPU logits on the tiny model, a LoRA batch's gradients
# with the tiny model's layers split over cuda:0 and the CPU against one device, and NCCL with
# world size 1 (issue 17); (2) trains a Llama-2-7B-shaped
# model with random weights (LoRA r=16 on q,v, bf16, sequence 1024, batch 1 and 4, 20 steps) with
# our trainer and with PyTorch + PEFT in the same run, printing tokens/s, peak GPU memory and the
# ratios; then LoRA over a 4-bit base (ours int4; PEFT over bitsandbytes nf4 when installed);
# (3) sets the memory plan (`finetune-trainer plan`) against the measured peaks.
# Results: $OUT/gpu-check.json and a markdown table on stdout (for BENCHMARKS.md).
#
# GPU_CHECK_DRY_RUN=1 runs the same steps on the CPU with the tiny shape and 3 steps (the CPU
# build, torch on CPU): it proves the script, not the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dry=${GPU_CHECK_DRY_RUN:-0}
out=${OUT:-$root/target/gpu-check/out}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
log() { echo "[gpu-check] $*" >&2; }

if [ "$dry" = 1 ]; then
  bin=${GPU_CHECK_BIN:-$root/target/debug/finetune-trainer}
  shape=tiny preset=tiny steps=3 seq=128 batches="1 2" gpu=false precision=f32
else
  bin=${GPU_CHECK_BIN:-$root/target/cuda/finetune-trainer}
  packed=$root/target/gpu-check/finetune-trainer.gz
  if [ -z "${GPU_CHECK_BIN:-}" ] && [ ! -e "$bin" ] && [ -e "$packed" ]; then
    bin=$work/finetune-trainer
    gzip -dc "$packed" > "$bin" && chmod 0755 "$bin"
  fi
  shape=7b preset=llama-2-7b steps=20 seq=1024 batches="1 4" gpu=true precision=bf16
fi
tokenizer=${GPU_CHECK_TOKENIZER:-$root/target/gpu-check/tokenizer.json}
python=${PYTHON:-python3}
for f in "$bin" "$tokenizer"; do [ -e "$f" ] || { echo "missing $f (see the header)" >&2; exit 1; }; done

# The CUDA 13 libraries of the Python environment (PyTorch's nvidia/cu13/lib, curand's).
if [ "$dry" != 1 ]; then
  libs=$("$python" - <<'EOF'
import glob, os, site
dirs = set()
for base in site.getsitepackages() + [site.getusersitepackages()]:
    for so in glob.glob(os.path.join(base, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(so))
print(":".join(sorted(dirs)))
EOF
)
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
fi
results="$out/lines.jsonl"
: > "$results"

# 1. CUDA against CPU logits on the tiny model.
log "1. tiny model: logits on the CPU and on the GPU"
"$bin" init-tiny --out "$work/tiny" --tokenizer "$tokenizer" --pretrain-steps 0 >&2
ids=1,450,4996,17354,1701,29916,432,17204,975,278,17366,11203,29889
"$bin" logits --model "$work/tiny" --ids "$ids" > "$work/cpu.json"
if [ "$gpu" = true ]; then
  "$bin" logits --model "$work/tiny" --ids "$ids" --gpu > "$work/cuda.json"
else
  cp "$work/cpu.json" "$work/cuda.json"
fi
"$python" scripts/gpu_check.py compare "$work/cpu.json" "$work/cuda.json" | tee -a "$results" >&2

# 1b. The layers split over two devices (cuda:0 and the CPU) against one device: loss and
# every LoRA gradient, plain and checkpointed backward.
log "1b. tiny model: layers split over cuda:0 and the CPU against one device"
split_flag=""
[ "$gpu" = true ] && split_flag=--gpu
"$bin" split-check --model "$work/tiny" --ids "$ids" $split_flag | tee -a "$results" >&2

# 1c. NCCL through cudarc: a communicator of world size 1 and an all-reduce of known values.
log "1c. NCCL: world size 1, all-reduce and broadcast"
if [ "$gpu" = true ]; then
  "$bin" nccl-check | tee -a "$results" >&2 || log "NCCL check FAILED (see above)"
else
  echo '{"skipped": "nccl", "why": "a dry run has no GPU"}' | tee -a "$results" >&2
fi

# 2. The 7B-shaped model, our trainer and PyTorch + PEFT on the same shape.
log "2. $shape-shaped model with random weights"
"$python" scripts/gpu_check.py make-model "$work/model" "$shape" | tee -a "$results" >&2
cp "$tokenizer" "$work/model/tokenizer.json"
"$python" scripts/gpu_check.py make-data "$work/data.csv" 400 $((seq * 3 / 4))

# Peak GPU memory of a process tree while it runs: nvidia-smi every 100 ms, minus the idle level.
gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }
# One run of our trainer: batch $1, base quantization $2 (none, int8, int4).
run_ours() {
  local b=$1 quant=$2
  local tag="b$b-$quant"
  local cfg="$work/ours-$tag.yaml"
  cat > "$cfg" <<EOF
job: gpu-check/ours-$tag
model: {preset: $preset}
dataset:
  source: pvc://gpu-check/data.csv
  format: csv
  columns: {text: ReviewText, label: SentimentLabel}
  validationSplit: 0.02
method:
  type: lora
  lora: {rank: 16, alpha: 32, dropout: 0.05, targetModules: [q_proj, v_proj], baseQuantization: $quant}
hyperparameters:
  maxSteps: $steps
  batchSize: $b
  maxSequenceLength: $seq
  learningRate: 0.0001
  gradientCheckpointing: true
evaluation: {intervalSteps: 100000}
checkpoints: {intervalSteps: 0}
output: {path: gpu-check}
precision: $precision
gradientCheckpointing: true
useGpu: $gpu
paths:
  modelDir: $work/model
  tokenizerFile: $tokenizer
  datasetFile: $work/data.csv
  checkpointDir: $work/ckpt-$tag
  outputDir: $work/out-$tag
  terminationMessageFile: $work/term-$tag
metricsAddress: ""
EOF
  local plan_bytes peak=0 idle smi tps run=ours
  plan_bytes=$("$bin" plan --json "$cfg" | "$python" -c 'import json,sys; print(json.load(sys.stdin)["perGpuBytes"])' || true)
  log "ours, batch $b, base $quant (plan: $plan_bytes bytes)"
  if [ "$gpu" = true ]; then
    idle=$(gpu_used)
    ( while sleep 0.1; do gpu_used; done ) > "$work/smi-$tag" &
    smi=$!
  fi
  "$bin" train --config "$cfg" --resume never > "$work/ours-$tag.log" 2>&1 \
    || { tail -20 "$work/ours-$tag.log" >&2; exit 1; }
  if [ "$gpu" = true ]; then
    kill "$smi"
    peak=$(( ($(sort -n "$work/smi-$tag" | tail -1) - idle) * 1048576 ))
  fi
  tps=$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["tokens_per_second"])' "$work/out-$tag/report.json")
  [ "$quant" = none ] || run="ours-$quant"
  echo "{\"run\": \"$run\", \"batch\": $b, \"seq\": $seq, \"steps\": $steps, \"tokens_per_s\": $tps, \"peak_gpu_bytes\": $peak, \"plan_bytes\": ${plan_bytes:-0}}" | tee -a "$results" >&2
}
for b in $batches; do
  run_ours "$b" none
  log "PyTorch + PEFT, batch $b"
  "$python" scripts/gpu_check.py peft "$work/model" "$b" "$seq" "$steps" | tee -a "$results" >&2
done
# LoRA over a 4-bit base (issue 18), batch 1: ours, and PEFT over bitsandbytes' 4-bit base when
# the machine has bitsandbytes (a line saying it was skipped otherwise).
run_ours 1 int4
log "PyTorch + PEFT over a bitsandbytes 4-bit base, batch 1"
"$python" scripts/gpu_check.py peft "$work/model" 1 "$seq" "$steps" nf4 | tee -a "$results" >&2

# 3. The table: tokens/s, peak memory, the ratios and the plan's error.
"$python" scripts/gpu_check.py summary "$out/gpu-check.json" < "$results"
