"""Fetching value rows by id at inference: RAM, a memory-mapped bank, the memory server.

One table (default 1M rows x 256 fp32 = 1 GiB) is written as a bank by the writer export uses
(``memtron.storage.bank.write_bank``, 256 MiB block files). A fetch is one PKM step's worth of
ids: ``--tokens`` x ``--heads`` x ``--topk`` hits (2048 x 4 x 32) drawn uniformly, deduplicated
(``torch.unique``, sorted, as ``StoreValueTable`` sends them). Each backend fetches
``--batches`` such id sets; throughput = fetched row bytes / time:

    ram             RamRowStore over the table in this process
    mmap cold       MmapRowStore opened after the block files' pages were dropped from the page
                    cache (``posix_fadvise(DONTNEED)`` per file, nothing mapping them), per batch
    mmap warm       MmapRowStore, pages cached (after one untimed pass)
    server xN       N client threads, each an HttpRowStore, against ``memtron serve-memory``
                    (one worker, this bank) in a subprocess on 127.0.0.1

``fetch(ids)`` allocates its result; rows marked ``out=`` refill one preallocated tensor
instead, which shows what first-touch page faults of fresh result pages cost. The baseline is a
sequential read of the same block files (``readinto`` a reused 16 MiB buffer) measured in this
run, cold (pages dropped) and warm; each row's ratio is against the read in the same cache
state (cold for ``mmap cold``, warm for the rest). The 1-minute load average is printed beside
every row: on a machine shared with other jobs the numbers are only indicative.

    python bench/memory_fetch.py --quick             # 64K x 64 rows, < 1 min
    python bench/memory_fetch.py --out fetch.json    # the default size, ~2-3 min on 2 cores

``--bank``: hierarchical-bank blocks instead (DESIGN §5). The bank is the model's level tables
(``bank0`` ... ``bank{levels-1}``, row = node, row width = 3 x d_model x block_size_l x bank
layers, as ``memtron export bank`` writes them) filled with normal rows by the same writer; its
shape comes from ``--bank-config`` (default configs/hier-tiny.yaml), any of ``--levels
--branching --block-sizes --d-model --bank-layers``, or ``--published`` (4 levels x 16
branches, blocks 4/8/16/32 at d_model 64, one bank layer: 69,904 nodes, 1.6 GB). A fetch is
``--sequences`` uniformly random root-to-leaf paths, fetched as generation does, by
``TreeBank.fetch_paths``: one fetch per level for the whole batch (no deduplication, as
the model). Throughput is in blocks (one node's row) per second and GB/s, against the same
sequential read of all level tables' block files:

    python bench/memory_fetch.py --bank --threads 1              # hier-tiny's 14 MB bank
    python bench/memory_fetch.py --bank --published --threads 1  # 4 x 16, 1.6 GB
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from memtron.bench.harness import BenchRun, add_output_args
from memtron.config import BankConfig, load_config
from memtron.data.clustering import TreeShape
from memtron.infer.bank import TreeBank, level_table
from memtron.infer.server import running_server
from memtron.model.memory.hierarchical import level_offsets, row_width
from memtron.storage.bank import TableRows, open_bank, write_bank
from memtron.storage.store import HttpBank, HttpRowStore, RamRowStore, RowStore

GOALS = {"mmap warm": 0.7, "server": 0.3}  # of a warm sequential read
BUSY_LOAD = 1.0  # rows timed at a load average above this x the cores are starred


def make_bank(out: Path, rows: int, dim: int, seed: int) -> None:
    """A table of normal rows, generated 16 MiB at a time straight into the bank writer."""
    step = max(1, (16 << 20) // (dim * 4))
    gen = torch.Generator().manual_seed(seed)

    def blocks() -> Iterator[torch.Tensor]:
        for start in range(0, rows, step):
            yield torch.randn(min(step, rows - start), dim, generator=gen)

    write_bank(out, {"values": TableRows(rows, dim, torch.float32, blocks())},
               {"generated_by": "bench/memory_fetch.py", "seed": seed})


def block_files(bank: Path) -> list[Path]:
    """The block files of every table of ``bank``."""
    tables = open_bank(bank).manifest["tables"]
    return [bank / b["file"] for name in tables for b in tables[name]["blocks"]]


def drop_page_cache(files: list[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(files: list[Path]) -> tuple[int, float]:
    buffer = memoryview(bytearray(16 << 20))
    total, start = 0, time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total, time.perf_counter() - start


def id_batches(n_rows: int, hits: int, count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n_rows, (hits,), generator=gen).unique() for _ in range(count)]


def timed(batches: list[torch.Tensor], fetch: Callable[[torch.Tensor], object]) -> float:
    start = time.perf_counter()
    for ids in batches:
        fetch(ids)
    return time.perf_counter() - start


def filling(store: RowStore, out: torch.Tensor) -> Callable[[torch.Tensor], object]:
    """``store.fetch`` into the head of one preallocated tensor."""
    return lambda ids: store.fetch(ids, out=out[: ids.numel()])



def server_pass(url: str, batches: list[torch.Tensor], clients: int) -> tuple[int, float]:
    """``clients`` threads each fetch every batch (rotated); bytes and wall time."""
    stores = [HttpRowStore(url, "values") for _ in range(clients)]
    outs = [torch.empty(max(b.numel() for b in batches), stores[0].dim) for _ in stores]

    def client(i: int) -> int:
        order = batches[i % len(batches):] + batches[:i % len(batches)]
        for ids in order:
            stores[i].fetch(ids, out=outs[i][: ids.numel()])
        return sum(b.numel() for b in order) * stores[i].dim * 4

    client(0)  # warm: the server's pages and both sides' buffers
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        total = sum(pool.map(client, range(clients)))
        wall = time.perf_counter() - start
    for store in stores:
        store.close()
    return total, wall


def bank_shape(a: argparse.Namespace) -> tuple[BankConfig, int]:
    """The bank's shape: ``--bank-config``'s ``bank:`` and d_model, then the explicit options."""
    if a.published:
        cfg, d_model = BankConfig(layers=[0], levels=4, branching=16,
                                  block_sizes=[4, 8, 16, 32]), 64
    else:
        config = load_config(a.bank_config)
        cfg, d_model = config.bank, config.model.d_model
    if a.levels is not None:
        cfg.levels = a.levels
    if a.branching is not None:
        cfg.branching = a.branching
    if a.block_sizes is not None:
        cfg.block_sizes = a.block_sizes
    if a.bank_layers is not None:
        cfg.layers = list(range(a.bank_layers))
    if a.d_model is not None:
        d_model = a.d_model
    if len(cfg.block_sizes) != cfg.levels or not cfg.layers or cfg.levels < 1:
        raise SystemExit(f"bank: {cfg.levels} levels need as many block sizes (got "
                         f"{cfg.block_sizes}) and at least one bank layer (got {cfg.layers})")
    return cfg, d_model


def make_level_bank(out: Path, cfg: BankConfig, d_model: int, seed: int) -> None:
    """The level tables ``bank{l}`` of normal rows, 16 MiB at a time into the bank writer."""
    gen = torch.Generator().manual_seed(seed)

    def blocks(rows: int, dim: int) -> Iterator[torch.Tensor]:
        step = max(1, (16 << 20) // (dim * 4))
        for start in range(0, rows, step):
            yield torch.randn(min(step, rows - start), dim, generator=gen)

    nodes = cfg.nodes_per_level()
    tables = {level_table(level): TableRows(n, row_width(cfg, level, d_model), torch.float32,
                                            blocks(n, row_width(cfg, level, d_model)))
              for level, n in enumerate(nodes)}
    bank = {"levels": cfg.levels, "branching": cfg.branching, "layers": cfg.layers,
            "block_sizes": cfg.block_sizes, "d_model": d_model, "tables": list(tables),
            "offsets": level_offsets(nodes), "tree": None, "tree_sha256": None}
    write_bank(out, tables, {"generated_by": "bench/memory_fetch.py --bank", "seed": seed,
                             "bank": bank})


def path_batches(cfg: BankConfig, sequences: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` batches of ``sequences`` uniformly random root-to-leaf paths [n, levels] (node
    ids, level-major without the root)."""
    gen = torch.Generator().manual_seed(seed)
    shape = TreeShape(cfg.levels, cfg.branching)
    out = []
    for _ in range(count):
        leaf = torch.randint(0, cfg.branching**cfg.levels, (sequences,), generator=gen)
        out.append(torch.stack([shape.level_offset(level + 1)
                                + leaf // cfg.branching ** (cfg.levels - 1 - level)
                                for level in range(cfg.levels)], 1))
    return out


