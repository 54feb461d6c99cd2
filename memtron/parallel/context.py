"""Context parallelism: zigzag sequence layout and ring attention (DESIGN §7).

The sequence is cut into ``2 * cp`` chunks and cp rank i holds chunks ``i`` and
``2*cp - 1 - i``, so every rank has the same causal work. Tokens, targets and RoPE positions
all follow this layout (:func:`zigzag_indices`), and each rank's loss is over its own tokens.

Ring attention: K/V blocks travel the cp ring with ``batch_isend_irecv`` (the next block is
in flight while the current one is used, forward and backward). For every (query chunk, key
chunk) pair the global chunk order decides: an earlier key chunk is seen whole, the same chunk
causally, a later one not at all (skipped, never computed). Each pair runs a local kernel that
returns the output and its log-sum-exp (torch's memory-efficient SDPA kernel on CUDA, an exact
blocked torch kernel elsewhere), merged into the running result in fp32 with the stable LSE
update.
Backward is a custom autograd function: probabilities are recomputed from the final LSE, and
dK/dV accumulators ride a second ring with their block until they are back with its owner.

Explicit memories (memory layers, DESIGN §6) are one more, non-causal, block: every rank holds
the memories of the chunks its own queries lie in (they travel with the batch, never on the
ring), so the block costs no communication. Each run of queries in one 64-token chunk attends
to that chunk's slots with the same local kernel; the result is merged by LSE like a ring
block, and it is computed while the first K/V hop is in flight. Its backward adds to dQ
locally; the memories' dK/dV stay on the rank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from memtron.model.attention import CausalSelfAttention, sdpa_attention
from memtron.model.forward import MemoryKV
from memtron.parallel.state import ParallelState

KEY_BLOCK = 512  # query and key block of the local kernel: memory ~ KEY_BLOCK^2 per head


# --------------------------------------------------------------------------- layout


def zigzag_chunks(cp: int, rank: int) -> tuple[int, int]:
    return rank, 2 * cp - 1 - rank


def zigzag_indices(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Positions of this cp rank's tokens in the full sequence, in local order."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} must be divisible by 2 * cp = {2 * cp} "
                         "(data.seq_len, parallel.cp)")
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in zigzag_chunks(cp, rank)])


# --------------------------------------------------------------------------- local kernel


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, KV, H/KV, L, D]: query heads grouped under their kv head (GQA)."""
    b, h, length, d = q.shape
    return q.reshape(b, kv_heads, h // kv_heads, length, d)


def _blocks(n_q: int, n_k: int, causal: bool, block: int):
    """(query block, key block, needs a mask) pairs of the local kernel. Under ``causal`` (q and
    k cover the same positions) key blocks wholly after a query block are never visited."""
    for qs in range(0, n_q, block):
        qe = min(qs + block, n_q)
        for ks in range(0, n_k, block):
            if causal and ks >= qe:
                break
            ke = min(ks + block, n_k)
            yield slice(qs, qe), slice(ks, ke), causal and ke - 1 > qs


def _mask(scores: torch.Tensor, q: slice, k: slice) -> torch.Tensor:
    """Causal mask of a block that straddles the diagonal: query i sees keys j <= i."""
    q_idx = torch.arange(q.start, q.stop, device=scores.device)[:, None]
    k_idx = torch.arange(k.start, k.stop, device=scores.device)[None, :]
    return scores.masked_fill(k_idx > q_idx, float("-inf"))


def merge_partial(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
                  block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-normalised partial results over disjoint keys (fp32). Rows that saw
    no key yet have lse = -inf and contribute nothing."""
    new = torch.logaddexp(lse, block_lse)
    safe = new.masked_fill(torch.isinf(new), 0.0)
    merged = (out * torch.exp(lse - safe).unsqueeze(-1)
              + block_out * torch.exp(block_lse - safe).unsqueeze(-1))
    return merged, new


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  block: int = KEY_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of q [B, H, Lq, D] over k, v [B, KV, Lk, D] (GQA: H a multiple of KV)
    -> (out [B, H, Lq, D] fp32, lse [B, H, Lq] fp32). ``causal``: q and k cover the same
    positions and query i sees keys j <= i. On CUDA: torch's memory-efficient SDPA kernel;
    elsewhere :func:`blocked_attention_lse` (``block`` is its block size)."""
    if q.is_cuda:
        return efficient_attention_lse(q, k, v, causal)
    return blocked_attention_lse(q, k, v, causal, block)


def attention_lse_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, grad_out: torch.Tensor, causal: bool,
                           block: int = KEY_BLOCK,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv, fp32) of one (query, key) block pair given the *final* out and
    lse of the queries, so that the contributions of all pairs add up. On CUDA: the
    memory-efficient SDPA backward; elsewhere :func:`blocked_attention_lse_backward`."""
    if q.is_cuda:
        return efficient_attention_lse_backward(q, k, v, out, lse, grad_out, causal)
    return blocked_attention_lse_backward(q, k, v, out, lse, grad_out, causal, block)


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, KV, L, D] -> [B, H, L, D], kv head j serving query heads j*H/KV ... (j+1)*H/KV - 1
    (the grouping of :func:`_grouped`): the SDPA kernels take as many kv heads as query heads."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def efficient_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_lse` on CUDA: ``aten._scaled_dot_product_efficient_attention`` with
    ``compute_log_sumexp`` (fp32 and bf16 inputs; no dropout). Its causal mask is top-left
    aligned, which for the square diagonal blocks of the ring is the same as bottom-right. Its
    lse comes padded to a multiple of 32 queries; the padding is cut off."""
    heads, n_q, d = q.shape[1], q.shape[2], q.shape[3]
    with torch.autocast(q.device.type, enabled=False):  # dtypes are the inputs'
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, _repeat_kv(k, heads), _repeat_kv(v, heads), None, True, 0.0, causal,
            scale=1.0 / math.sqrt(d))
    return out.float(), lse[..., :n_q].float()


