"""Data parallelism outside the dense engine (parallel/engine.py): value-table rows and the
step's control collective.

Value-table rows held by several ranks exchange only their touched rows: each rank's (ids,
rows) are all-gathered, padded to the largest count since gloo has no uneven all-gather, and
summed per id; no dense N x d gradient is ever formed (``memtron.parallel.memory`` decides who
sums with whom). Everything else a step must agree on (loss, norms, non-finite flags, stop
requests, per-rank loads) travels in one small all-reduce, :func:`agree`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from memtron.model.tables import ValueTable, sum_rows_by_id
from memtron.parallel.launch import collective_device, to_backend


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


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
    """Mean of a per-rank scalar (e.g. the evaluation loss) over ``group``."""
    size = _group_size(group)
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, group=group)
    return float(t.item()) / size


def agree(sums: list[torch.Tensor], per_rank: list[float]
          ) -> tuple[list[float], list[list[float]]]:
    """The step's one control collective over all ranks: the sums of ``sums`` (scalars), and
    every rank's value of each entry of ``per_rank`` (an all-gather folded into the same fp64
    all-reduce: each rank fills its own slot of a zero vector). Reading the result is the
    step's one host sync: every rank must know before the update whether to skip it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = collective_device()
    slots = torch.zeros(len(per_rank), world, dtype=torch.float64)
    slots[:, rank] = torch.tensor(per_rank, dtype=torch.float64)
    wire = torch.cat([torch.stack([s.to(device, torch.float64) for s in sums]),
                      slots.view(-1).to(device)])
    if world > 1:
        dist.all_reduce(wire)
    values = wire.tolist()
    n = len(sums)
    return values[:n], [values[n + k * world: n + (k + 1) * world] for k in range(len(per_rank))]
