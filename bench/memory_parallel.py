"""Memory parallelism on gloo: step time and bytes/token of the value-table layouts (DESIGN §4).

For N in {1M, 16M} slots, d in {256, 1024}, H*k = 128 hits per token and P = 2, 4 ranks, each
layout of ``memtron.parallel.memory`` trains one table the way the trainer does:

    rowwise     ShardedValueTable: rank r owns rows [r*N/P, (r+1)*N/P), all-to-all lookups
    colwise     ColumnShardedValueTable: all N rows x d/P columns per rank
    replicated  LocalValueTable everywhere + dense N x d gradient all-reduce

One step, in every rank: ``lookup`` of T tokens (``--tokens``) x H*k hits (ids uniform over N,
or Zipf-skewed with ``--skew``; fp32 weights requiring grad), backward of ``(out * proj).sum()``
for a random projection ``proj``, ``reduce_table_grads`` (replicated: the dense all-reduce;
row/col-wise: owners already hold the sums), ``clip_sparse_grad_norm`` as the trainer calls it,
then ``SparseRowOptimizer.step`` and ``zero_grad``. Ranks line up on a barrier before each step; the
step time is each rank's median over ``--steps`` steps (default 3) after ``--warmup`` (default
1), and the table shows the slowest rank: 3 + 1 rather than more steps, and T = 1,024, keep the
default run under 10 minutes on 2 cores (a replicated 1M x 256 step at P=4 takes seconds). Every
configuration runs in fresh processes started the way torchrun would (env:// over gloo, one
intra-op thread per rank); 4 ranks share the 2 cores of this machine. The load average before
each run and the share of CPU time taken by other processes during the timed steps
(/proc/stat minus the ranks' own CPU time) are printed; above 10 % the row is flagged.

Bytes/token (all per rank, per token it looked up, forward + backward, averaged over ranks):

* memtron: ``Traffic.take()`` (the bytes memtron's exchanges say they sent) plus the bytes
  returned by ``reduce_table_grads`` (``dense_table_all_reduce``: the N x d payload);
* wire: an independent count, made by wrapping ``torch.distributed``'s collectives in every
  rank (memtron calls them through the module): all_to_all_single = the input rows sent to other
  ranks; all_gather(_into_tensor) = (P-1) x the rank's input; reduce_scatter_tensor = (P-1)/P x
  the input; all_reduce = 2(P-1)/P x the tensor (gloo's ring). Each call is labelled with its
  caller, so the collectives Traffic claims to count (``_exchange``'s all-to-alls, the
  column-wise gathers of ids and weights and the reduce-scatter of the weights' gradient) are
  checked against Traffic exactly, and the rest (metadata, norm, gradient sync) are listed
  apart;
* min: the analytic minimum of the layout (formulas in :func:`rowwise_min_bytes`,
  :func:`colwise_min_bytes`, :func:`replicated_min_bytes`), at 32-bit indices and fp32 values.

Memory: all P ranks live on this machine. Each configuration's footprint is estimated before
anything is allocated (:func:`rank_bytes`: table + two fp32 Adam moments per stored row + the
per-row hit counter + the replicated baseline's dense gradient and its temporaries + the step's
buffers + the process itself, x P); what cannot fit in MemTotal - 1.5 GiB is printed as "skipped
(needs ~X GiB)". Others' jobs come and go on this machine, so a configuration that fits waits
(``--patience`` s) for MemAvailable - 0.5 GiB to cover it, and is retried (3 tries) if the
OOM killer takes one of its ranks. Ranks set their oom_score_adj to 1000, so that the kernel
kills a benchmark rank rather than someone else's process. Peak RSS per rank is measured and
printed next to the estimate.

Largest trainable table at P=4: the per-rank footprint is solved for N in each layout; the
rowwise and replicated figures (d = 256) are then verified by running one step at 97 % of the
computed N (``--no-largest`` skips that).

Table values: built by memtron's own ``init_rows`` as shipped (counter-based: each rank draws
only the values it holds, N*d/P in the sharded layouts, N*d replicated). That is set-up,
reported in the "setup s" column, and outside the timed steps.

Everything is measured through the shared harness (``memtron.bench.harness``): ranks, the byte
meter on ``torch.distributed``, the load probe; ``--out FILE`` writes the rows as JSON, with the
replicated layout of each (N, d, P) as the baseline measured in the same run.

    python bench/memory_parallel.py                # the grid + largest tables (< 10 min)
    python bench/memory_parallel.py --quick        # N=64K, d=64, P=2 (< 90 s)
    python bench/memory_parallel.py --skew 1.1     # Zipf(1.1) ids, hot slots spread by a hash
    python bench/memory_parallel.py --largest-only # only the largest-table part
    python bench/memory_parallel.py --sizes 1048576 --dims 256 --ranks 2 --layouts rowwise
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from memtron.bench.harness import (  # noqa: E402 - after the sys.path line
    BenchRun,
    ByteMeter,
    GiB,
    MiB,
    add_output_args,
    machine_busy_seconds,
    meminfo,
    own_cpu_seconds,
    peak_rss,
    spawn_ranks,
)

LAYOUTS = ("rowwise", "colwise", "replicated")
IDX_BYTES = 4  # minimum: 32-bit shard-local indices (memtron's int32 for rows < 2^31)
VAL_BYTES = 4  # fp32 weights, values and gradients
MARGIN = 0.5 * GiB  # kept free below MemAvailable when a configuration starts
RESERVED = 1.5 * GiB  # of MemTotal: kernel, this parent, other users' idle processes
BASE_RANK = 330 * MiB  # a rank's RSS with torch, memtron and gloo up (measured ~300 MiB)
WORK_FACTOR = 5  # [touched rows, d_local] fp32 buffers alive at once in a step (bwd/Adam)
INDEX_TENSORS = 40  # int64 tensors of one per hit alive at once in a lookup
RUN_TIMEOUT_S = 420.0
# Collectives Traffic claims to count: (op, calling function).
# Step phases: lookup, backward, sparse_grad() coalescing, reduce_table_grads,
# clip_sparse_grad_norm, SparseRowOptimizer step + zero_grad.
PHASES = ("step", "fwd", "bwd", "coalesce", "reduce", "clip", "opt")
TRAFFIC_SCOPE = {("all_to_all_single", "_exchange"), ("all_gather", "forward"),
                 ("all_gather_into_tensor", "lookup"), ("reduce_scatter_tensor", "backward")}


@dataclass(frozen=True)
class Job:
    n: int
    d: int
    p: int
    layout: str
    tokens: int
    hk: int
    warmup: int
    steps: int
    skew: float
    seed: int = 0
    tp: int = 1  # tp ranks sharing each batch (neighbours); ep still spans all P ranks
    sliced: bool = False  # tp > 1: token-sliced lookups (parallel/token_slice.py), else repeated


# --------------------------------------------------------------------------- analytic minimum


def rowwise_pair_counts(ids: torch.Tensor, n: int, p: int) -> torch.Tensor:
    """Per owner o: [h_o, t_o, u_o] = distinct (token, slot) hits on o's rows, distinct tokens
    touching o, distinct rows of o wanted (repeated hits of a token on one slot merge)."""
    t, hk = ids.shape
    chunk = math.ceil(n / p)
    token = torch.arange(t).repeat_interleave(hk)
    pair = torch.unique(token * n + ids.reshape(-1))
    tok, slot = pair // n, pair % n
    owner = slot // chunk
    hits = torch.bincount(owner, minlength=p)
    toks = torch.bincount(torch.unique(owner * t + tok) // t, minlength=p)
    rows = torch.bincount(torch.unique(owner * n + slot) // n, minlength=p)
    return torch.stack([hits, toks, rows], dim=1)


def rowwise_min_bytes(counts: torch.Tensor, me: int, d: int) -> float:
    """Bytes the requests of rank ``me`` must put on the wire, both directions, fwd + bwd.

    For each remote owner o (counts from :func:`rowwise_pair_counts`), the cheaper of
      partial sums: h_o*(idx + w)  ids and weights out      (forward)
                 + t_o*4d          one weighted sum back per token touching o
                 + t_o*4d          that sum's gradient out  (backward)
                 + h_o*4           the weight gradients back
      rows:        u_o*idx         distinct row ids out     (forward)
                 + u_o*4d          the rows back
                 + u_o*4d          their gradients out      (backward; weight grads are local)
    Uniform ids, N >> T*H*k: h = H*k/P per remote owner, t = 1 - (1-1/P)^(H*k) ~ 1, so the
    minimum is about (P-1)/P * H*k * 12 + 8d * (P-1) bytes per token (d=256, P=2: 2,816).
    Summed over ranks and divided by P*T, this is the mean bytes a rank sends per token.
    """
    total = 0.0
    for o in range(counts.shape[0]):
        if o == me:
            continue
        h, t, u = (float(x) for x in counts[o])
        partial = h * (IDX_BYTES + VAL_BYTES) + 2 * t * VAL_BYTES * d + h * VAL_BYTES
        rows = u * IDX_BYTES + 2 * u * VAL_BYTES * d
        total += min(partial, rows)
    return total


def colwise_min_bytes(p: int, d: int, hk: int) -> float:
    """Per token per rank: every rank computes its d/P columns for every token, so
      ids + weights all-gathered:  (P-1) * H*k * (idx + w)
      output columns, forward:     (P-1)/P * 4d   (the token's other ranks' columns come in,
                                                   as many of this rank's go out)
      their gradients, backward:   (P-1)/P * 4d
      weight gradients summed:     (P-1) * H*k * 4  (each rank holds a partial [P*T, H*k]
                                   weight gradient over its columns; a reduce-scatter sends
                                   (P-1)/P of it)
    d=256, P=2: 768 + 512 + 512 + 256 = 2,048 bytes per token.
    """
    return ((p - 1) * hk * (IDX_BYTES + VAL_BYTES) + 2 * (p - 1) / p * VAL_BYTES * d
            + (p - 1) * hk * VAL_BYTES)


def replicated_min_bytes(n: int, d: int, p: int, tokens: int) -> float:
    """Per token per rank: the dense N x d fp32 all-reduce, at the bandwidth lower bound of an
    all-reduce (reduce-scatter + all-gather, as gloo's ring): 2 (P-1)/P * 4Nd per step / T."""
    return 2 * (p - 1) / p * VAL_BYTES * n * d / tokens


# --------------------------------------------------------------------------- memory estimate


def expected_distinct(n_rows: int, draws: int) -> float:
    """Expected distinct rows among ``draws`` uniform draws over ``n_rows``."""
    if n_rows <= 0:
        return 0.0
    return n_rows * -math.expm1(-draws / n_rows)


def rank_bytes(layout: str, n: int, d: int, p: int, tokens: int, hk: int) -> dict[str, float]:
    """Estimated peak bytes of one rank (uniform ids), by part.

    stored = rows x columns this rank holds; state = 4 (table) + 8 (fp32 Adam moments, dense in
    SparseRowOptimizer) bytes per stored element + 4 bytes per row (the table's int32 hit counter);
    work = WORK_FACTOR [touched rows, columns] fp32 buffers (sparse grads, their coalesced copy,
    Adam's gathered moments and rows) + INDEX_TENSORS int64 per hit processed; replicated also
    holds, during the sync, the dense N x d gradient and the N x d temporary of
    ``dense.abs()`` in ``dense_table_all_reduce``.
    """
    hits = tokens * hk
    if layout == "rowwise":
        rows, cols = math.ceil(n / p), d
        touched = expected_distinct(rows, hits)  # an owner serves ~T*H*k hits in all
        processed = hits
    elif layout == "colwise":
        rows, cols = n, d // p
        touched = expected_distinct(n, p * hits)  # every token of every rank, d/P columns
        processed = p * hits
    else:
        rows, cols = n, d
        touched = expected_distinct(n, p * hits)  # Adam updates every rank's touched rows
        processed = hits
    state = 12.0 * rows * cols + 4.0 * rows
    work = WORK_FACTOR * VAL_BYTES * touched * cols + INDEX_TENSORS * 8.0 * processed
    # dense N x d gradient + dense.abs() + the local coalesced gradient still referenced
    sync = 8.0 * n * d + VAL_BYTES * d * expected_distinct(n, hits) if layout == "replicated" \
        else 0.0
    return {"base": float(BASE_RANK), "state": state, "transient": max(work, sync)}


def total_bytes(layout: str, n: int, d: int, p: int, tokens: int, hk: int) -> float:
    return p * sum(rank_bytes(layout, n, d, p, tokens, hk).values())


def largest_rows(layout: str, d: int, p: int, tokens: int, hk: int, budget: float) -> int:
    """Largest N (a multiple of 1024 * P) whose estimated footprint fits ``budget``."""
    step = 1024 * p
    lo, hi = 0, 1
    while total_bytes(layout, hi * step, d, p, tokens, hk) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total_bytes(layout, mid * step, d, p, tokens, hk) <= budget:
            lo = mid
        else:
            hi = mid
    return lo * step


# --------------------------------------------------------------------------- inside a rank


def _zipf(gen: torch.Generator, n: int, size: tuple[int, int], s: float) -> torch.Tensor:
    """Ranks ~ Zipf(s) over [0, n) by inverse CDF of the continuous power law, spread over the
    table by a multiplicative hash so that hot slots land on every owner."""
    u = torch.rand(size, generator=gen, dtype=torch.float64)
    if abs(s - 1.0) < 1e-9:
        x = torch.pow(float(n), u)
    else:
        a = 1.0 - s
        x = torch.pow((float(n) ** a - 1.0) * u + 1.0, 1.0 / a)
    rank = (x.floor().long() - 1).clamp_(0, n - 1)
    mult = 2654435761
    while math.gcd(mult, n) != 1:
        mult += 2
    return (rank * mult) % n


def _batch(job: Job, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(job.seed * 1_000_003 + 7919 * rank + 104_729 * step)
    if job.skew > 0:
        ids = _zipf(gen, job.n, (job.tokens, job.hk), job.skew)
    else:
        ids = torch.randint(0, job.n, (job.tokens, job.hk), generator=gen)
    weights = torch.rand(job.tokens, job.hk, generator=gen)
    proj = torch.randn(job.tokens, job.d, generator=gen)
    return ids, weights, proj


def rank_main(rank: int, world: int, job: Job) -> dict[str, Any]:
    """One rank of one configuration; returns its measurements."""
    import torch.distributed as dist

    from memtron.config import Config
    from memtron.model.tables import LocalValueTable, TableSpec
    from memtron.parallel.launch import init_distributed, shutdown_distributed
    from memtron.parallel.memory import (
        ColumnShardedValueTable,
        ShardedValueTable,
        Traffic,
        norm_group,
        reduce_table_grads,
    )
    from memtron.parallel.state import ParallelState
    from memtron.parallel.token_slice import GatherTraffic, TokenSlicedLookup
    from memtron.train.optim import SparseRowOptimizer, clip_sparse_grad_norm

    warnings.filterwarnings("ignore", message=".*is deprecated. Please use.*",
                            category=FutureWarning)  # torch 2.13 renamed two collectives
    meter = ByteMeter().install()
    init_distributed(timeout_s=RUN_TIMEOUT_S)
    try:
        world = dist.group.WORLD
        rss_start = peak_rss(hwm=False)
        t_setup = time.perf_counter()
        if job.layout == "rowwise":
            table = ShardedValueTable(TableSpec("t", job.n, job.d, 1), world, rank, job.p)
        elif job.layout == "colwise":
            table = ColumnShardedValueTable(TableSpec("t", job.n, job.d, 1), world, rank, job.p)
        else:
            table = LocalValueTable(TableSpec("t", job.n, job.d, 1))
        table.train()
        cfg = Config()
        cfg.memory.parallel, cfg.memory.tp_slice_lookups = job.layout, job.sliced
        tp_group, lookup = None, table.lookup
        for first in range(0, job.p, job.tp) if job.tp > 1 else ():  # all ranks make all groups
            group = dist.new_group(list(range(first, first + job.tp)))
            tp_group = group if first <= rank < first + job.tp else tp_group
        if job.sliced:
            sliced = TokenSlicedLookup(tp_group, rank % job.tp, job.tp)
            lookup = functools.partial(sliced, table)
        state = ParallelState(world_size=job.p, rank=rank, tp=job.tp, dp=job.p // job.tp,
                              ep=job.p, tp_rank=rank % job.tp, dp_rank=rank // job.tp,
                              ep_rank=rank, tp_group=tp_group, dp_group=world,
                              dp_cp_group=world, ep_group=world)
        opt = SparseRowOptimizer({"t": table}, lr=1e-3, betas=(0.9, 0.999))
        setup_s = time.perf_counter() - t_setup
        rss_setup = peak_rss(hwm=False)

        total = job.warmup + job.steps
        phases: dict[str, list[float]] = {k: [] for k in PHASES}
        comm, traffic, sync_bytes, wire, min_bytes = [], [], [], [], []
        counts_rows = None
        busy0 = cpu0 = 0.0
        gathered = []
        for i in range(total):
            ids, w, proj = _batch(job, rank // job.tp, i)  # tp peers share their dp batch
            weights = w.requires_grad_(True)
            if job.layout == "rowwise":
                pair_counts = rowwise_pair_counts(ids, job.n, job.p)
                counts_rows = pair_counts if counts_rows is None else counts_rows + pair_counts
                step_min = rowwise_min_bytes(pair_counts, rank, job.d)
            elif job.layout == "colwise":
                step_min = colwise_min_bytes(job.p, job.d, job.hk) * job.tokens
            else:
                step_min = replicated_min_bytes(job.n, job.d, job.p, job.tokens) * job.tokens
            Traffic.take()
            GatherTraffic.take()
            meter.take()
            dist.barrier()
            if i == job.warmup:
                busy0, cpu0, wall0 = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
            meter.active = True
            t0 = time.perf_counter()
            out = lookup(ids, weights)
            t1 = time.perf_counter()
            (out * proj).sum().backward()
            t2 = time.perf_counter()
            table.sparse_grad()  # coalesce now (cached; the calls below would do it first)
            t3 = time.perf_counter()
            synced = reduce_table_grads([table], cfg, state)
            t4 = time.perf_counter()
            clip_sparse_grad_norm([table], 1.0, norm_group(cfg, state))
            t5 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            t6 = time.perf_counter()
            meter.active = False
            sent, _ = Traffic.take()
            counted = meter.take()
            comm_s = counted["seconds"]
            by_call: dict[tuple[str, str], float] = {}
            for row in counted["rows"]:  # (op, calling function) as TRAFFIC_SCOPE names them
                key = (row["api"], row["origin"].rsplit(".", 1)[-1])
                by_call[key] = by_call.get(key, 0.0) + row["wire"]
            if i >= job.warmup:
                times = (t6 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)
                for key, value in zip(phases, times):
                    phases[key].append(value)
                comm.append(comm_s)
                traffic.append(sent)
                gathered.append(GatherTraffic.take()[0])
                sync_bytes.append(synced)
                wire.append(by_call)
                min_bytes.append(step_min)
        dist.barrier()
        busy1, cpu1, wall1 = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
        return {
            "rank": rank,
            "median": {k: statistics.median(v) for k, v in phases.items()},
            "comm": statistics.median(comm),
            "traffic": traffic,
            "gathered": gathered,
            "sync": sync_bytes,
            "wire": wire,
            "min": min_bytes,
            "exchanges": dict(getattr(table, "exchanges", {})),
            "rss": {"start": rss_start, "setup": rss_setup, "peak": peak_rss(hwm=False)},
            "setup_s": setup_s,
            "cpu": {"busy": busy1 - busy0, "own": cpu1 - cpu0, "wall": wall1 - wall0},
            "counts": None if counts_rows is None else counts_rows.tolist(),
        }
    finally:
        shutdown_distributed()


# --------------------------------------------------------------------------- spawning


def run_job(job: Job) -> tuple[list[dict] | None, str, float]:
    """Run one configuration on ``job.p`` fresh ranks; (results in rank order, error, the
    lowest MemAvailable seen meanwhile)."""
    ranks = spawn_ranks(rank_main, job.p, (job,), timeout=RUN_TIMEOUT_S)
    if not ranks.ok:
        return None, "; ".join(e.strip().splitlines()[-1][:160] if "failed" in e else
                               e.splitlines()[0] for e in ranks.errors), ranks.low_mem_available
    return ranks.results, "", ranks.low_mem_available


# --------------------------------------------------------------------------- reporting


def human(n: int) -> str:
    if n % MiB == 0:
        return f"{n // MiB}M"
    if n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def summarize(job: Job, results: list[dict]) -> dict[str, Any]:
    """Rank-max step time, mean bytes per rank per token, Traffic vs wire check."""
    p, tokens, steps = job.p, job.tokens, job.steps
    slowest = max(results, key=lambda r: r["median"]["step"])
    per_tok = p * tokens * steps  # bytes summed over ranks and steps -> per rank per token
    traffic = sum(sum(r["traffic"]) for r in results) / per_tok
    sync = sum(sum(r["sync"]) for r in results) / per_tok
    wire_by: dict[tuple[str, str], float] = {}
    for r in results:
        for step in r["wire"]:
            for key, value in step.items():
                wire_by[key] = wire_by.get(key, 0.0) + value
    wire = sum(wire_by.values()) / per_tok
    in_scope = sum(v for k, v in wire_by.items() if k in TRAFFIC_SCOPE) / per_tok
    outside = {f"{op}@{fn}": v / per_tok for (op, fn), v in sorted(wire_by.items())
               if (op, fn) not in TRAFFIC_SCOPE}
    traffic_steps = [t for r in results for t in r["traffic"]]
    scope_steps = [sum(v for k, v in s.items() if k in TRAFFIC_SCOPE)
                   for r in results for s in r["wire"]]
    exact = all(abs(a - b) < 0.5 for a, b in zip(traffic_steps, scope_steps))
    minimum = sum(sum(r["min"]) for r in results) / per_tok
    own = sum(r["cpu"]["own"] for r in results)
    busy, span = results[0]["cpu"]["busy"], results[0]["cpu"]["wall"] * (os.cpu_count() or 1)
    foreign = max(0.0, busy - own) / span if span > 0 else float("nan")
    exchanges: dict[str, int] = {}
    for r in results:
        for k, v in r["exchanges"].items():
            exchanges[k] = exchanges.get(k, 0) + v
    return {
        "step_ms": 1e3 * slowest["median"]["step"],
        "phases_ms": {k: 1e3 * v for k, v in slowest["median"].items() if k != "step"},
        "comm_ms": 1e3 * slowest["comm"],
        "memtron": traffic + sync,
        "traffic": traffic,
        "sync": sync,
        "wire": wire,
        "in_scope": in_scope,
        "outside": outside,
        "traffic_exact": exact,
        "min": minimum,
        "peak": sum(r["rss"]["peak"] for r in results),
        "peak_rank": max(r["rss"]["peak"] for r in results),
        "setup_s": max(r["setup_s"] for r in results),
        "foreign": foreign,
        "exchanges": exchanges,
    }


def budget_now() -> float:
    """Bytes a configuration may take now: MemAvailable less a margin."""
    return meminfo()["MemAvailable"] - MARGIN


def capacity() -> float:
    """Bytes a configuration may take on this machine when nothing else runs on it."""
    return meminfo()["MemTotal"] - RESERVED


def wait_for_memory(need: float, patience: float) -> bool:
    """Other engineers' jobs come and go on this machine: wait up to ``patience`` seconds for
    ``need`` bytes to be free."""
    deadline = time.monotonic() + patience
    while budget_now() < need:
        if time.monotonic() > deadline:
            return False
        time.sleep(2.0)
    return True


def run_grid(jobs: list[Job], patience: float = 120.0,
             tries: int = 3) -> list[tuple[Job, dict | None, str, float]]:
    rows = []
    for job in jobs:
        need = total_bytes(job.layout, job.n, job.d, job.p, job.tokens, job.hk)
        tag = f"N={human(job.n)} d={job.d} P={job.p} {job.layout}"
        if job.layout == "colwise" and job.d % job.p:
            rows.append((job, None, "skipped (d % P != 0)", need))
            continue
        if need > capacity():
            rows.append((job, None, f"skipped (needs ~{need / GiB:.1f} GiB)", need))
            print(f"  {tag}: skipped, needs ~{need / GiB:.1f} GiB of "
                  f"{capacity() / GiB:.1f}", flush=True)
            continue
        notes = []
        for attempt in range(tries):
            if not wait_for_memory(need, patience):
                results, error = None, (f"not run: ~{need / GiB:.1f} GiB never free for "
                                        f"{patience:.0f} s (foreign memory use)")
                break
            start = time.perf_counter()
            load = os.getloadavg()[0]
            results, error, low = run_job(job)
            wall = time.perf_counter() - start
            if results is not None or "SIGKILL" not in error or attempt == tries - 1:
                break
            notes.append(f"OOM-killed at try {attempt + 1}, MemAvailable fell to "
                         f"{low / GiB:.1f} GiB")
            print(f"  {tag}: killed (MemAvailable fell to {low / GiB:.1f} GiB), retrying",
                  flush=True)
        if results is None:
            rows.append((job, None, f"failed ({error})", need))
            print(f"  {tag}: FAILED: {error}", flush=True)
            continue
        summary = summarize(job, results)
        summary.update(load_before=load, wall_s=wall, low_mem=low)
        status = "ok" + (f" ({'; '.join(notes)})" if notes else "")
        rows.append((job, summary, status, need))
        print(f"  {tag}: {summary['step_ms']:.0f} ms/step, {wall:.0f} s wall, "
              f"load1 {load:.2f}, foreign CPU {100 * summary['foreign']:.0f} %, peak RSS "
              f"{summary['peak'] / GiB:.2f} GiB (est {need / GiB:.2f})", flush=True)
    return rows


def print_table(rows: list[tuple[Job, dict | None, str, float]]) -> None:
    print()
    head = (f"{'N':>5} {'d':>5} {'P':>2} {'layout':<10} {'step ms':>8} {'B/tok memtron':>13} "
            f"{'B/tok wire':>11} {'B/tok min':>10} {'memtron/min':>11} {'wire/min':>8}  status")
    print(head)
    print("-" * len(head))
    for job, s, status, _ in rows:
        lead = f"{human(job.n):>5} {job.d:>5} {job.p:>2} {job.layout:<10}"
        if s is None:
            print(f"{lead} {'-':>8} {'-':>13} {'-':>11} {'-':>10} {'-':>11} {'-':>8}  {status}")
            continue
        flag = f" (foreign load {100 * s['foreign']:.0f} %)" if s["foreign"] > 0.1 else ""
        print(f"{lead} {s['step_ms']:>8.0f} {s['memtron']:>13,.0f} {s['wire']:>11,.0f} "
              f"{s['min']:>10,.0f} {s['memtron'] / s['min']:>11.2f} "
              f"{s['wire'] / s['min']:>8.2f}  {status}{flag}")
    print()
    print("Details, ms (slowest rank's medians): fwd = lookup, bwd = backward, coal. = "
          "sparse_grad() coalescing, reduce = reduce_table_grads, clip = clip_sparse_grad_norm,")
    print("opt = SparseRowOptimizer step + zero_grad; comm = time inside collectives "
          "(fwd+bwd+sync, incl. waiting for peers); est/peak = memory of all ranks")
    head = (f"{'N':>5} {'d':>5} {'P':>2} {'layout':<10} {'fwd':>6} {'bwd':>6} {'coal.':>6} "
            f"{'reduce':>6} {'clip':>6} {'opt':>6} {'comm':>6} {'est GiB':>7} {'peak GiB':>8} "
            f"{'setup s':>7} "
            f"{'load1':>5} {'frgn%':>5}  exchanges")
    print(head)
    print("-" * len(head))
    for job, s, _, need in rows:
        if s is None:
            continue
        ph = s["phases_ms"]
        ex = ", ".join(f"{k} {v}" for k, v in s["exchanges"].items()) or "-"
        print(f"{human(job.n):>5} {job.d:>5} {job.p:>2} {job.layout:<10} {ph['fwd']:>6.0f} "
              f"{ph['bwd']:>6.0f} {ph['coalesce']:>6.0f} {ph['reduce']:>6.0f} "
              f"{ph['clip']:>6.0f} {ph['opt']:>6.0f} {s['comm_ms']:>6.0f} "
              f"{need / GiB:>7.2f} {s['peak'] / GiB:>8.2f} {s['setup_s']:>7.1f} "
              f"{s['load_before']:>5.2f} {100 * s['foreign']:>5.0f}  {ex}")
    print()
    print("Traffic check (bytes per rank per token): Traffic.take() vs the wrapped collectives "
          "it claims to count")
    print("(all-to-alls from _exchange, col-wise ids/weights gathers); wire traffic outside "
          "that scope listed:")
    for job, s, _, _ in rows:
        if s is None:
            continue
        verdict = "exact, every step and rank" if s["traffic_exact"] else "DISAGREE"
        outside = ", ".join(f"{k} {v:,.1f}" for k, v in s["outside"].items()) or "none"
        print(f"  N={human(job.n)} d={job.d} P={job.p} {job.layout}: Traffic "
              f"{s['traffic']:,.1f} vs own {s['in_scope']:,.1f} -> {verdict}; "
              f"reduce_table_grads {s['sync']:,.1f}; outside Traffic: {outside}")


# --------------------------------------------------------------------------- main


def tp_bytes(n: int, d: int, p: int, tokens: int, hk: int, warmup: int, steps: int,
             skew: float) -> None:
    """Memory-exchange bytes (``Traffic``) at tp=1 and at tp=2, with every tp rank repeating
    the lookups of its batch and with token-sliced lookups; row-wise tables over all P ranks,
    T tokens per dp batch (shared by the batch's tp ranks)."""
    print(f"\ntp de-duplication: rowwise N={human(n)} d={d} P={p}, T={tokens} tokens per dp "
          f"batch, H*k={hk}; bytes per rank per step (median), forward + backward")
    print(f"{'layout':<34} {'memory exchange':>16} {'per batch token':>16} "
          f"{'tp all-gathers':>15}")
    base = None
    for tp, sliced, label in ((1, False, "tp=1"), (2, False, "tp=2, lookups repeated"),
                              (2, True, "tp=2, token-sliced lookups")):
        job = Job(n, d, p, "rowwise", tokens, hk, warmup, steps, skew, tp=tp, sliced=sliced)
        results, error, _ = run_job(job)
        if results is None:
            print(f"{label:<34} failed: {error}")
            continue
        sent = statistics.median(statistics.mean(r["traffic"][i] for r in results)
                                 for i in range(steps))
        gathered = statistics.median(statistics.mean(r["gathered"][i] for r in results)
                                     for i in range(steps))
        base = sent if tp == 2 and not sliced else base
        ratio = f" ({sent / base:.3f} x repeated)" if sliced and base else ""
        print(f"{label:<34} {sent:>16,.0f} {sent / tokens:>16,.1f} {gathered:>15,.0f}{ratio}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=64K, d=64, P=2, 1+3 steps")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2**20, 2**24])
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank per step (T)")
    ap.add_argument("--hits", type=int, default=128, help="H*k hits per token")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (R)")
    ap.add_argument("--skew", type=float, default=0.0, help="Zipf exponent of ids (0: uniform)")
    ap.add_argument("--largest-p", type=int, default=4)
    ap.add_argument("--largest-d", type=int, default=256)
    ap.add_argument("--no-largest", action="store_true", help="skip the largest-table runs")
    ap.add_argument("--largest-only", action="store_true", help="only the largest-table part")
    ap.add_argument("--tp-bytes", action="store_true",
                    help="only the memory bytes at tp=1 vs tp=2 (repeated and token-sliced "
                         "lookups), rowwise, first of --sizes/--dims/--ranks")
    ap.add_argument("--patience", type=float, default=60.0,
                    help="seconds to wait for other jobs to free the memory a run needs")
    add_output_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.dims, args.ranks = [65536], [64], [2]
        args.warmup, args.steps = 1, 3
        args.no_largest = True

    began = time.perf_counter()
    info = meminfo()
    print(f"memtron memory-parallel benchmark: torch {torch.__version__}, gloo, "
          f"{os.cpu_count()} cores, MemTotal {info['MemTotal'] / GiB:.1f} GiB, MemAvailable "
          f"{info['MemAvailable'] / GiB:.1f} GiB, load average {os.getloadavg()}")
    print(f"T={args.tokens} tokens/rank/step, H*k={args.hits}, ids "
          f"{f'Zipf({args.skew:g})' if args.skew else 'uniform'}, warm-up {args.warmup}, "
          f"median of {args.steps} steps; budget = MemAvailable - {MARGIN / GiB:.1f} GiB")
    if args.tp_bytes:
        tp_bytes(args.sizes[0], args.dims[0], args.ranks[0], args.tokens, args.hits,
                 args.warmup, args.steps, args.skew)
        return 0
    jobs = [Job(n, d, p, layout, args.tokens, args.hits, args.warmup, args.steps, args.skew)
            for n in args.sizes for d in args.dims for p in args.ranks for layout in args.layouts]
    bench = BenchRun("memory_parallel", args).start()
    rows: list[tuple[Job, dict | None, str, float]] = []
    if not args.largest_only:
        rows = run_grid(jobs, args.patience)
        print_table(rows)
    bench.results = [{"job": asdict(job), "summary": s, "status": status, "need_bytes": need}
                     for job, s, status, need in rows]
    bench.baseline = {"kind": "replicated table + dense gradient all-reduce, same N, d, P, T",
                      "step_ms": {f"{human(job.n)}/{job.d}/{job.p}": s["step_ms"]
                                  for job, s, _, _ in rows
                                  if s is not None and job.layout == "replicated"}}

    # ------------------------------------------------------------------ largest tables
    p, d, t, hk = args.largest_p, args.largest_d, args.tokens, args.hits
    budget = capacity()
    print()
    print(f"Largest trainable table at P={p}, T={t}, H*k={hk}, within MemTotal - "
          f"{RESERVED / GiB:.1f} GiB = {budget / GiB:.1f} GiB (per rank: {BASE_RANK / MiB:.0f} MiB "
          f"+ 12 B/stored element + 4 B/stored row + {WORK_FACTOR} x [touched rows, d_local] "
          "fp32 step buffers; replicated: at least 2 x N x d fp32 more during the dense sync):")
    print(f"{'d':>5} {'layout':<10} {'largest N':>14} {'table GiB':>9} {'x replicated':>12}")
    largest: dict[tuple[int, str], int] = {}
    for dim in sorted({d, *args.dims}):
        rep = largest_rows("replicated", dim, p, t, hk, budget)
        for layout in LAYOUTS:
            n_max = largest_rows(layout, dim, p, t, hk, budget)
            largest[(dim, layout)] = n_max
            ratio = f"{n_max / rep:.2f}" if rep else "inf"
            print(f"{dim:>5} {layout:<10} {n_max:>14,} {n_max * dim * 4 / GiB:>9.2f} "
                  f"{ratio:>12}")
    if args.no_largest:
        print("(verification runs skipped: --no-largest / --quick)")
    else:
        print(f"Verification: one step (no warm-up) at 97 % of the computed N, d={d}, P={p} "
              "(if other jobs hold too much memory for that, at 97 % of the largest N that fits "
              "what they leave free):")
        unit = 1024 * p
        verified = {}
        for layout in ("replicated", "rowwise"):
            n_run = int(largest[(d, layout)] * 0.97) // unit * unit
            note = "at 97 % of the computed largest N"
            if not wait_for_memory(total_bytes(layout, n_run, d, p, t, hk), args.patience):
                free = budget_now()
                n_run = int(largest_rows(layout, d, p, t, hk, free) * 0.97) // unit * unit
                note = (f"BELOW the computed largest: other jobs left only "
                        f"{free / GiB:.1f} GiB free for {args.patience:.0f} s")
            job = Job(n_run, d, p, layout, t, hk, 0, 1, args.skew)
            got = run_grid([job], args.patience)[0]
            verified[layout] = (n_run, got)
            _, s, status, need = got
            if s is None:
                print(f"  {layout}: N={n_run:,} -> {status}")
                continue
            print(f"  {layout}: N={n_run:,} ({n_run * d * 4 / GiB:.2f} GiB table; {note}) "
                  f"trained one step in {s['step_ms']:.0f} ms; estimated {need / GiB:.2f} GiB, "
                  f"measured peak RSS {s['peak'] / GiB:.2f} GiB over {p} ranks; "
                  f"{s['memtron']:,.0f} B/tok memtron, {s['wire']:,.0f} wire, "
                  f"min {s['min']:,.0f}")
        rep_max = largest[(d, "replicated")]
        row_ok = verified["rowwise"][1][1] is not None
        rep_ok = verified["replicated"][1][1] is not None
        full = rep_ok and verified["replicated"][0] >= int(rep_max * 0.97) // unit * unit
        ratio = verified["rowwise"][0] / max(1, rep_max)
        print(f"  rowwise N trained / replicated computed largest N = {ratio:.2f} "
              f"({'ok' if row_ok and ratio >= 4 else 'NOT VERIFIED'}; target >= 4); computed "
              f"ratio {largest[(d, 'rowwise')] / max(1, rep_max):.2f}; replicated figure "
              f"{'verified at 97 %' if full else 'NOT verified at 97 % (see above)'}")
    print(f"\ntotal wall time {time.perf_counter() - began:.0f} s; load average "
          f"{os.getloadavg()}")
    bench.finish()
    return 0 if all(s is not None or status.startswith("skipped")
                    for _, s, status, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
