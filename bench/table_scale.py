"""Value tables at scale (issue 15): initialisation speed, step time against table size at fixed
tokens, the largest table one process trains, and bytes per table parameter per optimizer mode.

All of it is memtron as shipped: ``LocalValueTable`` (its counter-based init), ``table.lookup``
with its sparse backward, ``SparseRowOptimizer`` in the mode asked (``train.optim``), on CPU
with whatever kernels memtron picks there (the C++ extension unless ``MEMTRON_CPU_EXT=0``).

* **init**: seconds and GB/s (table bytes / time) of building an N x d table, against filling
  the same bytes (``torch.empty(...).fill_``, the page faults every table pays) in the same run.
* **scaling**: one table step (lookup forward of T x H*k uniform random hits, backward, the
  optimizer update, zero_grad) at each size, median of ``--steps``, as a ratio to the smallest
  size. The hits are the same count at every size but the distinct rows they touch are not
  (at 64K rows 262K hits touch ~64K rows, at 16M ~260K), so the time per touched row is given
  too: a table whose cost does not depend on its size keeps that flat. The same sizes are timed
  again with the hits spread over ``--distinct`` rows drawn afresh each step (the same rows'
  work at every size), which leaves only the table size itself. The product-key scoring
  that picks the ids grows with sqrt(N) sub-keys and is not part of this: ``pkm_layer.py``
  times the whole layer.
* **largest**: a fresh 'spawn' child builds an N x d table in ``--largest-dtype`` with the
  ``--largest-optimizer`` state and trains ``--largest-steps`` steps; peak RSS (VmHWM) and
  times. ``--largest-rows`` default: 6B parameters at d = 256.
* **bytes**: table + optimizer state per table parameter for each mode and dtype
  (``SparseRowOptimizer.bytes_per_parameter``).

    python bench/table_scale.py --quick        # 64K / 256K rows, small largest run, < 1 min
    python bench/table_scale.py                # 64K ... 16M rows, 6B-parameter table, ~5 min
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from memtron.bench.harness import (
    BenchRun,
    GiB,
    add_output_args,
    fmt_count,
    mem_available,
    parse_count,
    peak_rss,
    reset_peak_rss,
    rss,
    spawn_ranks,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(n: int, d: int, dtype: str, mode: str, moment: str = "fp32", lr: float = 1e-3,
          eps: float = 1e-8):
    """(table, optimizer): memtron's table and its sparse row optimizer in ``mode``."""
    from memtron.model.tables import LocalValueTable, TableSpec
    from memtron.train.optim import SparseRowOptimizer

    table = LocalValueTable(TableSpec("t", n, d, seed=0, dtype=DTYPES[dtype]))
    opt = SparseRowOptimizer({"values": table}, lr=lr, betas=(0.9, 0.95), eps=eps, mode=mode,
                             moment_dtype=DTYPES[moment])
    return table, opt