LSE_ALIGN = 32  # the efficient-attention forward pads its lse to a multiple of 32 queries


def _padded_lse(lse: torch.Tensor) -> torch.Tensor:
    """lse [B, H, Lq] -> a fresh fp32 [B, H, ceil32(Lq)] buffer holding it in [..., :Lq], the
    layout the efficient-attention forward produces. Its backward (cutlass ``check_supported``)
    wants lse.stride(1) and lse.stride(0) multiples of 8 (for H > 1, B > 1) and reads rows
    below Lq only; the padding is +inf, so a padded row would get probability exp(-inf) = 0."""
    b, h, n_q = lse.shape
    padded = torch.full((b, h, -(-n_q // LSE_ALIGN) * LSE_ALIGN), float("inf"),
                        dtype=torch.float32, device=lse.device)
    padded[..., :n_q] = lse
    return padded


def efficient_attention_lse_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     out: torch.Tensor, lse: torch.Tensor,
                                     grad_out: torch.Tensor, causal: bool,
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attention_lse_backward` on CUDA: the memory-efficient SDPA backward, recomputing
    the probabilities from the given (final) lse, as ring flash attention does. The kernel
    takes out in q's dtype and in the [B, L, H, D] memory layout its forward produces (it
    derives that stride rather than reading it); dk and dv of a kv group are summed (GQA)."""
    heads, d, kv_heads = q.shape[1], q.shape[3], k.shape[1]
    out_blhd = out.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    no_rng = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout off: never read
    with torch.autocast(q.device.type, enabled=False):
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out.to(q.dtype), q, _repeat_kv(k, heads), _repeat_kv(v, heads), None,
            out_blhd, _padded_lse(lse), no_rng, no_rng, 0.0, [True, True, True, False],
            causal, scale=1.0 / math.sqrt(d))
    group = heads // kv_heads
    dk = dk.float().unflatten(1, (kv_heads, group)).sum(2)
    dv = dv.float().unflatten(1, (kv_heads, group)).sum(2)
    return dq.float(), dk, dv


def blocked_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                          block: int = KEY_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_lse` in torch ops, in query x key blocks with an online softmax (memory
    ~ block^2): exact in fp32, on any device (the CPU kernel, and the reference)."""
    b, h, n_q, d = q.shape
    kv_heads = k.shape[1]
    qg = _grouped(q.float(), kv_heads) * (1.0 / math.sqrt(d))
    kf, vf = k.float().unsqueeze(2), v.float().unsqueeze(2)
    out = torch.zeros_like(qg)
    lse = torch.full(qg.shape[:-1], float("-inf"), device=q.device)
    for qb, kb, masked in _blocks(n_q, k.shape[2], causal, block):
        scores = qg[..., qb, :] @ kf[..., kb, :].transpose(-1, -2)
        if masked:
            scores = _mask(scores, qb, kb)
        block_lse = torch.logsumexp(scores, dim=-1)
        shift = block_lse.masked_fill(torch.isinf(block_lse), 0.0).unsqueeze(-1)
        block_out = torch.exp(scores - shift) @ vf[..., kb, :]
        out[..., qb, :], lse[..., qb] = merge_partial(out[..., qb, :], lse[..., qb], block_out,
                                                      block_lse)
    return out.reshape(b, h, n_q, d), lse.reshape(b, h, n_q)


def blocked_attention_lse_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                                   causal: bool, block: int = KEY_BLOCK,
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attention_lse_backward` in torch ops: probabilities recomputed block by block
    from the final lse, never stored."""
    b, h, n_q, d = q.shape
    kv_heads = k.shape[1]
    scale = 1.0 / math.sqrt(d)
    qg = _grouped(q.float(), kv_heads)
    dog = _grouped(grad_out.float(), kv_heads)
    lse_g = lse.reshape(b, kv_heads, h // kv_heads, n_q, 1)
    delta = (dog * _grouped(out.float(), kv_heads)).sum(-1, keepdim=True)
    kf, vf = k.float().unsqueeze(2), v.float().unsqueeze(2)
    dq = torch.zeros_like(qg)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for qb, kb, masked in _blocks(n_q, k.shape[2], causal, block):
        scores = (qg[..., qb, :] * scale) @ kf[..., kb, :].transpose(-1, -2)
        if masked:
            scores = _mask(scores, qb, kb)
        p = torch.exp(scores - lse_g[..., qb, :])
        dv[:, :, kb] += (p.transpose(-1, -2) @ dog[..., qb, :]).sum(2)
        ds = p * (dog[..., qb, :] @ vf[..., kb, :].transpose(-1, -2) - delta[..., qb, :])
        dq[..., qb, :] += (ds @ kf[..., kb, :]) * scale
        dk[:, :, kb] += (ds.transpose(-1, -2) @ qg[..., qb, :]).sum(2) * scale
    return dq.reshape(b, h, n_q, d), dk, dv


# --------------------------------------------------------------------------- ring


def _pairs(q_chunks: Sequence[int], kv_chunks: Sequence[int]):
    """(query slot, key slot, causal) for every pair a query chunk can see."""
    for qi, a in enumerate(q_chunks):
        for ki, c in enumerate(kv_chunks):
            if c <= a:
                yield qi, ki, c == a


class RingTraffic:
    """What the cp ring carried on this rank, per pass ("fwd", "bwd"): bytes sent to the next
    rank, seconds spent posting the sends/receives and seconds waiting for them. Counted where
    the hops happen so that benchmarks and metrics measure the ring as shipped; ``take()``
    returns the counts and resets them."""

    bytes: dict[str, int] = {"fwd": 0, "bwd": 0}
    post: dict[str, float] = {"fwd": 0.0, "bwd": 0.0}
    wait: dict[str, float] = {"fwd": 0.0, "bwd": 0.0}

    @classmethod
    def take(cls) -> dict[str, dict[str, float]]:
        taken = {"bytes": dict(cls.bytes), "post": dict(cls.post), "wait": dict(cls.wait)}
        cls.bytes = {"fwd": 0, "bwd": 0}
        cls.post = {"fwd": 0.0, "bwd": 0.0}
        cls.wait = {"fwd": 0.0, "bwd": 0.0}
        return taken


class Ring:
    """Passes tensors one hop along the cp ring (rank i -> i+1) without blocking; ``phase``
    names the pass in ``RingTraffic``."""

    def __init__(self, group: dist.ProcessGroup, cp: int, rank: int, phase: str = "fwd") -> None:
        self.group = group
        self.phase = phase
        self.next = dist.get_global_rank(group, (rank + 1) % cp)
        self.prev = dist.get_global_rank(group, (rank - 1) % cp)

    def start(self, tensors: list[torch.Tensor]) -> tuple[list, list[torch.Tensor]]:
        begin = time.perf_counter()
        received = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in received]
        requests = dist.batch_isend_irecv(ops)
        RingTraffic.post[self.phase] += time.perf_counter() - begin
        RingTraffic.bytes[self.phase] += sum(t.numel() * t.element_size() for t in tensors)
        return requests, received

    def finish(self, pending: tuple[list, list[torch.Tensor]]) -> list[torch.Tensor]:
        begin = time.perf_counter()
        requests, received = pending
        for request in requests:
            request.wait()
        RingTraffic.wait[self.phase] += time.perf_counter() - begin
        return received


def chunk_runs(query_chunk: torch.Tensor) -> list[tuple[slice, int]]:
    """Maximal runs of consecutive queries in one memory chunk: (query slice, chunk)."""
    chunks = query_chunk.tolist()
    runs, start = [], 0
    for i in range(1, len(chunks) + 1):
        if i == len(chunks) or chunks[i] != chunks[start]:
            runs.append((slice(start, i), chunks[start]))
            start = i
    return runs


def _memory_block(q: torch.Tensor, mk: torch.Tensor, mv: torch.Tensor,
                  runs: list[tuple[slice, int]], slots: int,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of every query over the memory slots of its chunk (non-causal)."""
    out = q.new_zeros(q.shape, dtype=torch.float32)
    lse = q.new_zeros(q.shape[:-1], dtype=torch.float32)
    for run, c in runs:
        keys = slice(c * slots, (c + 1) * slots)
        out[:, :, run], lse[:, :, run] = attention_lse(q[:, :, run], mk[:, :, keys],
                                                       mv[:, :, keys], causal=False)
    return out, lse


def _memory_block_backward(q: torch.Tensor, mk: torch.Tensor, mv: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                           runs: list[tuple[slice, int]], slots: int,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK_mem, dV_mem (fp32) of the memory block, from the final out and lse."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(mk.shape, dtype=torch.float32, device=mk.device)
    dv = torch.zeros(mv.shape, dtype=torch.float32, device=mv.device)
    for run, c in runs:
        keys = slice(c * slots, (c + 1) * slots)
        g = attention_lse_backward(q[:, :, run], mk[:, :, keys], mv[:, :, keys],
                                   out[:, :, run], lse[:, :, run], grad_out[:, :, run],
                                   causal=False)
        dq[:, :, run] += g[0]
        dk[:, :, keys] += g[1]
        dv[:, :, keys] += g[2]
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mk, mv, group, cp: int, rank: int, runs, slots: int):
        ring = Ring(group, cp, rank, "fwd")
        mine = zigzag_chunks(cp, rank)
        q_parts = q.chunk(2, dim=2)
        outs = [None, None]
        lses = [None, None]
        kv = [k, v]
        memory = None
        for step in range(cp):
            pending = ring.start(kv) if step < cp - 1 else None
            if step == 0 and mk is not None:  # local, overlapping the first hop
                memory = _memory_block(q, mk.to(q.dtype), mv.to(q.dtype), runs, slots)
            owner = (rank - step) % cp
            k_parts, v_parts = kv[0].chunk(2, dim=2), kv[1].chunk(2, dim=2)
            for qi, ki, causal in _pairs(mine, zigzag_chunks(cp, owner)):
                o, lse = attention_lse(q_parts[qi], k_parts[ki], v_parts[ki], causal)
                if outs[qi] is None:
                    outs[qi], lses[qi] = o, lse
                else:
                    outs[qi], lses[qi] = merge_partial(outs[qi], lses[qi], o, lse)
            if pending is not None:
                kv = ring.finish(pending)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        if memory is not None:
            out, lse = merge_partial(out, lse, *memory)
        ctx.save_for_backward(q, k, v, out, lse, mk, mv)
        ctx.group, ctx.cp, ctx.rank, ctx.runs, ctx.slots = group, cp, rank, runs, slots
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mk, mv = ctx.saved_tensors
        cp, rank = ctx.cp, ctx.rank
        ring = Ring(ctx.group, cp, rank, "bwd")
        mine = zigzag_chunks(cp, rank)
        q_parts, out_parts, lse_parts, go_parts = (t.chunk(2, dim=2)
                                                   for t in (q, out, lse, grad_out))
        dq_parts = [torch.zeros_like(p, dtype=torch.float32) for p in q_parts]
        # The next K/V block is in flight while this one is used; the dK/dV accumulators of
        # the block in hand follow it once computed, and after cp hops they are home.
        kv = [k, v]
        grads = [torch.zeros_like(k, dtype=torch.float32),
                 torch.zeros_like(v, dtype=torch.float32)]
        memory_grads = (None, None, None)
        for step in range(cp):
            pending = ring.start(kv) if step < cp - 1 else None
            if step == 0 and mk is not None:
                memory_grads = _memory_block_backward(q, mk.to(q.dtype), mv.to(q.dtype), out,
                                                      lse, grad_out, ctx.runs, ctx.slots)
            owner = (rank - step) % cp
            k_parts, v_parts = kv[0].chunk(2, dim=2), kv[1].chunk(2, dim=2)
            dk_parts, dv_parts = grads[0].chunk(2, dim=2), grads[1].chunk(2, dim=2)
            for qi, ki, causal in _pairs(mine, zigzag_chunks(cp, owner)):
                dq, dk, dv = attention_lse_backward(q_parts[qi], k_parts[ki], v_parts[ki],
                                                    out_parts[qi], lse_parts[qi], go_parts[qi],
                                                    causal)
                dq_parts[qi] += dq
                dk_parts[ki].add_(dk)
                dv_parts[ki].add_(dv)
            grads = ring.finish(ring.start(grads))
            if pending is not None:
                kv = ring.finish(pending)
        dq = torch.cat(dq_parts, dim=2)
        dmk = dmv = None
        if mk is not None:
            dq += memory_grads[0]
            dmk, dmv = memory_grads[1].to(mk.dtype), memory_grads[2].to(mv.dtype)
        return (dq.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), dmk, dmv,
                None, None, None, None, None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   group: dist.ProcessGroup, cp: int, rank: int,
                   memory: MemoryKV | None = None) -> torch.Tensor:
    """Causal attention of this rank's zigzag tokens over the whole sequence.
    q [B, H, 2c, D], k, v [B, KV, 2c, D] hold chunks (rank, 2cp-1-rank) of the sequence.
    ``memory``: explicit memories of this rank's queries (``query_chunk`` [2c], the chunks of
    its zigzag positions), attended as one more non-causal block (module docstring)."""
    if memory is None:
        return _RingAttention.apply(q, k, v, None, None, group, cp, rank, None, 0)
    if memory.query_chunk.dim() != 1:
        raise ValueError("ring attention takes one position per token for all rows "
                         f"(query_chunk [L]), got shape {tuple(memory.query_chunk.shape)}")
    runs = chunk_runs(memory.query_chunk)
    return _RingAttention.apply(q, k, v, memory.k, memory.v, group, cp, rank, runs,
                                memory.slots)


# --------------------------------------------------------------------------- wiring


class RingBackend:
    """The attention backend of every layer under cp > 1 (replaces ``sdpa_attention``):
    causal training attention over the zigzag layout, with explicit memories in memory layers;
    no cache or padding."""

    def __init__(self, state: ParallelState) -> None:
        self.group, self.cp, self.rank = state.cp_group, state.cp, state.cp_rank

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None, memory: MemoryKV | None = None) -> torch.Tensor:
        if mask is not None:
            raise ValueError("ring attention computes causal attention over whole training "
                             "sequences; masks and KV caches need the local backend")
        return ring_attention(q, k, v, self.group, self.cp, self.rank, memory)


@contextmanager
def local_attention(model: torch.nn.Module):
    """Whole sequences on every rank (e.g. evaluating fact questions, whose lengths do not
    follow the zigzag layout): attention backends back to the local one for the duration."""
    layers = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    saved = [m.backend for m in layers]
    for m in layers:
        m.backend = sdpa_attention
    try:
        yield
    finally:
        for m, backend in zip(layers, saved):
            m.backend = backend
