"""PyTorch reference for the candle throughput bench: the same Llama architecture and shape
(llama2.c stories15M: dim 288, hidden 768, 6 layers, 6 heads, vocab 32000), full gradients,
AdamW, batch 8 x 256 tokens, loss on every position, f32 on CPU.

Run through benches/run-pytorch.sh (or BENCH_TORCH=1 make bench) (makes its own venv). Not part of CI.
Env: BENCH_STEPS (default 5), BENCH_WARMUP (default 1).
"""
import math
import os
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, HIDDEN, LAYERS, HEADS, VOCAB, SEQ, BATCH = 288, 768, 6, 6, 32000, 256, 8


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = RMSNorm(DIM)
        self.post_attention_layernorm = RMSNorm(DIM)
        self.q_proj = nn.Linear(DIM, DIM, bias=False)
        self.k_proj = nn.Linear(DIM, DIM, bias=False)
        self.v_proj = nn.Linear(DIM, DIM, bias=False)
        self.o_proj = nn.Linear(DIM, DIM, bias=False)
        self.gate_proj = nn.Linear(DIM, HIDDEN, bias=False)
        self.up_proj = nn.Linear(DIM, HIDDEN, bias=False)
        self.down_proj = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        hd = DIM // HEADS
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, s, HEADS, hd).transpose(1, 2)
        k = self.k_proj(h).view(b, s, HEADS, hd).transpose(1, 2)
        v = self.v_proj(h).view(b, s, HEADS, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask
        y = F.softmax(att, dim=-1) @ v
        x = x + self.o_proj(y.transpose(1, 2).reshape(b, s, DIM))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.norm = RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        hd = DIM // HEADS
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        f = torch.outer(torch.arange(SEQ).float(), inv)
        emb = torch.cat((f, f), dim=-1)
        self.register_buffer("cos", emb.cos())
        self.register_buffer("sin", emb.sin())
        self.register_buffer("mask", torch.full((SEQ, SEQ), float("-inf")).triu(1))

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for blk in self.layers:
            x = blk(x, self.cos, self.sin, self.mask)
        return self.lm_head(self.norm(x))


def timed_steps(forward, params):
    """The bench's step (next-token loss on every position, AdamW, clipping) on one fixed batch,
    BENCH_WARMUP untimed then BENCH_STEPS timed; `forward(ids)` gives the logits. Returns
    (steps, seconds, last loss, peak RSS in GB). Shared with hf_peers.py, so every peer takes the
    same step."""
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    warmup = int(os.environ.get("BENCH_WARMUP", "1"))
    steps = int(os.environ.get("BENCH_STEPS", "5"))
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        logits = forward(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return steps, secs, loss.item(), rss


def report(label, trainable, steps, secs, loss, rss):
    print(
        f"{label} stories15M-shape ({trainable}) batch {BATCH}x{SEQ}: "
        f"{steps} steps in {secs:.2f} s = {steps * BATCH * SEQ / secs:.0f} tokens/s "
        f"(loss {loss:.3f}), threads {torch.get_num_threads()}, peak RSS {rss:.2f} GB"
    )


def main():
    torch.manual_seed(0)
    model = Llama()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    report(f"pytorch {torch.__version__}", f"{n} params", *timed_steps(model, params))


if __name__ == "__main__":
    main()
