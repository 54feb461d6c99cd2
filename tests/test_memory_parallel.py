"""Sharded value tables (row-wise, column-wise) equal the single-process table: forward,
weight gradients, row gradients and the table after optimizer steps, on gloo."""

import pytest
import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from memtron.model.tables import STORAGE_DTYPES, LocalValueTable, TableSpec
from memtron.parallel.launch import init_distributed, shutdown_distributed
from memtron.parallel.memory import ColumnShardedValueTable, ShardedValueTable, row_bounds
from memtron.train.optim import MEMORY_OPTIMIZERS, SparseRowOptimizer, clip_sparse_grad_norm
from tests.multiproc import run_ranks

N_ROWS, DIM, HITS, TOKENS, SEED = 250, 8, 12, 6, 17  # 250 rows: uneven over 4 ranks
SPEC = TableSpec("t", N_ROWS, DIM, SEED)


def _batch(case: str, rank: int, step: int, micro: int, layer: int):
    """Deterministic (ids, weights, output grad) of one rank's lookup."""
    g = torch.Generator().manual_seed(1000 * step + 100 * micro + 10 * layer + rank)
    if case == "skewed":  # most hits on 3 hot slots: the rows exchange wins
        ids = torch.randint(0, 3, (TOKENS, HITS), generator=g)
        ids[:, :2] = torch.randint(0, N_ROWS, (TOKENS, 2), generator=g)
    elif case == "idle_owner":  # nobody asks for the last rank's rows
        ids = torch.randint(0, row_bounds(N_ROWS, 4)[3], (TOKENS, HITS), generator=g)
    else:
        ids = torch.randint(0, N_ROWS, (TOKENS, HITS), generator=g)
        ids[0, 1] = ids[0, 0]  # a token hitting one slot twice
    weights = torch.rand(TOKENS, HITS, generator=g)
    return ids, weights, torch.randn(TOKENS, DIM, generator=g)


def _run(table, case: str, ranks: list[int], group=None, steps: int = 3, layers: int = 3,
         micro_batches: int = 2, mode: str = "adam", decay: str = "touched") -> dict:
    """Shared table read by ``layers`` lookups, ``micro_batches`` accumulated, ``steps``
    optimizer steps with global-norm clipping; ``ranks`` are the data shards this process plays."""
    opt = SparseRowOptimizer({"t": table}, lr=0.05, betas=(0.9, 0.95),
                             weight_decay=0.01 if decay == "touched" else 0.5, mode=mode,
                             decay_mode=decay)
    record = {}
    for step in range(steps):
        for micro in range(micro_batches):
            loss = 0
            for layer in range(layers):
                batches = [_batch(case, r, step, micro, layer) for r in ranks]
                ids = torch.cat([b[0] for b in batches])
                weights = torch.cat([b[1] for b in batches]).requires_grad_(True)
                out = table.lookup(ids, weights)
                loss = loss + (out * torch.cat([b[2] for b in batches])).sum()
                if step == 0 and micro == 0:
                    record[f"out{layer}"] = out.detach()
                    record[f"w{layer}"] = weights
                if step == steps - 1 and micro == 0:  # rows read after updates (and decay)
                    record[f"last{layer}"] = out.detach()
            loss.backward()
        if step == 0:
            record = {k: (v.grad.clone() if k.startswith("w") else v) for k, v in record.items()}
            grad = table.sparse_grad()
            ids, rows = grad if grad is not None else (torch.zeros(0, dtype=torch.int64),
                                                       torch.zeros(0, table.dim))
            record["grad_ids"] = ids + getattr(table, "row_start", 0)
            record["grad_rows"] = rows.clone()
        record[f"norm{step}"] = clip_sparse_grad_norm([table], 5.0, group)
        opt.step()
        opt.zero_grad()
    opt.catch_up_decay()
    record["table"] = table.weight.detach().clone()
    record["exchanges"] = getattr(table, "exchanges", None)
    return record


def _sharded_rank(rank: int, world: int, layout: str, case: str, mode: str = "adam",
                  decay: str = "touched") -> dict:
    init_distributed(timeout_s=60)
    try:
        cls = ShardedValueTable if layout == "rowwise" else ColumnShardedValueTable
        table = cls(SPEC, dist.group.WORLD, rank, world)
        return _run(table, case, [rank], group=dist.group.WORLD, mode=mode, decay=decay)
    finally:
        shutdown_distributed()


