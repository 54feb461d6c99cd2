"""Data parallelism: gradients averaged over the ranks that hold the same weights.

Dense gradients are flattened into buckets and all-reduced over the dp x cp group (cp ranks see
other tokens of the same sequences, so they average too). Value-table rows held by several
ranks exchange only their touched rows: each rank's (ids, rows) are all-gathered, padded to the
largest count since gloo has no uneven all-gather, and summed per id; no dense N x d gradient
is ever formed (``memtron.parallel.memory`` decides who sums with whom).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from memtron.model.tables import ValueTable, sum_rows_by_id
from memtron.parallel.launch import collective_device, to_backend

BUCKET_BYTES = 25 * 1024 * 1024


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def average_dense_grads(params: Iterable[torch.Tensor], group: dist.ProcessGroup | None,
                        bucket_bytes: int = BUCKET_BYTES) -> int:
    """All-reduce-average ``.grad`` of ``params`` in flat buckets; returns bytes reduced."""
    size = _group_size(group)
    grads = [p.grad for p in params if p.grad is not None]
    if size == 1 or not grads:
        return 0
    sent = 0
    bucket: list[torch.Tensor] = []
    filled = 0

    def flush() -> None:
        nonlocal bucket, filled, sent
        flat = to_backend(torch.cat([g.reshape(-1) for g in bucket]), group)
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        sent += flat.numel() * flat.element_size()
        bucket, filled = [], 0

    for g in grads:
        bucket.append(g)
        filled += g.numel() * g.element_size()
        if filled >= bucket_bytes:
            flush()
    if bucket:
        flush()
    return sent


def sum_table_grads(tables: Iterable[ValueTable], group: dist.ProcessGroup | None) -> int:
    """Sum the sparse row gradients of tables whose rows ``group`` holds in several copies.

    Returns the bytes this rank contributed to the exchange.
    """
    size = _group_size(group)
    if size == 1:
        return 0
    sent = 0
    for table in tables:
        grad = table.sparse_grad()
        device = table.weight.device
        ids = grad[0] if grad is not None else torch.zeros(0, dtype=torch.int64, device=device)
        width = table.weight.shape[1]
        rows = grad[1] if grad is not None else torch.zeros(0, width, device=device)
        count = to_backend(torch.tensor([ids.numel()]), group)
        counts = [torch.zeros_like(count) for _ in range(size)]
        dist.all_gather(counts, count, group=group)
        longest = int(max(c.item() for c in counts))
        if longest == 0:
            continue
        padded_ids = to_backend(ids.new_zeros(longest), group)
        padded_rows = to_backend(rows.new_zeros(longest, width), group)
        padded_ids[: ids.numel()] = ids
        padded_rows[: ids.numel()] = rows
        all_ids = [torch.empty_like(padded_ids) for _ in range(size)]
        all_rows = [torch.empty_like(padded_rows) for _ in range(size)]
        dist.all_gather(all_ids, padded_ids, group=group)
        dist.all_gather(all_rows, padded_rows, group=group)
        keep_ids = torch.cat([i[: int(c)] for i, c in zip(all_ids, counts)]).to(device)
        keep_rows = torch.cat([r[: int(c)] for r, c in zip(all_rows, counts)]).to(device)
        unique_ids, summed = sum_rows_by_id(keep_ids, keep_rows)
        table.zero_grad_rows()
        table.accumulate_grad(unique_ids, summed)
        sent += longest * (8 + 4 * width)
    return sent


def average_scalar(value: float, group: dist.ProcessGroup | None) -> float:
    """Mean of a per-rank scalar (e.g. the loss) over ``group``."""
    size = _group_size(group)
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, group=group)
    return float(t.item()) / size


class DeepSpeedZero:
    """Dense parameters under a DeepSpeed ZeRO-1/2 engine: optimizer state (and with stage 2
    gradients) partitioned over the dp group. Value tables stay outside DeepSpeed with their
    sparse optimizer. The engine wraps the caller's AdamW, so hyper-parameters and the LR
    schedule are the native path's."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stage: int,
                 micro_batch_size: int, grad_accum: int, grad_clip: float) -> None:
        import os

        if not dist.is_initialized():
            raise RuntimeError("train.engine=deepspeed needs a launched job (torchrun, srun, "
                               "mpirun) with a process group")
        os.environ.setdefault("DS_ACCELERATOR", collective_device().type)  # the backend's
        try:
            import deepspeed
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError("train.engine=deepspeed needs: pip install 'memtron[deepspeed]'") \
                from e
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "zero_optimization": {"stage": stage},
            "gradient_clipping": grad_clip,
            "zero_allow_untested_optimizer": True,  # a plain torch AdamW
            "communication_data_type": "fp32",
            "steps_per_print": 2**62,
        }
        # DeepSpeed broadcasts every module parameter from rank 0 at start-up, which would
        # overwrite the other ranks' value-table shards: the tables sit outside the module
        # while it is wrapped (memory layers reach them through their own references).
        tables = model.value_tables
        model.value_tables = torch.nn.ModuleDict()
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=config, dist_init_required=False)
        finally:
            model.value_tables = tables

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch (DeepSpeed divides by the accumulation steps itself);
        at the accumulation boundary this also reduces, clips and applies the dense update."""
        self.engine.backward(loss)
        self.engine.step()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def checkpoint_files(self) -> dict[str, Any]:
        """Each dp rank's partition of the optimizer state, saved next to the DCP tensors."""
        return {f"zero-rank{dist.get_rank():05d}.pt": self.optimizer.state_dict()}

    def load(self, directory: Path) -> None:
        files = sorted(directory.glob("zero-rank*.pt"))
        if len(files) != dist.get_world_size():
            raise RuntimeError(f"{directory}: {len(files)} ZeRO partitions for "
                               f"{dist.get_world_size()} ranks; DeepSpeed optimizer state "
                               "resumes only at the layout it was saved with")
        states = [torch.load(f, weights_only=False) for f in files]  # our checksummed files
        self.optimizer.load_state_dict(states, load_optimizer_states=True)
