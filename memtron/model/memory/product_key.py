"""Product-key memory / Memory+ retrieval (DESIGN §3).

Per head h: ``q = norm(W_q x)`` split in halves q1, q2; scores against two sub-key tables of n
rows; top-k of each half; the k*k candidate sums; top-k of those gives slot ids ``i*n + j`` and
softmax weights (fp32). ``y = sum w * V[id]`` over all heads' hits. Memory+ gates and projects:
``out = W_o(y * SiLU(W_g x))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from memtron.config import MemoryConfig
from memtron.model.tables import ValueTable


def product_key_topk(
    scores1: torch.Tensor, scores2: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over all n*n sums ``scores1[..., i] + scores2[..., j]``.

    Any pair in the global top-k has both halves in their own half's top-k, so searching the
    k*k candidate sums is exact. Returns (scores [..., k], slot ids i*n + j [..., k]), best first.
    """
    n = scores2.shape[-1]
    s1, i1 = scores1.topk(k, dim=-1)  # [..., k]
    s2, i2 = scores2.topk(k, dim=-1)
    candidates = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [..., k*k]
    best, flat = candidates.topk(k, dim=-1)
    rows = torch.gather(i1, -1, flat // k)
    cols = torch.gather(i2, -1, flat % k)
    return best, rows * n + cols


class ProductKeyMemory(nn.Module):
    """One memory layer: per-layer query net and sub-keys, over a (possibly shared) table."""

    def __init__(self, d_model: int, cfg: MemoryConfig, values: ValueTable, init_std: float,
                 out_std: float) -> None:
        super().__init__()
        self.n_heads, self.topk, self.d_key = cfg.n_heads, cfg.topk, cfg.d_key
        self.n_sub_keys = cfg.n_sub_keys
        self.key_norm = cfg.key_norm
        self.memory_plus = cfg.memory_plus
        d_value = values.dim
        self.query = nn.Linear(d_model, cfg.n_heads * cfg.d_key, bias=False)
        self.query_norm = nn.RMSNorm(cfg.d_key) if cfg.query_norm else None
        # [heads, 2 halves, n, d_key/2]
        self.keys = nn.Parameter(torch.empty(cfg.n_heads, 2, cfg.n_sub_keys, cfg.d_key // 2))
        if cfg.memory_plus:
            self.gate = nn.Linear(d_model, d_value, bias=False)
            self.out = nn.Linear(d_value, d_model, bias=False)
        # The table is owned by the Transformer (it may be shared by several layers); a list
        # keeps it out of this module's parameters so it is stored and optimised once.
        self._values = [values]
        # How forward reads the table: directly, or through a wrapper that parallel code
        # installs (parallel/token_slice.py: tp ranks each look up a slice of the tokens).
        self.lookup_via: Callable[[ValueTable, torch.Tensor, torch.Tensor], torch.Tensor] | None \
            = None
        self.reset_parameters(init_std, out_std)

    @property
    def values(self) -> ValueTable:
        return self._values[0]

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.query.weight, std=init_std)
        bound = 1.0 / math.sqrt(self.d_key // 2)
        nn.init.uniform_(self.keys, -bound, bound)
        if self.memory_plus:
            nn.init.normal_(self.gate.weight, std=init_std)
            nn.init.normal_(self.out.weight, std=out_std)

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d_model] -> (slot ids [T, H*k] int64, fp32 softmax weights [T, H*k])."""
        q = self.query(x).view(x.shape[0], self.n_heads, self.d_key)
        if self.query_norm is not None:
            q = self.query_norm(q)
        q = q.float()
        keys = self.keys.float()
        if self.key_norm:
            keys = F.rms_norm(keys, (keys.shape[-1],))
        half = self.d_key // 2
        # [T, H, n] per half
        scores1 = torch.einsum("thd,hnd->thn", q[..., :half], keys[:, 0])
        scores2 = torch.einsum("thd,hnd->thn", q[..., half:], keys[:, 1])
        best, ids = product_key_topk(scores1, scores2, self.topk)
        weights = torch.softmax(best, dim=-1)
        return ids.flatten(1), weights.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, weights = self.retrieve(flat)
        if self.lookup_via is None:
            y = self.values.lookup(ids, weights)
        else:
            y = self.lookup_via(self.values, ids, weights)
        y = y.to(x.dtype)
        if self.memory_plus:
            y = self.out(y * F.silu(self.gate(flat)))
        return y.view(shape)
