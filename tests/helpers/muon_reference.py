"""The K2 report's MuonClip written out independently in float64: the oracle of the optimizer tests.

Muon (K2 report section 2, Moonlight's update scaling) acts on each weight matrix as the Hugging Face release
stores it: gate_proj and up_proj are two matrices, an expert stack [E, n, m] is E of them.
"""

import math

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def ns64(m):
    X = m.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    a, b, c = NS_COEFFS
    for _ in range(5):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class Float64MuonClip:
    """K2 report section 2: Muon (mu, Nesterov optional, 0.2 sqrt(max(n, m)) scale, decoupled wd), AdamW for the
    rest, QK-Clip with gamma = tau / S_max on q_C (gamma^alpha), k_C (gamma^(1-alpha)), q_R (gamma)."""

    def __init__(self, params: dict, muon_names: set, *, lr, wd, mu=0.95, nesterov=False, betas=(0.9, 0.95),
                 eps=1e-8):
        self.w = {k: v.detach().double().clone() for k, v in params.items()}
        self.muon, self.lr, self.wd, self.mu, self.nesterov, self.betas, self.eps = \
            muon_names, lr, wd, mu, nesterov, betas, eps
        self.m = {k: torch.zeros_like(v) for k, v in self.w.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.w.items()}
        self.t = 0

    def step(self, grads: dict):
        self.t += 1
        for k, g in grads.items():
            g = g.double()
            W = self.w[k]
            if k in self.muon:
                self.m[k] = self.mu * self.m[k] + g
                u = g + self.mu * self.m[k] if self.nesterov else self.m[k]
                mats = u if u.dim() == 3 else u[None]
                o = torch.stack([ns64(x) * 0.2 * math.sqrt(max(x.shape)) for x in mats]).reshape(u.shape)
                self.w[k] = W - self.lr * (o + self.wd * W)
            else:
                b1, b2 = self.betas
                self.m[k] = b1 * self.m[k] + (1 - b1) * g
                self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
                mhat = self.m[k] / (1 - b1**self.t)
                vhat = self.v[k] / (1 - b2**self.t)
                self.w[k] = W - self.lr * (mhat / (vhat.sqrt() + self.eps) + self.wd * W)

    def qk_clip(self, q_name, kv_name, s_max, layout, tau, alpha=0.5):
        wq = self.w[q_name].clone().view(layout.num_heads, -1, self.w[q_name].shape[1])
        wkv = self.w[kv_name].clone().view(layout.num_heads, -1, self.w[kv_name].shape[1])
        nope = layout.qk_nope_head_dim
        for h, s in enumerate(s_max.tolist()):
            if s > tau:
                gamma = tau / s
                wq[h, :nope] *= gamma**alpha
                wq[h, nope:] *= gamma
                wkv[h, :nope] *= gamma ** (1 - alpha)
        self.w[q_name], self.w[kv_name] = wq.reshape(self.w[q_name].shape), wkv.reshape(self.w[kv_name].shape)
