"""How this rank's tensors appear in a checkpoint.

Tensor-parallel shards (megatron's ``tensor_model_parallel`` / ``partition_dim`` tags) become
DTensors on the run's ("dp", "cp", "tp") mesh, sharded over tp and replicated over dp and cp;
value-table shards (``ep_shard = (dim, global size)``) DTensors on its ("ep_replica", "ep")
fold. ``torch.distributed.checkpoint`` then stores global shapes and loads them back at any tp
or ep, or into one process. Replicated tensors stay plain and are stored once.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from memtron.parallel.state import ParallelState
from memtron.parallel.tensor import is_tp_sharded


class CheckpointLayout:
    def __init__(self, state: ParallelState) -> None:
        self.mesh = state.mesh if state.tp > 1 else None
        self.ep_mesh = state.ep_mesh if state.ep > 1 else None

    def view(self, tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """``tensor`` (``param`` itself or optimizer state shaped like it) as stored."""
        if self.mesh is not None and is_tp_sharded(param):
            return DTensor.from_local(tensor, self.mesh,
                                      [Replicate(), Replicate(), Shard(param.partition_dim)],
                                      run_check=False)
        ep_shard = getattr(param, "ep_shard", None)
        if self.ep_mesh is not None and ep_shard is not None:
            dim, full = ep_shard
            shape = list(tensor.shape)
            shape[dim] = full
            return DTensor.from_local(tensor, self.ep_mesh, [Replicate(), Shard(dim)],
                                      run_check=False, shape=torch.Size(shape),
                                      stride=torch.empty(shape, device="meta").stride())
        return tensor
