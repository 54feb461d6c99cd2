"""Triton kernels for value tables (DESIGN §3): the weighted bag gather, its sparse backward, and
fused sparse optimizer updates (lazy Adam, the row-wise modes), in the spirit of Meta's Triton
EmbeddingBag and FBGEMM's TBE.

The forward is one pass, as ``embedding_bag`` is. The backward is one pass where the torch path
takes two: a program per distinct id (hits sorted by id, so no atomics) sums its hits' output
gradients into the row gradient and, from the same loads, forms the weight gradients of all its
hits, reading the table row once (``embedding_bag``'s backward reads it once per hit). The
update reads and writes each touched row and its two moments once, in place; the torch path
gathers them into temporaries, updates those in several elementwise passes and scatters them
back. All sums are fp32 whatever the table's dtype.

The torch ops stay the reference and the CPU path. These kernels run when the tensors are on
CUDA and triton imports (:func:`use_triton`); ``MEMTRON_TRITON=0`` in the environment, or
``ENABLED = False`` here, turns them off (to compare, or to rule them out). Under the Triton
interpreter (``TRITON_INTERPRET=1`` set before triton is first imported) they also run on CPU
tensors: that is how they are tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: every caller takes the torch path
    triton = None

ENABLED = os.environ.get("MEMTRON_TRITON", "1") != "0"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
# Widest row the kernels take: the backward and the row-wise update hold whole rows per
# program in registers.
MAX_DIM = 8192
TILE = 4096  # elements a program loads per step (hits x row chunk): enough bytes in flight
UPDATE_TILE = 2048  # elements of rows an optimizer-update program updates
# The gather's (elements a program loads per step, warps a program). ptxas schedules the gather
# so that a thread waits for each 16-byte row load before issuing the next (its SASS, sm_90,
# Triton 3.6), so bytes in flight come from many small resident programs, not deep ones.
# Measured on an H200 (bench/gpu_kernels.py, T=8192 x 128 hits, % of the device copy peak):
# (1024, 4) 99-102% fp32 and 68-97% bf16; (4096, 4) 88-100% fp32, 63-83% bf16; (2048, 8)
# 96-99% fp32, 57-77% bf16.
GATHER_CONFIG: tuple[int, int] = (1024, 4)


@contextlib.contextmanager
def triton_enabled(flag: bool) -> Iterator[None]:
    """Turn the Triton kernels on or off for a block (the ``MEMTRON_TRITON`` switch at run
    time), e.g. to time or check them against the torch path."""
    global ENABLED
    saved, ENABLED = ENABLED, flag
    try:
        yield
    finally:
        ENABLED = saved


def use_triton(rows: torch.Tensor) -> bool:
    """Whether a value-table op over ``rows`` (any [*, d] tensor of the op: the table, the
    output gradient) runs the Triton kernels: on CUDA, or on any device under the interpreter,
    when triton imports, the kernels are enabled and d <= MAX_DIM."""
    return (triton is not None and ENABLED and (rows.is_cuda or INTERPRET)
            and rows.shape[-1] <= MAX_DIM)


def _row_block(dim: int, cap: int) -> int:
    """Columns per program: the largest power of two dividing ``dim`` (no masked lanes) up to
    ``cap``; when that is small (odd widths), the next power of two above ``dim``, masked."""
    exact = dim & -dim
    if exact >= min(cap, 64):
        return min(exact, cap)
    return min(triton.next_power_of_2(dim), cap)


if triton is not None:

    @triton.jit
    def _bag_sum_kernel(out_ptr, table_ptr, ids_ptr, w_ptr, offsets_ptr, n_bags, n_hits, dim,
                        table_stride, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[bag, cols] = sum over the bag's hits i of w[i] * table[ids[i], cols]: one program
        per (bag, column block), BLOCK_H hits loaded at once."""
        bag = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_mask = cols < dim
        start = tl.load(offsets_ptr + bag)
        end = tl.load(offsets_ptr + bag + 1, mask=bag + 1 < n_bags, other=n_hits)
        # per-lane partial sums, reduced over the hit axis once at the end (not every step)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for first in range(start, end, BLOCK_H):
            hits = first + tl.arange(0, BLOCK_H)
            hit_mask = hits < end
            rows = tl.load(ids_ptr + hits, mask=hit_mask, other=0).to(tl.int64)
            w = tl.load(w_ptr + hits, mask=hit_mask, other=0.0).to(tl.float32)
            values = tl.load(table_ptr + rows[:, None] * table_stride + cols[None, :],
                             mask=hit_mask[:, None] & col_mask[None, :], other=0.0)
            acc += values.to(tl.float32) * w[:, None]
        tl.store(out_ptr + bag.to(tl.int64) * dim + cols, tl.sum(acc, axis=0), mask=col_mask)

    @triton.jit
    def _bag_backward_kernel(rows_ptr, grad_w_ptr, grad_ptr, table_ptr, order_ptr, src_ptr,
                             w_ptr, starts_ptr, unique_ptr, n_unique, n_hits, dim, grad_stride,
                             table_stride, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                             WEIGHT_GRAD: tl.constexpr):
        """One program per distinct id u, over its hits j in ``starts[u]:starts[u+1]`` of the
        hits sorted by id (hit ``order[j]``, its bag ``src[j]``, its weight ``w[j]``):
        rows[u] = sum_j w[j] * grad[src[j]] and, with WEIGHT_GRAD,
        grad_w[order[j]] = <grad[src[j]], table[id]>, the table row read once for all hits."""
        u = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < dim
        start = tl.load(starts_ptr + u)
        end = tl.load(starts_ptr + u + 1, mask=u + 1 < n_unique, other=n_hits)
        if WEIGHT_GRAD:
            row = tl.load(unique_ptr + u).to(tl.int64)
            value = tl.load(table_ptr + row * table_stride + cols, mask=col_mask,
                            other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for first in range(start, end, BLOCK_H):
            j = first + tl.arange(0, BLOCK_H)
            hit_mask = j < end
            bag = tl.load(src_ptr + j, mask=hit_mask, other=0).to(tl.int64)
            w = tl.load(w_ptr + j, mask=hit_mask, other=0.0).to(tl.float32)
            grad = tl.load(grad_ptr + bag[:, None] * grad_stride + cols[None, :],
                           mask=hit_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            acc += grad * w[:, None]
            if WEIGHT_GRAD:
                hit = tl.load(order_ptr + j, mask=hit_mask, other=0)
                tl.store(grad_w_ptr + hit, tl.sum(grad * value[None, :], axis=1), mask=hit_mask)
        tl.store(rows_ptr + u.to(tl.int64) * dim + cols, tl.sum(acc, axis=0), mask=col_mask)

    @triton.jit
    def _lerp(start, end, weight, SMALL: tl.constexpr):
        """torch.lerp(start, end, weight) with a scalar weight, op for op: start + weight
        (end - start) for |weight| < 0.5 (SMALL), else end - (end - start) (1 - weight), each
        one fma as torch computes them (CPU: fmadd; CUDA: nvcc's contraction), so that a bf16
        moment rounds as the torch path's does."""
        if SMALL:
            return tl.fma(weight, end - start, start)
        return tl.fma(start - end, 1.0 - weight, end)

    @triton.jit
    def _sparse_adam_kernel(weight_ptr, m_ptr, v_ptr, grad_ptr, ids_ptr, n_rows, dim,
                            weight_stride, decay, neg_step_size, lerp_weight, beta2,
                            one_minus_beta2, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                            SMALL_LERP: tl.constexpr):
        """Lazy Adam(W) on rows ids[r] of (weight, m, v) with grad[r], in place: the arithmetic
        of ``SparseRowOptimizer.step``'s torch path, op for op (torch's lerp, IEEE sqrt and div)."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_mask = r < n_rows
        mask = row_mask[:, None] & (cols < dim)[None, :]
        ids = tl.load(ids_ptr + r, mask=row_mask, other=0).to(tl.int64)
        state = ids[:, None] * dim + cols[None, :]
        at = ids[:, None] * weight_stride + cols[None, :]
        g = tl.load(grad_ptr + r.to(tl.int64)[:, None] * dim + cols[None, :], mask=mask,
                    other=0.0)
        m = tl.load(m_ptr + state, mask=mask, other=0.0)
        v = tl.load(v_ptr + state, mask=mask, other=0.0)
        w = tl.load(weight_ptr + at, mask=mask, other=0.0).to(tl.float32)
        m = _lerp(m, g, lerp_weight, SMALL_LERP)
        v = v * beta2
        v = v + one_minus_beta2 * g * g
        w = w * decay
        w = w + neg_step_size * tl.div_rn(m, tl.sqrt_rn(v) + eps)
        tl.store(m_ptr + state, m, mask=mask)
        tl.store(v_ptr + state, v, mask=mask)
        tl.store(weight_ptr + at, w.to(weight_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["step"])
    def _sparse_rowwise_kernel(weight_ptr, stat_ptr, m_ptr, last_ptr, grad_ptr, ids_ptr, n_rows,
                               dim, weight_stride, step, decay, neg_step_size, lerp_weight, beta2,
                               one_minus_beta2, log2_beta2: tl.float64, eps, MODE: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                               SMALL_LERP: tl.constexpr):
        """A row-wise mode (MODE) on rows ids[r] of weight and their state with grad[r], in
        place: the arithmetic of ``SparseRowOptimizer._update``'s torch path, op for op. A
        program holds whole rows (dim <= MAX_DIM, as the backward does), so the gradient is
        read once for both mean(g^2) and the update, not once per pass of a column loop."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        row_mask = r < n_rows
        mask = row_mask[:, None] & (cols < dim)[None, :]
        ids = tl.load(ids_ptr + r, mask=row_mask, other=0).to(tl.int64)
        g = tl.load(grad_ptr + r.to(tl.int64)[:, None] * dim + cols[None, :], mask=mask,
                    other=0.0)
        # mean(g^2) as the torch path forms it: the row's 2-norm, squared, over d
        norm = tl.sqrt_rn(tl.sum(g * g, axis=1))
        mean_sq = tl.div_rn(norm * norm, tl.cast(dim, tl.float32))
        stat = tl.load(stat_ptr + ids, mask=row_mask, other=0.0)
        direction = g
        if MODE == "rowwise_adagrad":
            stat = stat + mean_sq
        elif MODE == "adam_b1zero_rowwise":
            # beta2^(step - last) in fp64, rounded to fp32 as torch.pow(beta2, missed).float();
            # exp2 of missed x log2(beta2) is within |missed log2(beta2)| 2^-53 of it
            missed = step - tl.load(last_ptr + ids, mask=row_mask, other=0)
            stat = stat * tl.exp2(missed.to(tl.float64) * log2_beta2).to(tl.float32)
            stat = stat + one_minus_beta2 * mean_sq
            tl.store(last_ptr + ids, tl.full([BLOCK_R], step, tl.int64), mask=row_mask)
        else:  # adam_rowwise_v: per-element first moment, fp32 or bf16 storage
            state = ids[:, None] * dim + cols[None, :]
            m = tl.load(m_ptr + state, mask=mask, other=0.0).to(tl.float32)
            direction = _lerp(m, g, lerp_weight, SMALL_LERP)
            tl.store(m_ptr + state, direction.to(m_ptr.dtype.element_ty), mask=mask)
            stat = stat * beta2
            stat = stat + one_minus_beta2 * mean_sq
        tl.store(stat_ptr + ids, stat, mask=row_mask)
        inv_denom = tl.div_rn(1.0, tl.sqrt_rn(stat) + eps)
        at = ids[:, None] * weight_stride + cols[None, :]
        w = tl.load(weight_ptr + at, mask=mask, other=0.0)
        w = w * decay
        w = w + neg_step_size * direction * inv_denom[:, None]
        tl.store(weight_ptr + at, w, mask=mask)


def _check_rows(t: torch.Tensor) -> None:
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"expected rows [N, d] with contiguous rows, got {tuple(t.shape)} "
                         f"strides {t.stride()}")


def bag_gather(table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               offsets: torch.Tensor, config: tuple[int, int] = GATHER_CONFIG) -> torch.Tensor:
    """``out[b] = sum_{i in bag b} weights[i] * table[ids[i]]``, bags starting at ``offsets``
    (the ``embedding_bag`` layout: bag b is hits ``offsets[b]:offsets[b+1]``, the last one runs
    to the end; empty bags give zeros). table [N, d] fp32 or bf16; ids [M] (in range: they
    are not checked), weights [M]; offsets [B] -> [B, d] fp32, summed in fp32. ``config``:
    (elements a program loads per step, warps), see :data:`GATHER_CONFIG`."""
    _check_rows(table)
    n_bags, dim = offsets.numel(), table.shape[1]
    out = torch.empty(n_bags, dim, dtype=torch.float32, device=table.device)
    if n_bags == 0 or dim == 0:
        return out
    block_d = _row_block(dim, 1024 // table.element_size())  # 1 KiB of each row per program
    tile, warps = config
    _bag_sum_kernel[(n_bags, triton.cdiv(dim, block_d))](
        out, table, ids.contiguous(), weights.contiguous(), offsets.contiguous(), n_bags,
        ids.numel(), dim, table.stride(0), BLOCK_H=max(1, tile // block_d), BLOCK_D=block_d,
        num_warps=warps)
    return out


def bag_backward(grad_out: torch.Tensor, table: torch.Tensor, ids: torch.Tensor,
                 weights: torch.Tensor, bags: torch.Tensor, weight_grad: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward of :func:`bag_gather` given ``bags`` [M] (the bag of every hit): (sorted unique
    ids [U], fp32 row gradients [U, d] = sum over each id's hits of weights[i] *
    grad_out[bags[i]], fp32 weight gradients [M] = <grad_out[bags[i]], table[ids[i]]> if
    ``weight_grad`` else None). The same triple :func:`values.sum_rows_by_id` and
    ``embedding_bag``'s per-sample-weight backward give."""
    _check_rows(grad_out)
    _check_rows(table)
    n_hits, dim = ids.numel(), table.shape[1]
    grad_w = torch.empty(n_hits, dtype=torch.float32, device=grad_out.device)
    sorted_ids, order = torch.sort(ids.reshape(-1))
    unique_ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    rows = torch.empty(unique_ids.numel(), dim, dtype=torch.float32, device=grad_out.device)
    if n_hits and dim:
        starts = torch.cumsum(counts, 0) - counts
        block_d = triton.next_power_of_2(dim)
        # each hit's bag and weight in id order, so that a program's loads do not chain
        # through ``order`` (one dependent global load less per program)
        _bag_backward_kernel[(unique_ids.numel(),)](
            rows, grad_w, grad_out, table, order, bags.reshape(-1)[order],
            weights.reshape(-1)[order], starts, unique_ids, unique_ids.numel(), n_hits, dim,
            grad_out.stride(0), table.stride(0), BLOCK_H=max(1, TILE // block_d),
            BLOCK_D=block_d, WEIGHT_GRAD=weight_grad, num_warps=4 if block_d <= 2048 else 8)
    return unique_ids, rows, grad_w if weight_grad else None


def sparse_adam_(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 ids: torch.Tensor, grad: torch.Tensor, *, betas: tuple[float, float],
                 eps: float, step_size: float, decay: float) -> None:
    """Lazy Adam(W) on rows ``ids`` (unique: two programs must never own one row) of ``weight``
    [N, d] (fp32 or bf16) and its fp32 moments [N, d], with fp32 row gradients ``grad`` [U, d];
    in place, one read and one write of each. The caller's scalars, as ``SparseRowOptimizer`` forms
    them: ``step_size`` = lr * sqrt(1 - beta2^t) / (1 - beta1^t), ``decay`` = 1 - lr * wd."""
    _check_rows(weight)
    if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError("Adam moments must be contiguous [N, d] tensors")
    n_rows, dim = ids.numel(), weight.shape[1]
    if n_rows == 0 or dim == 0:
        return
    beta1, beta2 = betas
    block_d = _row_block(dim, 1024)
    block_r = max(1, UPDATE_TILE // block_d)
    _sparse_adam_kernel[(triton.cdiv(n_rows, block_r), triton.cdiv(dim, block_d))](
        weight, exp_avg, exp_avg_sq, grad.contiguous(), ids.contiguous(), n_rows, dim,
        weight.stride(0), float(decay), -float(step_size), float(1 - beta1), float(beta2),
        float(1 - beta2), float(eps), BLOCK_R=block_r, BLOCK_D=block_d,
        SMALL_LERP=abs(1 - beta1) < 0.5, num_warps=4)


def sparse_rowwise_(weight: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor, *, mode: str,
                    row_state: torch.Tensor, exp_avg: torch.Tensor | None = None,
                    last_step: torch.Tensor | None = None, step: int,
                    betas: tuple[float, float], eps: float, step_size: float,
                    decay: float) -> None:
    """One step of a row-wise ``mode`` of ``SparseRowOptimizer`` (``adam_rowwise_v``,
    ``rowwise_adagrad``, ``adam_b1zero_rowwise``) on rows ``ids`` (unique) of the fp32
    ``weight`` [N, d] with fp32 row gradients ``grad`` [U, d], in place: one read and one write
    of each row, its per-row statistic ``row_state`` [N] (fp32 exp_avg_sq or sum_sq), and per
    mode its first moment ``exp_avg`` [N, d] (fp32 or bf16; ``adam_rowwise_v``) or its
    ``last_step`` [N] (int64; ``adam_b1zero_rowwise``, set to ``step``). The caller's scalars,
    as ``SparseRowOptimizer`` forms them: ``step`` its step count t, ``step_size`` the mode's
    (lr, times its bias corrections), ``decay`` = 1 - lr * wd."""
    _check_rows(weight)
    if weight.dtype != torch.float32:
        raise ValueError(f"the row-wise update takes fp32 tables, got {weight.dtype}")
    if mode not in ("adam_rowwise_v", "rowwise_adagrad", "adam_b1zero_rowwise") \
            or (mode == "adam_rowwise_v") != (exp_avg is not None) \
            or (mode == "adam_b1zero_rowwise") != (last_step is not None):
        raise ValueError(f"row-wise mode {mode!r} with exp_avg {exp_avg is not None}, "
                         f"last_step {last_step is not None}")
    if not all(t is None or t.is_contiguous() for t in (row_state, exp_avg, last_step)):
        raise ValueError("row-wise optimizer state must be contiguous")
    n_rows, dim = ids.numel(), weight.shape[1]
    if n_rows == 0 or dim == 0:
        return
    beta1, beta2 = betas
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, UPDATE_TILE // block_d)
    _sparse_rowwise_kernel[(triton.cdiv(n_rows, block_r),)](
        weight, row_state, exp_avg, last_step, grad.contiguous(), ids.contiguous(), n_rows, dim,
        weight.stride(0), step, float(decay), -float(step_size), float(1 - beta1),
        float(beta2), float(1 - beta2), math.log2(beta2) if beta2 > 0 else -math.inf,
        float(eps), MODE=mode, BLOCK_R=block_r, BLOCK_D=block_d,
        SMALL_LERP=abs(1 - beta1) < 0.5, num_warps=4 if block_d <= 2048 else 8)