def level_stores(bank: Path | str, levels: int) -> list[RowStore]:
    source = HttpBank(bank) if isinstance(bank, str) else open_bank(bank)
    return [source.table(level_table(level)) for level in range(levels)]


def timed_paths(hbank: TreeBank, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for paths in batches:
        hbank.fetch_paths(paths)
    return time.perf_counter() - start


def bank_server_pass(url: str, shape: TreeShape, batches: list[torch.Tensor],
                     clients: int) -> float:
    """``clients`` threads, each with its own HttpRowStores, fetch every batch (rotated)."""
    banks = [TreeBank(level_stores(url, shape.levels), shape, url)  # type: ignore[arg-type]
             for _ in range(clients)]

    def client(i: int) -> None:
        order = batches[i % len(batches):] + batches[:i % len(batches)]
        timed_paths(banks[i], order)

    client(0)  # warm: the server's pages and both sides' buffers
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        list(pool.map(client, range(clients)))
        wall = time.perf_counter() - start
    for hbank in banks:
        for store in hbank.stores:
            store.close()  # type: ignore[attr-defined]
    return wall


def bank_main(a: argparse.Namespace, bench: BenchRun, root: Path) -> None:
    cfg, d_model = bank_shape(a)
    bank = root / "bank"
    shape = TreeShape(cfg.levels, cfg.branching)
    nodes = cfg.nodes_per_level()
    widths = [row_width(cfg, level, d_model) for level in range(cfg.levels)]
    t0 = time.perf_counter()
    make_level_bank(bank, cfg, d_model, seed=0)
    files = block_files(bank)
    total = sum(n * w * 4 for n, w in zip(nodes, widths, strict=True))
    print(f"bank: {cfg.levels} levels x {cfg.branching} branches ({sum(nodes)} nodes), blocks "
          f"{cfg.block_sizes} x d_model {d_model} x {len(cfg.layers)} bank layers, fp32 = "
          f"{total / 1e9:.3f} GB in {len(files)} block files, written in "
          f"{time.perf_counter() - t0:.1f} s")
    print("rows per level: " + ", ".join(f"bank{lv} {n} x {w * 4 / 1024:.0f} KiB"
                                         for lv, (n, w) in enumerate(zip(nodes, widths))))
    batches = path_batches(cfg, a.sequences, a.batches, seed=1)
    per_seq = sum(widths) * 4
    blocks = a.sequences * cfg.levels * len(batches)
    fetched = per_seq * a.sequences * len(batches)
    print(f"fetch: {a.sequences} paths x {cfg.levels} levels = {a.sequences * cfg.levels} blocks"
          f" ({per_seq * a.sequences / 2**20:.1f} MiB) per batch, {len(batches)} batches, "
          f"one fetch per level per batch (TreeBank.fetch_paths)")
    results: dict[str, object] = {
        "config": {"mode": "bank", "levels": cfg.levels, "branching": cfg.branching,
                   "block_sizes": cfg.block_sizes, "d_model": d_model,
                   "bank_layers": len(cfg.layers), "nodes": sum(nodes), "bank_bytes": total,
                   "row_bytes": [w * 4 for w in widths], "dtype": "float32",
                   "sequences": a.sequences, "batches": a.batches, "clients": a.clients,
                   "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                   "machine": platform.machine(),
                   "bank_config": None if a.published else str(a.bank_config),
                   "published": a.published},
        "rows": []}
    drop_page_cache(files)
    seq = {"cold": sequential_read(files)}
    seq["warm"] = sequential_read(files)
    seq_gbs = {k: n / t / 1e9 for k, (n, t) in seq.items()}
    results["sequential_read_GBps"] = seq_gbs

    def record(name: str, nbytes: int, n_blocks: float, seconds: float, cache: str) -> None:
        load = os.getloadavg()[0]
        gbs = nbytes / seconds / 1e9
        row = {"name": name, "blocks_per_s": n_blocks / seconds, "GBps": gbs,
               "vs_sequential": gbs / seq_gbs[cache], "baseline": f"sequential {cache}",
               "seconds": seconds, "load1": load}
        results["rows"].append(row)
        busy = "*" if load > BUSY_LOAD * (os.cpu_count() or 1) else ""
        print(f"{name:<22} {row['blocks_per_s'] / 1e3:9.2f} K blocks/s {gbs:8.3f} GB/s "
              f"{row['vs_sequential']:6.2f} x seq {cache:<4}   load {load:.2f}{busy}", flush=True)

    print(f"\n{'':<22} {'':>19} {'':>12} {'ratio':>11}")
    for cache in ("cold", "warm"):
        n, t = seq[cache]
        record(f"sequential read {cache}", n, n / per_seq * cfg.levels, t, cache)

    tables = [s.fetch(torch.arange(s.n_rows)) for s in level_stores(bank, cfg.levels)]
    gc.collect()
    ram = TreeBank([RamRowStore(t) for t in tables], shape)  # type: ignore[arg-type]
    timed_paths(ram, batches[:1])
    record("ram", fetched, blocks, timed_paths(ram, batches), "warm")
    del ram, tables
    gc.collect()

    cold = 0.0
    for paths in batches:
        drop_page_cache(files)  # nothing maps them now: the previous stores are gone
        hbank = TreeBank(level_stores(bank, cfg.levels), shape)  # type: ignore[arg-type]
        cold += timed_paths(hbank, [paths])
        del hbank
        gc.collect()
    record("mmap cold", fetched, blocks, cold, "cold")

    hbank = TreeBank(level_stores(bank, cfg.levels), shape)  # type: ignore[arg-type]
    timed_paths(hbank, batches)
    record("mmap warm", fetched, blocks, timed_paths(hbank, batches), "warm")
    del hbank
    gc.collect()

    with running_server(bank) as url:
        for clients in sorted({1, a.clients}):
            wall = bank_server_pass(url, shape, batches, clients)
            record(f"server x{clients}", fetched * clients, blocks * clients, wall, "warm")

    if any(r["load1"] > BUSY_LOAD * (os.cpu_count() or 1) for r in results["rows"]):
        print("* load average above the number of cores: other processes shared the CPUs; "
              "indicative only")
    bench.results = results
    bench.baseline = {"kind": "sequential read of the same bank files (all level tables; cold "
                      "and warm page cache)", "GBps": seq_gbs}
    bench.finish()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--batches", type=int, default=None,
                   help="id sets (or path batches) per timed pass; default 4 (--bank: 16)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--dir", type=Path, default=None, help="where to write the bank (temp dir)")
    p.add_argument("--quick", action="store_true", help="64K x 64 rows, 256 tokens")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads here and in the server (OMP_NUM_THREADS)")
    g = p.add_argument_group("hierarchical bank (--bank)")
    g.add_argument("--bank", action="store_true", help="fetch bank blocks by tree path")
    g.add_argument("--bank-config", type=Path, default=Path("configs/hier-tiny.yaml"))
    g.add_argument("--published", action="store_true",
                   help="4 levels x 16 branches, blocks 4 8 16 32, d_model 64, 1 layer (1.6 GB)")
    g.add_argument("--levels", type=int, default=None)
    g.add_argument("--branching", type=int, default=None)
    g.add_argument("--block-sizes", type=int, nargs="+", default=None)
    g.add_argument("--d-model", type=int, default=None)
    g.add_argument("--bank-layers", type=int, default=None, help="number of bank layers")
    g.add_argument("--sequences", type=int, default=64, help="paths per fetch batch")
    add_output_args(p)
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # the server subprocess inherits it
    if a.batches is None:
        a.batches = 16 if a.bank else 4
    if a.bank:
        root = Path(tempfile.mkdtemp(prefix="memfetch-", dir=a.dir))
        bench = BenchRun("memory_fetch", a).start()
        try:
            bank_main(a, bench, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return 0
    if a.quick:
        a.rows, a.dim, a.tokens = 1 << 16, 64, 256
    hits = a.tokens * a.heads * a.topk
    root = Path(tempfile.mkdtemp(prefix="memfetch-", dir=a.dir))
    bank = root / "bank"
    results: dict[str, object] = {
        "config": {"rows": a.rows, "dim": a.dim, "dtype": "float32", "hits": hits,
                   "batches": a.batches, "clients": a.clients, "threads": torch.get_num_threads(),
                   "cpus": os.cpu_count(), "machine": platform.machine()},
        "rows": []}
    bench = BenchRun("memory_fetch", a).start()
    try:
        t0 = time.perf_counter()
        make_bank(bank, a.rows, a.dim, seed=0)
        files = block_files(bank)
        print(f"bank: {a.rows} x {a.dim} fp32 = {a.rows * a.dim * 4 / 2**30:.2f} GiB in "
              f"{len(files)} block files, written in {time.perf_counter() - t0:.1f} s")
        batches = id_batches(a.rows, hits, a.batches, seed=1)
        unique = sum(b.numel() for b in batches) / len(batches)
        print(f"fetch: {a.tokens} tokens x {a.heads} heads x {a.topk} hits = {hits} ids, "
              f"{unique:.0f} distinct on average ({unique * a.dim * 4 / 2**20:.0f} MiB)")

        drop_page_cache(files)
        seq = {"cold": sequential_read(files)}
        seq["warm"] = sequential_read(files)
        seq_gbs = {k: n / t / 1e9 for k, (n, t) in seq.items()}
        results["sequential_read_GBps"] = seq_gbs

        def record(name: str, nbytes: int, seconds: float, cache: str) -> None:
            load = os.getloadavg()[0]
            gbs = nbytes / seconds / 1e9
            row = {"name": name, "rows_per_s": nbytes / (a.dim * 4) / seconds, "GBps": gbs,
                   "vs_sequential": gbs / seq_gbs[cache], "baseline": f"sequential {cache}",
                   "load1": load}
            results["rows"].append(row)
            busy = "*" if load > BUSY_LOAD * (os.cpu_count() or 1) else ""
            print(f"{name:<22} {row['rows_per_s'] / 1e6:8.2f} M rows/s {gbs:7.2f} GB/s "
                  f"{row['vs_sequential']:6.2f} x seq {cache:<4}   load {load:.2f}{busy}",
                  flush=True)

        print(f"\n{'':<22} {'':>17} {'':>12} {'ratio':>11}")
        for cache in ("cold", "warm"):
            record(f"sequential read {cache}", *seq[cache], cache)
        fetched = sum(b.numel() for b in batches) * a.dim * 4

        store: RowStore = open_bank(bank).table("values")
        table = store.fetch(torch.arange(a.rows))  # the whole table in RAM
        del store
        gc.collect()
        ram = RamRowStore(table)
        out = torch.empty(max(b.numel() for b in batches), a.dim)
        timed(batches[:1], ram.fetch)
        record("ram", fetched, timed(batches, ram.fetch), "warm")
        record("ram out=", fetched, timed(batches, filling(ram, out)), "warm")
        del ram, table
        gc.collect()

        cold = 0.0
        for ids in batches:
            drop_page_cache(files)  # nothing maps them now: the previous store is gone
            cold += timed([ids], filling(open_bank(bank).table("values"), out))
            gc.collect()
        record("mmap cold out=", fetched, cold, "cold")

        store = open_bank(bank).table("values")
        timed(batches, store.fetch)
        record("mmap warm", fetched, timed(batches, store.fetch), "warm")
        record("mmap warm out=", fetched, timed(batches, filling(store, out)), "warm")
        del store
        gc.collect()

        with running_server(bank) as url:
            for clients in sorted({1, a.clients}):
                record(f"server x{clients} out=", *server_pass(url, batches, clients), "warm")

        for row in results["rows"]:
            goal = next((g for k, g in GOALS.items() if row["name"].startswith(k)), None)
            if goal is not None:
                row["goal"] = goal
                row["meets_goal"] = row["vs_sequential"] >= goal
        if any(r["load1"] > BUSY_LOAD * (os.cpu_count() or 1) for r in results["rows"]):
            print("* load average above the number of cores: other processes shared the CPUs "
                  "(torch's parallel gathers stall on preempted threads); indicative only")
        print("\ngoals (x warm sequential read): "
              + ", ".join(f"{r['name']} {r['vs_sequential']:.2f} "
                          f"{'>=' if r['meets_goal'] else '<'} {r['goal']}"
                          for r in results["rows"] if "goal" in r))
        bench.results = results
        bench.baseline = {"kind": "sequential read of the same bank files (cold and warm page "
                          "cache)", "GBps": seq_gbs}
        bench.finish()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
