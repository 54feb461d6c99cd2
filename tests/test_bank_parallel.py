"""The hierarchical bank row-sharded over ep ranks (parallel/bank.py) equals the single-process
bank: outputs, input gradients, row gradients, and the blocks after 3 optimizer steps, at ep=2
and ep=4 (level 0 has 3 nodes: at ep=4 one rank owns none); and a checkpoint saved at ep=2
reshards to ep=1 and ep=4 and resumes exactly."""

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from memtron.config import BankConfig
from memtron.model.memory.hierarchical import TreeMemory, level_offsets, level_spec
from memtron.model.tables import LocalValueTable
from memtron.parallel.bank import exchange_bytes
from memtron.parallel.dispatch import Traffic
from memtron.parallel.launch import init_distributed, shutdown_distributed
from memtron.parallel.memory import ShardedValueTable
from memtron.parallel.mesh import init_mesh
from memtron.parallel.sharding import CheckpointLayout
from memtron.train.optim import SparseRowOptimizer
from tests.multiproc import run_ranks

CFG = BankConfig(layers=[0, 2], levels=2, branching=3, block_sizes=[2, 3], generic_size=2)
D, SEQ, BATCH, STEPS, SAVED_AT = 8, 3, 8, 3, 2  # BATCH: the global batch, split over ranks


def _bank(world: int, rank: int) -> tuple[TreeMemory, SparseRowOptimizer]:
    tables = []
    for level in range(CFG.levels):
        spec = level_spec(CFG, level, D, 100 + level, 0.3, 0.2)
        tables.append(LocalValueTable(spec) if world == 1 else
                      ShardedValueTable(spec, dist.group.WORLD, rank, world))
    torch.manual_seed(5)  # the generic block: replicated, the same on every rank
    bank = TreeMemory(CFG, D, tables, 0.3, 0.2)
    opt = SparseRowOptimizer({f"bank{i}": t for i, t in enumerate(tables)}, lr=0.05,
                             betas=(0.9, 0.95), weight_decay=0.01)
    return bank, opt


def _step(bank: TreeMemory, opt: SparseRowOptimizer, step: int, rank: int,
          world: int) -> dict:
    """One optimizer step on this rank's slice of the global batch of ``step``."""
    g = torch.Generator().manual_seed(700 + step)
    offsets = level_offsets(CFG.nodes_per_level())
    local = torch.stack([torch.randint(0, n, (BATCH,), generator=g)
                         for n in CFG.nodes_per_level()], dim=1)
    local[:, 0] = torch.randint(0, 2, (BATCH,), generator=g)  # level 0's node 2: never
    path = local + torch.tensor(offsets)
    h = torch.randn(BATCH, SEQ, D, generator=g)
    probes = [torch.randn(BATCH, SEQ, D, generator=g) for _ in CFG.layers]
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    x = h[mine].clone().requires_grad_(True)
    fetched = bank.fetch(path[mine])
    outs = [fetched(layer, x) for layer in CFG.layers]
    sum((o * p[mine]).sum() for o, p in zip(outs, probes)).backward()
    record = {"out": torch.stack(outs).detach(), "x_grad": x.grad}
    for i, table in enumerate(bank.tables):
        grad = table.sparse_grad()
        ids, rows = grad if grad is not None else (torch.zeros(0, dtype=torch.long),
                                                   torch.zeros(0, table.dim))
        dense = torch.zeros(CFG.nodes_per_level()[i], table.dim)
        dense[ids + getattr(table, "row_start", 0)] = rows
        record[f"grad{i}"] = dense
    opt.step()
    opt.zero_grad()
    return record


def _state(bank: TreeMemory, opt: SparseRowOptimizer, world: int) -> dict:
    layout = CheckpointLayout(init_mesh(dp=world, ep=world))
    return {f"bank{i}": {"weight": layout.view(t.weight, t.weight),
                         "optim": {k: layout.view(v, t.weight) if v.dim() else v
                                   for k, v in opt.state_dict()[f"bank{i}"].items()}}
            for i, t in enumerate(bank.tables)}


def _run(rank: int, world: int, save: str | None = None, load: str | None = None) -> dict:
    """STEPS steps (saving the state after SAVED_AT to ``save``), or, with ``load``, the state
    loaded from there and the remaining steps."""
    if world > 1:
        init_distributed(timeout_s=60)
    try:
        bank, opt = _bank(world, rank)
        records = []
        first = 0
        if load:
            dcp.load(_state(bank, opt, world), checkpoint_id=load)
            first = SAVED_AT
        Traffic.take()
        for step in range(first, STEPS):
            records.append(_step(bank, opt, step, rank, world))
            if save and step + 1 == SAVED_AT:
                dcp.save(_state(bank, opt, world), checkpoint_id=save)
        return {"records": records, "tables": [t.weight.detach().clone() for t in bank.tables],
                "traffic": Traffic.take()}
    finally:
        if world > 1:
            shutdown_distributed()


def _check(shards: list[dict], ref: dict, first_step: int = 0) -> None:
    for i, step in enumerate(range(first_step, STEPS)):
        want = ref["records"][step]
        torch.testing.assert_close(torch.cat([s["records"][i]["out"] for s in shards], dim=1),
                                   want["out"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.cat([s["records"][i]["x_grad"] for s in shards]),
                                   want["x_grad"], rtol=1e-5, atol=1e-6)
        for level in range(CFG.levels):
            torch.testing.assert_close(sum(s["records"][i][f"grad{level}"] for s in shards),
                                       want[f"grad{level}"], rtol=1e-5, atol=1e-6)
    for level in range(CFG.levels):
        torch.testing.assert_close(torch.cat([s["tables"][level] for s in shards]),
                                   ref["tables"][level], rtol=1e-5, atol=1e-6)


def test_sharded_bank_equals_one_process_and_checkpoints_reshard(tmp_path):
    ref = _run(0, 1)
    initial = _bank(1, 0)[0].tables
    assert not ref["records"][0]["grad0"][2].any()  # an unfetched node: no gradient ...
    torch.testing.assert_close(ref["tables"][0][2], initial[0].weight[2])  # ... and no update
    assert not torch.equal(ref["tables"][1], initial[1].weight)

    ep2 = run_ranks(2, _run, 2, str(tmp_path / "ep2"))
    _check(ep2, ref)
    assert all(s["traffic"][0] > 0 for s in ep2)  # blocks did cross ranks
    ep4 = run_ranks(4, _run, 4)
    _check(ep4, ref)
    assert ep4[3]["tables"][0].shape[0] == 0  # level 0's 3 nodes: rank 3 owns none

    _check([_run(0, 1, load=str(tmp_path / "ep2"))], ref, SAVED_AT)
    _check(run_ranks(4, _run, 4, None, str(tmp_path / "ep2")), ref, SAVED_AT)


def test_block_fetch_moves_fewer_bytes_than_token_dispatch():
    """The choice stated in parallel/bank.py, for the published and the tiny setups."""
    paper = BankConfig(layers=list(range(12)), levels=4, branching=16,
                       block_sizes=[160, 160, 160, 170])
    moved = exchange_bytes(paper, 768, 2048)
    assert moved["token_dispatch"] / moved["block_fetch"] > 7
    tiny = BankConfig(layers=[1, 2], levels=4, branching=4, block_sizes=[8, 16, 32, 64])
    moved = exchange_bytes(tiny, 128, 128)
    assert moved["token_dispatch"] > moved["block_fetch"]