def table_step(table, opt, ids: torch.Tensor, weights: torch.Tensor,
               grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One table step through memtron's public API: lookup, backward, the optimizer's update;
    (forward output, weight gradient)."""
    w = weights.clone().requires_grad_(True)
    out = table.lookup(ids, w)
    out.backward(grad)
    opt.step()
    opt.zero_grad()
    return out.detach(), w.grad


def step_times(table, opt, tokens: int, hits: int, steps: int, seed: int = 0,
               distinct: int | None = None) -> tuple[list[float], int]:
    """Seconds of each of ``steps`` table steps after one warm-up step, each with fresh
    uniform random ids over the whole table (or, with ``distinct``, over that many distinct
    rows drawn from the whole table afresh each step), and the median count of distinct rows
    those steps touched (counted outside the timed region)."""
    g = torch.Generator().manual_seed(seed)
    times, touched = [], []
    for i in range(steps + 1):
        if distinct is None:
            ids = torch.randint(0, table.n_rows, (tokens, hits), generator=g)
        else:
            pool = torch.randperm(table.n_rows, generator=g)[:distinct]
            ids = pool[torch.randint(0, distinct, (tokens, hits), generator=g)]
        weights = torch.rand(tokens, hits, generator=g)
        grad = torch.randn(tokens, table.dim, generator=g)
        start = time.perf_counter()
        table_step(table, opt, ids, weights, grad)
        if i:
            times.append(time.perf_counter() - start)
            touched.append(torch.unique(ids).numel())
    return times, int(statistics.median(touched))


def scaling_row(n: int, times: list[float], touched: int, earlier: list[dict],
                label: str) -> dict:
    """One size's median step against the smallest size's (the first of ``earlier``), printed."""
    median = statistics.median(times)
    per_row = 1e6 * median / touched
    first = earlier[0] if earlier else {"step_s": median, "us_per_touched_row": per_row}
    row = {"rows": n, "step_s": median, "ratio": median / first["step_s"], "touched": touched,
           "us_per_touched_row": per_row,
           "per_row_ratio": per_row / first["us_per_touched_row"], "times": times}
    print(f"  {fmt_count(n):>5} rows, {label:<16}: {1e3 * median:7.1f} ms ({row['ratio']:.2f}x "
          f"the smallest); {touched:,} rows touched, {per_row:.2f} us each "
          f"({row['per_row_ratio']:.2f}x)", flush=True)
    return row


def measure_init(n: int, d: int, dtype: str) -> dict:
    """Seconds to build the table against filling as many bytes, both fresh allocations."""
    from memtron.model.tables import LocalValueTable, TableSpec

    nbytes = n * d * DTYPES[dtype].itemsize
    start = time.perf_counter()
    table = LocalValueTable(TableSpec("t", n, d, seed=0, dtype=DTYPES[dtype]))
    init_s = time.perf_counter() - start
    del table
    gc.collect()
    start = time.perf_counter()
    filled = torch.empty(n, d, dtype=DTYPES[dtype]).fill_(1.0)
    fill_s = time.perf_counter() - start
    del filled
    gc.collect()
    return {"rows": n, "dim": d, "dtype": dtype, "bytes": nbytes, "init_s": init_s,
            "init_gbs": nbytes / init_s / 1e9, "fill_s": fill_s, "fill_gbs": nbytes / fill_s / 1e9,
            "init_over_fill": init_s / fill_s}


def largest_child(rank: int, world: int, n: int, d: int, dtype: str, mode: str, moment: str,
                  tokens: int, hits: int, steps: int) -> dict:
    """In a fresh process: build, train ``steps`` steps, report peak RSS and times."""
    reset_peak_rss()
    base = rss()
    start = time.perf_counter()
    table, opt = build(n, d, dtype, mode, moment)
    build_s = time.perf_counter() - start
    times, _ = step_times(table, opt, tokens, hits, steps)
    finite = bool(torch.isfinite(table.weight[: min(n, 1 << 16)].float()).all())
    return {"rows": n, "dim": d, "params": n * d, "dtype": dtype, "optimizer": mode,
            "moment": moment, "build_s": build_s, "init_gbs": n * d * DTYPES[dtype].itemsize
            / build_s / 1e9, "steps": steps, "step_s_median": statistics.median(times),
            "peak_rss": peak_rss() - base, "bytes_per_param": opt.bytes_per_parameter()["values"],
            "finite": finite}


def bytes_table(d: int) -> list[dict]:
    """Table + state bytes per table parameter, every mode x table dtype (x moment dtype)."""
    from memtron.train.optim import MEMORY_OPTIMIZERS

    rows = []
    for mode in MEMORY_OPTIMIZERS:
        moments = ("fp32", "bf16") if mode in ("adam", "adam_rowwise_v") else ("fp32",)
        for dtype in ("fp32", "bf16"):
            for moment in moments:
                _, opt = build(64, d, dtype, mode, moment)
                rows.append({"optimizer": mode, "dtype": dtype, "moment": moment,
                             "bytes_per_param": opt.bytes_per_parameter()["values"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step T")
    p.add_argument("--hits", type=int, default=128, help="H*k hits per token")
    p.add_argument("--sizes", nargs="+", type=parse_count, default=None,
                   help="table rows for the scaling part (64K 1M 4M 16M)")
    p.add_argument("--distinct", type=parse_count, default=60_000,
                   help="distinct rows of the equal-rows scaling steps (at most the table's)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="scaling part's table dtype")
    p.add_argument("--optimizer", default="rowwise_adagrad", help="scaling part's mode")
    p.add_argument("--steps", type=int, default=5, help="timed steps per size (median)")
    p.add_argument("--init-rows", type=parse_count, default=None, help="init part (4M)")
    p.add_argument("--largest-rows", type=parse_count, default=None,
                   help="rows of the largest-table run (6e9 / dim; 0 skips it)")
    p.add_argument("--largest-dtype", choices=DTYPES, default="bf16")
    p.add_argument("--largest-optimizer", default="rowwise_adagrad")
    p.add_argument("--largest-moment", choices=DTYPES, default="fp32")
    p.add_argument("--largest-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="small sizes, a 64M-parameter largest run")
    add_output_args(p)
    a = p.parse_args(argv)
    d = a.dim
    a.sizes = a.sizes or ([1 << 16, 1 << 18] if a.quick else [1 << 16, 1 << 20, 1 << 22, 1 << 24])
    a.init_rows = a.init_rows or ((1 << 18) if a.quick else (1 << 22))
    if a.largest_rows is None:
        a.largest_rows = (1 << 18) if a.quick else -(-6_000_000_000 // d)
    if a.quick:
        a.steps = min(a.steps, 3)
    torch.set_num_threads(a.threads)
    from memtron.model.memory import cpu_kernels

    bench = BenchRun("table_scale", a).start()
    kernels = "C++ extension" if cpu_kernels.available(torch.empty(0)) else "torch ops"
    print(f"value tables at scale: d={d}, T={a.tokens}, H*k={a.hits}, threads "
          f"{torch.get_num_threads()}, CPU kernels: {kernels}", flush=True)
    results: dict = {"kernels": kernels}

    print("\n-- init (LocalValueTable, counter-based normal draws) against fill_ of the same bytes")
    results["init"] = []
    for dtype in ("fp32", "bf16"):
        row = measure_init(a.init_rows, d, dtype)
        results["init"].append(row)
        print(f"  {fmt_count(a.init_rows)} x {d} {dtype}: {row['bytes'] / GiB:.2f} GiB in "
              f"{row['init_s']:.2f} s = {row['init_gbs']:.2f} GB/s (fill_ {row['fill_gbs']:.2f}"
              f" GB/s; init / fill {row['init_over_fill']:.2f}x)", flush=True)
    bench.baseline = {"kind": "fill_ of the same bytes (init); the smallest table (scaling)",
                      "fill_gbs": [r["fill_gbs"] for r in results["init"]]}

    print(f"\n-- one table step (lookup + backward + {a.optimizer} update) against table size, "
          f"{a.dtype} rows, median of {a.steps}; per size: uniform hits over the table, then "
          f"hits over {a.distinct:,} distinct rows (the same rows' work at every size)")
    results["scaling"], results["scaling_equal_rows"] = [], []
    for n in a.sizes:
        need = n * d * DTYPES[a.dtype].itemsize * 1.1 + GiB
        if need > mem_available():
            print(f"  {fmt_count(n)}: skipped (needs ~{need / GiB:.1f} GiB)")
            continue
        table, opt = build(n, d, a.dtype, a.optimizer)
        for key, distinct in (("scaling", None), ("scaling_equal_rows", min(a.distinct, n))):
            times, touched = step_times(table, opt, a.tokens, a.hits, a.steps,
                                        distinct=distinct)
            label = "uniform hits" if distinct is None else f"{distinct:,} rows' hits"
            results[key].append(scaling_row(n, times, touched, results[key], label))
        del table, opt
        gc.collect()

    if a.largest_rows:
        n = a.largest_rows
        print(f"\n-- largest: {n:,} x {d} = {n * d / 1e9:.2f}B parameters, {a.largest_dtype} "
              f"rows, {a.largest_optimizer} (moment {a.largest_moment}), {a.largest_steps} "
              f"steps in a fresh process (MemAvailable {mem_available() / GiB:.1f} GiB)",
              flush=True)
        run = spawn_ranks(largest_child, 1, (n, d, a.largest_dtype, a.largest_optimizer,
                                             a.largest_moment, a.tokens, a.hits,
                                             a.largest_steps),
                          timeout=1800, threads=a.threads)
        if run.ok:
            row = run.results[0]
            print(f"  built in {row['build_s']:.1f} s ({row['init_gbs']:.2f} GB/s), step "
                  f"{1e3 * row['step_s_median']:.0f} ms, peak RSS {row['peak_rss'] / GiB:.2f} "
                  f"GiB, {row['bytes_per_param']:.3f} B/param, rows finite: {row['finite']}")
        else:
            row = {"rows": n, "error": "\n".join(run.errors)[-2000:]}
            print(f"  failed: {row['error']}")
        row["low_mem_available"] = run.low_mem_available
        results["largest"] = row

    print(f"\n-- bytes per table parameter (table + optimizer state), d={d}")
    results["bytes"] = bytes_table(d)
    for row in results["bytes"]:
        print(f"  {row['optimizer']:<20} {row['dtype']} rows, {row['moment']} moment: "
              f"{row['bytes_per_param']:.3f}")
    bench.results = results
    bench.finish()
    largest = results.get("largest", {})
    return 0 if "error" not in largest else 1


if __name__ == "__main__":
    raise SystemExit(main())
