"""Memory^3 explicit memories: which tokens of a reference are kept (DESIGN §6).

A *memory* is one reference chunk (at most ``ref_len`` tokens) encoded by the model itself at
positions ``0..ref_len-1``. In every memory layer and for every KV head, the ``m`` tokens that
receive the most attention (summed over all query tokens and over the query heads of the KV
group, softmax without a causal mask, after RoPE) are kept, with their post-RoPE keys and their
values: a memory is ``K, V [n_mem_layers, n_kv_heads, m, head_dim]``, about ``m / ref_len`` of
the dense KV of its chunk.

This module is the math only. Stores, codecs and reading memories by id are
:mod:`memtron.storage.explicit`; the retriever that picks memories for a context is
:mod:`memtron.data.retrieve`; building a store is :mod:`memtron.export.explicit`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn


def attention_received(q: torch.Tensor, k: torch.Tensor,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention each key token receives: q [B, H, L, D], k [B, KV, L, D] (post-RoPE) ->
    [B, KV, L] fp32, ``Σ_i Σ_{h in group} softmax_j(q_i·k_j/√D)`` with no causal mask.
    ``valid`` [B, L] bool marks real tokens (False = padding): padding keys get no attention and
    padding queries give none."""
    b, n_heads, length, dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    qg = q.float().view(b, n_kv, group, length, dim)
    scores = torch.einsum("bkgid,bkjd->bkgij", qg, k.float()) / math.sqrt(dim)
    if valid is not None:
        valid = valid.to(q.device)
        scores = scores.masked_fill(~valid[:, None, None, None, :], float("-inf"))
        probs = scores.softmax(-1) * valid[:, None, None, :, None]
    else:
        probs = scores.softmax(-1)
    return probs.sum(dim=(2, 3))


def select_top_tokens(q: torch.Tensor, k: torch.Tensor, m: int,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [B, KV, m] int64 (ascending) of the ``m`` tokens receiving the most attention
    per KV head (:func:`attention_received`). A reference with fewer than ``m`` real tokens
    repeats its best tokens to fill the ``m`` slots (a store row has a fixed size)."""
    received = attention_received(q, k, valid)
    length = received.shape[-1]
    if valid is not None:  # padding ranks below every real token
        received = received.masked_fill(~valid.to(received.device)[:, None, :], -1.0)
    order = received.argsort(dim=-1, descending=True, stable=True)  # real tokens first
    if valid is None:
        n_real = torch.full((order.shape[0], 1, 1), length, device=order.device)
    else:
        n_real = valid.to(order.device).sum(-1).clamp_min(1)[:, None, None]
    slot = torch.arange(m, device=order.device)[None, None, :] % n_real  # [B, 1, m]
    top = torch.gather(order, -1, slot.expand(order.shape[0], order.shape[1], m))
    return top.sort(dim=-1).values


class _StopForward(Exception):
    """Raised by the capture hook after the last memory layer: deeper layers are not needed."""


def pad_references(batch: Sequence[Sequence[int]] | torch.Tensor,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad token lists into tokens [B, L] on ``device`` and valid [B, L] (None when
    nothing is padded); a tensor passes through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device=device, dtype=torch.long), None
    lengths = [len(t) for t in batch]
    if not lengths or min(lengths) < 1:
        raise ValueError("every reference needs at least one token")
    tokens = torch.zeros(len(batch), max(lengths), dtype=torch.long)
    for row, ids in enumerate(batch):
        tokens[row, : len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return tokens.to(device), (None if bool(valid.all()) else valid.to(device))


@torch.no_grad()
def encode_batch(model: nn.Module, tokens: torch.Tensor, layers: Sequence[int], m: int,
                 valid: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of references tokens [B, L] (right-padded where ``valid`` is False) ->
    k, v [B, n_layers, KV, m, D] and positions [B, n_layers, KV, m]. Padding at the end never
    changes the real tokens of a causal model, so the batch is one ordinary forward (positions
    0..L-1), stopped after the deepest memory layer."""
    layers = list(layers)
    blocks = model.blocks
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    last = max(layers)
    handles = []

    def hook(index: int):
        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["x"]
            rope = args[1] if len(args) > 1 else kwargs["rope"]
            q, k, v = module.rotated_qkv(x, rope)
            top = select_top_tokens(q, k, m, valid)  # [B, KV, m]
            index_d = top[..., None].expand(*top.shape, k.shape[-1])
            captured[index] = (k.gather(2, index_d), v.gather(2, index_d), top)
            if index == last:
                raise _StopForward
        return capture

    for layer in layers:
        handles.append(blocks[layer].attn.register_forward_pre_hook(hook(layer),
                                                                     with_kwargs=True))
    try:
        model(tokens)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    k = torch.stack([captured[layer][0] for layer in layers], dim=1)
    v = torch.stack([captured[layer][1] for layer in layers], dim=1)
    positions = torch.stack([captured[layer][2] for layer in layers], dim=1)
    return k, v, positions


def encode_references(model: nn.Module,
                      token_batches: Iterable[Sequence[Sequence[int]] | torch.Tensor],
                      layers: Sequence[int], m: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode references (batches of token lists, or [B, L] tensors) with ``model`` and keep
    the top-``m`` tokens per (memory layer, KV head): k, v [N, n_layers, KV, m, D] (post-RoPE
    K, on the model's device and in its compute dtype) and positions [N, n_layers, KV, m]."""
    if not layers:
        raise ValueError("encode_references: no memory layers given")
    n_blocks = len(model.blocks)
    bad = [layer for layer in layers if not 0 <= layer < n_blocks]
    if bad:
        raise ValueError(f"memory layers {bad} out of range for a model of {n_blocks} layers")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    device = next(model.parameters()).device
    ks, vs, ps = [], [], []
    for batch in token_batches:
        tokens, valid = pad_references(batch, device)
        k, v, pos = encode_batch(model, tokens, layers, m, valid)
        ks.append(k)
        vs.append(v)
        ps.append(pos)
    if not ks:
        raise ValueError("encode_references: no references given")
    return torch.cat(ks), torch.cat(vs), torch.cat(ps)


def default_layers(n_layers: int) -> list[int]:
    """The first half of the layers (Memory^3's memory layers), at least one."""
    return list(range(max(1, n_layers // 2)))
