#!/usr/bin/env bash
# Our trainer against the Hugging Face peers on the same shape (BENCH_TORCH=1 benches/run.sh):
# full fine-tuning against transformers' LlamaForCausalLM, LoRA r=16 on q,v against transformers +
# PEFT. The machines are shared VMs whose speed drifts from one process to the next, so the pair
# (ours, peer) is run BENCH_ROUNDS times (default 3) back to back, each in its own process; every
# round's ratio is printed, then the median ratio per mode, with the load average.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
rounds="${BENCH_ROUNDS:-3}"
tokens_per_s() { grep -o '= [0-9]* tokens/s' | tr -dc 0-9; }
for mode in full lora; do
  ratios=""
  for round in $(seq "$rounds"); do
    ours="$(BENCH_METHOD=$mode BENCH_CSV_ROWS=0 MIMALLOC_PURGE_DELAY=-1 \
      cargo bench -q -p finetune-trainer --bench throughput 2>/dev/null | tee /dev/stderr | tokens_per_s)"
    peer="$("$root/benches/run-pytorch.sh" hf "$mode" 2>/dev/null | tee /dev/stderr | tokens_per_s)"
    ratio="$(python3 -c "print(f'{$ours/$peer:.2f}')")"
    echo "round $round ($mode): ours/peer = $ratio, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    ratios="$ratios $ratio"
  done
  python3 -c "import statistics, sys; r = [float(x) for x in sys.argv[2:]]; print(f'median ratio ours/peer ({sys.argv[1]}, {len(r)} rounds) = {statistics.median(r):.2f}')" "$mode" $ratios
done
