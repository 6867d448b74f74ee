"""Hugging Face peers for the candle throughput bench, same shape and step as benches/torch_ref.py
(llama2.c stories15M: dim 288, hidden 768, 6 layers, 6 heads, vocab 32000; batch 8 x 256, loss on
every position, AdamW, gradient clipping, f32 on CPU):

  hf_peers.py full   transformers' LlamaForCausalLM, every parameter trained
  hf_peers.py lora   transformers + PEFT LoRA r=16 (alpha 32, dropout 0.05) on q_proj and v_proj

One mode per process, so peak RSS is the mode's own. Run through benches/run-pytorch.sh peers
(BENCH_TORCH=1 make bench). Env: BENCH_STEPS (default 5), BENCH_WARMUP (default 1).
"""
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from torch_ref import DIM, HEADS, HIDDEN, LAYERS, SEQ, VOCAB, report, timed_steps


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
    n = sum(p.numel() for p in params)
    result = timed_steps(lambda ids: model(input_ids=ids).logits, params)
    report(label, f"{n} trainable", *result)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "full")
