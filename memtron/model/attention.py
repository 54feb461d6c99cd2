"""Causal grouped-query self-attention with rotary position embeddings.

The attention itself goes through one backend call, ``backend(q, k, v, mask)``: the local
backend is SDPA; context parallelism swaps in ring attention (``memtron.parallel.context``), so
the math here stays single-process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memtron.model.forward import KVCache


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_len, head_dim/2], computed once in fp64 and kept as fp32 buffers.
    Explicit positions let a context-parallel rank hold a non-contiguous slice of the sequence
    and a generating model continue after its cache, and still rotate by the true position."""

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64)
                                    / head_dim))
        angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [L] -> cos, sin [L, D/2]; [B, L] -> [B, 1, L, D/2] (broadcast over heads)."""
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, heads, L, head_dim]."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.to(x.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """The local backend. q [B, H, Lq, D], k/v [B, KV, Lk, D] -> [B, H, Lq, D]; grouped-query
    when KV < H. ``mask``: boolean allowed pairs [B|1, 1, Lq, Lk]; None = causal, Lq == Lk."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=q.shape[1] != k.shape[1])


class CausalSelfAttention(nn.Module):
    """``backend`` computes attention from rotated q, k, v and a mask; it is the one place
    sequence-parallel code plugs in."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, layer_index: int) -> None:
        super().__init__()
        self.backend = sdpa_attention
        self.layer_index = layer_index  # its slot in a KV cache
        # The input shared by q, k and v; tensor parallelism swaps in one gradient all-reduce
        # here instead of one per projection.
        self.input_hook: nn.Module = nn.Identity()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def rotated_qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, d_model] -> q [B, H, L, D], k and v [B, KV, L, D], q and k rotated: what
        the backend attends with, and what explicit memories store (model/memory/explicit.py)."""
        b, length, _ = x.shape
        x = self.input_hook(x)
        q = self.wq(x).view(b, length, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, length, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, length, -1, self.head_dim).transpose(1, 2)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = self.rotated_qkv(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        out = self.backend(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(b, length, -1))
