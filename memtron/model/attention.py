"""Causal grouped-query self-attention with rotary position embeddings.

The attention itself goes through one backend call, ``backend(q, k, v, mask)``: the local
backend is SDPA; context parallelism swaps in ring attention (``memtron.parallel.context``), so
the math here stays single-process.

Explicit memories (DESIGN §6): in a memory layer the backend also gets a :class:`MemoryKV`, and
query i attends, in one softmax, to the memory slots of its own chunk (all of them) and to its
causal context, c_i being its chunk:
    out_i = softmax([q_i K_mem(c_i)^T, q_i K_ctx(<=i)^T] / sqrt(D)) [V_mem(c_i); V_ctx].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memtron.model.forward import KVCache, MemoryKV


def rope_tables(positions: torch.Tensor, head_dim: int,
                theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [len(positions), head_dim/2] (fp32, computed in fp64) of the rotation by
    ``positions`` (any integers, negative ones included)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]
    return angles.cos().float(), angles.sin().float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_len, head_dim/2], computed once in fp64 and kept as fp32 buffers.
    Explicit positions let a context-parallel rank hold a non-contiguous slice of the sequence
    and a generating model continue after its cache, and still rotate by the true position."""

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        cos, sin = rope_tables(torch.arange(max_len), head_dim, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

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


def memory_mask(memory: MemoryKV, mask: torch.Tensor | None, n_q: int,
                n_k: int) -> torch.Tensor:
    """Boolean [B|1, 1, Lq, M + Lk] mask over the keys [memory slots; context]: query i sees
    the slots of chunk ``memory.query_chunk[i]`` (the chunk-wise mask), then the context keys
    ``mask`` allows (None = causal, Lq == Lk)."""
    device = memory.k.device
    slot_chunk = torch.arange(memory.k.shape[2], device=device) // memory.slots
    allowed = memory.query_chunk.to(device)[..., :, None] == slot_chunk  # [(B,) Lq, M]
    allowed = allowed[None, None] if allowed.dim() == 2 else allowed[:, None]
    if mask is None:
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()[None, None]
    batch = max(allowed.shape[0], mask.shape[0])
    return torch.cat([allowed.expand(batch, 1, n_q, -1),
                      mask.to(device).expand(batch, 1, n_q, n_k)], dim=-1)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None, memory: MemoryKV | None = None) -> torch.Tensor:
    """The local backend. q [B, H, Lq, D], k/v [B, KV, Lk, D] -> [B, H, Lq, D]; grouped-query
    when KV < H. ``mask``: boolean allowed pairs [B|1, 1, Lq, Lk]; None = causal, Lq == Lk.
    ``memory``: explicit memories, prepended to the keys under :func:`memory_mask` (one
    softmax over memories and context, as in the math of the module docstring)."""
    if memory is not None:
        mask = memory_mask(memory, mask, q.shape[2], k.shape[2])
        k = torch.cat([memory.k.to(k.dtype), k], dim=2)
        v = torch.cat([memory.v.to(v.dtype), v], dim=2)
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
                mask: torch.Tensor | None = None, cache: KVCache | None = None,
                memory: MemoryKV | None = None) -> torch.Tensor:
        """``memory``: this layer's explicit memories (memory layers only); they are not
        written to the cache, so a generation step passes the memories of its chunks anew."""
        b, length, _ = x.shape
        q, k, v = self.rotated_qkv(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        if memory is None:
            out = self.backend(q, k, v, mask)
        else:
            if memory.k.shape[1] != k.shape[1]:
                raise ValueError(f"explicit memories have {memory.k.shape[1]} KV heads, layer "
                                 f"{self.layer_index} computes {k.shape[1]} (under tensor "
                                 "parallelism give each rank its slice of the heads)")
            out = self.backend(q, k, v, mask, memory=memory)
        return self.wo(out.transpose(1, 2).reshape(b, length, -1))
