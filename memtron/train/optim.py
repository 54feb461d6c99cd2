"""Optimizers: AdamW for dense parameters, a sparse row-wise Adam for value tables, the schedule.

Sparse row-wise Adam semantics (lazy Adam, the arithmetic of ``torch.optim.SparseAdam``):
only rows with a gradient this step move, and only their moments decay; the step count ``t``
counts optimizer steps (the same on every rank holding a shard of the table, whether or not
its rows were touched, so a sharded table behaves as the whole one and checkpoints it once);
``row -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``. Decoupled weight decay
(``row *= 1 - lr * wd``) applies to touched rows only, so an untouched row never changes.
Moments are fp32 whatever the table's dtype. On CUDA the row update is one fused Triton
kernel (``model.memory.kernels.sparse_adam_``) with the same arithmetic, op for op.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from memtron.config import OptimConfig
from memtron.model.memory import kernels
from memtron.model.memory.values import ValueTable
from memtron.parallel.launch import collective_device


class SparseRowAdam:
    """Lazy Adam(W) over the rows each table reports in :meth:`ValueTable.sparse_grad`."""

    def __init__(self, tables: dict[str, ValueTable], lr: float, betas: tuple[float, float],
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.tables = tables
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        for name, table in tables.items():
            weight = table.weight
            self.state[name] = {
                "step": torch.zeros((), dtype=torch.int64),
                "exp_avg": torch.zeros(weight.shape, dtype=torch.float32, device=weight.device),
                "exp_avg_sq": torch.zeros(weight.shape, dtype=torch.float32,
                                          device=weight.device),
            }

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for name, table in self.tables.items():
            state = self.state[name]
            state["step"] += 1
            grad = table.sparse_grad()
            if grad is None:
                continue
            ids, rows = grad
            t = int(state["step"])
            step_size = self.lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
            if kernels.use_triton(table.weight):  # one fused pass over rows and moments
                kernels.sparse_adam_(table.weight.detach(), state["exp_avg"],
                                     state["exp_avg_sq"], ids, rows, betas=self.betas,
                                     eps=self.eps, step_size=step_size,
                                     decay=1 - self.lr * self.weight_decay)
                continue
            exp_avg = state["exp_avg"].index_select(0, ids).lerp_(rows, 1 - beta1)
            exp_avg_sq = state["exp_avg_sq"].index_select(0, ids).mul_(beta2)
            exp_avg_sq.addcmul_(rows, rows, value=1 - beta2)
            state["exp_avg"].index_copy_(0, ids, exp_avg)
            state["exp_avg_sq"].index_copy_(0, ids, exp_avg_sq)
            weight = table.weight
            new_rows = weight.index_select(0, ids).float()
            if self.weight_decay:
                new_rows.mul_(1 - self.lr * self.weight_decay)
            new_rows.addcdiv_(exp_avg, exp_avg_sq.sqrt_().add_(self.eps), value=-step_size)
            weight.index_copy_(0, ids, new_rows.to(weight.dtype))

    def zero_grad(self) -> None:
        for table in self.tables.values():
            table.zero_grad_rows()

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.state


def clip_sparse_grad_norm(tables: Iterable[ValueTable], max_norm: float,
                          group: dist.ProcessGroup | None = None) -> float:
    """Clip the global norm of the tables' row gradients (as if they were dense); returns it.
    ``group``: the ranks holding other shards of the tables, whose squares add up. A non-finite
    norm leaves the rows as they are, for the caller to report and skip."""
    grads = [g for g in (t.sparse_grad() for t in tables) if g is not None]
    squares = torch.tensor(sum(float(torch.linalg.vector_norm(rows)) ** 2 for _, rows in grads),
                           dtype=torch.float64,  # no fp64 copy of the rows
                           device=collective_device(group))
    if group is not None:
        dist.all_reduce(squares, group=group)
    total = math.sqrt(float(squares))
    if max_norm > 0 and math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for _, rows in grads:
            rows.mul_(scale)
    return total


def dense_param_groups(model: nn.Module, tables: Iterable[ValueTable],
                       weight_decay: float) -> list[dict]:
    """Every trainable parameter but the value tables. Matrices decay; norms, biases and
    product sub-keys (a search index) do not."""
    sparse = {id(t.weight) for t in tables}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in sparse:
            continue
        (decay if param.ndim >= 2 and not name.endswith("keys") else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizers(model: nn.Module, tables: dict[str, ValueTable],
                     cfg: OptimConfig) -> tuple[torch.optim.AdamW, SparseRowAdam]:
    groups = dense_param_groups(model, tables.values(), cfg.weight_decay)
    dense = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                              foreach=False)
    sparse = SparseRowAdam(tables, lr=cfg.lr * cfg.memory_lr_mult, betas=(cfg.beta1, cfg.beta2),
                           eps=cfg.eps, weight_decay=cfg.memory_weight_decay)
    return dense, sparse


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, cosine decay to ``lr * min_lr_ratio``.
    ``step`` counts from 1 (the step about to be taken)."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(dense: torch.optim.Optimizer, sparse: SparseRowAdam, lr: float,
           memory_lr_mult: float) -> None:
    for group in dense.param_groups:
        group["lr"] = lr
    sparse.lr = lr * memory_lr_mult
