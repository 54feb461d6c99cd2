"""Run a function on N local ranks (gloo), the way torchrun would start them, and collect
each rank's return value. Ranks are spawned processes with torchrun's environment variables,
so the code under test goes through its normal launch path."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        result = fn(rank, *args)
        torch.save({"ok": result}, Path(out) / f"rank{rank}.pt")
    except BaseException:
        torch.save({"error": traceback.format_exc()}, Path(out) / f"rank{rank}.pt")
        raise


def run_ranks(world: int, fn: Callable, *args: Any, timeout: float = 300) -> list[Any]:
    """``fn(rank, *args)`` on ``world`` processes; returns the results in rank order."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        results, errors = [], []
        for rank in range(world):
            path = Path(out) / f"rank{rank}.pt"
            if not path.exists():
                errors.append(f"rank {rank} produced no result (exit {procs[rank].exitcode})")
                continue
            record = torch.load(path, weights_only=False)
            if "error" in record:
                errors.append(f"rank {rank} failed:\n{record['error']}")
            else:
                results.append(record["ok"])
        if errors:  # all of them: a peer's "connection closed" often hides the first cause
            raise RuntimeError("\n".join(errors))
        return results
