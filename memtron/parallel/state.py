"""This rank's place in the layout: sizes, ranks and process groups of tp, cp, dp and ep.

A plain record derived from the one :class:`~torch.distributed.device_mesh.DeviceMesh` built by
:func:`memtron.parallel.mesh.build_mesh`; the groups are the mesh's. With one process there is
no mesh: every group is ``None`` and every size 1, and the primitives run locally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


@dataclass
class ParallelState:
    world_size: int = 1
    rank: int = 0
    tp: int = 1
    cp: int = 1
    dp: int = 1
    ep: int = 1
    tp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    cp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    dp_cp_group: dist.ProcessGroup | None = None  # ranks that hold the same dense weights
    ep_group: dist.ProcessGroup | None = None
    ep_replica_group: dist.ProcessGroup | None = None  # ranks holding the same table shard
    mesh: DeviceMesh | None = None  # ("dp", "cp", "tp"): the dense layout
    ep_mesh: DeviceMesh | None = None  # ("ep_replica", "ep"): the same ranks, folded for tables

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"world {self.world_size} = tp {self.tp} x cp {self.cp} x dp {self.dp}; ep {self.ep}"
