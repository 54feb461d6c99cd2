"""The table abstraction (memtron.model.tables, DESIGN §4): every storage kind x lookup strategy
equals the local table (forward, weight and row gradients, rows after 3 optimizer steps) at
ep=1, 2 and 4 on gloo; tree-memory fetches are lookups with unit weights; the custom ops match
their torch references and pass ``torch.library.opcheck``."""

import pytest
import torch
import torch.distributed as dist

from memtron.infer.values import StoreValueTable
from memtron.model.memory import cpu_kernels
from memtron.model.tables import LocalValueTable, TableSpec, bag_index, ops
from memtron.parallel.launch import init_distributed, shutdown_distributed
from memtron.storage.store import RamRowStore
from tests.multiproc import run_ranks
from tests.test_memory_parallel import HITS, N_ROWS, SEED, SPEC, TP_TOKENS, _tp_batch, _tp_run

# storage kind -> memory.parallel (whole tables: the local kind, replicated over the world)
KINDS = {"local": "replicated", "row_shard": "rowwise", "column_shard": "colwise"}
STRATEGIES = ("direct", "token_sliced")  # direct: the kind's own lookup (local or routed)


def _make(kind: str, rank: int, world: int, cfg, state):
    """The table of ``kind`` on this rank: built by the trainer's factory (at ep=1 it builds
    whole tables, so the sharded kinds are built directly over the world of one)."""
    from memtron.parallel.memory import ColumnShardedValueTable, ShardedValueTable, table_factory

    if world > 1:
        return table_factory(cfg, state)(SPEC)
    cls = {"local": LocalValueTable, "row_shard": ShardedValueTable,
           "column_shard": ColumnShardedValueTable}[kind]
    return LocalValueTable(SPEC) if kind == "local" else cls(SPEC, dist.group.WORLD, rank, 1)