def _dense_grad(ids: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    dense = torch.zeros(N_ROWS, width)
    dense[ids] = rows
    return dense


@pytest.mark.parametrize("layout,world,case", [
    ("rowwise", 2, "uniform"), ("rowwise", 4, "uniform"), ("rowwise", 4, "skewed"),
    ("rowwise", 4, "idle_owner"), ("colwise", 2, "uniform"), ("colwise", 4, "skewed"),
])
def test_sharded_table_equals_single_process(layout, world, case):
    ref = _run(LocalValueTable(SPEC), case, list(range(world)))
    shards = run_ranks(world, _sharded_rank, world, layout, case)
    for layer in range(3):
        out = torch.cat([s[f"out{layer}"] for s in shards])
        wgrad = torch.cat([s[f"w{layer}"] for s in shards])
        torch.testing.assert_close(out, ref[f"out{layer}"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(wgrad, ref[f"w{layer}"], rtol=1e-6, atol=1e-6)
    ref_grad = _dense_grad(ref["grad_ids"], ref["grad_rows"], DIM)
    if layout == "rowwise":
        grad = sum(_dense_grad(s["grad_ids"], s["grad_rows"], DIM) for s in shards)
        table = torch.cat([s["table"] for s in shards])
    else:
        grad = torch.cat([_dense_grad(s["grad_ids"], s["grad_rows"], DIM // world)
                          for s in shards], dim=1)
        table = torch.cat([s["table"] for s in shards], dim=1)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    for step in range(3):
        assert shards[0][f"norm{step}"] == pytest.approx(ref[f"norm{step}"], rel=1e-6)
    torch.testing.assert_close(table, ref["table"], rtol=1e-6, atol=1e-6)
    if case == "idle_owner":
        assert shards[-1]["grad_ids"].numel() == 0  # received no hit, and nothing broke
    if layout == "rowwise":  # both exchanges were exercised where they should win
        used = {k: sum(s["exchanges"][k] for s in shards) for k in ("partial", "rows")}
        assert used["rows" if case == "skewed" else "partial"] > 0, used


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", [m for m in MEMORY_OPTIMIZERS if m != "adam"])
def test_sharded_modes_equal_single_process(mode, world):
    """Every optimizer mode, row-sharded at ep=2 and ep=4, moves the table as one process."""
    ref = _run(LocalValueTable(SPEC), "uniform", list(range(world)), mode=mode)
    shards = run_ranks(world, _sharded_rank, world, "rowwise", "uniform", mode)
    table = torch.cat([s["table"] for s in shards])
    torch.testing.assert_close(table, ref["table"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode,world,case", [("adam", 4, "skewed"),
                                             ("adam_b1zero_rowwise", 2, "uniform")])
def test_global_weight_decay_sharded_equals_single_process(mode, world, case):
    """Global weight decay on a row-sharded table: owners read their rows with the decay owed
    (partial sums and rows exchanges alike) and catch up the rows they update, as one process
    does; outputs, weight gradients and the caught-up table agree."""
    ref = _run(LocalValueTable(SPEC), case, list(range(world)), mode=mode,
               decay="global")
    shards = run_ranks(world, _sharded_rank, world, "rowwise", case, mode, "global")
    for layer in range(3):
        torch.testing.assert_close(torch.cat([s[f"out{layer}"] for s in shards]),
                                   ref[f"out{layer}"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.cat([s[f"w{layer}"] for s in shards]),
                                   ref[f"w{layer}"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.cat([s[f"last{layer}"] for s in shards]),
                                   ref[f"last{layer}"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([s["table"] for s in shards]), ref["table"],
                               rtol=1e-6, atol=1e-6)


class _LargestNewTensor(TorchDispatchMode):
    """Records the largest tensor any op allocates (outputs aliasing an input, such as
    in-place row updates of the table, are not new allocations)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs \
                    and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


def test_no_dense_table_gradient_in_a_training_step(tiny_config):
    """A whole training step (forward, backward, clipping, both optimizers) on a 1M-slot
    table never allocates anything near the table's size."""
    from memtron.train.trainer import Trainer

    cfg = tiny_config(**{"memory.n_sub_keys": 1024, "memory.value_dim": 32,
                         "model.n_heads": 4, "model.n_kv_heads": 2})
    trainer = Trainer(cfg)
    batches = trainer.batches()
    trainer.train_step(batches)  # optimizer state allocated once, outside the probe
    table = trainer.tables["table0"].weight
    with _LargestNewTensor() as probe:
        trainer.train_step(batches)
    assert table.numel() == 1024**2 * 32
    assert probe.largest < table.numel() // 100, (probe.largest, probe.op)


def _probe_sharded(rank: int, world: int) -> tuple[int, int]:
    init_distributed(timeout_s=60)
    try:
        table = ShardedValueTable(TableSpec("t", 1 << 20, 16, SEED), dist.group.WORLD, rank,
                                  world)
        opt = SparseRowOptimizer({"t": table}, lr=0.01, betas=(0.9, 0.99))
        ids = torch.randint(0, 1 << 20, (64, 128))
        weights = torch.rand(64, 128, requires_grad=True)
        with _LargestNewTensor() as probe:
            (table.lookup(ids, weights) ** 2).sum().backward()
            opt.step()
        return probe.largest, table.weight.numel(), ids.numel() * table.dim
    finally:
        shutdown_distributed()


def test_no_dense_gradient_in_sharded_lookup():
    """Allocations scale with the hits (8192 x d), never with the 524288-row shard."""
    for largest, shard, hit_rows in run_ranks(2, _probe_sharded, 2):
        assert largest <= 2 * hit_rows, (largest, hit_rows)
        assert largest < shard // 50, (largest, shard)


RESUME_STEPS, SAVED_AT, RESUME_TOKENS = 4, 2, 12


def _resume_steps(tables: dict, opts: dict, steps: range, rank: int, world: int) -> None:
    """The same global batches whatever the world: each rank looks up its slice of tokens."""
    for step in steps:
        g = torch.Generator().manual_seed(500 + step)
        ids = torch.randint(0, N_ROWS, (RESUME_TOKENS, HITS), generator=g)
        weights = torch.rand(RESUME_TOKENS, HITS, generator=g)
        grad_out = torch.randn(RESUME_TOKENS, DIM, generator=g)
        mine = slice(rank * RESUME_TOKENS // world, (rank + 1) * RESUME_TOKENS // world)
        for case, table in tables.items():
            (table.lookup(ids[mine], weights[mine]) * grad_out[mine]).sum().backward()
            opts[case].step()
            opts[case].zero_grad()


def _resume_state(tables: dict, opts: dict, world: int) -> dict:
    """The trainer's checkpoint layout: table and optimizer state sharded on dim 0 over ep."""
    from memtron.parallel.mesh import init_mesh
    from memtron.parallel.sharding import CheckpointLayout

    layout = CheckpointLayout(init_mesh(dp=world, ep=world))
    return {case: {"weight": layout.view(table.weight, table.weight),
                   "optim": {k: layout.view(v, table.weight) if v.dim() else v
                             for k, v in opts[case].state_dict()["t"].items()}}
            for case, table in tables.items()}


# Every mode on an fp32 table, and two on bf16 tables (stochastically rounded updates); with
# global weight decay, whose per-row clocks are saved owing decay and resharded.
RESUME_CASES = [(mode, "fp32", "touched") for mode in MEMORY_OPTIMIZERS] + [
    ("rowwise_adagrad", "bf16", "touched"), ("adam_rowwise_v", "bf16", "touched"),
    ("adam", "fp32", "global"), ("adam_b1zero_rowwise", "fp32", "global"),
    ("rowwise_adagrad", "bf16", "global")]


def _resume_tables(rank: int, world: int) -> tuple[dict, dict]:
    tables, opts = {}, {}
    for mode, dtype, decay in RESUME_CASES:
        case, dtype = f"{mode}/{dtype}/{decay}", STORAGE_DTYPES[dtype]
        spec = TableSpec("t", N_ROWS, DIM, SEED, dtype=dtype)
        tables[case] = (ShardedValueTable(spec, dist.group.WORLD, rank, world)
                        if world > 1 else LocalValueTable(spec))
        opts[case] = SparseRowOptimizer({"t": tables[case]}, lr=0.05, betas=(0.9, 0.95),
                                        mode=mode, moment_dtype=dtype, decay_mode=decay,
                                        weight_decay=0.5 if decay == "global" else 0.0)
    return tables, opts


def _resume_rank(rank: int, world: int, path: str | None, save: bool) -> dict:
    """Every case's table at ``world`` ranks: trained to SAVED_AT and saved to ``path``, or
    loaded from it and trained on to RESUME_STEPS; with no path, trained to RESUME_STEPS."""
    import torch.distributed.checkpoint as dcp

    if world > 1:
        init_distributed(timeout_s=60)
    try:
        tables, opts = _resume_tables(rank, world)
        if path is None:
            _resume_steps(tables, opts, range(RESUME_STEPS), rank, world)
        elif save:
            _resume_steps(tables, opts, range(SAVED_AT), rank, world)
            dcp.save(_resume_state(tables, opts, world), checkpoint_id=path)
        else:
            dcp.load(_resume_state(tables, opts, world), checkpoint_id=path)
            _resume_steps(tables, opts, range(SAVED_AT, RESUME_STEPS), rank, world)
        for opt in opts.values():  # every row decayed as of the last step (global decay)
            opt.catch_up_decay()
        return {case: t.weight.detach().clone() for case, t in tables.items()}
    finally:
        if world > 1:
            shutdown_distributed()


def test_every_mode_resumes_exactly_and_reshards(tmp_path):
    """Saved at ep=2 after 2 steps: resumed in one process and at ep=4, every mode's table
    after 4 steps equals the uninterrupted single-process run (bf16 tables: within a bf16
    rounding, the fp32 sums' order differs); at ep=1 resumed from an ep=1 checkpoint, bit for
    bit, stochastic rounding included."""
    ref = _resume_rank(0, 1, None, False)
    _resume_rank(0, 1, str(tmp_path / "ep1"), True)
    exact = _resume_rank(0, 1, str(tmp_path / "ep1"), False)
    run_ranks(2, _resume_rank, 2, str(tmp_path / "ep2"), True)
    single = _resume_rank(0, 1, str(tmp_path / "ep2"), False)
    ep4 = run_ranks(4, _resume_rank, 4, str(tmp_path / "ep2"), False)
    initial = LocalValueTable(SPEC).weight
    # Global decay (wd 0.5) moved the rows: the clocks took part.
    assert not torch.allclose(ref["adam/fp32/global"], ref["adam/fp32/touched"])
    for case, table in ref.items():
        tol = 1e-6 if table.dtype == torch.float32 else 1e-2
        assert torch.equal(exact[case], table), case
        torch.testing.assert_close(single[case], table, rtol=tol, atol=tol)
        torch.testing.assert_close(torch.cat([s[case] for s in ep4]), table, rtol=tol, atol=tol)
        assert not torch.equal(table.float(), initial)


# --------------------------------------------------------------------------- tp-sliced lookups

TP_TOKENS = 7  # per dp rank: not divisible by tp=2


def _tp_batch(dp_rank: int, step: int, layer: int):
    """(ids, weights, output grad) of one dp rank's tokens; its tp peers all see the same."""
    g = torch.Generator().manual_seed(7000 + 100 * step + 10 * layer + dp_rank)
    ids = torch.randint(0, N_ROWS, (TP_TOKENS, HITS), generator=g)
    ids[0, 1] = ids[0, 0]
    return (ids, torch.rand(TP_TOKENS, HITS, generator=g),
            torch.randn(TP_TOKENS, DIM, generator=g))


def _tp_run(table, lookup, dp_ranks: list[int], reduce=None, steps: int = 3,
            layers: int = 2, mode: str = "adam") -> dict:
    """``steps`` optimizer steps on a table read by ``layers`` lookups per step; the loss is
    the mean over ``dp_ranks`` of each dp rank's sum (one process plays all of them in the
    reference). Records step 0's outputs, weight gradients and row gradients."""
    opt = SparseRowOptimizer({"t": table}, lr=0.05, betas=(0.9, 0.95), weight_decay=0.01,
                             mode=mode)
    record = {}
    for step in range(steps):
        loss = 0
        for layer in range(layers):
            batches = [_tp_batch(r, step, layer) for r in dp_ranks]
            ids = torch.cat([b[0] for b in batches])
            weights = torch.cat([b[1] for b in batches]).requires_grad_(True)
            out = lookup(table, ids, weights)
            loss = loss + (out * torch.cat([b[2] for b in batches])).sum() / len(dp_ranks)
            if step == 0:
                record[f"out{layer}"], record[f"w{layer}"] = out.detach(), weights
        loss.backward()
        if reduce is not None:
            reduce(table)
        if step == 0:
            record.update({k: v.grad.clone() for k, v in record.items() if k[0] == "w"})
            grad = table.sparse_grad()
            ids, rows = grad if grad is not None else (torch.zeros(0, dtype=torch.int64),
                                                       torch.zeros(0, table.dim))
            record["grad"] = _dense_grad(ids + getattr(table, "row_start", 0), rows,
                                         rows.shape[1])
        opt.step()
        opt.zero_grad()
    record["table"] = table.weight.detach().clone()
    return record


def _tp_rank(rank: int, tp: int, ep: int, sliced: bool, layout: str) -> dict:
    """One rank of a tp x dp world (ep folded over it), its value table built by the
    trainer's factory and its gradients reduced the trainer's way."""
    from memtron.config import Config
    from memtron.parallel.memory import Traffic, reduce_table_grads, table_factory
    from memtron.parallel.mesh import build_mesh, destroy_mesh
    from memtron.parallel.token_slice import GatherTraffic, TokenSlicedLookup

    init_distributed(timeout_s=60)
    try:
        cfg = Config()
        cfg.parallel.tp, cfg.parallel.ep = tp, ep
        cfg.memory.parallel, cfg.memory.tp_slice_lookups = layout, sliced
        state = build_mesh(cfg)
        table = table_factory(cfg, state)(SPEC)
        lookup = (TokenSlicedLookup(state.tp_group, state.tp_rank, state.tp) if sliced
                  else lambda t, ids, w: t.lookup(ids, w))
        Traffic.take(), GatherTraffic.take()
        record = _tp_run(table, lookup, [state.dp_rank],
                         reduce=lambda t: reduce_table_grads([t], cfg, state))
        record["traffic"], record["gathered"] = Traffic.take(), GatherTraffic.take()
        ids, weights, _ = _tp_batch(state.dp_rank, 9, 0)
        for n in (0, 1):  # fewer tokens than tp ranks: a rank with none still takes part
            record[f"few{n}"] = (lookup(table, ids[:n], weights[:n]).detach(),
                                 table.lookup(ids[:n], weights[:n]).detach())
        record["dp_rank"], record["dp"] = state.dp_rank, state.dp
        destroy_mesh()
        return record
    finally:
        shutdown_distributed()


@pytest.mark.parametrize("tp,dp,ep,layout", [
    (2, 1, 2, "rowwise"),  # ep folded over the tp ranks
    (2, 2, 4, "rowwise"),
    (2, 2, 1, "rowwise"),  # whole tables: rows summed over tp x dp
    (2, 1, 2, "colwise"),
])
def test_tp_sliced_lookups_equal_single_process(tp, dp, ep, layout):
    """Under tp, each tp rank looks up its slice of the tokens (7 per dp rank: uneven) and the
    rows are all-gathered: outputs, weight gradients, row gradients and the table after 3
    steps equal one process; the memory exchange carries half the bytes of repeated lookups."""
    ref = _tp_run(LocalValueTable(SPEC), lambda t, i, w: t.lookup(i, w),
                  list(range(dp)))
    world = tp * dp
    sliced = run_ranks(world, _tp_rank, tp, ep, True, layout)
    for r in sliced:
        mine = slice(r["dp_rank"] * TP_TOKENS, (r["dp_rank"] + 1) * TP_TOKENS)
        for layer in range(2):
            torch.testing.assert_close(r[f"out{layer}"], ref[f"out{layer}"][mine],
                                       rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(r[f"w{layer}"] / dp, ref[f"w{layer}"][mine],
                                       rtol=1e-6, atol=1e-6)
        for n in (0, 1):
            torch.testing.assert_close(*r[f"few{n}"], rtol=1e-6, atol=1e-6)
    if ep == 1:  # whole tables: every rank holds the whole gradient and table
        grads, tables = [r["grad"] for r in sliced], [r["table"] for r in sliced]
    elif layout == "colwise":  # rank r holds columns r of every row
        grads = [torch.cat([r["grad"] for r in sliced[:ep]], dim=1)]
        tables = [torch.cat([r["table"] for r in sliced[:ep]], dim=1)]
    else:  # shard r of ep on ranks r, r + ep, ...: the first ep ranks hold one copy each
        grads = [sum(r["grad"] for r in sliced[:ep])]
        tables = [torch.cat([r["table"] for r in sliced[:ep]])]
    for grad, table in zip(grads, tables):
        torch.testing.assert_close(grad, ref["grad"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(table, ref["table"], rtol=1e-6, atol=1e-6)
    if ep > 1:
        repeated = run_ranks(world, _tp_rank, tp, ep, False, layout)
        sent = sum(r["traffic"][0] for r in sliced)
        before = sum(r["traffic"][0] for r in repeated)
        print(f"tp={tp} dp={dp} ep={ep}: memory bytes sent {before} repeated, {sent} sliced "
              f"({sent / before:.3f}); tp all-gathers {sum(r['gathered'][0] for r in sliced)}")
        assert 0.4 * before <= sent <= 0.6 * before
        torch.testing.assert_close(torch.cat([r["table"] for r in repeated[:ep]],
                                             dim=int(layout == "colwise")),
                                   ref["table"], rtol=1e-6, atol=1e-6)
