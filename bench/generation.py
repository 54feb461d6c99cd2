"""Generation tokens/s with the value tables in RAM, memory-mapped from a bank, and served by
``memtron serve-memory`` over loopback (the system as shipped: ``load_model`` + ``generate``).

Two models: the demo's (``configs/tiny-cpu.yaml``, a 4,096-slot table) and the same model with
a 1M-slot table (``memory.n_sub_keys=1024``, 512 MiB fp32). Each is saved as a checkpoint
(untrained: the timing does not depend on the weights' values), exported as a bank, and
generates greedily for a batch of prompts with every value source; mmap and server are
reported as ratios to RAM measured in the same run, with the load average beside them.

    python bench/generation.py --quick            # tiny model only, a few seconds a source
    python bench/generation.py --out gen.json     # tiny and 1M-slot models
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from memtron.bench.harness import BYTE_LEVEL, BenchRun, add_output_args, cpu_model
from memtron.config import load_config
from memtron.export.bank import export_bank
from memtron.infer.generate import SamplingConfig, generate
from memtron.infer.model import load_model
from memtron.infer.server import running_server
from memtron.model.transformer import build_model
from memtron.train.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["Zabrin Lothe was born in", "The birthplace of Kael Thorn is",
           "Mira Velt works as a", "Doran Pike's favourite colour is"]


def make_checkpoint(root: Path, overrides: list[str]) -> tuple[Path, int]:
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [*BYTE_LEVEL, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg)
    ckpt = save_checkpoint(root / "checkpoints", 1, {"model": model.state_dict()},
                           {"config": cfg.to_dict(), "data_state": None}, keep_last=1)
    return ckpt, cfg.memory.n_slots


def time_source(ckpt: Path, values: str, cache_rows: int, new_tokens: int,
                repeats: int) -> dict:
    loaded = load_model(ckpt, values=values, cache_rows=cache_rows)
    prompts = [[256, *p.encode()] for p in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=new_tokens, greedy=True, stop_at_eos=False)
    generate(loaded.model, prompts, sampling, 256)  # warm-up (and the cache, if any)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = generate(loaded.model, prompts, sampling, 256)
        runs.append((result.new_tokens / (time.perf_counter() - start),
                     result.decode_tokens_per_s, result.tokens))
    runs.sort(key=lambda r: r[0])
    total, decode, tokens = runs[len(runs) // 2]
    stats = loaded.fetch_stats()
    return {"values": values, "cache_rows": cache_rows, "tokens_per_s": total,
            "decode_tokens_per_s": decode, "tokens": tokens,
            "cache_hit_rate": stats.get("cache_hit_rate"),
            "rows_fetched": stats.get("rows_fetched"),
            "load_avg_1min": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny model only")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-rows", type=int, default=65536,
                   help="LRU rows per store-backed table (memtron generate's default)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_output_args(p)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    bench = BenchRun("generation", a).start()
    models = {"tiny (4K slots)": []}
    if not a.quick:
        models["1M slots"] = ["memory.n_sub_keys=1024"]
    print(f"generation bench: {cpu_model()}, {os.cpu_count()} "
          f"cores, torch {torch.__version__}, {a.threads} threads; batch {len(PROMPTS)}, "
          f"{a.new_tokens} new tokens, greedy, median of {a.repeats}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in models.items():
            root = Path(tmp) / name.split()[0]
            ckpt, slots = make_checkpoint(root, overrides)
            export_bank(ckpt, root / "bank")
            rows = []
            with running_server(root / "bank") as url:
                for values in ("ram", f"mmap:{root / 'bank'}", url):
                    rows.append(time_source(ckpt, values, a.cache_rows, a.new_tokens,
                                            a.repeats))
            ram_tokens = rows[0]["tokens"]
            for source, row in zip(("ram", "mmap", "http"), rows):
                row.update(model=name, slots=slots, source=source,
                           ratio_to_ram=row["tokens_per_s"] / rows[0]["tokens_per_s"],
                           same_tokens_as_ram=row.pop("tokens") == ram_tokens)
                hit = row["cache_hit_rate"]
                print(f"  {name:16s} {source:5s} {row['tokens_per_s']:8.1f} tok/s "
                      f"(decode {row['decode_tokens_per_s']:8.1f}) = "
                      f"{row['ratio_to_ram']:.2f} x RAM"
                      + (f", cache hit rate {hit:.1%}" if hit is not None else "")
                      + f", same tokens {row['same_tokens_as_ram']}, load "
                      f"{row['load_avg_1min']:.2f}")
            results.extend(rows)
    bench.results = results
    bench.baseline = {"kind": "value tables in RAM (same model, same prompts)",
                      "tokens_per_s": {r["model"]: r["tokens_per_s"] for r in results
                                       if r["source"] == "ram"}}
    bench.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