def _kinds_rank(rank: int, world: int) -> dict:
    """Every kind x strategy on this rank: tp=1 (dp=world, each rank its own tokens) for the
    direct lookups, tp=world (every rank the same tokens, each looking up its slice) for the
    token-sliced ones; gradients reduced the trainer's way."""
    from memtron.config import Config
    from memtron.parallel.memory import reduce_table_grads
    from memtron.parallel.mesh import build_mesh, destroy_mesh
    from memtron.parallel.token_slice import TokenSlicedLookup

    if world == 1:  # in this process: a world of one
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        init_distributed(timeout_s=60)
    try:
        records = {}
        for strategy in STRATEGIES:
            for kind, layout in KINDS.items():
                cfg = Config()
                cfg.parallel.tp = world if strategy == "token_sliced" else 1
                cfg.parallel.ep = world
                cfg.memory.parallel = layout
                cfg.memory.tp_slice_lookups = strategy == "token_sliced"
                state = build_mesh(cfg)
                table = _make(kind, rank, world, cfg, state)
                if strategy == "token_sliced":
                    tp_group = state.tp_group if world > 1 else dist.group.WORLD
                    lookup = TokenSlicedLookup(tp_group, rank if world > 1 else 0, world)
                else:
                    lookup = lambda t, ids, w: t.lookup(ids, w)  # noqa: E731
                ids = _tp_batch(state.dp_rank, 11, 0)[0]
                fetched = table.fetch(ids[:, 0]).detach()  # tree memory's access
                record = _tp_run(table, lookup, [state.dp_rank],
                                 reduce=lambda t, c=cfg, s=state: reduce_table_grads([t], c, s))
                record.update(dp_rank=state.dp_rank, dp=state.dp, fetched=fetched,
                              fetched_ref=LocalValueTable(SPEC).fetch(ids[:, 0]).detach())
                records[kind, strategy] = record
                destroy_mesh()
        return records
    finally:
        if world == 1:
            dist.destroy_process_group()
        else:
            shutdown_distributed()


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_every_storage_kind_and_strategy_equals_the_local_table(ep):
    """250 rows over ep ranks (uneven), 7 tokens per dp rank (uneven over tp); outputs and
    weight gradients per rank, the row gradients and the rows after 3 sparse Adam steps
    assembled from the shards, all equal the single-process local table's."""
    runs = [_kinds_rank(0, 1)] if ep == 1 else run_ranks(ep, _kinds_rank, ep)
    for (kind, strategy) in runs[0]:
        dp = 1 if strategy == "token_sliced" else ep
        ref = _tp_run(LocalValueTable(SPEC), lambda t, i, w: t.lookup(i, w), list(range(dp)))
        ranks = [r[kind, strategy] for r in runs]
        what = f"{kind} x {strategy} at ep={ep}"
        for r in ranks:
            mine = slice(r["dp_rank"] * TP_TOKENS, (r["dp_rank"] + 1) * TP_TOKENS)
            for layer in range(2):
                torch.testing.assert_close(r[f"out{layer}"], ref[f"out{layer}"][mine],
                                           rtol=1e-6, atol=1e-6, msg=what)
                torch.testing.assert_close(r[f"w{layer}"] / dp, ref[f"w{layer}"][mine],
                                           rtol=1e-6, atol=1e-6, msg=what)
            torch.testing.assert_close(r["fetched"], r["fetched_ref"], rtol=0, atol=0, msg=what)
        if kind == "local":  # every rank holds the whole gradient and table
            grads, tables = [r["grad"] for r in ranks], [r["table"] for r in ranks]
        elif kind == "column_shard":  # rank r holds columns r of every row
            grads = [torch.cat([r["grad"] for r in ranks], dim=1)]
            tables = [torch.cat([r["table"] for r in ranks], dim=1)]
        else:  # rank r holds rows r
            grads = [sum(r["grad"] for r in ranks)]
            tables = [torch.cat([r["table"] for r in ranks])]
        for grad, table in zip(grads, tables):
            torch.testing.assert_close(grad, ref["grad"], rtol=1e-6, atol=1e-6, msg=what)
            torch.testing.assert_close(table, ref["table"], rtol=1e-6, atol=1e-6, msg=what)
        assert not torch.equal(ref["table"], LocalValueTable(SPEC).weight)  # rows did move


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_only_store_kind_equals_the_local_table(dtype):
    """The RowStore kind (with and without its LRU cache): lookups and fetches give the local
    table's values; it refuses to train."""
    spec = TableSpec("values", N_ROWS, 8, SEED, dtype)
    local = LocalValueTable(spec).eval()
    ids, weights, _ = _tp_batch(0, 0, 0)
    for cache_rows in (0, 64):
        stored = StoreValueTable(spec, RamRowStore(local.weight.detach()), cache_rows)
        with torch.no_grad():
            torch.testing.assert_close(stored.lookup(ids, weights), local.lookup(ids, weights),
                                       rtol=0, atol=0)
            assert torch.equal(stored.fetch(ids[:, 0]), local.fetch(ids[:, 0]))
        with pytest.raises(RuntimeError, match="read-only"):
            stored.lookup(ids, weights.requires_grad_(True))
        weights = weights.detach()


def test_tables_are_named_by_their_specs(tiny_config):
    """The model builds every table (value tables, tree levels) from a spec of its name, with
    the counter-based init: a level's rows are the spec's draw."""
    from memtron.model.transformer import build_model

    cfg = tiny_config(**{"bank.layers": "[0]", "bank.levels": 2, "bank.branching": 2,
                         "bank.block_sizes": "[2,2]"})
    model = build_model(cfg)
    for name, table in model.value_tables.items():
        assert table.name == table.spec.name == name
        assert torch.equal(table.weight, LocalValueTable(table.spec).weight)
    kinds = {name: t.spec.kind for name, t in model.value_tables.items()}
    assert kinds == {"table0": "values", "bank0": "tree", "bank1": "tree"}
    level = model.value_tables["bank0"].weight.detach()
    block = cfg.bank.block_sizes[0] * cfg.model.d_model  # G, U at init_std, then D smaller
    assert level[:, :block].std() > 1.5 * level[:, 2 * block:3 * block].std()


