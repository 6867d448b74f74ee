"""Helpers of scripts/gpu-check.sh (PyTorch, transformers and peft, as on the GPU machines).

  gpu_check.py make-model DIR SHAPE        random-weight Llama of SHAPE (7b or tiny), HF layout, bf16
  gpu_check.py make-data FILE ROWS WORDS   a ReviewText,SentimentLabel CSV of long rows
  gpu_check.py compare CPU.json CUDA.json  max |CPU − CUDA| of two `finetune-trainer logits` outputs
  gpu_check.py peft DIR BATCH SEQ STEPS    PyTorch + PEFT LoRA (r=16 on q,v), the same job: JSON
  gpu_check.py summary OUT.json ...        the results table (markdown) from the JSON lines
"""

import json
import random
import sys
import time

SHAPES = {
    # Llama 2 7B's config.json, with random weights.
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    # A dry run on CPU.
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),
}


def device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_model(out, shape):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, **SHAPES[shape])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device() == "cuda" else torch.float32
    with torch.device(device()):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    print(json.dumps({"model": out, "shape": shape, "parameters": model.num_parameters()}))


def make_data(path, rows, words):
    rng = random.Random(1)
    vocab = ("the quick brown fox jumps over lazy dog battery screen price delivery quality works "
             "broke returned love hate great poor again never always cable sound light").split()
    with open(path, "w") as f:
        f.write("ReviewText,SentimentLabel\n")
        for i in range(rows):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            f.write(f"\"{text}\",{'positive' if i % 2 else 'negative'}\n")


def compare(cpu_path, cuda_path):
    cpu = json.load(open(cpu_path))["logits"]
    cuda = json.load(open(cuda_path))["logits"]
    diff = max(abs(a - b) for ra, rb in zip(cpu, cuda) for a, b in zip(ra, rb))
    scale = max(abs(a) for r in cpu for a in r)
    print(json.dumps({"check": "logits", "max_abs_diff": diff, "max_abs_logit": scale,
                      "positions": len(cpu)}))
    return diff <= 1e-3 * max(1.0, scale)


def peft_run(model_dir, batch, seq, steps, quant="none"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    dev = device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    run = "peft"
    if quant == "nf4":
        run = "peft-nf4"
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            print(json.dumps({"skipped": run, "why": "bitsandbytes is not installed"}))
            return
        if dev != "cuda":
            print(json.dumps({"skipped": run, "why": "bitsandbytes 4-bit needs a GPU"}))
            return
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_compute_dtype=dtype)
        model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype,
                                                 quantization_config=bnb,
                                                 attn_implementation="sdpa")
    else:
        model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype,
                                                 attn_implementation="sdpa").to(dev)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps):
        ids = torch.randint(3, 32000, (batch, seq), generator=g).to(dev)
        labels = torch.full_like(ids, -100)
        labels[:, -4:] = ids[:, -4:]  # the label tokens, as our trainer scores them
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    timed = times[2:] or times
    peak = torch.cuda.max_memory_reserved() if dev == "cuda" else 0
    print(json.dumps({"run": run, "batch": batch, "seq": seq, "steps": steps,
                      "tokens_per_s": batch * seq * len(timed) / sum(timed),
                      "peak_gpu_bytes": peak}))


def summary(out, lines):
    rows = [json.loads(l) for l in lines if l.strip().startswith("{")]
    json.dump(rows, open(out, "w"), indent=1)
    print("| run | batch | tokens/s | peak GPU GiB | plan GiB | plan error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "run" not in r:
            continue
        plan = r.get("plan_bytes")
        err = f"{plan / r['peak_gpu_bytes'] - 1:+.0%}" if plan and r.get("peak_gpu_bytes") else ""
        print(f"| {r['run']} | {r['batch']} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_gpu_bytes'] / 2**30:.1f} | "
              f"{(plan or 0) / 2**30:.1f} | {err} |")
    for r in rows:
        if r.get("check") == "nccl":
            print(f"NCCL, world size {r['world_size']}: all-reduce of {r['values']} values "
                  f"{'exact' if r['all_reduce_exact'] else 'CHANGED'} ({'ok' if r['ok'] else 'FAILED'})")
        if r.get("check") == "layer-split":
            print(f"layers split over {r['devices']}: {r['gradients_compared']} gradients, "
                  f"largest relative difference {r['max_relative_gradient_difference']:.1e} "
                  f"({'ok' if r['ok'] else 'FAILED'})")
    pairs = [("ours", "peft", ""), ("ours-int4", "peft-nf4", " (4-bit base)")]
    batches = sorted({r["batch"] for r in rows if "run" in r})
    for b, (mine, theirs, what) in ((b, p) for b in batches for p in pairs):
        ours = [r for r in rows if r.get("run") == mine and r["batch"] == b]
        peer = [r for r in rows if r.get("run") == theirs and r["batch"] == b]
        if ours and peer and peer[0]["tokens_per_s"]:
            o, p = ours[0], peer[0]
            line = f"batch {b}{what}: tokens/s ours/PEFT = {o['tokens_per_s'] / p['tokens_per_s']:.2f}"
            if p["peak_gpu_bytes"]:
                line += f", peak memory ours/PEFT = {o['peak_gpu_bytes'] / p['peak_gpu_bytes']:.2f}"
            print(line)


def main(argv):
    cmd = argv[1]
    if cmd == "make-model":
        make_model(argv[2], argv[3])
    elif cmd == "make-data":
        make_data(argv[2], int(argv[3]), int(argv[4]))
    elif cmd == "compare":
        return 0 if compare(argv[2], argv[3]) else 1
    elif cmd == "peft":
        peft_run(argv[2], int(argv[3]), int(argv[4]), int(argv[5]), *argv[6:7])
    elif cmd == "summary":
        summary(argv[2], sys.stdin.readlines())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
