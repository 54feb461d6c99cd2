"""The one DeviceMesh: its groups are megatron-core's, rank for rank, for every layout of a
4-rank world; ep is folded over the same ranks in consecutive blocks. A tp=2 model built by
``build_parallel_model`` gathers full-vocab logits on the CPU equal to one process's."""

import pytest
import torch
import torch.distributed as dist

from memtron.parallel.launch import init_distributed, shutdown_distributed
from tests.multiproc import run_ranks

WORLD = 4


def _groups(rank: int, tp: int, cp: int, dp: int, ep: int) -> dict:
    from memtron.parallel.mesh import destroy_mesh, init_mesh

    init_distributed(backend="gloo")
    try:
        state = init_mesh(tp=tp, cp=cp, dp=dp, ep=ep)  # raises if megatron disagrees
        ranks = {name: dist.get_process_group_ranks(getattr(state, f"{name}_group"))
                 for name in ("tp", "cp", "dp", "dp_cp", "ep", "ep_replica")}
        coords = (state.tp_rank, state.cp_rank, state.dp_rank, state.ep_rank)
        return {"ranks": ranks, "coords": coords, "mesh": state.mesh.mesh.tolist()}
    finally:
        destroy_mesh()
        shutdown_distributed()


@pytest.mark.parametrize("tp,cp,dp,ep", [(2, 1, 2, 4), (1, 2, 2, 2), (2, 2, 1, 1), (1, 1, 4, 2),
                                         (4, 1, 1, 4)])
def test_mesh_groups_are_megatrons(tp, cp, dp, ep):
    results = run_ranks(WORLD, _groups, tp, cp, dp, ep)
    for rank, got in enumerate(results):
        tp_rank, cp_rank, dp_rank = rank % tp, rank // tp % cp, rank // (tp * cp)
        assert got["coords"] == (tp_rank, cp_rank, dp_rank, rank % ep)
        assert got["ranks"]["tp"] == [r for r in range(WORLD) if r // tp == rank // tp]
        assert got["ranks"]["ep"] == [r for r in range(WORLD) if r // ep == rank // ep]
        assert got["ranks"]["ep_replica"] == [r for r in range(WORLD) if r % ep == rank % ep]
        assert got["ranks"]["dp_cp"] == [r for r in range(WORLD) if r % tp == tp_rank]
        assert got["mesh"] == [[[d * cp * tp + c * tp + t for t in range(tp)] for c in range(cp)]
                               for d in range(dp)]


TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=64", "model.vocab_size=256", "model.max_seq_len=16", "data.seq_len=16",
        "memory.layers=[1]", "memory.placement=beside", "memory.n_heads=2", "memory.topk=4",
        "memory.d_key=16", "memory.n_sub_keys=16", "memory.value_dim=32", "train.seed=3"]


def _tp_logits(rank: int, tokens: torch.Tensor) -> torch.Tensor:
    from memtron.config import load_config
    from memtron.parallel.mesh import build_mesh, destroy_mesh
    from memtron.parallel.parallelize import build_parallel_model
    from memtron.parallel.tensor import gather_logits

    init_distributed(backend="gloo")
    try:
        cfg = load_config(None, [*TINY, "parallel.tp=2", "parallel.ep=2"])
        state = build_mesh(cfg)
        model = build_parallel_model(cfg, state).eval()
        with torch.no_grad():
            return gather_logits(model(tokens), state)  # megatron's gather needed CUDA here
    finally:
        destroy_mesh()
        shutdown_distributed()


def test_tp2_gathered_logits_on_cpu_equal_one_process():
    from memtron.config import load_config
    from memtron.parallel.mesh import build_mesh
    from memtron.parallel.parallelize import build_parallel_model

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = load_config(None, TINY)
    with torch.no_grad():
        ref = build_parallel_model(cfg, build_mesh(cfg)).eval()(tokens)
    for logits in run_ranks(2, _tp_logits, tokens):
        assert logits.shape == ref.shape and logits.device == ref.device
        # fp32 sums over d_model in another order (row-parallel all-reduces): ~1e-7 relative
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
