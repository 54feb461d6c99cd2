"""How this rank's tensors appear in a checkpoint.

Tensor-parallel shards (megatron's ``tensor_model_parallel`` / ``partition_dim`` tags) and
value-table shards (``ep_shard = (dim, global size)``) become DTensors on a (replicas x group)
mesh, so ``torch.distributed.checkpoint`` stores global shapes and loads them back at any tp
or ep, or into one process. Replicated tensors stay plain and are stored once.
"""

from __future__ import annotations

import torch

from memtron.parallel.launch import collective_device
from memtron.parallel.state import ParallelState
from memtron.parallel.tensor import is_tp_sharded


def _mesh(state: ParallelState, size: int):
    """Ranks grouped in consecutive blocks of ``size``: megatron's tp groups, and its expert
    (ep) groups with expert-tp = 1."""
    if size == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(collective_device().type, (state.world_size // size, size))


class CheckpointLayout:
    def __init__(self, state: ParallelState) -> None:
        self.tp_mesh = _mesh(state, state.tp)
        self.ep_mesh = self.tp_mesh if state.ep == state.tp else _mesh(state, state.ep)

    def view(self, tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """``tensor`` (``param`` itself or optimizer state shaped like it) as stored."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if self.tp_mesh is not None and is_tp_sharded(param):
            return DTensor.from_local(tensor, self.tp_mesh,
                                      [Replicate(), Shard(param.partition_dim)], run_check=False)
        ep_shard = getattr(param, "ep_shard", None)
        if self.ep_mesh is not None and ep_shard is not None:
            dim, full = ep_shard
            shape = list(tensor.shape)
            shape[dim] = full
            return DTensor.from_local(tensor, self.ep_mesh, [Replicate(), Shard(dim)],
                                      run_check=False, shape=torch.Size(shape),
                                      stride=torch.empty(shape, device="meta").stride())
        return tensor