# -- custom ops ------------------------------------------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def _bag_inputs(device: str, dtype: torch.dtype, dim: int = 24):
    g = torch.Generator().manual_seed(4)
    table = torch.randn(60, dim, generator=g).to(device, dtype)
    ids = torch.randint(0, 60, (7 * HITS,), generator=g).to(device)
    ids[1] = ids[0]  # a repeated hit
    weights = torch.rand(7 * HITS, generator=g).to(device)
    offsets = torch.tensor([0, 5, 5, 20, 40, 41, 60], device=device)  # an empty bag
    grad_out = torch.randn(offsets.numel(), dim, generator=g).to(device)
    return table, ids, weights, offsets, grad_out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_and_backward_ops_match_their_references(device, dtype):
    """The device kernels (C++ backward on CPU, Triton on CUDA) against the torch references:
    fp32 sums, so 1e-5 of values ~10 (bf16 tables: their rows are exact in fp32; the reference
    gathers in bf16, a bf16 ulp of the sums)."""
    table, ids, weights, offsets, grad_out = _bag_inputs(device, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2**-7 * 8
    torch.testing.assert_close(ops.bag_gather(table, ids, weights, offsets),
                               ops._reference_gather(table, ids, weights, offsets),
                               rtol=tol, atol=tol)
    arena = torch.empty(0, table.shape[1], device=device)
    unique, rows, grad_w = ops.bag_backward(grad_out, table, ids, weights, offsets, True, arena)
    ref_unique, ref_rows, ref_w = ops._reference_backward(grad_out, table, ids, weights,
                                                          offsets, True, arena)
    assert torch.equal(unique, ref_unique)
    torch.testing.assert_close(rows, ref_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w, ref_w, rtol=tol, atol=tol)
    big = torch.full((100, table.shape[1]), float("nan"), device=device)
    _, in_arena, _ = ops.bag_backward(grad_out, table, ids, weights, offsets, False, big)
    torch.testing.assert_close(in_arena, ref_rows, rtol=1e-5, atol=1e-5)


def _update_inputs(mode: str, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(40, 16, generator=g).to(device, dtype)
    ids = torch.tensor([0, 3, 7, 39], device=device)
    grad = torch.randn(4, 16, generator=g).to(device)
    full = mode == "adam"
    exp_avg = (torch.rand(40, 16, generator=g).to(device)
               if mode in ("adam", "adam_rowwise_v") else None)
    second = torch.rand(*((40, 16) if full else (40,)), generator=g).to(device)
    last_step = (torch.tensor([0, 1, 2, 3] * 10, device=device)
                 if mode == "adam_b1zero_rowwise" else None)
    keys = torch.arange(4, device=device) * 977 if dtype == torch.bfloat16 else None
    return [mode, weight, ids, grad, exp_avg, second, last_step, None, 0.99, 0.9, 0.95, 1e-8,
            1e-2, 5, keys, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["adam", "adam_rowwise_v", "rowwise_adagrad",
                                  "adam_b1zero_rowwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_op_matches_its_reference(device, mode, dtype):
    """The fused update of every mode against the torch reference, state included: fp32
    arithmetic in another order (1e-6 of values ~1); bf16 rows rounded with the same keys."""
    ours, ref = _update_inputs(mode, device, dtype), _update_inputs(mode, device, dtype)
    ops.sparse_update(*ours)
    ops._reference_update(*ref)
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    for a, b in zip(ours[1:7], ref[1:7]):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    assert not torch.equal(ours[1], _update_inputs(mode, device, dtype)[1])  # rows moved


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck(device):
    """Schemas (mutated arguments declared), fake tensors (data-dependent sizes), and dispatch
    through AOT autograd, for each op on the device's kernels."""
    table, ids, weights, offsets, grad_out = _bag_inputs(device, torch.float32)
    torch.library.opcheck(ops.bag_gather, (table, ids, weights, offsets))
    for arena in (torch.empty(0, table.shape[1], device=device),
                  torch.zeros(100, table.shape[1], device=device)):
        torch.library.opcheck(ops._bag_backward, (grad_out, table, ids, weights, offsets, True,
                                                  arena))
    for mode in ("adam", "adam_b1zero_rowwise"):
        torch.library.opcheck(ops.sparse_update, tuple(_update_inputs(mode, device,
                                                                      torch.float32)))


def test_cpu_kernel_is_the_extension_where_it_builds(monkeypatch):
    """Dispatch by device: a CPU backward runs the C++ extension (rows written into the arena)
    where it builds, the reference (fresh rows) where it is off."""
    table, ids, weights, offsets, grad_out = _bag_inputs("cpu", torch.float32)
    arena = torch.zeros(100, table.shape[1])
    for enabled in (True, False):
        monkeypatch.setattr(cpu_kernels, "ENABLED", enabled)
        _, rows, _ = ops.bag_backward(grad_out, table, ids, weights, offsets, False, arena)
        in_arena = rows.data_ptr() == arena.data_ptr()
        assert in_arena == (enabled and cpu_kernels.builds())
    assert bag_index(offsets, ids.numel()).shape == ids.shape
