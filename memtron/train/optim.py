"""Optimizers: AdamW for dense parameters, a sparse row optimizer for value tables, the schedule.

Value tables train with :class:`SparseRowOptimizer`, in one of these modes (``MEMORY_OPTIMIZERS``,
config ``optim.memory_optimizer``). ``g`` is a row's gradient this step, ``mean(g^2)`` the mean of
its squares over the row (FBGEMM's row-wise statistic), ``t`` the optimizer step count (the same
on every rank holding a shard, whether or not its rows were touched, so a sharded table behaves
as the whole one):

* ``adam``: lazy Adam, the arithmetic of ``torch.optim.SparseAdam``: per-element m and v; only
  touched rows move and only their moments decay;
  ``row -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``.
* ``adam_rowwise_v``: the same with one v per row, ``v = b2 v + (1 - b2) mean(g^2)`` (FBGEMM's
  partial row-wise Adam); lazy like ``adam``.
* ``rowwise_adagrad``: one accumulator per row, ``s += mean(g^2)``,
  ``row -= lr * g / (sqrt(s) + eps)``. An untouched row's step would be zero, so the lazy update
  is the dense one.
* ``adam_b1zero_rowwise``: Adam with b1 = 0 and one v per row (modded-nanogpt's n-gram
  table). A per-row last-step counter replays the decay of the steps a row missed,
  ``v = b2^(t - last) v + (1 - b2) mean(g^2)``, so it equals dense per-step Adam exactly;
  ``row -= lr * sqrt(1 - b2^t) * g / (sqrt(v) + eps)``.

Decoupled weight decay (``wd``, config ``optim.memory_weight_decay``) comes in two modes
(``DECAY_MODES``, config ``optim.memory_weight_decay_mode``):

* ``touched``: ``row *= 1 - lr_t * wd`` on the steps a row is touched, so an untouched row never
  changes (a row's decay depends on how often it is read).
* ``global``: every row decays every step, as a dense AdamW's would, at no dense cost (FBGEMM's
  "global weight decay", here exact under any LR schedule). A global clock
  ``C_t = sum_{s<=t} log(1 - lr_s * wd)`` (fp64) and a per-row clock (fp64, the clock the
  stored row has been decayed up to; state ``row_decay_clock``, sharded and checkpointed with
  the rows) say what a row owes: when a row is touched at step t it is multiplied by
  ``exp(C_t - row_clock)`` (the missed steps' decay and step t's), then updated, and its clock
  set to ``C_t``. Lookups read rows times ``exp(C_{t-1} - row_clock)`` (``LazyDecay``), so
  forward, gradients and updates equal those of per-step decay of every row. Checkpoints hold
  the rows as stored, with both clocks, so a run resumes bit for bit wherever it was saved;
  readers of a checkpoint (``CheckpointReader``, exports, ``load_model``) apply the decay
  owed. :meth:`SparseRowOptimizer.catch_up_decay` writes the owed decay into every row.

All state is fp32 except, optionally, the first moment (``moment_dtype``), and the fp64 decay
clocks; per-row state is [N], sharded on dim 0 with the rows.
Every mode's update is the custom op ``memtron::sparse_update`` (``model.tables.ops``): the
C++ extension on CPU, one fused Triton kernel on CUDA for fp32 tables and ``touched`` decay,
the torch reference elsewhere (bf16 tables on CUDA, ``global`` decay: a decay per row), with
the same arithmetic, op for op.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from memtron.config import MemoryDecayMode, MemoryOptimizer, OptimConfig
from memtron.model.tables import (
    STORAGE_DTYPES,
    LazyDecay,
    ValueTable,
    ops,
    rounding_keys,
    store_rows,
)
from memtron.parallel.launch import collective_device

MEMORY_OPTIMIZERS: tuple[str, ...] = typing.get_args(MemoryOptimizer)
DECAY_MODES: tuple[str, ...] = typing.get_args(MemoryDecayMode)
# Rows per chunk of SparseRowOptimizer.catch_up_decay (bounds its fp32 temporaries).
CATCH_UP_ROWS = 1 << 16
# Modes whose state holds per-row statistics of whole rows (not of column shards).
ROWWISE_MODES = ops.ROWWISE_MODES


def _row_state(mode: str, weight: torch.Tensor, moment_dtype: torch.dtype,
               decay_mode: str = "touched") -> dict[str, torch.Tensor]:
    """Zeroed optimizer state of ``mode`` for one table (or shard) ``weight`` [N, d]."""
    n, device = weight.shape[0], weight.device
    state = {"step": torch.zeros((), dtype=torch.int64)}
    if mode in ("adam", "adam_rowwise_v"):
        state["exp_avg"] = torch.zeros(weight.shape, dtype=moment_dtype, device=device)
    if mode == "adam":
        state["exp_avg_sq"] = torch.zeros(weight.shape, dtype=torch.float32, device=device)
    elif mode in ("adam_rowwise_v", "adam_b1zero_rowwise"):
        state["exp_avg_sq"] = torch.zeros(n, dtype=torch.float32, device=device)
    else:
        state["sum_sq"] = torch.zeros(n, dtype=torch.float32, device=device)
    if mode == "adam_b1zero_rowwise":
        state["last_step"] = torch.zeros(n, dtype=torch.int64, device=device)
    if decay_mode == "global":
        state["decay_clock"] = torch.zeros((), dtype=torch.float64)
        state["row_decay_clock"] = torch.zeros(n, dtype=torch.float64, device=device)
    return state


class SparseRowOptimizer:
    """Updates the rows of each table's :class:`~memtron.model.tables.SparseGrad`, in one of
    ``MEMORY_OPTIMIZERS`` (module docstring): the table spec's ``optimizer`` or ``mode``, at
    ``lr`` and ``weight_decay`` times the spec's multipliers (and ``lr_scale``, per name)."""

    def __init__(self, tables: dict[str, ValueTable], lr: float, betas: tuple[float, float],
                 eps: float = 1e-8, weight_decay: float = 0.0, mode: str = "adam",
                 moment_dtype: torch.dtype = torch.float32,
                 lr_scale: dict[str, float] | None = None, decay_mode: str = "touched") -> None:
        self.modes = {name: table.spec.optimizer or mode for name, table in tables.items()}
        for chosen in {mode, *self.modes.values()}:
            if chosen not in MEMORY_OPTIMIZERS:
                raise ValueError(f"memory optimizer {chosen!r} is not one of "
                                 f"{MEMORY_OPTIMIZERS}")
        if decay_mode not in DECAY_MODES:
            raise ValueError(f"weight decay mode {decay_mode!r} is not one of {DECAY_MODES}")
        self.tables, self.mode, self.decay_mode = tables, mode, decay_mode
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.lr_scale = dict(lr_scale or {})  # per table: its lr is lr * scale (default 1)
        self.state = {name: _row_state(self.modes[name], table.weight, moment_dtype, decay_mode)
                      for name, table in tables.items()}
        if decay_mode == "global" and weight_decay:  # lookups read rows with the decay owed
            for name, table in tables.items():
                if table.spec.wd_mult:
                    table.lazy_decay = LazyDecay(self.state[name]["row_decay_clock"],
                                             self.state[name]["decay_clock"])

    @torch.no_grad()
    def step(self) -> None:
        for name, table in self.tables.items():
            state = self.state[name]
            state["step"] += 1
            lr = self.lr * self.lr_scale.get(name, 1.0) * table.spec.lr_mult
            wd = self.weight_decay * table.spec.wd_mult
            if self.decay_mode == "global" and wd:  # every row decays
                state["decay_clock"] += self._log_decay(lr, wd)
            grad = table.sparse_grad()
            if grad is not None:
                self._update(table, state, *grad, lr, wd, self.modes[name])

    @staticmethod
    def _log_decay(lr: float, wd: float) -> float:
        """log(1 - lr * wd): this step's decay of every row of a table, on its clock."""
        if 1 - lr * wd <= 0:
            raise ValueError(f"memory lr {lr} x weight decay {wd} >= 1: "
                             "decoupled weight decay would flip or zero every row")
        return math.log1p(-lr * wd)

    @torch.no_grad()
    def catch_up_decay(self) -> None:
        """Write the decay every row owes (``global`` mode) into the rows, so the stored table
        is the one per-step decay of every row gives; a no-op in ``touched`` mode. The rows'
        values do not change for lookups (they read rows with the decay owed)."""
        if self.decay_mode != "global" or not self.weight_decay:
            return
        for name, table in self.tables.items():
            if table.lazy_decay is None:  # a table that does not decay
                continue
            state = self.state[name]
            row_clock, clock = state["row_decay_clock"], state["decay_clock"]
            owing = torch.nonzero(row_clock != clock.to(row_clock.device)).view(-1)
            for ids in owing.split(CATCH_UP_ROWS):
                rows = table.weight.detach().index_select(0, ids).float()
                rows.mul_(table.lazy_decay.factors(ids).unsqueeze(1))
                store_rows(table, ids, rows, int(state["step"]))
                row_clock.index_fill_(0, ids, float(clock))

    def _step_size(self, lr: float, t: int, mode: str) -> float:
        """``mode``'s step size at step ``t``: ``lr`` times its bias corrections."""
        beta1, beta2 = self.betas
        if mode == "rowwise_adagrad":
            return lr
        if mode == "adam_b1zero_rowwise":
            return lr * math.sqrt(1 - beta2**t)
        return lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)

    def _update(self, table: ValueTable, state: dict[str, torch.Tensor], ids: torch.Tensor,
                grad: torch.Tensor, lr: float, wd: float, mode: str) -> None:
        """One step of ``mode`` at ``lr`` and weight decay ``wd`` on rows ``ids`` (unique) of
        ``table`` with fp32 ``grad``."""
        weight = table.weight.detach()
        t = int(state["step"])
        row_decay = None
        if self.decay_mode == "global" and wd:
            # The decay the rows owe for the steps they missed, times this step's.
            row_decay = table.lazy_decay.factors(ids)
            state["row_decay_clock"].index_fill_(0, ids, float(state["decay_clock"]))
        keys = rounding_keys(table, ids, t) if weight.dtype == torch.bfloat16 else None
        ops.sparse_update(mode, weight, ids, grad, state.get("exp_avg"),
                          state["sum_sq" if mode == "rowwise_adagrad" else "exp_avg_sq"],
                          state.get("last_step"), row_decay, 1 - lr * wd, *self.betas, self.eps,
                          self._step_size(lr, t, mode), t, keys, table.col_start)

    def zero_grad(self) -> None:
        for table in self.tables.values():
            table.zero_grad_rows()

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.state

    def bytes_per_parameter(self) -> dict[str, float]:
        """Per table: bytes of the table plus its optimizer state, per table parameter."""
        out = {}
        for name, table in self.tables.items():
            weight = table.weight
            stored = sum(t.numel() * t.element_size() for t in self.state[name].values()
                         if t.dim())
            out[name] = (weight.numel() * weight.element_size() + stored) / max(1, weight.numel())
        return out


