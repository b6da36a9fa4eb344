"""MuonClip on a toy MLA language model, on CPU in a few seconds.

    python examples/muonclip_toy.py [--steps 200] [--tau 30]

A one-layer model with K2's attention weight layout (q and kv latents, per-head [nope | rope] queries, a
rope key shared by all heads) learns to output, at each position, the previous token of a random sequence:
attention must find the position one back through RoPE, and its logits grow sharp. Muon trains the
hidden matrices, AdamW the embeddings, head and norms; QK-Clip keeps every head's max logit at or below
tau. It prints the loss, the largest max logit and how many heads were clipped.
"""

import argparse
import math

import torch
import torch.nn.functional as F

from k2_megatron.optim import MLAHeadLayout, MuonClip, muon_param_groups


def rope(x, theta=10000.0):
    """Rotary embedding (rotate-half form) over the last dim of x [b, s, heads, d]."""
    s, half = x.shape[1], x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float32) / half)
    angle = torch.arange(s, dtype=torch.float32)[:, None] * freqs
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class ToyMLA(torch.nn.Module):
    def __init__(self, vocab=64, hidden=64, heads=4, q_rank=32, kv_rank=32, nope=16, rope=8, v=16):
        super().__init__()
        self.layout = MLAHeadLayout(heads, nope, rope, v)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.q_down = torch.nn.Linear(hidden, q_rank, bias=False)
        self.q_up = torch.nn.Linear(q_rank, heads * (nope + rope), bias=False)
        self.kv_down = torch.nn.Linear(hidden, kv_rank + rope, bias=False)
        self.kv_up = torch.nn.Linear(kv_rank, heads * (nope + v), bias=False)
        self.o_proj = torch.nn.Linear(heads * v, hidden, bias=False)
        self.norm = torch.nn.RMSNorm(hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.max_logits = None  # per-head max logit of the last forward, for QK-Clip

    def forward(self, tokens):
        b, s = tokens.shape
        L = self.layout
        h = self.embed(tokens)
        q = self.q_up(self.q_down(h)).view(b, s, L.num_heads, -1)
        ckv, k_rope = self.kv_down(h).split([self.kv_up.in_features, L.qk_rope_head_dim], dim=-1)
        kv = self.kv_up(ckv).view(b, s, L.num_heads, -1)
        nope = L.qk_nope_head_dim
        q = torch.cat([q[..., :nope], rope(q[..., nope:])], -1)
        k = torch.cat([kv[..., :nope], rope(k_rope[:, :, None]).expand(-1, -1, L.num_heads, -1)], -1)
        v = kv[..., nope:]
        scale = 1 / math.sqrt(L.q_rows_per_head)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
        self.max_logits = logits.detach().amax(dim=(0, 2, 3))
        out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(b, s, -1)
        return self.lm_head(self.norm(h + self.o_proj(out)))


def train(steps: int = 200, lr: float = 0.02, tau: float | None = 15.0, log_every: int = 20) -> list[dict]:
    """Trains the toy; returns one record per step (loss, max logit before the step's clip, clipped heads)."""
    torch.manual_seed(0)
    model = ToyMLA()
    opt = MuonClip(muon_param_groups(model, lr=lr, weight_decay=0.01), qk_clip_tau=tau)
    if tau is not None:
        opt.register_attention("attn", w_q_up=model.q_up.weight, w_kv_up=model.kv_up.weight, layout=model.layout,
                               max_logits=lambda: model.max_logits)
    history = []
    for step in range(1, steps + 1):
        tokens = torch.randint(0, 64, (16, 32))
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, 1:].reshape(-1, 64), tokens[:, :-1].reshape(-1))  # predict the previous token
        loss.backward()
        opt.step()
        opt.zero_grad()
        clipped = opt.qk_clip_stats["attn"].num_clipped if tau is not None else 0
        history.append({"step": step, "loss": loss.item(), "max_logit": model.max_logits.max().item(),
                        "clipped": clipped})
        if log_every and (step % log_every == 0 or step == 1):
            r = history[-1]
            print(f"step {step:4d}  loss {r['loss']:.3f}  max logit {r['max_logit']:7.2f}  clipped heads {clipped}")
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--tau", type=float, default=15.0, help="QK-Clip threshold (K2: 100); 0 turns it off")
    args = parser.parse_args()
    train(args.steps, args.lr, args.tau or None)


if __name__ == "__main__":
    main()
