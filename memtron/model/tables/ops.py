"""The table kernels as ``torch.library`` custom ops: gather, backward, fused update (DESIGN §4).

Each op has a reference implementation in torch ops (any device; the definition of what it
computes) and a kernel per device type, which the dispatcher picks from the tensors' device:

* ``cpu``: the C++ extension (``cpu_kernels``: a one-pass backward into the table's reused
  arena, the update in one pass over each row and its state). The gather is the reference's
  ``embedding_bag`` (nothing faster found on CPU).
* ``cuda``: the Triton kernels (``kernels``: a one-pass gather and backward, fused updates).

A device kernel falls back to the reference where its library cannot serve the call: the
extension did not build (or ``MEMTRON_CPU_EXT=0``), triton is missing or switched off
(``MEMTRON_TRITON=0``, ``kernels.triton_enabled``), a row wider than the Triton kernels take, a
bf16 table or per-row decay in the Triton update (stochastic rounding runs in torch there).
Under the Triton interpreter (``TRITON_INTERPRET=1``) the Triton kernels are the CPU kernels:
that is how they are tested without a GPU.

Ops (namespace ``memtron``):

* ``bag_gather(table, ids, weights, offsets) -> out [B, d]`` in the weights' dtype, summed in
  fp32 (Triton) or in the table's dtype (``embedding_bag``);
* ``bag_backward(grad_out, table, ids, weights, offsets, weight_grad, arena) -> (unique ids
  [U], row gradients, weight gradients [M] or [0])``: the row gradients are fp32 [U, d], or
  [0, d] when they were written into the first U rows of ``arena`` (an op may not return a
  view of its input: :func:`bag_backward` hands back the rows either way);
* ``sparse_update(optimizer, weight, ids, grad, exp_avg, second, last_step, row_decay, decay,
  beta1, beta2, eps, step_size, step, round_keys, col_start)``: one step of the sparse row
  optimizer's mode ``optimizer`` on rows ``ids``, in place (``train.optim`` forms the
  scalars).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import custom_op

from memtron.model.memory import counter_rng, cpu_kernels, kernels
from memtron.model.tables.grad import bag_index, sum_rows_by_id

ROWWISE_MODES = ("adam_rowwise_v", "rowwise_adagrad", "adam_b1zero_rowwise")
# Elements of the fp32 [hits, dim] temporaries of one chunk of _weight_grad_by_chunks (64 MiB).
WEIGHT_GRAD_CHUNK = 1 << 24
# Device types whose kernels are the Triton ones: CUDA, and CPU under the interpreter.
TRITON_DEVICES = ("cuda", "cpu") if kernels.INTERPRET else ("cuda",)

# -- gather ---------------------------------------------------------------------------------


def _reference_gather(table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                      offsets: torch.Tensor) -> torch.Tensor:
    out = F.embedding_bag(ids, table, offsets, per_sample_weights=weights.to(table.dtype),
                          mode="sum")
    return out.to(weights.dtype)


bag_gather = custom_op("memtron::bag_gather", _reference_gather, mutates_args=())


@bag_gather.register_fake
def _(table, ids, weights, offsets):
    return table.new_empty(offsets.shape[0], table.shape[1], dtype=weights.dtype)


def _triton_gather(table, ids, weights, offsets):
    if not kernels.use_triton(table):
        return _reference_gather(table, ids, weights, offsets)
    return kernels.bag_gather(table, ids, weights, offsets).to(weights.dtype)


# -- backward -------------------------------------------------------------------------------


def _bag_weight_grad_supported(table: torch.Tensor) -> bool:
    """Whether embedding_bag's per-sample-weight backward takes this table: its CUDA kernel
    (``_embedding_bag_per_sample_weights_backward_cuda``) has no bf16 version."""
    return table.device.type == "cpu" or table.dtype != torch.bfloat16


def _weight_grad_by_chunks(grad_out: torch.Tensor, table: torch.Tensor, ids: torch.Tensor,
                           bags: torch.Tensor) -> torch.Tensor:
    """grad_w[i] = <grad_out[bags[i]], table[ids[i]]> in fp32, in chunks of hits whose
    gathered rows stay within WEIGHT_GRAD_CHUNK elements (never a whole [hits, dim] copy): the
    reference's weight gradient where embedding_bag's own backward lacks the table dtype."""
    n = ids.numel()
    grad_w = torch.empty(n, dtype=torch.float32, device=grad_out.device)
    step = max(1, WEIGHT_GRAD_CHUNK // max(1, table.shape[1]))
    for start in range(0, n, step):
        end = min(start + step, n)
        rows = table[ids[start:end]].float()
        grad_w[start:end] = rows.mul_(grad_out[bags[start:end]]).sum(1)
    return grad_w


def _reference_backward(grad_out: torch.Tensor, table: torch.Tensor, ids: torch.Tensor,
                        weights: torch.Tensor, offsets: torch.Tensor, weight_grad: bool,
                        arena: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two passes: the weight gradients by ``embedding_bag``'s own per-sample-weight backward
    (a fused gather + dot, ~6x faster than gathering rows), the row gradients by
    :func:`sum_rows_by_id`."""
    bags = bag_index(offsets, ids.numel())
    grad_w = grad_out.new_empty(0, dtype=torch.float32)
    if weight_grad and not _bag_weight_grad_supported(table):
        grad_w = _weight_grad_by_chunks(grad_out, table, ids, bags)
    elif weight_grad:  # what autograd through embedding_bag calls, with no dense table grad
        grad_w = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad_out.to(table.dtype), table, ids, offsets, bags, 0).float()  # 0: mode sum
    unique, rows = sum_rows_by_id(ids, grad_out.float(), weights, src=bags)
    return unique, rows, grad_w