def clip_scale(total: float, max_norm: float) -> float | None:
    """The factor that brings a gradient of global norm ``total`` down to ``max_norm``, or None
    when no clipping applies (off, within the bound, or a non-finite norm, which the caller
    reports and skips)."""
    if max_norm > 0 and math.isfinite(total) and total > max_norm:
        return max_norm / (total + 1e-6)
    return None


def scale_sparse_grads(tables: Iterable[ValueTable], scale: float) -> None:
    """Multiply the tables' row gradients by ``scale`` (a global-norm clip)."""
    for grad in (t.sparse_grad() for t in tables):
        if grad is not None:
            grad[1].mul_(scale)


def clip_sparse_grad_norm(tables: Iterable[ValueTable], max_norm: float,
                          group: dist.ProcessGroup | None = None) -> float:
    """Clip the global norm of the tables' row gradients (as if they were dense); returns it.
    ``group``: the ranks holding other shards of the tables, whose squares add up. A non-finite
    norm leaves the rows as they are, for the caller to report and skip. (The trainer folds
    the same sum into its step's control collective instead.)"""
    tables = list(tables)
    norms = [torch.linalg.vector_norm(g[1]) for g in (t.sparse_grad() for t in tables)
             if g is not None]
    squares = torch.zeros((), dtype=torch.float64, device=collective_device(group))
    if norms:  # fp64 squares of fp32 norms: no fp64 copy of the rows
        squares += torch.stack(norms).double().square().sum().to(squares.device)
    if group is not None:
        dist.all_reduce(squares, group=group)
    total = math.sqrt(float(squares))
    scale = clip_scale(total, max_norm)
    if scale is not None:
        scale_sparse_grads(tables, scale)
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


