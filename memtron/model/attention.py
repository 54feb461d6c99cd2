"""Causal grouped-query self-attention with rotary position embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, ...]:
    """cos/sin [L, head_dim/2] for integer positions [L] (explicit positions let a context-parallel
    rank hold a non-contiguous slice of the sequence and still rotate by the true position)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, heads, L, head_dim]."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, H, L, D], k/v [B, KV, L, D] -> [B, H, L, D]; grouped-query when KV < H."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                          enable_gqa=q.shape[1] != k.shape[1])


class CausalSelfAttention(nn.Module):
    """``core`` computes attention from rotated q, k, v. It is the one place sequence-parallel
    code plugs in (context parallelism swaps in ring attention), so the math here stays
    single-process."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.core = causal_attention
        # The input shared by q, k and v; tensor parallelism swaps in one gradient all-reduce
        # here instead of one per projection.
        self.input_hook: nn.Module = nn.Identity()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        x = self.input_hook(x)
        q = self.wq(x).view(b, length, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, length, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, length, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.core(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, length, -1))