_bag_backward = custom_op("memtron::bag_backward", _reference_backward, mutates_args=("arena",))


@_bag_backward.register_fake
def _(grad_out, table, ids, weights, offsets, weight_grad, arena):
    ctx = torch.library.get_ctx()
    unique = ids.new_empty(ctx.new_dynamic_size())
    rows = grad_out.new_empty(ctx.new_dynamic_size(), table.shape[1], dtype=torch.float32)
    grad_w = grad_out.new_empty(ids.shape[0] if weight_grad else 0, dtype=torch.float32)
    return unique, rows, grad_w


def _cpu_backward(grad_out, table, ids, weights, offsets, weight_grad, arena):
    if not (ids.numel() and cpu_kernels.available(grad_out)):  # no hit: views of the inputs
        return _reference_backward(grad_out, table, ids, weights, offsets, weight_grad, arena)
    unique, rows, grad_w = cpu_kernels.bag_backward(grad_out, table, ids, weights, offsets,
                                                    weight_grad, arena)
    if arena.numel() and rows.data_ptr() == arena.data_ptr():
        rows = rows.new_empty(0, rows.shape[1])  # they are arena[:U]
    return unique, rows, grad_out.new_empty(0) if grad_w is None else grad_w


def _triton_backward(grad_out, table, ids, weights, offsets, weight_grad, arena):
    if not kernels.use_triton(grad_out):
        return _reference_backward(grad_out, table, ids, weights, offsets, weight_grad, arena)
    unique, rows, grad_w = kernels.bag_backward(grad_out, table, ids, weights,
                                                bag_index(offsets, ids.numel()), weight_grad)
    return unique, rows, grad_out.new_empty(0) if grad_w is None else grad_w


