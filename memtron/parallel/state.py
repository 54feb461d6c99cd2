"""Process groups: tensor (tp), context (cp), data (dp) and memory (ep) parallel.

Built with megatron-core's ``parallel_state`` (rank order tp-cp-ep-dp-pp: tp ranks are
neighbours). The memory-parallel group is megatron's expert group with expert-tp = 1, folded
over the same ranks as tp x cp x dp, so a value table is stored once across the job (DESIGN §4).
With one process every group is ``None`` and every size 1: the primitives then run locally.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.distributed as dist

from memtron.config import Config, check_world


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"world {self.world_size} = tp {self.tp} x cp {self.cp} x dp {self.dp}; ep {self.ep}"


def build_parallel_state(cfg: Config, timeout_minutes: int = 10) -> ParallelState:
    """Resolve the layout for the running world and create the groups (needs an initialised
    process group when the world has more than one rank)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp, cp, dp, ep = check_world(cfg, world)
    if world == 1:
        return ParallelState()
    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        from megatron.core import parallel_state as mps

    if not mps.model_parallel_is_initialized():
        mps.initialize_model_parallel(
            tensor_model_parallel_size=tp, context_parallel_size=cp,
            expert_model_parallel_size=ep, expert_tensor_parallel_size=1,
            distributed_timeout_minutes=timeout_minutes, create_gloo_process_groups=False)
    return ParallelState(
        world_size=world, rank=dist.get_rank(), tp=tp, cp=cp, dp=dp, ep=ep,
        tp_rank=mps.get_tensor_model_parallel_rank(),
        cp_rank=mps.get_context_parallel_rank(),
        dp_rank=mps.get_data_parallel_rank(),
        ep_rank=mps.get_expert_model_parallel_rank(),
        tp_group=mps.get_tensor_model_parallel_group(),
        cp_group=mps.get_context_parallel_group(),
        dp_group=mps.get_data_parallel_group(),
        dp_cp_group=mps.get_data_parallel_group(with_context_parallel=True),
        ep_group=mps.get_expert_model_parallel_group(),
    )


def destroy_parallel_state() -> None:
    try:
        from megatron.core import parallel_state as mps
    except ImportError:
        return
    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
