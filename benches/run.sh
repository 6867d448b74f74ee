#!/usr/bin/env bash
# `make bench` (via scripts/bench.sh): candle throughput (and data preparation) bench, then the PyTorch reference of the
# same architecture in the same run when BENCH_TORCH=1, and the ratio.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
"$root/scripts/fetch-assets.sh" >/dev/null 2>&1 || echo "assets unavailable: data bench tokenisation skipped" >&2
candle="$(MIMALLOC_PURGE_DELAY=-1 cargo bench -q -p finetune-trainer --bench throughput 2>/dev/null | tee /dev/stderr)"
if [ "${BENCH_TORCH:-0}" = "1" ]; then
  torch_line="$("$root/benches/run-pytorch.sh" | tee /dev/stderr)"
  c="$(grep -o '= [0-9]* tokens/s' <<<"$candle" | head -1 | tr -dc 0-9)"
  t="$(grep -o '= [0-9]* tokens/s' <<<"$torch_line" | tr -dc 0-9)"
  python3 -c "print(f'ratio candle/pytorch = {$c/$t:.2f}')"
fi
# LoRA (r=16 on q,v): the frozen-matmul op against the plain-matmul path it replaced, each in its own
# process (peak RSS is per process), same shape and steps.
lora="$(BENCH_METHOD=lora BENCH_CSV_ROWS=0 MIMALLOC_PURGE_DELAY=-1 cargo bench -q -p finetune-trainer --bench throughput 2>/dev/null | tee /dev/stderr)"
plain="$(BENCH_METHOD=lora BENCH_REFERENCE_MATMUL=1 BENCH_CSV_ROWS=0 MIMALLOC_PURGE_DELAY=-1 cargo bench -q -p finetune-trainer --bench throughput 2>/dev/null | tee /dev/stderr)"
a="$(grep -o '= [0-9]* tokens/s' <<<"$lora" | tr -dc 0-9)"
b="$(grep -o '= [0-9]* tokens/s' <<<"$plain" | tr -dc 0-9)"
python3 -c "print(f'ratio LoRA frozen-matmul/plain-matmul tokens/s = {$a/$b:.2f}')"
# LoRA over a quantized base (issue 18): the same LoRA run with the frozen projections held as
# int8 and int4, each in its own process, against the f32 run above.
for q in int8 int4; do
  out="$(BENCH_METHOD=lora BENCH_QUANT=$q BENCH_CSV_ROWS=0 MIMALLOC_PURGE_DELAY=-1 cargo bench -q -p finetune-trainer --bench throughput 2>/dev/null | tee /dev/stderr)"
  n="$(grep -o '= [0-9]* tokens/s' <<<"$out" | tr -dc 0-9)"
  python3 -c "print(f'ratio LoRA over an $q base / f32 base tokens/s = {$n/$a:.2f}')"
done
if [ "${BENCH_TORCH:-0}" = "1" ]; then
  # transformers and transformers + PEFT as peers of the full and the LoRA runs, interleaved rounds.
  "$root/benches/peers.sh"
fi