def bag_backward(grad_out: torch.Tensor, table: torch.Tensor, ids: torch.Tensor,
                 weights: torch.Tensor, offsets: torch.Tensor, weight_grad: bool,
                 arena: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The backward of :func:`bag_gather` (``memtron::bag_backward``): (sorted unique ids [U],
    fp32 row gradients [U, d], fp32 weight gradients [M] or None). The row gradients are the
    first U rows of ``arena`` (fp32 [R, d], on grad_out's device) where a kernel wrote them
    there."""
    unique, rows, grad_w = _bag_backward(grad_out.contiguous(), table, ids, weights, offsets,
                                         weight_grad, arena)
    if rows.shape[0] != unique.shape[0]:
        rows = arena[: unique.shape[0]]
    return unique, rows, grad_w if weight_grad else None


# -- fused update ---------------------------------------------------------------------------


def _reference_update(optimizer: str, weight: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor,
                      exp_avg: torch.Tensor | None, second: torch.Tensor,
                      last_step: torch.Tensor | None, row_decay: torch.Tensor | None,
                      decay: float, beta1: float, beta2: float, eps: float, step_size: float,
                      step: int, round_keys: torch.Tensor | None, col_start: int) -> None:
    """The arithmetic of ``train.optim``'s mode ``optimizer`` in torch ops (gathered rows and
    state, elementwise passes, scattered back); a bf16 table rounds stochastically with
    ``round_keys`` (``counter_rng``), so the bits are those of the C++ update."""
    if optimizer in ROWWISE_MODES:  # mean(g^2) per row, with no [U, d] temporary
        mean_sq = torch.linalg.vector_norm(grad, dim=1).square_().div_(grad.shape[1])
    direction = grad
    if optimizer == "rowwise_adagrad":
        denom = second.index_select(0, ids).add_(mean_sq)
        second.index_copy_(0, ids, denom)
    elif optimizer == "adam_b1zero_rowwise":
        missed = (step - last_step.index_select(0, ids)).double()
        denom = second.index_select(0, ids)
        denom.mul_(torch.pow(beta2, missed).float()).add_(mean_sq, alpha=1 - beta2)
        second.index_copy_(0, ids, denom)
        last_step.index_fill_(0, ids, step)
    else:  # adam, adam_rowwise_v
        direction = exp_avg.index_select(0, ids).float().lerp_(grad, 1 - beta1)
        exp_avg.index_copy_(0, ids, direction.to(exp_avg.dtype))
        denom = second.index_select(0, ids).mul_(beta2)
        if optimizer == "adam":
            denom.addcmul_(grad, grad, value=1 - beta2)
        else:
            denom.add_(mean_sq, alpha=1 - beta2)
        second.index_copy_(0, ids, denom)
    denom.sqrt_().add_(eps)
    new_rows = weight.index_select(0, ids).float()
    if row_decay is not None:
        new_rows.mul_(row_decay.unsqueeze(1))
    elif decay != 1.0:
        new_rows.mul_(decay)
    if denom.dim() == 1:  # one denominator per row
        new_rows.addcmul_(direction, denom.reciprocal_().unsqueeze(1), value=-step_size)
    else:
        new_rows.addcdiv_(direction, denom, value=-step_size)
    if weight.dtype == torch.bfloat16:
        new_rows = counter_rng.stochastic_round_bf16(new_rows, round_keys, col_start)
    weight.index_copy_(0, ids, new_rows.to(weight.dtype))


sparse_update = custom_op("memtron::sparse_update", _reference_update,
                          mutates_args=("weight", "exp_avg", "second", "last_step"))


def _cpu_update(optimizer, weight, ids, grad, exp_avg, second, last_step, row_decay, decay,
                beta1, beta2, eps, step_size, step, round_keys, col_start):
    if not (cpu_kernels.available(weight) and weight.is_contiguous()):
        _reference_update(optimizer, weight, ids, grad, exp_avg, second, last_step, row_decay,
                          decay, beta1, beta2, eps, step_size, step, round_keys, col_start)
        return
    cpu_kernels.sparse_update(optimizer, weight, ids, grad, exp_avg, second, last_step,
                              decay=decay if row_decay is None else row_decay,
                              betas=(beta1, beta2), eps=eps, step_size=step_size, step=step,
                              round_keys=round_keys, col_start=col_start)


def _triton_update(optimizer, weight, ids, grad, exp_avg, second, last_step, row_decay, decay,
                   beta1, beta2, eps, step_size, step, round_keys, col_start):
    if not (weight.dtype == torch.float32 and row_decay is None and kernels.use_triton(weight)):
        _reference_update(optimizer, weight, ids, grad, exp_avg, second, last_step, row_decay,
                          decay, beta1, beta2, eps, step_size, step, round_keys, col_start)
    elif optimizer == "adam":
        kernels.sparse_adam_(weight, exp_avg, second, ids, grad, betas=(beta1, beta2), eps=eps,
                             decay=decay, step_size=step_size)
    else:
        kernels.sparse_rowwise_(weight, ids, grad, mode=optimizer, row_state=second,
                                exp_avg=exp_avg if optimizer == "adam_rowwise_v" else None,
                                last_step=last_step, step=step, betas=(beta1, beta2), eps=eps,
                                step_size=step_size, decay=decay)


# -- registration: the kernel of each device type --------------------------------------------

_bag_backward.register_kernel("cpu", _cpu_backward)
sparse_update.register_kernel("cpu", _cpu_update)
if kernels.triton is not None:
    for _device in TRITON_DEVICES:
        bag_gather.register_kernel(_device, _triton_gather)
        _bag_backward.register_kernel(_device, _triton_backward)
        sparse_update.register_kernel(_device, _triton_update)