def build_optimizers(model: nn.Module, tables: dict[str, ValueTable], cfg: OptimConfig,
                     bank_lr_mult: float | None = None
                     ) -> tuple[torch.optim.AdamW, SparseRowOptimizer]:
    """AdamW for the dense parameters, the sparse row optimizer for the tables: value tables at
    lr * memory_lr_mult, hierarchical-bank level tables (``bank*``) at lr * ``bank_lr_mult``
    (default: memory_lr_mult as well)."""
    groups = dense_param_groups(model, tables.values(), cfg.weight_decay)
    dense = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                              foreach=False)
    sparse = SparseRowOptimizer(tables, lr=cfg.lr * cfg.memory_lr_mult,
                                betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.memory_weight_decay,
                                decay_mode=cfg.memory_weight_decay_mode,
                                mode=cfg.memory_optimizer,
                                moment_dtype=STORAGE_DTYPES[cfg.memory_moment_dtype],
                                lr_scale=_bank_lr_scale(tables, cfg, bank_lr_mult))
    return dense, sparse


def _bank_lr_scale(tables: dict[str, ValueTable], cfg: OptimConfig,
                   bank_lr_mult: float | None) -> dict[str, float]:
    """Per tree-memory level table, its lr relative to the value tables' (the optimizer's)."""
    if bank_lr_mult is None:
        return {}
    return {name: bank_lr_mult / cfg.memory_lr_mult for name, table in tables.items()
            if table.spec.kind == "tree"}


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, cosine decay to ``lr * min_lr_ratio``.
    ``step`` counts from 1 (the step about to be taken)."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(dense: torch.optim.Optimizer, sparse: SparseRowOptimizer, lr: float,
           memory_lr_mult: float) -> None:
    for group in dense.param_groups:
        group["lr"] = lr
    sparse.lr = lr * memory_lr_mult
