"""Hugging Face peers for the candle throughput bench, same shape and step as benches/torch_ref.py
(llama2.c stories15M: dim 288, hidden 768, 6 layers, 6 heads, vocab 32000; batch 8 x 256, loss on
every position, AdamW, gradient clipping, f32 on CPU):

  hf_peers.py full   transformers' LlamaForCausalLM, every parameter trained
  hf_peers.py lora   transformers + PEFT LoRA r=16 (alpha 32, dropout 0.05) on q_proj and v_proj

One mode per process, so peak RSS is the mode's own. Run through benches/run-pytorch.sh peers
(BENCH_TORCH=1 make bench). Env: BENCH_STEPS (default 5), BENCH_WARMUP (default 1).
"""
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

DIM, HIDDEN, LAYERS, HEADS, VOCAB, SEQ, BATCH = 288, 768, 6, 6, 32000, 256, 8


def main(mode):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, max_position_embeddings=SEQ,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    label = "transformers"
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=["q_proj", "v_proj"]))
        label = "transformers+peft-lora"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    warmup = int(os.environ.get("BENCH_WARMUP", "1"))
    steps = int(os.environ.get("BENCH_STEPS", "5"))
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    n = sum(p.numel() for p in params)
    print(
        f"{label} stories15M-shape ({n} trainable) batch {BATCH}x{SEQ}: "
        f"{steps} steps in {secs:.2f} s = {steps * BATCH * SEQ / secs:.0f} tokens/s "
        f"(loss {loss.item():.3f}), threads {torch.get_num_threads()}, peak RSS {rss:.2f} GB"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "full")
