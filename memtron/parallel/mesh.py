"""The one DeviceMesh: every process group of a run comes from it (DESIGN §4).

Dense weights are laid out on a ``("dp", "cp", "tp")`` mesh in row-major rank order, tp ranks
neighbours: rank = (dp_rank * cp + cp_rank) * tp + tp_rank, megatron-core's order tp-cp-dp.
Memory parallelism (ep) is folded over the same ranks: the flattened mesh is cut into
``("ep_replica", "ep")``, so ep groups are consecutive blocks of ``ep`` ranks and a value table is
stored once per block (once in the job at the default ep = world). That is megatron's expert
layout with expert-tp = 1.

megatron-core is kept for its tensor-parallel layers and mappings, which read its own
``parallel_state``: it is initialised with the same sizes and order, and each of its groups is
checked to hold exactly the ranks of the mesh's group, so the two cannot disagree.
"""

from __future__ import annotations

import math
import warnings

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from memtron.config import Config, check_world
from memtron.parallel.launch import collective_device
from memtron.parallel.state import ParallelState

DIMS = ("dp", "cp", "tp")
EP_DIMS = ("ep_replica", "ep")


def build_mesh(cfg: Config) -> ParallelState:
    """The layout of ``cfg.parallel`` on the running world (needs an initialised process group
    when the world has more than one rank)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp, cp, dp, ep = check_world(cfg, world)
    return init_mesh(tp=tp, cp=cp, dp=dp, ep=ep,
                     timeout_minutes=max(1, math.ceil(cfg.parallel.timeout_s / 60)))


def init_mesh(tp: int = 1, cp: int = 1, dp: int = 1, ep: int = 1,
              timeout_minutes: int = 10) -> ParallelState:
    """The mesh of a checked layout (tp * cp * dp = world, ep dividing it), megatron's groups
    initialised from it, and this rank's :class:`ParallelState`."""
    world = tp * cp * dp
    if world == 1:
        return ParallelState()
    mesh = init_device_mesh(collective_device().type, (dp, cp, tp), mesh_dim_names=DIMS)
    ep_mesh = mesh._flatten("world")._unflatten(0, (world // ep, ep), EP_DIMS)
    state = ParallelState(
        world_size=world, rank=dist.get_rank(), tp=tp, cp=cp, dp=dp, ep=ep,
        tp_rank=mesh.get_local_rank("tp"), cp_rank=mesh.get_local_rank("cp"),
        dp_rank=mesh.get_local_rank("dp"), ep_rank=ep_mesh.get_local_rank("ep"),
        tp_group=mesh.get_group("tp"), cp_group=mesh.get_group("cp"),
        dp_group=mesh.get_group("dp"),
        dp_cp_group=mesh["dp", "cp"]._flatten("dp_cp").get_group(),
        ep_group=ep_mesh.get_group("ep"), ep_replica_group=ep_mesh.get_group("ep_replica"),
        mesh=mesh, ep_mesh=ep_mesh)
    _init_megatron(state, timeout_minutes)
    return state


def _megatron_state():
    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        from megatron.core import parallel_state as mps
    return mps


def _init_megatron(state: ParallelState, timeout_minutes: int) -> None:
    """megatron's parallel_state with the mesh's sizes, then checked group by group."""
    mps = _megatron_state()
    if not mps.model_parallel_is_initialized():
        mps.initialize_model_parallel(
            tensor_model_parallel_size=state.tp, context_parallel_size=state.cp,
            expert_model_parallel_size=state.ep, expert_tensor_parallel_size=1,
            distributed_timeout_minutes=timeout_minutes, create_gloo_process_groups=False)
    ours = {"tp": state.tp_group, "cp": state.cp_group, "dp": state.dp_group,
            "dp x cp": state.dp_cp_group, "ep": state.ep_group,
            "ep replicas": state.ep_replica_group}
    theirs = {"tp": mps.get_tensor_model_parallel_group(),
              "cp": mps.get_context_parallel_group(),
              "dp": mps.get_data_parallel_group(),
              "dp x cp": mps.get_data_parallel_group(with_context_parallel=True),
              "ep": mps.get_expert_model_parallel_group(),
              "ep replicas": mps.get_expert_data_parallel_group()}
    for name, group in ours.items():
        mine, megatron = (dist.get_process_group_ranks(g) for g in (group, theirs[name]))
        if mine != megatron:
            raise RuntimeError(f"megatron-core's {name} group {megatron} differs from the "
                               f"mesh's {mine} on rank {state.rank}: its rank order changed")


def destroy_mesh() -> None:
    """Forget megatron's groups (the mesh's go with the process group)."""
    try:
        mps = _megatron_state()
    except ImportError:
        return
    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
